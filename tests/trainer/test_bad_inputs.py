"""Bad inputs and faults as users meet them, one line or two each, with what SRPOTrainer must do about them: a clear
error (naming the field, file or function, and the fix), a warning, or nothing because it is fine. Tiny model, at most
a few steps, one process.

`python tests/trainer/test_bad_inputs.py` tallies the outcomes (clear error / warning / fine / unclear error / silent)
of the `srpo_trl` on the path, so the sweep can be re-measured against any version of the package:
`PYTHONPATH=path/to/other/checkout python tests/trainer/test_bad_inputs.py`. Measured when the sweep was written
(issue 16): 76 cases, 47 clear errors, 9 warnings, 20 fine, 0 unclear errors, 0 silent; the package before that
issue's fixes gave 21 clear errors, 1 warning, 19 fine, 11 unclear errors, 24 silent. Since then every GRPO loss type
trains (issue 12): 77 cases, 46 clear errors, 9 warnings, 22 fine. The second sweep (issue 22, `SECOND_SWEEP`) brings
it to 135 cases: 75 clear errors, 18 warnings, 42 fine, 0 unclear errors, 0 silent; the package before that issue's
fixes gave 50 clear errors, 10 warnings, 34 fine, 16 unclear errors, 25 silent. The third sweep (issue 29,
`THIRD_SWEEP`: privileged contexts, teacher kinds under PEFT, `from_grpo_config`, the avg@k callback, thresholds that
count partial credit, model families, JSON Lines, the CLI's flags, checkpoints) brings it to 206 cases: 112 clear
errors, 31 warnings, 63 fine, 0 unclear errors, 0 silent; the package before that issue's fixes gave 75 clear errors,
18 warnings, 50 fine, 27 unclear errors, 36 silent (its 71 new cases: 8 fine, 27 unclear errors, 36 silent).
"""

import contextlib
import copy
import io
import math
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import pytest
import torch
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file, save_file
from trl import GRPOConfig, GRPOTrainer

from srpo_trl import SRPOConfig, SRPOTrainer
from srpo_trl.prompts import build_teacher_prompt
from srpo_trl.testbed.model import build_tiny_model

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, where `helpers` is, when run as a script
from helpers.tiny_trainer import PROMPTS, built, first_letter_reward, graded_reward, logged, make_args, resume  # noqa: E402

TEACHER_FILE = "srpo_teacher.safetensors"
OUTCOME = {"error": "clear error", "warning": "warning", "fine": "fine"}


@dataclass
class Case:
    """`run(tokenizer, tmp_path)` meets the bad input. `expect` is what SRPOTrainer must do: "error" (an exception
    whose `TypeName: message` matches `match`), "warning" (a warning matching `match`) or "fine" (neither; a warning
    matching `match`, when given, is a false alarm). `run`'s own asserts check what the library did not report."""

    id: str
    expect: str
    match: str
    run: Callable = field(repr=False)


def observe(case: Case, tokenizer, tmp_path: Path) -> tuple[str, str]:
    """What happened, as one of the tally's outcomes, and the message behind it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run(tokenizer, tmp_path)
        except AssertionError as failure:  # the outcome is wrong and nothing said so
            return "silent", f"AssertionError: {failure}"
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            clear = case.expect == "error" and re.search(case.match, message, flags=re.DOTALL)
            return ("clear error" if clear else "unclear error"), message
    said = [str(w.message) for w in caught if case.match and re.search(case.match, str(w.message), flags=re.DOTALL)]
    if case.expect == "warning":
        return ("warning", said[0]) if said else ("silent", "no error and no matching warning")
    if case.expect == "fine":
        return ("unclear error", f"false alarm: {said[0]}") if said else ("fine", "")
    return "silent", "no error"


# ---- the ways to meet a bad input ----


def config(**overrides):
    """Only SRPOConfig is built."""
    return lambda tokenizer, tmp_path: make_args(tmp_path, **overrides)


def trained(tokenizer, tmp_path, **settings):
    trainer = built(tokenizer, tmp_path, **settings)
    trainer.train()
    return trainer


def build(**settings):
    """An SRPOTrainer is built, not trained."""
    return lambda tokenizer, tmp_path: built(tokenizer, tmp_path, **settings)


def train(check=None, **settings):
    """An SRPOTrainer is built and trained (one step unless `max_steps` says otherwise); `check(trainer)` asserts
    what must hold afterwards."""

    def run(tokenizer, tmp_path):
        trainer = trained(tokenizer, tmp_path, **settings)
        if check is not None:
            check(trainer)

    return run


def finite_loss(trainer):
    assert all(math.isfinite(v) for v in logged(trainer, "loss")), logged(trainer, "loss")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "the policy has non-finite weights"


def conversation(*turns):
    return Dataset.from_dict({"prompt": [[{"role": role, "content": content} for role, content in turns]] * 16})


SYSTEM_ONLY = conversation(("system", "Spell a"))
CAPITALISED_ROLE = conversation(("User", "Spell a"))
ASSISTANT_LAST = conversation(("system", "Be brief"), ("assistant", "Spell a"))
MULTIMODAL = Dataset.from_dict({"prompt": [[{"role": "user", "content": [{"type": "text", "text": "Spell a"}]}]] * 16})
WITH_SYSTEM = conversation(("system", "Be brief"), ("user", "Spell a"))
SEVERAL_USER_TURNS = conversation(("user", "Hi"), ("assistant", "Hello"), ("user", "Spell a"))
PLAIN_TEXT = Dataset.from_dict({"prompt": [f"Spell {w}" for w in "abcdefghijklmnop"]})


def streamed(dataset):
    return IterableDataset.from_generator(lambda: iter(dataset))


def plain_first_letter_reward(completions, **kwargs):
    return [1.0 if c[:1].islower() else 0.0 for c in completions]


def overflowing_reward(completions, **kwargs):
    return [math.inf] + first_letter_reward(completions)[1:]


def underflowing_reward(completions, **kwargs):
    return [-math.inf] + first_letter_reward(completions)[1:]


def half_unscorable_reward(completions, **kwargs):
    return [None if i % 2 else r for i, r in enumerate(first_letter_reward(completions))]


def format_reward(completions, **kwargs):
    """A 0/1 reward almost every completion earns: beside a 0/1 correctness reward, the sum reaches 1 anyway."""
    return [1.0] * len(completions)


def short_reward(completions, **kwargs):
    return first_letter_reward(completions)[:-1]


def bool_reward(completions, **kwargs):
    return [c[0]["content"][:1].islower() for c in completions]


def feedback_of_wrong_length(completions, log_extra, **kwargs):
    log_extra("feedback", ["try again"] * (len(completions) - 1))
    return first_letter_reward(completions)


def feedback_or_none(completions, log_extra, **kwargs):
    log_extra("feedback", [None if i % 2 else "try again" for i in range(len(completions))])
    return first_letter_reward(completions)


def no_routing(trainer):
    assert logged(trainer, "srpo/route/sdpo_frac") == [0.0], "rows without a demonstration must not be distilled"
    assert logged(trainer, "srpo/teacher_prompt_dropped_frac") == [1.0], "the rerouted rows must be counted"


def demonstration_cut(tokenizer, tmp_path):
    """Room for 8 of up to 12 characters of demonstration: cut in the middle, still distilled."""
    limit = demonstration_room(tokenizer, 8)
    trainer = trained(tokenizer, tmp_path, max_completion_length=12, max_teacher_prompt_length=limit)
    assert logged(trainer, "srpo/teacher_prompt_truncated_frac")[0] > 0
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0


def demonstration_room(tokenizer, room: int) -> int:
    """A `max_teacher_prompt_length` leaving `room` tokens for the demonstration of `PROMPTS`' teacher prompts."""
    prompt = build_teacher_prompt(PROMPTS[0]["prompt"], "")
    render = dict(add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False)
    return len(tokenizer.apply_chat_template(prompt, **render)["input_ids"]) + room


# ---- checkpoints: one saved run per case, then a resume after the fault ----


def checkpointed(tokenizer, tmp_path, trainer_class=SRPOTrainer, **overrides) -> Path:
    """Train one step and save it; returns the checkpoint folder."""
    args = make_args(
        tmp_path / "run", GRPOConfig if trainer_class is GRPOTrainer else SRPOConfig, save_strategy="steps",
        save_steps=1, max_steps=1, **overrides,
    )  # fmt: skip
    model = build_tiny_model(tokenizer, seed=0)
    trainer_class(model, first_letter_reward, args=args, train_dataset=PROMPTS, processing_class=tokenizer).train()
    return tmp_path / "run" / "checkpoint-1"


def resume_after(damage, **overrides):
    """Save a checkpoint, `damage(checkpoint_folder)`, resume from it."""

    def run(tokenizer, tmp_path):
        checkpoint = checkpointed(tokenizer, tmp_path, **overrides)
        damage(checkpoint)
        resume(tokenizer, checkpoint.parent, checkpoint)

    return run


def overwrite(data: bytes):
    return lambda checkpoint: (checkpoint / TEACHER_FILE).write_bytes(data)


def truncate(checkpoint):
    path = checkpoint / TEACHER_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_state(edit):
    def damage(checkpoint):
        state = load_file(checkpoint / TEACHER_FILE)
        edit(state)
        save_file(state, checkpoint / TEACHER_FILE)

    return damage


def poison(value):
    def edit(state):
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = value

    return edit_state(edit)


def drop_a_tensor(state):
    del state["lm_head.weight"]


def reshape_a_tensor(state):
    state["lm_head.weight"] = state["lm_head.weight"][:-1]


def rename_teacher_file(name):
    return lambda checkpoint: (checkpoint / TEACHER_FILE).rename(checkpoint / name)


def teacher_restarts_from_the_resumed_policy(**overrides):
    """No teacher state in the checkpoint: after the resume the teacher equals the resumed policy (not the initial
    model, which the checkpoint's step moved away from)."""

    def run(tokenizer, tmp_path):
        checkpoint = checkpointed(tokenizer, tmp_path, **overrides)
        (checkpoint / TEACHER_FILE).unlink(missing_ok=True)
        loaded = resume(tokenizer, checkpoint.parent, checkpoint)
        initial = dict(build_tiny_model(tokenizer, seed=0).named_parameters())
        policy, teacher = loaded.policy, loaded.teacher
        assert any(not torch.equal(policy[n], initial[n]) for n in policy), "the checkpoint's step moved the policy"
        assert all(torch.equal(teacher[n], policy[n]) for n in policy), "the teacher must restart from the policy"

    return run


def resume_from_grpo_checkpoint(tokenizer, tmp_path):
    checkpoint = checkpointed(tokenizer, tmp_path, trainer_class=GRPOTrainer)
    loaded = resume(tokenizer, checkpoint.parent, checkpoint)
    assert all(torch.equal(w, loaded.policy[n]) for n, w in loaded.teacher.items()), "the teacher must restart"


class DiskFull(OSError):
    pass


def teacher_write_fails_at_the_second_save(tokenizer, tmp_path):
    """The teacher write raises at checkpoint-2 with `save_total_limit=1`: checkpoint-1 must survive with its
    teacher, no complete checkpoint may lack one, and checkpoint-1 resumes."""
    import srpo_trl.checkpointing

    saves = []
    real_save_file = srpo_trl.checkpointing.save_file

    def failing_save_file(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise DiskFull("No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    srpo_trl.checkpointing.save_file = failing_save_file
    try:
        args = dict(save_strategy="steps", save_steps=1, save_total_limit=1, max_steps=2)
        with pytest.raises(OSError, match=r"Cannot write the SRPO teacher state .*checkpoint-2.*No space left"):
            trained(tokenizer, tmp_path / "run", **args)
    finally:
        srpo_trl.checkpointing.save_file = real_save_file
    run = tmp_path / "run"
    assert (run / "checkpoint-1" / TEACHER_FILE).exists(), "the previous checkpoint was rotated away"
    for checkpoint in run.glob("checkpoint-*"):
        complete = (checkpoint / "trainer_state.json").exists()
        assert not complete or (checkpoint / TEACHER_FILE).exists(), f"{checkpoint.name} is complete without teacher"
    assert not [p.name for p in run.rglob("*") if p.name.startswith(TEACHER_FILE) and p.name != TEACHER_FILE]
    resume(tokenizer, run, run / "checkpoint-1")


def rotation_keeps_a_teacher(tokenizer, tmp_path):
    trained(tokenizer, tmp_path, save_strategy="steps", save_steps=1, save_total_limit=1, max_steps=2)
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / TEACHER_FILE).exists()


def resume_restores_the_teacher(tokenizer, tmp_path):
    checkpoint = checkpointed(tokenizer, tmp_path)
    saved = load_file(checkpoint / TEACHER_FILE)
    loaded = resume(tokenizer, checkpoint.parent, checkpoint)
    assert saved.keys() == loaded.teacher.keys() and all(torch.equal(loaded.teacher[n], saved[n]) for n in saved)


def grpo_config_given(tokenizer, tmp_path):
    SRPOTrainer(build_tiny_model(tokenizer), first_letter_reward, args=make_args(tmp_path, GRPOConfig))


# ---- the second sweep (issue 22): groups of one, reward scales, contexts, stale files, reused models, shapes ----


def logged_after(key, check):
    """`check(values)` on the logged values of `key`."""
    return lambda trainer: check(logged(trainer, key))


def eval_groups_of_one(tokenizer, tmp_path):
    trainer = trained(
        tokenizer, tmp_path, routing="sdpo", eval_dataset=PROMPTS.select(range(8)), num_generations_eval=1,
        per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    assert logged(trainer, "eval_srpo/route/sdpo_frac") == [0.0], "a group of one has no sibling to teach it"


def percent_reward(completions, **kwargs):
    return [100.0 * (len(set(c[0]["content"])) % 5) / 4 for c in completions]


def returns(value):
    """A reward function named after what it returns."""

    def reward(completions, **kwargs):
        return value(completions) if callable(value) else value

    return reward


def named(function, name):
    function.__name__ = name
    return function


async def async_float_reward(completions, **kwargs):
    return 0.5


def generator_reward(completions, **kwargs):
    return (r for r in first_letter_reward(completions))


def no_prompt_column(routing="srpo"):
    return build(dataset=PROMPTS.rename_column("prompt", "question"), routing=routing)


def rows_with(bad_row, at, count=40, text=False):
    good = (lambda i: f"Spell {i}") if text else (lambda i: [{"role": "user", "content": f"Spell {i}"}])
    return Dataset.from_dict({"prompt": [bad_row if i == at else good(i) for i in range(count)]})


def without_system_turns(tokenizer):
    stripped = copy.deepcopy(tokenizer)  # not the shared fixture
    stripped.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return stripped


def with_tokenizer(change, **settings):
    """Trained with `change(tokenizer)` instead of the shared tokenizer."""

    def run(tokenizer, tmp_path):
        model = build_tiny_model(tokenizer, seed=0)
        args = make_args(tmp_path, **dict(dict(max_steps=1), **settings.pop("args", {})))
        SRPOTrainer(model, first_letter_reward, args=args, processing_class=change(tokenizer), **settings).train()

    return run


def without_pad_token(tokenizer):
    stripped = copy.deepcopy(tokenizer)
    stripped.pad_token = None
    return stripped


def short_context(kind, positions):
    """An SRPOTrainer over a model of `positions` positions (GPT-2's `n_positions`, Qwen3's
    `max_position_embeddings`), trained one step; no teacher pass may span more positions."""

    def run(tokenizer, tmp_path):
        if kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(
                vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            torch.manual_seed(0)
            model = GPT2LMHeadModel(config)
        else:
            model = build_tiny_model(tokenizer, seed=0)
            model.config.max_position_embeddings = positions
        # an explicit teacher-prompt length beyond the context (the default is capped to it without a warning)
        args = make_args(tmp_path, max_steps=1, max_completion_length=12, max_teacher_prompt_length=4096)
        trainer = SRPOTrainer(model, first_letter_reward, args=args, train_dataset=PROMPTS, processing_class=tokenizer)
        widths = []
        trainer.teacher.model.register_forward_pre_hook(
            lambda module, args, kwargs: widths.append(kwargs["attention_mask"].size(1)), with_kwargs=True
        )
        trainer.train()
        assert max(widths, default=0) <= positions, f"a teacher pass spans {max(widths)} > {positions} positions"

    return run


def copy_teacher_from_first_checkpoint(tokenizer, tmp_path):
    trained(tokenizer, tmp_path / "run", save_strategy="steps", save_steps=1, max_steps=2)
    run = tmp_path / "run"
    shutil.copy(run / "checkpoint-1" / TEACHER_FILE, run / "checkpoint-2" / TEACHER_FILE)
    resume(tokenizer, run, run / "checkpoint-2")


def drop_teacher_step(checkpoint):
    save_file(load_file(checkpoint / TEACHER_FILE), checkpoint / TEACHER_FILE)  # no metadata, as older files


def checkpoint_mid_generation_batch(tokenizer, tmp_path):
    trained(tokenizer, tmp_path, save_strategy="steps", save_steps=1, max_steps=2, steps_per_generation=2)


def resume_true_after_a_cut_checkpoint(tokenizer, tmp_path):
    checkpoint = checkpointed(tokenizer, tmp_path)
    cut = checkpoint.parent / "checkpoint-2"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(b"")
    trainer = built(tokenizer, checkpoint.parent, max_steps=2)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2


def resume_srpo_checkpoint_as_grpo(tokenizer, tmp_path):
    checkpoint = checkpointed(tokenizer, tmp_path)
    built(tokenizer, checkpoint.parent, max_steps=2, routing="grpo").train(resume_from_checkpoint=str(checkpoint))


def teacher_write_without_space(tokenizer, tmp_path):
    from safetensors import SafetensorError

    import srpo_trl.checkpointing

    def no_space(tensors, path, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    real_save_file, srpo_trl.checkpointing.save_file = srpo_trl.checkpointing.save_file, no_space
    try:
        trained(tokenizer, tmp_path, save_strategy="steps", save_steps=1)
    finally:
        srpo_trl.checkpointing.save_file = real_save_file


def lora_model_reused(tokenizer, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    first = SRPOTrainer(
        build_tiny_model(tokenizer, seed=0), first_letter_reward, args=make_args(tmp_path / "a", max_steps=1),
        train_dataset=PROMPTS, processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    first.train()
    second = SRPOTrainer(
        first.model, first_letter_reward, args=make_args(tmp_path / "b", max_steps=1), train_dataset=PROMPTS,
        processing_class=tokenizer,
    )  # fmt: skip
    second.train()
    second.model.save_pretrained(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert not any("srpo_teacher" in key for key in saved), "save_pretrained published the teacher adapter"


def finite_weights(trainer):
    finite_loss(trainer)
    assert all(torch.isfinite(p).all() for p in trainer.teacher.model.parameters()), "the teacher is non-finite"


SECOND_SWEEP = [
    # ---- SRPOConfig: numpy scalars, reward weights, extreme values ----
    Case("distillation_topk=np.int64(8)", "fine", "", config(distillation_topk=numpy.int64(8))),
    Case("teacher_update_rate=np.float32(0.5)", "fine", "", config(teacher_update_rate=numpy.float32(0.5))),
    Case("dynamic_weighting=np.bool_(False)", "fine", "", config(dynamic_weighting=numpy.bool_(False))),
    Case("distillation_topk=np.float64(8)", "error", r"SRPOConfig\.distillation_topk must be an integer",
         config(distillation_topk=numpy.float64(8))),
    Case("reward_weights=[nan]", "error", r"SRPOConfig\.reward_weights must be a list of finite numbers.*nan",
         config(reward_weights=[math.nan])),
    Case("reward_weights=[inf, 1]", "error", r"SRPOConfig\.reward_weights must be .*inf",
         config(reward_weights=[math.inf, 1.0])),
    Case("reward_weights=['0.5'] (YAML)", "error", r"SRPOConfig\.reward_weights must be .*'0\.5'",
         config(reward_weights=["0.5"])),
    Case("reward_weights=0.5 (not a list)", "error", r"SRPOConfig\.reward_weights must be a list",
         config(reward_weights=0.5)),
    Case("reward_weights of the wrong length", "error", r"reward weights \(2\) must match .* reward functions \(1\)",
         train(reward_weights=[1.0, 2.0])),
    Case("reward_weights negative", "fine", "", train(reward_weights=[-1.0], check=finite_loss)),
    Case("reward_weights summing to 1", "fine", "",
         train(reward=[first_letter_reward, named(returns(first_letter_reward), "same"),
                       named(returns(first_letter_reward), "again")], reward_weights=[0.35, 0.45, 0.2],
               check=logged_after("srpo/route/sdpo_frac", lambda v: v[0] > 0))),
    Case("weighting_temperature=1e-39", "fine", "", train(weighting_temperature=1e-39, check=finite_weights)),
    Case("weighting_temperature=5e-324", "fine", "", train(weighting_temperature=5e-324, check=finite_weights)),
    Case("weighting_temperature=1e300", "fine", "", train(weighting_temperature=1e300, check=finite_weights)),
    Case("num_generations=3, batch 8", "error", r"divisible by num_generations \(3\)", config(num_generations=3)),
    Case("threshold below every reward", "warning", r"Every rollout .*success_reward_threshold=-1\.0",
         train(success_reward_threshold=-1.0, max_steps=5)),
    # ---- routing: groups of one, scales ----
    Case("num_generations_eval=1", "fine", "", eval_groups_of_one),
    Case("rewards on 0-100, threshold 1", "warning", r"success_reward_threshold=1\.0 looks low.*\[0\.0, \d+\.0\]",
         train(reward=percent_reward, max_steps=5)),
    Case("rewards on 0-100, threshold 100", "fine", r"success_reward_threshold",
         train(reward=percent_reward, max_steps=5, success_reward_threshold=100.0)),
    # ---- datasets ----
    Case("no prompt column", "error", r"train_dataset has no 'prompt' column \(its columns: \['question'\]\)",
         no_prompt_column()),
    Case("no prompt column, routing=grpo", "error", r"train_dataset has no 'prompt' column",
         no_prompt_column("grpo")),
    Case("eval_dataset without prompt column", "error", r"eval_dataset has no 'prompt' column",
         build(eval_dataset=PROMPTS.rename_column("prompt", "q"))),
    Case("zero rows", "error", r"train_dataset has no rows", build(dataset=PROMPTS.select([]))),
    Case("empty plain-text prompt, row 30", "error", r"train_dataset row 30: the prompt is ''",
         build(dataset=rows_with("", 30, text=True), reward=plain_first_letter_reward)),
    Case("empty plain-text prompt, routing=grpo", "error", r"row 30: the prompt is ''",
         build(dataset=rows_with("", 30, text=True), routing="grpo")),
    Case("empty conversation", "error", r"train_dataset row 3: the prompt is \[\]", build(dataset=rows_with([], 3))),
    Case("prompt None", "error", r"train_dataset row 5: the prompt is None",
         build(dataset=rows_with(None, 5, text=True))),
    Case("system-only row past row 16", "error", r"train_dataset row 33: .*no user turn.*\['system'\]",
         build(dataset=rows_with([{"role": "system", "content": "Spell a"}], 33))),
    Case("user content None, row 20", "error", r"train_dataset row 20: .*must be a string; got NoneType",
         build(dataset=rows_with([{"role": "user", "content": None}], 20))),
    Case("bad row after a shuffle", "error", r"train_dataset row \d+: .*no user turn",
         build(dataset=rows_with([{"role": "system", "content": "Spell a"}], 33).shuffle(seed=1))),
    Case("eval_dataset dict, one bad", "error", r"eval_dataset\['b'\] row 0: .*no user turn",
         build(eval_dataset={"a": PROMPTS, "b": SYSTEM_ONLY})),
    Case("prompt of 3000 characters", "fine", "",
         train(dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "Spell " + "x" * 3000}]] * 16}),
               check=finite_loss)),
    Case("tokenizer without pad token", "fine", "", with_tokenizer(without_pad_token, train_dataset=PROMPTS)),
    Case("chat template dropping system turns", "fine", "",
         with_tokenizer(without_system_turns, train_dataset=WITH_SYSTEM)),
    Case("the same reward function twice", "fine", "", train(reward=[first_letter_reward, first_letter_reward])),
    # ---- rewards of the wrong shape ----
    Case("reward bare float", "error", r"'float_reward' returned 0\.5 \(float\); expected a list",
         train(reward=named(returns(0.5), "float_reward"))),
    Case("reward bare None", "error", r"'none_reward' returned None \(NoneType\)",
         train(reward=named(returns(None), "none_reward"))),
    Case("reward strings", "error", r"'strings_reward' returned a list whose element 0 is '1' \(str\)",
         train(reward=named(returns(lambda cs: ["1"] * len(cs)), "strings_reward"))),
    Case("reward one string", "error", r"'text_reward' returned '1\.0' \(str\)",
         train(reward=named(returns("1.0"), "text_reward"))),
    Case("reward (n, 1) array", "error", r"'column_reward' returned a ndarray of shape \(8, 1\)",
         train(reward=named(returns(lambda cs: numpy.ones((len(cs), 1))), "column_reward"))),
    Case("reward list of lists", "error", r"'nested_reward' returned a list whose element 0 is \[1\.0\]",
         train(reward=named(returns(lambda cs: [[1.0]] * len(cs)), "nested_reward"))),
    Case("reward dict", "error", r"'dict_reward' returned \{.*\(dict\)",
         train(reward=named(returns(lambda cs: {"score": [1.0] * len(cs)}), "dict_reward"))),
    Case("reward async bare float", "error", r"'async_float_reward' returned 0\.5", train(reward=async_float_reward)),
    Case("reward generator", "fine", "", train(reward=generator_reward, check=finite_loss)),
    Case("reward numpy array", "fine", "",
         train(reward=named(returns(lambda cs: numpy.array(first_letter_reward(cs))), "array"), check=finite_loss)),
    Case("reward torch tensor", "fine", "",
         train(reward=named(returns(lambda cs: torch.tensor(first_letter_reward(cs))), "tensor"), check=finite_loss)),
    Case("reward numpy scalars", "fine", "",
         train(reward=named(returns(lambda cs: [numpy.float32(r) for r in first_letter_reward(cs)]), "np"),
               check=finite_loss)),
    Case("reward all None", "fine", "", train(reward=named(returns(lambda cs: [None] * len(cs)), "none"))),
    # ---- the model's context ----
    Case("GPT-2 of 48 positions", "warning", r"max_teacher_prompt_length=4096 exceeds the model's context \(48",
         short_context("gpt2", 48)),
    Case("GPT-2 of 120 positions", "warning", r"exceeds the model's context \(120", short_context("gpt2", 120)),
    Case("Qwen3 of 110 positions", "warning", r"exceeds the model's context \(110", short_context("qwen3", 110)),
    # ---- checkpoints ----
    Case("teacher file from another step", "error", r"checkpoint-2/srpo_teacher\.safetensors is the teacher of step 1",
         copy_teacher_from_first_checkpoint),
    Case("teacher file without a step", "warning", r"srpo_teacher\.safetensors records no step",
         resume_after(drop_teacher_step)),
    Case("checkpoint inside a generation batch", "warning", r"checkpoint-1 is written in the middle of a generation",
         checkpoint_mid_generation_batch),
    Case("resume=True after a cut checkpoint", "warning", r"checkpoint-2 lacks trainer_state\.json.*checkpoint-1",
         resume_true_after_a_cut_checkpoint),
    Case("SRPO checkpoint resumed as GRPO", "warning", r"holds an SRPO teacher state.*routing='grpo'",
         resume_srpo_checkpoint_as_grpo),
    Case("teacher write: no space left", "error", r"Cannot write the SRPO teacher state .*checkpoint-1.*No space left"
         r".*free disk space", teacher_write_without_space),
    Case("LoRA model reused, saved", "fine", "", lora_model_reused),
]  # fmt: skip


# ---- the third sweep (issue 29): the CLI, the avg@k callback, from_grpo_config, teacher kinds, privileged contexts,
# model families; each class with the instances the issue met and others ----


def contexts_of(text, rows=PROMPTS):
    return Dataset.from_list([dict(row, privileged_context=text) for row in rows.to_list()])


def never_correct(completions, **kwargs):
    return [0.0] * len(completions)


def short_model(tokenizer, positions):
    model = build_tiny_model(tokenizer, seed=0)
    model.config.max_position_embeddings = positions
    return model


def contexts_without_room(mixed):
    """distill_without_sibling with privileged contexts too long for the model's context (every row's, or every
    other row's): such rows fall back to GRPO, and every scored row keeps its own teacher prompt."""

    def run(tokenizer, tmp_path):
        rows = PROMPTS.to_list()
        long, short = "reference " * 20, "It is short."
        data = Dataset.from_list(
            [dict(r, privileged_context=short if mixed and i % 2 else long) for i, r in enumerate(rows)]
        )
        args = make_args(tmp_path, max_steps=2, distill_without_sibling=True)
        trainer = SRPOTrainer(short_model(tokenizer, 120), never_correct, args=args, train_dataset=data,
                              processing_class=tokenizer)  # fmt: skip
        trainer.train()
        sdpo, fallback = logged(trainer, "srpo/route/sdpo_frac"), logged(trainer, "srpo/route/fallback_frac")
        assert all(abs(a + b - 1.0) < 1e-6 for a, b in zip(sdpo, fallback, strict=True)), (sdpo, fallback)
        assert mixed or sdpo == [0.0, 0.0], "a row whose prompt was dropped must not stay distilled"

    return run


def lora_base_teacher(init):
    """teacher_model_kind='base' with a LoRA of `init`: the teacher is the initial student."""

    def run(tokenizer, tmp_path):
        from peft import LoraConfig

        torch.manual_seed(0)
        trainer = SRPOTrainer(
            build_tiny_model(tokenizer, seed=0), first_letter_reward,
            args=make_args(tmp_path, max_steps=1, teacher_model_kind="base"), train_dataset=PROMPTS,
            processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
        )  # fmt: skip
        ids = torch.tensor([[1, 5, 7, 9, 4]])
        trainer.model.eval()
        with torch.no_grad():
            initial = trainer.model(input_ids=ids).logits
            with trainer.teacher.active() as teacher:
                difference = (teacher(input_ids=ids).logits - initial).abs().max().item()
        assert difference < 1e-6, f"the base teacher differs from the initial student by {difference:.3g}"
        trainer.train()

    return run


def from_grpo(config_of, **changes):
    def run(tokenizer, tmp_path):
        converted = SRPOConfig.from_grpo_config(config_of(tmp_path), **changes)
        given = config_of(tmp_path)
        if isinstance(given, SRPOConfig):
            for name in ("routing", "success_reward_threshold", "teacher_model_kind", "learning_rate"):
                assert getattr(converted, name) == getattr(given, name), f"{name} was not kept"

    return run


def a_srpo_config(tmp_path):
    return make_args(
        tmp_path, routing="sdpo", success_reward_threshold=2.0, teacher_model_kind="base", learning_rate=1e-6
    )


def grpo_defaults_on_purpose(tmp_path):
    return make_args(tmp_path, GRPOConfig, learning_rate=1e-6, scale_rewards="group")


def with_callback(test_set=None, reward=first_letter_reward, train_set=PROMPTS, check=None, max_steps=1, **callback):
    """An SRPOTrainer with a BestWithinBudgetsCallback on `test_set` (every step, k=2), trained `max_steps`."""

    def run(tokenizer, tmp_path):
        from srpo_trl.evaluation import BestWithinBudgetsCallback

        evaluation = BestWithinBudgetsCallback(
            PROMPTS.select(range(3)) if test_set is None else test_set, **{"eval_steps": 1, "k": 2, **callback}
        )
        trainer = SRPOTrainer(
            build_tiny_model(tokenizer, seed=0), reward, args=make_args(tmp_path, max_steps=max_steps), train_dataset=train_set,
            processing_class=tokenizer, callbacks=[evaluation], reward_processing_classes=None,
        )  # fmt: skip
        trainer.train()
        assert evaluation.history, "avg@k never ran"
        assert all(0.0 <= value <= 1.0 and math.isfinite(value.mean_reward) for _, _, value in evaluation.history)
        if check is not None:
            check(evaluation, trainer)

    return run


def no_test_set(tokenizer, tmp_path):
    from srpo_trl.evaluation import BestWithinBudgetsCallback

    BestWithinBudgetsCallback(None, eval_steps=1)


def callback_only(test_set=None, **callback):
    def run(tokenizer, tmp_path):
        from srpo_trl.evaluation import BestWithinBudgetsCallback

        BestWithinBudgetsCallback(PROMPTS.select(range(3)) if test_set is None else test_set, **callback)

    return run


async def async_first_letter(completions, **kwargs):
    return first_letter_reward(completions)


def staged_first_letter(completions, trainer_state, **kwargs):
    return [r * (1.0 if trainer_state.global_step >= 0 else 0.0) for r in first_letter_reward(completions)]


def answer_reward(completions, answer, **kwargs):
    return [1.0 if c[0]["content"][:1] == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def lenient_answer_reward(completions, **kwargs):
    return [1.0 if kwargs.get("answer") else 0.0 for _ in completions]


WITH_ANSWERS = PROMPTS.add_column("answer", list("abcdefghijklmnop"))


def reward_model_and_function(tokenizer):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForSequenceClassification(config)


def avg_at_k_with_a_reward_model(tokenizer, tmp_path):
    from srpo_trl.evaluation import BestWithinBudgetsCallback

    evaluation = BestWithinBudgetsCallback(PROMPTS.select(range(3)), eval_steps=1, k=2)
    trainer = SRPOTrainer(
        build_tiny_model(tokenizer, seed=0), [reward_model_and_function(tokenizer), first_letter_reward],
        args=make_args(tmp_path, max_steps=1), train_dataset=PROMPTS, processing_class=tokenizer,
        callbacks=[evaluation], reward_processing_classes=[tokenizer, None],
    )  # fmt: skip
    trainer.train()
    assert evaluation.history


def standalone_avg_at_k(reward_of):
    """`avg_at_k` called directly (no trainer) with `reward_of(tokenizer)`."""

    def run(tokenizer, tmp_path):
        from srpo_trl.evaluation import avg_at_k

        value = avg_at_k(build_tiny_model(tokenizer, seed=0), tokenizer, PROMPTS.select(range(2)), [reward_of(tokenizer)],
                         k=2, max_new_tokens=3)  # fmt: skip
        assert 0.0 <= value <= 1.0

    return run


def callback_length_is_the_trainers(evaluation, trainer):
    assert evaluation.kwargs["max_new_tokens"] == trainer.args.max_completion_length, evaluation.kwargs


def family(build, check_scores=True):
    """An SRPOTrainer over another model family: its teacher's scores equal each row's own unpadded forward (no
    padding moves them), and it trains a step."""

    def run(tokenizer, tmp_path):
        from test_teacher_scoring import own_forward_logps, routed_batch

        trainer = SRPOTrainer(build(tokenizer), first_letter_reward, args=make_args(tmp_path, max_steps=1),
                              train_dataset=PROMPTS, processing_class=tokenizer)  # fmt: skip
        if check_scores:
            batch, prompts = routed_batch(tokenizer)
            mask = batch["completion_mask"].bool()
            scores = trainer.teacher_scorer.score(batch, mask, [0, 1, 2, 3], prompts, 8, False, False).token_logps
            with torch.no_grad():
                for row, prompt in enumerate(prompts):
                    length = int(mask[row].sum())
                    expected = own_forward_logps(trainer.teacher.model, prompt, batch["completion_ids"][row, :length])
                    gap = (scores[row, :length] - expected).abs().max().item()
                    assert gap < 1e-4, f"row {row}'s teacher scores move with padding by {gap:.3g} nats"
        trainer.train()

    return run


def absolute_positions(kind):
    def build(tokenizer):
        from test_teacher_scoring import tiny_absolute_position_model

        return tiny_absolute_position_model(tokenizer, kind)

    return build


def gpt_neo(tokenizer):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=len(tokenizer), max_position_embeddings=256, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPTNeoForCausalLM(config)


def bypassing_family(tokenizer):
    from test_teacher_scoring import AroundTheDecoder

    return AroundTheDecoder(build_tiny_model(tokenizer, seed=0).config)


def json_lines(tokenizer, tmp_path, bad_row=None):
    import json

    from datasets import load_dataset

    rows = [{"prompt": [{"role": "user", "content": f"Spell {w}"}]} for w in "abcdefghijklmnop"]
    rows[0]["prompt"][0]["name"] = "ann"
    rows[1]["prompt"].insert(0, {"role": "system", "content": "Be brief", "tool_calls": None})
    if bad_row is not None:
        rows[7] = {"prompt": bad_row}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_dataset("json", data_files=str(tmp_path / "train.jsonl"))["train"]


def json_lines_trained(bad_row=None):
    def run(tokenizer, tmp_path):
        trained(tokenizer, tmp_path, dataset=json_lines(tokenizer, tmp_path, bad_row))

    return run


def cli(*flags):
    def run(tokenizer, tmp_path):
        from srpo_trl.cli import parse_args

        parse_args(["--model_name_or_path", "tiny", "--dataset_name", "data", *flags])

    return run


def streamed_without_max_steps(tokenizer, tmp_path):
    import json

    from srpo_trl.cli import parse_args
    from srpo_trl.testbed import save_tiny_model
    from srpo_trl.train import main

    (tmp_path / "data").mkdir()
    rows = "".join(json.dumps({"prompt": [{"role": "user", "content": f"Spell {w}"}]}) + "\n" for w in "abcdefgh")
    (tmp_path / "data" / "train.jsonl").write_text(rows)
    save_tiny_model(tmp_path / "tiny")
    main(*parse_args([
        "--model_name_or_path", str(tmp_path / "tiny"), "--dataset_name", str(tmp_path / "data"),
        "--reward_funcs", "accuracy_reward", "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--dataset_streaming", "true",
        "--max_train_samples", "4", "--max_steps", "-1",
    ]))  # fmt: skip


def resume_with(damage, explicit=False):
    """Save checkpoint-1, add a damaged checkpoint-2 (`damage(folder)`), resume (True, or checkpoint-2 by path)."""

    def run(tokenizer, tmp_path):
        checkpoint = checkpointed(tokenizer, tmp_path)
        cut = checkpoint.parent / "checkpoint-2"
        cut.mkdir()
        damage(cut, checkpoint)
        trainer = built(tokenizer, checkpoint.parent, max_steps=2)
        trainer.train(resume_from_checkpoint=str(cut) if explicit else True)
        assert trainer.state.global_step == 2

    return run


def cut_trainer_state(cut, complete):
    shutil.copytree(complete, cut, dirs_exist_ok=True)
    state = (complete / "trainer_state.json").read_text()
    (cut / "trainer_state.json").write_text(state[: len(state) // 2])


def only_incomplete(cut, complete):
    cut_trainer_state(cut, complete)
    shutil.rmtree(complete)


def dtype_changed(tokenizer, tmp_path):
    saving = dict(max_steps=1, teacher_model_kind="base", save_strategy="steps", save_steps=1)
    SRPOTrainer(build_tiny_model(tokenizer, seed=0, dtype=torch.bfloat16), first_letter_reward,
                args=make_args(tmp_path, **saving), train_dataset=PROMPTS, processing_class=tokenizer).train()  # fmt: skip
    built(tokenizer, tmp_path, **dict(saving, max_steps=2)).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-1")
    )


def vowel_format_reward(completions, **kwargs):
    """A format reward most completions of the random model earn, some not: beside a 0/1 correctness reward, the sum
    reaches 1 on format alone."""
    return [1.0 if set(c[0]["content"]) & set("aeiou ") else 0.0 for c in completions]


def graded_0_to_10(completions, **kwargs):
    """10 for a right answer, 0-3 of partial credit otherwise."""
    return [
        10.0 if r else float(len(set(c[0]["content"])) % 4)
        for c, r in zip(completions, first_letter_reward(completions), strict=True)
    ]


THIRD_SWEEP = [
    # ---- privileged contexts: routing, room, options that do nothing ----
    Case("context too long for the model, every row", "warning", r"system turns, privileged context and closing",
         contexts_without_room(mixed=False)),
    Case("context too long for the model, every other row", "warning", r"privileged context",
         contexts_without_room(mixed=True)),
    Case("distill_without_sibling, no context column", "error",
         r"distill_without_sibling=True .* train_dataset has none", build(distill_without_sibling=True)),
    Case("distill_without_sibling, blank contexts", "error", r"every 'privileged_context' of train_dataset is empty",
         build(distill_without_sibling=True, dataset=contexts_of(" \n\t"))),
    Case("distill_without_sibling, all contexts None", "error", r"every 'privileged_context' .* empty or blank",
         build(distill_without_sibling=True, dataset=contexts_of(None))),
    Case("teacher_feedback=True, routing=grpo", "warning", r"teacher_feedback=True has no effect: routing='grpo'",
         config(routing="grpo", teacher_feedback=True)),
    Case("teacher_update_rate with a base teacher", "warning", r"teacher_update_rate=0\.2 has no effect",
         config(teacher_model_kind="base", teacher_update_rate=0.2)),
    Case("distillation settings, routing=advantage_mix", "warning", r"distillation_alpha=0\.1 has no effect",
         config(routing="advantage_mix", distillation_alpha=0.1)),
    Case("advantage_mix_lambda, routing=srpo", "warning", r"advantage_mix_lambda=0\.5 has no effect",
         config(advantage_mix_lambda=0.5)),
    Case("weighting_temperature without dynamic weighting", "warning", r"weighting_temperature=3\.0 has no effect",
         config(dynamic_weighting=False, weighting_temperature=3.0)),
    Case("settings the routing reads", "fine", r"has no effect",
         config(routing="sdpo", teacher_model_kind="trust_region", teacher_update_rate=0.2, weighting_temperature=2.0)),
    Case("context column without distill_without_sibling", "fine", "",
         train(dataset=contexts_of("It is spelt so."), check=finite_loss)),
    # ---- teacher kinds under PEFT ----
    Case("base teacher, LoRA init_lora_weights=False", "fine", "", lora_base_teacher(False)),
    Case("base teacher, LoRA PiSSA", "fine", "", lora_base_teacher("pissa")),
    Case("base teacher, LoRA default", "fine", "", lora_base_teacher(True)),
    Case("base teacher, LoRA gaussian", "fine", "", lora_base_teacher("gaussian")),
    # ---- from_grpo_config ----
    Case("from_grpo_config(SRPOConfig)", "fine", r"took SRPO|take SRPO", from_grpo(a_srpo_config)),
    Case("from_grpo_config, GRPO defaults on purpose", "warning", r"learning_rate=1e-06 -> 5e-06.*scale_rewards='group'",
         from_grpo(grpo_defaults_on_purpose)),
    Case("from_grpo_config, GRPO values passed on", "fine", r"take SRPO",
         from_grpo(grpo_defaults_on_purpose, learning_rate=1e-6, scale_rewards="group", epsilon_high=None,
                   vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=3.0)),
    Case("from_grpo_config(dict)", "error", r"TypeError: SRPOConfig\.from_grpo_config converts a GRPOConfig; got dict",
         lambda tokenizer, tmp_path: SRPOConfig.from_grpo_config({"learning_rate": 1e-6})),
    # ---- the avg@k callback: arguments, test sets, rewards called as GRPOTrainer calls them ----
    Case("avg@k k=0", "error", r"BestWithinBudgetsCallback: k must be a positive integer; got 0", callback_only(k=0)),
    Case("avg@k k=-3", "error", r"k must be a positive integer; got -3", callback_only(k=-3)),
    Case("avg@k k=2.5", "error", r"k must be a positive integer; got 2\.5", callback_only(k=2.5)),
    Case("avg@k empty test set", "error", r"\(the avg@k test set\) has no rows",
         callback_only(PROMPTS.select([]))),
    Case("avg@k eval_steps=0", "error", r"eval_steps must be a positive", callback_only(eval_steps=0)),
    Case("avg@k eval_steps=-1", "error", r"eval_steps must be a positive", callback_only(eval_steps=-1)),
    Case("avg@k eval_steps=None", "error", r"eval_steps must be a positive", callback_only(eval_steps=None)),
    Case("avg@k temperature=0", "error", r"temperature must be a number > 0", callback_only(temperature=0.0)),
    Case("avg@k top_p=0", "error", r"top_p must be in \(0, 1\]", callback_only(top_p=0.0)),
    Case("avg@k budgets as a number", "error", r"budgets_hours must be a list .*got 5", callback_only(budgets_hours=5)),
    Case("avg@k a zero budget", "error", r"budgets_hours must be a list", callback_only(budgets_hours=[0, 1])),
    Case("avg@k max_new_tokens=0", "error", r"max_new_tokens must be a positive integer",
         callback_only(max_new_tokens=0)),
    Case("avg@k unknown argument", "error", r"unknown avg_at_k arguments \['samples'\]", callback_only(samples=4)),
    Case("avg@k test set None", "error", r"eval_dataset is None", no_test_set),
    Case("avg@k test set without prompt", "error", r"\(the avg@k test set\) has no 'prompt' column",
         callback_only(PROMPTS.rename_column("prompt", "question"))),
    Case("avg@k test set with an empty prompt", "error", r"\(the avg@k test set\) row 1: the prompt is \[\]",
         callback_only(rows_with([], 1, count=3))),
    Case("avg@k test set without the reward's column", "error", r"'answer_reward' reads the column 'answer'",
         with_callback(PROMPTS.select(range(3)), reward=answer_reward, train_set=WITH_ANSWERS)),
    Case("avg@k test set without a column read from kwargs", "warning", r"test set lacks the training columns \['answer'\]",
         with_callback(PROMPTS.select(range(3)), reward=lenient_answer_reward, train_set=WITH_ANSWERS)),
    Case("avg@k async reward", "fine", "", with_callback(reward=async_first_letter)),
    Case("avg@k reward taking trainer_state", "fine", "", with_callback(reward=staged_first_letter)),
    Case("avg@k reward model", "fine", "", avg_at_k_with_a_reward_model),
    Case("avg@k streamed test set", "fine", "", with_callback(streamed(PROMPTS.select(range(3))))),
    Case("avg@k length is the trainer's", "fine", "", with_callback(check=callback_length_is_the_trainers)),
    Case("avg@k reward logging extras", "fine", "", with_callback(reward=feedback_or_none)),
    Case("avg_at_k alone, async reward", "fine", "", standalone_avg_at_k(lambda tokenizer: async_first_letter)),
    Case("avg_at_k alone, reward model", "error", r"avg_at_k scores a reward model .* only through a trainer",
         standalone_avg_at_k(reward_model_and_function)),
    # ---- thresholds that count partial credit, and a model that solves nothing yet ----
    Case("format reward beside correctness, threshold 1", "warning", r"got the lowest score of the reward function "
         r"'first_letter_reward'", train(reward=[first_letter_reward, vowel_format_reward], max_steps=2)),
    Case("graded 0-10 reward, threshold 1", "warning", r"success_reward_threshold=1\.0 looks low",
         train(reward=graded_0_to_10, max_steps=2)),
    Case("graded 0-10 reward, threshold 10", "fine", r"looks low|lowest score",
         train(reward=graded_0_to_10, max_steps=2, success_reward_threshold=10.0)),
    Case("weighted format reward, threshold 1", "fine", r"lowest score",
         train(reward=[first_letter_reward, vowel_format_reward], reward_weights=[1.0, 0.2], max_steps=2)),
    Case("a model that solves nothing yet", "warning", r"the model solves none of these prompts yet",
         train(reward=never_correct, max_steps=5)),
    # ---- model families: positions, and the hidden states SRPO reads ----
    Case("GPT-2 (learned positions)", "fine", "", family(absolute_positions("gpt2"))),
    Case("OPT (calls model.decoder)", "fine", "", family(absolute_positions("opt"))),
    Case("GPT-Neo (learned positions)", "fine", "", family(gpt_neo)),
    Case("a family bypassing the decoder stack", "error", r"AroundTheDecoder at its decoder stack.*routing='grpo'",
         family(bypassing_family, check_scores=False)),
    # ---- datasets as JSON Lines writes them ----
    Case("JSON Lines messages with extra keys", "fine", "", json_lines_trained()),
    Case("JSON Lines, a system-only row", "error", r"train_dataset row 7: .*no user turn",
         json_lines_trained([{"role": "system", "content": "Spell a", "name": "x"}])),
    # ---- the CLI's arguments ----
    Case("--eval_k -1", "error", r"--eval_k must be an integer >= 1; got -1", cli("--eval_k", "-1")),
    Case("--eval_temperature 0", "error", r"--eval_temperature must be > 0", cli("--eval_temperature", "0")),
    Case("--eval_top_p 2", "error", r"--eval_top_p must be in \(0, 1\]", cli("--eval_top_p", "2")),
    Case("--max_train_samples -1", "error", r"--max_train_samples must be an integer >= 1",
         cli("--max_train_samples", "-1")),
    Case("--max_eval_samples 0", "error", r"--max_eval_samples must be an integer >= 1", cli("--max_eval_samples", "0")),
    Case("--eval_every_steps -5", "error", r"--eval_every_steps must be an integer >= 0", cli("--eval_every_steps", "-5")),
    Case("--eval_max_new_tokens 0", "error", r"--eval_max_new_tokens must be", cli("--eval_max_new_tokens", "0")),
    Case("--eval_budgets_hours 0", "error", r"--eval_budgets_hours must be positive", cli("--eval_budgets_hours", "0")),
    Case("--dataset_streaming without --max_steps", "error", r"streamed training set .* set --max_steps",
         streamed_without_max_steps),
    # ---- checkpoints: complete means loadable ----
    Case("resume=True, newest trainer_state.json cut", "warning", r"checkpoint-2 lacks trainer_state\.json, or holds "
         r"a cut one.*resuming from .*checkpoint-1", resume_with(cut_trainer_state)),
    Case("resume=True, only a cut checkpoint", "error", r"holds no complete checkpoint; .*checkpoint-2",
         resume_with(only_incomplete)),
    Case("resume from a cut checkpoint by path", "error", r"checkpoint-2' is incomplete.*checkpoint-1, the newest",
         resume_with(cut_trainer_state, explicit=True)),
    Case("resume by path, no such folder", "error", r"no such checkpoint folder",
         lambda tokenizer, tmp_path: built(tokenizer, tmp_path).train(resume_from_checkpoint=str(tmp_path / "nope"))),
    Case("resume a base teacher in another dtype", "error", r"model was torch\.bfloat16, and this run's is "
         r"torch\.float32", dtype_changed),
]  # fmt: skip


CASES = [
    # ---- SRPOConfig: ranges and types ----
    Case("routing=grpo_plus", "error", r"SRPOConfig\.routing must be one of .*'grpo_plus'",
         config(routing="grpo_plus")),
    Case("routing=3", "error", r"SRPOConfig\.routing must be one of .*got 3", config(routing=3)),
    Case("threshold=None", "error", r"SRPOConfig\.success_reward_threshold must be a number.*None",
         config(success_reward_threshold=None)),
    Case("threshold='1.0'", "error", r"SRPOConfig\.success_reward_threshold must be a number.*'1\.0'",
         config(success_reward_threshold="1.0")),
    Case("threshold=nan", "error", r"SRPOConfig\.success_reward_threshold must be a finite number.*nan",
         config(success_reward_threshold=math.nan)),
    Case("threshold=inf", "error", r"SRPOConfig\.success_reward_threshold must be a finite number.*inf",
         config(success_reward_threshold=math.inf)),
    Case("threshold=2 (int)", "fine", "", config(success_reward_threshold=2)),
    Case("teacher_update_rate=0", "error", r"SRPOConfig\.teacher_update_rate must be in \(0, 1\]",
         config(teacher_update_rate=0.0)),
    Case("teacher_update_rate=1.5", "error", r"SRPOConfig\.teacher_update_rate must be in \(0, 1\]",
         config(teacher_update_rate=1.5)),
    Case("teacher_update_rate='0.05'", "error", r"SRPOConfig\.teacher_update_rate must be a number.*'0\.05'",
         config(teacher_update_rate="0.05")),
    Case("teacher_update_rate=1", "fine", "", config(teacher_update_rate=1)),
    Case("distillation_topk=0", "error", r"SRPOConfig\.distillation_topk must be an integer >= 1",
         config(distillation_topk=0)),
    Case("distillation_topk=2.5", "error", r"SRPOConfig\.distillation_topk must be an integer.*2\.5",
         config(distillation_topk=2.5)),
    Case("distillation_topk=True", "error", r"SRPOConfig\.distillation_topk must be an integer.*True",
         config(distillation_topk=True)),
    Case("distillation_alpha=-0.1", "error", r"SRPOConfig\.distillation_alpha must be in \[0, 1\]",
         config(distillation_alpha=-0.1)),
    Case("distillation_alpha=None", "error", r"SRPOConfig\.distillation_alpha must be a number.*None",
         config(distillation_alpha=None)),
    Case("distillation_is_clip=0", "error", r"SRPOConfig\.distillation_is_clip must be > 0",
         config(distillation_is_clip=0.0)),
    Case("weighting_temperature=0", "error", r"SRPOConfig\.weighting_temperature must be > 0",
         config(weighting_temperature=0.0)),
    Case("advantage_mix_lambda=1.5", "error", r"SRPOConfig\.advantage_mix_lambda must be in \[0, 1\]",
         config(advantage_mix_lambda=1.5)),
    Case("max_teacher_prompt_length=0", "error", r"SRPOConfig\.max_teacher_prompt_length must be a positive",
         config(max_teacher_prompt_length=0)),
    Case("max_teacher_prompt_length=None", "error", r"SRPOConfig\.max_teacher_prompt_length must be an integer.*None",
         config(max_teacher_prompt_length=None)),
    Case("max_teacher_prompt_length=512.5", "error", r"SRPOConfig\.max_teacher_prompt_length must be an integer.*512",
         config(max_teacher_prompt_length=512.5)),
    Case("dynamic_weighting='false'", "error", r"SRPOConfig\.dynamic_weighting must be True or False.*'false'",
         config(dynamic_weighting="false")),
    Case("teacher_feedback='yes'", "error", r"SRPOConfig\.teacher_feedback must be True or False.*'yes'",
         config(teacher_feedback="yes")),
    Case("loss_type=grpo", "fine", "", train(loss_type="grpo")),
    Case("loss_type=bnpo", "fine", "", train(loss_type="bnpo")),
    Case("loss_type=bnpo + entropy bonus", "error", r"loss_type='bnpo' with an entropy bonus .* Use loss_type='dapo'",
         build(loss_type="bnpo", entropy_coef=0.1)),
    Case("num_generations=1", "error", r"SRPOConfig\.num_generations must be >= 2", config(num_generations=1)),
    Case("steps_per_generation=2", "warning", r"steps_per_generation=2 != gradient_accumulation_steps=1",
         config(steps_per_generation=2)),
    # ---- SRPOTrainer's construction ----
    Case("GRPOConfig given", "error", r"TypeError: SRPOTrainer needs an SRPOConfig.*SRPOConfig\.from_grpo_config\(your_config\)",
         grpo_config_given),
    Case("topk > vocabulary", "error", r"distillation_topk=500 exceeds .*\(102\); set distillation_topk <= 102",
         train(distillation_topk=500)),
    Case("topk > vocabulary, routing=grpo", "fine", "", train(distillation_topk=500, routing="grpo")),
    # ---- prompts the teacher cannot be shown ----
    Case("prompt: system turn only", "error", r"train_dataset.*no user turn.*roles found: \['system'\]",
         build(dataset=SYSTEM_ONLY)),
    Case("prompt: role 'User'", "error", r"train_dataset.*no user turn.*roles found: \['User'\]",
         build(dataset=CAPITALISED_ROLE)),
    Case("prompt: assistant last", "error", r"no user turn.*roles found: \['system', 'assistant'\]",
         build(dataset=ASSISTANT_LAST)),
    Case("prompt: multimodal", "error", r"train_dataset.*must be a string.*list.*multimodal",
         build(dataset=MULTIMODAL)),
    Case("eval prompt: system only", "error", r"eval_dataset.*no user turn.*roles found: \['system'\]",
         build(eval_dataset=SYSTEM_ONLY)),
    Case("streamed prompt: system only", "error", r"prompt of the train dataset, \[\{'role': 'system'.*no user turn.*roles found: \['system'\]",
         train(dataset=streamed(SYSTEM_ONLY))),
    Case("prompt: system only, routing=grpo", "fine", "", train(dataset=SYSTEM_ONLY, routing="grpo")),
    Case("prompt: system + user", "fine", "", train(dataset=WITH_SYSTEM, check=finite_loss)),
    Case("prompt: several user turns", "fine", "", train(dataset=SEVERAL_USER_TURNS, check=finite_loss)),
    Case("prompt: plain text", "fine", "",
         train(dataset=PLAIN_TEXT, reward=plain_first_letter_reward, check=finite_loss)),
    # ---- rewards ----
    Case("reward +inf", "error", r"reward function 'overflowing_reward' returned inf.*None",
         train(reward=overflowing_reward)),
    Case("reward -inf", "error", r"reward function 'underflowing_reward' returned -inf",
         train(reward=underflowing_reward)),
    Case("reward +inf, routing=grpo", "error", r"'overflowing_reward' returned inf",
         train(reward=overflowing_reward, routing="grpo")),
    Case("reward None for half", "fine", "", train(reward=half_unscorable_reward, check=finite_loss)),
    Case("reward bools", "fine", "", train(reward=bool_reward, check=finite_loss)),
    Case("reward list too short", "error", r"'short_reward' returned 7 rewards, but 8 were expected",
         train(reward=short_reward)),
    Case("two 0/1 rewards, threshold 1", "warning", r"threshold=1\.0.*\[1\.0, 2\.0\].*weighted sum.*2\.0",
         train(reward=[first_letter_reward, format_reward], max_steps=5)),
    Case("rewards never reach threshold", "warning", r"success_reward_threshold=1\.0.*\[0\.0, 0\.\d+\].*GRPO",
         train(reward=graded_reward, max_steps=5)),
    Case("two 0/1 rewards, threshold 2", "fine", r"success_reward_threshold",
         train(reward=[first_letter_reward, format_reward], max_steps=5, success_reward_threshold=2.0)),
    Case("reachable threshold", "fine", r"success_reward_threshold", train(max_steps=5)),
    Case("teacher_feedback without feedback", "error", r"teacher_feedback=True needs one feedback string.*got 0 for 8",
         train(teacher_feedback=True)),
    Case("teacher_feedback of wrong length", "error", r"teacher_feedback=True needs one feedback string.*got 7 for 8",
         train(reward=feedback_of_wrong_length, teacher_feedback=True)),
    Case("teacher_feedback with None entries", "fine", "",
         train(reward=feedback_or_none, teacher_feedback=True, check=finite_loss)),
    # ---- teacher prompts longer than max_teacher_prompt_length ----
    Case("max_teacher_prompt_length=1", "warning", r"max_teacher_prompt_length=1\b.*\d+ tokens.*GRPO",
         train(max_teacher_prompt_length=1, check=no_routing)),
    Case("max_teacher_prompt_length=1, sdpo", "warning", r"max_teacher_prompt_length=1\b.*\d+ tokens",
         train(max_teacher_prompt_length=1, routing="sdpo")),
    Case("max_teacher_prompt_length=1, advantage_mix", "warning", r"max_teacher_prompt_length=1\b",
         train(max_teacher_prompt_length=1, routing="advantage_mix")),
    Case("demonstration cut, not dropped", "fine", r"max_teacher_prompt_length",
         demonstration_cut),
    # ---- other degenerate batches ----
    Case("num_generations=2", "fine", "", train(num_generations=2, check=finite_loss)),
    Case("every completion truncated and masked", "fine", "",
         train(mask_truncated_completions=True, max_completion_length=1, check=finite_loss)),
    Case("routing=sdpo", "fine", "", train(routing="sdpo", check=finite_loss)),
    Case("routing=advantage_mix", "fine", "", train(routing="advantage_mix", check=finite_loss)),
    # ---- checkpoints and the teacher's state ----
    Case("resume", "fine", "", resume_restores_the_teacher),
    Case("save_total_limit=1", "fine", "", rotation_keeps_a_teacher),
    Case("teacher write fails at save", "fine", "", teacher_write_fails_at_the_second_save),
    Case("teacher file truncated", "error", r"srpo_teacher\.safetensors.*earlier checkpoint.*delete",
         resume_after(truncate)),
    Case("teacher file empty", "error", r"srpo_teacher\.safetensors.*earlier checkpoint.*delete",
         resume_after(overwrite(b""))),
    Case("teacher file garbage", "error", r"srpo_teacher\.safetensors.*earlier checkpoint.*delete",
         resume_after(overwrite(b"not a tensor file" * 10))),
    Case("teacher file holds NaN", "error", r"srpo_teacher\.safetensors.*non-finite.*layers\.0\.mlp\.up_proj.*earlier",
         resume_after(poison(math.nan))),
    Case("teacher file holds inf", "error", r"srpo_teacher\.safetensors.*non-finite.*up_proj",
         resume_after(poison(math.inf))),
    Case("teacher file lacks a tensor", "error", r"srpo_teacher\.safetensors.*missing \['lm_head\.weight'\]",
         resume_after(edit_state(drop_a_tensor))),
    Case("teacher file of another model", "error", r"srpo_teacher\.safetensors.*lm_head\.weight has shape",
         resume_after(edit_state(reshape_a_tensor))),
    Case("teacher file deleted", "warning", r"no SRPO teacher state.*restarts from the resumed policy",
         teacher_restarts_from_the_resumed_policy()),
    Case("save_only_model checkpoint", "warning", r"restarts from the resumed policy",
         teacher_restarts_from_the_resumed_policy(save_only_model=True)),
    Case("GRPOTrainer checkpoint", "warning", r"restarts from the resumed policy", resume_from_grpo_checkpoint),
    Case("ZeRO-3 teacher files, one process", "error", r"srpo_teacher-rank0-of-2\.safetensors.*2 processes.*ZeRO-3",
         resume_after(rename_teacher_file("srpo_teacher-rank0-of-2.safetensors"))),
    *SECOND_SWEEP,
    *THIRD_SWEEP,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, char_tokenizer, tmp_path):
    outcome, message = observe(case, char_tokenizer, tmp_path)
    assert outcome == OUTCOME[case.expect], f"{case.id}: expected {OUTCOME[case.expect]}, got {outcome}: {message}"


def main():
    """Print each case's outcome and the tally."""
    import conftest  # noqa: F401  (one torch thread, as under pytest)

    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    tokenizer, tally = build_char_tokenizer(), Counter()
    for case in CASES:
        folder = Path(tempfile.mkdtemp(prefix="srpo-bad-input-"))
        with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its logs
            outcome, message = observe(case, tokenizer, folder)
        shutil.rmtree(folder, ignore_errors=True)
        tally[outcome] += 1
        mark = "" if outcome == OUTCOME[case.expect] else f"   (expected {OUTCOME[case.expect]})"
        print(f"{case.id:<40} {outcome:<14}{mark}  {message[:150]!r}", flush=True)
    print(
        f"{len(CASES)} cases: " + ", ".join(f"{tally[o]} {o}" for o in (*OUTCOME.values(), "unclear error", "silent"))
    )


if __name__ == "__main__":
    main()

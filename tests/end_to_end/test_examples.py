"""The user-facing entry points: recipes parse, and `accelerate launch examples/train_chemistry.py` trains."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, TrlParser

from srpo_trl import SRPOConfig
from srpo_trl.train import SRPOScriptArguments

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_parse_into_the_paper_settings(recipe):
    parser = TrlParser((SRPOScriptArguments, SRPOConfig, ModelConfig))
    # bf16 needs a GPU to validate; everything else parses as on the cluster.
    script_args, args, model_args = parser.parse_args_and_config(["--config", str(recipe), "--bf16", "false"])
    assert model_args.model_name_or_path.startswith("Qwen/Qwen3-")
    assert args.routing == recipe.stem
    assert args.num_generations == 8 and args.max_completion_length == 8192
    rollouts_per_generation = args.per_device_train_batch_size * args.steps_per_generation * 8
    assert rollouts_per_generation == 32 * 8  # 32 prompts x 8 rollouts on 8 GPUs
    optimizer_steps_per_generation = args.steps_per_generation // args.gradient_accumulation_steps
    assert optimizer_steps_per_generation == (4 if args.routing == "grpo" else 1)  # GRPO: mini-batch of 8 prompts
    assert args.learning_rate == {"srpo": 5e-6, "grpo": 1e-6, "sdpo": 1e-5}[args.routing]
    assert args.chat_template_kwargs == {"enable_thinking": False} and args.use_vllm
    assert (args.warmup_steps, args.weight_decay, args.max_grad_norm) == (10, 0.01, 1.0)
    assert (script_args.eval_every_steps, script_args.eval_k) == (5, 16)
    assert args.save_total_limit == 2 and args.report_to == ["trackio"]  # ~150 GB a checkpoint; logs, offline
    assert script_args.data_path == "SDPO/datasets"  # SDPO's committed split, the documented default


@pytest.mark.slow
def test_train_chemistry_runs_end_to_end_through_accelerate_launch(char_tokenizer, shared_data, tmp_path):
    from srpo_trl.testbed.model import build_tiny_model

    model_dir = tmp_path / "tiny-qwen3"
    build_tiny_model(char_tokenizer).save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    config = {
        "model_name_or_path": str(model_dir),
        "dtype": "float32",
        "data_path": str(shared_data),
        "max_train_samples": 8,
        "max_eval_samples": 2,
        "eval_every_steps": 2,
        "eval_k": 2,
        "eval_max_new_tokens": 8,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "distillation_topk": 8,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "chat_template_kwargs": {"enable_thinking": False},
    }
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    command += [str(ROOT / "examples" / "train_chemistry.py"), "--config", str(recipe), "--seed", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "srpo/route/sdpo_frac" in result.stdout and "eval_avg@2" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {
        "zero3": ("DEEPSPEED", 8),
        "zero2": ("DEEPSPEED", 8),
        "multi_gpu": ("MULTI_GPU", 8),
        "single_gpu": ("NO", 1),
        "fsdp2": ("FSDP", 8),
        "zero3_2nodes": ("DEEPSPEED", 16),
        "fsdp2_2nodes": ("FSDP", 16),
        "cpu_zero2": ("DEEPSPEED", 2),
        "cpu_zero3": ("DEEPSPEED", 2),
    }[path.stem]
    assert (str(config.distributed_type).split(".")[-1], config.num_processes) == expected
    if config.distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(re.search(r"zero(\d)", path.stem).group(1))
    if path.stem.endswith("2nodes"):
        assert config.num_machines == 2 and config.main_process_port

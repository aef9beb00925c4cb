"""The shipped recipes (recipes/qwen3_*/*.yaml) as a user runs them: the README's GPU install (`pip install -e
".[gpu]"`) brings every package a recipe needs, each recipe parses into `SRPOConfig` as the training script parses it,
and vLLM's context is set and fits its KV cache (benchmarks/memory_estimate.py, docs/scaling.md)."""

import configparser
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_estimate  # noqa: E402

RECIPES = sorted((ROOT / "recipes").glob("qwen3_*/*.yaml"))
# `report_to` backends (transformers' integrations) and the package each one imports.
REPORT_TO_PACKAGE = {
    "trackio": "trackio",
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "swanlab": "swanlab",
}
MODELS = {"Qwen/Qwen3-8B": memory_estimate.QWEN3_8B, "Qwen/Qwen3-4B": memory_estimate.QWEN3_4B}


def gpu_install_packages() -> set[str]:
    """The packages of the GPU install's extra, `gpu` in setup.cfg (its `%(extra)s` references expanded)."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser.get("options.extras_require", "gpu").splitlines()
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip()}


def launch_config(recipe: Path) -> dict:
    """The accelerate config of the launch command in the recipe's header."""
    match = re.search(r"--config_file (\S+)", recipe.read_text())
    assert match, f"{recipe.name}: the header names no `accelerate launch --config_file ...`"
    return yaml.safe_load((ROOT / match.group(1)).read_text())


def packages_needed(recipe: Path) -> set[str]:
    config = yaml.safe_load(recipe.read_text())
    backends = config.get("report_to", "none")
    backends = [backends] if isinstance(backends, str) else backends
    unknown = [b for b in backends if b not in REPORT_TO_PACKAGE and b != "none"]
    assert not unknown, f"{recipe}: report_to {unknown}: add the backend's package to REPORT_TO_PACKAGE"
    needed = {REPORT_TO_PACKAGE[b] for b in backends if b != "none"}
    if config.get("use_vllm"):
        needed.add("vllm")
    if launch_config(recipe)["distributed_type"] == "DEEPSPEED":
        needed.add("deepspeed")
    return {canonicalize_name(name) for name in needed}


def test_the_gpu_extra_lists_deepspeed_vllm_and_trackio():
    assert {"deepspeed", "vllm", "trackio"} <= gpu_install_packages()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_gpu_install_has_every_package_the_recipe_needs(recipe):
    missing = packages_needed(recipe) - gpu_install_packages()
    assert not missing, f"{recipe}: needs {sorted(missing)}, which `pip install -e .[gpu]` (setup.cfg) lacks"


def test_readme_and_makefile_install_the_gpu_extra():
    assert 'pip install -e ".[gpu]"' in (ROOT / "README.md").read_text()
    assert '".[gpu,test]"' in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_header_is_the_readme_command(recipe):
    header = "accelerate launch --config_file accelerate_configs/zero3.yaml examples/train_chemistry.py \\\n"
    header += f"#       --config recipes/{recipe.parent.name}/{recipe.name}"
    assert header in recipe.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_and_sets_a_vllm_context_its_kv_cache_holds(recipe):
    from trl import ModelConfig, TrlParser

    from srpo_trl import SRPOConfig
    from srpo_trl.train import SRPOScriptArguments

    parser = TrlParser((SRPOScriptArguments, SRPOConfig, ModelConfig))
    # use_cpu: what a CPU forces (bf16 is refused without a GPU otherwise); nothing else is overridden
    _, args, model_args = parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true"])
    assert isinstance(args, SRPOConfig)
    layout = memory_estimate.Layout()  # the estimate's settings are the recipe's
    recipe_layout = (args.per_device_train_batch_size, args.max_completion_length, args.max_teacher_prompt_length)
    assert recipe_layout == (layout.micro_batch, layout.completion, layout.teacher_prompt)
    assert args.vllm_max_model_length == layout.prompt + args.max_completion_length
    # TRL 1.16's GRPOConfig has no vllm_max_num_seqs: the engine runs this many sequences at once (GRPOTrainer)
    sequences = args.per_device_train_batch_size * args.vllm_tensor_parallel_size * args.steps_per_generation
    assert sequences == layout.sequences_per_gpu
    assert args.vllm_gpu_memory_utilization == layout.vllm_utilization
    model = MODELS[model_args.model_name_or_path]
    # vLLM starts only if its KV cache holds one sequence of the whole context; keep room for a few
    assert memory_estimate.vllm_kv_sequences(model, layout, args.vllm_max_model_length) >= 4


def test_scaling_doc_quotes_the_estimate():
    assert memory_estimate.markdown() in (ROOT / "docs" / "scaling.md").read_text()

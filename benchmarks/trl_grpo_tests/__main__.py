"""TRL's own GRPOTrainer tests, run twice: as TRL wrote them, then with `trl.GRPOTrainer`/`trl.GRPOConfig` bound to
`SRPOTrainer`/`SRPOConfig`. Reports the tests that pass for GRPOTrainer and how many of those pass for SRPOTrainer.

    python -m benchmarks.trl_grpo_tests --trl-tests PATH/TO/trl/tests [--keyword EXPR] [--out DIR]

TRL's tests are not shipped with its sdist or wheel: pass the `tests/` folder of a TRL checkout (`test_grpo_trainer.py`,
`testing_utils.py`, `conftest.py`). Nothing is downloaded: the Hub repositories the tests name are stood in for by
local tiny models and datasets built here (`STAND_INS`), in the folder the tests run from, where `from_pretrained`
and `load_dataset` find them first (offline). A test that needs a model or dataset not stood in for fails for both
trainers and so is not counted.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HUB = "trl-internal-testing"
# Hub id -> (transformers class, its config class): tiny models built from the testbed's character tokenizer.
STAND_INS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2ForCausalLM", "Qwen2Config"),
    "tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2ForSequenceClassification", "Qwen2Config"),
    "tiny-Qwen3ForCausalLM": ("Qwen3ForCausalLM", "Qwen3Config"),
    "tiny-Qwen3ForSequenceClassification": ("Qwen3ForSequenceClassification", "Qwen3Config"),
    "tiny-LlamaForCausalLM-3.2": ("LlamaForCausalLM", "LlamaConfig"),
    "tiny-LlamaForSequenceClassification-3.2": ("LlamaForSequenceClassification", "LlamaConfig"),
    "tiny-MistralForCausalLM-0.2": ("MistralForCausalLM", "MistralConfig"),
}
# The stand-in of `trl-internal-testing/zen`: prompt-only rows, as plain text and as a conversation. Fewer rows than
# the Hub's 17: the tests train for TrainingArguments' 3 epochs over the whole split, and a CPU takes minutes per test.
QUESTIONS = [f"What color is the sky on day {i}?" for i in range(6)]

# A pytest plugin for both runs: `is_<package>_available` helpers that TRL's test utilities import but the installed
# TRL lacks (the checkout may be another version) answer False, so that the tests needing them skip.
SHIM = '''
"""Missing `trl.import_utils.is_*_available` helpers answer False (both runs)."""
import re
from pathlib import Path

import importlib

import_utils = importlib.import_module("trl.import_utils")

source = (Path(__file__).parent / "trl_tests" / "testing_utils.py").read_text()
for name in set(re.findall(r"\\b(is_\\w+_available)\\b", source)):
    if not hasattr(import_utils, name):
        setattr(import_utils, name, lambda *args, **kwargs: False)
'''

BINDING = '''
"""Binds GRPOTrainer/GRPOConfig to SRPO's before TRL's test module imports them (a pytest plugin)."""
import trl

from srpo_trl import SRPOConfig, SRPOTrainer

trl.GRPOTrainer, trl.GRPOConfig = SRPOTrainer, SRPOConfig
'''


def build_stand_ins(where: Path) -> None:
    """Save the tiny models and the zen dataset under `where/trl-internal-testing/`."""
    import torch
    import transformers
    from datasets import Dataset

    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    for name, (model_class, config_class) in STAND_INS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            num_labels=1,
        )
        model = getattr(transformers, model_class)(config)
        folder = where / HUB / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    zen = where / HUB / "zen"
    for config_name, prompt in (
        ("standard_prompt_only", lambda q: q),
        ("conversational_prompt_only", lambda q: [{"role": "user", "content": q}]),
    ):
        for split, rows in (("train", QUESTIONS), ("test", QUESTIONS[:3])):
            Dataset.from_dict({"prompt": [prompt(q) for q in rows]}).to_parquet(zen / config_name / f"{split}.parquet")
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.parquet\n"
        f"  - split: test\n    path: {name}/test.parquet\n"
        for name in ("standard_prompt_only", "conversational_prompt_only")
    )
    (zen / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")


def run(
    workdir: Path, bound: bool, keyword: str | None, report: Path, tests: list[str] | None = None
) -> dict[str, str]:
    """Run TRL's GRPO tests (CPU, offline) in `workdir`, all of them or the node ids `tests`; returns each test's
    outcome."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "trl_shim"]
    command += ["--junitxml", str(report), *(tests or ["trl_tests/test_grpo_trainer.py"])]
    if bound:
        command[3:3] = ["-p", "srpo_binding"]
    if keyword and not tests:
        command += ["-k", keyword]
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(command, cwd=workdir, env=environment, check=False)
    return outcomes(report)


def node_id(name: str) -> str:
    """`trl_tests.test_grpo_trainer.Class::test[param]` (a JUnit report's) as pytest's node id."""
    classname, test = name.split("::", 1)
    module, _, cls = classname.rpartition(".") if classname.count(".") > 1 else (classname, "", "")
    path = module.replace(".", "/") + ".py"
    return f"{path}::{cls}::{test}" if cls else f"{path}::{test}"


def outcomes(report: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ElementTree

    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        children = {child.tag for child in case}
        results[name] = (
            "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-tests", required=True, type=Path, help="the tests/ folder of a TRL checkout")
    parser.add_argument("--keyword", default=None, help="pytest -k expression, to run a subset")
    parser.add_argument("--out", default=None, type=Path, help="where to write the JSON summary")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="trl-grpo-tests-"))
    shutil.copytree(args.trl_tests, workdir / "trl_tests", ignore=shutil.ignore_patterns("__pycache__"))
    (workdir / "trl_tests" / "__init__.py").touch()
    (workdir / "srpo_binding.py").write_text(BINDING)
    (workdir / "trl_shim.py").write_text(SHIM)
    build_stand_ins(workdir)
    grpo = run(workdir, False, args.keyword, workdir / "grpo.xml")
    passing = sorted(name for name, outcome in grpo.items() if outcome == "passed")
    # Only the tests that pass for GRPOTrainer are run bound to SRPOTrainer.
    srpo = run(workdir, True, None, workdir / "srpo.xml", [node_id(name) for name in passing]) if passing else {}
    lost = [name for name in passing if srpo.get(name) != "passed"]
    summary = {
        "trl_tests": str(args.trl_tests),
        "collected": len(grpo),
        "pass_for_grpo": len(passing),
        "pass_for_srpo_of_those": len(passing) - len(lost),
        "fail_for_srpo_of_those": lost,
        "skipped_for_grpo": sum(outcome == "skipped" for outcome in grpo.values()),
        "fail_for_grpo": sum(outcome == "failed" for outcome in grpo.values()),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trl_grpo_tests.json").write_text(json.dumps({**summary, "grpo": grpo, "srpo": srpo}, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

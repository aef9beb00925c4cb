"""The command line of `srpo-trl` / `python -m srpo_trl.train`: `trl grpo`'s arguments, SRPO's, and the paper's tasks.

Arguments come from four dataclasses, parsed by a `trl.TrlParser` from a YAML `--config` and the command line:
[`SRPOScriptArguments`] (data, rewards, evaluation: TRL's `ScriptArguments` and more), [`SRPOConfig`] (training),
`trl.ModelConfig` (model, LoRA) and `trl.DatasetMixtureConfig` (a mixture of datasets, a carved test split, as
`trl grpo` takes them). `--help` lists them in titled groups, SRPO's own fields before GRPO's.
"""

import argparse
import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, ScriptArguments

from .compat import GroupedParser
from .config import SRPOConfig
from .tasks import TASKS, get_reward_funcs, multiple_choice_reward, tool_use_reward

DESCRIPTION = """\
Train a model with SRPO (Sample-Routed Policy Optimization, on TRL's GRPOTrainer): on your own dataset with your own
reward functions, as with `trl grpo`, or on one of the paper's five benchmarks (--task). `srpo-trl` is the same
command. A YAML file given with --config sets any argument below; the command line overrides it.

Your own task (a folder of train.jsonl / test.jsonl with a `prompt` column, rewards in my_rewards.py), on CPU:

  python -m srpo_trl.train --config recipes/cpu_tiny.yaml --model_name_or_path tiny-qwen3 \\
      --dataset_name my_task --reward_funcs my_rewards.correctness my_rewards.format_reward \\
      --reward_weights 1.0 0.2 --output_dir outputs/my_task

A paper benchmark on 8 GPUs:

  accelerate launch --config_file accelerate_configs/zero3.yaml -m srpo_trl.train --task chemistry \\
      --config recipes/qwen3_8b/srpo.yaml
"""

NAMED_REWARDS: dict[str, Callable] = {"multiple_choice": multiple_choice_reward, "tool_use": tool_use_reward}
"""Reward functions `--reward_funcs` takes by name, besides the task names (each its task's rewards)."""

TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")
"""`trl.rewards` functions `--reward_funcs` takes by name, as `trl grpo` does."""


@dataclass
class SRPOScriptArguments(ScriptArguments):
    """
    Data, reward and evaluation arguments of the SRPO training script: TRL's `ScriptArguments` (`dataset_name`,
    `dataset_config`, `dataset_train_split`, `dataset_test_split`, `dataset_streaming`) and the following.

    Parameters:
        task (`str`, *optional*):
            One of the paper's benchmarks, with its loader and reward: `chemistry`, `physics`, `biology`, `material`
            (SciKnowEval L3) or `tooluse` (ToolAlpaca). Without it, give your own data (`dataset_name`, or a
            `datasets` mixture).
        reward_funcs (`list[str]`, *optional*):
            Reward functions: import paths (`my_rewards.correctness`, a module importable from the current folder),
            `multiple_choice`, `tool_use`, a task name (its rewards), or `accuracy_reward`,
            `reasoning_accuracy_reward`, `think_format_reward` (TRL's). Default: the task's rewards.
        reward_model_name_or_path (`str`, *optional*):
            A sequence-classification reward model (Hub id or local folder), scored before the reward functions.
        data_path (`str`, *optional*):
            `--task` only. Local data: a directory in the SDPO layout (e.g. `<dir>/sciknoweval/chemistry/train.json`),
            a JSON Lines or parquet file, or a `save_to_disk` directory. Without it, the Hugging Face Hub.
        dataset_revision (`str`, *optional*):
            Hub revision of the dataset; pin it, since upstream re-uploads can shift the split.
        max_train_samples (`int`, *optional*):
            Keep only the first this many training problems (smoke tests).
        max_eval_samples (`int`, *optional*):
            Keep only the first this many test problems.
        eval_every_steps (`int`, *optional*):
            avg@k (the fraction of samples whose weighted reward reaches `success_reward_threshold`) on the test split
            every this many steps; `0` disables it. Defaults to `5` (the paper's) where there is a test split.
        eval_k (`int`, *optional*, defaults to `16`):
            Samples per test problem (avg@16 in the paper).
        eval_temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature of the evaluation.
        eval_top_p (`float`, *optional*, defaults to `0.95`):
            Top-p of the evaluation.
        eval_max_new_tokens (`int`, *optional*):
            Evaluation length limit; defaults to `max_completion_length`.
        eval_budgets_hours (`list[float]`, *optional*, defaults to `[1, 5, 10]`):
            Training-time budgets of the best-avg@k report.
    """

    task: str | None = field(
        default=None,
        metadata={"help": "A paper benchmark, instead of --dataset_name / datasets.", "choices": TASKS},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: import paths (my_rewards.correctness), multiple_choice, tool_use, a task name, "
            f"or TRL's {', '.join(TRL_REWARDS)}. Default: the task's."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A sequence-classification reward model (Hub id or local folder)."}
    )
    data_path: str | None = field(default=None, metadata={"help": "--task only: local data; the Hub if unset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision of the dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training problems."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N test problems."})
    eval_every_steps: int | None = field(
        default=None, metadata={"help": "avg@k on the test split every N steps (default 5 with a test split); 0: off."}
    )
    eval_k: int = field(default=16, metadata={"help": "Samples per test problem."})
    eval_temperature: float = field(default=0.6, metadata={"help": "Evaluation temperature."})
    eval_top_p: float = field(default=0.95, metadata={"help": "Evaluation top-p."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "Evaluation length limit."})
    eval_budgets_hours: list[float] = field(
        default_factory=lambda: [1.0, 5.0, 10.0], metadata={"help": "Training-time budgets (hours)."}
    )

    def __post_init__(self):
        # Checked here, naming the flag, rather than where the values are used (a slice, the evaluation callback).
        counts = {"max_train_samples": 1, "max_eval_samples": 1, "eval_every_steps": 0, "eval_k": 1}
        counts["eval_max_new_tokens"] = 1
        for name, least in counts.items():
            value = getattr(self, name)
            optional = name != "eval_k"
            if (value is None and optional) or (
                isinstance(value, int) and not isinstance(value, bool) and value >= least
            ):
                continue
            meaning = " (0: no avg@k)" if name == "eval_every_steps" else ""
            raise ValueError(f"--{name} must be an integer >= {least}{meaning}; got {value!r}.")
        if not (isinstance(self.eval_temperature, (int, float)) and 0 < self.eval_temperature < math.inf):
            raise ValueError(
                f"--eval_temperature must be > 0 (avg@k samples; the paper's is 0.6); got {self.eval_temperature!r}."
            )
        if not (isinstance(self.eval_top_p, (int, float)) and 0 < self.eval_top_p <= 1):
            raise ValueError(f"--eval_top_p must be in (0, 1]; got {self.eval_top_p!r}.")
        hours = self.eval_budgets_hours
        if not isinstance(hours, (list, tuple)) or not all(
            isinstance(h, (int, float)) and not isinstance(h, bool) and 0 < h < math.inf for h in hours
        ):
            raise ValueError(f"--eval_budgets_hours must be positive numbers of hours, e.g. 1 5 10; got {hours!r}.")


def srpo_field_names() -> set[str]:
    """SRPOConfig's own fields and the GRPO fields whose default SRPO changes (the paper's, method §10)."""
    grpo = {spec.name: spec for spec in dataclasses.fields(GRPOConfig)}
    return {
        spec.name
        for spec in dataclasses.fields(SRPOConfig)
        if spec.name not in grpo
        or (spec.default, spec.default_factory) != (grpo[spec.name].default, grpo[spec.name].default_factory)
    }


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description's example commands kept as written."""


class SRPOParser(GroupedParser):
    """`TrlParser` over [`SRPOScriptArguments`], [`SRPOConfig`], `ModelConfig` and `DatasetMixtureConfig`, its
    `--help` in titled groups: data and rewards, SRPO, model, then GRPO and the `Trainer`'s (about 200 fields) last."""

    group_order = (
        "Data, rewards and evaluation",
        "SRPO (SRPOConfig)",
        "Model (trl.ModelConfig)",
        "GRPO and training (trl.GRPOConfig)",
    )

    def __init__(self, prog: str | None = None):
        self._srpo_fields = srpo_field_names()
        super().__init__(
            (SRPOScriptArguments, SRPOConfig, ModelConfig, DatasetMixtureConfig),
            prog=prog or _prog(sys.argv[0]),
            description=DESCRIPTION,
            usage="%(prog)s [--config YAML] [--task TASK | --dataset_name DATA] [--ARGUMENT VALUE ...]",
            formatter_class=_HelpFormatter,
        )
        self.order_groups()

    def group_title(self, dtype, field_name: str) -> str:
        if dtype in (SRPOScriptArguments, DatasetMixtureConfig):
            return self.group_order[0]
        if dtype is SRPOConfig:
            return self.group_order[1] if field_name in self._srpo_fields else self.group_order[3]
        return self.group_order[2]


def _prog(argv0: str) -> str:
    """How the command was called, for `--help`'s usage: `srpo-trl`, `python -m srpo_trl.train`, or the script."""
    module = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    return "python -m srpo_trl.train" if os.path.abspath(argv0) == module else os.path.basename(argv0)


def parse_args(argv: list[str] | None = None, task: str | None = None):
    """`(script_args, training_args, model_args, dataset_args)` from `argv` (default `sys.argv[1:]`); `task` sets
    the default task (a script for one benchmark)."""
    parser = SRPOParser()
    if task is not None:
        parser.set_defaults(task=task)
    return parser.parse_args_and_config(argv)


def resolve_reward_funcs(names: list[str]) -> list[Callable]:
    """The reward functions `--reward_funcs` names, in order (a task name gives all of its task's)."""
    funcs = []
    for name in names:
        if name in TASKS:
            funcs += get_reward_funcs(name)
        elif name in NAMED_REWARDS:
            funcs.append(NAMED_REWARDS[name])
        elif name in TRL_REWARDS:
            funcs.append(getattr(importlib.import_module("trl.rewards"), name))
        elif "." in name:
            funcs.append(_import_reward(name))
        else:
            raise ValueError(_unknown_reward(name, "it is neither a known name nor an import path"))
    return funcs


def _import_reward(path: str) -> Callable:
    module_name, func_name = path.rsplit(".", 1)
    if os.getcwd() not in sys.path:  # as `trl grpo` does: a module in the current folder imports
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not f"{module_name}.".startswith(f"{error.name}."):
            raise  # the module exists but imports something missing: its own traceback says what
        raise ValueError(
            _unknown_reward(path, f"no module named {error.name!r} (in {os.getcwd()} or on PYTHONPATH)")
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        found = "nothing" if func is None else type(func).__name__
        raise ValueError(
            _unknown_reward(path, f"module {module_name!r} ({module.__file__}) has {found} named {func_name!r}")
        )
    return func


def _unknown_reward(name: str, reason: str) -> str:
    known = [*TASKS, *NAMED_REWARDS, *TRL_REWARDS]
    return (
        f"--reward_funcs {name!r}: {reason}. Give an import path package.module.function (e.g. my_rewards.correctness "
        f"for a function correctness in my_rewards.py in the current folder), or one of: {', '.join(known)}."
    )

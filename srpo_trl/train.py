"""The training run behind `srpo-trl`, `python -m srpo_trl.train` and `examples/train*.py`.

```bash
# your own data and rewards, as with `trl grpo`
python -m srpo_trl.train --config recipes/cpu_tiny.yaml --model_name_or_path tiny-qwen3 \\
    --dataset_name my_task --reward_funcs my_rewards.correctness my_rewards.format_reward --reward_weights 1.0 0.2
# one of the paper's benchmarks
accelerate launch --config_file accelerate_configs/zero3.yaml examples/train_chemistry.py \\
    --config recipes/qwen3_8b/srpo.yaml
```

`srpo_trl.cli` parses the arguments (see `--help`); [`main`] loads the data and rewards, trains, evaluates and saves.
"""

import os

from datasets import load_dataset
from trl import ModelConfig, get_peft_config, get_quantization_config

from .cli import SRPOScriptArguments, parse_args, resolve_reward_funcs
from .config import SRPOConfig
from .evaluation import BestWithinBudgetsCallback
from .tasks import get_reward_funcs, get_task, load_task_dataset
from .trainer import SRPOTrainer

__all__ = ["SRPOScriptArguments", "cli", "main"]

PAPER_EVAL_EVERY_STEPS = 5  # method §10: avg@16 every 5 steps
DEFAULT_TASK = "chemistry"  # the paper's headline setting


def main(script_args: SRPOScriptArguments, training_args: SRPOConfig, model_args: ModelConfig) -> SRPOTrainer:
    """Train `model_args.model_name_or_path` with SRPO on `script_args`' data and rewards (a paper task, or
    `dataset_name`), evaluate on the test split as asked, save; returns the trainer after training."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Hub model id or a local folder (save_pretrained).")
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    _choose_task(script_args)
    reward_funcs = _reward_funcs(script_args)  # before loading any data: a wrong path fails at once
    splits = _Splits(script_args)
    eval_every_steps = script_args.eval_every_steps
    if eval_every_steps is None:
        eval_every_steps = PAPER_EVAL_EVERY_STEPS if splits.has_test else 0
    wants_test = eval_every_steps > 0 or training_args.eval_strategy != "no"
    test_dataset = splits.test() if wants_test else None
    callbacks = []
    if eval_every_steps > 0:
        callbacks.append(
            BestWithinBudgetsCallback(
                test_dataset,
                eval_steps=eval_every_steps,
                budgets_hours=script_args.eval_budgets_hours,
                k=script_args.eval_k,
                temperature=script_args.eval_temperature,
                top_p=script_args.eval_top_p,
                max_new_tokens=script_args.eval_max_new_tokens or training_args.max_completion_length,
                batch_size=training_args.per_device_eval_batch_size,
            )
        )
    trainer = SRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=splits.train(),
        eval_dataset=test_dataset if training_args.eval_strategy != "no" else None,  # as `trl grpo`
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:  # the model card links the dataset the task comes from
        trainer.push_to_hub(dataset_name=splits.hub_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finishes the trackers, ends the process group
        trainer.end()
    return trainer


def cli(task: str | None = None) -> SRPOTrainer:
    """Parse `--config` YAML and command-line arguments, then run [`main`]; `task` sets the default task."""
    return main(*parse_args(task=task))


def _choose_task(script_args: SRPOScriptArguments) -> None:
    """A paper task (`chemistry` by default) or the user's `dataset_name`, never both."""
    if script_args.dataset_name is None:
        script_args.task = script_args.task or DEFAULT_TASK
    elif script_args.task is not None or script_args.data_path is not None:
        given = "--task" if script_args.task is not None else "--data_path"
        raise ValueError(
            f"{given} is for the paper's benchmarks, --dataset_name for your own data: give one of them (your "
            "task's rewards go in --reward_funcs)."
        )


def _reward_funcs(script_args: SRPOScriptArguments) -> list:
    funcs = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    if script_args.reward_funcs:
        return funcs + resolve_reward_funcs(script_args.reward_funcs)
    if script_args.dataset_name is None:
        return funcs + get_reward_funcs(script_args.task)
    if not funcs:
        raise ValueError(
            f"--dataset_name {script_args.dataset_name} needs a reward: --reward_funcs with import paths of your "
            "reward functions (e.g. my_rewards.correctness), and/or --reward_model_name_or_path."
        )
    return funcs


class _Splits:
    """The train and test splits of a paper task (`task`) or of the user's dataset (`dataset_name`)."""

    def __init__(self, script_args: SRPOScriptArguments):
        self.args = script_args
        if script_args.dataset_name is None:
            self.has_test = True
            self.hub_name = get_task(script_args.task).hub_dataset
            return
        self.dataset = load_dataset(
            script_args.dataset_name,
            name=script_args.dataset_config,
            revision=script_args.dataset_revision,
            streaming=script_args.dataset_streaming,
        )
        self.has_test = script_args.dataset_test_split in self.dataset
        self.hub_name = None if os.path.exists(script_args.dataset_name) else script_args.dataset_name

    def train(self):
        return _first(self._split("train", self.args.dataset_train_split), self.args.max_train_samples)

    def test(self):
        return _first(self._split("test", self.args.dataset_test_split), self.args.max_eval_samples)

    def _split(self, which: str, name: str):
        if self.args.dataset_name is None:
            if self.args.data_path:
                load = {"data_path": self.args.data_path}
            else:
                load = {"revision": self.args.dataset_revision}
            return load_task_dataset(self.args.task, which, **load)
        if name not in self.dataset:
            raise ValueError(
                f"--dataset_{which}_split {name}: {self.args.dataset_name} has the splits {list(self.dataset)}. Name "
                f"one of them{', or set --eval_every_steps 0 and --eval_strategy no' if which == 'test' else ''}."
            )
        split = self.dataset[name]
        if split.column_names is not None and "prompt" not in split.column_names:
            raise ValueError(
                f"--dataset_name {self.args.dataset_name}: its {name!r} split has no 'prompt' column (columns: "
                f"{split.column_names}). Each row needs a 'prompt', conversational ([{{'role': 'user', 'content': "
                "...}]) or plain text, plus the columns your reward functions read; rename the column that holds "
                "the question."
            )
        return split


def _first(dataset, count):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


if __name__ == "__main__":
    cli()

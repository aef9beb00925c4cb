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
import warnings

from datasets import DatasetDict, IterableDataset, load_dataset
from transformers import set_seed
from trl import DatasetMixtureConfig, ModelConfig, get_dataset, get_peft_config, get_quantization_config

from .cli import SRPOScriptArguments, parse_args, resolve_reward_funcs
from .config import SRPOConfig
from .evaluation import BestWithinBudgetsCallback
from .tasks import TASKS, get_reward_funcs, get_task, load_task_dataset
from .trainer import SRPOTrainer

__all__ = ["SRPOScriptArguments", "cli", "main"]

PAPER_EVAL_EVERY_STEPS = 5  # method §10: avg@16 every 5 steps


def main(
    script_args: SRPOScriptArguments,
    training_args: SRPOConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> SRPOTrainer:
    """Train `model_args.model_name_or_path` with SRPO on `script_args`' data and rewards (a paper task,
    `dataset_name`, or `dataset_args`' mixture, as `trl grpo`), evaluate on the test split as asked, save; returns
    the trainer after training."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required: a Hub model id or a local folder (save_pretrained).")
    dataset_args = dataset_args or DatasetMixtureConfig()
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    _choose_task(script_args, dataset_args)
    reward_funcs = _reward_funcs(script_args, dataset_args)  # before loading any data: a wrong path fails at once
    set_seed(training_args.seed)  # a test split carved at random is the same on every process and every run
    splits = _Splits(script_args, dataset_args)
    eval_every_steps = script_args.eval_every_steps
    if eval_every_steps is None:
        eval_every_steps = PAPER_EVAL_EVERY_STEPS if splits.has_test else 0
    wants_test = eval_every_steps > 0 or training_args.eval_strategy != "no"
    test_dataset = splits.test() if wants_test else None
    train_dataset = splits.train()
    if isinstance(train_dataset, IterableDataset) and training_args.max_steps <= 0:
        raise ValueError(
            "A streamed training set (--dataset_streaming, or a streamed `datasets` mixture) has no length, so "
            "epochs cannot be counted, --max_train_samples or not: set --max_steps."
        )
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
        train_dataset=train_dataset,
        eval_dataset=test_dataset if training_args.eval_strategy != "no" else None,  # as `trl grpo`
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Training completed. Model saved to {os.path.abspath(training_args.output_dir)}.")
    if training_args.push_to_hub:  # the model card links the dataset the task comes from
        trainer.push_to_hub(dataset_name=splits.hub_name)
        trainer.accelerator.print(f"Model pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: finishes the trackers, ends the process group
        trainer.end()
    return trainer


def cli(task: str | None = None) -> SRPOTrainer:
    """Parse `--config` YAML and command-line arguments, then run [`main`]; `task` sets the default task."""
    return main(*parse_args(task=task))


def _choose_task(script_args: SRPOScriptArguments, dataset_args: DatasetMixtureConfig) -> None:
    """A paper task or the user's data (`dataset_name` or a `datasets` mixture): exactly one of them."""
    own = "a `datasets` mixture" if dataset_args.datasets else None
    own = "--dataset_name" if script_args.dataset_name is not None else own
    if own is None and script_args.task is None:
        raise ValueError(
            "No data: give --dataset_name (your dataset: a Hub id or a local folder, e.g. one holding train.jsonl, "
            "with --reward_funcs), a `datasets:` mixture in the --config YAML, or --task, one of the paper's "
            f"benchmarks ({', '.join(TASKS)})."
        )
    if own is not None and (script_args.task is not None or script_args.data_path is not None):
        given = "--task" if script_args.task is not None else "--data_path"
        raise ValueError(
            f"{given} is for the paper's benchmarks, {own} for your own data: give one of them (your task's rewards "
            "go in --reward_funcs)."
        )
    if script_args.dataset_name is not None and dataset_args.datasets:
        warnings.warn(
            f"Both a `datasets` mixture and --dataset_name {script_args.dataset_name}: the mixture is used and "
            "--dataset_name ignored (as `trl grpo` does).",
            stacklevel=3,
        )


def _reward_funcs(script_args: SRPOScriptArguments, dataset_args: DatasetMixtureConfig) -> list:
    funcs = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    if script_args.reward_funcs:
        return funcs + resolve_reward_funcs(script_args.reward_funcs)
    if script_args.task is not None:
        return funcs + get_reward_funcs(script_args.task)
    if not funcs:
        data = "a `datasets` mixture" if dataset_args.datasets else f"--dataset_name {script_args.dataset_name}"
        raise ValueError(
            f"{data} needs a reward: --reward_funcs with import paths of your reward functions (e.g. "
            "my_rewards.correctness), and/or --reward_model_name_or_path."
        )
    return funcs


class _Splits:
    """The train and test splits of a paper task (`task`) or of the user's data: `dataset_name`, or a mixture of
    `datasets` (TRL's `get_dataset`); `test_split_size` carves a test split out of the training data."""

    def __init__(self, script_args: SRPOScriptArguments, dataset_args: DatasetMixtureConfig):
        self.args = script_args
        if script_args.task is not None:
            if dataset_args.test_split_size is not None:
                raise ValueError(
                    f"--test_split_size is for your own data: --task {script_args.task} has its test split."
                )
            self.has_test = True
            self.hub_name = get_task(script_args.task).hub_dataset
            return
        streaming = dataset_args.streaming if dataset_args.datasets else script_args.dataset_streaming
        if streaming and dataset_args.test_split_size is not None:
            raise ValueError(
                "--test_split_size cannot split a streamed dataset (it has no length): drop --streaming / "
                "--dataset_streaming, or give a dataset with a test split."
            )
        if dataset_args.datasets:
            self.source = "the `datasets` mixture"
            self.dataset = get_dataset(dataset_args)  # "train", and "test" with test_split_size
            self.hub_name = None
        else:
            self.source = f"--dataset_name {script_args.dataset_name}"
            self.dataset = load_dataset(
                script_args.dataset_name,
                name=script_args.dataset_config,
                revision=script_args.dataset_revision,
                streaming=streaming,
            )
            self.hub_name = None if os.path.exists(script_args.dataset_name) else script_args.dataset_name
            if dataset_args.test_split_size is not None:
                self._carve_test_split(dataset_args.test_split_size)
        self.has_test = script_args.dataset_test_split in self.dataset

    def _carve_test_split(self, size: float) -> None:
        train, test = self.args.dataset_train_split, self.args.dataset_test_split
        if test in self.dataset:
            raise ValueError(
                f"--test_split_size {size}: {self.source} has a {test!r} split already; drop --test_split_size, or "
                "name another split with --dataset_test_split."
            )
        parts = self._named(train, "train").train_test_split(test_size=size)  # seeded: main's set_seed
        self.dataset = DatasetDict({**self.dataset, train: parts["train"], test: parts["test"]})

    def train(self):
        return _first(self._split("train", self.args.dataset_train_split), self.args.max_train_samples)

    def test(self):
        return _first(self._split("test", self.args.dataset_test_split), self.args.max_eval_samples)

    def _split(self, which: str, name: str):
        if self.args.task is not None:
            if self.args.data_path:
                load = {"data_path": self.args.data_path}
            else:
                load = {"revision": self.args.dataset_revision}
            return load_task_dataset(self.args.task, which, **load)
        split = self._named(name, which)
        if split.column_names is not None and "prompt" not in split.column_names:
            raise ValueError(
                f"{self.source}: its {name!r} split has no 'prompt' column (columns: {split.column_names}). Each row "
                "needs a 'prompt', conversational ([{'role': 'user', 'content': ...}]) or plain text, plus the "
                "columns your reward functions read; rename the column that holds the question."
            )
        return split

    def _named(self, name: str, which: str):
        if name not in self.dataset:
            fix = ", or carve one with --test_split_size 0.1, or set --eval_every_steps 0 and --eval_strategy no"
            raise ValueError(
                f"--dataset_{which}_split {name}: {self.source} has the splits {list(self.dataset)}. Name one of "
                f"them{fix if which == 'test' else ''}."
            )
        return self.dataset[name]


def _first(dataset, count):
    if count is None:
        return dataset
    return (
        dataset.take(count)
        if isinstance(dataset, IterableDataset)
        else dataset.select(range(min(count, len(dataset))))
    )


if __name__ == "__main__":
    cli()

"""The training entry point behind `examples/train*.py`: one of the paper's five benchmarks, trained with SRPO.

```bash
accelerate launch --config_file accelerate_configs/zero3.yaml examples/train_chemistry.py \\
    --config recipes/qwen3_8b/srpo.yaml
```

Arguments come from three dataclasses, parsed by `trl.TrlParser` from a YAML `--config` and the command line:
[`SRPOScriptArguments`] (task, data, evaluation), [`SRPOConfig`] (training) and `trl.ModelConfig` (model, LoRA).
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .config import SRPOConfig
from .evaluation import BestWithinBudgetsCallback
from .tasks import SCIENCE_TASKS, SCIKNOWEVAL_HUB_REPO, TASKS, get_reward_funcs, load_task_dataset
from .trainer import SRPOTrainer


@dataclass
class SRPOScriptArguments:
    """
    Task, data and evaluation arguments of the SRPO training script.

    Parameters:
        task (`str`, *optional*, defaults to `"chemistry"`):
            Benchmark: `chemistry`, `physics`, `biology`, `material` (SciKnowEval L3) or `tooluse` (ToolAlpaca).
        data_path (`str`, *optional*):
            Local data: a directory in the SDPO layout (e.g. `<dir>/sciknoweval/chemistry/train.json`), a JSON Lines
            or parquet file, or a `save_to_disk` directory. Without it, the Hugging Face Hub.
        dataset_revision (`str`, *optional*):
            Hub revision of the dataset; pin it, since upstream re-uploads can shift the split.
        max_train_samples (`int`, *optional*):
            Keep only the first this many training problems (smoke tests).
        max_eval_samples (`int`, *optional*):
            Keep only the first this many test problems.
        eval_every_steps (`int`, *optional*, defaults to `5`):
            Evaluate avg@k on the test split every this many steps (the paper: 5); `0` disables it.
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

    task: str = field(default="chemistry", metadata={"help": "Benchmark.", "choices": list(TASKS)})
    data_path: str | None = field(default=None, metadata={"help": "Local data path; the Hub if unset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision of the dataset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training problems."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N test problems."})
    eval_every_steps: int = field(default=5, metadata={"help": "avg@k every N steps; 0 disables."})
    eval_k: int = field(default=16, metadata={"help": "Samples per test problem."})
    eval_temperature: float = field(default=0.6, metadata={"help": "Evaluation temperature."})
    eval_top_p: float = field(default=0.95, metadata={"help": "Evaluation top-p."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "Evaluation length limit."})
    eval_budgets_hours: list[float] = field(
        default_factory=lambda: [1.0, 5.0, 10.0], metadata={"help": "Training-time budgets (hours)."}
    )


def _first(dataset, count):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def main(script_args: SRPOScriptArguments, training_args: SRPOConfig, model_args: ModelConfig) -> SRPOTrainer:
    """Train `model_args.model_name_or_path` with SRPO on `script_args.task`; returns the trainer after training."""
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if script_args.data_path:
        load = {"data_path": script_args.data_path}
    else:
        load = {"revision": script_args.dataset_revision}
    train_dataset = _first(load_task_dataset(script_args.task, "train", **load), script_args.max_train_samples)
    trainer = SRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=get_reward_funcs(script_args.task),
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if script_args.eval_every_steps > 0:
        test_dataset = _first(load_task_dataset(script_args.task, "test", **load), script_args.max_eval_samples)
        trainer.add_callback(
            BestWithinBudgetsCallback(
                test_dataset,
                eval_steps=script_args.eval_every_steps,
                budgets_hours=script_args.eval_budgets_hours,
                k=script_args.eval_k,
                temperature=script_args.eval_temperature,
                top_p=script_args.eval_top_p,
                max_new_tokens=script_args.eval_max_new_tokens or training_args.max_completion_length,
                batch_size=training_args.per_device_eval_batch_size,
            )
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:  # the model card links the dataset the task comes from
        trainer.push_to_hub(dataset_name=SCIKNOWEVAL_HUB_REPO if script_args.task in SCIENCE_TASKS else None)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finishes the trackers, ends the process group
        trainer.end()
    return trainer


def cli(task: str | None = None) -> SRPOTrainer:
    """Parse `--config` YAML and command-line arguments, then run [`main`]; `task` sets the default task."""
    parser = TrlParser((SRPOScriptArguments, SRPOConfig, ModelConfig))
    if task is not None:
        parser.set_defaults(task=task)
    script_args, training_args, model_args = parser.parse_args_and_config()
    return main(script_args, training_args, model_args)

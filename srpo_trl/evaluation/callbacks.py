"""`BestWithinBudgetsCallback`: avg@k during training, the best value within each wall-clock budget (method §10)."""

import functools
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from ..checks import dataset_problem
from ..compat import generate_single_turn, grpo_rewards
from ..model_parts import reshard_fsdp2
from .scoring import _DEFAULT_BATCH_SIZE, AvgAtK, avg_at_k, sampling_problem


class BestWithinBudgetsCallback(TrainerCallback):
    """Evaluate avg@k every `eval_steps` optimizer steps and keep the best value reached within each time budget.

    Results are logged as `eval_avg@{k}` (the accuracy of [`avg_at_k`]), `eval_mean_reward@{k}` (the mean weighted
    reward) and, once `h` hours of training have passed, `best_avg@{k}_within_{h}h` (a shorter run logs none), in
    log rows of their own, and kept in `self.best` (`{hours: accuracy}`, the running best within each budget) and
    `self.history` (`(step, training seconds, AvgAtK)`). Evaluation time does not count towards the budgets:
    they measure training time, as the paper's "best avg@16 within 1 h, 5 h, 10 h of training" does. A sample is
    correct by the trainer's own rule: `trainer.reward_weights` and `trainer.args.success_reward_threshold`. With
    `use_vllm`, samples come from the run's vLLM engine (synced to the policy first); otherwise from
    `model.generate`, `per_device_eval_batch_size` sequences at a time.

    The callback needs the trainer it evaluates. [`SRPOTrainer`] gives it itself, whichever way it is added:

    ```python
    trainer = SRPOTrainer(..., callbacks=[BestWithinBudgetsCallback(test_dataset, eval_steps=5, k=16)])
    # or
    trainer.add_callback(BestWithinBudgetsCallback(test_dataset, eval_steps=5, k=16))
    ```

    With a plain `GRPOTrainer`, pass it: `trainer.add_callback(BestWithinBudgetsCallback(test_dataset,
    trainer=trainer))`.

    Args:
        eval_dataset: test split with a `prompt` column and the reward functions' columns.
        eval_steps: evaluate every this many optimizer steps (the paper: 5).
        budgets_hours: training-time budgets.
        trainer: the `GRPOTrainer` being trained; [`SRPOTrainer`] sets it.
        **avg_at_k_kwargs: forwarded to [`avg_at_k`] (`k`, `temperature`, `top_p`, `max_new_tokens`, ...); they
            take precedence over what the trainer gives (its reward weights, threshold and chat template kwargs).
    """

    def __init__(
        self, eval_dataset, eval_steps: int = 5, budgets_hours=(1.0, 5.0, 10.0), trainer=None, **avg_at_k_kwargs
    ):
        if isinstance(eval_dataset, Trainer):
            raise TypeError(
                "BestWithinBudgetsCallback takes the test dataset first; give the trainer as trainer=..., or leave "
                "it out with SRPOTrainer (callbacks=[...] or add_callback), which sets it."
            )
        if problem := _callback_arguments_problem(eval_dataset, eval_steps, budgets_hours, avg_at_k_kwargs):
            raise ValueError(f"BestWithinBudgetsCallback: {problem.rstrip('.')}.")
        self.eval_dataset, self.eval_steps = eval_dataset, eval_steps
        self.budgets_hours = tuple(budgets_hours)
        defaults = inspect.signature(avg_at_k).parameters  # the sampling settings, also for the vLLM sampler
        sampling = {name: defaults[name].default for name in ("k", "temperature", "top_p")}
        # The length limit is the trainer's `max_completion_length` unless given (`bind`): avg_at_k's own default,
        # 8,192 new tokens, would sample far past what training samples.
        self._requested = {**sampling, **avg_at_k_kwargs}
        self.kwargs = {"max_new_tokens": defaults["max_new_tokens"].default, **self._requested}
        self.best = {hours: -math.inf for hours in self.budgets_hours}
        self.history: list[tuple[int, float, AvgAtK]] = []
        self._training_seconds, self._since = 0.0, None
        self.trainer = None
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer) -> None:
        """Evaluate `trainer`, scoring and prompting as it trains (called by [`SRPOTrainer`]): its reward functions
        and reward models called as GRPOTrainer calls them, its weights and threshold, its chat template, its
        `max_completion_length`."""
        if getattr(trainer, "environment_factories", None) is not None:
            raise ValueError(
                "BestWithinBudgetsCallback samples without tools, and this trainer's rollouts run in environments "
                "(environment_factory), which its rewards read: evaluate with eval_strategy='steps' (the trainer's "
                "own evaluation, with its environments) instead."
            )
        _check_reward_columns(trainer, self.eval_dataset)
        self.trainer = trainer
        self.kwargs = {
            "reward_weights": trainer.reward_weights.tolist(),
            "success_reward_threshold": getattr(trainer.args, "success_reward_threshold", 1.0),
            "chat_template_kwargs": trainer.args.chat_template_kwargs,
            "show_progress": not trainer.args.disable_tqdm,
            "sequences_per_generate": trainer.args.per_device_eval_batch_size,
            "max_new_tokens": trainer.args.max_completion_length,
            **self._requested,
        }

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ValueError(
                "BestWithinBudgetsCallback has no trainer to evaluate: add it to an SRPOTrainer (callbacks=[...] or "
                "add_callback), or build it with trainer=your_trainer."
            )
        self._since = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps:
            return
        self._training_seconds += time.monotonic() - self._since
        value = self.evaluate()
        self.history.append((state.global_step, self._training_seconds, value))
        k = self.kwargs["k"]
        logs = {f"eval_avg@{k}": float(value), f"eval_mean_reward@{k}": value.mean_reward}
        for hours in self.budgets_hours:
            if self._training_seconds <= hours * 3600:
                self.best[hours] = max(self.best[hours], float(value))
            elif not math.isinf(self.best[hours]):  # the budget has run out: its best is final, and logged from now
                logs[f"best_avg@{k}_within_{hours:g}h"] = self.best[hours]
        # Trainer's own log, not GRPOTrainer's: the latter would flush the step's pending training metrics into
        # this row. Logging clears `should_log`, which Trainer has set for the step's training row: kept.
        should_log = control.should_log
        Trainer.log(self.trainer, logs)
        control.should_log = should_log
        self._since = time.monotonic()

    def evaluate(self) -> AvgAtK:
        trainer, rows = self.trainer, list(self.eval_dataset)  # a streamed test set is read once per evaluation
        vllm = getattr(trainer, "use_vllm", False)  # vLLM schedules its own batches: one of them all
        batch_size = len(rows) if vllm else self.kwargs.get("batch_size", _DEFAULT_BATCH_SIZE)
        kwargs = {**self.kwargs, "batch_size": max(batch_size, 1)}
        most = min(batch_size, math.ceil(len(rows) / trainer.accelerator.num_processes))  # one process's batch
        score = functools.partial(_score_like_grpo, trainer, rows[0] if rows else None, most * kwargs["k"])
        if vllm:
            return avg_at_k(
                trainer.model, trainer.processing_class, rows, trainer.reward_funcs, generate=self._vllm_sampler(),
                score=score, **kwargs,
            )  # fmt: skip
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            value = avg_at_k(model, trainer.processing_class, rows, trainer.reward_funcs, score=score, **kwargs)
        if trainer.is_fsdp_enabled:
            reshard_fsdp2(trainer.model_wrapped)
        return value

    def _vllm_sampler(self) -> Callable[[list[list[int]]], list[list[int]]]:
        """Sampling with the run's engine, through GRPOTrainer's own path (weight sync when the policy has moved,
        sleep/wake), with the evaluation's sampling parameters in place of training's for the call."""
        trainer, generation = self.trainer, self.trainer.vllm_generation
        sampling = {
            "temperature": self.kwargs["temperature"],
            "top_p": self.kwargs["top_p"],
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "max_completion_length": self.kwargs["max_new_tokens"],
        }

        def generate(prompt_ids):
            training = {name: getattr(generation, name) for name in sampling}
            for name, value in sampling.items():
                setattr(generation, name, value)
            try:
                completion_ids = generate_single_turn(trainer, prompt_ids)
            finally:
                for name, value in training.items():
                    setattr(generation, name, value)
            return [list(ids) for ids in completion_ids]

        return generate


def _score_like_grpo(trainer, filler: dict | None, capacity: int, inputs, prompts, completions, completion_ids):
    """avg@k's scores, by GRPOTrainer's own reward call (`compat.grpo_rewards`). That call gathers every process's
    rewards: with several processes, each pads its batch to `capacity` samples (copies of its last sample, or of
    `filler`, a test row with an empty completion, when it has none) and keeps its own."""
    count = len(prompts)
    if trainer.accelerator.num_processes > 1 and count < capacity:
        if count:
            pad = (inputs[-1], prompts[-1], completions[-1], completion_ids[-1])
        else:
            empty = [{"role": "assistant", "content": ""}] if is_conversational({"prompt": filler["prompt"]}) else ""
            pad = (filler, filler["prompt"], empty, [])
        extra = capacity - count
        inputs, prompts = inputs + [pad[0]] * extra, prompts + [pad[1]] * extra
        completions, completion_ids = completions + [pad[2]] * extra, completion_ids + [pad[3]] * extra
    if not prompts:
        return torch.zeros((0, len(trainer.reward_funcs)), dtype=torch.float64)
    return grpo_rewards(trainer, inputs, prompts, completions, completion_ids)[:count]


def _callback_arguments_problem(eval_dataset, eval_steps, budgets_hours, avg_at_k_kwargs: dict) -> str | None:
    """What is wrong with `BestWithinBudgetsCallback`'s arguments, naming the first bad one, or None."""
    if eval_dataset is None:
        return "eval_dataset is None: give the test split (a `prompt` column and the reward functions' columns)"
    if problem := dataset_problem("eval_dataset (the avg@k test set)", eval_dataset, teacher=False):
        return problem
    if not isinstance(eval_steps, numbers.Integral) or isinstance(eval_steps, bool) or eval_steps < 1:
        return f"eval_steps must be a positive number of optimizer steps (the paper's: 5); got {eval_steps!r}"
    hours = list(budgets_hours) if isinstance(budgets_hours, (list, tuple)) else None
    if hours is None or not all(
        isinstance(h, numbers.Real) and not isinstance(h, bool) and 0 < h < math.inf for h in hours
    ):
        return f"budgets_hours must be a list of positive numbers of hours, e.g. [1, 5, 10]; got {budgets_hours!r}"
    known = set(inspect.signature(avg_at_k).parameters) - {"model", "tokenizer", "dataset", "reward_funcs", "score"}
    unknown = sorted(set(avg_at_k_kwargs) - known)
    if unknown:
        return f"unknown avg_at_k arguments {unknown}; it takes {sorted(known)}"
    return sampling_problem(**avg_at_k_kwargs)


def _check_reward_columns(trainer, eval_dataset) -> None:
    """The test set must carry the columns the reward functions read, as training's rows do: a missing one a reward
    function requires is an error; one it takes with a default, or a training column, missing from the test set, a
    warning (a reward reading it from `**kwargs` or its default would score every sample as wrong)."""
    test_columns = getattr(eval_dataset, "column_names", None)
    train_columns = getattr(getattr(trainer, "train_dataset", None), "column_names", None)
    if test_columns is None:
        return
    given = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
    required, optional = {}, []
    for name, func in zip(trainer.reward_func_names, trainer.reward_funcs, strict=True):
        if isinstance(func, torch.nn.Module):
            continue
        for parameter in inspect.signature(func).parameters.values():
            if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                continue
            if parameter.name in given or parameter.name in test_columns:
                continue
            if parameter.default is parameter.empty:
                required.setdefault(parameter.name, name)
            else:
                optional.append(parameter.name)
    missing = list(required)
    if missing:
        raise ValueError(
            f"BestWithinBudgetsCallback: the reward function '{required[missing[0]]}' reads the column {missing[0]!r}, "
            f"which the test set lacks (its columns: {test_columns}): add it to the test split, as the training "
            "rows have it."
        )
    lacking = [c for c in train_columns or () if c not in test_columns and c not in ("prompt", "privileged_context")]
    lacking += [name for name in dict.fromkeys(optional) if name not in lacking]
    if lacking:
        warnings.warn(
            f"BestWithinBudgetsCallback: the test set lacks the training columns {lacking} (its columns: "
            f"{test_columns}): reward functions receive every column, and one reading these would score every test "
            "sample as wrong. Add them to the test split.",
            stacklevel=3,
        )


def bind_evaluation_callbacks(trainer) -> None:
    """Give `trainer` to the [`BestWithinBudgetsCallback`]s among its callbacks that have none yet."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, BestWithinBudgetsCallback) and callback.trainer is None:
            callback.bind(trainer)

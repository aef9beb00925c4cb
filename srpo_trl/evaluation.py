"""The paper's evaluation protocol (method §10): avg@k on a test split, and the best avg@k within wall-clock budgets.

`avg_at_k` samples `k` completions per problem (temperature 0.6, top-p 0.95 by default) and returns the fraction of
them that are correct, by the rule training routes with: the reward functions' outputs weighted by `reward_weights`
and summed (as `GRPOTrainer` does), at least `success_reward_threshold`. The mean weighted reward comes beside it.
`BestWithinBudgetsCallback` runs it every few steps during training and keeps, for each budget (1 h, 5 h, 10 h by
default), the best value reached before the budget ran out: the numbers of the paper's Table 1.

Memory: with vLLM (`use_vllm`), the evaluation samples with the run's own engine, whose KV cache is already reserved
(TRL's weight sync and sleep/wake included); without it, `model.generate` runs on bounded batches of sequences, since
a batch of 8 problems x 16 samples x 8k tokens of Qwen3-8B would need about 150 GB of KV cache (docs/scaling.md).
"""

import functools
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from .checks import dataset_problem
from .compat import grpo_rewards
from .routing import reaches_threshold, weighted_rewards

_DEFAULT_BATCH_SIZE = 8  # avg_at_k's
# How many of each to sample, and how: what avg@k's sampling arguments must be (checked where they are given).
_POSITIVE_COUNTS = ("k", "max_new_tokens", "batch_size", "sequences_per_generate")


def sampling_problem(**settings) -> str | None:
    """What is wrong with avg@k's sampling arguments (`k`, `temperature`, `top_p`, `max_new_tokens`, `batch_size`,
    `sequences_per_generate`, any of them), naming the first bad one, or None."""
    for name in _POSITIVE_COUNTS:
        value = settings.get(name)
        if name in settings and not (value is None and name == "sequences_per_generate"):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                return f"{name} must be a positive integer; got {value!r}"
    temperature, top_p = settings.get("temperature", 1.0), settings.get("top_p", 1.0)
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not 0 < temperature < math.inf:
        return (
            f"temperature must be a number > 0 (avg@k samples; the paper's is 0.6); got {temperature!r}. For a "
            "greedy evaluation use k=1 and a small temperature such as 1e-3"
        )
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        return f"top_p must be in (0, 1]; got {top_p!r}"
    return None


class AvgAtK(float):
    """avg@k, a float: the fraction of the samples whose weighted reward reaches the success threshold (unscorable
    samples, every reward `None`, count as wrong). `mean_reward` is the mean weighted reward of the scorable samples
    (NaN if there are none)."""

    mean_reward: float

    def __new__(cls, accuracy: float, mean_reward: float):
        value = super().__new__(cls, accuracy)
        value.mean_reward = mean_reward
        return value

    def __getnewargs__(self):
        return float(self), self.mean_reward

    def __repr__(self) -> str:
        return f"AvgAtK(accuracy={float(self)!r}, mean_reward={self.mean_reward!r})"


@torch.no_grad()
def avg_at_k(
    model,
    tokenizer: PreTrainedTokenizerBase,
    dataset,
    reward_funcs: Sequence[Callable],
    k: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 8192,
    batch_size: int = _DEFAULT_BATCH_SIZE,
    chat_template_kwargs: dict | None = None,
    generate: Callable | None = None,
    show_progress: bool = True,
    sequences_per_generate: int | None = None,
    reward_weights: Sequence[float] | None = None,
    success_reward_threshold: float = 1.0,
    score: Callable | None = None,
) -> AvgAtK:
    """avg@k of `model` on `dataset` (a `prompt` column plus the reward functions' columns): the fraction of its `k`
    samples per problem whose weighted reward, `sum_j reward_weights[j] * reward_j` (`None` rewards skipped, as in
    `GRPOTrainer`), is at least `success_reward_threshold`; returned as an [`AvgAtK`], with the mean weighted reward.

    Problems are split across processes and the sums gathered, so every process returns the same value. Problems are
    scored `batch_size` at a time; every process makes the same number of batches (possibly empty), so a `generate`
    that is a collective (vLLM in server mode) stays in step. Pass `generate(prompt_ids: list[list[int]]) ->
    list[list[int]]` to sample with another engine (e.g. vLLM); the default samples with `model.generate`, at most
    `sequences_per_generate` sequences at a time (all of a batch's when None). A progress bar (one tick per batch of
    problems) shows on the main process unless `show_progress=False`. `reward_weights` defaults to one per reward
    function. `dataset` may be streamed (any iterable of rows). `score(inputs, prompts, completions, completion_ids)`
    gives the `(samples, reward functions)` scores instead of calling `reward_funcs` (plain functions) directly: the
    callback scores through the trainer, as GRPOTrainer scores training's rollouts (`compat.grpo_rewards`); it is
    called on every process for every batch, empty or not.
    """
    problem = sampling_problem(
        k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
        sequences_per_generate=sequences_per_generate,
    )  # fmt: skip
    if problem:
        raise ValueError(f"avg_at_k: {problem}.")
    weights = _reward_weights(reward_funcs, reward_weights)
    state = PartialState()
    every_row = list(dataset)  # a streamed test set too; each process reads it and keeps its share
    if not every_row:
        raise ValueError("avg@k has no test problem to evaluate: the test set has no rows (check its split/filter).")
    if "prompt" not in every_row[0]:
        raise ValueError(
            f"avg@k's test set has no 'prompt' column (its columns: {list(every_row[0])}): each row needs the "
            "question in 'prompt', as the training set does."
        )
    rows = every_row[state.process_index :: state.num_processes]
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if generate is None:

        def generate(prompt_ids):
            step = sequences_per_generate or max(len(prompt_ids), 1)
            return [
                completion
                for start in range(0, len(prompt_ids), step)
                for completion in _hf_generate(model, prompt_ids[start : start + step], config, tokenizer.pad_token_id)
            ]

    total = torch.zeros(4, dtype=torch.float64)  # correct samples, sum of scorable rewards, scorable samples, samples
    batches = range(0, math.ceil(len(every_row) / state.num_processes / batch_size) * batch_size, batch_size)
    with eval_mode(model):  # generating in train mode (gradient checkpointing, no KV cache) gives garbage
        for start in tqdm(batches, desc=f"avg@{k}", disable=not (show_progress and state.is_main_process)):
            batch = rows[start : start + batch_size]
            prompt_ids = [_render(tokenizer, row["prompt"], chat_template_kwargs or {}) for row in batch]
            completion_ids = generate([ids for ids in prompt_ids for _ in range(k)])
            if not batch and score is None:
                continue
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            conversational = is_conversational({"prompt": every_row[0]["prompt"]})
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            inputs = [row for row in batch for _ in range(k)]
            prompts = [row["prompt"] for row in inputs]
            if score is not None:
                scores = score(inputs, prompts, completions, completion_ids)
                if not batch:
                    continue
            else:
                columns = {key: [row[key] for row in inputs] for key in batch[0] if key != "prompt"}
                scored = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
                scores = _scores(reward_funcs, **scored, **columns, log_extra=_discard, log_metric=_discard)
            rewards = weighted_rewards(scores, weights)
            scorable = ~torch.isnan(rewards)
            correct = reaches_threshold(rewards, success_reward_threshold)  # training's rule; NaN never reaches it
            total += torch.tensor([correct.sum(), rewards[scorable].sum(), scorable.sum(), len(texts)])
    if state.num_processes > 1:
        from accelerate.utils import reduce

        total = reduce(total.to(state.device), reduction="sum").cpu()
    correct, reward_sum, scorable, samples = total.tolist()
    return AvgAtK(correct / samples if samples else math.nan, reward_sum / scorable if scorable else math.nan)


def _discard(*args, **kwargs) -> None:
    """What a reward function's `log_extra` / `log_metric` (which `GRPOTrainer` passes) log during avg@k: nothing."""


def _scores(reward_funcs: Sequence[Callable], **inputs) -> torch.Tensor:
    """`(samples, reward functions)` scores, NaN where a function returned `None`."""
    columns = [[math.nan if s is None else s for s in reward_func(**inputs)] for reward_func in reward_funcs]
    return torch.tensor(columns, dtype=torch.float64).T


def _reward_weights(reward_funcs: Sequence[Callable], reward_weights: Sequence[float] | None) -> torch.Tensor:
    if reward_weights is None:
        return torch.ones(len(reward_funcs), dtype=torch.float64)
    weights = torch.as_tensor(reward_weights, dtype=torch.float64).flatten()
    if len(weights) != len(reward_funcs):
        raise ValueError(
            f"avg_at_k got {len(weights)} reward_weights for {len(reward_funcs)} reward functions; give one weight "
            "per reward function (or none: weight 1 each)."
        )
    return weights


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _render(tokenizer, prompt, chat_template_kwargs) -> list[int]:
    if is_conversational({"prompt": prompt}):
        return list(
            tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs
            )["input_ids"]
        )
    return tokenizer(prompt)["input_ids"]


def _hf_generate(model, prompt_ids: list[list[int]], config: GenerationConfig, pad_token_id: int) -> list[list[int]]:
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in prompt_ids], device=model.device)
    attention_mask = torch.tensor(
        [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=model.device
    )
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    completions = []
    for row in output[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in (config.eos_token_id, pad_token_id)]
        completions.append(row[: ends[0] + 1] if ends else row)
    return completions


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
            return avg_at_k(model, trainer.processing_class, rows, trainer.reward_funcs, score=score, **kwargs)

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
                completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, num_generations=1)
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

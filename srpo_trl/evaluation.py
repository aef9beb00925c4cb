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

import inspect
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from .compat import generate_single_turn
from .routing import reaches_threshold, weighted_rewards


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
    batch_size: int = 8,
    chat_template_kwargs: dict | None = None,
    generate: Callable | None = None,
    show_progress: bool = True,
    sequences_per_generate: int | None = None,
    reward_weights: Sequence[float] | None = None,
    success_reward_threshold: float = 1.0,
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
    function.
    """
    weights = _reward_weights(reward_funcs, reward_weights)
    state = PartialState()
    rows = [dataset[i] for i in range(state.process_index, len(dataset), state.num_processes)]
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
    batches = range(0, math.ceil(len(dataset) / state.num_processes / batch_size) * batch_size, batch_size)
    with eval_mode(model):  # generating in train mode (gradient checkpointing, no KV cache) gives garbage
        for start in tqdm(batches, desc=f"avg@{k}", disable=not (show_progress and state.is_main_process)):
            batch = rows[start : start + batch_size]
            prompt_ids = [_render(tokenizer, row["prompt"], chat_template_kwargs or {}) for row in batch]
            completion_ids = generate([ids for ids in prompt_ids for _ in range(k)])
            if not batch:
                continue
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            conversational = is_conversational({"prompt": batch[0]["prompt"]})
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
            columns = {key: [row[key] for row in batch for _ in range(k)] for key in batch[0] if key != "prompt"}
            prompts = [row["prompt"] for row in batch for _ in range(k)]
            inputs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
            scores = _scores(reward_funcs, **inputs, log_extra=_discard, log_metric=_discard)
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
    reward) and `best_avg@{k}_within_{h}h`, in log rows of their own, and kept in `self.best` (`{hours: accuracy}`)
    and `self.history` (`(step, training seconds, AvgAtK)`). Evaluation time does not count towards the budgets:
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
        self.eval_dataset, self.eval_steps = eval_dataset, eval_steps
        self.budgets_hours = tuple(budgets_hours)
        defaults = inspect.signature(avg_at_k).parameters  # the sampling settings, also for the vLLM sampler
        sampling = {name: defaults[name].default for name in ("k", "temperature", "top_p", "max_new_tokens")}
        self._requested = {**sampling, **avg_at_k_kwargs}
        self.kwargs = dict(self._requested)
        self.best = {hours: -math.inf for hours in self.budgets_hours}
        self.history: list[tuple[int, float, AvgAtK]] = []
        self._training_seconds, self._since = 0.0, None
        self.trainer = None
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer) -> None:
        """Evaluate `trainer`, scoring and prompting as it trains (called by [`SRPOTrainer`])."""
        pairs = zip(trainer.reward_func_names, trainer.reward_funcs, strict=True)
        models = [name for name, func in pairs if isinstance(func, torch.nn.Module)]
        if models:
            raise ValueError(
                f"BestWithinBudgetsCallback scores with reward functions; the reward model(s) {models} cannot score "
                "avg@k. Evaluate with eval_strategy='steps' (the trainer's own evaluation) instead."
            )
        self.trainer = trainer
        self.kwargs = {
            "reward_weights": trainer.reward_weights.tolist(),
            "success_reward_threshold": getattr(trainer.args, "success_reward_threshold", 1.0),
            "chat_template_kwargs": trainer.args.chat_template_kwargs,
            "show_progress": not trainer.args.disable_tqdm,
            "sequences_per_generate": trainer.args.per_device_eval_batch_size,
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
            logs[f"best_avg@{k}_within_{hours:g}h"] = self.best[hours]
        # Trainer's own log, not GRPOTrainer's: the latter would flush the step's pending training metrics into
        # this row. Logging clears `should_log`, which Trainer has set for the step's training row: kept.
        should_log = control.should_log
        Trainer.log(self.trainer, logs)
        control.should_log = should_log
        self._since = time.monotonic()

    def evaluate(self) -> AvgAtK:
        trainer = self.trainer
        if getattr(trainer, "use_vllm", False):
            kwargs = {**self.kwargs, "batch_size": len(self.eval_dataset)}  # vLLM schedules its own batches
            return avg_at_k(
                trainer.model, trainer.processing_class, self.eval_dataset, trainer.reward_funcs,
                generate=self._vllm_sampler(), **kwargs,
            )  # fmt: skip
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            return avg_at_k(model, trainer.processing_class, self.eval_dataset, trainer.reward_funcs, **self.kwargs)

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


def bind_evaluation_callbacks(trainer) -> None:
    """Give `trainer` to the [`BestWithinBudgetsCallback`]s among its callbacks that have none yet."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, BestWithinBudgetsCallback) and callback.trainer is None:
            callback.bind(trainer)

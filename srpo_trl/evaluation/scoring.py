"""avg@k (method §10): sampling `k` completions per problem and scoring them as training routes them."""

import asyncio
import inspect
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase
from trl.data_utils import is_conversational

from ..routing import reaches_threshold, weighted_rewards

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
    that is a collective (vLLM in server mode) stays in step; the default one (`model.generate`, a collective under
    ZeRO-3 and FSDP) also generates as many sequences in each as the fullest process. Pass
    `generate(prompt_ids: list[list[int]]) -> list[list[int]]` to sample with another engine (e.g. vLLM); the default
    samples with `model.generate`, at most `sequences_per_generate` sequences at a time (all of a batch's when None).
    A progress bar (one tick per batch of problems) shows on the main process unless `show_progress=False`.
    `reward_weights` defaults to one per reward function. `dataset` may be streamed (any iterable of rows). `score(inputs, prompts, completions, completion_ids)`
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
        fullest = len(range(0, len(every_row), state.num_processes))  # process 0's share: the most rows
        filler = _render(tokenizer, every_row[0]["prompt"], chat_template_kwargs or {})
        batch_index = itertools.count()

        def generate(prompt_ids):
            # Under ZeRO-3 or FSDP `model.generate` is a collective at every token (transformers syncs the processes):
            # each process makes as many calls, of as many sequences, as the fullest share of this batch, a shorter
            # share (or an empty one) padded with copies of a test prompt whose completions are dropped.
            wanted = len(prompt_ids)
            in_step = min(batch_size, max(fullest - next(batch_index) * batch_size, 0)) * k
            padded = prompt_ids + [filler] * (in_step - wanted)
            step = sequences_per_generate or max(len(padded), 1)
            return [
                completion
                for start in range(0, len(padded), step)
                for completion in _hf_generate(model, padded[start : start + step], config, tokenizer.pad_token_id)
            ][:wanted]

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
    """`(samples, reward functions)` scores, NaN where a function returned `None`, of plain reward functions (an async
    one is awaited). Reward models, and rewards reading `trainer_state`, need the trainer: the callback scores through
    it (`compat.grpo_rewards`)."""
    columns = []
    for reward_func in reward_funcs:
        if isinstance(reward_func, torch.nn.Module):
            raise ValueError(
                f"avg_at_k scores a reward model ({type(reward_func).__name__}) only through a trainer: evaluate with "
                "BestWithinBudgetsCallback(test_dataset, trainer=your_trainer), which calls every reward as "
                "GRPOTrainer does."
            )
        output = reward_func(**inputs)
        if inspect.isawaitable(output):
            output = asyncio.run(output)
        columns.append([math.nan if s is None else s for s in output])
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

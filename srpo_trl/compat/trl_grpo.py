"""GRPOTrainer's internals (TRL 1.16.0) that SRPO reads, writes or calls, in one place: review on each TRL bump.

What `SRPOTrainer` overrides of GRPOTrainer cannot move here; `EXTENSION_POINTS` (in `compat/__init__.py`) lists it.
Everything else goes through a function below: the metric buffers (`_metrics`), the completions table (`_logs`),
the reward functions' `log_extra` buffer (`_pending_extra_logs`), the distributed layout (`_dist`), the tokenizer
(`_tokenizer`), the entropy bonus switch (`_entropy_bonus_enabled`), prompt tokenization (`_tokenize_prompts`,
`_batch_environments`), the policy's log-probs (`_get_per_token_logps_and_entropies`), one generation call
(`_generate_single_turn`), GRPOTrainer's own reward call for avg@k (`_calculate_rewards`, `_pending_metrics`), the fused LM head's CPU switch (`trl.trainer.utils._use_triton`) and its fp32 gradient
accumulation (`trl.kernels.chunked_logprob._addmm_fp32`).
"""

import warnings
from collections import defaultdict
from contextlib import contextmanager

import torch
from trl import GRPOTrainer
from trl.kernels.chunked_logprob import _addmm_fp32
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import utils as trl_utils


def quiet_trl_checkpointing_calls() -> None:
    """TRL 1.16 toggles gradient checkpointing around generation through transformers' old method names
    (`is_gradient_checkpointing`, `gradient_checkpointing_enable/disable`), which newer transformers deprecate:
    a warning per run that no SRPO or TRL user can act on."""
    for name in ("is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"):
        warnings.filterwarnings("ignore", message=f"`{name}` is deprecated", category=FutureWarning)


@contextmanager
def fused_head_scores_only(causal_lm: torch.nn.Module, rows: torch.Tensor):
    """GRPOTrainer's fused LM head (TRL 1.16: `fused_lm_head=True` in the forward's kwargs) scores only `rows` of
    each micro-batch: the others' labels become -100, and TRL's head skips the positions labelled -100. That is its GPU
    path; on CPU TRL projects every position instead (a fixed tile shape, for devices that recompile; the private
    switch `trl.trainer.utils._use_triton`), which is lifted here. With every row kept nothing changes."""
    if rows.all():
        yield
        return
    offset = 0

    def drop_labels(module, args, kwargs):
        nonlocal offset
        labels = kwargs.get("labels")
        if not kwargs.get("fused_lm_head") or labels is None:
            return None
        keep = rows[offset : offset + labels.size(0)]
        offset += labels.size(0)
        return args, {**kwargs, "labels": labels.masked_fill(~keep.unsqueeze(1), -100)}

    handle = causal_lm.register_forward_pre_hook(drop_labels, with_kwargs=True)
    with compact_fused_head_on_cpu():
        try:
            yield
        finally:
            handle.remove()


@contextmanager
def compact_fused_head_on_cpu():
    """TRL's fused LM head skips ignored positions on CPU too, as it does on GPUs (benchmarks compare the two paths)."""
    compact_on = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or compact_on(device)
    try:
        yield
    finally:
        trl_utils._use_triton = compact_on


def is_grpo_token_statistic(key: str) -> bool:
    """Whether GRPOTrainer 1.16 logs metric `key` as a statistic over the tokens of its loss mask."""
    return key in ("entropy", "kl", "cispo_clip_ratio") or key.startswith(("clip_ratio/", "vespo/"))


def tokenize_one_prompt(trainer, prompt, row: int) -> list[int]:
    """GRPOTrainer's own prompt tokenization (`_tokenize_prompts`: the student's chat template and
    `chat_template_kwargs`) of a prompt for this process's batch row `row`: with `environment_factory`, rendered with
    that row's tools (`_batch_environments`, which GRPOTrainer pairs with the prompts one by one)."""
    environments = getattr(trainer, "_batch_environments", None)
    if trainer.environment_factories is None or environments is None:
        return list(trainer._tokenize_prompts([prompt])[0][0])
    trainer._batch_environments = [environments[row]]
    try:
        return list(trainer._tokenize_prompts([prompt])[0][0])
    finally:
        trainer._batch_environments = environments


@torch.no_grad()
def policy_token_logps(trainer, batch: dict, rows_per_pass: int) -> torch.Tensor:
    """The policy's log-probs of a batch's sampled tokens, as GRPOTrainer computes `old_per_token_logps`."""
    with disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            batch["completion_ids"].size(1),
            batch_size=rows_per_pass,
        )
    return logps


def loss_mask(batch: dict) -> torch.Tensor:
    """The completion tokens GRPOTrainer's loss counts (its `tool_mask` excludes tool outputs), bool `(rows, length)`."""
    mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
    return mask.bool()


def accumulate_fp32(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """`accumulator += left @ right` with an fp32 `accumulator` and lower-precision factors, as TRL's chunked
    log-prob kernel accumulates its LM-head gradient (`_addmm_fp32`)."""
    _addmm_fp32(accumulator, left, right)


def log_metrics(trainer, mode: str, metrics: dict[str, float]) -> None:
    """Add values to GRPOTrainer's per-step metric buffers (`_metrics[mode]`), averaged and logged at the next log."""
    for key, value in metrics.items():
        trainer._metrics[mode][key].append(value)


def metric_counts(trainer, mode: str) -> dict[str, int]:
    """How many values each of GRPOTrainer's metric buffers holds now (for `drop_grpo_token_statistics`)."""
    return {key: len(values) for key, values in trainer._metrics[mode].items()}


def drop_grpo_token_statistics(trainer, mode: str, counts_before: dict[str, int]) -> None:
    """Remove the values GRPOTrainer's statistics over its loss mask (`is_grpo_token_statistic`) logged since
    `counts_before`: with no GRPO token on any process they are 0 or NaN, not statistics."""
    metrics = trainer._metrics[mode]
    for key in [key for key in metrics if is_grpo_token_statistic(key)]:
        del metrics[key][counts_before.get(key, 0) :]
        if not metrics[key]:
            del metrics[key]


def add_completion_columns(trainer, columns: dict[str, list]) -> None:
    """Extend the completions table (`log_completions`) with extra columns for this batch's rows."""
    for name, values in columns.items():
        trainer._logs["extra"][name].extend(values)


def replace_logged_advantages(trainer, rows: int, replace) -> None:
    """Replace the completions table's `advantage` values of this batch's last `rows` rows (GRPOTrainer's, in batch
    order) by `replace(those values)`."""
    advantages = trainer._logs["advantages"]
    batch = [advantages.pop() for _ in range(rows)][::-1]
    advantages.extend(replace(batch))


def logged_extra(trainer, column: str) -> list:
    """What the reward functions just called wrote to `column` through `log_extra` (GRPOTrainer flushes it after)."""
    return list(trainer._pending_extra_logs.get(column, []))


def distributed_layout(trainer):
    """GRPOTrainer's distributed layout: `is_zero3`, `is_fsdp`."""
    return trainer._dist


def entropy_bonus_enabled(trainer) -> bool:
    return trainer._entropy_bonus_enabled


def pad_token_id(trainer) -> int:
    """The pad token of GRPOTrainer's tokenizer (the processor's, for multimodal models)."""
    return trainer._tokenizer.pad_token_id


def generate_single_turn(trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """One completion per prompt through GRPOTrainer's own generation (vLLM weight sync, sleep/wake)."""
    completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, num_generations=1)
    return completion_ids


def trl_weights_for_vllm(generation):
    """The `(name, tensor)` pairs TRL's `VLLMGeneration` syncs to a colocated engine (gathered under ZeRO-3, the
    policy adapter merged under PEFT, names as vLLM's checkpoint loader expects them)."""
    return generation._iter_named_params()


def adopt_class(instance, subclass: type) -> None:
    """Give `instance` (made by TRL) `subclass` of its class: the same object and state, overridden methods."""
    if not isinstance(instance, subclass):
        instance.__class__ = subclass


def grpo_rewards(trainer, inputs: list[dict], prompts: list, completions: list, completion_ids: list) -> torch.Tensor:
    """This process's `(samples, reward functions)` scores of `completions`, NaN where a function returned None,
    computed by GRPOTrainer's own reward call (`_calculate_rewards`, not an override of it): reward models, async
    functions, `trainer_state`, every dataset column of `inputs` (one row per sample), exactly as in training. What the
    functions log (`log_extra`, `log_metric`) is dropped: it belongs to no training batch. GRPOTrainer gathers the
    rewards of every process, so every process must score as many samples."""
    pending = trainer._pending_extra_logs, trainer._pending_metrics
    trainer._pending_extra_logs, trainer._pending_metrics = defaultdict(list), defaultdict(list)
    try:
        gathered = GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, completion_ids)
    finally:
        trainer._pending_extra_logs, trainer._pending_metrics = pending
    index = trainer.accelerator.process_index
    return gathered.view(-1, len(prompts), gathered.size(-1))[index].double().cpu()

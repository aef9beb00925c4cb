"""The private or version-dependent names of TRL and transformers that srpo_trl relies on, in one place.

TRL is pinned to 1.16.x and transformers ranges over 5.10.4 to 5.x: review this list on each bump.

Functions here wrap what changes between versions or reaches into a module's private names. What `SRPOTrainer`
overrides or reads of `GRPOTrainer` itself cannot move here; it is listed so that a bump checks it:
- overridden: `_calculate_rewards(inputs, prompts, completions, completion_ids_list)` (returns the gathered
  `(N, reward_funcs)` rewards), `_generate_and_score_completions(inputs)` (returns the batch dict: `prompt_ids`,
  `completion_ids`, `completion_mask`, `advantages`, `num_items_in_batch`, `old_per_token_logps`,
  `importance_sampling_ratio`, `tool_mask`), `_compute_loss(model, inputs)`, Trainer's `_save_optimizer_and_scheduler`
  and `_load_optimizer_and_scheduler` (checkpointing.py);
- called: `_tokenize_prompts`, `_get_per_token_logps_and_entropies`, `_generate_single_turn` (evaluation.py),
  `GRPOTrainer._calculate_rewards` itself (`grpo_rewards`, for avg@k);
- read: `_metrics`, `_logs` (the completions table), `_pending_extra_logs` (`log_extra`), `_dist` (`is_zero3`,
  `is_fsdp`), `_tokenizer`, `_entropy_bonus_enabled`, `_batch_environments`, `environment_factories`,
  `aux_loss_enabled`, `vllm_generation` (vllm_cpu.py);
- TRL utilities outside `trl.__all__`: `trl.trainer.utils` (`pad`, `maybe_gather_lm_head_ctx`, `use_adapter`,
  `_use_triton` below), `trl.kernels.chunked_logprob._addmm_fp32` (vocab.py), `trl.models.prepare_deepspeed`,
  `trl.models.utils.disable_gradient_checkpointing`, `trl.generation.vllm_generation.VLLMGeneration`;
- spans: the trainer times its named spans with `trl.extras.profiling.profiling_context`; the step-cost benchmark
  (`benchmarks/step_cost/harness.py`) reads them by wrapping `ProfilingContext.__enter__`/`__exit__`, and takes a
  span's name from `ProfilingContext.name` (`"<trainer class>.<span>"`).
"""

import inspect
import warnings
from collections import defaultdict
from contextlib import contextmanager

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import utils as trl_utils


def cache_argument(model_class: type) -> str:
    """The name of a causal LM forward's key/value cache argument: transformers 5.18 renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def output_cache(output):
    """The key/value cache a forward returned, under its name of either version."""
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


def adopt_activation_checkpointing_name(config) -> None:
    """Move TRL's `gradient_checkpointing` default (True, in TRL's config) to transformers' new name
    `activation_checkpointing` where it exists (newer transformers), before `TrainingArguments.__post_init__`
    resolves the alias: it warns on every config otherwise, whether or not the user wrote the old name."""
    if getattr(config, "activation_checkpointing", False) is None and config.gradient_checkpointing is not None:
        config.activation_checkpointing = config.gradient_checkpointing


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

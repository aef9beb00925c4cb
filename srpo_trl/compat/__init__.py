"""Every private or version-dependent name of TRL, transformers, DeepSpeed, `HfArgumentParser` and argparse that
srpo_trl relies on, in one place: review this package on each bump. TRL is pinned to 1.16.x, transformers ranges over
5.10.4 to 5.x, DeepSpeed was read at 0.19.0. `tests/unit/test_compat.py` fails when a private name of those
libraries is used anywhere else in the package.

- `trl_grpo`: GRPOTrainer's internals (TRL 1.16.0): metric and completion-table buffers, `log_extra`, the distributed
  layout, prompt tokenization, the policy's log-probs, one generation call, the fused LM head, vLLM weight sync;
- `grpo_loss`: GRPOTrainer's loss reduction per `loss_type` (TRL 1.16.0), the normaliser SRPO's branches share;
- `models`: transformers' key/value cache API and RoPE internals (5.10-5.25), `_from_config`, DeepSpeed 0.19's
  parameter-table flag;
- `arguments`: `HfArgumentParser`'s dataclass loop and argparse's groups (transformers 5.25).

What `SRPOTrainer`, `SRPOConfig` and `SRPOParser` override or set of their library base classes cannot move here:
`EXTENSION_POINTS` names each, and the test above checks that the list is complete and has no stale entry. The
spans: the trainer times its named spans with `trl.extras.profiling.profiling_context` (public), and the step-cost
benchmark reads them from the logged `profiling/Time taken: <trainer class>.<span>` values' context managers.
"""

from .arguments import GroupedParser
from .grpo_loss import (
    GRPO_REDUCTIONS,
    LOSS_TYPES,
    divides_by_local_tokens,
    global_token_normaliser,
    reduce_token_loss,
)
from .models import (
    NO_LOGITS,
    adopt_activation_checkpointing_name,
    cache_argument,
    cache_rows,
    cache_rows_selectable,
    empty_model_like,
    has_length_dependent_rope,
    head_not_called,
    output_cache,
    reset_dynamic_rope,
)
from .trl_grpo import (
    accumulate_fp32,
    add_completion_columns,
    adopt_class,
    compact_fused_head_on_cpu,
    distributed_layout,
    drop_grpo_token_statistics,
    entropy_bonus_enabled,
    fused_head_scores_only,
    generate_single_turn,
    grpo_rewards,
    is_grpo_token_statistic,
    log_metrics,
    logged_extra,
    loss_mask,
    metric_counts,
    pad_token_id,
    policy_token_logps,
    quiet_trl_checkpointing_calls,
    replace_logged_advantages,
    tokenize_one_prompt,
    trl_weights_for_vllm,
)

# Private names of a library base class that srpo_trl overrides or sets, and what each is, with the version read.
EXTENSION_POINTS: dict[str, str] = {
    "_calculate_rewards": "GRPOTrainer (TRL 1.16.0), overridden: returns the gathered (N, reward_funcs) rewards",
    "_generate_and_score_completions": "GRPOTrainer (TRL 1.16.0), overridden: returns the batch dict (prompt_ids, "
    "completion_ids, completion_mask, advantages, num_items_in_batch, old_per_token_logps, "
    "importance_sampling_ratio, tool_mask)",
    "_compute_loss": "GRPOTrainer (TRL 1.16.0), overridden: (model, inputs) -> the micro-batch's loss",
    "_save_optimizer_and_scheduler": "transformers.Trainer (5.25), overridden: checkpointing.py writes the teacher",
    "_load_optimizer_and_scheduler": "transformers.Trainer (5.25), overridden: checkpointing.py restores the teacher",
    "_tag_names": "TRL 1.16.0 BaseTrainer, set: the model card's tags",
    "_name": "TRL 1.16.0 BaseTrainer, set: how the model card names the method",
    "_paper": "TRL 1.16.0 BaseTrainer, set: the model card's paper (title, id, citation)",
}

__all__ = [
    "GRPO_REDUCTIONS",
    "GroupedParser",
    "LOSS_TYPES",
    "NO_LOGITS",
    "accumulate_fp32",
    "add_completion_columns",
    "adopt_activation_checkpointing_name",
    "adopt_class",
    "cache_argument",
    "cache_rows",
    "cache_rows_selectable",
    "compact_fused_head_on_cpu",
    "distributed_layout",
    "divides_by_local_tokens",
    "drop_grpo_token_statistics",
    "empty_model_like",
    "entropy_bonus_enabled",
    "fused_head_scores_only",
    "generate_single_turn",
    "grpo_rewards",
    "global_token_normaliser",
    "has_length_dependent_rope",
    "head_not_called",
    "is_grpo_token_statistic",
    "log_metrics",
    "loss_mask",
    "logged_extra",
    "metric_counts",
    "output_cache",
    "pad_token_id",
    "policy_token_logps",
    "quiet_trl_checkpointing_calls",
    "reduce_token_loss",
    "replace_logged_advantages",
    "reset_dynamic_rope",
    "tokenize_one_prompt",
    "trl_weights_for_vllm",
    "EXTENSION_POINTS",
]

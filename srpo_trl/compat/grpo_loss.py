"""How GRPOTrainer (TRL 1.16.0, `GRPOTrainer._compute_loss`) turns a per-token loss into a micro-batch loss, per
`loss_type`: the normaliser is the one thing SRPO's two branches must share (method §6, §12). Written against TRL
1.16.0; a bump re-reads `_compute_loss` and `tests/unit/test_losses.py` checks each row against its definition."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reduction:
    """One `loss_type`'s reduction.

    Attributes:
        per_sequence: each sequence's tokens are first averaged ("mean") or summed ("sum"); None: pooled tokens.
        divisor: what the result is divided by: "sequences" (their mean), "local_tokens" (the micro-batch's own
            token count), "sequences_x_max_length" (`rows * max_completion_length`), "global_tokens" (the generation
            batch's token count on all processes, method §6's `N`).
    """

    per_sequence: str | None
    divisor: str


GRPO_REDUCTIONS: dict[str, Reduction] = {
    "grpo": Reduction("mean", "sequences"),
    "sapo": Reduction("mean", "sequences"),
    "luspo": Reduction("sum", "sequences"),
    "bnpo": Reduction(None, "local_tokens"),
    "dr_grpo": Reduction(None, "sequences_x_max_length"),
    "dapo": Reduction(None, "global_tokens"),
    "cispo": Reduction(None, "global_tokens"),
    "vespo": Reduction(None, "global_tokens"),
}
LOSS_TYPES = tuple(GRPO_REDUCTIONS)


def reduction(loss_type: str) -> Reduction:
    if loss_type not in GRPO_REDUCTIONS:
        raise ValueError(f"Unknown loss_type {loss_type!r}; one of {LOSS_TYPES}.")
    return GRPO_REDUCTIONS[loss_type]


def divides_by_local_tokens(loss_type: str) -> bool:
    """Whether GRPOTrainer divides its loss by the micro-batch's own token count (`bnpo`): its GRPO term then counts
    the tokens it saw, not the ones SRPO shares between the branches."""
    return reduction(loss_type).divisor == "local_tokens"


def reduce_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation_steps: float,
    max_completion_length: int,
    global_token_count: torch.Tensor | float,
) -> torch.Tensor:
    """A micro-batch's `(rows, length)` per-token loss, zero off `mask`, reduced as GRPOTrainer reduces its own.

    Args:
        per_token_loss: `(rows, length)`.
        mask: `(rows, length)`, the tokens the loss counts.
        loss_type: a key of `GRPO_REDUCTIONS`.
        accumulation_steps: micro-batches per optimizer step (1 in evaluation): the loss is divided by it, except
            for the "global_tokens" divisor, which already covers the step.
        max_completion_length: the "sequences_x_max_length" divisor's length.
        global_token_count: the "global_tokens" divisor, scaled to one micro-batch of one process
            (`global_token_normaliser`).
    """
    rule = reduction(loss_type)
    mask = mask.to(per_token_loss.dtype)
    summed = (per_token_loss * mask).sum(-1)
    if rule.per_sequence == "mean":
        return (summed / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if rule.per_sequence == "sum":
        return summed.mean() / accumulation_steps
    if rule.divisor == "local_tokens":
        return summed.sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if rule.divisor == "sequences_x_max_length":
        return summed.sum() / (per_token_loss.size(0) * max_completion_length) / accumulation_steps
    return summed.sum() / global_token_count


def global_token_normaliser(
    num_items_in_batch: torch.Tensor, num_processes: int, accumulation_steps: int, steps_per_generation: int
) -> torch.Tensor:
    """GRPOTrainer's "global_tokens" divisor for one micro-batch of one process: the generation batch's valid tokens
    (`num_items_in_batch`, all processes) per process, per micro-batch (`accumulation_steps / steps_per_generation`
    in training; pass `accumulation_steps = steps_per_generation` in evaluation). test_trainer's accumulation test
    guards the match."""
    return num_items_in_batch.clamp(min=1.0) / num_processes * accumulation_steps / steps_per_generation

"""The SRPO math on tensors (method §5-§6): divergences, weights and the two branches' per-token terms.

Shapes: `n` tokens, `k` support size. Everything is a pure function of its inputs; the trainer only gathers the
tensors and calls these. The GRPO branch is GRPOTrainer's own clipped surrogate and is not re-implemented here.
The divergence is TRL SDPO's (`trl.experimental.sdpo.loss_utils`: `compute_divergence`, `add_tail_bucket`), taking the
support's log-probs rather than full logits, which the chunked scoring never holds; tests/unit/test_trl_agreement.py checks
that the two agree.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .vocab import logps_on_support, student_topk_logps


def add_tail_bucket(support_logps: torch.Tensor) -> torch.Tensor:
    """Append `log(1 - Σ_k p)` to true log-probs on a top-k support: a proper distribution over `k + 1` outcomes."""
    # Clamp keeps log(0) out when the support holds (numerically) all the mass.
    captured = torch.logsumexp(support_logps, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([support_logps, torch.log(-torch.expm1(captured))], dim=-1)


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence over the last dimension (method §5).

    `M = (1-α) p + α q`, `D = (1-α) KL(p || M) + α KL(q || M)`. As in the SDPO reference, the end points are
    the plain KLs rather than the (vanishing) limits: `α = 0` gives `KL(q || p)`, `α = 1` gives `KL(p || q)`.
    """
    if alpha == 0.0:
        return F.kl_div(student_logps, teacher_logps, reduction="none", log_target=True).sum(-1)
    if alpha == 1.0:
        return F.kl_div(teacher_logps, student_logps, reduction="none", log_target=True).sum(-1)
    mixture = torch.logaddexp(student_logps + math.log1p(-alpha), teacher_logps + math.log(alpha))
    kl_student = F.kl_div(mixture, student_logps, reduction="none", log_target=True).sum(-1)
    kl_teacher = F.kl_div(mixture, teacher_logps, reduction="none", log_target=True).sum(-1)
    return (1.0 - alpha) * kl_student + alpha * kl_teacher


def topk_distillation_divergence(
    student_support_logps: torch.Tensor, teacher_support_logps: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Per-token divergence on the student's top-k support plus one tail bucket per distribution, `(n, k) -> (n,)`."""
    return generalized_jsd(add_tail_bucket(student_support_logps), add_tail_bucket(teacher_support_logps), alpha)


def clipped_importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, clip: float) -> torch.Tensor:
    """`min(π_θ(y_t) / π_old(y_t), clip)`, detached: it reweights the distillation term, it is not optimised."""
    return torch.exp((logps - old_logps).detach().clamp(-20.0, 20.0)).clamp(max=clip)


def teacher_entropy_weights(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    all_reduce: Callable[[torch.Tensor, str], torch.Tensor] = lambda tensor, op: tensor,
) -> torch.Tensor:
    """Entropy-aware token weights `w_t = |S| exp(-H_t/τ) / Σ_{s∈S} exp(-H_s/τ)` (method §5), zero off `mask`.

    `S` is every masked token on every process: `all_reduce(tensor, op)` with `op` in {"max", "sum"} combines
    the local statistics (identity on one process). The exponent is `-(H_t - H_min)/τ` over the global minimum
    entropy: shifting *before* dividing keeps it finite-or-`-inf` for any positive `τ` (`-H/τ` itself overflows to
    `-inf` at a tiny `τ`, and `-inf - (-inf)` is NaN), so the minimum-entropy tokens always weigh `exp(0) = 1` and
    `τ -> 0` puts all the weight on them, as the limit does.
    """
    mask = mask.bool()
    entropy = entropy.float()
    lowest = -all_reduce(torch.where(mask, -entropy, -torch.inf).max().reshape(1), "max")
    gap = torch.where(mask, entropy - lowest, 0.0)
    # 0/τ is 0 even where τ rounds to 0 in float32 (no 0/0); a positive gap over a tiny τ is +inf, exp(-inf) = 0.
    scaled = torch.where(gap > 0, -gap / temperature, 0.0)
    unnormalised = torch.where(mask, torch.exp(scaled), 0.0)
    totals = all_reduce(torch.stack([unnormalised.sum(), mask.sum().to(unnormalised.dtype)]), "sum")
    return unnormalised * (totals[1] / totals[0].clamp(min=torch.finfo(totals.dtype).tiny))


def mixed_token_advantages(
    advantages: torch.Tensor,
    teacher_token_logps: torch.Tensor,
    old_token_logps: torch.Tensor,
    has_teacher: torch.Tensor,
    mix_lambda: float,
) -> torch.Tensor:
    """`λ A_i + (1-λ) (log q_t(y_t) - log π_old(y_t))` per token, the second term zero without a teacher (§8)."""
    dense = (teacher_token_logps - old_token_logps) * has_teacher.unsqueeze(1)
    return mix_lambda * advantages.unsqueeze(1) + (1.0 - mix_lambda) * dense


def sdpo_token_losses(
    divergence: torch.Tensor, token_weights: torch.Tensor, importance_ratio: torch.Tensor
) -> torch.Tensor:
    """`w_t · IS_t · D_t` per distilled token: the distilled branch's per-token loss, aggregated with GRPO's (method §6, §12)."""
    return token_weights * importance_ratio * divergence


# How GRPOTrainer (TRL 1.16) turns a per-token loss into a micro-batch loss, by `loss_type`: the normaliser is the
# one thing SRPO's two branches must share (method §6, §12).
SEQUENCE_MEAN_LOSS_TYPES = ("grpo", "sapo")  # mean over sequences of each sequence's token mean
SEQUENCE_SUM_LOSS_TYPES = ("luspo",)  # mean over sequences of each sequence's token sum
LOCAL_TOKEN_LOSS_TYPES = ("bnpo",)  # the micro-batch's own token count
CONSTANT_LOSS_TYPES = ("dr_grpo",)  # sequences x max_completion_length
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")  # the generation batch's token count (method §6's N)
LOSS_TYPES = (
    SEQUENCE_MEAN_LOSS_TYPES + SEQUENCE_SUM_LOSS_TYPES + LOCAL_TOKEN_LOSS_TYPES + CONSTANT_LOSS_TYPES
) + GLOBAL_TOKEN_LOSS_TYPES


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    accumulation_steps: float,
    max_completion_length: int,
    global_token_count: torch.Tensor | float,
) -> torch.Tensor:
    """A micro-batch's `(rows, length)` per-token loss, zero off `mask`, reduced as GRPOTrainer reduces its own for
    `loss_type`, divided for gradient accumulation. `global_token_count` is the token-count normaliser of the
    `GLOBAL_TOKEN_LOSS_TYPES`, already scaled to one micro-batch of one process."""
    mask = mask.to(per_token_loss.dtype)
    summed = (per_token_loss * mask).sum(-1)
    if loss_type in SEQUENCE_MEAN_LOSS_TYPES:
        return (summed / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if loss_type in SEQUENCE_SUM_LOSS_TYPES:
        return summed.mean() / accumulation_steps
    if loss_type in LOCAL_TOKEN_LOSS_TYPES:
        return summed.sum() / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type in CONSTANT_LOSS_TYPES:
        return summed.sum() / (per_token_loss.size(0) * max_completion_length) / accumulation_steps
    if loss_type in GLOBAL_TOKEN_LOSS_TYPES:
        return summed.sum() / global_token_count
    raise ValueError(f"Unknown loss_type {loss_type!r}; one of {LOSS_TYPES}.")


def distillation_token_losses(
    student_hidden: torch.Tensor,
    head: torch.nn.Module,
    logits,
    tokens: torch.Tensor,
    teacher,
    teacher_state_index: torch.Tensor,
    token_weights: torch.Tensor,
    old_logps: torch.Tensor | None,
    rollout_ratio: torch.Tensor | None,
    topk: int,
    alpha: float,
    is_clip: float,
) -> torch.Tensor:
    """`w_t · IS_t · D_t` at `n` distilled tokens (method §5), differentiable through the student's final hidden
    states `student_hidden` `(n, hidden)` (its LM `head`, `logits` its `vocab.Logits`, `tokens` the sampled ids).

    The support is the current student's top-k; the teacher's log-probs on it come from its scoring (`teacher`, a
    `teacher_scoring.TeacherStates`, rows `teacher_state_index`). `old_logps`: π_old where GRPOTrainer computed it (the policy
    has moved since sampling), else None (π_old is this policy). `rollout_ratio`: vLLM's rollout importance weight.
    """
    support, support_logps, token_logps = student_topk_logps(
        student_hidden, head.weight, head.bias, logits, tokens, topk
    )
    teacher_support_logps = logps_on_support(
        teacher.hidden[teacher_state_index],
        *teacher.head,
        teacher.logits,
        teacher.log_normalizer[teacher_state_index],
        support,
    )
    divergence = topk_distillation_divergence(support_logps, teacher_support_logps, alpha)
    ratio = clipped_importance_ratio(token_logps, token_logps.detach() if old_logps is None else old_logps, is_clip)
    if rollout_ratio is not None:
        ratio = ratio * rollout_ratio
    return sdpo_token_losses(divergence, token_weights, ratio)

"""SRPO's objective, in one file (method §2, §5, §6): read `LossInputs` and `srpo_loss` first.

One micro-batch's loss is one per-token loss with one normaliser:

    L = reduce( ℓ_GRPO(t) on the GRPO tokens  +  w_t · IS_t · D_t on the distilled tokens )

- *Who goes where* is routing's (`routing.ROUTING_MODES`: under `"srpo"` correct rollouts and failed ones with no
  correct sibling are GRPO's, failed ones with a correct sibling are distilled); the loss sees the two token masks.
- *The GRPO term* `ℓ_GRPO` is GRPOTrainer's own clipped surrogate (with its KL and entropy terms), computed by TRL on
  the GRPO tokens alone and handed in already reduced (`LossInputs.grpo_loss`); it is not re-implemented here.
- *The distillation term* is `w_t · IS_t · D_t` (`distillation_token_losses`): `D_t` the generalised JSD between the
  student and the EMA self-teacher on the student's top-k support plus a tail bucket (`topk_distillation_divergence`),
  `IS_t` the clipped importance ratio (`clipped_importance_ratio`), `w_t` the teacher-entropy weights computed when
  the batch was scored (`teacher_entropy_weights`).
- *The shared normaliser* is GRPOTrainer's for `loss_type` (`compat.grpo_loss.GRPO_REDUCTIONS`, TRL 1.16's table):
  the distillation term is reduced over the whole loss mask exactly as TRL reduces GRPO's, and where TRL divides by
  the tokens it saw (`bnpo`), GRPO's term is rescaled to the tokens both branches share.

The divergence is TRL SDPO's (`trl.experimental.sdpo.loss_utils`: `compute_divergence`, `add_tail_bucket`), taking
the support's log-probs rather than full logits, which the chunked scoring never holds; tests/unit/test_trl_agreement.py
checks that the two agree. `advantage_mix` (method §8) mixes the teacher into the advantages instead
(`mixed_token_advantages`) and has no distillation term.
"""

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .compat import divides_by_local_tokens, reduce_token_loss
from .vocab import Logits, logps_on_support, student_topk_logps


@dataclass
class LossInputs:
    """One micro-batch of SRPO's loss. `rows` completions of `length` tokens; `n` distilled tokens (the True entries
    of `distilled_tokens`, in row-major order); `hidden` the model's width; `vocab` its vocabulary.

    Attributes:
        grpo_loss: `()`, GRPOTrainer's loss on this micro-batch with its loss mask cut to `grpo_tokens`, reduced by
            TRL for `loss_type` (its clipped surrogate and, when set, its KL and entropy terms).
        loss_mask: `(rows, length)` bool, the completion tokens GRPOTrainer's loss counts (tool outputs excluded).
        grpo_tokens: `(rows, length)` bool, the GRPO branch's tokens.
        distilled_tokens: `(rows, length)` bool, the distilled branch's tokens.
        global_token_count: `()`, the "global_tokens" divisor of one micro-batch of one process
            (`compat.global_token_normaliser`); unused by the other loss types.
        teacher: the teacher's states of this generation batch (`teacher_scoring.TeacherStates`: hidden states
            `(m, hidden)`, log-normalisers `(m,)`, LM head, `Logits`), or None: no distillation term.
        teacher_state_index: `(n,)` long, each distilled token's row of `teacher`.
        student_hidden: `(n, hidden)`, the policy's final hidden states predicting the distilled tokens, from
            GRPOTrainer's own forward (differentiable).
        student_head: the policy's LM head (`weight` `(vocab, hidden)`, `bias`).
        student_logits: `vocab.Logits`, how hidden states become the sampling distribution's logits.
        tokens: `(n,)` long, the sampled token ids.
        token_weights: `(n,)`, the entropy weights `w_t` (1 without `dynamic_weighting`).
        old_logps: `(n,)`, π_old of the sampled tokens where GRPOTrainer computed it (the policy has moved since
            sampling), else None: π_old is this policy.
        rollout_ratio: `(n,)`, vLLM's rollout importance weight, or None.
    """

    grpo_loss: torch.Tensor
    loss_mask: torch.Tensor
    grpo_tokens: torch.Tensor
    distilled_tokens: torch.Tensor
    global_token_count: torch.Tensor | float = 1.0
    teacher: object | None = None
    teacher_state_index: torch.Tensor | None = None
    student_hidden: torch.Tensor | None = None
    student_head: torch.nn.Module | None = None
    student_logits: Logits | None = None
    tokens: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    rollout_ratio: torch.Tensor | None = None


def srpo_loss(
    inputs: LossInputs,
    *,
    loss_type: str,
    accumulation_steps: float,
    max_completion_length: int,
    topk: int,
    alpha: float,
    is_clip: float,
    span: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SRPO's loss of one micro-batch and its two terms (method §6).

    Args:
        inputs: the micro-batch (`LossInputs`).
        loss_type: GRPOTrainer's `loss_type`, whose reduction both terms share (`compat.GRPO_REDUCTIONS`).
        accumulation_steps: micro-batches per optimizer step (1 in evaluation).
        max_completion_length: the `dr_grpo` divisor's length.
        topk: the student's support size `k` (`distillation_topk`).
        alpha: the generalised JSD's `α` (`distillation_alpha`).
        is_clip: the importance ratio's clip (`distillation_is_clip`).
        span: `span(name)` times the `distillation` term and, within it, `student_topk`.

    Returns:
        `(loss, {"grpo": ..., "distillation": ...})`: the loss to back-propagate and each term's share of it.
    """
    span = span or (lambda name: nullcontext())
    grpo = inputs.grpo_loss
    if divides_by_local_tokens(loss_type):  # TRL divided by the GRPO tokens it saw; SRPO shares all of them
        grpo = grpo * (inputs.grpo_tokens.sum().clamp(min=1) / inputs.loss_mask.sum().clamp(min=1))
    distillation = torch.zeros((), device=grpo.device)
    if inputs.teacher is not None:
        with span("distillation"):
            token_losses = distillation_token_losses(inputs, topk=topk, alpha=alpha, is_clip=is_clip, span=span)
        per_token = torch.zeros(inputs.loss_mask.shape, dtype=token_losses.dtype, device=token_losses.device)
        distillation = reduce_token_loss(
            per_token.masked_scatter(inputs.distilled_tokens, token_losses),
            inputs.loss_mask,
            loss_type,
            accumulation_steps=accumulation_steps,
            max_completion_length=max_completion_length,
            global_token_count=inputs.global_token_count,
        )
    return grpo + distillation, {"grpo": grpo.detach(), "distillation": distillation.detach()}


def distillation_token_losses(
    inputs: LossInputs, *, topk: int, alpha: float, is_clip: float, span: Callable | None = None
) -> torch.Tensor:
    """`w_t · IS_t · D_t` at the `n` distilled tokens `(n,)` (method §5), differentiable through
    `inputs.student_hidden`. The support is the current student's top-k; the teacher's log-probs on it come from its
    kept states (`inputs.teacher`, rows `inputs.teacher_state_index`)."""
    support, support_logps, token_logps = student_topk_logps(
        inputs.student_hidden,
        inputs.student_head.weight,
        inputs.student_head.bias,
        inputs.student_logits,
        inputs.tokens,
        topk,
        span,
    )
    teacher, index = inputs.teacher, inputs.teacher_state_index
    teacher_support_logps = logps_on_support(
        teacher.hidden[index], *teacher.head, teacher.logits, teacher.log_normalizer[index], support
    )
    divergence = topk_distillation_divergence(support_logps, teacher_support_logps, alpha)
    old_logps = token_logps.detach() if inputs.old_logps is None else inputs.old_logps
    ratio = clipped_importance_ratio(token_logps, old_logps, is_clip)
    if inputs.rollout_ratio is not None:
        ratio = ratio * inputs.rollout_ratio
    return distillation_term(divergence, inputs.token_weights, ratio)


def distillation_term(divergence: torch.Tensor, token_weights: torch.Tensor, importance_ratio: torch.Tensor):
    """`w_t · IS_t · D_t` per distilled token: the distilled branch's per-token loss (method §5, §12)."""
    return token_weights * importance_ratio * divergence


# ---- the building blocks: divergences, weights, ratios, mixed advantages ----


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

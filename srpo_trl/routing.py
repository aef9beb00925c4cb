"""Sample routing (method §2): which rollouts get GRPO's advantage and which get self-distillation.

Everything here works on the *global* generation batch (all processes), in the order GRPOTrainer gathers rewards:
the `num_generations` rollouts of one prompt are contiguous, so groups are rows of a `(num_groups, G)` view.

The routing modes (method §8) are data, `ROUTING_MODES`: what a mode distils, whether the rest gets GRPO's surrogate
and whether the teacher's scores enter the advantages instead. The trainer reads these fields and never a mode's
name; a new routing rule is one more `RoutingMode` (and, if it needs a new kind of decision, a field read in
`route_rollouts`).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingMode:
    """What one value of `SRPOConfig.routing` trains each rollout with.

    Attributes:
        distils_failed: a failed rollout with a correct sibling is distilled (SRPO's rule).
        distils_correct: a correct rollout with another correct sibling is distilled too (SDPO's rule).
        grpo_for_the_rest: every rollout not distilled gets GRPO's surrogate; otherwise it adds no loss.
        teacher_mixes_advantages: the teacher scores every rollout with a correct sibling and its token log-ratio
            enters GRPO's advantages (`advantage_mix`) instead of a distillation term.
        keeps_routed_advantage: `routed_grpo_weight` may give a distilled rollout part of its GRPO advantage.
    """

    distils_failed: bool = False
    distils_correct: bool = False
    grpo_for_the_rest: bool = True
    teacher_mixes_advantages: bool = False
    keeps_routed_advantage: bool = False

    @property
    def distils(self) -> bool:
        """Whether the loss has a distillation term."""
        return self.distils_failed or self.distils_correct

    @property
    def uses_teacher(self) -> bool:
        """Whether a self-teacher is built (without one the trainer is GRPOTrainer)."""
        return self.distils or self.teacher_mixes_advantages


ROUTING_MODES: dict[str, RoutingMode] = {
    "srpo": RoutingMode(distils_failed=True, keeps_routed_advantage=True),
    "grpo": RoutingMode(),
    "sdpo": RoutingMode(distils_failed=True, distils_correct=True, grpo_for_the_rest=False),
    "advantage_mix": RoutingMode(teacher_mixes_advantages=True),
}


def routing_mode(name: str) -> RoutingMode:
    if name not in ROUTING_MODES:
        raise ValueError(f"`routing` must be one of {tuple(ROUTING_MODES)}, got {name!r}.")
    return ROUTING_MODES[name]


# Rewards within this fraction of the threshold's magnitude below it count as reaching it: weights that sum to 1
# (0.35 + 0.45 + 0.2) land at 0.99999994 in float32, and a fully correct rollout must not fail by rounding.
THRESHOLD_RELATIVE_TOLERANCE = 1e-6


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(rollouts, reward functions)` scores, NaN where a function returned `None`, to the one reward per rollout that
    routing (and avg@k) compares with the threshold, summed as GRPOTrainer sums them: NaN scores are skipped, and a
    rollout no function scored is NaN (unscorable: never correct)."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return rewards


def reaches_threshold(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """`rewards >= threshold` up to float rounding (`THRESHOLD_RELATIVE_TOLERANCE`); NaN never reaches it."""
    return rewards >= threshold - THRESHOLD_RELATIVE_TOLERANCE * abs(threshold)


@dataclass
class Routes:
    """Per-rollout routing decisions, all of shape `(N,)` over the global batch.

    Attributes:
        correct: `r_i >= success_reward_threshold` (up to float rounding: `reaches_threshold`).
        teacher_available: some *other* rollout of the group is correct.
        distilled: rows trained by self-distillation (the distilled branch).
        grpo: rows trained by GRPO's surrogate; rows in neither branch (`routing="sdpo"`'s rest) add no loss.
        needs_teacher: rows the self-teacher scores (distilled rows, or every teacher-available row for `advantage_mix`).
        sibling: global index of the rollout whose completion is the demonstration, `-1` where there is none.
        privileged: failed rollouts of an all-failed group distilled from their privileged context alone, without
            a demonstration (`distill_without_sibling`, beyond the paper); None when routing was given no contexts.
        gated: routed rollouts the reliability gate sent back to GRPO's branch after the teacher scored them
            (`gate_unreliable_teachers`, beyond the paper); None without a gate.
    """

    correct: torch.Tensor
    teacher_available: torch.Tensor
    distilled: torch.Tensor
    grpo: torch.Tensor
    needs_teacher: torch.Tensor
    sibling: torch.Tensor
    privileged: torch.Tensor | None = None
    gated: torch.Tensor | None = None

    @property
    def fallback(self) -> torch.Tensor:
        """Failed rollouts of an all-failed group not distilled from a privileged context: they keep GRPO's
        (zero-mean) advantage."""
        fallback = ~self.correct & ~self.teacher_available
        return fallback if self.privileged is None else fallback & ~self.privileged


def first_correct_sibling(correct: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Global index of the first correct rollout in each rollout's group other than itself, or `-1`.

    The reference code's rule (deterministic, group order). A correct rollout's own index is skipped, so it is
    taught by the next correct sibling; a lone correct rollout has none, nor has any rollout of a group of one.
    """
    groups = correct.view(-1, num_generations)
    num_groups = groups.size(0)
    position = torch.arange(num_generations, device=correct.device).expand(num_groups, -1)
    # Rank correct rollouts by position; wrong ones go past the end so they sort last.
    order = torch.where(groups, position, num_generations).sort(dim=1).values
    # A past-the-end column: a group of one has a first correct rollout (maybe itself) but never a second.
    order = torch.cat([order, torch.full_like(order[:, :1], num_generations)], dim=1)
    first, second = order[:, :1], order[:, 1:2]
    sibling = torch.where(position == first, second, first)  # never the rollout itself
    sibling = torch.where(sibling < num_generations, sibling, -1)
    offset = (torch.arange(num_groups, device=correct.device) * num_generations).unsqueeze(1)
    return torch.where(sibling >= 0, sibling + offset, -1).view(-1)


def route_rollouts(
    rewards: torch.Tensor,
    num_generations: int,
    success_reward_threshold: float,
    routing: str = "srpo",
    not_shown: torch.Tensor | None = None,
    privileged: torch.Tensor | None = None,
) -> Routes:
    """Route every rollout of the global batch (method §2 and the modes of §8).

    Args:
        rewards: `(N,)` weighted rewards as GRPOTrainer computes them; NaN marks an unscorable rollout.
        num_generations: group size `G`; `N` must be a multiple of it.
        success_reward_threshold: a rollout is correct iff its reward is at least this.
        routing: a key of `ROUTING_MODES`.
        not_shown: `(N,)` rollouts whose teacher prompt had no room for their sibling's demonstration (or, for a
            privileged one, no room at all): routed as if no sibling were correct (a teacher that never saw a correct
            answer has nothing to teach), though `teacher_available` still counts the sibling.
        privileged: `(N,)` rollouts whose question has a privileged context the teacher may use without a
            demonstration (`distill_without_sibling`): under a mode that distils failed rollouts, a failed one with no
            correct sibling is distilled from it (HDPO's rule, arXiv 2603.23871) instead of falling back to GRPO.
    """
    mode = routing_mode(routing)
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}.")
    correct = reaches_threshold(rewards, success_reward_threshold)
    sibling = first_correct_sibling(correct, num_generations)
    teacher_available = sibling >= 0
    shown = teacher_available if not_shown is None else teacher_available & ~not_shown
    # An unscorable rollout (NaN: no reward function scored it) is neither a demonstration nor distilled; it stays on
    # GRPO's branch, where GRPOTrainer gives it a zero advantage (method §12).
    distillable = shown & ~torch.isnan(rewards)
    distilled = distillable & ((~correct & mode.distils_failed) | (correct & mode.distils_correct))
    from_context = None
    if privileged is not None:
        from_context = privileged & ~teacher_available & ~correct & ~torch.isnan(rewards) & mode.distils_failed
        if not_shown is not None:  # a context-only prompt with no room in the model's context cannot be scored
            from_context = from_context & ~not_shown
        distilled = distilled | from_context
    grpo = ~distilled if mode.grpo_for_the_rest else torch.zeros_like(distilled)
    needs_teacher = distillable if mode.teacher_mixes_advantages else distilled
    sibling = torch.where(needs_teacher, sibling, -1)
    return Routes(correct, teacher_available, distilled, grpo, needs_teacher, sibling, from_context)


def gate_unreliable_teachers(routes: Routes, departure_probs: torch.Tensor, min_prob: float) -> Routes:
    """The reliability gate (`min_teacher_solution_prob`, beyond the paper): a distilled rollout whose teacher gives
    the shown solution's token less than `min_prob` where the rollout first leaves that solution goes back to GRPO's
    branch. Such a teacher did not read the answer it was shown, so its targets there are its own guesses, and the
    rollout's GRPO advantage is the better signal. `departure_probs`: `(N,)`, NaN for a rollout with no departure
    token (it never leaves the solution, or none was shown whole): those keep their route. Only for a mode whose
    other rollouts get GRPO (`SRPOConfig` refuses the gate elsewhere)."""
    gated = routes.distilled & (departure_probs < min_prob)  # NaN compares False: kept
    return dataclasses.replace(routes, distilled=routes.distilled & ~gated, grpo=routes.grpo | gated, gated=gated)


def grpo_advantage_weights(routes: Routes, routed_grpo_weight: float) -> torch.Tensor:
    """The share of its GRPO advantage each rollout trains with: 1 on GRPO's branch, `routed_grpo_weight` for a
    distilled one (0, the paper's: it carries the distillation term alone), 0 for one in no branch."""
    return routes.grpo.float() + routed_grpo_weight * routes.distilled.float()


def route_labels(routes: Routes, num_generations: int) -> tuple[list[str], list[int | None]]:
    """Per rollout, its branch (`"correct"`/`"fallback"`/`"failed"` on GRPO, `"gated"` when the reliability gate sent
    it back to GRPO, `"sdpo"` when distilled: the documented label, or `"unused"` when in no branch) and the position within its group of the sibling the teacher
    was shown (None without one): the columns `log_completions` adds to the completions table."""
    labels = []
    gated = routes.gated if routes.gated is not None else torch.zeros_like(routes.distilled)
    for distilled, grpo, correct, fallback, was_gated in zip(
        routes.distilled.tolist(),
        routes.grpo.tolist(),
        routes.correct.tolist(),
        routes.fallback.tolist(),
        gated.tolist(),
        strict=True,
    ):
        if distilled:
            labels.append("sdpo")
        elif not grpo:
            labels.append("unused")
        else:
            labels.append("gated" if was_gated else "correct" if correct else "fallback" if fallback else "failed")
    siblings = [None if s < 0 else s % num_generations for s in routes.sibling.tolist()]
    return labels, siblings


def siblings_to_share(routes: Routes, num_processes: int) -> list[int]:
    """Global indices of the demonstrations that a process other than their owner needs (the owner of global index
    `i` is process `i // (N / num_processes)`), sorted. Only these cross processes: traffic grows with the routed rows
    whose group straddles processes, not with the global batch. Every process computes the same list (`routes` is
    global), so all of them agree whether an exchange is needed at all."""
    per_process = routes.sibling.numel() // num_processes
    rows = (routes.needs_teacher & (routes.sibling >= 0)).nonzero().squeeze(1)  # privileged rows show none
    siblings = routes.sibling[rows]
    elsewhere = siblings // per_process != rows // per_process
    return sorted(set(siblings[elsewhere].tolist()))


def trained_advantages(advantages: list[float], routes: Routes, routed_grpo_weight: float) -> list[float]:
    """The advantage each rollout's GRPO term trained with, for the completions table: GRPOTrainer's `advantages`
    scaled by `grpo_advantage_weights`, NaN for a rollout with no GRPO term (distilled, or in no branch)."""
    weights = grpo_advantage_weights(routes, routed_grpo_weight).tolist()
    return [advantage * weight if weight else math.nan for advantage, weight in zip(advantages, weights, strict=True)]

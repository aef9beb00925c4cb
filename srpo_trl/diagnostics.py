"""Diagnostics of a run's first batches: pure functions from what was observed to a warning's text, or None.

The trainer gathers the observations and gives the warnings; what is implausible, and why, is decided here."""

import numpy
import torch


def _number(value: float) -> str:
    """A float32 reward as it is, shortest round-trip form (0.99999994 is not 1.0)."""
    return str(numpy.float32(value))


def threshold_misfit(
    rewards: torch.Tensor, correct: torch.Tensor, threshold: float, batches: int, distilled: torch.Tensor | None = None
) -> str | None:
    """Why `success_reward_threshold` does not fit the rewards of the first `batches` generation batches, or None.

    Args:
        rewards: the weighted rewards routing compared, `(N,)` over those batches, NaN where unscorable.
        correct: routing's decision for each (`reaches_threshold`).
        threshold: `success_reward_threshold`.
        batches: how many generation batches `rewards` covers (for the message).
        distilled: which rollouts routing sent to the teacher (default: none). A mode that also distils correct
            rollouts (`routing="sdpo"`) distils when every rollout is correct: no misfit then.

    Three misfits: no rollout correct (nothing is ever distilled: SRPO is GRPO), every rollout correct (nothing is
    distilled), and a threshold on another scale than the rewards: most rollouts count as correct although the
    threshold lies in the lower half of the rewards' scale (from 0, or the lowest reward if negative, to the best)
    and some of the "correct" ones earned less than half way from it to the best reward (partial credit on 0-100
    under the default 1.0). Binary rewards never meet the last: their correct rollouts all earn the best reward.
    """
    scored = rewards[~torch.isnan(rewards)]
    first = f"the first {batches} generation batches"
    if scored.numel():
        low, high = scored.min().item(), scored.max().item()
        seen = f"the weighted rewards compared with it ranged over [{_number(low)}, {_number(high)}]"
    else:
        seen = "no rollout was scored"
    if not correct.any():
        return (
            f"No rollout of {first} reached success_reward_threshold={threshold} ({seen}): "
            "srpo/teacher_available_frac stays 0 and nothing is distilled (routing='srpo' trains as plain GRPO, "
            "routing='sdpo' trains nothing). Set success_reward_threshold to the reward a correct rollout earns."
        )
    if correct.all() and (distilled is None or not distilled.any()):
        return (
            f"Every rollout of {first} reached success_reward_threshold={threshold} ({seen}): "
            "srpo/route/correct_frac stays 1 and nothing is distilled. The threshold applies to the weighted sum "
            "of the reward functions, so with several of them a correct rollout earns more: two 0/1 rewards give "
            f"up to 2.0. Set success_reward_threshold to what only a correct rollout earns (here perhaps "
            f"{_number(high)}), or weight the rewards with reward_weights."
        )
    correct_rewards = rewards[correct]
    fraction = correct_rewards.numel() / scored.numel()
    # The lower half of the rewards' scale, which starts at 0 or below: for a positive threshold, the best reward is
    # more than twice it. Partial credit on [0, 1] under a threshold of 0.5 is a choice, not a misfit.
    floor = min(low, 0.0)
    in_lower_half = threshold - floor < high - threshold
    far_below_best = bool((correct_rewards < (threshold + high) / 2).any())
    if fraction > 0.5 and in_lower_half and far_below_best:
        return (
            f"success_reward_threshold={threshold} looks low for these rewards: {seen}, and {fraction:.0%} of the "
            f"rollouts of {first} reached it and counted as correct, many of them far below the best reward. Correct "
            "rollouts are the teacher's demonstrations and are never distilled, so partial credit is taught as the "
            "answer. Set success_reward_threshold to what only a correct rollout earns (perhaps "
            f"{_number(high)}), or scale the rewards to it."
        )
    return None

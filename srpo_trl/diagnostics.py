"""Diagnostics: pure functions from what a batch showed to the metrics logged or a warning's text (or None).

The trainer gathers the observations, logs the metrics and gives the warnings; what is logged, what is implausible,
and why, is decided here."""

import math
from dataclasses import dataclass, field

import numpy
import torch


def _number(value: float) -> str:
    """A float32 reward as it is, shortest round-trip form (0.99999994 is not 1.0)."""
    return str(numpy.float32(value))


def threshold_misfit(
    rewards: torch.Tensor,
    correct: torch.Tensor,
    threshold: float,
    batches: int,
    distilled: torch.Tensor | None = None,
    complete: bool = True,
) -> str | None:
    """Why `success_reward_threshold` does not fit the rewards of the first `batches` generation batches, or None.

    Args:
        rewards: the weighted rewards routing compared, `(N,)` over those batches, NaN where unscorable.
        correct: routing's decision for each (`reaches_threshold`).
        threshold: `success_reward_threshold`.
        batches: how many generation batches `rewards` covers (for the message).
        distilled: which rollouts routing sent to the teacher (default: none). A mode that also distils correct
            rollouts (`routing="sdpo"`) distils when every rollout is correct: no misfit then.
        complete: the watched batches are all in. Before, only the last misfit is looked for (it shows at once).

    Three misfits: no rollout correct (nothing distilled yet: SRPO is GRPO; either the model solves none of these
    prompts yet, which is no misfit, or correct rollouts earn less than the threshold: the message names both), every
    rollout correct (nothing is distilled), and a threshold on another scale than the rewards: rollouts count as
    correct although the threshold lies in the lower half of the rewards' scale (from 0, or the lowest reward if
    negative, to the best) and some of the "correct" ones earned less than half way from it to the best reward
    (partial credit on 0-10 or 0-100 under the default 1.0), however few. Binary rewards never meet the last: their
    correct rollouts all earn the best reward.
    """
    scored = rewards[~torch.isnan(rewards)]
    first = f"the first {batches} generation batches"
    if scored.numel():
        low, high = scored.min().item(), scored.max().item()
        seen = f"the weighted rewards compared with it ranged over [{_number(low)}, {_number(high)}]"
    else:
        seen = "no rollout was scored"
    if not correct.any():
        if not complete:
            return None
        return (
            f"No rollout of {first} reached success_reward_threshold={threshold} ({seen}): "
            "srpo/teacher_available_frac stays 0 and nothing is distilled yet (routing='srpo' trains as plain GRPO, "
            "routing='sdpo' trains nothing). Two causes: the model solves none of these prompts yet (then nothing is "
            "wrong: SRPO trains as GRPO until a rollout is correct, and routes from the first one; a stronger or "
            "pre-trained model, or easier prompts, get there sooner), or a correct rollout earns less than the "
            "threshold (a reward on another scale, weights): then set success_reward_threshold to the reward a "
            "correct rollout earns."
        )
    if complete and correct.all() and (distilled is None or not distilled.any()):
        return (
            f"Every rollout of {first} reached success_reward_threshold={threshold} ({seen}): "
            "srpo/route/correct_frac stays 1 and nothing is distilled. The threshold applies to the weighted sum "
            "of the reward functions, so with several of them a correct rollout earns more: two 0/1 rewards give "
            f"up to 2.0. Set success_reward_threshold to what only a correct rollout earns (here perhaps "
            f"{_number(high)}), or weight the rewards with reward_weights."
        )
    correct_rewards = rewards[correct]
    fraction = correct_rewards.numel() / scored.numel()
    first = f"the first {batches} generation batches" if complete else "the first generation batches"
    # The lower half of the rewards' scale, which starts at 0 or below: for a positive threshold, the best reward is
    # more than twice it. Partial credit on [0, 1] under a threshold of 0.5 is a choice, not a misfit.
    floor = min(low, 0.0)
    in_lower_half = threshold - floor < high - threshold
    far_below_best = bool((correct_rewards < (threshold + high) / 2).any())
    if in_lower_half and far_below_best:
        return (
            f"success_reward_threshold={threshold} looks low for these rewards: {seen}, and {fraction:.0%} of the "
            f"rollouts of {first} reached it and counted as correct, some of them far below the best reward. Correct "
            "rollouts are the teacher's demonstrations and are never distilled, so partial credit is taught as the "
            "answer. Set success_reward_threshold to what only a correct rollout earns (perhaps "
            f"{_number(high)}), or scale the rewards to it."
        )
    return None


def routing_metrics(
    routes,
    mask: torch.Tensor,
    scores,
    *,
    weights: torch.Tensor,
    truncated: torch.Tensor,
    local: slice,
    all_reduce,
) -> dict[str, float]:
    """The routing metrics of one generation batch (method §9), in two collectives. Statistics of the teacher's rows
    and tokens are left out of batches without any (no `None` in the logs).

    Args:
        routes: the global `routing.Routes`.
        mask: `(rows, length)` bool, this process's loss tokens.
        scores: the teacher's `teacher_scoring.TeacherScores` of them.
        weights: `(rows, length)`, the entropy weights.
        truncated: `(rows,)` bool, the routed rows whose demonstration was cut.
        local: this process's rows of the global batch.
        all_reduce: `all_reduce(tensor, op)`, a sum or an elementwise max over the processes.

    `srpo/teacher_rejects_sampled_frac` is the share of distilled tokens to which the teacher gives less than half its
    probability: where the distillation moves the student off what it sampled (for a teacher as confident as the
    paper's, about where its top-1 differs from the sampled token); elsewhere it mostly sharpens what the student does.

    `srpo/teacher_solution_prob` is the teacher's mean probability of the demonstrated solution's token where a
    routed rollout first departs from it (`solution_logps`, NaN elsewhere): how much the teacher still uses the
    answer it was shown (a teacher reliability signal).
    """
    entropy, teacher_token_logps, solution_logps = scores.entropy, scores.token_logps, scores.solution_logps
    departures = mask & ~solution_logps.isnan() if solution_logps is not None else torch.zeros_like(mask)
    solution_probs = solution_logps.nan_to_num().exp() * departures if solution_logps is not None else departures
    distilled_tokens = mask & routes.distilled[local].unsqueeze(1)
    teacher_tokens = mask & routes.needs_teacher[local].unsqueeze(1)
    rejected = distilled_tokens & (teacher_token_logps < math.log(0.5))
    sums = all_reduce(
        torch.stack(
            [
                distilled_tokens.sum(),
                mask.sum(),
                (entropy * teacher_tokens).sum(),
                teacher_tokens.sum(),
                truncated.sum(),
                rejected.sum(),
                departures.sum(),
                solution_probs.sum(),
            ]
        ).float(),
        "sum",
    ).tolist()
    distilled, token_count, entropy_sum, teacher_count, truncated_count, rejected_count, departed, solution_sum = sums
    selected = weights[distilled_tokens].float()
    none = torch.tensor(-math.inf, device=weights.device)
    extremes = torch.stack(
        [
            -selected.min() if selected.numel() else none,
            selected.max() if selected.numel() else none,
            torch.tensor(float(scores.seconds), device=weights.device),
        ]
    )
    negative_min_weight, max_weight, most_seconds = all_reduce(extremes, "max").tolist()
    metrics = {
        "srpo/route/sdpo_frac": routes.distilled.float().mean().item(),
        "srpo/route/correct_frac": routes.correct.float().mean().item(),
        "srpo/route/fallback_frac": routes.fallback.float().mean().item(),
        "srpo/teacher_available_frac": routes.teacher_available.float().mean().item(),
        "srpo/sdpo_token_frac": distilled / max(token_count, 1.0),
        "srpo/time/teacher_s": most_seconds,
    }
    if departed:
        metrics["srpo/teacher_solution_prob"] = solution_sum / departed
    if routes.privileged is not None:
        metrics["srpo/route/privileged_frac"] = routes.privileged.float().mean().item()
    if routes.gated is not None:
        metrics["srpo/route/gated_frac"] = routes.gated.float().mean().item()
    if teacher_count:
        metrics["srpo/teacher_entropy/mean"] = entropy_sum / teacher_count
    teacher_rows = routes.needs_teacher.sum().item()
    if teacher_rows:
        metrics["srpo/teacher_prompt_truncated_frac"] = truncated_count / teacher_rows
    if distilled:
        metrics["srpo/weight/min"] = -negative_min_weight
        metrics["srpo/weight/max"] = max_weight
        metrics["srpo/teacher_rejects_sampled_frac"] = rejected_count / distilled
    return metrics


def no_demonstration_room(
    prompt_length: int, budget: int, max_teacher_prompt_length: int, context: int | None, crowded_by=()
) -> tuple[str, str]:
    """The warning (its key, to give it once, and its text) for a teacher prompt that leaves no room for the
    demonstration within `budget` tokens: the setting's or, below it, the model's context minus the completions'.
    `crowded_by`: what else the prompt carries that is never cut (the privileged context, feedback): named as a
    cause, and its shortening as a fix."""
    uncut = ", ".join(["its question", "system turns", *crowded_by]) + " and closing instruction are never cut"
    shorten = "shorter prompts" + "".join(f" or a shorter {part}" for part in crowded_by)
    consequence = (
        "Such rollouts are trained as if no sibling were correct (by GRPO under routing='srpo'), not distilled by "
        "a teacher that never saw the correct answer (counted in srpo/teacher_prompt_dropped_frac)."
    )
    if budget < max_teacher_prompt_length:
        return "no_context_room", (
            f"The model's context ({context} positions) minus this batch's completions ({context - budget} tokens) "
            f"leaves {budget} tokens for the teacher prompt, which takes {prompt_length} tokens without its "
            f"demonstration ({uncut}). {consequence} Use a model with a longer context, a shorter "
            f"max_completion_length, or {shorten}."
        )
    return "no_demonstration_room", (
        f"max_teacher_prompt_length={max_teacher_prompt_length} leaves no room for the demonstration: a teacher "
        f"prompt takes {prompt_length} tokens without it ({uncut}). {consequence} Raise max_teacher_prompt_length "
        f"above {prompt_length} by a demonstration's length, or use {shorten}."
    )


def credit_misfit(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    rewards: torch.Tensor,
    correct: torch.Tensor,
    names: list[str],
    threshold: float,
) -> str | None:
    """Rollouts counted as correct although a reward function gave them its lowest score (of those seen, among
    scores that vary), or None: "correct" on a format reward, or on another function's partial credit, alone. Such
    rollouts are shown to the teacher as solutions. Only the main rewards count: those of the widest weighted range
    (a right answer without the format bonus, weighted 0.2, is correct); functions of weight <= 0 (penalties) never. `rewards`: the
    weighted sums routing compared, for the message. Every rollout correct is `threshold_misfit`'s to report."""
    if correct.all():
        return None
    spans = {}  # each function's weighted range: the widest is the main reward (correctness beside a format bonus)
    for column in range(len(names)):
        scores = rewards_per_func[:, column][~torch.isnan(rewards_per_func[:, column])]
        if weights[column] > 0 and scores.numel():
            spans[column] = (scores.min().item(), scores.max().item())
    widest = max((float(weights[c]) * (high - low) for c, (low, high) in spans.items()), default=0.0)
    for column, (low, high) in spans.items():
        name, scores = names[column], rewards_per_func[:, column]
        at_lowest = correct & (scores == low)
        if low < high and float(weights[column]) * (high - low) >= widest and at_lowest.any():
            weighted = rewards[~torch.isnan(rewards)]
            top = _number(weighted.max().item())
            return (
                f"{int(at_lowest.sum())} of the {int(correct.sum())} rollouts counted as correct (weighted reward >= "
                f"success_reward_threshold={threshold}; the weighted rewards ranged over "
                f"[{_number(weighted.min().item())}, {top}]) got the lowest score of the reward function '{name}' "
                f"({_number(low)}; its scores ranged over [{_number(low)}, {_number(high)}]): they reached the "
                "threshold on the other functions alone (a format reward, partial credit), and the teacher is shown "
                f"them as solutions. The threshold applies to the weighted sum of the reward functions (here up to "
                f"{top}): set success_reward_threshold to what only a correct rollout earns, or weight the rewards "
                "with reward_weights."
            )
    return None


@dataclass
class RoutingWatch:
    """The first `batches` training generation batches' routing, checked against the threshold: a threshold below
    partial credit (`credit_misfit`, `threshold_misfit`'s scale check) at each batch, as soon as it shows, and the
    rest (`threshold_misfit`) once the watch is complete. `observe` returns the warning (one per run) or None."""

    threshold: float
    batches: int = 5
    rewards: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)
    distilled: list[torch.Tensor] = field(default_factory=list)
    per_function: list[torch.Tensor] = field(default_factory=list)
    warned: bool = False

    def observe(
        self,
        routes,
        rewards: torch.Tensor,
        rewards_per_func: torch.Tensor | None = None,
        weights=None,
        names=(),
        batches_before: int = 0,
    ) -> str | None:
        """Keep one training generation batch; a misfit's message once one shows. `batches_before`: the training
        batches of the run before this process started (a resume): past `batches`, they were checked."""
        if len(self.rewards) >= self.batches or self.warned or (not self.rewards and batches_before >= self.batches):
            return None  # checked once
        self.rewards.append(rewards.detach().cpu())
        self.correct.append(routes.correct.cpu())
        self.distilled.append(routes.distilled.cpu())
        complete = len(self.rewards) == self.batches
        correct = torch.cat(self.correct)
        message = None
        if rewards_per_func is not None:
            self.per_function.append(rewards_per_func.detach().float().cpu())
            per_function, weights = torch.cat(self.per_function), torch.as_tensor(weights).cpu()
            message = credit_misfit(
                per_function, weights, torch.cat(self.rewards), correct, list(names), self.threshold
            )
        message = message or threshold_misfit(
            torch.cat(self.rewards), correct, self.threshold, len(self.rewards), torch.cat(self.distilled), complete
        )
        self.warned = message is not None
        return message


# Set by a launcher that started several processes: torchrun and Accelerate's GPU/DeepSpeed/FSDP launchers
# (WORLD_SIZE), mpirun (Open MPI, MPICH/Intel MPI, MVAPICH).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def one_process_of_several(env: dict, num_processes: int) -> str | None:
    """A warning when `accelerate launch` was asked for several processes and started one: its CPU launcher
    (`--cpu --num_processes 2`, or a MULTI_CPU config) starts them only through mpirun, and otherwise runs the script
    once, with `MASTER_ADDR` set (for more than one process) but no world size."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env
    several_asked = "MASTER_ADDR" in env and not any(name in env for name in _WORLD_SIZE_VARIABLES)
    if num_processes != 1 or not (launched_by_accelerate and several_asked):
        return None
    return (
        "accelerate launch was asked for several processes but started one: on CPU (--cpu --num_processes N, or a "
        "MULTI_CPU config) Accelerate starts several only through mpirun. This run trains on 1 process. For 2 CPU "
        "processes: torchrun --standalone --nproc_per_node=2 your_script.py (SRPOConfig(use_cpu=True, "
        "ddp_backend='gloo'); the CLI: torchrun --standalone --nproc_per_node=2 -m srpo_trl.train ... --ddp_backend "
        "gloo), or DeepSpeed: DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero2.yaml "
        "your_script.py."
    )

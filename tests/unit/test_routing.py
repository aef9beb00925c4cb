import itertools
import math

import pytest
import torch

from srpo_trl.routing import (
    ROUTING_MODES,
    first_correct_sibling,
    gate_unreliable_teachers,
    grpo_advantage_weights,
    route_labels,
    route_rollouts,
    siblings_to_share,
    weighted_rewards,
)


def brute_force_routes(rewards, group_size, threshold, routing):
    """method §2, §8 and §12, one rollout at a time."""
    rewards = rewards.tolist()
    out = {"correct": [], "available": [], "sdpo": [], "grpo": [], "teacher": [], "sibling": []}
    for i, reward in enumerate(rewards):
        group = range(i - i % group_size, i - i % group_size + group_size)
        correct = reward >= threshold
        siblings = [j for j in group if j != i and rewards[j] >= threshold]
        available = bool(siblings)
        distillable = available and not math.isnan(reward)  # an unscorable rollout is never distilled
        sdpo = {"srpo": (not correct) and distillable, "sdpo": distillable}.get(routing, False)
        teacher = distillable if routing == "advantage_mix" else sdpo
        out["correct"].append(correct)
        out["available"].append(available)
        out["sdpo"].append(sdpo)
        out["grpo"].append(routing != "sdpo" and not sdpo)
        out["teacher"].append(teacher)
        out["sibling"].append(siblings[0] if teacher else -1)
    return out


@pytest.mark.parametrize("routing", ROUTING_MODES)
@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_routes_match_brute_force_on_every_pattern(routing, group_size):
    # Every correct/failed pattern of two groups, plus NaN (unscorable) and partial rewards.
    for pattern in itertools.product([0.0, 1.0, 0.5, float("nan")], repeat=group_size):
        rewards = torch.tensor(list(pattern) + list(reversed(pattern)))
        routes = route_rollouts(rewards, group_size, 1.0, routing)
        expected = brute_force_routes(rewards, group_size, 1.0, routing)
        assert routes.correct.tolist() == expected["correct"]
        assert routes.teacher_available.tolist() == expected["available"]
        assert routes.distilled.tolist() == expected["sdpo"]
        assert routes.grpo.tolist() == expected["grpo"]
        assert routes.needs_teacher.tolist() == expected["teacher"]
        assert routes.sibling.tolist() == expected["sibling"]


def test_degenerate_groups():
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0])
    routes = route_rollouts(rewards, 4, 1.0)
    assert routes.distilled.tolist() == [False] * 4 + [False] * 4 + [True, False, True, True]
    assert routes.fallback.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert routes.sibling.tolist() == [-1] * 8 + [9, -1, 9, 9]
    # the only correct rollout has no teacher: it never teaches itself
    assert not routes.teacher_available[9]


def test_sibling_is_first_correct_other_rollout():
    correct = torch.tensor([False, True, False, True, True, False])
    assert first_correct_sibling(correct, 6).tolist() == [1, 3, 1, 1, 1, 1]


def test_a_group_of_one_has_no_sibling():
    # num_generations_eval=1: a correct rollout must not teach itself.
    correct = torch.tensor([True, False, True])
    assert first_correct_sibling(correct, 1).tolist() == [-1, -1, -1]
    for routing in ROUTING_MODES:
        routes = route_rollouts(torch.tensor([1.0, 0.0, 1.0]), 1, 1.0, routing)
        assert not routes.teacher_available.any() and not routes.needs_teacher.any() and not routes.distilled.any()


def test_rewards_that_reach_the_threshold_up_to_rounding_count_as_correct():
    # reward_weights [0.35, 0.45, 0.2] of three rewards of 1 sum to 0.99999994 in float32.
    weighted = (torch.ones(1, 3) * torch.tensor([0.35, 0.45, 0.2])).sum(dim=1)
    assert weighted.item() < 1.0
    rewards = torch.cat([weighted, torch.tensor([0.999, 0.0, 0.65])])
    assert route_rollouts(rewards, 4, 1.0).correct.tolist() == [True, False, False, False]
    assert route_rollouts(torch.tensor([-2.0000001, -2.1]), 2, -2.0).correct.tolist() == [True, False]
    assert route_rollouts(torch.tensor([0.0, -1e-9]), 2, 0.0).correct.tolist() == [True, False]


def test_threshold_and_bad_shapes():
    rewards = torch.tensor([0.7, 0.2, 0.9, 0.1])
    assert route_rollouts(rewards, 2, 0.5).correct.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="num_generations=3"):
        route_rollouts(rewards, 3, 1.0)
    with pytest.raises(ValueError, match="routing"):
        route_rollouts(rewards, 2, 1.0, "bogus")


def test_route_labels_for_the_completions_table():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    labels, siblings = route_labels(route_rollouts(rewards, 4, 1.0), 4)
    assert labels == ["correct", "sdpo", "sdpo", "sdpo", "sdpo", "sdpo", "correct", "correct"] + ["fallback"] * 4
    assert siblings == [None, 0, 0, 0, 2, 2, None, None] + [None] * 4
    labels, siblings = route_labels(route_rollouts(rewards, 4, 1.0, "sdpo"), 4)
    assert labels == ["unused"] + ["sdpo"] * 7 + ["unused"] * 4
    assert siblings == [None, 0, 0, 0, 2, 2, 3, 2] + [None] * 4
    labels, _ = route_labels(route_rollouts(rewards, 4, 1.0, "advantage_mix"), 4)
    assert (
        labels
        == ["correct", "failed", "failed", "failed", "failed", "failed", "correct", "correct"] + ["fallback"] * 4
    )


def test_reliability_gate_sends_rollouts_whose_teacher_ignores_the_solution_back_to_grpo():
    routes = route_rollouts(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), 4, 1.0)  # rows 1-3 distilled, 4-7 fall back
    # The teacher's probability of the solution's token where each rollout leaves it; NaN: no such token.
    probs = torch.tensor([math.nan, 0.9, 0.2, math.nan, 0.1, 0.1, 0.1, 0.1])
    gated = gate_unreliable_teachers(routes, probs, 0.5)
    assert gated.gated.tolist() == [False, False, True, False, False, False, False, False]
    assert gated.distilled.tolist() == [False, True, False, True, False, False, False, False]
    assert gated.grpo.tolist() == [True, False, True, False, True, True, True, True]
    assert gated.needs_teacher.tolist() == routes.needs_teacher.tolist()  # the teacher did score it
    assert grpo_advantage_weights(gated, 0.0).tolist() == [1, 0, 1, 0, 1, 1, 1, 1]  # its whole advantage
    assert route_labels(gated, 4)[0][:4] == ["correct", "sdpo", "gated", "sdpo"]
    assert not gate_unreliable_teachers(routes, probs, 0.0).gated.any()  # 0: no gate
    assert gate_unreliable_teachers(routes, probs, 1.0).distilled.tolist() == [False, False, False, True] + [False] * 4


def test_only_siblings_needed_on_another_process_are_shared():
    # 2 processes x 8 rollouts: groups of 8 (each on one process) or one group of 16 over both
    rewards = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float)
    within = route_rollouts(rewards, 8, 1.0)  # groups [0:8] and [8:16], each within one process
    assert siblings_to_share(within, 2) == []
    across = route_rollouts(rewards, 16, 1.0)  # one group over both processes: its first correct rollout is row 1
    assert siblings_to_share(across, 2) == [1]  # process 1's failures need row 1; process 0 has it
    assert siblings_to_share(across, 1) == []
    # routing="sdpo" distils correct rows too: row 1 is taught by row 4 (its own process), the rest by row 1
    assert siblings_to_share(route_rollouts(rewards, 16, 1.0, "sdpo"), 2) == [1]


def test_weighted_rewards_skip_unscored_functions_and_leave_unscorable_rollouts_nan():
    # The trainer routes on these rewards and avg@k counts them: one function, so the two cannot drift apart.
    nan = math.nan
    scores = torch.tensor([[1.0, 0.5], [nan, 0.5], [nan, nan], [0.0, 0.0]])
    rewards = weighted_rewards(scores, torch.tensor([2.0, 1.0]))
    assert rewards[:2].tolist() == [2.5, 0.5] and math.isnan(rewards[2]) and rewards[3] == 0.0
    assert not route_rollouts(torch.tensor([nan, 1.0]), 2, 1.0, "srpo").distilled.any()  # unscorable: never distilled

import math

import torch

from srpo_trl.diagnostics import credit_misfit, threshold_misfit
from srpo_trl.routing import reaches_threshold


def misfit(rewards, threshold=1.0, complete=True):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return threshold_misfit(rewards, reaches_threshold(rewards, threshold), threshold, 5, complete=complete)


def test_binary_rewards_and_fitting_thresholds_are_fine():
    assert misfit([0.0, 1.0, 1.0, 0.0]) is None
    assert misfit([0.0, 1.0, 1.0, 1.0], threshold=0.3) is None  # any threshold in (0, 1] is the same for 0/1
    assert misfit([0.0, 1.0, 2.0, 2.0, 1.0], threshold=2.0) is None  # two 0/1 rewards, both needed
    assert misfit([0.2, 0.6, 0.9, 0.7], threshold=0.5) is None  # partial credit, threshold mid-range
    assert misfit([-1.0, 0.0, 0.0, -1.0], threshold=0.0) is None
    assert misfit([0.0, 30.0, 100.0, 100.0, 100.0, 10.0], threshold=100.0) is None


def test_a_threshold_on_another_scale_than_the_rewards():
    # Partial credit on 0-100 under the default 1.0: most rollouts count as correct.
    message = misfit([0.0, 12.0, 40.0, 100.0, 73.0, 0.0, 55.0, 88.0])
    assert "success_reward_threshold=1.0 looks low" in message
    assert "[0.0, 100.0]" in message and "75%" in message and "perhaps 100.0" in message
    # Three 0/1 rewards summed, threshold 1: "correct" with one of three.
    assert "looks low" in misfit([0.0, 1.0, 1.0, 2.0, 3.0, 1.0])


def test_nothing_or_everything_correct():
    assert "No rollout of the first 5 generation batches reached success_reward_threshold=1.0" in misfit([0.0, 0.5])
    assert "no rollout was scored" in misfit([math.nan, math.nan])
    assert "Every rollout" in misfit([1.0, 2.0, 2.0])


def test_the_message_shows_the_values_compared():
    # 0.99999994 (weights summing to 1 in float32) reaches 1.0 up to rounding; 0.9999 does not, and is printed as is
    assert misfit([0.99999994, 0.99999994]).startswith("Every rollout")
    message = misfit([0.65, 0.9999])
    assert "No rollout" in message and "[0.65, 0.9999]" in message


def test_every_rollout_correct_is_no_misfit_where_correct_rollouts_are_distilled():
    rewards = torch.ones(8)
    correct = reaches_threshold(rewards, 1.0)
    assert "nothing is distilled" in threshold_misfit(rewards, correct, 1.0, 5, distilled=torch.zeros(8, dtype=bool))
    assert threshold_misfit(rewards, correct, 1.0, 5, distilled=torch.ones(8, dtype=bool)) is None  # routing="sdpo"


def test_correct_on_a_format_reward_alone_is_named():
    # Before: 3-28 % of rollouts "correct" on format or partial credit alone, and no warning (most were not correct).
    correctness = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    formatted = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    per_function = torch.stack([correctness, formatted], dim=1)
    rewards = per_function.sum(1)
    correct = reaches_threshold(rewards, 1.0)
    message = credit_misfit(per_function, torch.ones(2), rewards, correct, ["correctness", "format"], 1.0)
    assert "1 of the 3 rollouts counted as correct" in message and "'correctness' (0.0" in message
    assert "[0.0, 2.0]" in message and "weighted sum of the reward functions (here up to 2.0)" in message
    weighted = torch.tensor([1.0, 0.2])  # the README's weights, threshold 1.0: only right answers count
    rewards = (per_function * weighted).sum(1)
    correct = reaches_threshold(rewards, 1.0)
    assert credit_misfit(per_function, weighted, rewards, correct, ["correctness", "format"], 1.0) is None
    penalty = torch.tensor([1.0, -0.5])  # a function of negative weight is a penalty: its lowest is no credit
    assert credit_misfit(per_function, penalty, rewards, correct, ["correctness", "length"], 1.0) is None


def test_graded_credit_below_the_best_warns_however_few_reach_the_threshold():
    # A 0-10 graded reward under the default threshold: 2 of 8 "correct", at 1 and 2 of 10.
    message = misfit([0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 10.0], complete=False)
    assert "success_reward_threshold=1.0 looks low" in message and "38%" in message


def test_nothing_correct_names_a_model_that_solves_nothing_yet():
    # Before: the message blamed the threshold alone, though a weak model that solves nothing yet is the usual cause.
    message = misfit([0.0, 0.2, 0.7, 0.0])
    assert "the model solves none of these prompts yet" in message and "SRPO trains as GRPO until a rollout" in message
    assert misfit([0.0, 0.2], complete=False) is None, "only once the watch is complete"

import math

import torch

from srpo_trl.diagnostics import threshold_misfit
from srpo_trl.routing import reaches_threshold


def misfit(rewards, threshold=1.0):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return threshold_misfit(rewards, reaches_threshold(rewards, threshold), threshold, 5)


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

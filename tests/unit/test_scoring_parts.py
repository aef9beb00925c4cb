"""The teacher's scoring in its three parts, each on its own: the plan of passes, and the statistics spread over the
batch's tokens (the passes themselves run models: tests/trainer/test_teacher_scoring.py)."""

import math

import pytest
import torch

from srpo_trl.teacher_scoring import TeacherScores, per_token_scores, plan_teacher_passes


def test_plan_shares_each_distinct_prompt_and_counts_its_passes():
    prompts = [[1, 2], [3], [1, 2], [4, 5], [3], [1, 2]]
    plan = plan_teacher_passes(prompts, rows_per_pass=2, continues_prefixes=True)
    assert plan.prefixes == [[1, 2], [3], [4, 5]] and plan.prefix_of_row == [0, 1, 0, 2, 1, 0]
    assert plan.batches == [([0, 1], [[0, 1], [2, 4], [5]]), ([2], [[3]])]
    assert plan.pass_count == 2 + 4  # one pass per batch of prompts, one per chunk of rows
    whole = plan_teacher_passes(prompts, rows_per_pass=2, continues_prefixes=False)
    assert whole.batches == plan.batches and whole.pass_count == 4  # prompts scored with their rows
    assert plan_teacher_passes([], rows_per_pass=2, continues_prefixes=True).pass_count == 0


def test_statistics_land_on_their_tokens():
    state_index = torch.tensor([[-1, -1, -1], [1, 0, -1]], dtype=torch.int32)
    statistics = (torch.zeros(2), torch.tensor([-0.5, -2.0]), torch.tensor([0.25, 1.5]))
    token_logps, entropy, solution_logps = per_token_scores(state_index, statistics, None)
    assert token_logps.tolist() == [[0.0, 0.0, 0.0], [-2.0, -0.5, 0.0]]
    assert entropy.tolist() == [[0.0, 0.0, 0.0], [1.5, 0.25, 0.0]]
    assert solution_logps is None


def test_solution_statistics_are_nan_where_no_solution_token_was_asked():
    state_index = torch.tensor([[0, 1, -1]], dtype=torch.int32)
    solution_tokens = torch.tensor([[7, -1, -1]])
    statistics = (torch.zeros(2), torch.tensor([[-0.5, -3.0], [-1.0, -4.0]]), torch.tensor([0.25, 1.5]))
    token_logps, _, solution_logps = per_token_scores(state_index, statistics, solution_tokens)
    assert token_logps.tolist() == [[-0.5, -1.0, 0.0]]
    assert solution_logps[0, 0].item() == -3.0 and all(math.isnan(x) for x in solution_logps[0, 1:].tolist())


def test_no_pass_gives_zero_scores():
    state_index = torch.full((2, 3), -1, dtype=torch.int32)
    token_logps, entropy, solution_logps = per_token_scores(state_index, None, torch.full((2, 3), -1))
    assert not token_logps.any() and not entropy.any() and solution_logps.isnan().all()


def test_departure_probability_is_per_row_and_nan_without_a_departure_token():
    nan = math.nan
    solution_logps = torch.tensor([[nan, math.log(0.25), nan], [nan, nan, nan], [math.log(0.5), nan, nan]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, True, True]])  # row 2's token is masked
    scores = TeacherScores(None, torch.zeros(3, 3), torch.zeros(3, 3), 0.0, None, solution_logps)
    probs = scores.departure_solution_probs(mask)
    assert probs[0].item() == pytest.approx(0.25) and math.isnan(probs[1]) and math.isnan(probs[2])
    without_solutions = TeacherScores(None, torch.zeros(3, 3), torch.zeros(3, 3), 0.0, None)
    assert without_solutions.departure_solution_probs(mask).isnan().all()

"""Each refusal of checks.py on its own: None when the input is fine, else a message naming the field and the fix."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from srpo_trl import checks


def fsdp_args(**kwargs):
    return SimpleNamespace(**{"fsdp": "", "fsdp_config": None, "routing": "srpo", **kwargs})


def test_fsdp_version_and_the_fsdp1_refusal(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    assert checks.fsdp_version(fsdp_args()) is None and checks.fsdp1_problem(fsdp_args()) is None
    assert checks.fsdp_version(fsdp_args(fsdp="full_shard")) == 2
    fsdp1 = fsdp_args(fsdp="full_shard", fsdp_config={"version": 1})
    assert "fsdp_version: 2" in checks.fsdp1_problem(fsdp1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert checks.fsdp_version(fsdp_args()) == 1


@pytest.mark.parametrize(
    ("loss_type", "entropy_bonus", "aux_loss", "zero", "expected"),
    [
        ("dapo", True, True, None, None),  # a global token count: the extra terms are not rescaled
        ("bnpo", False, False, None, None),
        ("bnpo", True, False, None, "entropy bonus"),
        ("bnpo", False, True, None, "load-balancing"),
        ("dapo", False, False, {"zero_hpz_partition_size": 2}, "zero_hpz_partition_size"),
    ],
)
def test_inexact_setups_are_refused(loss_type, entropy_bonus, aux_loss, zero, expected):
    problem = checks.inexact_setup_problem("srpo", loss_type, entropy_bonus, aux_loss, zero)
    assert problem is None if expected is None else expected in problem


def test_teacher_setup_checks_topk_then_the_setup():
    args = SimpleNamespace(distillation_topk=10, routing="srpo")
    assert checks.teacher_setup_problem(args, 10, "dapo", False, False, None) is None
    assert "distillation_topk <= 9" in checks.teacher_setup_problem(args, 9, "dapo", False, False, None)
    assert "entropy bonus" in checks.teacher_setup_problem(args, 10, "bnpo", True, False, None)


def test_teacher_context_warning():
    assert checks.teacher_context_warning(100, None, 10) is None
    assert checks.teacher_context_warning(100, 100, 10) is None
    assert "max_teacher_prompt_length <= 90" in checks.teacher_context_warning(200, 100, 10)


def test_dataset_problems_name_the_dataset_and_the_fix():
    good = Dataset.from_dict({"prompt": [[{"role": "user", "content": "2+2?"}]]})
    assert checks.datasets_problem(good, {"a": good}, teacher=True) is None
    no_prompt = Dataset.from_dict({"question": ["2+2?"]})
    assert "rename_column" in checks.datasets_problem(good, {"a": no_prompt}, teacher=True)
    assert "eval_dataset['a']" in checks.datasets_problem(good, {"a": no_prompt}, teacher=True)
    assert "has no rows" in checks.dataset_problem("train_dataset", good.select([]), teacher=True)


def test_infinite_rewards_name_the_function():
    assert checks.infinite_reward_problem(torch.tensor([[1.0, math.nan]]), ["a", "b"]) is None
    problem = checks.infinite_reward_problem(torch.tensor([[1.0, 0.0], [1.0, math.inf]]), ["a", "b"])
    assert "'b' returned inf" in problem and "1 of 2" in problem


def test_feedback_needs_one_per_completion():
    assert checks.feedback_problem(["x", None], 2, "feedback") is None
    assert "got 1 for 2 completions" in checks.feedback_problem(["x"], 2, "feedback")


def test_non_finite_loss_names_the_term():
    assert checks.non_finite_loss_problem("training step 3", 0.5, 0.25) is None
    assert "GRPO term is nan at training step 3" in checks.non_finite_loss_problem("training step 3", math.nan, 0.0)
    assert "or the teacher" in checks.non_finite_loss_problem("evaluation", 0.0, math.inf)

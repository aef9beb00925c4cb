"""What the learning benchmarks' diagnosis added to the trainer: the teacher-disagreement metric, the
`routed_grpo_weight` variant (beyond the paper) that lets routed rollouts keep their GRPO advantage, and the
reliability gate (`min_teacher_solution_prob`, beyond the paper) that distils only where the teacher follows the
solution it is shown."""

import pandas as pd
import pytest
import torch
from helpers.tiny_trainer import first_letter_reward, logged, make_trainer

from srpo_trl import SRPOConfig
from srpo_trl.diagnostics import routing_metrics
from srpo_trl.routing import Routes
from srpo_trl.teacher_scoring import TeacherScores


def test_teacher_rejects_sampled_frac_counts_distilled_tokens_the_teacher_gives_under_half():
    sdpo = torch.tensor([True, True])
    routes = Routes(*([torch.zeros(2, dtype=torch.bool)] * 2), sdpo, ~sdpo, sdpo, torch.zeros(2, dtype=torch.long))
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # Teacher probabilities of the sampled tokens: 0.9, 0.4, 0.6 (distilled), 0.1 (masked), 0.2 (distilled).
    logps = torch.tensor([[0.9, 0.4, 0.6, 0.1], [0.2, 0.5, 0.5, 0.5]]).log()

    def metrics(routes):
        zeros = torch.zeros(2, 4)
        no_truncation = torch.zeros(2, dtype=torch.bool)
        scores = TeacherScores(None, logps, zeros, 0.0, None)
        return routing_metrics(
            routes, mask, scores, weights=mask.float(), truncated=no_truncation, local=slice(0, 2), all_reduce=identity
        )

    assert metrics(routes)["srpo/teacher_rejects_sampled_frac"] == pytest.approx(2 / 4)
    nothing = Routes(*([torch.zeros(2, dtype=torch.bool)] * 5), torch.full((2,), -1))
    assert "srpo/teacher_rejects_sampled_frac" not in metrics(nothing)  # nothing distilled: left out


def identity(tensor, op):
    return tensor


@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"loss_type": "grpo"},
        {"loss_type": "bnpo"},
        {"loss_type": "dr_grpo"},
        {"loss_type": "luspo"},
        {"bf16": True},
    ],
    ids=["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "dapo-bf16"],
)
def test_routed_grpo_weight_adds_grpo_s_term_on_routed_rollouts(char_tokenizer, tmp_path, setting):
    """One step on the same rollouts: with `routed_grpo_weight=1` the GRPO term is GRPO's own loss over every
    rollout, and the distillation term is SRPO's, whatever the loss type's aggregation (and in bf16)."""
    runs = {}
    for name, overrides in {
        "grpo": {"routing": "grpo"},
        "srpo": {},
        "srpo_routed_grpo": {"routed_grpo_weight": 1.0},
    }.items():
        trainer = make_trainer(
            char_tokenizer, tmp_path / name, reward=first_letter_reward, max_steps=1, **setting, **overrides
        )
        trainer.train()
        runs[name] = trainer
    assert logged(runs["srpo"], "srpo/route/sdpo_frac")[0] > 0  # something was routed
    assert logged(runs["srpo_routed_grpo"], "srpo/loss/grpo") == pytest.approx(logged(runs["grpo"], "loss"))
    assert logged(runs["srpo_routed_grpo"], "srpo/loss/sdpo") == pytest.approx(logged(runs["srpo"], "srpo/loss/sdpo"))
    assert logged(runs["srpo_routed_grpo"], "srpo/loss/grpo") != pytest.approx(logged(runs["srpo"], "srpo/loss/grpo"))


@pytest.mark.parametrize("overrides", [{"routed_grpo_weight": 1.5}, {"routed_grpo_weight": 0.5, "routing": "sdpo"}])
def test_routed_grpo_weight_is_checked(tmp_path, overrides):
    with pytest.raises(ValueError, match="routed_grpo_weight"):
        SRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)


def test_reliability_gate_trains_gated_rollouts_with_grpo(char_tokenizer, tmp_path):
    """One step on the same rollouts: a gate no teacher passes (1.0) trains every routed rollout with GRPO, so the
    step's loss is GRPO's own; a gate every teacher passes leaves SRPO's loss as it was."""
    runs = {}
    for name, overrides in {
        "grpo": {"routing": "grpo"},
        "srpo": {},
        "gate_all": {"min_teacher_solution_prob": 1.0, "log_completions": True},
        "gate_none": {"min_teacher_solution_prob": 1e-12},
    }.items():
        trainer = make_trainer(char_tokenizer, tmp_path / name, reward=first_letter_reward, max_steps=1, **overrides)
        trainer.train()
        runs[name] = trainer
    routed = logged(runs["srpo"], "srpo/route/sdpo_frac")[0]
    assert routed > 0 and "srpo/route/gated_frac" not in runs["srpo"].state.log_history[0]
    assert logged(runs["gate_all"], "srpo/route/gated_frac") == [pytest.approx(routed)]
    assert logged(runs["gate_all"], "srpo/route/sdpo_frac") == [0.0]
    assert logged(runs["gate_all"], "srpo/loss/grpo") == pytest.approx(logged(runs["grpo"], "loss"))
    assert logged(runs["gate_all"], "srpo/loss/sdpo") == [0.0]
    table = pd.read_parquet(tmp_path / "gate_all" / "completions" / "completions_00001.parquet")
    gated = table["route"] == "gated"  # labelled, and trained with GRPO's advantage
    assert gated.mean() == pytest.approx(routed) and table["advantage"][gated].notna().all()
    assert logged(runs["gate_none"], "srpo/route/gated_frac") == [0.0]
    for key in ("srpo/loss/grpo", "srpo/loss/sdpo", "srpo/teacher_solution_prob"):
        assert logged(runs["gate_none"], key) == pytest.approx(logged(runs["srpo"], key))


@pytest.mark.parametrize(
    "overrides", [{"min_teacher_solution_prob": 1.5}, {"min_teacher_solution_prob": 0.5, "routing": "sdpo"}]
)
def test_reliability_gate_is_checked(tmp_path, overrides):
    with pytest.raises(ValueError, match="min_teacher_solution_prob"):
        SRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)

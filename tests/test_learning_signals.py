"""What the learning benchmark's diagnosis added to the trainer: the teacher-disagreement metric, and the
`routed_grpo_weight` variant (beyond the paper) that lets routed rollouts keep their GRPO advantage."""

import pytest
import torch
from test_trainer import first_letter_reward, logged, make_trainer

from srpo_trl import SRPOConfig


def test_teacher_rejects_sampled_frac_counts_distilled_tokens_the_teacher_gives_under_half(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path)
    sdpo_tokens = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # Teacher probabilities of the sampled tokens: 0.9, 0.4, 0.6 (distilled), 0.1 (not distilled), 0.2 (distilled).
    logps = torch.tensor([[0.9, 0.4, 0.6, 0.1], [0.2, 0.5, 0.5, 0.5]]).log()
    trainer._log_teacher_disagreement("train", sdpo_tokens, logps)
    trainer._log_teacher_disagreement("train", torch.zeros_like(sdpo_tokens), logps)  # nothing distilled: left out
    assert trainer._metrics["train"]["srpo/teacher_rejects_sampled_frac"] == [pytest.approx(2 / 4)]


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

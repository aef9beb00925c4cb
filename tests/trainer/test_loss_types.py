"""Every GRPO `loss_type` under SRPO (method §12): `routing="grpo"` and "nothing routed" are GRPOTrainer bit for bit,
and with rows routed the loss is the one per-token loss (GRPO's term on GRPO rows, `w_t D_t` on distilled rows)
aggregated as that loss type aggregates, checked against a float64 reference built from full logits."""

import math

import pytest
import torch
from helpers.references import (
    reference_aggregate,
    reference_distillation_terms,
    reference_rows,
    train_one_step_recording_the_batch,
)
from helpers.tiny_trainer import graded_reward, logged, make_trainer, parameters
from trl import GRPOTrainer

from srpo_trl.compat import LOSS_TYPES

# What each loss type needs besides its name, as a TRL user would set it.
LOSS_TYPE_SETTINGS = {"luspo": dict(importance_sampling_level="sequence"), "cispo": dict(epsilon_high=5.0)}


def settings(loss_type):
    return dict(loss_type=loss_type, **LOSS_TYPE_SETTINGS.get(loss_type, {}))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("routing", ["grpo", "srpo"])
def test_equals_grpo_trainer_bitwise_when_nothing_is_distilled(char_tokenizer, tmp_path, loss_type, routing):
    reference = make_trainer(
        char_tokenizer, tmp_path / "grpo", reward=graded_reward, trainer_class=GRPOTrainer, **settings(loss_type)
    )
    reference.train()
    ours = make_trainer(
        char_tokenizer, tmp_path / "ours", reward=graded_reward, routing=routing, **settings(loss_type)
    )
    ours.train()
    assert logged(ours, "loss") == logged(reference, "loss")
    expected = parameters(reference)
    for name, value in parameters(ours).items():
        assert torch.equal(value, expected[name]), name


def reference_grpo_token_loss(args, advantage, token_logps):
    """GRPO's per-token loss at the first step (π_old = π_θ: every ratio is 1), by loss type (TRL 1.16's formulas)."""
    if args.loss_type == "sapo":  # the soft gate sigmoid(τ (r - 1)) 4 / τ at r = 1
        tau = args.sapo_temperature_pos if advantage > 0 else args.sapo_temperature_neg
        return torch.full_like(token_logps, -2.0 / tau * advantage)
    if args.loss_type == "cispo":  # the clipped ratio min(r, ε_high) times the advantage and the log-prob
        return -min(1.0, args.epsilon_high) * advantage * token_logps
    if args.loss_type == "vespo":  # the gamma weight φ(1) = e^λ e^-λ = 1
        return -advantage * token_logps
    return torch.full_like(token_logps, -advantage)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_routed_loss_is_the_one_per_token_loss_aggregated_like_grpo(char_tokenizer, tmp_path, monkeypatch, loss_type):
    trainer, prompts, batch = train_one_step_recording_the_batch(
        char_tokenizer, tmp_path, monkeypatch, **settings(loss_type)
    )
    assert 0 < logged(trainer, "srpo/route/sdpo_frac")[0] < 1
    rows = list(reference_rows(trainer, prompts, batch, "srpo"))
    distilled = reference_distillation_terms(trainer, [r for r in rows if r[2] is not None])
    mask = batch["completion_mask"].bool()
    rewards = torch.tensor(
        [float(trainer.processing_class.decode(ids[m], skip_special_tokens=True)[:1].islower())
         for ids, m in zip(batch["completion_ids"], mask, strict=True)]
    )  # fmt: skip
    advantages = (rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)).tolist()  # scale_rewards="none"
    per_token = torch.zeros(mask.shape, dtype=torch.float64)
    for row, student, teacher in rows:
        tokens = batch["completion_ids"][row][mask[row]]
        if teacher is None:
            assert batch["advantages"][row].item() == pytest.approx(advantages[row], abs=1e-6)
            token_logps = student.gather(-1, tokens[:, None]).squeeze(-1)
            per_token[row, mask[row]] = reference_grpo_token_loss(trainer.args, advantages[row], token_logps)
        else:
            per_token[row, mask[row]] = distilled[row]
            assert batch["advantages"][row].abs().max() == 0  # a distilled row carries no GRPO signal
    expected = reference_aggregate(
        per_token.tolist(), mask.tolist(), loss_type, 1, trainer.args.max_completion_length, mask.sum().item()
    )
    assert math.isfinite(expected) and abs(expected) > 1e-3
    assert logged(trainer, "loss")[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert logged(trainer, "loss")[0] == pytest.approx(
        logged(trainer, "srpo/loss/grpo")[0] + logged(trainer, "srpo/loss/sdpo")[0], rel=1e-5, abs=1e-7
    )

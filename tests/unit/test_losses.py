"""The SRPO math against independent float64 references written out from method §5-§8."""

import math

import pytest
import torch
from helpers.references import reference_aggregate

from srpo_trl.compat import LOSS_TYPES, reduce_token_loss
from srpo_trl.losses import (
    LossInputs,
    add_tail_bucket,
    clipped_importance_ratio,
    distillation_term,
    distillation_token_losses,
    generalized_jsd,
    mixed_token_advantages,
    srpo_loss,
    teacher_entropy_weights,
    topk_distillation_divergence,
)
from srpo_trl.teacher_scoring import TeacherStates
from srpo_trl.vocab import Logits, teacher_statistics


def kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=False) if x > 0)


def reference_divergence(p, q, alpha):
    """method §5 on plain Python floats: the end points are the KLs, the interior the generalised JSD."""
    if alpha == 0.0:
        return kl(q, p)
    if alpha == 1.0:
        return kl(p, q)
    m = [(1 - alpha) * x + alpha * y for x, y in zip(p, q, strict=False)]
    return (1 - alpha) * kl(p, m) + alpha * kl(q, m)


def topk_with_tail(probs, support):
    kept = [probs[v] for v in support]
    return kept + [1.0 - sum(kept)]


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_topk_divergence_matches_float64_reference(alpha):
    generator = torch.Generator().manual_seed(0)
    vocab, k, n = 50, 7, 6
    student_logits = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 2
    teacher_logits = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 2
    student, teacher = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    support = student.topk(k, dim=-1).indices
    ours = topk_distillation_divergence(student.gather(-1, support), teacher.gather(-1, support), alpha)
    for t in range(n):
        p = topk_with_tail(student[t].exp().tolist(), support[t].tolist())
        q = topk_with_tail(teacher[t].exp().tolist(), support[t].tolist())
        assert ours[t].item() == pytest.approx(reference_divergence(p, q, alpha), rel=1e-9, abs=1e-12)


def test_full_support_equals_full_vocabulary_divergence():
    generator = torch.Generator().manual_seed(1)
    p = torch.randn(3, 20, generator=generator, dtype=torch.float64).log_softmax(-1)
    q = torch.randn(3, 20, generator=generator, dtype=torch.float64).log_softmax(-1)
    for alpha in (0.0, 0.5, 1.0):
        full = generalized_jsd(p, q, alpha)
        for t in range(3):
            assert full[t].item() == pytest.approx(
                reference_divergence(p[t].exp().tolist(), q[t].exp().tolist(), alpha)
            )
    # a support holding all the mass leaves an (almost) empty tail and the same divergence
    assert torch.allclose(topk_distillation_divergence(p, q, 0.5), generalized_jsd(p, q, 0.5), atol=1e-6)


def test_divergence_is_zero_iff_equal_and_differentiable():
    p = torch.randn(4, 10).log_softmax(-1).requires_grad_()
    assert torch.allclose(topk_distillation_divergence(p[:, :5], p[:, :5].detach(), 0.5), torch.zeros(4), atol=1e-6)
    q = torch.randn(4, 10).log_softmax(-1)
    loss = topk_distillation_divergence(p[:, :5], q[:, :5], 0.5).sum()
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_tail_bucket_is_a_distribution_even_when_support_holds_everything():
    logps = torch.tensor([[math.log(0.5), math.log(0.3)], [math.log(0.6), math.log(0.4)]])
    with_tail = add_tail_bucket(logps)
    assert torch.allclose(with_tail.exp().sum(-1), torch.ones(2), atol=1e-6)
    assert torch.isfinite(with_tail).all()


def test_entropy_weights_match_brute_force():
    entropy = torch.tensor([[0.5, 1.0, 2.0, 9.0], [0.1, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for tau in (0.05, 1.0, 3.0):
        weights = teacher_entropy_weights(entropy, mask, tau)
        selected = [h for h, m in zip(entropy.flatten().tolist(), mask.flatten().tolist(), strict=False) if m]
        total = sum(math.exp(-h / tau) for h in selected)
        for h, m, w in zip(
            entropy.flatten().tolist(), mask.flatten().tolist(), weights.flatten().tolist(), strict=False
        ):
            expected = len(selected) * math.exp(-h / tau) / total if m else 0.0
            assert w == pytest.approx(expected, rel=1e-5)
        assert weights[mask.bool()].mean().item() == pytest.approx(1.0, rel=1e-5)


def test_entropy_weights_normalise_across_processes():
    """Two simulated processes, each reducing with the other's statistics, get the weights of the joint batch."""
    tau = 0.5
    entropy = torch.tensor([[0.3, 2.0, 1.0], [4.0, 0.2, 0.7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    joint = teacher_entropy_weights(entropy, mask, tau)

    def all_reduce_with(other_entropy, other_mask):
        other_negated = torch.where(other_mask.bool(), -other_entropy, -torch.inf)  # the max is of -H
        seen = {}

        def all_reduce(tensor, op):
            if op == "max":
                seen["peak"] = torch.maximum(tensor, other_negated.max().reshape(1))
                return seen["peak"]
            other_sum = torch.where(other_mask.bool(), torch.exp((other_negated - seen["peak"]) / tau), 0.0).sum()
            return tensor + torch.stack([other_sum, other_mask.sum().float()])

        return all_reduce

    for rank in range(2):
        other = 1 - rank
        local = teacher_entropy_weights(
            entropy[rank : rank + 1], mask[rank : rank + 1], tau, all_reduce_with(entropy[other], mask[other])
        )
        assert torch.allclose(local, joint[rank : rank + 1], atol=1e-6)


@pytest.mark.parametrize("tau", [1e-39, 1e-45, 5e-324, 1e-30])
def test_entropy_weights_at_a_tiny_temperature_are_finite_and_pick_the_least_uncertain_tokens(tau):
    # -H/τ overflows to -inf (or τ rounds to 0 in float32): the weights must still be finite, with the limit τ -> 0,
    # all the weight shared by the minimum-entropy tokens.
    entropy = torch.tensor([[1.5, 1.2, 2.0, 1.2], [3.0, 0.0, 1.7, 0.0]])  # every H/τ overflows
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]])
    weights = teacher_entropy_weights(entropy, mask, tau)
    assert torch.isfinite(weights).all()
    assert weights.tolist() == [[0.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


def test_entropy_weights_without_tokens_are_zero_not_nan():
    weights = teacher_entropy_weights(torch.rand(2, 3), torch.zeros(2, 3), 1.0)
    assert torch.equal(weights, torch.zeros(2, 3))


def test_clipped_importance_ratio():
    logps = torch.tensor([0.0, -1.0, -3.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.0, -1.0])
    ratio = clipped_importance_ratio(logps, old, 2.0)
    assert torch.allclose(ratio, torch.tensor([2.0, 1.0, math.exp(-2.0)]))
    assert not ratio.requires_grad


def test_mixed_token_advantages():
    advantages = torch.tensor([0.5, -0.5])
    teacher = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    old = torch.tensor([[-2.0, -2.0], [-3.0, -3.0]])
    mixed = mixed_token_advantages(advantages, teacher, old, torch.tensor([True, False]), 0.75)
    assert torch.allclose(mixed, torch.tensor([[0.75 * 0.5 + 0.25 * 1.0, 0.75 * 0.5], [-0.375, -0.375]]))


def test_distillation_term():
    divergence = torch.tensor([1.0, 2.0, 3.0])
    losses = distillation_term(divergence, torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1.0, 2.0, 1.0]))
    assert losses.tolist() == [1.0, 2.0, 0.0]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reduce_token_loss_matches_each_loss_types_definition(loss_type):
    generator = torch.Generator().manual_seed(3)
    per_token = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=generator) > 0.3
    mask[2] = False  # an empty row: counted as a sequence, no tokens
    count = torch.tensor(17.0, dtype=torch.float64)
    ours = reduce_token_loss(
        per_token, mask, loss_type, accumulation_steps=2, max_completion_length=9, global_token_count=count
    )
    expected = reference_aggregate(per_token.tolist(), mask.tolist(), loss_type, 2, 9, 17.0)
    assert ours.item() == pytest.approx(expected, rel=1e-12)


def test_reduce_token_loss_names_an_unknown_loss_type():
    with pytest.raises(ValueError, match="Unknown loss_type 'ppo'"):
        reduce_token_loss(
            torch.zeros(1, 1),
            torch.ones(1, 1),
            "ppo",
            accumulation_steps=1,
            max_completion_length=1,
            global_token_count=1,
        )


def micro_batch(with_teacher: bool, identical: bool = False) -> LossInputs:
    """A float64 micro-batch of 3 rows x 4 tokens: row 0 GRPO's, row 1 distilled, row 2 GRPO's with a masked token."""
    generator = torch.Generator().manual_seed(5)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    grpo = mask & torch.tensor([True, False, True]).unsqueeze(1)
    distilled = mask & torch.tensor([False, True, False]).unsqueeze(1)
    inputs = LossInputs(torch.tensor(0.75, dtype=torch.float64), mask, grpo, distilled, torch.tensor(9.0))
    if not with_teacher:
        return inputs
    n, hidden, vocab = int(distilled.sum()), 5, 11
    head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)
    student = torch.randn(n, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_hidden = (
        student.detach() if identical else torch.randn(n, hidden, generator=generator, dtype=torch.float64)
    )
    logits = Logits(torch.float64)
    tokens = torch.randint(vocab, (n,), generator=generator)
    log_normalizer, _, _ = teacher_statistics(teacher_hidden, head.weight, head.bias, logits, tokens)
    inputs.teacher = TeacherStates(teacher_hidden, log_normalizer, (head.weight.detach(), head.bias.detach()), logits)
    inputs.teacher_state_index = torch.arange(n)
    inputs.student_hidden, inputs.student_head, inputs.student_logits = student, head, logits
    inputs.tokens, inputs.token_weights = tokens, torch.rand(n, generator=generator, dtype=torch.float64)
    return inputs


KNOBS = dict(accumulation_steps=2, max_completion_length=6, topk=4, alpha=0.5, is_clip=2.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_srpo_loss_without_a_teacher_is_grpos_rescaled_to_the_shared_tokens(loss_type):
    inputs = micro_batch(with_teacher=False)
    loss, terms = srpo_loss(inputs, loss_type=loss_type, **KNOBS)
    share = 7 / 11 if loss_type == "bnpo" else 1.0  # TRL's bnpo divided by the 7 GRPO tokens; SRPO shares 11
    assert loss.item() == pytest.approx(0.75 * share, rel=1e-7)  # the token counts' ratio is a float32
    assert terms["grpo"].item() == pytest.approx(0.75 * share, rel=1e-7) and terms["distillation"].item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_srpo_loss_adds_the_distillation_term_reduced_like_grpos(loss_type):
    inputs = micro_batch(with_teacher=True)
    loss, terms = srpo_loss(inputs, loss_type=loss_type, **KNOBS)
    token_losses = distillation_token_losses(inputs, topk=4, alpha=0.5, is_clip=2.0)
    per_token = torch.zeros(3, 4, dtype=torch.float64).masked_scatter(inputs.distilled_tokens, token_losses.detach())
    expected = reference_aggregate(per_token.tolist(), inputs.loss_mask.tolist(), loss_type, 2, 6, 9.0)
    assert terms["distillation"].item() == pytest.approx(expected, rel=1e-12) and expected > 0
    assert loss.item() == pytest.approx(terms["grpo"].item() + expected, rel=1e-12)
    loss.backward()
    assert inputs.student_hidden.grad.abs().sum() > 0  # differentiable through the student's hidden states


def test_srpo_loss_of_a_teacher_equal_to_the_student_is_grpos():
    inputs = micro_batch(with_teacher=True, identical=True)
    _, terms = srpo_loss(inputs, loss_type="dapo", **KNOBS)
    assert terms["distillation"].item() == pytest.approx(0.0, abs=1e-12)

"""SRPO's distillation divergence is TRL SDPO's top-k divergence with a tail bucket (trl.experimental.sdpo), computed
from the support's log-probs instead of full logits: the two agree wherever both apply."""

import warnings

import pytest
import torch

from srpo_trl.losses import add_tail_bucket, generalized_jsd, topk_distillation_divergence

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's experimental namespace announces itself
    from trl.experimental.sdpo import loss_utils as trl_sdpo


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_topk_divergence_equals_trl_sdpos_with_a_tail_bucket(alpha):
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(7, 50, generator=generator, dtype=torch.float64) * 3
    teacher_logits = torch.randn(7, 50, generator=generator, dtype=torch.float64) * 3
    k = 10
    expected = trl_sdpo.compute_topk_self_distillation_loss(
        student_logits, teacher_logits, distillation_topk=k, distillation_alpha=alpha, distillation_add_tail=True
    )
    support = student_logits.topk(k, dim=-1).indices
    student = student_logits.log_softmax(-1).gather(-1, support)
    teacher = teacher_logits.log_softmax(-1).gather(-1, support)
    torch.testing.assert_close(topk_distillation_divergence(student, teacher, alpha), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_divergence_and_tail_bucket_equal_trls(alpha):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 9, generator=generator, dtype=torch.float64).log_softmax(-1)
    teacher = torch.randn(5, 9, generator=generator, dtype=torch.float64).log_softmax(-1)
    torch.testing.assert_close(
        generalized_jsd(student, teacher, alpha), trl_sdpo.compute_divergence(student, teacher, alpha)
    )
    torch.testing.assert_close(add_tail_bucket(student[:, :4]), trl_sdpo.add_tail_bucket(student[:, :4]))

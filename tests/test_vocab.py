"""Chunked vocabulary work equals the plain full-logits computation, values and gradients."""

import pytest
import torch

from srpo_trl import vocab
from srpo_trl.vocab import logps_on_support, student_topk_logps, teacher_statistics


@pytest.fixture(params=[10**9, 7 * 64], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    monkeypatch.setattr(vocab, "LOGITS_PER_CHUNK", request.param)  # 7 positions per chunk at vocab 64


def make(n=23, hidden=8, vocab_size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=generator, dtype=torch.float64)
    w = torch.randn(vocab_size, hidden, generator=generator, dtype=torch.float64)
    b = torch.randn(vocab_size, generator=generator, dtype=torch.float64)
    tokens = torch.randint(vocab_size, (n,), generator=generator)
    return h, w, b, tokens


def full_log_softmax(h, w, b, temperature):
    return ((h @ w.T + b) / temperature).log_softmax(-1)


def test_teacher_statistics_and_logps_on_support(chunking):
    h, w, b, tokens = make()
    logps = full_log_softmax(h, w, b, 0.7)
    log_normalizer, token_logps, entropy = teacher_statistics(h, w, b, 0.7, tokens)
    assert torch.allclose(log_normalizer, ((h @ w.T + b) / 0.7).logsumexp(-1))
    assert torch.allclose(token_logps, logps.gather(-1, tokens[:, None]).squeeze(-1))
    assert torch.allclose(entropy, -(logps.exp() * logps).sum(-1))
    support = torch.randint(64, (23, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logps_on_support(h, w, b, 0.7, log_normalizer, support), logps.gather(-1, support))
    # A head without bias, and a copy of the head (how the trainer snapshots it) in place of the parameter.
    log_normalizer, _, _ = teacher_statistics(h, w, None, 0.7, tokens)
    expected = full_log_softmax(h, w, torch.zeros(64, dtype=h.dtype), 0.7).gather(-1, support)
    assert torch.allclose(logps_on_support(h, w.clone(), None, 0.7, log_normalizer, support), expected)


def test_student_topk_logps_values_and_gradients_match_full_logits(chunking):
    h, w, b, tokens = make()
    weights = torch.rand(23, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    support, ours_support, ours_tokens = student_topk_logps(*leaves, 1.3, tokens, k=5)
    ((ours_support * weights).sum() + ours_tokens.sum()).backward()
    reference = [t.clone().requires_grad_() for t in (h, w, b)]
    logps = full_log_softmax(*reference, 1.3)
    assert torch.equal(support, logps.topk(5, dim=-1).indices)
    assert not support.requires_grad
    assert torch.allclose(ours_support, logps.gather(-1, support))
    assert torch.allclose(ours_tokens, logps.gather(-1, tokens[:, None]).squeeze(-1))
    ((logps.gather(-1, support) * weights).sum() + logps.gather(-1, tokens[:, None]).sum()).backward()
    for ours, theirs in zip(leaves, reference, strict=True):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-10)


def test_empty_input():
    h, w, b, tokens = make(n=0)
    support, support_logps, token_logps = student_topk_logps(h, w, b, 1.0, tokens, k=5)
    assert support.shape == support_logps.shape == (0, 5) and token_logps.shape == (0,)
    log_normalizer, token_logps, entropy = teacher_statistics(h, w, b, 1.0, tokens)
    assert log_normalizer.shape == token_logps.shape == entropy.shape == (0,)
    assert logps_on_support(h, w, b, 1.0, log_normalizer, support).shape == (0, 5)

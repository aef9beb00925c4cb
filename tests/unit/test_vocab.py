"""Chunked vocabulary work equals the plain full-logits computation (values and gradients), one distribution per
set of logits in bf16, and the model families' logit scaling and soft-capping."""

import pytest
import torch

from srpo_trl import vocab
from srpo_trl.losses import topk_distillation_divergence
from srpo_trl.vocab import Logits, logit_scale_and_softcap, logps_on_support, student_topk_logps, teacher_statistics

FP64 = Logits(torch.float64, temperature=0.7)


@pytest.fixture(params=[10**9, 7 * 64], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    monkeypatch.setattr(vocab, "LOGITS_PER_CHUNK", request.param)  # 7 positions per chunk at vocab 64


def make(n=23, hidden=8, vocab_size=64, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=generator, dtype=dtype)
    w = torch.randn(vocab_size, hidden, generator=generator, dtype=dtype)
    b = torch.randn(vocab_size, generator=generator, dtype=dtype)
    tokens = torch.randint(vocab_size, (n,), generator=generator)
    return h, w, b, tokens


def full_log_softmax(h, w, b, logits: Logits):
    z = (h @ w.T + b) * logits.scale
    if logits.softcap is not None:
        z = logits.softcap * torch.tanh(z / logits.softcap)
    return (z / logits.temperature).log_softmax(-1)


@pytest.mark.parametrize(
    "logits", [FP64, Logits(torch.float64, 0.7, scale=0.25, softcap=3.0)], ids=["plain", "scaled-softcapped"]
)
def test_teacher_statistics_and_logps_on_support(chunking, logits):
    h, w, b, tokens = make()
    logps = full_log_softmax(h, w, b, logits)
    log_normalizer, token_logps, entropy = teacher_statistics(h, w, b, logits, tokens)
    assert torch.allclose(token_logps, logps.gather(-1, tokens[:, None]).squeeze(-1))
    assert torch.allclose(entropy, -(logps.exp() * logps).sum(-1))
    support = torch.randint(64, (23, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logps_on_support(h, w, b, logits, log_normalizer, support), logps.gather(-1, support))
    # A head without bias, and a copy of the head (how the trainer snapshots it) in place of the parameter.
    log_normalizer, _, _ = teacher_statistics(h, w, None, logits, tokens)
    expected = full_log_softmax(h, w, torch.zeros(64, dtype=h.dtype), logits).gather(-1, support)
    assert torch.allclose(logps_on_support(h, w.clone(), None, logits, log_normalizer, support), expected)


@pytest.mark.parametrize(
    "logits", [Logits(torch.float64, 1.3), Logits(torch.float64, 1.3, scale=2.0, softcap=4.0)], ids=["plain", "capped"]
)
def test_student_topk_logps_values_and_gradients_match_full_logits(chunking, logits):
    h, w, b, tokens = make()
    weights = torch.rand(23, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    support, ours_support, ours_tokens = student_topk_logps(*leaves, logits, tokens, k=5)
    ((ours_support * weights).sum() + ours_tokens.sum()).backward()
    reference = [t.clone().requires_grad_() for t in (h, w, b)]
    logps = full_log_softmax(*reference, logits)
    assert torch.equal(support.sort(-1).values, logps.topk(5, dim=-1).indices.sort(-1).values)  # any order
    assert not support.requires_grad
    assert torch.allclose(ours_support, logps.gather(-1, support))
    assert torch.allclose(ours_tokens, logps.gather(-1, tokens[:, None]).squeeze(-1))
    ((logps.gather(-1, support) * weights).sum() + logps.gather(-1, tokens[:, None]).sum()).backward()
    for ours, theirs in zip(leaves, reference, strict=True):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-10)


def test_empty_input():
    h, w, b, tokens = make(n=0)
    support, support_logps, token_logps = student_topk_logps(h, w, b, FP64, tokens, k=5)
    assert support.shape == support_logps.shape == (0, 5) and token_logps.shape == (0,)
    log_normalizer, token_logps, entropy = teacher_statistics(h, w, b, FP64, tokens)
    assert log_normalizer.shape == token_logps.shape == entropy.shape == (0,)
    assert logps_on_support(h, w, b, FP64, log_normalizer, support).shape == (0, 5)


def peaked_bf16_head(n=64, hidden=32, vocab_size=512, seed=0):
    """bf16 hidden states and head whose logits reach about ±20 (a trained LLM's; bf16's step there is 0.125)."""
    h, w, _, tokens = make(n, hidden, vocab_size, seed, dtype=torch.float32)
    h = (h / h.norm(dim=-1, keepdim=True)).to(torch.bfloat16)
    w = (w * (20.0 / w.norm(dim=-1, keepdim=True).max())).to(torch.bfloat16)
    return h, w * 1.0, tokens


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcapped"])
def test_identical_bf16_teacher_and_student_have_zero_divergence(softcap):
    # method §12: q's normaliser, entropy and support log-probs come from the same rounded logits, so the teacher's
    # top-k mass never exceeds 1 and D(p, q) is zero when the teacher is the student.
    h, w, tokens = peaked_bf16_head()
    logits = Logits(torch.bfloat16, softcap=softcap)
    hidden = h.clone().requires_grad_()
    support, student, _ = student_topk_logps(hidden, w, None, logits, tokens, k=100)
    log_normalizer, _, _ = teacher_statistics(h, w, None, logits, tokens)
    teacher = logps_on_support(h, w, None, logits, log_normalizer, support)
    assert torch.logsumexp(teacher, -1).max() <= 1e-6  # top-k mass <= 1
    divergence = topk_distillation_divergence(student, teacher, 0.5)
    assert divergence.abs().max() <= 1e-6
    divergence.sum().backward()
    assert hidden.grad.abs().max() <= 1e-4


def test_bf16_head_gradient_does_not_depend_on_chunking(monkeypatch):
    # The head's gradient is summed over position chunks in fp32 and rounded to bf16 once: one chunk and one
    # position per chunk agree within one bf16 rounding (summed in bf16, 400 chunks drifted 2.4% from one).
    h, w, tokens = peaked_bf16_head(n=400)
    upstream = torch.rand(400, 11, generator=torch.Generator().manual_seed(2))

    def head_gradient():
        weight = w.clone().requires_grad_()
        _, support_logps, token_logps = student_topk_logps(h, weight, None, Logits(torch.bfloat16), tokens, k=10)
        (torch.cat([support_logps, token_logps[:, None]], -1) * upstream).sum().backward()
        assert weight.grad.dtype == torch.bfloat16
        return weight.grad.double()

    whole = head_gradient()
    monkeypatch.setattr(vocab, "LOGITS_PER_CHUNK", 1)
    per_position = head_gradient()
    one_bf16_step = 2.0**-7 * torch.maximum(whole.abs(), per_position.abs())  # bf16 keeps 8 significant bits
    assert ((whole - per_position).abs() <= one_bf16_step).all()


def tiny_model(family: str):
    """A tiny model of a family whose forward scales or soft-caps its logits."""
    import transformers

    common = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    config = {
        "gemma2": lambda: transformers.Gemma2Config(**common, final_logit_softcapping=2.0),
        "granite": lambda: transformers.GraniteConfig(**common, logits_scaling=4.0),
        "cohere": lambda: transformers.CohereConfig(**common, logit_scale=0.3),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # logits large enough for the transforms to matter
    return model


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
def test_logits_match_the_models_own_forward_and_trls_fused_head(family):
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model(family)
    input_ids = torch.randint(96, (2, 9), generator=torch.Generator().manual_seed(4))
    scale, softcap = logit_scale_and_softcap(model.config)
    assert (scale, softcap) != (1.0, None)
    logits = Logits(torch.float32, 0.8, scale, softcap)
    with torch.no_grad():
        expected = (model(input_ids).logits / 0.8).log_softmax(-1)[:, :-1]
        hidden = model.base_model(input_ids).last_hidden_state[:, :-1].reshape(-1, 32)
    head = model.get_output_embeddings()
    _, token_logps, _ = teacher_statistics(hidden, head.weight, head.bias, logits, input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(token_logps.view(2, 8), expected.gather(-1, input_ids[:, 1:, None])[..., 0])
    add_fused_lm_head(model, temperature=0.8)
    with torch.no_grad():
        fused = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True).log_probs
    torch.testing.assert_close(token_logps.view(2, 8), fused, rtol=1e-5, atol=1e-5)


def test_chunks_are_sized_by_device(monkeypatch):
    # 2**24 logits per chunk is 110 positions at vocabulary 151,936: on a GPU each chunk re-read the whole LM head.
    vocabulary = 151_936
    assert vocab._chunks(1000, vocabulary, torch.device("cpu"))[0] == slice(0, 110)
    gib = 2**30
    memory = {"free": 40 * gib, "reserved": 6 * gib, "allocated": 2 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (memory["free"], 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: memory["allocated"])
    gpu = torch.device("cuda", 0)
    positions = vocab._chunks(10**5, vocabulary, gpu)[0].stop
    assert positions == 44 * gib // 8 // 16 // vocabulary > 2000  # 1/8 of the free memory, cached blocks included
    memory["free"] = 1000 * gib
    assert vocab._chunks(10**5, vocabulary, gpu)[0].stop == vocab.GPU_MAX_LOGITS_PER_CHUNK // vocabulary
    memory.update(free=0, reserved=0)
    assert vocab._chunks(3, vocabulary, gpu) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # short of memory

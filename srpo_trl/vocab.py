"""Vocabulary-sized work in chunks of positions (SPEC §7): hidden states in, only what the loss needs out.

`[tokens, vocab]` float32 logits exist for one chunk at a time (about 64 MiB); the student's differentiable pass
recomputes its chunk's logits in backward instead of keeping them. Inputs are the final hidden states of the valid
completion positions, flattened to `(n, hidden)`, and the LM head's weight/bias; logits are divided by the
sampling temperature, as GRPOTrainer's fused LM head does.

Under DeepSpeed ZeRO-3 the head is partitioned outside its module's forward: each function gathers it once per call
(forward, and again in the student's backward), whatever the number of positions. Gathering is a collective, so
under ZeRO-3 every process must make the same calls, with or without positions of its own.
"""

import torch
import torch.nn.functional as F
from trl.trainer.utils import maybe_gather_lm_head_ctx

LOGITS_PER_CHUNK = 2**24


def _chunks(hidden: torch.Tensor, weight: torch.Tensor):
    size = max(1, LOGITS_PER_CHUNK // weight.size(0))
    # At least one (possibly empty) chunk, so that no positions give empty results rather than no results.
    return [slice(start, start + size) for start in range(0, max(hidden.size(0), 1), size)]


def _log_softmax(hidden, weight, bias, temperature):
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    # Softmax statistics in at least fp32, whatever the training dtype.
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


@torch.no_grad()
def student_topk_support(hidden, weight, bias, temperature: float, tokens: torch.Tensor, k: int):
    """The sampling policy's top-k token ids per position `(n, k)` and its log-prob of the sampled token `(n,)`."""
    support, token_logps = [], []
    with maybe_gather_lm_head_ctx(weight, bias):
        for chunk in _chunks(hidden, weight):
            logps = _log_softmax(hidden[chunk], weight, bias, temperature)
            support.append(logps.topk(k, dim=-1).indices)
            token_logps.append(logps.gather(-1, tokens[chunk, None]).squeeze(-1))
    return torch.cat(support), torch.cat(token_logps)


@torch.no_grad()
def teacher_statistics(hidden, weight, bias, temperature: float, tokens: torch.Tensor, support: torch.Tensor):
    """The teacher's log-probs on the student's support `(n, k)`, of the sampled token `(n,)`, and its full-vocabulary
    entropy `(n,)`."""
    support_logps, token_logps, entropy = [], [], []
    with maybe_gather_lm_head_ctx(weight, bias):
        for chunk in _chunks(hidden, weight):
            logps = _log_softmax(hidden[chunk], weight, bias, temperature)
            support_logps.append(logps.gather(-1, support[chunk]))
            token_logps.append(logps.gather(-1, tokens[chunk, None]).squeeze(-1))
            entropy.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(support_logps), torch.cat(token_logps), torch.cat(entropy)


class _GatheredLogProbs(torch.autograd.Function):
    """`log_softmax(hidden @ weight.T + bias) / T` at `ids` `(n, m)`, chunked; backward recomputes each chunk's
    logits. A hand-written backward (rather than activation checkpointing) lets the head be gathered once per pass
    under ZeRO-3 and be whole while its gradient is formed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature):
        with maybe_gather_lm_head_ctx(weight, bias):
            out = [
                _log_softmax(hidden[chunk], weight, bias, temperature).gather(-1, ids[chunk])
                for chunk in _chunks(hidden, weight)
            ]
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.temperature = temperature
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, ids = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        grad_hidden = torch.empty_like(hidden)
        with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(device, dtype=dtype, enabled=enabled):
            grad_weight = torch.zeros_like(weight)
            grad_bias = None if bias is None else torch.zeros_like(bias)
            for chunk in _chunks(hidden, weight):
                logps = _log_softmax(hidden[chunk], weight, bias, ctx.temperature)
                g = grad[chunk].to(logps.dtype)
                # d/dz Σ_j g_j log p(ids_j) = onehot(ids)·g - p Σ_j g_j, then the 1/T of the logits
                grad_logits = (logps.exp() * -g.sum(-1, keepdim=True)).scatter_add_(-1, ids[chunk], g)
                grad_logits = (grad_logits / ctx.temperature).to(weight.dtype)
                grad_hidden[chunk] = (grad_logits @ weight).to(hidden.dtype)
                grad_weight.addmm_(grad_logits.T, hidden[chunk].to(weight.dtype))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None


def student_support_logps(hidden, weight, bias, temperature: float, tokens: torch.Tensor, support: torch.Tensor):
    """Differentiable student log-probs on `support` `(n, k)` and of the sampled token `(n,)`."""
    logps = _GatheredLogProbs.apply(hidden, weight, bias, torch.cat([support, tokens[:, None]], dim=1), temperature)
    return logps[:, :-1], logps[:, -1]

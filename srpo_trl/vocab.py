"""Vocabulary-sized work in chunks of positions (SPEC §7): hidden states in, only what the loss needs out.

`[tokens, vocab]` float32 logits exist for one chunk at a time (about 64 MiB); the student's differentiable pass
recomputes its chunk's logits in backward instead of keeping them. Inputs are the final hidden states of the valid
completion positions, flattened to `(n, hidden)`, and the LM head's weight/bias; logits are divided by the
sampling temperature, as GRPOTrainer's fused LM head does.

The split between scoring and loss time: when the teacher scores a completion, it keeps its hidden states, its
log-normaliser and its entropy (`teacher_statistics`); in the loss the student picks its top-k support from the
logits it computes anyway (`student_topk_logps`), and the teacher's log-probs on that support are a k-row dot
product (`logps_on_support`). No extra student pass, and the support is the current policy's (SPEC §5).
TRL 1.16's `kernels.chunked_divergence.ChunkedDivergenceFunction` (its distillation trainer's) takes the same inputs
but computes a full-vocabulary JSD and returns no teacher entropy; SPEC §5 wants top-k + tail buckets, entropy
weights and a per-token IS ratio, so only the LM-head gathering (`maybe_gather_lm_head_ctx`) is TRL's here.

Under DeepSpeed ZeRO-3 the head is partitioned outside its module's forward: each function gathers it once per call
(forward, and again in the student's backward), whatever the number of positions. Gathering is a collective, so
under ZeRO-3 every process must make the same calls, with or without positions of its own.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from trl.trainer.utils import maybe_gather_lm_head_ctx

LOGITS_PER_CHUNK = 2**24


def _gathered(weight, bias):
    # A snapshot of a head (a plain tensor, not a ZeRO-3 parameter) is already whole.
    return maybe_gather_lm_head_ctx(weight, bias) if hasattr(weight, "ds_id") else nullcontext()


def _chunks(num_positions: int, elements_per_position: int):
    size = max(1, LOGITS_PER_CHUNK // elements_per_position)
    # At least one (possibly empty) chunk, so that no positions give empty results rather than no results.
    return [slice(start, start + size) for start in range(0, max(num_positions, 1), size)]


def _logits(hidden, weight, bias):
    # Softmax statistics in at least fp32, whatever the training dtype.
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _log_softmax(hidden, weight, bias, temperature):
    return torch.log_softmax(_logits(hidden, weight, bias) / temperature, dim=-1)


@torch.no_grad()
def teacher_statistics(hidden, weight, bias, temperature: float, tokens: torch.Tensor):
    """The teacher's log-normaliser `log Σ_v exp(z_v / T)` `(n,)`, log-prob of the sampled token `(n,)` and
    full-vocabulary entropy `(n,)`."""
    log_normalizer, token_logps, entropy = [], [], []
    with _gathered(weight, bias):
        for chunk in _chunks(hidden.size(0), weight.size(0)):
            scaled = _logits(hidden[chunk], weight, bias) / temperature
            normalizer = torch.logsumexp(scaled, dim=-1)
            logps = scaled - normalizer[:, None]
            log_normalizer.append(normalizer)
            token_logps.append(logps.gather(-1, tokens[chunk, None]).squeeze(-1))
            entropy.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(log_normalizer), torch.cat(token_logps), torch.cat(entropy)


@torch.no_grad()
def logps_on_support(hidden, weight, bias, temperature: float, log_normalizer, support: torch.Tensor):
    """Log-probs `(n, k)` at the token ids `support` of the distribution `teacher_statistics` described: only the
    `k` head rows each position needs, `z_v / T - log_normalizer`, never the whole vocabulary."""
    # In at least fp32: only k rows per position, so precision costs nothing here (the normaliser came from
    # logits in the head's dtype, as GRPOTrainer's own log-probs do).
    dtype = torch.promote_types(weight.dtype, torch.float32)
    out = []
    with _gathered(weight, bias):
        for chunk in _chunks(hidden.size(0), support.size(1) * weight.size(1)):
            ids = support[chunk]
            logits = torch.einsum("nh,nkh->nk", hidden[chunk].to(dtype), weight[ids].to(dtype))
            if bias is not None:
                logits = logits + bias[ids].to(dtype)
            out.append(logits / temperature - log_normalizer[chunk, None])
    return torch.cat(out)


class _TopKLogProbs(torch.autograd.Function):
    """`log_softmax(hidden @ weight.T + bias) / T` at each position's top-k ids and at `tokens`, chunked; returns
    the log-probs `(n, k + 1)` and the ids `(n, k + 1)`. Backward recomputes each chunk's logits. A hand-written
    backward (rather than activation checkpointing) lets the head be gathered once per pass under ZeRO-3 and be
    whole while its gradient is formed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, k, temperature):
        logps, ids = [], []
        with _gathered(weight, bias):
            for chunk in _chunks(hidden.size(0), weight.size(0)):
                chunk_logps = _log_softmax(hidden[chunk], weight, bias, temperature)
                chunk_ids = torch.cat([chunk_logps.topk(k, dim=-1).indices, tokens[chunk, None]], dim=-1)
                ids.append(chunk_ids)
                logps.append(chunk_logps.gather(-1, chunk_ids))
        ids = torch.cat(ids)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.mark_non_differentiable(ids)
        ctx.temperature = temperature
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return torch.cat(logps), ids

    @staticmethod
    def backward(ctx, grad, _):
        hidden, weight, bias, ids = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        grad_hidden = torch.empty_like(hidden)
        with _gathered(weight, bias), torch.autocast(device, dtype=dtype, enabled=enabled):
            grad_weight = torch.zeros_like(weight)
            grad_bias = None if bias is None else torch.zeros_like(bias)
            for chunk in _chunks(hidden.size(0), weight.size(0)):
                logps = _log_softmax(hidden[chunk], weight, bias, ctx.temperature)
                g = grad[chunk].to(logps.dtype)
                # d/dz Σ_j g_j log p(ids_j) = onehot(ids)·g - p Σ_j g_j, then the 1/T of the logits
                grad_logits = (logps.exp() * -g.sum(-1, keepdim=True)).scatter_add_(-1, ids[chunk], g)
                grad_logits = (grad_logits / ctx.temperature).to(weight.dtype)
                grad_hidden[chunk] = (grad_logits @ weight).to(hidden.dtype)
                grad_weight.addmm_(grad_logits.T, hidden[chunk].to(weight.dtype))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def student_topk_logps(hidden, weight, bias, temperature: float, tokens: torch.Tensor, k: int):
    """The policy's top-k token ids per position `(n, k)` (chosen without gradient), and its differentiable
    log-probs on them `(n, k)` and of the sampled token `(n,)`."""
    logps, ids = _TopKLogProbs.apply(hidden, weight, bias, tokens, k, temperature)
    return ids[:, :-1], logps[:, :-1], logps[:, -1]

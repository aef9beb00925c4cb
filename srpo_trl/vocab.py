"""Vocabulary-sized work in chunks of positions (SPEC §7): hidden states in, only what the loss needs out.

`[tokens, vocab]` float32 logits exist for one chunk at a time (about 64 MiB); the student's differentiable pass
recomputes its chunk's logits in backward instead of keeping them. Inputs are the final hidden states of the valid
completion positions, flattened to `(n, hidden)`, and the LM head's weight/bias; logits are divided by the
sampling temperature, as GRPOTrainer's fused LM head does.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import maybe_gather_lm_head_ctx

LOGITS_PER_CHUNK = 2**24


def _chunks(hidden: torch.Tensor, weight: torch.Tensor):
    size = max(1, LOGITS_PER_CHUNK // weight.size(0))
    # At least one (possibly empty) chunk, so that no positions give empty results rather than no results.
    return [slice(start, start + size) for start in range(0, max(hidden.size(0), 1), size)]


def _log_softmax(hidden, weight, bias, temperature):
    # ZeRO-3 keeps the head partitioned outside its module's forward; gather it for this direct use.
    with maybe_gather_lm_head_ctx(weight, bias):
        logits = F.linear(hidden.to(weight.dtype), weight, bias)
    # Softmax statistics in at least fp32, whatever the training dtype.
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


@torch.no_grad()
def student_topk_support(hidden, weight, bias, temperature: float, tokens: torch.Tensor, k: int):
    """The sampling policy's top-k token ids per position `(n, k)` and its log-prob of the sampled token `(n,)`."""
    support, token_logps = [], []
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
    for chunk in _chunks(hidden, weight):
        logps = _log_softmax(hidden[chunk], weight, bias, temperature)
        support_logps.append(logps.gather(-1, support[chunk]))
        token_logps.append(logps.gather(-1, tokens[chunk, None]).squeeze(-1))
        entropy.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(support_logps), torch.cat(token_logps), torch.cat(entropy)


def student_support_logps(hidden, weight, bias, temperature: float, tokens: torch.Tensor, support: torch.Tensor):
    """Differentiable student log-probs on `support` `(n, k)` and of the sampled token `(n,)`."""

    def score(hidden_chunk, weight, bias, tokens_chunk, support_chunk):
        logps = _log_softmax(hidden_chunk, weight, bias, temperature)
        return logps.gather(-1, support_chunk), logps.gather(-1, tokens_chunk[:, None]).squeeze(-1)

    outputs = [
        checkpoint(score, hidden[chunk], weight, bias, tokens[chunk], support[chunk], use_reentrant=False)
        for chunk in _chunks(hidden, weight)
    ]
    return torch.cat([out[0] for out in outputs]), torch.cat([out[1] for out in outputs])

"""Vocabulary-sized work in chunks of positions (method §7): hidden states in, only what the loss needs out.

`[tokens, vocab]` float32 logits exist for one chunk at a time; the student's differentiable pass recomputes its
chunk's logits in backward instead of keeping them. Chunks are sized by device (`logits_per_chunk`): 2**24 logits
(64 MiB, 110 positions at Qwen3's vocabulary of 151,936) on a CPU, where larger tiles only miss the caches; on a CUDA
GPU a share of the free memory, up to 2**30 logits: each chunk reads the whole LM head (1.24 GB for Qwen3-8B in
bf16), so CPU-sized chunks would re-read it thousands of times per step. Inputs are the final hidden states of the valid
completion positions, flattened to `(n, hidden)`, and the LM head's weight/bias.

One distribution, one set of logits (method §12). `Logits` turns hidden states into logits the way TRL's fused LM head
does, so SRPO's log-probs are GRPOTrainer's: the head's product rounded to the compute dtype (bf16 in a bf16 run),
then, in fp32, the model's logit scaling and soft-capping and the sampling temperature. A teacher's log-normaliser,
entropy and log-probs on a support all come from those same rounded logits, so an identical teacher and student give
a divergence of zero in bf16 as in fp32.

The split between scoring and loss time: when the teacher scores a completion, it keeps its hidden states, its
log-normaliser and its entropy (`teacher_statistics`); in the loss the student picks its top-k support from the
logits it computes anyway (`student_topk_logps`), and the teacher's log-probs on that support are a k-row dot
product (`logps_on_support`), rounded like the full product. No extra student pass, and the support is the current
policy's (method §5). TRL 1.16's `ChunkedLogProbFunction` returns log-probs and entropy but no top-k, so only its
head gathering (`maybe_gather_lm_head_ctx`) and its fp32 gradient accumulation (`compat.accumulate_fp32`) are used here.

Under DeepSpeed ZeRO-3 the head is partitioned outside its module's forward: each function gathers it once per call
(forward, and again in the student's backward), whatever the number of positions. Under FSDP2 the head is a
`DTensor`, taken whole (`whole`) once per call, its gradient flowing back to the shards. Gathering is a collective,
so every process must make the same calls, with or without positions of its own.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .compat import accumulate_fp32

LOGITS_PER_CHUNK = 2**24  # on CPUs and devices whose free memory torch cannot tell
GPU_MEMORY_SHARE = 1 / 8  # of the free memory (what the caching allocator holds unused included), for one chunk
GPU_MAX_LOGITS_PER_CHUNK = 2**30  # 4 GiB of fp32 logits: beyond it the head's re-reads are negligible
BYTES_PER_LOGIT = 16  # the student's backward holds about four fp32 tiles of the chunk's logits at once


def logit_scale_and_softcap(config) -> tuple[float, float | None]:
    """What a model's own forward does to its LM head's output before the softmax: a multiplier (Cohere's
    `logit_scale`, Falcon-H1's `lm_head_multiplier`; Granite and MiniCPM3 divide by `logits_scaling`, HyperCLOVA X
    multiplies by it) and Gemma's `final_logit_softcapping`. TRL's fused head reads the same fields."""
    text = config.get_text_config()
    scale = next(
        (
            value
            for value in (
                getattr(text, name, None) for name in ("logit_scale", "output_multiplier", "lm_head_multiplier")
            )
            if value is not None
        ),
        None,
    )
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def sampling_logits(hidden: torch.Tensor, fp32_head: bool, temperature: float, scale_and_softcap) -> "Logits":
    """How GRPOTrainer's fused LM head turns `hidden` states into the sampling distribution's logits in the current
    autocast context (fp32 with `cast_lm_head_to_fp32`): SRPO's log-probs are then GRPOTrainer's, in bf16 as in
    fp32."""
    if fp32_head:
        dtype = torch.float32
    elif torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = hidden.dtype
    return Logits(dtype, temperature, *scale_and_softcap)


@dataclass(frozen=True)
class Logits:
    """How hidden states become the logits of the sampling distribution.

    Attributes:
        dtype: the dtype the head's product is rounded to (the model's, or autocast's; fp32 with TRL's
            `cast_lm_head_to_fp32`), as the model's own matmul rounds it.
        temperature: the sampling temperature the logits are divided by, as GRPOTrainer's fused head does.
        scale, softcap: `logit_scale_and_softcap` of the model.
    """

    dtype: torch.dtype
    temperature: float = 1.0
    scale: float = 1.0
    softcap: float | None = None

    @property
    def softmax_dtype(self) -> torch.dtype:
        """Softmax statistics run in at least fp32."""
        return torch.promote_types(self.dtype, torch.float32)

    def head_product(self, hidden, weight, bias) -> torch.Tensor:
        """`hidden @ weight.T (+ bias)` rounded to `dtype`, returned in `softmax_dtype` (no scaling yet)."""
        product = hidden.to(self.dtype) @ weight.to(self.dtype).T
        if bias is not None:
            product = product + bias.to(self.dtype)
        return product.to(self.softmax_dtype)

    def support_product(self, hidden, weight, bias, ids) -> torch.Tensor:
        """`head_product` at the token ids `ids` `(n, k)` only: a k-row dot product, rounded the same way."""
        exact = self.softmax_dtype
        product = torch.einsum("nh,nkh->nk", hidden.to(self.dtype).to(exact), weight[ids].to(self.dtype).to(exact))
        product = product.to(self.dtype)
        if bias is not None:
            product = product + bias[ids].to(self.dtype)
        return product.to(exact)

    def transform(self, product: torch.Tensor) -> torch.Tensor:
        """The model's scaling and soft-capping, then the temperature, in `softmax_dtype`."""
        logits = product * self.scale if self.scale != 1.0 else product
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits / self.temperature

    def __call__(self, hidden, weight, bias) -> torch.Tensor:
        return self.transform(self.head_product(hidden, weight, bias))


def _gathered(weight, bias):
    # A snapshot of a head (a plain tensor, not a ZeRO-3 parameter) is already whole.
    return maybe_gather_lm_head_ctx(weight, bias) if hasattr(weight, "ds_id") else nullcontext()


def whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 head's full tensor (a differentiable all-gather of its `DTensor` shards), as TRL's fused head takes it;
    any other tensor as it is (ZeRO-3 parameters are gathered in place by the functions below)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def logits_per_chunk(device: torch.device) -> int:
    """How many logits a chunk may hold on `device`: on a CUDA device (ROCm included) a share of its free memory,
    capped (fewer than on a CPU only when memory is short); elsewhere `LOGITS_PER_CHUNK`."""
    if device.type != "cuda":
        return LOGITS_PER_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(int(free * GPU_MEMORY_SHARE) // BYTES_PER_LOGIT, GPU_MAX_LOGITS_PER_CHUNK)


def _chunks(num_positions: int, elements_per_position: int, device: torch.device):
    size = max(1, logits_per_chunk(device) // elements_per_position)
    # At least one (possibly empty) chunk, so that no positions give empty results rather than no results.
    return [slice(start, start + size) for start in range(0, max(num_positions, 1), size)]


def _no_autocast(device: torch.device):
    # `Logits` sets every dtype itself; autocast would recast the products behind its back.
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def teacher_statistics(hidden, weight, bias, logits: Logits, tokens: torch.Tensor):
    """The teacher's log-normaliser `log Σ_v exp(z_v)` `(n,)`, log-prob of the sampled token `(n,)` (of each of
    `(n, k)` tokens, when `tokens` has `k` per position) and full-vocabulary entropy `(n,)`, with `z = logits(hidden)`."""
    weight, bias = whole(weight), whole(bias)
    log_normalizer, token_logps, entropy = [], [], []
    with _gathered(weight, bias), _no_autocast(hidden.device):
        for chunk in _chunks(hidden.size(0), weight.size(0), hidden.device):
            # With y = z - max z and S = Σ e^y: log Z = max z + log S, log p(t) = y_t - log S and
            # H = log S - Σ e^y y / S. Four passes over the chunk's logits, no log-probs tile (-25% on CPU).
            y = logits(hidden[chunk], weight, bias)
            top = y.amax(dim=-1, keepdim=True)
            y.sub_(top)
            exp = y.exp()
            total = exp.sum(-1)
            log_total = total.log()
            log_normalizer.append(top.squeeze(-1) + log_total)
            asked = tokens[chunk] if tokens.dim() == 2 else tokens[chunk, None]
            picked = y.gather(-1, asked) - log_total.unsqueeze(-1)
            token_logps.append(picked if tokens.dim() == 2 else picked.squeeze(-1))
            entropy.append(log_total - torch.linalg.vecdot(exp, y) / total)
    return torch.cat(log_normalizer), torch.cat(token_logps), torch.cat(entropy)


@torch.no_grad()
def logps_on_support(hidden, weight, bias, logits: Logits, log_normalizer, support: torch.Tensor):
    """Log-probs `(n, k)` at the token ids `support` of the distribution `teacher_statistics` described: only the
    `k` head rows each position needs, `z_v - log_normalizer`, never the whole vocabulary."""
    weight, bias = whole(weight), whole(bias)
    out = []
    with _gathered(weight, bias), _no_autocast(hidden.device):
        for chunk in _chunks(hidden.size(0), support.size(1) * weight.size(1), hidden.device):
            z = logits.transform(logits.support_product(hidden[chunk], weight, bias, support[chunk]))
            out.append(z - log_normalizer[chunk, None])
    return torch.cat(out)


class _TopKLogProbs(torch.autograd.Function):
    """`log_softmax(logits(hidden))` at each position's top-k ids and at `tokens`, chunked; returns the log-probs
    `(n, k + 1)` and the ids `(n, k + 1)`. Backward recomputes each chunk's logits. A hand-written backward (rather
    than activation checkpointing) lets the head be gathered once per pass under ZeRO-3, be whole while its gradient
    is formed, and accumulate that gradient over chunks in fp32 (in bf16, 400 chunks drift 2.4% from one)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, k, logits: Logits, span):
        logps, ids = [], []
        with _gathered(weight, bias), _no_autocast(hidden.device):
            for chunk in _chunks(hidden.size(0), weight.size(0), hidden.device):
                chunk_logps = torch.log_softmax(logits(hidden[chunk], weight, bias), dim=-1)
                # unsorted: the divergence sums over the support, and sorting the top-k cost as much again on CPU
                with span("student_topk"):
                    support = chunk_logps.topk(k, dim=-1, sorted=False).indices
                chunk_ids = torch.cat([support, tokens[chunk, None]], dim=-1)
                ids.append(chunk_ids)
                logps.append(chunk_logps.gather(-1, chunk_ids))
        ids = torch.cat(ids)
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.mark_non_differentiable(ids)
        ctx.logits = logits
        return torch.cat(logps), ids

    @staticmethod
    def backward(ctx, grad, _):
        hidden, weight, bias, ids = ctx.saved_tensors
        logits: Logits = ctx.logits
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        accumulate = logits.softmax_dtype
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        with _gathered(weight, bias), _no_autocast(hidden.device):
            # A frozen head (PEFT) needs no vocabulary-sized gradient buffer.
            grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if wants_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if wants_bias else None
            weight_in_dtype = weight.to(logits.dtype)
            for chunk in _chunks(hidden.size(0), weight.size(0), hidden.device):
                product = logits.head_product(hidden[chunk], weight, bias).requires_grad_()
                with torch.enable_grad():  # through the scaling and soft-capping, in `softmax_dtype`
                    chosen = torch.log_softmax(logits.transform(product), dim=-1).gather(-1, ids[chunk])
                    (grad_product,) = torch.autograd.grad(chosen, product, grad[chunk].to(product.dtype))
                # The gradient GEMMs run in the logits' dtype, as TRL's fused head does; the weight's gradient is
                # accumulated over chunks in fp32, not rounded to bf16 chunk after chunk.
                grad_product = grad_product.to(logits.dtype)
                if grad_hidden is not None:
                    grad_hidden[chunk] = (grad_product @ weight_in_dtype).to(hidden.dtype)
                if grad_weight is not None:
                    hidden_chunk = hidden[chunk].to(logits.dtype)
                    if grad_product.dtype == accumulate:
                        grad_weight.addmm_(grad_product.T, hidden_chunk)
                    else:
                        accumulate_fp32(grad_weight, grad_product.T, hidden_chunk)
                if grad_bias is not None:
                    grad_bias += grad_product.sum(0, dtype=accumulate)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def student_topk_logps(hidden, weight, bias, logits: Logits, tokens: torch.Tensor, k: int, span=None):
    """The policy's top-k token ids per position `(n, k)` (chosen without gradient), and its differentiable
    log-probs on them `(n, k)` and of the sampled token `(n,)`. `span(name)` times the top-k selection
    (`student_topk`)."""
    span = span or (lambda name: nullcontext())
    logps, ids = _TopKLogProbs.apply(hidden, whole(weight), whole(bias), tokens, k, logits, span)
    return ids[:, :-1], logps[:, :-1], logps[:, -1]

"""Memory per GPU of the shipped recipes (Qwen3-8B / Qwen3-4B, 8 GPUs of 80 GiB, DeepSpeed ZeRO-3, vLLM colocated
with sleep mode): the estimate behind `vllm_max_model_length` in recipes/ and the table of docs/scaling.md.

    python benchmarks/memory_estimate.py         # the table docs/scaling.md quotes

Counted, not measured: `benchmarks/memory_probe.py` measures the activation terms on one GPU (2 and 4 layers of a
Qwen3-8B-width model) and prints them beside `probe_estimate`, the same formulas for its own layout. Every figure is
in bytes; the formulas' assumptions are in docs/scaling.md, "Memory per GPU".
"""

from dataclasses import dataclass

GIB = 2**30
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o; k, v
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden + 2 * self.head_dim

    @property
    def outer_params(self) -> int:
        """Embedding and LM head (one matrix when tied), final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.outer_params

    def kv_bytes_per_token(self, layers: int | None = None) -> int:
        """Keys and values of one token in bf16 (vLLM's and the teacher's prefix cache)."""
        return (self.layers if layers is None else layers) * self.kv_heads * self.head_dim * 2 * BF16


QWEN3_8B = Model("Qwen3-8B", 36, 4096, 12288, 32, 8, 128, 151936, tied=False)
QWEN3_4B = Model("Qwen3-4B", 36, 2560, 9728, 32, 8, 128, 151936, tied=True)


@dataclass(frozen=True)
class Layout:
    """The recipes' settings that size memory (recipes/qwen3_*/srpo.yaml)."""

    gpus: int = 8
    gpu_bytes: int = 80 * GIB
    micro_batch: int = 4  # per_device_train_batch_size: rows per forward, the teacher's too
    sequences_per_gpu: int = 32  # TRL 1.16's vLLM max_num_seqs: per_device_train_batch_size x steps_per_generation
    prompt: int = 2048  # longest prompt (the paper's bound)
    completion: int = 8192  # max_completion_length
    teacher_prompt: int = 10240  # max_teacher_prompt_length
    routed_fraction: float = 0.4
    vllm_utilization: float = 0.35
    vllm_overhead: int = 2 * GIB  # CUDA graphs, the profiling forward, NCCL and allocator slack (vLLM's own log)
    eval_batch: int = 8  # per_device_eval_batch_size (generate without vLLM)

    @property
    def max_model_length(self) -> int:
        return self.prompt + self.completion  # the recipes' vllm_max_model_length


def sharded_state(model: Model, layout: Layout) -> dict[str, int]:
    """What ZeRO-3 partitions over the GPUs: bf16 weights and gradients, fp32 master weights and Adam moments (16 bytes
    a parameter, the ZeRO paper's count), the teacher's bf16 weights and its fp32 EMA accumulators."""
    shard = model.params / layout.gpus
    return {
        "policy weights + gradients (bf16)": int(2 * BF16 * shard),
        "fp32 master weights + Adam moments": int(3 * FP32 * shard),
        "teacher weights (bf16) + fp32 EMA": int((BF16 + FP32) * shard),
    }


def gathered_weights(model: Model) -> int:
    """ZeRO-3 gathers a module for its forward and prefetches the next: the LM head (or embedding) and two layers."""
    return BF16 * (model.vocab * model.hidden + 2 * model.layer_params)


def vllm_awake(model: Model, layout: Layout) -> dict[str, int]:
    budget = int(layout.vllm_utilization * layout.gpu_bytes)
    weights = BF16 * model.params
    return {"budget": budget, "weights": weights, "overhead": layout.vllm_overhead,
            "kv_cache": budget - weights - layout.vllm_overhead}  # fmt: skip


def vllm_kv_sequences(model: Model, layout: Layout, length: int) -> float:
    """Sequences of `length` tokens vLLM's KV cache holds at once (it starts only if this is at least 1)."""
    return vllm_awake(model, layout)["kv_cache"] / (length * model.kv_bytes_per_token())


def layer_working_set(model: Model, rows: int, tokens: int) -> int:
    """One decoder layer's activations in flight over `rows` x `tokens` (bf16): the MLP's gate, up and product and the
    attention's q, k, v and output beside the residual stream."""
    per_token = 3 * model.intermediate + 2 * model.hidden + 2 * model.heads * model.head_dim
    return BF16 * rows * tokens * per_token


def training_activations(model: Model, rows: int, tokens: int, layers: int | None = None) -> dict[str, int]:
    """Gradient checkpointing: each layer keeps its input; backward recomputes one layer at a time (its forward
    activations and their gradients, twice the working set); the LM head works in chunks (TRL's fused head, SRPO's
    vocabulary chunks), counted as its bf16 gradient-sized buffers."""
    layers = model.layers if layers is None else layers
    return {
        "checkpoints": layers * BF16 * rows * tokens * model.hidden,
        "recomputed layer": 2 * layer_working_set(model, rows, tokens),
        "final hidden + gradient": 2 * FP32 * rows * tokens * model.hidden,
    }


def teacher_working_set(model: Model, rows: int, completion: int, teacher_prompt: int, layers: int) -> int:
    """No gradient: the larger of the prefix pass (one group's teacher prompt) and the continuation (the routed rows'
    completions over the prefix's cached keys and values), plus that KV cache."""
    passes = max(layer_working_set(model, 1, teacher_prompt), layer_working_set(model, rows, completion))
    return passes + teacher_prompt * model.kv_bytes_per_token(layers)


def teacher_pass(model: Model, layout: Layout) -> dict[str, int]:
    """The teacher's scoring over a micro-batch of routed rows, and what it keeps until the loss: 8 KiB for Qwen3-8B
    per routed token (final hidden state, bf16; log-normaliser and weight, fp32) over the generation batch."""
    routed_tokens = layout.routed_fraction * layout.sequences_per_gpu * layout.completion
    pass_bytes = teacher_working_set(model, layout.micro_batch, layout.completion, layout.teacher_prompt, model.layers)
    return {"teacher forward": pass_bytes, "kept for the loss": int(routed_tokens * (BF16 * model.hidden + 2 * FP32))}


def per_gpu_table(model: Model, layout: Layout = Layout()) -> list[tuple[str, float]]:
    """(phase, GiB) rows: the persistent state, then each phase's peak over it."""
    state = sum(sharded_state(model, layout).values())
    awake, asleep = vllm_awake(model, layout), layout.vllm_overhead
    gathered = gathered_weights(model)
    train = sum(training_activations(model, layout.micro_batch, layout.max_model_length).values())
    teacher = sum(teacher_pass(model, layout).values())
    evaluation = layout.eval_batch * layout.max_model_length * model.kv_bytes_per_token() + BF16 * model.params
    rows = [
        *[(name, value) for name, value in sharded_state(model, layout).items()],
        ("vLLM awake (weights + KV cache + overhead)", awake["budget"]),
        ("  of which KV cache", awake["kv_cache"]),
        ("vLLM asleep (level 2)", asleep),
        ("generation: state + vLLM awake + gathered", state + awake["budget"] + gathered),
        ("teacher pass: state + vLLM asleep + gathered + pass", state + asleep + gathered + teacher),
        ("training step: state + vLLM asleep + gathered + activations", state + asleep + gathered + train),
        ("evaluation without vLLM: state + whole policy + KV of the eval batch", state + evaluation),
    ]
    return [(name, value / GIB) for name, value in rows]


def markdown(layout: Layout = Layout()) -> str:
    models = (QWEN3_8B, QWEN3_4B)
    tables = [per_gpu_table(model, layout) for model in models]
    lines = ["| per GPU (GiB) | " + " | ".join(m.name for m in models) + " |", "|---|" + "---:|" * len(models)]
    for i, (name, _) in enumerate(tables[0]):
        lines.append(f"| {name} | " + " | ".join(f"{table[i][1]:.1f}" for table in tables) + " |")
    for model in models:
        sequences = vllm_kv_sequences(model, layout, layout.max_model_length)
        lines.append(
            f"\n{model.name}: {model.params / 1e9:.2f} B parameters, KV cache "
            f"{model.kv_bytes_per_token() / 2**10:.0f} KiB a token; vLLM's cache holds {sequences:.1f} sequences of "
            f"{layout.max_model_length} tokens at once ({vllm_kv_sequences(model, layout, 40960):.1f} of 40,960)."
        )
    return "\n".join(lines)


def probe_estimate(model: Model, layers: int, rows: int, tokens: int, routed_rows: int, teacher_prompt: int):
    """The estimate for `benchmarks/memory_probe.py`'s layout (one GPU, nothing sharded, `layers` layers, a
    micro-batch of `rows` rows of `tokens` tokens, `routed_rows` of them taught through a `teacher_prompt`-token
    prefix): each phase's peak over the memory allocated when it starts, in bytes. The forward/backward phase also
    allocates the whole bf16 gradient (ZeRO-3 would reduce-scatter it)."""
    params = layers * model.layer_params + model.outer_params
    train = sum(training_activations(model, rows, tokens, layers).values()) + BF16 * params
    teacher = teacher_working_set(model, routed_rows, tokens, teacher_prompt, layers) if routed_rows else 0
    return {"prepare": teacher, "forward_backward": train}


if __name__ == "__main__":
    print(markdown())

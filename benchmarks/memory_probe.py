"""Memory measured, not estimated: one step of SRPO and of GRPO (`SRPOTrainer` with `routing="grpo"`) on one GPU with a
Qwen3-8B-width model (hidden 4096, intermediate 12288, 32 heads, 8 KV heads of 128, vocabulary 151,936, bf16) of 2
and 4 layers, gradient checkpointing on, a micro-batch of 4 rollouts of long completions, 2 of them routed to the
teacher (whose prompt holds a correct sibling's completion as long: a long teacher prompt).

Generation is replayed (benchmarks/step_cost/harness.py: fixed completions in place of sampling), so the phases are
the trainer's own: `prepare` (rewards, routing, the teacher's scoring), `forward_backward` (the loss and its
gradient), `optimizer` (AdamW and the teacher's EMA). Each phase's peak is `torch.cuda.max_memory_allocated` over the
memory allocated when it starts. Two depths give a per-layer slope and an intercept; slope x 36 + intercept is the
measured Qwen3-8B figure, printed beside the estimate of docs/scaling.md ("Memory per GPU"; the formulas are
`benchmarks/memory_estimate.py`'s, for this one-GPU layout: `probe_estimate`).

    python3 benchmarks/memory_probe.py --out memory_probe.json       # one GPU, about 2 minutes
    python3 benchmarks/memory_probe.py --dry --out /tmp/probe.json   # CPU, tiny widths: the logic, in seconds
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `benchmarks.*` from the repository

import torch  # noqa: E402

from benchmarks import memory_estimate as estimate  # noqa: E402
from benchmarks.step_cost import harness  # noqa: E402

QWEN3_8B_WIDTH = harness.Shape(
    "qwen3-8b-width", vocab=151936, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128,
    num_prompts=1, group=4, prompt_chars=64, completion_len=8192,
)  # fmt: skip
DRY = replace(
    QWEN3_8B_WIDTH, name="dry", vocab=1024, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
    completion_len=24, topk=8,
)  # fmt: skip
DEPTHS = (2, 4)
ARMS = {"srpo": "srpo", "grpo": "grpo"}  # label: SRPOConfig.routing
ROUTED_FRACTION = 0.5  # 2 of the group's 4 rollouts fail beside correct siblings: both go to the teacher
PHASES = ("prepare", "forward_backward", "optimizer")
TARGET_LAYERS = estimate.QWEN3_8B.layers


def build_model(shape: harness.Shape, tokenizer, device: str):
    """A randomly initialised Qwen3 of `shape`, built on `device` in bf16 (GPU) or fp32 (CPU), seeded."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=40960, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def measure(arm: str, shape: harness.Shape, device: str, work: str) -> dict:
    """One optimizer step of `arm` on `shape`: each phase's seconds, peak over its start and memory at its start
    (`start_bytes`: the weights, the teacher and its EMA, the optimizer state once it exists)."""
    tokenizer = harness.char_tokenizer()
    reward = harness.PositionalReward(shape.group)
    completions = harness.replay_completions(tokenizer, shape)
    model = build_model(shape, tokenizer, device)
    trainer = harness.build_trainer(
        "srpo", shape, "", tokenizer, reward, completions, device, work, model=model, routing=ARMS[arm],
        gradient_checkpointing=True, max_teacher_prompt_length=4 * shape.completion_len,
    )  # fmt: skip
    trainer.bench_probe = harness.Probe(device, memory=True)
    failures = harness.failures_per_group(ROUTED_FRACTION, shape.num_prompts, shape.group)
    record = harness.run_step(trainer, reward, failures)
    record["routed_rows"] = sum(failures) if arm == "srpo" else 0
    record["max_allocated"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return record


def fit(points: list[tuple[int, float]]) -> dict:
    """Slope per layer and intercept (0 layers) through two (layers, bytes) points, and their extrapolation to 36
    layers."""
    (l1, v1), (l2, v2) = points
    slope = (v2 - v1) / (l2 - l1)
    intercept = v1 - slope * l1
    return {"per_layer": slope, "intercept": intercept, f"at_{TARGET_LAYERS}": intercept + slope * TARGET_LAYERS}


def model_of(shape: harness.Shape) -> estimate.Model:
    return estimate.Model(
        shape.name, 0, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab,
        tied=False,
    )  # fmt: skip


def compare(runs: list[dict], shape: harness.Shape) -> list[dict]:
    """Per arm and phase: measured and estimated slope, intercept and 36-layer figure."""
    model, rows = model_of(shape), shape.batch
    tokens = shape.completion_len + len(harness.prompt_text(shape))
    teacher_prompt = tokens  # the prompt and a demonstration as long as the completion (and a few template tokens)
    table = []
    for arm in ARMS:
        arm_runs = sorted((r for r in runs if r["arm"] == arm and "phases" in r), key=lambda r: r["layers"])
        if len(arm_runs) != len(DEPTHS):
            continue
        for phase in ("prepare", "forward_backward"):
            measured = fit([(r["layers"], r["phases"][phase]["peak_bytes"] or 0) for r in arm_runs])
            estimated = fit(
                [
                    (r["layers"], estimate.probe_estimate(model, r["layers"], rows, tokens, r["routed_rows"],
                                                          teacher_prompt)[phase])
                    for r in arm_runs
                ]
            )  # fmt: skip
            table.append({"arm": arm, "phase": phase, "measured": measured, "estimated": estimated})
    return table


def markdown(table: list[dict]) -> str:
    mib = 2**20
    lines = [
        f"| arm | phase | per layer, measured / estimated (MiB) | intercept | at {TARGET_LAYERS} layers |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        m, e = row["measured"], row["estimated"]
        cells = [f"{m[k] / mib:.0f} / {e[k] / mib:.0f}" for k in ("per_layer", "intercept", f"at_{TARGET_LAYERS}")]
        lines.append(f"| {row['arm']} | {row['phase']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny widths: the probe's logic in seconds")
    parser.add_argument("--completion", type=int, default=None, help="completion tokens (default 8192; dry 24)")
    parser.add_argument("--out", default="memory_probe.json")
    args = parser.parse_args(argv)
    if args.dry:
        torch.set_num_threads(1)
    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry for the CPU logic check")
    base = DRY if args.dry else QWEN3_8B_WIDTH
    if args.completion:
        base = replace(base, completion_len=args.completion)
    runs, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="srpo-memory-probe-") as work:
        for layers in DEPTHS:
            shape = replace(base, layers=layers)
            for arm in ARMS:
                record = {"arm": arm, "layers": layers}
                try:
                    record.update(measure(arm, shape, device, work))
                except Exception as error:  # noqa: BLE001 - recorded; the other configurations still run
                    record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
                runs.append(record)
                peaks = {p: v["peak_bytes"] for p, v in record.get("phases", {}).items()}
                print(f"[{arm}, {layers} layers] " + (record.get("error") or json.dumps(peaks)), flush=True)
    table = compare(runs, base)
    result = {
        "shape": asdict(base),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry: tiny widths, resident set)",
        "seconds": time.perf_counter() - started,
        "runs": runs,
        "comparison": table,
        "markdown": markdown(table),
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()

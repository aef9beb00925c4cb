"""The step-cost benchmark's command line (run from the repository root).

Step time of each arm as the routed fraction f grows, SRPO's teacher forward with and without one teacher prefix per
group, a profile, and peak memory as the vocabulary and the completion length grow. `harness.py` measures (method in
its docstring and in RESULTS.md), `report.py` writes the tables.

Usage:
    python -m benchmarks.step_cost --quick                  # a few minutes: tiny shape, 3 repeats, 2 sweep points
    python -m benchmarks.step_cost                          # full CPU run (tiny and small shapes)
    python -m benchmarks.step_cost --write-results          # ... and rewrite this device's block of RESULTS.md
    python -m benchmarks.step_cost --report benchmarks/results-cpu-full.json --write-results   # the block again,
                                                            # from the saved records, without measuring
    benchmarks/gpu.sh --write-results                       # one GPU, bf16, Qwen3-0.6B-shaped model
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import harness, report

BENCHMARKS = Path(__file__).resolve().parents[1]  # RESULTS.md, and where the JSON and the PNG go by default


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes: tiny shape, 3 repeats")
    parser.add_argument("--toy", action="store_true", help="seconds: what tests/end_to_end/test_benchmarks.py runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="override the mode's number of repeats")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", default=None, help="folder for the JSON and the PNG (default: benchmarks/)")
    parser.add_argument("--write-results", action="store_true", help="rewrite this device's block of RESULTS.md")
    parser.add_argument("--report", default=None, metavar="JSON", help="report saved records instead of measuring")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.memory_worker:
        record = harness.memory_worker(args.memory_worker)
        print(json.dumps(record))
        return record
    out = Path(args.out) if args.out else BENCHMARKS
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
    else:
        saved = measure(args, argv)
        name = f"results-{saved['device']}-{saved['mode']}.json"
        (out / name).write_text(json.dumps(saved, indent=1, default=str))
    device, mode = saved["device"], saved["mode"]
    plan = harness.plan_for(mode, device)
    text = report.report(saved["timing"], saved["memory"], plan.timing_shapes, device, saved["preamble"])
    if saved["timing"]:
        png = out / f"step_time_vs_f_{device}{'' if mode == 'full' else '_' + mode}.png"
        report.plot(saved["timing"], plan.timing_shapes, png, device)
        text += f"\n\n![step time vs f]({png.name})"
    print("\n" + text)
    if args.write_results:
        report.write_block(BENCHMARKS / "RESULTS.md", device, text)
    return {**saved, "report": text}


def measure(args, argv) -> dict:
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    mode = "toy" if args.toy else "quick" if args.quick else "full"
    plan = harness.plan_for(mode, device)
    if args.repeats:
        plan.repeats = args.repeats
    if device == "cpu" and plan.malloc == "cache" and not harness.set_malloc("cache"):
        print("glibc mallopt unavailable: timing with the platform allocator", flush=True)
    command = " ".join(["python -m benchmarks.step_cost", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    timing, memory = [], []
    if not args.skip_timing:
        for shape in plan.timing_shapes:
            print(f"timing {shape.name} on {device} ...", flush=True)
            timing += harness.time_shape(shape, plan, device)
    if not args.skip_memory:
        print("memory ...", flush=True)
        memory = harness.memory_runs(plan, device)
    minutes = (time.perf_counter() - started) / 60
    preamble = f"Measured with `{command}` ({mode} mode, {minutes:.1f} min) on: {report.environment(device)}"
    if device == "cpu":
        preamble += f" CPU timing with glibc's `{plan.malloc}` allocator policy."
    return {"device": device, "mode": mode, "preamble": preamble, "timing": timing, "memory": memory}


if __name__ == "__main__":
    main()

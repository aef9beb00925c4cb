"""The learning benchmark on a real pretrained model: SmolLM2-135M-Instruct (the Q4_1 GGUF weights dequantized,
`make real-model`), post-trained with GRPO, SDPO, SRPO, SRPO with the frozen initial model as teacher
(`teacher_model_kind="base"`), SRPO whose routed rollouts keep GRPO's advantage (`routed_grpo_weight=1.0`) and SRPO
with a reliability gate (`min_teacher_solution_prob=0.5`), on one family of `tasks.FAMILIES` per invocation.

1. **Abilities**: on each candidate family of `tasks.FAMILIES`, the student's greedy and sampled accuracy and the
   self-teacher's with the correct answer shown (the package's teacher prompt), and how many sampled groups mix right
   and wrong answers.
2. **Rate**: GRPO and SRPO at each of `LEARNING_RATES` on seed 100 (outside the comparison); the rate with the best
   mean final accuracy of the two is every arm's (`--lr` gives it instead, for a rerun of some arms).
3. **Comparison**: every arm at that rate on seeds 1 .. `--seeds`, paired by seed (the same problems in the same
   order, the same evaluation samples), in `comparison_order`'s order so that a partial run still pairs.

Runs are saved as they go (`<out>/runs/<name>/<method>-lr<rate>-seed<k>.json`, `<name>` the family by default, rewritten at each evaluation) and a saved,
finished run of the same settings and code is not run again. `report.py` writes the tables and figures into RESULTS.md's block `<name>`.

Usage:
    make bench-real                                   # both families: run.py --jobs 2 --family capital, then addition
    python benchmarks/real_model/run.py --family addition --report-only  # rebuild a block from the saved runs
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_harness as harness  # noqa: E402  (puts benchmarks/learning, whose report.py is another, on the path)

_spec = importlib.util.spec_from_file_location("real_model_report", HERE / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

LEARNING_RATES = (1e-5, 3e-5)
RATE_SEED = 100
RATE_METHODS = ("grpo", "srpo")
TRAINED = ("capital", "addition")  # the families with mixed groups (the abilities table), trained on
CANDIDATES = ("capital", "addition", "larger")
ABILITY_PROBLEMS = 16
# The comparison's order, so that a run cut short still pairs what matters most: GRPO and SRPO on every seed, then
# the arms that separate SRPO's causes seed by seed (the GRPO signal routing removes; the teacher; the teacher's
# wrong targets), then SDPO.
FIRST, CAUSES, LAST = ("grpo", "srpo"), ("srpo_routed_grpo", "srpo_base_teacher", "srpo_gated"), ("sdpo",)
ARMS = FIRST + CAUSES + LAST


def comparison_order(lr: float, seeds: list[int], arms=ARMS) -> list[tuple[str, float, int]]:
    """Every arm of `arms` at `lr` on every seed, in the order above."""
    first, causes, last = ([m for m in part if m in arms] for part in (FIRST, CAUSES, LAST))
    return (
        [(m, lr, s) for m in first for s in seeds]
        + [(m, lr, s) for s in seeds for m in causes]
        + [(m, lr, s) for m in last for s in seeds]
    )


def measure_abilities(family: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    import abilities
    import tasks

    from srpo_trl.testbed.real_model import real_model_and_tokenizer

    model, tokenizer = real_model_and_tokenizer()
    dataset = tasks.make_dataset(family, ABILITY_PROBLEMS, seed=0)
    started = time.process_time()
    result = abilities.measure(model, tokenizer, dataset, k=4, max_new_tokens=12)
    result["cpu_seconds"] = time.process_time() - started
    out.write_text(json.dumps({"family": family, "problems": ABILITY_PROBLEMS, **result}))


def finished(path: Path, settings: harness.Settings) -> bool:
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    return record.get("done") and record["settings"] == json.loads(json.dumps(dataclasses.asdict(settings)))


class Pool:
    """`jobs` worker processes (one torch thread each) over a queue of command lines."""

    def __init__(self, jobs: int, out: Path):
        self.jobs, self.out, self.running, self.failures = jobs, out, [], []

    def run(self, commands: list[tuple[str, list[str]]], elsewhere: dict[str, int] | None = None) -> None:
        """Runs `commands`, but not those in `elsewhere` (name: the process id of a run already going, outside this
        pool), which hold a slot until their process ends."""
        queue = [(name, argv) for name, argv in commands if name not in (elsewhere or {})]
        outside = dict(elsewhere or {})
        while queue or self.running:
            for name, pid in list(outside.items()):
                if not _alive(pid):
                    del outside[name]
                    print(f"{name}: ended (outside this pool)", flush=True)
            while queue and len(self.running) + len(outside) < self.jobs:
                name, argv = queue.pop(0)
                log = open(self.out / f"{name}.log", "w")
                process = subprocess.Popen([sys.executable, str(HERE / "run.py"), *argv], stdout=log,
                                           stderr=subprocess.STDOUT)  # fmt: skip
                self.running.append((process, name, log, time.monotonic()))
                print(f"started {name}", flush=True)
            time.sleep(1)
            for item in [item for item in self.running if item[0].poll() is not None]:
                process, name, log, since = item
                self.running.remove(item)
                log.close()
                status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode}, see {name}.log)"
                if process.returncode:
                    self.failures.append(name)
                print(f"{name}: {status}, {time.monotonic() - since:.0f} s", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--family", choices=TRAINED, default="capital")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--lr", type=float, help="every arm's rate (no rate stage); the rate stage chooses otherwise")
    parser.add_argument("--name", help="the runs' folder and RESULTS.md block (default: the family)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "LR", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--abilities", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--running", nargs="*", default=[], metavar="NAME=PID", help="runs already going elsewhere")
    args = parser.parse_args(argv)
    name = args.name or args.family
    runs = args.out / "runs" / name
    runs.mkdir(parents=True, exist_ok=True)
    settings = harness.Settings(family=args.family, steps=args.steps, eval_every=args.eval_every)
    if args.abilities:
        measure_abilities(args.abilities, runs.parent / f"abilities-{args.abilities}.json")
        return
    if args.worker:
        method, lr, seed = args.worker
        harness.run_one(
            method, float(lr), int(seed), settings, runs / f"{harness.run_name(method, float(lr), int(seed))}.json"
        )
        return
    common = ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--out", str(args.out),
              "--family", args.family, "--name", name]  # fmt: skip
    if not args.report_only:
        pool = Pool(args.jobs, runs)

        def arm(method, lr, seed):
            name = harness.run_name(method, lr, seed)
            return name, ["--worker", method, repr(lr), str(seed), *common]

        todo = [(f"abilities-{f}", ["--abilities", f, *common]) for f in CANDIDATES
                if not (runs.parent / f"abilities-{f}.json").exists()]  # fmt: skip
        rate_arms = [] if args.lr else [(m, lr, RATE_SEED) for m in RATE_METHODS for lr in LEARNING_RATES]
        todo += [arm(*a) for a in rate_arms if not finished(runs / f"{harness.run_name(*a)}.json", settings)]
        pool.run(todo)
        lr = args.lr or report.chosen_rate(report.load_runs(runs), LEARNING_RATES, RATE_SEED)
        print(f"rate: {lr:.0e}", flush=True)
        compare = comparison_order(lr, list(range(1, args.seeds + 1)), args.arms)
        elsewhere = {name: int(pid) for name, pid in (item.split("=") for item in args.running)}
        pool.run(
            [arm(*a) for a in compare if not finished(runs / f"{harness.run_name(*a)}.json", settings)], elsewhere
        )

    print(
        report.write_report(
            args.out, name, settings, " ".join(["python", "benchmarks/real_model/run.py", *(argv or sys.argv[1:])])
        )
    )


if __name__ == "__main__":
    main()

"""Learning efficacy on the CPU testbed: GRPO, SDPO, SRPO and SRPO's two ablations, several seeds each.

Every arm is `SRPOTrainer` with one `routing` mode (SPEC §8) and otherwise identical settings, post-training the
pre-trained testbed model (`srpo_trl.testbed`, tiny character-level Qwen3 on two-digit additions) on the RL train
split. Held-out accuracy (avg@k on the test split, `srpo_trl.evaluation.avg_at_k`) is measured before training and
every `--eval-every` RL steps. One RL step is one generation batch (`--prompts` prompts x 8 rollouts); GRPO takes
4 optimizer steps per generation batch, as in the paper, and every other arm one.

Per-method learning rates are the paper's (SRPO 5e-6, GRPO 1e-6, SDPO 1e-5, i.e. 5 : 1 : 10), all multiplied by
one common factor (`--lr-scale`) for the testbed's scale; the ablations use SRPO's.

Usage:
    python benchmarks/learning/run.py             # full run (about 20-25 minutes on 2 cores), writes RESULTS.md
    python benchmarks/learning/run.py --quick     # a couple of minutes, writes benchmarks/learning/quick/
    python benchmarks/learning/run.py --report-only   # rebuild RESULTS.md and the PNGs from the saved runs

Outputs (in `--out`, default `benchmarks/learning`): `runs/<arm>-seed<k>.json` (settings, evaluation curve, the
trainer's log history), `RESULTS.md` (the generated block between the `learning:begin/end` markers is replaced,
the hand-written text around it is kept) and `accuracy.png`, `accuracy_vs_time.png`, `routed_fraction.png`,
`response_length.png`, `teacher_entropy.png`.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRACKIO_DIR", tempfile.gettempdir())

# The paper's learning rates in units of GRPO's 1e-6 (SRPO 5e-6, GRPO 1e-6, SDPO 1e-5), and GRPO's mini-batch of a
# quarter of the generation batch (4 optimizer steps per generation batch). The ablations are SRPO's variants.
ARMS = {
    "grpo": {"label": "GRPO", "routing": "grpo", "dynamic_weighting": True, "lr_units": 1, "steps_per_generation": 4},
    "sdpo": {
        "label": "SDPO",
        "routing": "sdpo",
        "dynamic_weighting": False,
        "lr_units": 10,
        "steps_per_generation": 1,
    },
    "srpo": {"label": "SRPO", "routing": "srpo", "dynamic_weighting": True, "lr_units": 5, "steps_per_generation": 1},
    "srpo_no_dw": {
        "label": "SRPO w/o dynamic weighting",
        "routing": "srpo",
        "dynamic_weighting": False,
        "lr_units": 5,
        "steps_per_generation": 1,
    },
    "advantage_mix": {
        "label": "advantage mix",
        "routing": "advantage_mix",
        "dynamic_weighting": True,
        "lr_units": 5,
        "steps_per_generation": 1,
    },
    # A control, not in the paper: how much of SRPO's gain over GRPO is its larger step
    # (SRPO's learning rate, one optimizer step per generation batch) rather than its routing.
    "grpo_srpo_lr": {
        "label": "GRPO at SRPO's lr, 1 step/batch (control)",
        "routing": "grpo",
        "dynamic_weighting": True,
        "lr_units": 5,
        "steps_per_generation": 1,
    },
}
DEFAULT_ARMS = ("grpo", "sdpo", "srpo", "srpo_no_dw", "advantage_mix", "grpo_srpo_lr")
TABLE1_ARMS = ("grpo", "sdpo", "srpo")
TABLE2_ARMS = ("srpo", "srpo_no_dw", "advantage_mix")
CONTROL_ARMS = ("grpo", "grpo_srpo_lr", "srpo")
COLORS = {"grpo": "tab:blue", "sdpo": "tab:orange", "srpo": "tab:green", "srpo_no_dw": "tab:olive",
          "advantage_mix": "tab:purple", "grpo_srpo_lr": "tab:gray"}  # fmt: skip
ABILITY_PROBLEMS = 100  # test problems `measure_testbed_abilities` probes each trained policy (and teacher) on
MARK_BEGIN, MARK_END = "<!-- learning:begin -->", "<!-- learning:end -->"


@dataclasses.dataclass
class Settings:
    """Everything a run depends on besides its arm and seed (recorded in each run's json)."""

    steps: int = 100  # RL steps = generation batches
    prompts: int = 8  # prompts per generation batch
    num_generations: int = 8  # rollouts per prompt
    lr_scale: float = 20.0  # common factor on the paper's learning rates
    warmup_steps: int = 5  # RL steps of linear warm-up (then constant)
    eval_every: int = 5  # RL steps between held-out evaluations
    eval_k: int = 4
    eval_temperature: float = 0.6  # the paper's evaluation sampling (SPEC §10)
    eval_top_p: float = 0.95
    num_train: int = 1500
    num_test: int = 400
    max_completion_length: int = 24
    distillation_topk: int = 16
    testbed: dict = dataclasses.field(default_factory=dict)  # PretrainConfig overrides ({} = the default testbed)


QUICK = {"steps": 10, "eval_every": 5, "num_test": 100}


# ---------------------------------------------------------------------------------------------------- one run


def run_one(arm: str, seed: int, settings: Settings, path: Path) -> dict:
    """Train one arm with one seed, evaluating every `eval_every` RL steps; save and return the record."""
    import torch

    torch.set_num_threads(1)
    from transformers import PrinterCallback
    from transformers.utils import logging as transformers_logging

    from srpo_trl import SRPOConfig, SRPOTrainer
    from srpo_trl.evaluation import BestWithinBudgetsCallback
    from srpo_trl.testbed import make_arithmetic_dataset, measure_testbed_abilities, reward

    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    spec = ARMS[arm]
    model, tokenizer = load_testbed(settings)
    # The test split is the same for every seed and arm; the seed picks and orders the RL train problems.
    test = make_arithmetic_dataset(num_train=0, num_test=settings.num_test, seed=0)["test"]
    train = make_arithmetic_dataset(num_train=settings.num_train, num_test=0, seed=seed)["train"]
    per_generation = settings.prompts * settings.num_generations
    spg = spec["steps_per_generation"]
    config = SRPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / f"srpo-learning-{arm}-{seed}-{os.getpid()}"),
        routing=spec["routing"],
        dynamic_weighting=spec["dynamic_weighting"],
        learning_rate=spec["lr_units"] * 1e-6 * settings.lr_scale,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps * spg,
        weight_decay=0.01,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=per_generation // spg,
        gradient_accumulation_steps=1,
        steps_per_generation=spg,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=1.0,
        distillation_topk=settings.distillation_topk,
        max_steps=settings.steps * spg,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        chat_template_kwargs={"enable_thinking": False},
        seed=seed,
    )
    trainer = SRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=train, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)

    class SeededEvaluation(BestWithinBudgetsCallback):
        """Every evaluation samples from the same seeded RNG state: the arms of a seed are compared on common random
        numbers, and evaluating does not shift the training RNG stream. Also keeps this process's CPU seconds of
        training (evaluation excluded) next to the wall-clock ones: with one thread, CPU time is what the step
        costs, while wall-clock time on a shared machine mostly measures the other jobs."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.cpu_seconds, self.cpu_history, self._cpu_since = 0.0, [], time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):
            self._cpu_since = time.process_time()
            return super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            evaluating = state.global_step % self.eval_steps == 0
            if evaluating:
                self.cpu_seconds += time.process_time() - self._cpu_since
                self.cpu_history.append(self.cpu_seconds)
            result = super().on_step_end(args, state, control, **kwargs)
            if evaluating:
                self._cpu_since = time.process_time()
            return result

        def evaluate(self):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(10_000 + seed)
                return super().evaluate()

    evaluator = SeededEvaluation(
        trainer,
        test,
        eval_steps=settings.eval_every * spg,
        budgets_hours=(1e9,),
        k=settings.eval_k,
        temperature=settings.eval_temperature,
        top_p=settings.eval_top_p,
        max_new_tokens=settings.max_completion_length,
        batch_size=100,
        show_progress=False,
    )
    trainer.add_callback(evaluator)
    initial = evaluator.evaluate()
    trainer.train()
    curve = [{"step": 0, "optimizer_step": 0, "train_seconds": 0.0, "cpu_seconds": 0.0, "accuracy": initial}]
    curve += [
        {"step": step / spg, "optimizer_step": step, "train_seconds": seconds, "cpu_seconds": cpu, "accuracy": value}
        for (step, seconds, value), cpu in zip(evaluator.history, evaluator.cpu_history, strict=True)
    ]
    # What training did to the two abilities: the policy's own, and (arms with a teacher) the EMA teacher's, whose
    # reading of a correct solution is the distillation signal.
    probe = make_arithmetic_dataset(num_train=0, num_test=ABILITY_PROBLEMS, seed=0)["test"]
    abilities = {"policy": measure_testbed_abilities(trainer.model, tokenizer, probe)}
    if trainer.teacher is not None:
        with trainer.teacher.active() as teacher_model:
            abilities["teacher"] = measure_testbed_abilities(teacher_model, tokenizer, probe)
    record = {
        "arm": arm,
        "seed": seed,
        "testbed": testbed_identity(settings),
        "settings": dataclasses.asdict(settings),
        "config": {
            "routing": spec["routing"],
            "dynamic_weighting": spec["dynamic_weighting"],
            "learning_rate": config.learning_rate,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "steps_per_generation": spg,
            "max_steps": config.max_steps,
        },
        "curve": curve,
        "final_abilities": abilities,
        "wall_seconds": time.monotonic() - started,
        "log_history": trainer.state.log_history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, default=_json_default))
    return record


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# ---------------------------------------------------------------------------------------------------- many runs


def run_all(
    arms, seeds, settings: Settings, runs_dir: Path, jobs: int, package_root: Path | None = None
) -> list[dict]:
    """Run every (arm, seed), `jobs` processes at a time (one torch thread each); return the records. Worker
    processes import `srpo_trl` from `package_root` when given (see `snapshot_package`)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for stale in runs_dir.glob("*-seed*.*"):  # records of an earlier run would mix into --report-only
        stale.unlink()
    # Cache (or pre-train) the testbed model once, before processes race to do it.
    _ensure_testbed(settings)
    queue = [(arm, seed) for seed in seeds for arm in arms]
    if jobs <= 1:
        records = []
        for arm, seed in queue:
            records.append(run_one(arm, seed, settings, _run_path(runs_dir, arm, seed)))
            _progress(records[-1], len(records), len(queue))
        return records
    running: list[tuple[subprocess.Popen, str, int, Path, object]] = []
    done = 0
    settings_path = runs_dir / "settings.json"
    settings_path.write_text(json.dumps(dataclasses.asdict(settings)))
    failures = []
    while queue or running:
        while queue and len(running) < jobs:
            arm, seed = queue.pop(0)
            path = _run_path(runs_dir, arm, seed)
            path.unlink(missing_ok=True)
            log = open(runs_dir / f"{arm}-seed{seed}.log", "w")
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, str(seed),
                       str(settings_path), str(path)]  # fmt: skip
            if package_root is not None:
                command += ["--package-root", str(package_root)]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), arm, seed, path, log))
        time.sleep(0.5)
        for item in list(running):
            process, arm, seed, path, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            done += 1
            if process.returncode or not path.exists():
                failures.append(f"{arm} seed {seed} (exit {process.returncode}, see {path.with_suffix('.log')})")
                print(f"[{done}/{done + len(queue) + len(running)}] FAILED: {failures[-1]}", flush=True)
            else:
                path.with_suffix(".log").unlink(missing_ok=True)
                _progress(json.loads(path.read_text()), done, done + len(queue) + len(running))
    if failures:
        raise RuntimeError("runs failed: " + "; ".join(failures))
    return [json.loads(_run_path(runs_dir, arm, seed).read_text()) for seed in seeds for arm in arms]


def _run_path(runs_dir: Path, arm: str, seed: int) -> Path:
    return runs_dir / f"{arm}-seed{seed}.json"


def _ensure_testbed(settings: Settings) -> None:
    import torch

    torch.set_num_threads(1)
    load_testbed(settings)


def testbed_config(settings: Settings):
    """The testbed's pre-training config, `settings.testbed` overriding its defaults."""
    from srpo_trl.testbed import PretrainConfig

    return PretrainConfig(**settings.testbed)


def testbed_identity(settings: Settings) -> dict:
    """Which pre-trained checkpoint the runs start from: its cache key (a hash of the config and of the testbed's
    sources) and its config."""
    from srpo_trl.testbed import pretrain

    config = testbed_config(settings)
    return {
        "config_hash": pretrain.config_hash(config),
        "config": dataclasses.asdict(config),
    }


def load_testbed(settings: Settings):
    """The pre-trained testbed model and tokenizer, with `settings.testbed` overriding its pre-training config."""
    from srpo_trl.testbed import pretrained_testbed_model

    return pretrained_testbed_model(testbed_config(settings))


def _progress(record: dict, done: int, total: int) -> None:
    curve = record["curve"]
    print(
        f"[{done}/{total}] {record['arm']:<14} seed {record['seed']}: avg@k {curve[0]['accuracy']:.3f} -> "
        f"{curve[-1]['accuracy']:.3f} (best {max(p['accuracy'] for p in curve):.3f}), "
        f"{record['wall_seconds']:.0f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------------- analysis


def by_arm(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["arm"], []).append(record)
    return {arm: sorted(grouped[arm], key=lambda r: r["seed"]) for arm in ARMS if arm in grouped}


def best_within_steps(record: dict, budget: float) -> float:
    return max(p["accuracy"] for p in record["curve"] if p["step"] <= budget)


def best_within_seconds(record: dict, budget: float) -> float:
    """Best accuracy within `budget` CPU seconds of training (this process, one thread; evaluation excluded)."""
    return max(p["accuracy"] for p in record["curve"] if p["cpu_seconds"] <= budget)


def final_accuracy(record: dict, last: int = 3) -> float:
    """Mean of the last `last` evaluations: less flattered by evaluation noise than a maximum."""
    values = [p["accuracy"] for p in record["curve"][1:]][-last:] or [record["curve"][0]["accuracy"]]
    return sum(values) / len(values)


def step_seconds(record: dict) -> float:
    """CPU seconds of training per RL step (evaluation excluded)."""
    last = record["curve"][-1]
    return last["cpu_seconds"] / last["step"] if last["step"] else math.nan


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def metric_series(record: dict, key: str) -> dict[float, float]:
    """`{RL step: value}` of a training metric (logged once per generation batch)."""
    spg = record["config"]["steps_per_generation"]
    out = {}
    for entry in record["log_history"]:
        value = entry.get(key)
        if value is None or "step" not in entry or isinstance(value, str):
            continue
        step = math.ceil(entry["step"] / spg)
        out.setdefault(step, value)  # the generation batch's first log holds its generation-time metrics
    return out


def step_budgets(steps: int) -> list[int]:
    return sorted({max(1, round(steps * f)) for f in (0.25, 0.5, 1.0)})


def time_budgets(grouped: dict[str, list[dict]]) -> list[float]:
    """A quarter, half and all of the shortest run's training CPU time, so that every arm has points in every budget."""
    shortest = min(r["curve"][-1]["cpu_seconds"] for records in grouped.values() for r in records)
    return [shortest * f for f in (0.25, 0.5, 1.0)]


def build_tables(grouped: dict[str, list[dict]], steps: int) -> dict:
    budgets = step_budgets(steps)
    seconds = time_budgets(grouped)
    rows = {}
    for arm, records in grouped.items():
        rows[arm] = {
            "initial": [r["curve"][0]["accuracy"] for r in records],
            "steps": {b: [best_within_steps(r, b) for r in records] for b in budgets},
            "seconds": {b: [best_within_seconds(r, b) for r in records] for b in seconds},
            "final": [final_accuracy(r) for r in records],
            "step_seconds": [step_seconds(r) for r in records],
            "seeds": [r["seed"] for r in records],
        }
    return {"step_budgets": budgets, "time_budgets": seconds, "rows": rows}


def markdown_table(tables: dict, arms) -> str:
    budgets, seconds = tables["step_budgets"], tables["time_budgets"]
    header = (
        ["method", "initial"]
        + [f"best ≤ {b} steps" for b in budgets]
        + [f"best ≤ {s:.{0 if s >= 10 else 1}f} CPU s" for s in seconds]
        + ["final (mean of last 3 evals)", "CPU s / step"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        row = tables["rows"].get(arm)
        if row is None:
            continue
        cells = [ARMS[arm]["label"], fmt(row["initial"])]
        cells += [fmt(row["steps"][b]) for b in budgets]
        cells += [fmt(row["seconds"][s]) for s in seconds]
        cells += [fmt(row["final"]), fmt(row["step_seconds"], scale=1.0, digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(grouped: dict[str, list[dict]]) -> str:
    """Mean held-out accuracy per evaluation step, every arm: the data behind accuracy.png."""
    steps = sorted({p["step"] for records in grouped.values() for r in records for p in r["curve"]})
    header = ["step"] + [ARMS[arm]["label"] for arm in grouped]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in steps:
        cells = [f"{step:g}"]
        for records in grouped.values():
            values = [p["accuracy"] for r in records for p in r["curve"] if p["step"] == step]
            cells.append(fmt(values) if values else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_table(grouped: dict[str, list[dict]]) -> str:
    """Per arm: mean over steps and seeds of the logged routing/teacher metrics, first and second half."""
    keys = (
        ("reward", "train reward"),
        ("srpo/route/correct_frac", "correct"),
        ("srpo/route/sdpo_frac", "routed to SDPO"),
        ("srpo/route/fallback_frac", "all-failed group"),
        ("srpo/teacher_entropy/mean", "teacher entropy"),
        ("completions/mean_length", "response length"),
    )
    header = ["method"] + [f"{label} (1st half → 2nd half)" for _, label in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, records in grouped.items():
        cells = [ARMS[arm]["label"]]
        for key, _ in keys:
            halves = [[], []]
            for record in records:
                series = metric_series(record, key)
                half = record["settings"]["steps"] / 2
                for step, value in series.items():
                    halves[step > half].append(value)
            if not halves[0] and not halves[1]:
                cells.append("–")
                continue
            cells.append(" → ".join(f"{statistics.fmean(h):.3f}" if h else "–" for h in halves))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ABILITY_COLUMNS = (
    ("policy", "student/accuracy_greedy", "policy greedy"),
    ("policy", "student/accuracy_sampled", "policy sampled (T=1)"),
    ("policy", "teacher/accuracy_greedy", "policy greedy, solution in prompt"),
    ("teacher", "teacher/accuracy_greedy", "EMA teacher greedy, solution in prompt"),
    ("teacher", "teacher/accuracy_sampled", "EMA teacher sampled (T=1), solution in prompt"),
    ("teacher", "logprob_gain", "EMA teacher: log p(answer) gain from the solution"),
)


def abilities_table(grouped: dict[str, list[dict]], pretrained: dict | None) -> str:
    """`measure_testbed_abilities` of each arm's final policy and EMA teacher (accuracies in %), next to the
    pre-trained model's (which is also every teacher's starting point)."""

    def value(abilities: dict, key: str) -> float:
        if key == "logprob_gain":
            return abilities["teacher/answer_logprob"] - abilities["student/answer_logprob"]
        return abilities[key]

    header = ["after training"] + [label for _, _, label in ABILITY_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if pretrained:
        cells = [
            f"{value(pretrained, key):.2f}" if key == "logprob_gain" else f"{value(pretrained, key) * 100:.1f}"
            for _, key, _ in ABILITY_COLUMNS
        ]
        lines.append("| pre-trained model (step 0) | " + " | ".join(cells) + " |")
    for arm, records in grouped.items():
        cells = [ARMS[arm]["label"]]
        for model, key, _ in ABILITY_COLUMNS:
            values = [value(r["final_abilities"][model], key) for r in records if model in r["final_abilities"]]
            if not values:
                cells.append("–")
            elif key == "logprob_gain":
                cells.append(fmt(values, scale=1.0, digits=2))
            else:
                cells.append(fmt(values))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(tables: dict, grouped) -> list[str]:
    """Facts read off the numbers (no interpretation): orderings at each budget and at the end."""
    rows = tables["rows"]
    out = []

    def order(values: dict[str, list[float]]) -> str:
        ranked = sorted(values, key=lambda arm: -mean_std(values[arm])[0])
        return " > ".join(f"{ARMS[a]['label']} {mean_std(values[a])[0] * 100:.1f}" for a in ranked)

    for arms, name in ((TABLE1_ARMS, "Table 1"), (TABLE2_ARMS, "Table 2")):
        present = [a for a in arms if a in rows]
        if len(present) < 2:
            continue
        for budget in tables["step_budgets"]:
            out.append(f"{name}, best ≤ {budget} steps: " + order({a: rows[a]["steps"][budget] for a in present}))
        out.append(f"{name}, final: " + order({a: rows[a]["final"] for a in present}))
    for arm in ("srpo", "grpo", "sdpo"):
        if arm in rows:
            wins = sum(
                all(rows[arm]["final"][i] >= rows[other]["final"][i] for other in TABLE1_ARMS if other in rows)
                for i in range(len(rows[arm]["final"]))
            )
            out.append(
                f"{ARMS[arm]['label']} has the best final accuracy among {', '.join(ARMS[a]['label'] for a in TABLE1_ARMS if a in rows)} "
                f"in {wins} of {len(rows[arm]['final'])} seeds."
            )
    return out


# ---------------------------------------------------------------------------------------------------- figures


def plot_all(grouped: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []

    def band(ax, arm, xs, matrix, smooth=1, label=None, linestyle="-"):
        matrix = np.asarray(matrix, dtype=float)
        if smooth > 1:
            matrix = np.stack([_moving_average(row, smooth) for row in matrix])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps where no seed logged the metric
            mean, std = np.nanmean(matrix, axis=0), np.nanstd(matrix, axis=0)
        ax.plot(xs, mean, color=COLORS[arm], label=label or ARMS[arm]["label"], linestyle=linestyle)
        ax.fill_between(xs, mean - std, mean + std, color=COLORS[arm], alpha=0.15)

    # accuracy vs RL step
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for arm, records in grouped.items():
        xs = [p["step"] for p in records[0]["curve"]]
        band(ax, arm, xs, [[p["accuracy"] for p in r["curve"]] for r in records])
    settings = next(iter(grouped.values()))[0]["settings"]
    ax.set(
        xlabel="RL step (generation batch)",
        ylabel=f"held-out avg@{settings['eval_k']} (T={settings['eval_temperature']}, top-p {settings['eval_top_p']})",
        title=f"Held-out accuracy, mean ± std over {len(next(iter(grouped.values())))} seeds",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(figure, out / "accuracy.png"))

    # accuracy vs training time (evaluation excluded)
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for arm, records in grouped.items():
        for i, record in enumerate(records):
            ax.plot(
                [p["cpu_seconds"] for p in record["curve"]],
                [p["accuracy"] for p in record["curve"]],
                color=COLORS[arm],
                alpha=0.7,
                label=ARMS[arm]["label"] if i == 0 else None,
            )
    ax.set(xlabel="training CPU seconds (one thread, evaluation excluded)", ylabel="held-out avg@k",
           title="Held-out accuracy vs training CPU time, one line per seed")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(figure, out / "accuracy_vs_time.png"))

    for key, name, ylabel, title in (
        (
            "srpo/route/sdpo_frac",
            "routed_fraction.png",
            "fraction of rollouts",
            "Rollouts routed to self-distillation",
        ),
        ("completions/mean_length", "response_length.png", "tokens", "Mean response length"),
        ("srpo/teacher_entropy/mean", "teacher_entropy.png", "nats", "Teacher entropy on scored tokens"),
    ):
        figure, ax = plt.subplots(figsize=(7, 4.5))
        for arm, records in grouped.items():
            steps = range(1, records[0]["settings"]["steps"] + 1)
            arm_key, style = key, {}
            if key == "srpo/route/sdpo_frac" and ARMS[arm]["routing"] == "advantage_mix":
                # Routes nothing, but the teacher scores every rollout with a correct sibling.
                arm_key = "srpo/teacher_available_frac"
                style = {"label": f"{ARMS[arm]['label']} (teacher-scored, not routed)", "linestyle": "--"}
            matrix = []
            for record in records:
                series = metric_series(record, arm_key)
                matrix.append([series.get(s, math.nan) for s in steps])
            if all(math.isnan(v) for row in matrix for v in row):
                continue  # GRPO builds no teacher and logs no routing
            band(ax, arm, list(steps), matrix, smooth=5, **style)
        ax.set(xlabel="RL step (generation batch)", ylabel=ylabel, title=f"{title} (5-step moving average, ± std)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # GRPO alone logs no routing or teacher metrics
            ax.legend(fontsize=8)
        paths.append(_save(figure, out / name))
    return paths


def _moving_average(row, width: int):
    """Centred moving average over the non-NaN values within `width` points (NaN where there are none)."""
    import numpy as np

    row = np.asarray(row, dtype=float)
    out = np.full_like(row, np.nan)
    for i in range(len(row)):
        window = row[max(0, i - width // 2) : i + width - width // 2]
        window = window[~np.isnan(window)]
        if window.size:
            out[i] = window.mean()
    return out


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- report


def machine() -> str:
    import torch
    import transformers
    import trl

    cpu = platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = f"{names[0].strip()} ({len(names)} logical CPUs)" if names else cpu
    except OSError:
        pass
    memory = ""
    try:
        total = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {total / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    load = f"; load average {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}{memory}{load}. Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}."
    )


def measure_abilities(settings: Settings) -> dict[str, dict[str, float]]:
    """`measure_testbed_abilities` of the pre-trained model the runs start from: on its default 200 test problems
    (`"default"`, as `tests/test_testbed.py` measures it) and on the runs' probe set (`"probe"`)."""
    import torch

    torch.set_num_threads(1)
    from srpo_trl.testbed import make_arithmetic_dataset, measure_testbed_abilities

    model, tokenizer = load_testbed(settings)
    probe = make_arithmetic_dataset(num_train=0, num_test=ABILITY_PROBLEMS, seed=0)["test"]
    return {
        "default": measure_testbed_abilities(model, tokenizer),
        "probe": measure_testbed_abilities(model, tokenizer, probe),
    }


def abilities_line(m: dict[str, float]) -> str:
    return (
        "Pre-trained model (`measure_testbed_abilities`: 200 test problems, greedy and 8 samples at T=1): student "
        f"greedy {m['student/accuracy_greedy']:.3f}, sampled {m['student/accuracy_sampled']:.3f}, groups of 8 with "
        f"mixed rewards {m['student/mixed_group_frac']:.3f}; with a correct solution in the prompt (the teacher "
        f"prompt): greedy {m['teacher/accuracy_greedy']:.3f}, sampled {m['teacher/accuracy_sampled']:.3f}; "
        f"log p(correct completion) {m['student/answer_logprob']:.2f} (student prompt) vs "
        f"{m['teacher/answer_logprob']:.2f} (teacher prompt)."
    )


def write_report(records: list[dict], out: Path, command: str, elapsed: float | None, with_abilities=True) -> Path:
    grouped = by_arm(records)
    settings = Settings(**records[0]["settings"])
    tables = build_tables(grouped, settings.steps)
    figures = plot_all(grouped, out)
    seeds = sorted({r["seed"] for r in records})
    identity = testbed_identity(settings)

    def checkpoint(testbed: dict) -> str:
        return testbed.get("config_hash", "?")

    hashes = sorted({checkpoint(r.get("testbed", {})) for r in records})
    lr = {arm: f"{ARMS[arm]['lr_units'] * 1e-6 * settings.lr_scale:.0e}" for arm in grouped}
    block = [
        MARK_BEGIN,
        "<!-- Generated by benchmarks/learning/run.py: everything up to learning:end is rewritten on every run. -->",
        "",
        f"Command: `{command}`" + (f" ({elapsed / 60:.1f} min wall-clock)" if elapsed else ""),
        "",
        f"Machine: {machine()}",
        "",
        "Setup: the testbed model (`pretrained_testbed_model("
        + (f"PretrainConfig(**{settings.testbed})" if settings.testbed else "")
        + f")`, checkpoint `{checkpoint(identity)}`: "
        + ", ".join(f"{k}={v}" for k, v in identity["config"].items())
        + f"), {settings.steps} RL steps of {settings.prompts} prompts x {settings.num_generations} rollouts "
        f"(T=1, ≤ {settings.max_completion_length} tokens) from {settings.num_train} RL train problems; held-out "
        f"avg@{settings.eval_k} (T={settings.eval_temperature}, top-p {settings.eval_top_p}) on {settings.num_test} "
        f"test problems every {settings.eval_every} steps (the same sampling seed for every arm of a seed); seeds "
        f"{seeds}. Learning rates (paper's x {settings.lr_scale:g}): "
        + ", ".join(f"{ARMS[a]['label']} {lr[a]}" for a in grouped)
        + f"; GRPO 4 optimizer steps per generation batch, the others 1; constant after {settings.warmup_steps} "
        f"warm-up steps; top-k {settings.distillation_topk}, everything else `SRPOConfig`'s defaults (the paper's).",
        "",
    ]
    if hashes != [checkpoint(identity)]:
        block += [
            f"**Warning**: the runs started from testbed checkpoint(s) {hashes}, not all from the current "
            f"`{checkpoint(identity)}`: the testbed changed during or after the runs; rerun.",
            "",
        ]
    abilities = measure_abilities(settings) if with_abilities else None
    if abilities:
        block += [abilities_line(abilities["default"]), ""]
    block += [
        "Accuracies in %, mean ± std over seeds. `best ≤ N steps`: the best held-out avg@k among evaluations at RL "
        "steps 0..N (the paper's Table 1 takes the best within time budgets); `best ≤ T CPU s`: within T CPU "
        "seconds of training (the run's own process, one torch thread, evaluation excluded; wall-clock time on "
        "this shared machine mostly measured the other jobs, so CPU time stands in for the paper's hours); "
        "`final`: mean of the last 3 evaluations, which a lucky evaluation flatters less than a maximum.",
        "",
        "### Table 1: GRPO vs SDPO vs SRPO",
        "",
        markdown_table(tables, TABLE1_ARMS),
        "",
        "### Table 2: ablations",
        "",
        markdown_table(tables, TABLE2_ARMS),
        "",
        *(
            ["### Controls (not in the paper)", "", markdown_table(tables, CONTROL_ARMS), ""]
            if "grpo_srpo_lr" in tables["rows"]
            else []
        ),
        "### Findings (computed)",
        "",
        *[f"- {line}" for line in findings(tables, grouped)],
        "",
        "### Held-out accuracy per evaluation (%, mean ± std)",
        "",
        curve_table(grouped),
        "",
        *(
            [
                f"### What training did to the two abilities (`measure_testbed_abilities` on {ABILITY_PROBLEMS} test "
                "problems after the last step; %, mean ± std)",
                "",
                abilities_table(grouped, abilities["probe"] if abilities else None),
                "",
            ]
            if all("final_abilities" in r for r in records)
            else []
        ),
        "### Training metrics (mean over seeds and steps, first half → second half of training)",
        "",
        routing_table(grouped),
        "",
        " ".join(f"![{p.stem}]({p.name})" for p in figures),
        "",
        f"Per-run log histories and evaluation curves: `{_relative(out / 'runs')}/<arm>-seed<k>.json`.",
        MARK_END,
    ]
    path = out / "RESULTS.md"
    text = "\n".join(block)
    if path.exists() and MARK_BEGIN in path.read_text():
        old = path.read_text()
        head, rest = old.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
        path.write_text(head + text + tail)
    else:
        path.write_text("# Learning efficacy on the CPU testbed\n\n" + text + "\n")
    summary = {
        "tables": tables,
        "abilities": abilities,
        "testbed": identity,
        "command": command,
        "wall_seconds": elapsed,
    }
    (out / "summary.json").write_text(json.dumps(summary, default=_json_default, indent=1))
    return path


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- entry point


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds, 0 .. n-1 (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (generation batches) per run")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed: a couple of minutes")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help=f"default: {' '.join(DEFAULT_ARMS)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/learning)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per generation batch")
    parser.add_argument("--lr-scale", type=float, default=None)
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the saved runs")
    parser.add_argument("--no-abilities", action="store_true", help="skip measuring the pre-trained model")
    parser.add_argument("--worker", nargs=4, metavar=("ARM", "SEED", "SETTINGS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--package-root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.package_root is not None:
        sys.path.insert(0, str(args.package_root))
    if args.worker:
        arm, seed, settings_path, out_path = args.worker
        settings = Settings(**json.loads(Path(settings_path).read_text()))
        run_one(arm, int(seed), settings, Path(out_path))
        return {}

    import torch

    torch.set_num_threads(1)
    overrides = dict(QUICK) if args.quick else {}
    for name in ("steps", "eval_every", "num_test", "prompts", "lr_scale"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    settings = Settings(**overrides)
    seeds = list(range(args.seeds if args.seeds is not None else 1 if args.quick else 3))
    out = args.out or (HERE / "quick" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    command = "python " + " ".join([_relative(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))

    started = time.monotonic()
    snapshot = None if args.report_only else snapshot_package()
    try:
        return _run_and_report(args, settings, seeds, out, runs_dir, command, started, snapshot)
    finally:
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)


def snapshot_package() -> Path | None:
    """
    Copy `srpo_trl` to a temporary folder and import it from there, in this process and the workers: a run takes
    tens of minutes, and edits to the package meanwhile (the testbed's prompts, the trainer) would otherwise reach
    only the runs started after them. None (no snapshot) when `srpo_trl` is already imported, e.g. under pytest.
    """
    if "srpo_trl" in sys.modules:
        return None
    root = Path(tempfile.mkdtemp(prefix="srpo-learning-package-"))
    shutil.copytree(REPO / "srpo_trl", root / "srpo_trl", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(root))
    return root


def _run_and_report(args, settings, seeds, out, runs_dir, command, started, snapshot) -> dict:
    if args.report_only:
        records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*-seed*.json"))]
        records = [r for r in records if args.arms is None or r["arm"] in args.arms]
        # The run's own command and duration, from its report, rather than this call's.
        command = _previous_command(out / "RESULTS.md") or command
        summary = out / "summary.json"
        elapsed = json.loads(summary.read_text()).get("wall_seconds") if summary.exists() else None
    else:
        arms = args.arms or list(DEFAULT_ARMS)
        print(f"{len(arms)} arms x {len(seeds)} seeds, {settings.steps} RL steps each, {args.jobs} at a time")
        records = run_all(arms, seeds, settings, runs_dir, args.jobs, package_root=snapshot)
        elapsed = time.monotonic() - started
    path = write_report(records, out, command, elapsed, with_abilities=not args.no_abilities)
    print(f"wrote {path} ({(time.monotonic() - started) / 60:.1f} min)")
    return {"records": records, "results": path, "out": out}


def _previous_command(path: Path) -> str | None:
    if not path.exists():
        return None
    match = re.search(r"Command: `([^`]*)`", path.read_text())
    return match.group(1) if match else None


if __name__ == "__main__":
    main()

"""The learning benchmark's report: tables, paired differences, the late-phase diagnosis, figures and RESULTS.md.

Everything here reads the run records `harness.run_one` saves; nothing trains. Accuracies are held-out avg@k in %.
A method's runs are compared with another's seed by seed (the same problems, the same evaluation samples): a paired
difference is reported as mean ± std over seeds and the number of seeds where it is positive.
"""

import json
import math
import os
import platform
import re
import statistics
import warnings
from pathlib import Path

import harness

MARK_BEGIN, MARK_END = "<!-- learning:begin -->", "<!-- learning:end -->"
COLORS = {"grpo": "tab:blue", "sdpo": "tab:orange", "srpo": "tab:green", "grpo_4steps": "tab:cyan",
          "srpo_no_dw": "tab:olive", "advantage_mix": "tab:purple", "srpo_routed_grpo": "tab:red",
          "srpo_slow_teacher": "tab:brown", "srpo_base_teacher": "tab:gray", "srpo_live_teacher": "tab:pink",
          "srpo_trust_region": "black"}  # fmt: skip
FIGURE_METHODS = ("grpo", "sdpo", "srpo", "grpo_4steps", "srpo_routed_grpo")  # the ablations are in the tables only
TEACHER_METHODS = ("srpo", "srpo_slow_teacher", "srpo_base_teacher", "srpo_live_teacher", "srpo_trust_region")
TEACHER_SIGNALS = ("srpo/teacher_solution_prob", "srpo/teacher_entropy/mean")
# (a, b): rows of the paired-difference table, a - b.
PAIRS = (("srpo", "grpo"), ("sdpo", "grpo"), ("srpo", "sdpo"), ("srpo", "grpo_4steps"),
         ("srpo_no_dw", "srpo"), ("advantage_mix", "srpo"), ("srpo_slow_teacher", "srpo"),
         ("srpo_routed_grpo", "srpo"), ("srpo_routed_grpo", "grpo"), ("srpo_base_teacher", "srpo"),
         ("srpo_live_teacher", "srpo"), ("srpo_trust_region", "srpo"), ("srpo_slow_teacher", "grpo"),
         ("srpo_base_teacher", "grpo"), ("srpo_live_teacher", "grpo"), ("srpo_trust_region", "grpo"))  # fmt: skip
# The diagnosis, first half → second half of training. What the routed tokens look like: (key, label, source), where
# "log" is a metric the trainer logs once per generation batch and "probe" a `harness.gradient_probe` measurement.
ROUTED_TOKENS = (
    ("reward", "train reward", "log"),
    ("srpo/route/sdpo_frac", "rollouts routed", "log"),
    ("srpo/teacher_rejects_sampled_frac", "teacher gives sampled token < ½ (logged)", "log"),
    ("srpo/teacher_solution_prob", "teacher's p(solution token) where the rollout leaves it (logged)", "log"),
    ("teacher_top1_differs_frac", "teacher top-1 ≠ sampled (probe)", "probe"),
    ("divergence_mean", "JSD per routed token", "probe"),
    ("divergence_where_top1_differs", "JSD where top-1 ≠ sampled", "probe"),
    ("srpo/teacher_entropy/mean", "teacher entropy", "log"),
)
# Each part's gradient norm, before clipping.
GRADIENTS = (
    ("total", "‖g‖ step", "probe"),
    ("grpo", "‖g‖ GRPO term", "probe"),
    ("distillation", "‖g‖ distillation", "probe"),
    ("grpo_on_routed", "‖g‖ GRPO's term on the routed rows (what routing replaces)", "probe"),
    ("distillation_to_replaced", "distillation / replaced", "probe"),
    ("cosine_distillation_grpo_on_routed", "cos(distillation, replaced)", "probe"),
    ("positive", "GRPO: ‖g‖ positive advantages", "probe"),
    ("negative", "GRPO: ‖g‖ negative advantages", "probe"),
)


def relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(harness.REPO))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- one run


def final_accuracy(record: dict, last: int = 3) -> float:
    """Mean of the last `last` evaluations: less flattered by evaluation noise than a maximum."""
    values = [p["accuracy"] for p in record["curve"][1:]][-last:] or [record["curve"][0]["accuracy"]]
    return sum(values) / len(values)


def best_within_steps(record: dict, budget: float) -> float:
    return max(p["accuracy"] for p in record["curve"] if p["step"] <= budget)


def best_within_seconds(record: dict, budget: float) -> float:
    """Best accuracy within `budget` CPU seconds of training (this process, one thread; evaluation excluded)."""
    return max(p["accuracy"] for p in record["curve"] if p["cpu_seconds"] <= budget)


def step_seconds(record: dict) -> float:
    """CPU seconds of training per RL step (evaluation and probes excluded)."""
    last = record["curve"][-1]
    return last["cpu_seconds"] / last["step"] if last["step"] else math.nan


def metric_series(record: dict, key: str) -> dict[int, float]:
    """`{RL step: value}` of a training metric (logged once per generation batch)."""
    spg = record["steps_per_generation"]
    out = {}
    for entry in record["log_history"]:
        value = entry.get(key)
        if value is None or "step" not in entry or isinstance(value, str) or math.isnan(value):
            continue
        out.setdefault(math.ceil(entry["step"] / spg), value)  # the batch's first log holds its scoring metrics
    return out


def probe_series(record: dict, key: str) -> dict[int, float]:
    """`{RL step: value}` of a probe measurement; `distillation_to_replaced` is the ratio of two of them."""
    out = {}
    for probe in record["probes"]:
        if key == "distillation_to_replaced":
            value = probe["distillation"] / probe["grpo_on_routed"] if probe.get("grpo_on_routed") else None
        else:
            value = probe.get(key)
        if value is not None and not math.isnan(value):
            out[probe["step"]] = value
    return out


def sweep_finals(sweep: list[dict]) -> dict[tuple[str, float], list[float]]:
    """`{(method, rate): final accuracy of each sweep seed}`, seeds in order."""
    finals: dict[tuple[str, float], list[float]] = {}
    for record in sorted(sweep, key=lambda r: r["seed"]):
        finals.setdefault((record["method"], record["learning_rate"]), []).append(final_accuracy(record))
    return finals


def best_rates(sweep: list[dict]) -> dict[str, float]:
    """Each swept method's rate with the best final accuracy averaged over the sweep's seeds (the lower rate on a
    tie)."""
    best: dict[str, tuple[float, float]] = {}
    for (method, lr), finals in sorted(sweep_finals(sweep).items(), key=lambda item: item[0][1]):
        mean = statistics.fmean(finals)
        if method not in best or mean > best[method][1]:
            best[method] = (lr, mean)
    return {method: lr for method, (lr, _) in best.items()}


# ---------------------------------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return "–" if math.isnan(mean) else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def fmt_paired(differences: list[float]) -> str:
    """`mean ± std (wins/n)` of per-seed differences, in points."""
    if not differences:
        return "–"
    wins = sum(d > 0 for d in differences)
    return f"{fmt(differences, digits=1)} ({wins}/{len(differences)})"


def by_method(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["method"], []).append(record)
    order = list(harness.METHODS)
    return {m: sorted(grouped[m], key=lambda r: r["seed"]) for m in sorted(grouped, key=order.index)}


def budgets(grouped: dict[str, list[dict]]) -> dict[str, dict]:
    """Each column of the comparison: a name and the per-record value. Step budgets are a quarter, half and all of
    the run; CPU budgets a quarter, half and all of the shortest run's training CPU time, so that every arm has
    evaluations within every budget."""
    steps = next(iter(grouped.values()))[0]["settings"]["steps"]
    shortest = min(r["curve"][-1]["cpu_seconds"] for records in grouped.values() for r in records)
    columns = {}
    for fraction in (0.25, 0.5, 1.0):
        budget = max(1, round(steps * fraction))
        columns[f"best ≤ {budget} steps"] = lambda r, b=budget: best_within_steps(r, b)
    for fraction in (0.25, 0.5, 1.0):
        seconds = shortest * fraction
        columns[f"best ≤ {seconds:.{0 if seconds >= 10 else 1}f} CPU s"] = lambda r, s=seconds: best_within_seconds(
            r, s
        )
    columns["final (last 3 evals)"] = final_accuracy
    return columns


def paired_differences(grouped, a: str, b: str, value) -> list[float]:
    """`value(a's run) - value(b's run)` for each seed both ran."""
    theirs = {r["seed"]: value(r) for r in grouped.get(b, [])}
    return [value(r) - theirs[r["seed"]] for r in grouped.get(a, []) if r["seed"] in theirs]


def label(method: str, lr: float | None = None) -> str:
    name = harness.METHODS[method].label
    return name if lr is None else f"{name} (lr {lr:.0e})"


# ---------------------------------------------------------------------------------------------------- tables


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def sweep_table(sweep: list[dict], best: dict[str, float]) -> str:
    """Mean final accuracy over the sweep's seeds at each rate (each seed's in brackets), the best rate's in bold."""
    rates = sorted({r["learning_rate"] for r in sweep})
    finals = sweep_finals(sweep)
    rows = []
    for method in by_method(sweep):
        row = [label(method)]
        for lr in rates:
            values = finals.get((method, lr))
            value = "–" if values is None else f"{statistics.fmean(values) * 100:.1f}"
            if values is not None and len(values) > 1:
                value += " (" + ", ".join(f"{v * 100:.1f}" for v in values) + ")"
            row.append(f"**{value}**" if best.get(method) == lr else value)
        rows.append(row)
    edge = [label(m) for m, lr in best.items() if lr in (rates[0], rates[-1])]
    note = f"\n\nBest rate at the edge of the grid: {', '.join(edge)}." if edge else ""
    return table(["final accuracy, mean (per seed)"] + [f"lr {lr:.0e}" for lr in rates], rows) + note


def comparison_table(grouped, columns) -> str:
    rows = []
    for method, records in grouped.items():
        row = [label(method, records[0]["learning_rate"]), fmt([r["curve"][0]["accuracy"] for r in records])]
        row += [fmt([value(r) for r in records]) for value in columns.values()]
        rows.append(row + [fmt([step_seconds(r) for r in records], scale=1.0, digits=2)])
    return table(["method", "initial", *columns, "CPU s / step"], rows)


def paired_table(grouped, columns, pairs=PAIRS) -> str:
    rows = []
    for a, b in pairs:
        if a in grouped and b in grouped:
            row = [f"{label(a)} − {label(b)}"]
            rows.append(row + [fmt_paired(paired_differences(grouped, a, b, value)) for value in columns.values()])
    return table(["points, mean ± std (seeds ahead)", *columns], rows)


def stress_lines(stressed, columns) -> list[str]:
    """The stress test's comparison and its paired differences: each arm against SRPO and GRPO at the same rate."""
    rate = next(iter(stressed.values()))[0]["learning_rate"]
    pairs = [(m, "srpo") for m in stressed if m not in ("srpo", "grpo")]
    pairs += [(m, "grpo") for m in stressed if m != "grpo"]
    return [
        f"### Stress: one grid step above SRPO's best rate (lr {rate:.0e}, the same seeds)",
        "",
        comparison_table(stressed, columns),
        "",
        paired_table(stressed, columns, pairs),
        "",
    ]


def halves(record: dict, series: dict[int, float]) -> tuple[list[float], list[float]]:
    half = record["settings"]["steps"] / 2
    return [v for s, v in series.items() if s <= half], [v for s, v in series.items() if s > half]


def halves_cell(records: list[dict], series_of) -> str:
    """Mean over seeds and steps of a per-step series, first half → second half of training."""
    first, second = [], []
    for record in records:
        a, b = halves(record, series_of(record))
        first += a
        second += b
    if not first and not second:
        return "–"
    return " → ".join(f"{statistics.fmean(h):.3g}" if h else "–" for h in (first, second))


def diagnosis_table(grouped, columns) -> str:
    """Mean over seeds and steps of each of `columns` (`ROUTED_TOKENS` or `GRADIENTS`), first half → second half of
    training; a column no method has is left out."""
    sources = {"log": metric_series, "probe": probe_series}
    header, cells = ["method"], []
    for key, name, source in columns:
        column = [halves_cell(records, lambda r, k=key, s=sources[source]: s(r, k)) for records in grouped.values()]
        if any(cell != "–" for cell in column):
            header.append(name)
            cells.append(column)
    return table(header, [[label(m)] + [c[i] for c in cells] for i, m in enumerate(grouped)])


def abilities_table(grouped, pretrained: dict | None) -> str:
    """`measure_testbed_abilities` of each arm's final policy and teacher (accuracies in %), next to the
    pre-trained model's (which is also every teacher's starting point)."""
    columns = (
        ("policy", "student/accuracy_greedy", "policy greedy"),
        ("policy", "student/accuracy_sampled", "policy sampled (T=1)"),
        ("policy", "teacher/accuracy_greedy", "policy greedy, solution in prompt"),
        ("teacher", "teacher/accuracy_greedy", "teacher greedy, solution in prompt"),
        ("teacher", "teacher/accuracy_sampled", "teacher sampled (T=1), solution in prompt"),
    )
    rows = []
    if pretrained:
        rows.append(["pre-trained model (step 0)"] + [f"{pretrained[key] * 100:.1f}" for _, key, _ in columns])
    for method, records in grouped.items():
        row = [label(method)]
        for model, key, _ in columns:
            row.append(fmt([r["final_abilities"][model][key] for r in records if model in r["final_abilities"]]))
        rows.append(row)
    return table(["after training"] + [name for _, _, name in columns], rows)


def curve_table(grouped) -> str:
    """Mean held-out accuracy per evaluation step, every arm: the data behind the accuracy figure."""
    steps = sorted({p["step"] for records in grouped.values() for r in records for p in r["curve"]})
    rows = []
    for step in steps:
        row = [f"{step:g}"]
        for records in grouped.values():
            row.append(fmt([p["accuracy"] for r in records for p in r["curve"] if p["step"] == step]))
        rows.append(row)
    return table(["step"] + [label(m) for m in grouped], rows)


# The early-warning check, with its thresholds fixed before looking at the runs: accuracy falls at the first
# evaluation `ACCURACY_FALL` below the run's best so far; a signal alarms at the first step from `ALARM_FROM` on where
# its trailing `SMOOTHING`-step mean has moved by the factor below from its mean over the first `SMOOTHING` steps.
ACCURACY_FALL, SMOOTHING, ALARM_FROM = 0.10, 10, 20
ALARMS = (("srpo/teacher_solution_prob", "p(solution) falls by a fifth", lambda now, start: now < 0.8 * start),
          ("srpo/teacher_entropy/mean", "teacher entropy rises by half", lambda now, start: now > 1.5 * start))  # fmt: skip


def accuracy_fall_step(record: dict) -> int | None:
    best = -math.inf
    for point in record["curve"]:
        if point["accuracy"] < best - ACCURACY_FALL:
            return point["step"]
        best = max(best, point["accuracy"])
    return None


def alarm_step(series: dict[int, float], alarmed) -> int | None:
    steps = sorted(series)
    if len(steps) < 2 * SMOOTHING:
        return None
    start = statistics.fmean(series[s] for s in steps[:SMOOTHING])
    for i in range(SMOOTHING, len(steps)):
        if steps[i] >= ALARM_FROM and alarmed(
            statistics.fmean(series[s] for s in steps[i - SMOOTHING + 1 : i + 1]), start
        ):
            return steps[i]
    return None


def early_warning_table(*groups) -> str:
    """For each arm (of each `by_method` group) that logs the teacher signals: in how many runs accuracy fell, in how
    many of those each signal alarmed first (and by how many steps, median), and in how many runs it alarmed while
    accuracy never fell."""
    rows = []
    for method, records in ((m, rs) for grouped in groups for m, rs in grouped.items()):
        if not any(metric_series(r, ALARMS[0][0]) for r in records):
            continue
        falls = {r["seed"]: accuracy_fall_step(r) for r in records}
        fell = [seed for seed, step in falls.items() if step is not None]
        row = [
            label(method, records[0]["learning_rate"]),
            f"{len(fell)}/{len(records)}" + (f" (step {', '.join(str(falls[s]) for s in fell)})" if fell else ""),
        ]
        for key, _, alarmed in ALARMS:
            alarms = {r["seed"]: alarm_step(metric_series(r, key), alarmed) for r in records}
            leads = [falls[s] - alarms[s] for s in fell if alarms[s] is not None and alarms[s] < falls[s]]
            early = f"{len(leads)}/{len(fell)}" + (f", {statistics.median(leads):g} steps ahead" if leads else "")
            row += [
                early if fell else "–",
                f"{sum(alarms[s] is not None for s in falls if falls[s] is None)}/{len(records) - len(fell)}",
            ]
        rows.append(row)
    header = ["method", "runs whose accuracy fell (at step)"]
    for _, name, _ in ALARMS:
        header += [f"{name}: before the fall", f"{name}: without a fall"]
    return table(header, rows) if rows else ""


def findings(grouped, columns) -> list[str]:
    """Facts read off the numbers (no interpretation): the ordering of GRPO, SDPO and SRPO at each budget."""
    out = []
    main = [m for m in ("grpo", "sdpo", "srpo") if m in grouped]
    for name, value in columns.items():
        means = {m: mean_std([value(r) for r in grouped[m]])[0] for m in main}
        ranked = sorted(main, key=lambda m: -means[m])
        out.append(f"{name}: " + " > ".join(f"{label(m)} {means[m] * 100:.1f}" for m in ranked))
    return out


# ---------------------------------------------------------------------------------------------------- figures


def plot_family(task: str, grouped, out: Path, stressed=None) -> list[Path]:
    """Accuracy vs RL step and vs training CPU time, and the diagnosis over training, for one family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def band(ax, method, xs, rows, **style):
        rows = np.asarray(rows, dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps where no seed has a value
            mean, std = np.nanmean(rows, axis=0), np.nanstd(rows, axis=0)
        ax.plot(xs, mean, color=COLORS[method], **{"label": label(method), **style})
        ax.fill_between(xs, mean - std, mean + std, color=COLORS[method], alpha=0.12)

    settings = next(iter(grouped.values()))[0]["settings"]
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4.5))
    for method in (m for m in FIGURE_METHODS if m in grouped):
        records = grouped[method]
        accuracies = [[p["accuracy"] for p in r["curve"]] for r in records]
        band(by_step, method, [p["step"] for p in records[0]["curve"]], accuracies)
        # Every seed evaluates at the same steps: x is the seeds' mean CPU time at each evaluation.
        seconds = np.mean([[p["cpu_seconds"] for p in r["curve"]] for r in records], axis=0)
        band(by_time, method, seconds, accuracies)
    accuracy = f"held-out avg@{settings['eval_k']} (T={settings['eval_temperature']}), mean ± std over seeds"
    by_step.set(xlabel="RL step (generation batch)", ylabel=accuracy, title=task)
    by_time.set(xlabel="training CPU seconds (one thread, evaluation excluded)", title=task)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths = [_save(figure, out / f"accuracy_{task}.png")]

    panels = (
        ("‖gradient‖ per part", [("srpo", "distillation", probe_series, "SRPO distillation", "-"),
                                 ("srpo", "grpo_on_routed", probe_series, "SRPO: GRPO on routed rows (replaced)", "--"),
                                 ("srpo", "grpo", probe_series, "SRPO GRPO term", ":"),
                                 ("grpo", "negative", probe_series, "GRPO negative advantages", "--")]),
        ("routed tokens: teacher top-1 ≠ sampled", [("srpo", "teacher_top1_differs_frac", probe_series, "SRPO", "-"),
                                                    ("sdpo", "teacher_top1_differs_frac", probe_series, "SDPO", "-")]),
        ("JSD per routed token", [("srpo", "divergence_mean", probe_series, "SRPO", "-"),
                                  ("sdpo", "divergence_mean", probe_series, "SDPO", "-")]),
        ("rollouts routed to SDPO", [("srpo", "srpo/route/sdpo_frac", metric_series, "SRPO", "-"),
                                     ("sdpo", "srpo/route/sdpo_frac", metric_series, "SDPO", "-")]),
    )  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(17, 4))
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for method, key, series_of, name, style in lines:
            if method not in grouped:
                continue
            series = [series_of(r, key) for r in grouped[method]]
            steps = sorted({s for one in series for s in one})
            if steps:
                band(
                    ax,
                    method,
                    steps,
                    [[one.get(s, math.nan) for s in steps] for one in series],
                    label=name,
                    linestyle=style,
                )
        ax.set(xlabel="RL step", title=title, yscale="log" if title.startswith("‖") else "linear")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    paths.append(_save(figure, out / f"diagnosis_{task}.png"))

    # SRPO's teachers: accuracy, and the logged reliability signal that should fall before accuracy does.
    teachers = [m for m in TEACHER_METHODS if m in grouped]
    if len(teachers) > 1:
        figure, axes = plt.subplots(1, 3, figsize=(17, 4))
        for method in ["grpo", *teachers] if "grpo" in grouped else teachers:
            records = grouped[method]
            band(axes[0], method, [p["step"] for p in records[0]["curve"]], [[p["accuracy"] for p in r["curve"]]
                                                                              for r in records])  # fmt: skip
        for ax, key in zip(axes[1:], TEACHER_SIGNALS, strict=True):
            for method in teachers:
                series = [metric_series(r, key) for r in grouped[method]]
                steps = sorted({s for one in series for s in one})
                if steps:
                    band(ax, method, steps, [[one.get(s, math.nan) for s in steps] for one in series])
        titles = (accuracy, "teacher's p(solution token) where a rollout leaves it", "teacher entropy (routed)")
        for ax, title in zip(axes, titles, strict=True):
            ax.set(xlabel="RL step", title=f"{task}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        paths.append(_save(figure, out / f"teachers_{task}.png"))
    if stressed:
        figure, (ax, signal) = plt.subplots(1, 2, figsize=(13, 4.5))
        for method, records in stressed.items():
            band(ax, method, [p["step"] for p in records[0]["curve"]], [[p["accuracy"] for p in r["curve"]]
                                                                         for r in records])  # fmt: skip
            series = [metric_series(r, TEACHER_SIGNALS[0]) for r in records]
            steps = sorted({s for one in series for s in one})
            if steps:
                band(signal, method, steps, [[one.get(s, math.nan) for s in steps] for one in series])
        rate = next(iter(stressed.values()))[0]["learning_rate"]
        ax.set(xlabel="RL step", ylabel=accuracy, title=f"{task}, lr {rate:.0e} (one grid step above SRPO's best)")
        signal.set(xlabel="RL step", title=f"{task}, lr {rate:.0e}: teacher's p(solution token)")
        for one in (ax, signal):
            one.grid(alpha=0.3)
            one.legend(fontsize=7)
        paths.append(_save(figure, out / f"stress_{task}.png"))
    return paths


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- RESULTS.md


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
    load = f"; load average {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}{load}. Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}."
    )


def pretrained_abilities(settings: harness.Settings) -> dict[str, float]:
    """`measure_testbed_abilities` of the family's pre-trained model on the runs' probe problems."""
    import torch

    torch.set_num_threads(1)
    from srpo_trl.testbed import make_testbed_dataset, measure_testbed_abilities

    model, tokenizer = harness.load_testbed(settings)
    problems = make_testbed_dataset(num_train=0, num_test=settings.ability_problems, seed=0, task=settings.task)
    return measure_testbed_abilities(model, tokenizer, problems["test"])


def family_block(task: str, stage: dict, out: Path, with_abilities: bool) -> tuple[list[str], dict]:
    compare = stage["compare"]
    settings = harness.Settings(**compare[0]["settings"])
    identity = harness.testbed_identity(settings)
    grouped = by_method(compare)
    stressed = by_method(stage.get("stress", []))
    columns = budgets(grouped)
    figures = plot_family(task, grouped, out, stressed)
    seeds = sorted({r["seed"] for r in compare})
    records = stage["sweep"] + compare + stage.get("stress", [])
    stale = sorted({r["testbed"]["config_hash"] for r in records} - {identity["config_hash"]})
    codes = sorted({r["code"] for r in records})
    abilities = pretrained_abilities(settings) if with_abilities else None
    lines = [
        f"## Task family `{task}`",
        "",
        f"Testbed checkpoint `{identity['config_hash']}` ("
        + ", ".join(f"{k}={v}" for k, v in identity["config"].items())
        + f"); {settings.steps} RL steps of {settings.prompts} prompts x {settings.num_generations} rollouts (T=1, "
        f"≤ {settings.max_completion_length} tokens) from {settings.num_train} RL train problems; held-out "
        f"avg@{settings.eval_k} (T={settings.eval_temperature}, top-p {settings.eval_top_p}) on {settings.num_test} "
        f"test problems every {settings.eval_every} steps; gradient probes every {settings.probe_every} steps; "
        f"constant learning rate after {settings.warmup_steps} warm-up steps, top-k {settings.distillation_topk}, "
        f"everything else `SRPOConfig`'s defaults (the paper's). `srpo_trl` code {', '.join(codes)}.",
        "",
    ]
    if stale:
        lines += [f"**Warning**: runs from testbed checkpoint(s) {stale}, not the current one: rerun.", ""]
    if len(codes) > 1:
        lines += [f"**Warning**: runs from {len(codes)} versions of `srpo_trl`: rerun.", ""]
    if abilities:
        lines += [
            f"Pre-trained model (`measure_testbed_abilities`, {settings.ability_problems} test problems): greedy "
            f"{abilities['student/accuracy_greedy'] * 100:.1f}%, sampled at T=1 "
            f"{abilities['student/accuracy_sampled'] * 100:.1f}%, groups of 8 with mixed rewards "
            f"{abilities['student/mixed_group_frac'] * 100:.1f}%; with a correct solution in the prompt (the teacher "
            f"prompt) greedy {abilities['teacher/accuracy_greedy'] * 100:.1f}%, sampled "
            f"{abilities['teacher/accuracy_sampled'] * 100:.1f}%.",
            "",
        ]
    lines += [
        f"### Learning-rate sweep (seeds {sorted({r['seed'] for r in stage['sweep']})}, one optimizer step per "
        "generation batch; best mean in bold)",
        "",
        sweep_table(stage["sweep"], stage["best"]),
        "",
        f"### Comparison at each method's best rate (seeds {seeds}; %, mean ± std)",
        "",
        comparison_table(grouped, columns),
        "",
        "### Paired differences (same seed: same problems, same evaluation samples)",
        "",
        paired_table(grouped, columns),
        "",
        "Orderings (computed): " + "; ".join(findings(grouped, columns)) + ".",
        "",
        *(stress_lines(stressed, columns) if stressed else []),
        "### Diagnosis (mean over seeds and steps, first half → second half of training)",
        "",
        "The routed tokens: how many, and how far the teacher is from the policy on them.",
        "",
        diagnosis_table(grouped, ROUTED_TOKENS),
        "",
        f"Gradient norms (before clipping) of each part of the loss, on the generation batch of step 1 and every "
        f"{settings.probe_every}th step; `replaced` is GRPO's term on the routed rollouts with the advantage GRPO would "
        "have given them.",
        "",
        diagnosis_table(grouped, GRADIENTS),
        "",
        "### Does the teacher signal fall before the accuracy?",
        "",
        f"Accuracy falls: the first evaluation {ACCURACY_FALL * 100:.0f} points below the run's best so far. A signal "
        f"alarms at the first step from {ALARM_FROM} on where its mean over the last {SMOOTHING} steps has moved by the "
        f"stated factor from its mean over the first {SMOOTHING} (thresholds fixed before the runs).",
        "",
        early_warning_table(grouped, stressed),
        "",
        f"### After training (`measure_testbed_abilities`, {settings.ability_problems} test problems; %)",
        "",
        abilities_table(grouped, abilities),
        "",
        "### Held-out accuracy per evaluation (%, mean ± std)",
        "",
        curve_table(grouped),
        "",
        " ".join(f"![{p.stem}]({p.name})" for p in figures),
        "",
    ]
    summary = {
        "best_rates": stage["best"],
        "abilities": abilities,
        "testbed": identity,
        "comparison": {
            name: {m: [value(r) for r in rs] for m, rs in grouped.items()} for name, value in columns.items()
        },
    }
    return lines, summary


def write_report(stages: dict[str, dict], out: Path, command: str, report_only: bool, with_abilities=True) -> Path:
    """Replace the generated block of `out/RESULTS.md` (the hand-written text around it is kept); write summary.json."""
    path = out / "RESULTS.md"
    summary_path = out / "summary.json"
    if report_only and summary_path.exists():  # the command that ran the runs, not this one
        command = json.loads(summary_path.read_text()).get("command", command)
    block = [
        MARK_BEGIN,
        "<!-- Generated by benchmarks/learning/run.py: everything up to learning:end is rewritten on every run. -->",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}",
        "",
    ]
    records = [r for stage in stages.values() for r in stage["sweep"] + stage["compare"] + stage.get("stress", [])]
    block += [
        f"Compute: {len(records)} runs on one torch thread each; "
        f"{sum(r['wall_seconds'] for r in records) / 3600:.1f} h wall-clock in all (saved runs count at their own "
        f"duration), of which {sum(r['curve'][-1]['cpu_seconds'] for r in records) / 3600:.1f} h CPU of training "
        "(the rest: evaluation, probes, start-up).",
        "",
    ]
    summary = {"command": command, "families": {}}
    for task, stage in stages.items():
        lines, summary["families"][task] = family_block(task, stage, out, with_abilities)
        block += lines
    block += [f"Per-run records: `{relative(out / 'runs')}/<task>/<method>-lr<rate>-seed<k>.json`.", MARK_END]
    text = "\n".join(block)
    if path.exists() and MARK_BEGIN in path.read_text():
        head, rest = path.read_text().split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1] if MARK_END in rest else ""
        path.write_text(head + text + tail)
    else:
        path.write_text("# Learning efficacy on the CPU testbed\n\n" + text + "\n")
    summary_path.write_text(json.dumps(summary, default=harness._json_default, indent=1))
    return path

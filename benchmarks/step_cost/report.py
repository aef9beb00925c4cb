"""The step-cost benchmark's report: the harness's records (`harness.py`) in markdown tables, the targets,
the plot, and the generated blocks of RESULTS.md. Every number of a generated block is computed here."""

import contextlib
import os
import platform
import re
import statistics
from pathlib import Path

import torch

from .harness import ARMS, PHASES, TEACHER_FORWARD

MIB = 2**20
NAN = float("nan")


def header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def select(rows: list[dict], **keys) -> list[dict]:
    """The measured records (no error, not skipped) whose fields equal `keys`."""
    return [r for r in rows if "error" not in r and "skipped" not in r and all(r.get(k) == v for k, v in keys.items())]


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else NAN


def min_med_max(values: list[float]) -> str:
    return "/".join(f"{v:.3f}" for v in (min(values), median(values), max(values))) if values else "n/a"


def mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def timer(record: dict, *names: str) -> float:
    return sum(record["timers"].get(name, 0.0) for name in names)


def teacher_forward(record: dict) -> float:
    """The teacher's passes (prefixes, continuations) and `teacher_statistics`: SRPO's teacher forward."""
    return timer(record, *TEACHER_FORWARD)


def paired(rows: list[dict], f: float, arm: str, other: str, value) -> list[float]:
    """`value(record of arm, record of other)` for each repeat that measured both at `f`."""
    out = []
    for record in select(rows, arm=arm, f=f):
        match = select(rows, arm=other, f=f, repeat=record["repeat"])
        if match:
            out.append(value(record, match[0]))
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares `y = a + b x`: `(a, b, R²)`."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return NAN, NAN, NAN
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot else NAN


def near(values, target: float):
    return min(values, key=lambda v: abs(v - target)) if values else None


# ---- timing ----


def timing_section(rows: list[dict], shape, device: str) -> tuple[str, dict]:
    """Tables for one shape, and the figures the targets are checked on."""
    ok = select(rows, kind="timing", shape=shape.name)
    fs = sorted({r["f"] for r in ok})
    arms = [a for a in ARMS if select(ok, arm=a)]
    unit = "CPU seconds of this process" if device == "cpu" else "seconds (wall clock, synchronised)"
    figures = {"shape": shape.name, "f": {}}
    lines = [
        f"**{shape.name}**: {shape.describe()}. Step time in {unit}, median over repeats. Ratios are taken per repeat "
        "(the arms of one repeat run back to back): min/median/max, and `best` = the ratio of the fastest steps. "
        "*Extra / teacher* = (SRPO step - GRPO step) / SRPO's teacher forward in the same repeat (median).",
        "",
        *header(
            "f (routed)",
            *(f"{a.upper()} step" for a in arms),
            *("SRPO/GRPO", "best", "SRPO/SDPO", "extra / teacher", "teacher forward / GRPO step"),
        ),
    ]
    for f in fs:
        steps = {a: [r["step_s"] for r in select(ok, arm=a, f=f)] for a in arms}
        over_grpo = paired(ok, f, "srpo", "grpo", lambda s, g: s["step_s"] / g["step_s"])
        over_sdpo = paired(ok, f, "srpo", "sdpo", lambda s, d: s["step_s"] / d["step_s"])
        extra = (
            paired(ok, f, "srpo", "grpo", lambda s, g: (s["step_s"] - g["step_s"]) / teacher_forward(s)) if f else []
        )
        no_topk = paired(
            ok, f, "srpo", "grpo", lambda s, g: (s["step_s"] - g["step_s"] - timer(s, "student_topk")) / teacher_forward(s)
        ) if f else []  # fmt: skip
        teacher = paired(ok, f, "srpo", "grpo", lambda s, g: teacher_forward(s) / g["step_s"])
        best = min(steps["srpo"]) / min(steps["grpo"]) if steps.get("srpo") and steps.get("grpo") else NAN
        figures["f"][f] = {
            "over_grpo": over_grpo,
            "best": best,
            "extra_over_teacher": extra,
            "no_topk": no_topk,
            "teacher": teacher,
        }
        lines.append(
            f"| {f:.3f} | "
            + " | ".join(f"{median(steps[a]):.3f}" for a in arms)
            + f" | {min_med_max(over_grpo)} | {best:.3f} | {median(over_sdpo):.3f} | "
            + (f"{median(extra):.3f}" if extra else "n/a")
            + f" | {median(teacher):.3f} |"
        )
    lines += [
        "",
        "Where the time goes (median, same unit): each arm's prepare / forward+backward / optimizer+EMA; SRPO's teacher "
        "forward as its prefix passes / continuation passes / `teacher_statistics`; SRPO's distillation forward (within "
        "its forward+backward, span `distillation`).",
        "",
        *header("f", *(f"{a.upper()} prep / fwd+bwd / opt" for a in arms), "SRPO teacher", "SRPO distill fwd"),
    ]
    for f in fs:
        srpo = select(ok, arm="srpo", f=f)
        cells = [
            " / ".join(f"{median(r['phases'][p]['s'] for r in select(ok, arm=a, f=f)):.3f}" for p in PHASES)
            for a in arms
        ]
        teacher = " / ".join(f"{median(timer(r, name) for r in srpo):.3f}" for name in TEACHER_FORWARD)
        distill = median(timer(r, "distillation") for r in srpo)
        lines.append(f"| {f:.3f} | " + " | ".join(cells) + f" | {teacher} | {distill:.3f} |")
    f04 = near([f for f in fs if f > 0], 0.4)
    if f04 is not None and {"grpo", "srpo"} <= set(arms):
        lines += ["", *itemised_extra(ok, f04)]
    srpo = select(ok, arm="srpo")
    if srpo:
        a, b, r2 = fit_line([r["f"] for r in srpo], [teacher_forward(r) for r in srpo])
        at_zero = max([r["teacher_s"] or 0.0 for r in srpo if r["f"] == 0.0], default=NAN)
        figures["teacher_fit"] = {"r2": r2, "at_zero": at_zero}
        lines += [
            "",
            f"Teacher forward against f, least squares over every SRPO step: {a:.4f} + {b:.4f} f (R² = {r2:.3f}); the "
            f"largest `srpo/time/teacher_s` SRPO logged at f = 0: {at_zero:.6f} s.",
        ]
    for r in rows:
        if r.get("kind") == "timing" and r.get("shape") == shape.name and "error" in r:
            lines += ["", f"{r['arm'].upper()} not measured: `{r['error']}`"]
    return "\n".join(lines), figures


def itemised_extra(ok: list[dict], f: float) -> list[str]:
    """SRPO's step minus GRPO's at `f`, item by item (medians), in seconds, GRPO steps and teacher forwards."""

    def med(arm, get):
        return median(get(r) for r in select(ok, arm=arm, f=f))

    def phase(name):
        return lambda r: r["phases"][name]["s"]

    grpo, teacher = med("grpo", lambda r: r["step_s"]), med("srpo", teacher_forward)
    prompts = med("srpo", lambda r: timer(r, "teacher_prompts"))
    items = [
        ("teacher forward (prefixes, continuations, `teacher_statistics`)", teacher),
        ("teacher prompts (span `teacher_prompts`: decode the sibling, chat template, tokenize)", prompts),
        ("rest of prepare (per-token scatter, entropy weights, metrics)", med("srpo", phase("prepare")) - teacher
         - prompts - med("grpo", phase("prepare"))),
        ("forward+backward beyond GRPO's (distillation term, less GRPO's head on distilled rows)",
         med("srpo", phase("forward_backward")) - med("grpo", phase("forward_backward"))),
        ("... of which the student's top-k (`torch.topk` in `student_topk_logps`)",
         med("srpo", lambda r: timer(r, "student_topk"))),
        ("optimizer + EMA beyond GRPO's", med("srpo", phase("optimizer")) - med("grpo", phase("optimizer"))),
    ]  # fmt: skip
    total = med("srpo", lambda r: r["step_s"]) - grpo
    return [
        f"SRPO's step minus GRPO's at f = {f:.3f}, item by item (medians):",
        "",
        *header("item", "seconds", "/ GRPO step", "/ teacher forward"),
        *[f"| {name} | {value:.3f} | {value / grpo:.3f} | {value / teacher:.3f} |" for name, value in items],
        f"| total (SRPO step - GRPO step) | {total:.3f} | {total / grpo:.3f} | {total / teacher:.3f} |",
    ]


# ---- teacher prefix sharing ----


def prefix_section(rows: list[dict], shapes) -> tuple[str, dict]:
    prefix = select(rows, kind="prefix")
    if not prefix:
        return "", {}
    figures = {}
    lines = [
        "**One teacher prefix per group.** SRPO's teacher forward on the replayed batch with `k` routed rollouts in "
        "every group (the demonstration is a sibling's completion, so as long as the completion scored), each group's "
        "teacher prompt computed once (*shared*, SRPOTrainer) or once per routed rollout (*per row*, "
        "`unique_prefixes` patched), interleaved; median over repeats. Teacher forward = prefix passes + continuation "
        "passes + `teacher_statistics`; *backbone* leaves out `teacher_statistics` (the LM head on the completion "
        "tokens, the same work either way). Speed-ups are per repeat, median. *max |Δ log Z|*: the largest "
        "difference between the two ways' teacher log-normalisers.",
        "",
        *header(
            "shape", "k routed / group", "per row: prefix / cont. / stats", "shared: prefix / cont. / stats",
            "speed-up, teacher forward", "speed-up, backbone", "max abs diff log Z",
        ),
    ]  # fmt: skip
    for shape in shapes:
        for k in sorted({r["k"] for r in select(prefix, shape=shape.name)}):
            runs = {s: select(prefix, shape=shape.name, k=k, sharing=s) for s in ("per_row", "shared")}
            speedups, backbone = [], []
            for shared in runs["shared"]:
                other = [r for r in runs["per_row"] if r["repeat"] == shared["repeat"]]
                if other:
                    speedups.append(teacher_forward(other[0]) / teacher_forward(shared))
                    backbone.append(timer(other[0], *TEACHER_FORWARD[:2]) / timer(shared, *TEACHER_FORWARD[:2]))
            figures[(shape.name, k)] = speedups, backbone
            cells = [
                " / ".join(f"{median(timer(r, n) for r in runs[s]):.3f}" for n in TEACHER_FORWARD)
                for s in ("per_row", "shared")
            ]
            difference = max(r["log_normalizer_max_diff"] for r in runs["shared"])
            lines.append(
                f"| {shape.name} | {k} | {cells[0]} | {cells[1]} | {median(speedups):.2f} | {median(backbone):.2f} | "
                f"{difference:.1e} |"
            )
    return "\n".join(lines), figures


# ---- profile and memory ----


def profile_section(rows: list[dict], device: str) -> str:
    prof = [r for r in rows if r.get("kind") == "profile"]
    if not prof:
        return ""
    groups = list(prof[0]["groups"])
    lines = [
        f"**Profile** ({prof[0]['shape']}, f = {prof[0]['f']:.3f}, torch.profiler "
        f"{'GPU kernel' if device == 'cuda' else 'CPU'} time as a share of the profiled steps' wall time; inclusive, "
        "so groups can overlap):",
        "",
        *header("arm", "step (wall, profiled)", *groups, "top self-time operations"),
    ]
    for r in prof:
        top = ", ".join(f"{k} {v:.0%}" for k, v in r["top_self"])
        lines.append(
            f"| {r['arm'].upper()} | {r['wall_s']:.3f} s | "
            + " | ".join(f"{r['groups'][g]:.0%}" for g in groups)
            + f" | {top} |"
        )
    return "\n".join(lines)


def memory_section(rows: list[dict]) -> tuple[str, dict]:
    lines, figures = [], {}

    def peak(r, phase):
        return (r.get("phases", {}).get(phase) or {}).get("peak_bytes")

    def step_peak(r):
        return max((peak(r, p) or 0) for p in PHASES)

    for kind, key, label in (("vocab", "vocab", "vocabulary"), ("length", "completion_len", "completion length")):
        sweep = [r for r in rows if r.get("kind") == kind]
        measured = [r for r in sweep if "phases" in r]
        if not measured:
            continue
        one = measured[0]
        fixed = f"vocab {one['vocab']}" if kind == "length" else f"{one['completion_len']}-token completions"
        lines += [
            f"**Peak memory as the {label} grows** ({one['batch']} rollouts, f = {one['f']:.2f}, {fixed}): MiB above "
            "the memory in use when the phase starts, one step in a fresh process. `logits` is one `[batch, "
            "completion, vocab]` float32 tensor, for scale.",
            "",
            *header(
                label, "GRPO fwd+bwd", "SRPO fwd+bwd", "SRPO/GRPO", "SDPO fwd+bwd", "SRPO prepare (teacher)",
                "step peak SRPO/GRPO", "logits",
            ),
        ]  # fmt: skip
        for value in sorted({r[key] for r in sweep}):
            by_arm = {r["arm"]: r for r in sweep if r[key] == value}
            g, s, d = by_arm.get("grpo", {}), by_arm.get("srpo", {}), by_arm.get("sdpo", {})
            if "phases" not in g or "phases" not in s:
                continue
            ratio = peak(s, "forward_backward") / max(peak(g, "forward_backward") or 1, 1)
            figures.setdefault(kind, {})[value] = ratio
            sdpo = mib(peak(d, "forward_backward")) if "phases" in d else d.get("skipped", d.get("error", "n/a"))
            lines.append(
                f"| {value} | {mib(peak(g, 'forward_backward'))} | {mib(peak(s, 'forward_backward'))} | {ratio:.2f} | "
                f"{sdpo} | {mib(peak(s, 'prepare'))} | {step_peak(s) / max(step_peak(g), 1):.2f} | "
                f"{mib(s['batch'] * s['completion_len'] * s['vocab'] * 4)} |"
            )
        lines.append("")
    lines += [f"Memory run {r['kind']} {r['shape']} {r['arm']} failed: `{r['error']}`" for r in rows if "error" in r]
    return "\n".join(lines), figures


# ---- targets ----


def targets_section(timing: list[dict], prefix: dict, memory: dict) -> str:
    lines = ["**Targets** (issue 14)", "", *header("target", "measured", "met")]

    def yes(ok):
        return "yes" if ok else "**no**"

    for figures in timing:
        shape, per_f = figures["shape"], figures["f"]
        zero = per_f.get(0.0)
        if zero and zero["over_grpo"]:
            value = median(zero["over_grpo"])
            lines.append(
                f"| {shape}: f = 0, SRPO/GRPO step <= 1.02 | {value:.3f} (median of repeats; fastest steps "
                f"{zero['best']:.3f}) | {yes(value <= 1.02)} |"
            )
        f04 = near([f for f in per_f if f > 0 and per_f[f]["extra_over_teacher"]], 0.4)
        if f04 is not None:
            extra, no_topk = per_f[f04]["extra_over_teacher"], per_f[f04]["no_topk"]
            value = median(extra)
            lines.append(
                f"| {shape}: f = {f04:.3f}, SRPO step - GRPO step <= 1.1 x teacher forward | {value:.3f} x "
                f"(repeats {min(extra):.3f}-{max(extra):.3f}); without the student's top-k {median(no_topk):.3f} x "
                f"(repeats {min(no_topk):.3f}-{max(no_topk):.3f}); SRPO/GRPO {median(per_f[f04]['over_grpo']):.3f}, teacher forward "
                f"{median(per_f[f04]['teacher']):.3f} GRPO steps | {yes(value <= 1.1)} |"
            )
        fit = figures.get("teacher_fit")
        if fit:
            ok = fit["r2"] > 0.9 and fit["at_zero"] < 1e-3
            lines.append(
                f"| {shape}: teacher forward linear in f, none at f = 0 | R² = {fit['r2']:.3f}; "
                f"{fit['at_zero'] * 1e3:.3f} ms logged at f = 0 | {yes(ok)} |"
            )
        for part, speedups in zip(("teacher forward", "teacher backbone"), prefix.get((shape, 4), ()), strict=False):
            value = median(speedups)
            lines.append(
                f"| {shape}: {part} at 4 routed rollouts per group, one prefix per row / one per group >= 1.5 "
                f"| {value:.2f} x (repeats {min(speedups):.2f}-{max(speedups):.2f}) | {yes(value >= 1.5)} |"
            )
    vocab = memory.get("vocab", {})
    if vocab:
        top = max(vocab)
        lines.append(
            f"| loss-step peak memory at vocab {top}: SRPO <= 1.3 x GRPO | {vocab[top]:.2f} x | {yes(vocab[top] <= 1.3)} |"
        )
    return "\n".join(lines)


# ---- environment, plot, RESULTS.md ----


def environment(device: str) -> str:
    import accelerate
    import datasets
    import transformers
    import trl

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    load = f"; load average {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}{gpu}; {torch.get_num_threads()} torch thread(s){load}. Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, accelerate "
        f"{accelerate.__version__}, datasets {datasets.__version__}."
    )


def plot(rows: list[dict], shapes, path: Path, device: str) -> None:
    """Step time against f per shape; the teacher forward's speed-up from prefix sharing against routed rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in shapes if select(rows, kind="timing", shape=s.name)]
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5.2 * (len(shapes) + 1), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=False):
        for arm, style in (("grpo", "o-"), ("srpo", "s-"), ("sdpo", "^-")):
            rs = select(rows, kind="timing", shape=shape.name, arm=arm)
            if rs:
                fs = sorted({r["f"] for r in rs})
                steps = [[r["step_s"] for r in rs if r["f"] == f] for f in fs]
                ax.plot(fs, [median(s) for s in steps], style, label=arm.upper())
                ax.fill_between(fs, [min(s) for s in steps], [max(s) for s in steps], alpha=0.2)
        ax.set(title=f"{shape.name} ({device}): step time vs f", xlabel="f = fraction of routed rollouts")
        ax.set_ylabel(f"{'CPU s' if device == 'cpu' else 's'} per step (median; band min-max)")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax = axes[0][-1]
    for shape, color in zip(shapes, ("C0", "C1", "C2"), strict=False):
        runs = select(rows, kind="prefix", shape=shape.name)
        ks = sorted({r["k"] for r in runs})
        for label, style, part in (
            ("teacher forward", "s-", TEACHER_FORWARD),
            ("backbone", "x--", TEACHER_FORWARD[:2]),
        ):
            speedup = [
                median(timer(r, *part) for r in runs if r["k"] == k and r["sharing"] == "per_row")
                / median(timer(r, *part) for r in runs if r["k"] == k and r["sharing"] == "shared")
                for k in ks
            ]
            ax.plot(ks, speedup, style, color=color, label=f"{shape.name}: {label}")
    ax.axhline(1.5, color="grey", linestyle="--", label="target at k = 4")
    ax.set(title="teacher forward: one prefix per row / per group", xlabel="routed rollouts per group")
    ax.set_ylabel("speed-up (medians)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(timing_rows, memory_rows, shapes, device: str, preamble: str) -> str:
    sections, figures = [preamble], []
    for shape in shapes if timing_rows else []:
        text, shape_figures = timing_section(timing_rows, shape, device)
        sections.append(text)
        figures.append(shape_figures)
    prefix_text, prefix_figures = prefix_section(timing_rows, shapes)
    memory_text, memory_figures = memory_section(memory_rows)
    sections += [prefix_text, profile_section(timing_rows, device), memory_text]
    sections.append(targets_section(figures, prefix_figures, memory_figures))
    return "\n\n".join(s.strip() for s in sections if s.strip())


def write_block(results_md: Path, tag: str, text: str) -> None:
    """Replace the text between `<!-- results:{tag}:begin -->` and `<!-- results:{tag}:end -->` in RESULTS.md."""
    begin, end = f"<!-- results:{tag}:begin -->", f"<!-- results:{tag}:end -->"
    content = results_md.read_text() if results_md.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in content and end in content:
        content = content[: content.index(begin)] + block + content[content.index(end) + len(end) :]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(content)

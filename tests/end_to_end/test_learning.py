"""`benchmarks/learning` (`make bench-learning`) at toy size: the learning benchmark keeps running end to end.

Nothing here asserts which arm learns best: the figures live in `benchmarks/learning/RESULTS.md`. That each family's
pre-trained testbed model has the abilities the benchmark relies on is asserted by
`tests/unit/test_testbed.py::test_default_testbed_model_has_both_abilities`, on the same cached checkpoints.
"""

import json
import math
from pathlib import Path

import pytest
from helpers.script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "learning" / "run.py"


@pytest.fixture(scope="module")
def learning():
    return load_script(SCRIPT, "learning_benchmark")


def _record(learning, task, method, lr, seed, accuracies, steps=4, eval_every=2):
    """A run record as `harness.run_one` saves it, with made-up numbers."""
    settings = learning.harness.Settings(task=task, steps=steps, eval_every=eval_every)
    spg = learning.harness.METHODS[method].steps_per_generation
    curve = [
        {"step": eval_every * i, "cpu_seconds": 10.0 * i, "accuracy": accuracy}
        for i, accuracy in enumerate(accuracies)
    ]
    history = []
    for step in range(1, steps * spg + 1):
        entry = {"step": step, "loss": 0.1}
        if (step - 1) % spg == 0:  # scoring-time metrics: once per generation batch
            entry["reward"] = 0.3
            if method != "grpo":
                entry.update({"srpo/route/sdpo_frac": 0.5, "srpo/teacher_rejects_sampled_frac": 0.1})
        history.append(entry)
    probes = [{"step": s, "total": 1.0, "grpo": 0.5, "distillation": 0.2, "grpo_on_routed": 0.8} for s in (1, 3)]
    abilities = {"student/accuracy_greedy": 0.5, "student/accuracy_sampled": 0.4, "teacher/accuracy_greedy": 0.9,
                 "teacher/accuracy_sampled": 0.8}  # fmt: skip
    return {
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "testbed": learning.harness.testbed_identity(settings),
        "code": "test",
        "settings": vars(settings),
        "steps_per_generation": spg,
        "curve": curve,
        "probes": probes if method != "grpo_4steps" else [],
        "final_abilities": {"policy": abilities, "teacher": abilities},
        "wall_seconds": 1.0,
        "log_history": history,
    }


def test_budgets_series_and_best_rates(learning):
    report = learning.report
    record = _record(learning, "addition", "grpo_4steps", 1e-4, 0, [0.4, 0.6, 0.5])
    assert report.best_within_steps(record, 0) == 0.4
    assert report.best_within_steps(record, 3) == 0.6
    assert report.best_within_seconds(record, 25.0) == 0.6
    assert report.final_accuracy(record, last=2) == pytest.approx(0.55)
    assert report.step_seconds(record) == pytest.approx(5.0)
    # Four optimizer steps per generation batch: the metrics are put on the RL-step axis.
    assert report.metric_series(record, "reward") == {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3}
    assert report.probe_series(_record(learning, "addition", "srpo", 1e-4, 0, [0.4]), "distillation") == {
        1: 0.2,
        3: 0.2,
    }
    sweep = [
        _record(learning, "addition", method, lr, 0, [0.4, final])
        for method, lr, final in (("grpo", 1e-4, 0.5), ("grpo", 3e-4, 0.6), ("srpo", 1e-4, 0.7), ("srpo", 3e-4, 0.7))
    ]
    assert report.best_rates(sweep) == {"grpo": 3e-4, "srpo": 1e-4}  # the lower rate on a tie
    # Over two seeds the rate is chosen by the mean: seed 100 alone would pick 3e-4, which seed 101 collapses at.
    sweep = [
        _record(learning, "reversal", "srpo", lr, seed, [0.4, final])
        for lr, seed, final in ((1e-4, 100, 0.8), (3e-4, 100, 0.9), (1e-4, 101, 0.8), (3e-4, 101, 0.1))
    ]
    assert report.best_rates(sweep) == {"srpo": 1e-4}
    assert "| **80.0 (80.0, 80.0)** | 50.0 (90.0, 10.0) |" in report.sweep_table(sweep, {"srpo": 1e-4})


def test_paired_differences_are_per_seed(learning):
    report = learning.report
    grouped = {
        "srpo": [_record(learning, "addition", "srpo", 1e-4, s, [0.4, a]) for s, a in ((1, 0.6), (2, 0.5))],
        "grpo": [_record(learning, "addition", "grpo", 1e-4, s, [0.4, a]) for s, a in ((2, 0.45), (1, 0.7))],
    }
    differences = report.paired_differences(grouped, "srpo", "grpo", report.final_accuracy)
    assert differences == pytest.approx([-0.1, 0.05])
    assert report.fmt_paired(differences) == "-2.5 ± 10.6 (1/2)"


def test_early_warning_counts_alarms_before_and_without_a_fall(learning):
    report = learning.report

    def run(seed, accuracies, solution_probs):
        record = _record(learning, "reversal", "srpo", 1e-3, seed, accuracies, steps=60, eval_every=10)
        for entry, prob in zip(record["log_history"], solution_probs, strict=True):
            entry["srpo/teacher_solution_prob"] = prob
            entry["srpo/teacher_entropy/mean"] = 0.1
        return record

    steady, sliding = [0.9] * 60, [0.9] * 30 + [0.5] * 30  # trailing 10-step mean < 0.72 from step 35 on
    falls = run(1, [0.4, 0.8, 0.9, 0.9, 0.85, 0.7, 0.5], sliding)  # 20 points below its best at step 50
    assert report.accuracy_fall_step(falls) == 50
    assert report.alarm_step(report.metric_series(falls, "srpo/teacher_solution_prob"), report.ALARMS[0][2]) == 35
    table = report.early_warning_table(
        {"srpo": [falls, run(2, [0.4, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9], sliding), run(3, [0.4] + [0.9] * 6, steady)]}
    )
    # seed 1 falls at 50, warned 15 steps ahead; seed 2 alarms without a fall; entropy never alarms
    assert "| SRPO (lr 1e-03) | 1/3 (step 50) | 1/1, 15 steps ahead | 1/2 | 0/1 | 0/2 |" in table


def test_report_from_saved_runs(learning, tmp_path):
    """`--report-only` rebuilds RESULTS.md's generated block and the figures of every family from saved records."""
    harness = learning.harness
    for task in ("addition", "reversal"):
        runs = tmp_path / "runs" / task
        runs.mkdir(parents=True)
        arms = [(method, lr, seed) for method in learning.SWEPT for lr in (1e-4, 3e-4, 1e-3) for seed in (100, 101)]
        arms += [(method, 3e-4 if method != "grpo_4steps" else 3e-4 / 5, seed) for seed in (1, 2)
                 for method in (*learning.SWEPT, "grpo_4steps", *learning.AT_SRPO_RATE)]  # fmt: skip
        arms += [(method, 1e-3, seed) for seed in (1, 2) for method in learning.STRESSED]  # one step above 3e-4
        for i, (method, lr, seed) in enumerate(arms):
            accuracies = [0.4, 0.5, 0.5 + 0.1 * (lr > 2e-4)] if seed >= 100 else [0.4, 0.45 + 0.01 * (i % 5), 0.55]
            record = _record(learning, task, method, lr, seed, accuracies)
            (runs / f"{harness.run_name(method, lr, seed)}.json").write_text(json.dumps(record))
    (tmp_path / "RESULTS.md").write_text(
        f"# Title\n\nhand-written before\n\n{learning.report.MARK_BEGIN}\nstale\n{learning.report.MARK_END}\n\nafter\n"
    )
    learning.main(["--report-only", "--no-abilities", "--out", str(tmp_path), "--seeds", "2", "--sweep-seeds", "2",
                   "--learning-rates", "1e-4", "3e-4", "1e-3"])  # fmt: skip

    text = (tmp_path / "RESULTS.md").read_text()
    assert "hand-written before" in text and "after" in text and "stale" not in text
    for task in ("addition", "reversal"):
        assert f"## Task family `{task}`" in text
        for name in (f"accuracy_{task}.png", f"diagnosis_{task}.png", f"teachers_{task}.png", f"stress_{task}.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 50.0 (50.0, 50.0) | **55.0 (55.0, 55.0)** |" in text  # the sweep's final accuracies, the best in bold
    assert "| SRPO − GRPO |" in text and "(0/2)" in text  # paired differences, seeds ahead
    assert "### Stress: one grid step above SRPO's best rate (lr 1e-03" in text
    assert "| SRPO, frozen initial teacher − SRPO |" in text.split("### Stress")[1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["families"]["reversal"]["best_rates"] == dict.fromkeys(learning.SWEPT, 3e-4)


@pytest.mark.slow
def test_learning_benchmark_runs_end_to_end(learning, tmp_path):
    # `--quick` (one comparison seed, a short ability probe) at one family and one rate, three RL steps per run, in
    # worker processes as `make bench-learning` runs them.
    argv = ["--quick", "--tasks", "reversal", "--learning-rates", "3e-4", "--steps", "3", "--eval-every", "1",
            "--num-test", "20", "--jobs", "2", "--out", str(tmp_path)]  # fmt: skip
    result = learning.main(argv)

    stage = result["stages"]["reversal"]
    assert stage["best"] == dict.fromkeys(learning.SWEPT, 3e-4)
    records = {record["method"]: record for record in stage["compare"]}
    assert set(records) == {*learning.SWEPT, "grpo_4steps", *learning.AT_SRPO_RATE}
    assert records["grpo_4steps"]["learning_rate"] == pytest.approx(3e-4 / 5)
    for record in records.values():
        assert [point["step"] for point in record["curve"]] == [0, 1, 2, 3]
        assert all(0.0 <= point["accuracy"] <= 1.0 for point in record["curve"])
        assert learning.report.metric_series(record, "reward").keys() == {1, 2, 3}
    # Probes on the first step (and every probe_every-th): the branches' parts add up to the step's gradient.
    probe = records["srpo"]["probes"][0]
    assert probe["step"] == 1 and probe["distillation"] > 0 and probe["grpo_on_routed"] > 0
    assert probe["parts_residual"] < 1e-4
    assert 0.0 <= probe["teacher_top1_differs_frac"] <= 1.0
    assert records["grpo"]["probes"][0]["negative"] > 0 and not records["grpo_4steps"]["probes"]
    rejected = learning.report.metric_series(records["srpo"], "srpo/teacher_rejects_sampled_frac")
    assert rejected and all(0.0 <= value <= 1.0 for value in rejected.values())
    entropy = learning.report.metric_series(records["sdpo"], "srpo/teacher_entropy/mean")
    assert entropy and all(math.isfinite(value) for value in entropy.values())

    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Task family `reversal`" in text and "Pre-trained model" in text
    assert (tmp_path / "diagnosis_reversal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Saved runs are reused: a second call runs nothing.
    before = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "reversal").glob("*-seed*.json")}
    learning.main(argv)
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs" / "reversal").glob("*-seed*.json")} == before

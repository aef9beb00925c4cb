"""`benchmarks/learning/run.py` (`make bench-learning`) at toy size: the learning benchmark keeps running end to end.

Nothing here asserts which arm learns best: the figures live in `benchmarks/learning/RESULTS.md`. That the
pre-trained testbed model has the two abilities the benchmark relies on (mixed rewards within a group; a correct
solution in the prompt makes the answer much more likely) is asserted by
`tests/test_testbed.py::test_default_testbed_model_has_both_abilities`, on the same cached checkpoint; the slow
test here checks that the benchmark measures and reports them.
"""

import json
import math
from pathlib import Path

import pytest
from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learning" / "run.py"
PNGS = ("accuracy.png", "accuracy_vs_time.png", "routed_fraction.png", "response_length.png", "teacher_entropy.png")


@pytest.fixture(scope="module")
def learning():
    return load_script(SCRIPT, "learning_benchmark")


def _synthetic_record(learning, arm: str, seed: int, accuracies: list[float]) -> dict:
    settings = learning.Settings(steps=4, eval_every=2)
    spg = learning.ARMS[arm]["steps_per_generation"]
    curve = [
        {
            "step": 2 * i,
            "optimizer_step": 2 * i * spg,
            "train_seconds": 10.0 * i,
            "cpu_seconds": 10.0 * i,
            "accuracy": a,
        }
        for i, a in enumerate(accuracies)
    ]
    history = []
    for step in range(1, 4 * spg + 1):
        entry = {"step": step, "loss": 0.1}
        if (step - 1) % spg == 0:  # generation-time metrics: once per generation batch
            entry.update({"reward": 0.3, "completions/mean_length": 20.0})
            if arm != "grpo":
                entry.update({"srpo/route/sdpo_frac": 0.5, "srpo/teacher_entropy/mean": 0.05})
        history.append(entry)
    return {
        "arm": arm,
        "seed": seed,
        "settings": vars(settings),
        "config": {"steps_per_generation": spg},
        "curve": curve,
        "wall_seconds": 1.0,
        "log_history": history,
    }


def test_budgets_and_series(learning):
    record = _synthetic_record(learning, "grpo", 0, [0.4, 0.6, 0.5])
    assert learning.best_within_steps(record, 0) == 0.4
    assert learning.best_within_steps(record, 3) == 0.6
    assert learning.best_within_seconds(record, 25.0) == 0.6
    assert learning.final_accuracy(record, last=2) == pytest.approx(0.55)
    assert learning.step_seconds(record) == pytest.approx(5.0)
    # GRPO takes 4 optimizer steps per generation batch: its metrics are put on the RL-step axis.
    assert learning.metric_series(record, "reward") == {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3}
    assert learning.metric_series(record, "srpo/route/sdpo_frac") == {}


def test_learning_rates_keep_the_papers_ratios(learning):
    units = {arm: spec["lr_units"] for arm, spec in learning.ARMS.items()}
    assert units["srpo"] / units["grpo"] == 5 and units["sdpo"] / units["grpo"] == 10
    assert units["srpo_no_dw"] == units["advantage_mix"] == units["srpo"]
    assert learning.ARMS["grpo"]["steps_per_generation"] == 4
    assert {spec["routing"] for spec in learning.ARMS.values()} == {"grpo", "sdpo", "srpo", "advantage_mix"}
    assert not learning.ARMS["sdpo"]["dynamic_weighting"] and not learning.ARMS["srpo_no_dw"]["dynamic_weighting"]


def test_report_from_saved_runs(learning, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed in (0, 1):
        for i, arm in enumerate(learning.ARMS):
            record = _synthetic_record(learning, arm, seed, [0.4, 0.45 + 0.01 * i, 0.5 - 0.01 * seed])
            (runs / f"{arm}-seed{seed}.json").write_text(json.dumps(record))
    (tmp_path / "RESULTS.md").write_text(
        f"# Title\n\nhand-written before\n\n{learning.MARK_BEGIN}\nstale\n{learning.MARK_END}\n\nhand-written after\n"
    )
    learning.main(["--report-only", "--no-abilities", "--out", str(tmp_path)])

    text = (tmp_path / "RESULTS.md").read_text()
    assert "hand-written before" in text and "hand-written after" in text and "stale" not in text
    assert "### Table 1" in text and "### Table 2" in text
    for spec in learning.ARMS.values():
        assert f"| {spec['label']} |" in text
    assert "| GRPO | 40.0 ± 0.0 |" in text  # initial accuracy, mean ± std over the two seeds
    for name in PNGS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_learning_benchmark_runs_end_to_end(learning, tmp_path):
    # One seed, three RL steps per arm, in worker processes as `make bench-learning` runs them.
    argv = ["--steps", "3", "--seeds", "1", "--eval-every", "1", "--num-test", "20", "--jobs", "2"]
    result = learning.main(argv + ["--out", str(tmp_path)])

    records = {record["arm"]: record for record in result["records"]}
    assert set(records) == set(learning.DEFAULT_ARMS)
    for arm, record in records.items():
        saved = json.loads((tmp_path / "runs" / f"{arm}-seed0.json").read_text())
        assert saved["curve"] == record["curve"]
        assert [point["step"] for point in record["curve"]] == [0, 1, 2, 3]
        assert all(0.0 <= point["accuracy"] <= 1.0 for point in record["curve"])
        assert record["config"]["max_steps"] == 3 * learning.ARMS[arm]["steps_per_generation"]
        assert learning.metric_series(record, "reward").keys() == {1, 2, 3}
    lrs = {arm: record["config"]["learning_rate"] for arm, record in records.items()}
    assert lrs["srpo"] / lrs["grpo"] == pytest.approx(5) and lrs["sdpo"] / lrs["grpo"] == pytest.approx(10)
    # Every arm but GRPO built a teacher and routed rollouts to it (the pre-trained model mixes rewards).
    for arm in ("sdpo", "srpo", "srpo_no_dw", "advantage_mix"):
        routed = learning.metric_series(records[arm], "srpo/teacher_available_frac")
        assert routed and max(routed.values()) > 0
        entropy = learning.metric_series(records[arm], "srpo/teacher_entropy/mean")
        assert entropy and all(math.isfinite(value) for value in entropy.values())

    text = (tmp_path / "RESULTS.md").read_text()
    assert "### Table 1" in text and "### Table 2" in text and "Pre-trained model" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 < summary["abilities"]["default"]["student/accuracy_sampled"] < 1.0
    for name in PNGS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`benchmarks/step_cost/` (`python -m benchmarks.step_cost`) at toy size, so that the benchmark keeps running against
the trainers it measures.

It checks that the benchmark runs end to end (timing, prefix sharing, profile, memory, report, plot) and that the
report is reproduced from the saved records, not any timing: the figures live in `benchmarks/RESULTS.md`. It also
fails when a named span of SRPOTrainer's that the benchmark reads is no longer opened.
"""

import pytest

from benchmarks.step_cost import harness
from benchmarks.step_cost.__main__ import main


def test_routing_control():
    assert harness.failures_per_group(0.0, 5, 8) == [0] * 5
    assert harness.failures_per_group(0.4, 5, 8) == [4, 3, 3, 3, 3]
    assert harness.failures_per_group(1.0, 2, 8) == [7, 7]  # every group keeps a correct rollout
    reward = harness.PositionalReward(group=4)
    reward.failures = [1, 3]
    assert reward([None] * 8) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_step_cost_benchmark_runs_at_toy_size(tmp_path):
    result = main(["--toy", "--out", str(tmp_path)])

    timing = [r for r in result["timing"] if r.get("kind") == "timing"]
    assert [r for r in timing if "error" in r] == []
    assert {r["arm"] for r in timing} == {"grpo", "srpo", "sdpo"}
    srpo = [r for r in timing if r["arm"] == "srpo"]
    for record in srpo:
        assert record["sdpo_frac"] == pytest.approx(record["f"])  # the reward controls routing as intended
        assert record["step_s"] > 0
    # Nothing routed, no teacher pass (a span, not a duration: on a busy machine entering the teacher takes time too).
    assert all(r["timers"].get(name, 0.0) == 0 for r in srpo if r["f"] == 0.0 for name in harness.TEACHER_FORWARD)
    routed = [r for r in srpo if r["f"] > 0]
    assert routed
    spans = ("teacher_prompts", *harness.TEACHER_FORWARD, "distillation")
    for name in (*spans, "student_topk"):
        assert all(r["timers"].get(name, 0.0) > 0 for r in routed), f"SRPOTrainer no longer opens the span {name}"
    grpo_based = [r for r in timing if r["arm"] in ("grpo", "srpo")]
    assert all(r["timers"].get("_calculate_rewards", 0.0) > 0 for r in grpo_based)  # GRPOTrainer's own spans too

    prefix = [r for r in result["timing"] if r.get("kind") == "prefix"]
    assert {(r["k"], r["sharing"]) for r in prefix} == {(k, s) for k in (1, 2) for s in ("shared", "per_row")}
    assert all(r["log_normalizer_max_diff"] <= 1e-5 for r in prefix)  # sharing the prefix changes no teacher figure
    assert all(r["timers"]["teacher_prefix"] > 0 and r["timers"]["teacher_continuation"] > 0 for r in prefix)
    assert {r["arm"] for r in result["timing"] if r.get("kind") == "profile"} == {"grpo", "srpo", "sdpo"}

    memory = result["memory"]
    assert memory and all("phases" in r for r in memory), [r.get("error") for r in memory]
    assert {r["kind"] for r in memory} == {"vocab", "length"}

    assert "**Targets**" in result["report"] and "One teacher prefix per group" in result["report"]
    assert (tmp_path / "step_time_vs_f_cpu_toy.png").stat().st_size > 0
    saved = tmp_path / "results-cpu-toy.json"
    again = main(["--report", str(saved), "--out", str(tmp_path / "again")])
    assert again["report"] == result["report"]  # RESULTS.md's blocks are reproduced from the saved records

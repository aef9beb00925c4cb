"""The first GPU session's logic on CPU: `benchmarks/gpu_session.sh` in its dry mode (every stage at toy size) with a
fake `$OUT`, the limits on what the device tool brings back, the session's time budget, and the memory probe's
arithmetic (`benchmarks/memory_probe.py`, `benchmarks/memory_estimate.py`)."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers.script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
SESSION = ROOT / "benchmarks" / "gpu_session.sh"
STAGES = ["install", "environment", "rehearsal", "memory_probe", "step_cost"]
SESSION_BUDGET_S = 8 * 60


@pytest.fixture(scope="module")
def session():
    return load_script(ROOT / "benchmarks" / "gpu_session.py", "gpu_session")


@pytest.fixture(scope="module")
def probe():
    return load_script(ROOT / "benchmarks" / "memory_probe.py", "memory_probe")


def stage_limits() -> dict[str, int]:
    return {name: int(s) for name, s in re.findall(r"^(?:if )?stage (\w+) (\d+) ", SESSION.read_text(), re.M)}


def test_every_stage_has_a_timeout_and_all_fit_the_session():
    limits = stage_limits()
    assert list(limits) == STAGES
    assert sum(limits.values()) <= SESSION_BUDGET_S - 20  # the summary and the machine's own start-up after them
    text = SESSION.read_text()
    assert "set -e" not in text.replace("set -euo", "").replace("not -e", "")  # a failed stage stops nothing
    assert re.search(r"\bpython\b(?!3)", text.split("set -uo pipefail")[1]) is None  # that machine has python3
    for variable in ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "WANDB_MODE=offline"):
        assert variable in text


def test_out_limits_are_those_of_the_device_tool(session, tmp_path):
    assert session.out_violations(tmp_path) == []
    for i in range(9):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as big:
        big.truncate(16 * 2**20 + 1)
    problems = "\n".join(session.out_violations(tmp_path))
    assert "12 files (at most 8)" in problems
    assert "deep.txt: more than 2 folders down" in problems
    assert "bad name.txt: a name outside" in problems
    assert "big.bin: 16.0 MiB" in problems


def test_summary_lists_each_stage_exit_code_and_seconds_and_what_is_not_covered(session):
    stages = [{"stage": name, "exit": "0", "seconds": 3, "limit_s": 30} for name in STAGES]
    stages[2]["exit"] = "124"
    text = session.summary_text(stages, {"rehearsal": []}, None, {"Rehearsal": "block"}, "| probe |", dry=False)
    for name in STAGES:
        assert re.search(rf"^\| {name} \| \d+", text, re.M)
    assert "| rehearsal | 124 (timed out) | 3 | 30 | - |" in text
    assert "## Not covered here" in text and "vLLM" in text and "use_vllm false" in text
    assert "block" in text and "| probe |" in text


def test_pins_name_what_the_gpu_machine_lacks(session):
    pins = session.pins()
    assert [pin.split("==")[0] for pin in pins] == ["trl", "datasets", "dill", "multiprocess"]
    assert pins[0].startswith("trl==1.16.")


def test_probe_fits_slope_and_intercept_and_compares_with_the_estimate(probe):
    fitted = probe.fit([(2, 10.0), (4, 16.0)])
    assert fitted == {"per_layer": 3.0, "intercept": 4.0, "at_36": 112.0}
    shape = probe.replace(probe.DRY, completion_len=32)
    phases = {"prepare": {"peak_bytes": 100}, "forward_backward": {"peak_bytes": 200}}
    runs = [{"arm": arm, "layers": layers, "routed_rows": 2 if arm == "srpo" else 0, "phases": phases}
            for arm in probe.ARMS for layers in probe.DEPTHS]  # fmt: skip
    table = probe.compare(runs, shape)
    assert [(row["arm"], row["phase"]) for row in table] == [
        (arm, phase) for arm in probe.ARMS for phase in ("prepare", "forward_backward")
    ]
    estimate = probe.estimate
    model = probe.model_of(shape)
    (srpo_train,) = [row for row in table if row["arm"] == "srpo" and row["phase"] == "forward_backward"]
    tokens = shape.completion_len + len(probe.harness.prompt_text(shape))
    # per layer: each layer's checkpoint of the micro-batch and its bf16 gradient (one GPU, nothing sharded)
    assert srpo_train["estimated"]["per_layer"] == 2 * shape.batch * tokens * shape.hidden + 2 * model.layer_params
    (grpo_prepare,) = [row for row in table if row["arm"] == "grpo" and row["phase"] == "prepare"]
    assert grpo_prepare["estimated"]["at_36"] == 0  # no teacher
    assert estimate.QWEN3_8B.params == pytest.approx(8.19e9, rel=1e-3)
    assert estimate.QWEN3_4B.params == pytest.approx(4.02e9, rel=1e-3)
    assert "| srpo | forward_backward |" in probe.markdown(table)


@pytest.mark.slow
def test_dry_session_writes_every_result_under_out_within_the_limits(session, shared_data, tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    env = {
        **os.environ,
        "GPU_SESSION_DRY": "1",
        "OUT": str(out),
        "GPU_SESSION_DATA": str(shared_data),
        "GPU_SESSION_WHEELS": str(wheels),  # none: the packages here are the ones the GPU machine gets as wheels
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(["bash", str(SESSION)], env=env, capture_output=True, text=True, timeout=400)
    summary = (out / "summary.md").read_text()
    for name in STAGES:
        assert re.search(rf"^\| {name} \| 0 \| \d+ \| {stage_limits()[name]} \|", summary, re.M), (
            f"{name} failed:\n{summary[:3000]}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
        )
    assert result.returncode == 0, result.stderr[-2000:]
    assert session.out_violations(out) == []
    names = {p.name for p in out.iterdir()}
    expected = {"summary.md", "logs.tar.gz", "rehearsal_trainer_state.json", "memory_probe.json"}
    assert expected | {"results-cpu-toy.json", "step_time_vs_f_cpu_toy.png"} == names
    assert "## Rehearsal" in summary and "## Step cost" in summary and "## Memory probe" in summary

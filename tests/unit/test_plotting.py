import json

from srpo_trl.plotting import load_history, plot_run, quality_title, series

HISTORY = [
    {
        "step": step,
        "reward": 0.1 * step,
        "srpo/route/correct_frac": 0.1 * step,
        "srpo/route/sdpo_frac": 0.8 - 0.1 * step,
        "srpo/route/fallback_frac": 0.2,
        "srpo/loss/grpo": -0.1,
        "srpo/loss/sdpo": 0.01,
    }
    for step in range(1, 6)
] + [{"step": 5, "eval_avg@16": 0.4}, {"step": 5, "train_runtime": 1.0}]


def test_series_and_history_sources(tmp_path):
    assert series(HISTORY, "eval_avg@16") == ([5], [0.4])
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": HISTORY}))
    assert load_history(tmp_path) == load_history(tmp_path / "trainer_state.json") == HISTORY


def test_plot_run_writes_a_png(tmp_path):
    path = plot_run(HISTORY, tmp_path / "run.png", title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_accuracy_panel_promises_a_held_out_line_only_when_there_is_one():
    assert quality_title(HISTORY) == "reward and held-out accuracy"
    trained_only = [entry for entry in HISTORY if "eval_avg@16" not in entry]  # the notebook's run: no evaluation
    assert "held-out accuracy" not in quality_title(trained_only)

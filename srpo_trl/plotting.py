"""Figures of a run from its logged history: routing over time and accuracy, as in the paper's figures.

```python
from srpo_trl.plotting import plot_run
plot_run(trainer.state.log_history, "run.png")          # or the path of a checkpoint's trainer_state.json
```
"""

import json
from pathlib import Path

ROUTE_SERIES = (
    ("srpo/route/correct_frac", "correct → GRPO"),
    ("srpo/route/sdpo_frac", "failed, sibling correct → SDPO"),
    ("srpo/route/fallback_frac", "failed, group failed → GRPO"),
)


def load_history(source) -> list[dict]:
    """A run's `log_history`: given as the list itself, a `trainer_state.json` path, or a checkpoint folder."""
    if isinstance(source, list):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "trainer_state.json"
    return json.loads(path.read_text())["log_history"]


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The `(steps, values)` at which `key` was logged (None values skipped)."""
    points = [(entry["step"], entry[key]) for entry in history if entry.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def evaluation_keys(history: list[dict]) -> list[str]:
    """The held-out avg@k series a run logged (`eval_avg@16`, ...): none without an evaluation."""
    return sorted({key for entry in history for key in entry if key.startswith("eval_avg@")})


def quality_title(history: list[dict]) -> str:
    """The middle panel's title: it promises a held-out line only when the run logged one."""
    return (
        "reward and held-out accuracy" if evaluation_keys(history) else "train reward (no held-out evaluation logged)"
    )


def plot_run(source, path: str | Path, title: str = "") -> Path:
    """Save a PNG with three panels: routing fractions (stacked), reward and held-out avg@k (if evaluated), branch
    losses."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_run needs matplotlib: pip install matplotlib") from error

    history = load_history(source)
    figure, (routes, quality, losses) = plt.subplots(1, 3, figsize=(15, 4))
    steps, _ = series(history, ROUTE_SERIES[0][0])
    routes.stackplot(
        steps, *[series(history, key)[1] for key, _ in ROUTE_SERIES], labels=[label for _, label in ROUTE_SERIES]
    )
    routes.set(title="where rollouts go", xlabel="step", ylabel="fraction of rollouts", ylim=(0, 1))
    routes.legend(loc="lower left", fontsize=8)
    quality.plot(*series(history, "reward"), label="train reward")
    for key in evaluation_keys(history):
        quality.plot(*series(history, key), marker="o", label=key.removeprefix("eval_"))
    quality.set(title=quality_title(history), xlabel="step")
    quality.legend(fontsize=8)
    for key in ("srpo/loss/grpo", "srpo/loss/sdpo"):
        losses.plot(*series(history, key), label=key.split("/")[-1])
    losses.set(title="branch shares of the loss", xlabel="step")
    losses.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)

"""SRPO's metrics reach a `report_to` backend: trackio, which runs offline and writes a local database."""

import json
import os
import sqlite3
from pathlib import Path

import pytest
from helpers.tiny_trainer import make_trainer

DOCUMENTED_METRICS = (
    "srpo/route/sdpo_frac",
    "srpo/route/correct_frac",
    "srpo/route/fallback_frac",
    "srpo/teacher_available_frac",
    "srpo/sdpo_token_frac",
    "srpo/loss/grpo",
    "srpo/loss/sdpo",
    "srpo/teacher_entropy/mean",
    "srpo/weight/min",
    "srpo/weight/max",
    "srpo/teacher_prompt_truncated_frac",
    "srpo/time/teacher_s",
)


def test_srpo_metrics_reach_trackio(char_tokenizer, tmp_path):
    pytest.importorskip("trackio")

    def reward(completions, **kwargs):  # mixed groups, so that both branches are active
        return [float(i % 2) for i in range(len(completions))]

    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        reward=reward,
        report_to=["trackio"],
        project="srpo-logging-test",
        run_name="tiny",
        distillation_topk=5,
        seed=1,
    )
    trainer.train()
    database = sqlite3.connect(Path(os.environ["TRACKIO_DIR"]) / "srpo-logging-test.db")  # set in conftest.py
    logged = {}
    for (metrics,) in database.execute("SELECT metrics FROM metrics"):
        logged.update(json.loads(metrics))
    missing = [name for name in DOCUMENTED_METRICS if f"train/{name}" not in logged]
    assert not missing, f"not in trackio: {missing}"
    assert logged["train/srpo/route/sdpo_frac"] == 0.5


def test_grpo_token_statistics_are_left_out_where_every_row_is_distilled(char_tokenizer, tmp_path):
    # routing="sdpo" distils every routed row and GRPO trains none: TRL's `clip_ratio/*` were logged as None and
    # `entropy` as 0 (averages over no GRPO token).
    from helpers.tiny_trainer import logged, patterned_reward

    trainer = make_trainer(
        char_tokenizer, tmp_path, reward=patterned_reward, routing="sdpo", per_device_train_batch_size=16, max_steps=1
    )
    trainer.train()
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0 and logged(trainer, "srpo/loss/sdpo")[0] != 0
    statistics = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    assert not [key for key in statistics if key == "entropy" or key.startswith("clip_ratio/")], statistics

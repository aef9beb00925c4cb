"""benchmarks/real_model/report.py's arithmetic on hand-made run records (the benchmark itself is not run here)."""

import math
from pathlib import Path

import pytest
from helpers.script_loader import load_script

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_model" / "report.py"


@pytest.fixture(scope="module")
def report():
    return load_script(REPORT, "real_model_report")


def _record(method, seed, accuracies, lr=1e-5, done=True, **extra):
    curve = [{"step": 4 * i, "cpu_seconds": 10.0 * i, "accuracy": a, "greedy": a} for i, a in enumerate(accuracies)]
    return {"method": method, "seed": seed, "learning_rate": lr, "curve": curve, "done": done, "log_history": [],
            **extra}  # fmt: skip


def test_final_accuracy_is_the_mean_after_step_zero_and_the_rate_choice_uses_finished_runs(report):
    assert report.final_accuracy(_record("grpo", 1, [0.2, 0.4, 0.6])) == pytest.approx(0.5)
    assert math.isnan(report.final_accuracy(_record("grpo", 1, [0.2])))
    records = [_record("grpo", 100, [0.2, 0.5], lr=1e-5), _record("srpo", 100, [0.2, 0.5], lr=1e-5),
               _record("grpo", 100, [0.2, 0.9], lr=3e-5), _record("srpo", 100, [0.2, 0.3], lr=3e-5),
               _record("srpo", 100, [0.2, 1.0], lr=1e-4, done=False), _record("grpo", 1, [0.2, 1.0], lr=1e-4)]  # fmt: skip
    assert report.chosen_rate(records, (1e-5, 3e-5, 1e-4), seed=100) == 3e-5  # (0.9 + 0.3) / 2 > 0.5
    with pytest.raises(ValueError, match="seed 7"):
        report.chosen_rate(records, (1e-5,), seed=7)


def test_span_breakdown_splits_the_step_without_double_counting_nested_spans(report):
    spans = {"_prepare_inputs": 10.0, "transformers.generate": 6.0, "teacher_prefix": 1.0, "teacher_continuation": 1.0,
             "compute_loss": 8.0, "_get_per_token_logps_and_entropies": 5.0, "distillation": 2.0, "student_topk": 0.5}  # fmt: skip
    record = _record("srpo", 1, [0.2, 0.4], spans=spans)
    record["curve"][-1]["cpu_seconds"] = 40.0  # over 4 steps
    parts = report.span_breakdown(record)
    assert parts["step"] == 10.0
    assert parts["generation"] == 1.5 and parts["teacher pass"] == 0.5 and parts["scoring, rest"] == 0.5
    assert parts["policy forward"] == 1.25 and parts["top-k"] == 0.125 and parts["distillation loss, rest"] == 0.375
    assert parts["loss, rest"] == 0.25 and parts["backward, optimizer, rest"] == 5.5
    assert sum(v for k, v in parts.items() if k != "step") == pytest.approx(parts["step"])


def test_weight_agreement_correlates_weights_with_the_teachers_use_of_the_solution(report):
    departures = [{"weight": [3.0, 2.0, 0.5, 0.5], "solution_prob": [0.9, 0.6, 0.2, 0.1]}]
    agreement = report.weight_agreement([{"departures": departures}])
    assert agreement["tokens"] == 4
    assert agreement["pearson"] > 0.9 and agreement["spearman"] == pytest.approx(report._pearson([4, 3, 1.5, 1.5],
                                                                                                 [4, 3, 2, 1]))  # fmt: skip
    assert agreement["mean_weight_following"] == 2.5 and agreement["mean_weight_wrong"] == 0.5
    assert agreement["wrong_token_share"] == 0.5 and agreement["wrong_weight_share"] == pytest.approx(1 / 6)
    assert report.weight_agreement([{"departures": []}]) == {"tokens": 0}
    assert report._ranks([2.0, 1.0, 2.0]) == [2.5, 1.0, 2.5]


def test_each_block_is_replaced_alone_and_a_new_one_is_added_at_the_end(report):
    def block(name, body):
        begin, end = report.marks(name)
        return f"{begin}\n{body}\n{end}"

    text = f"# Results\n\n{block('capital', 'old capital')}\n\nReading.\n"
    text = report.with_block(text, "addition", block("addition", "addition 1"))
    assert text.endswith(f"Reading.\n\n{block('addition', 'addition 1')}\n")
    text = report.with_block(text, "capital", block("capital", "new capital"))
    assert "old capital" not in text and "new capital" in text and "addition 1" in text
    assert text.index("new capital") < text.index("Reading.") < text.index("addition 1")

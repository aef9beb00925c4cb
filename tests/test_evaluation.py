import math
from types import SimpleNamespace

import torch
from datasets import Dataset

from srpo_trl import evaluation
from srpo_trl.evaluation import BestWithinBudgetsCallback, avg_at_k
from srpo_trl.testbed.model import build_tiny_model


def test_avg_at_k_is_the_mean_reward_over_k_samples(char_tokenizer):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in "abc"], "answer": list("xyz")})
    seen = {}

    def reward(completions, answer, **kwargs):
        seen.setdefault("answers", []).extend(answer)
        return [float(len(c[0]["content"]) % 2) for c in completions]

    torch.manual_seed(0)
    model = build_tiny_model(char_tokenizer)
    value = avg_at_k(model, char_tokenizer, dataset, [reward], k=4, max_new_tokens=3, batch_size=2)
    assert seen["answers"] == [a for a in "xyz" for _ in range(4)]  # columns repeated per sample
    assert 0.0 <= value <= 1.0 and value * 12 == round(value * 12)

    def fixed(prompt_ids):  # another engine: every completion is "ab" + EOS
        return [char_tokenizer("ab")["input_ids"] + [char_tokenizer.eos_token_id] for _ in prompt_ids]

    assert avg_at_k(model, char_tokenizer, dataset, [reward], k=4, generate=fixed) == 0.0


def test_best_within_budgets_only_counts_training_time(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(evaluation.time, "monotonic", lambda: clock["now"])
    logged = []
    trainer = SimpleNamespace(args=SimpleNamespace(chat_template_kwargs=None, disable_tqdm=True), log=logged.append)
    callback = BestWithinBudgetsCallback(trainer, eval_dataset=None, eval_steps=5, budgets_hours=(1, 2), k=16)
    values = iter([0.2, 0.5, 0.4, 0.9])

    def slow_evaluation():  # evaluation takes time that must not count against the budgets
        clock["now"] += 9999
        return next(values)

    monkeypatch.setattr(callback, "evaluate", slow_evaluation)
    callback.on_train_begin(None, None, None)
    for step, hours_of_training in [(5, 0.5), (10, 0.9), (15, 1.5), (20, 2.5)]:
        # advance the clock so that training time (excluding evaluations) reaches `hours_of_training`
        clock["now"] = callback._since + (hours_of_training * 3600 - callback._training_seconds)
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert callback.best == {1: 0.5, 2: 0.5}
    assert [round(t / 3600, 2) for _, t, _ in callback.history] == [0.5, 0.9, 1.5, 2.5]
    assert logged[-1]["eval_avg@16"] == 0.9 and logged[-1]["best_avg@16_within_2h"] == 0.5
    callback.on_step_end(None, SimpleNamespace(global_step=21), None)  # not an evaluation step
    assert len(callback.history) == 4 and not math.isinf(callback.best[1])

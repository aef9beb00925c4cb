import math
from types import SimpleNamespace

import datasets
import pytest
import torch
from datasets import Dataset

from srpo_trl import evaluation
from srpo_trl.evaluation import BestWithinBudgetsCallback, avg_at_k, callbacks, scoring
from srpo_trl.testbed.model import build_tiny_model


def test_avg_at_k_is_the_fraction_of_samples_that_reach_the_threshold(char_tokenizer):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in "abc"], "answer": list("xyz")})
    seen = {}

    def reward(completions, answer, **kwargs):
        seen.setdefault("answers", []).extend(answer)
        return [float(len(c[0]["content"]) % 2) for c in completions]

    torch.manual_seed(0)
    model = build_tiny_model(char_tokenizer)
    value = avg_at_k(model, char_tokenizer, dataset, [reward], k=4, max_new_tokens=3, batch_size=2)
    assert seen["answers"] == [a for a in "xyz" for _ in range(4)]  # columns repeated per sample
    assert 0.0 <= value <= 1.0 and value * 12 == round(value * 12) and value.mean_reward == float(value)

    def fixed(prompt_ids):  # another engine: every completion is "ab" + EOS
        return [char_tokenizer("ab")["input_ids"] + [char_tokenizer.eos_token_id] for _ in prompt_ids]

    def right(completions, answer, log_extra, log_metric, **kwargs):  # 1.0 on the first problem only
        log_extra("feedback", ["..."] * len(completions))  # as under GRPOTrainer: accepted, not logged
        return [1.0 if a == "x" else 0.0 for a in answer]

    def formatted(completions, **kwargs):  # every sample is well formatted
        return [1.0] * len(completions)

    def unscorable(completions, **kwargs):
        return [None] * len(completions)

    def score(funcs, **kwargs):
        return avg_at_k(model, char_tokenizer, dataset, funcs, k=4, generate=fixed, **kwargs)

    assert score([reward]) == 0.0
    # The unweighted sum (format 1.0 + half credit) would count every sample correct; weighted, only right answers.
    assert score([right, formatted], reward_weights=[1.0, 0.5], success_reward_threshold=1.5) == 1 / 3
    assert score([right, formatted], reward_weights=[1.0, 0.5], success_reward_threshold=1.5).mean_reward == 5 / 6
    assert score([right, formatted], success_reward_threshold=1.0) == 1.0  # a format reward alone passes 1.0
    # None is unscorable: not correct, and no part of the mean reward.
    assert score([unscorable]) == 0.0 and math.isnan(score([unscorable]).mean_reward)
    assert score([right, unscorable]) == 1 / 3 and score([right, unscorable]).mean_reward == 1 / 3
    with pytest.raises(ValueError, match="2 reward_weights for 1 reward functions"):
        score([right], reward_weights=[1.0, 1.0])


def test_generate_runs_on_bounded_batches_of_sequences(char_tokenizer, monkeypatch):
    # 8 problems x 16 samples x 8k tokens of Qwen3-8B is ~150 GB of KV cache: `model.generate` gets at most
    # `sequences_per_generate` sequences at a time.
    calls = []
    hf_generate = scoring._hf_generate
    monkeypatch.setattr(scoring, "_hf_generate", lambda m, ids, *a: calls.append(len(ids)) or hf_generate(m, ids, *a))
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in "abcde"]})
    model = build_tiny_model(char_tokenizer)
    reward = lambda completions, **kwargs: [1.0] * len(completions)  # noqa: E731
    assert (
        avg_at_k(
            model, char_tokenizer, dataset, [reward], k=4, max_new_tokens=2, batch_size=2, sequences_per_generate=3
        )
        == 1.0
    )
    assert calls == [3, 3, 2, 3, 3, 2, 3, 1] and sum(calls) == 5 * 4


def test_best_within_budgets_only_counts_training_time(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["now"])
    logged = []
    monkeypatch.setattr(callbacks.Trainer, "log", lambda trainer, logs: logged.append(logs))
    args = SimpleNamespace(
        chat_template_kwargs=None, disable_tqdm=True, per_device_eval_batch_size=8, max_completion_length=8
    )
    trainer = SimpleNamespace(args=args, reward_funcs=[], reward_func_names=[], reward_weights=torch.ones(0))
    test_set = Dataset.from_dict({"prompt": ["a"]})
    callback = BestWithinBudgetsCallback(test_set, eval_steps=5, budgets_hours=(1, 2), trainer=trainer, k=16)
    values = iter(evaluation.AvgAtK(a, a / 2) for a in [0.2, 0.5, 0.4, 0.9])

    def slow_evaluation():  # evaluation takes time that must not count against the budgets
        clock["now"] += 9999
        return next(values)

    monkeypatch.setattr(callback, "evaluate", slow_evaluation)
    callback.on_train_begin(None, None, None)
    for step, hours_of_training in [(5, 0.5), (10, 0.9), (15, 1.5), (20, 2.5)]:
        # advance the clock so that training time (excluding evaluations) reaches `hours_of_training`
        clock["now"] = callback._since + (hours_of_training * 3600 - callback._training_seconds)
        callback.on_step_end(None, SimpleNamespace(global_step=step), SimpleNamespace(should_log=True))
    assert callback.best == {1: 0.5, 2: 0.5}
    assert [round(t / 3600, 2) for _, t, _ in callback.history] == [0.5, 0.9, 1.5, 2.5]
    assert logged[-1]["eval_avg@16"] == 0.9 and logged[-1]["best_avg@16_within_2h"] == 0.5
    # a budget's best is logged once that much training has passed (final from then on), not before
    assert [sorted(k for k in row if k.startswith("best_")) for row in logged] == [
        [], [], ["best_avg@16_within_1h"], ["best_avg@16_within_1h", "best_avg@16_within_2h"]
    ]  # fmt: skip
    assert logged[-1]["eval_mean_reward@16"] == 0.45
    callback.on_step_end(
        None, SimpleNamespace(global_step=21), SimpleNamespace(should_log=True)
    )  # not an evaluation step
    assert len(callback.history) == 4 and not math.isinf(callback.best[1])


def train_with_evaluation(char_tokenizer, tmp_path, **overrides):
    from helpers.tiny_trainer import PROMPTS, first_letter_reward, make_trainer

    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2, **overrides)
    callback = BestWithinBudgetsCallback(
        PROMPTS.select(range(3)), eval_steps=1, k=2, temperature=0.6, top_p=0.95, max_new_tokens=4
    )
    trainer.add_callback(callback)  # SRPOTrainer gives the callback itself
    assert callback.trainer is trainer
    trainer.train()
    assert callback.history and first_letter_reward
    return trainer


def test_the_callback_goes_in_callbacks_and_scores_as_the_trainer(char_tokenizer, tmp_path):
    from helpers.tiny_trainer import PROMPTS, first_letter_reward, make_args

    from srpo_trl import SRPOTrainer

    callback = BestWithinBudgetsCallback(PROMPTS, k=2)
    args = make_args(tmp_path, reward_weights=[0.5], success_reward_threshold=0.5, chat_template_kwargs={"a": 1})
    trainer = SRPOTrainer(
        build_tiny_model(char_tokenizer), first_letter_reward, args=args, train_dataset=PROMPTS,
        processing_class=char_tokenizer, callbacks=[callback],
    )  # fmt: skip
    assert callback.trainer is trainer
    assert (callback.kwargs["reward_weights"], callback.kwargs["success_reward_threshold"]) == ([0.5], 0.5)
    assert callback.kwargs["chat_template_kwargs"] == {"a": 1} and callback.kwargs["k"] == 2
    with pytest.raises(ValueError, match="has no trainer to evaluate"):
        BestWithinBudgetsCallback(PROMPTS).on_train_begin(None, None, None)
    with pytest.raises(TypeError, match="takes the test dataset first"):
        BestWithinBudgetsCallback(trainer, PROMPTS)


def test_evaluation_rows_are_their_own(char_tokenizer, tmp_path):
    # GRPOTrainer.log would flush the step's pending training metrics into the evaluation row
    trainer = train_with_evaluation(char_tokenizer, tmp_path)
    history = trainer.state.log_history[:-1]  # the last row is Trainer's run summary
    evaluations = [row for row in history if "eval_avg@2" in row]
    training = [row for row in history if "loss" in row]
    assert len(evaluations) == len(training) == 2
    keys = {"eval_avg@2", "eval_mean_reward@2", "epoch", "step"}  # a run of seconds: no budget has passed
    assert all(set(row) == keys for row in evaluations)
    assert all("srpo/route/sdpo_frac" in row and "reward" in row for row in training)


def test_evaluation_samples_with_the_runs_vllm_engine(char_tokenizer, tmp_path, monkeypatch):
    from helpers.vllm_stand_in import stand_in_vllm

    engines = stand_in_vllm(monkeypatch, char_tokenizer)
    trainer = train_with_evaluation(
        char_tokenizer, tmp_path, use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True, temperature=1.0
    )
    (engine,) = engines
    # training generations and evaluations alternate; each evaluation follows a weight sync (the policy moved)
    assert engine.events == ["sleep2"] + ["wake:weights", "wake:kv_cache", "generate", "sleep2"] * 4
    sampled = [params for _, params in engine.sampled_with]
    assert [p["temperature"] for p in sampled] == [1.0, 0.6, 1.0, 0.6]
    assert [p["top_p"] for p in sampled[1::2]] == [0.95, 0.95] and [p["max_tokens"] for p in sampled[1::2]] == [4, 4]
    assert [n for n, _ in engine.sampled_with][1::2] == [3 * 2, 3 * 2]  # every problem x k in one call
    assert trainer.vllm_generation.temperature == 1.0  # training's sampling parameters restored


async def async_reward(completions, **kwargs):
    return [1.0 if c[0]["content"][:1].islower() else 0.0 for c in completions]


STAGES = []


def staged_reward(completions, trainer_state, **kwargs):
    STAGES.append(trainer_state.global_step)
    return [0.5] * len(completions)


def tiny_reward_model(char_tokenizer):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    config = Qwen3Config(
        vocab_size=len(char_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_labels=1, pad_token_id=char_tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForSequenceClassification(config)


def test_avg_at_k_calls_every_reward_as_grpo_trainer_does(char_tokenizer, tmp_path):
    # Before: async rewards and rewards taking trainer_state failed in the callback (TypeError), a reward model was
    # refused, and a streamed test set had no length.
    from helpers.tiny_trainer import PROMPTS, make_args

    from srpo_trl import SRPOTrainer

    streamed = datasets.IterableDataset.from_generator(lambda: iter(PROMPTS.select(range(3))))
    callback = BestWithinBudgetsCallback(streamed, eval_steps=1, k=2)
    rewards = [async_reward, staged_reward, tiny_reward_model(char_tokenizer)]
    trainer = SRPOTrainer(
        build_tiny_model(char_tokenizer), rewards, args=make_args(tmp_path, max_steps=1, max_completion_length=4),
        train_dataset=PROMPTS, processing_class=char_tokenizer, callbacks=[callback],
        reward_processing_classes=[None, None, char_tokenizer],
    )  # fmt: skip
    assert callback.kwargs["max_new_tokens"] == 4, "the trainer's max_completion_length, not 8,192"
    trainer.train()
    ((_, _, value),) = callback.history
    assert 0.0 <= value <= 1.0 and math.isfinite(value.mean_reward)
    assert not trainer._pending_extra_logs and not trainer._pending_metrics
    assert STAGES[-1] == 1, "avg@k's rewards see the trainer's state, after the step"


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(k=0), r"k must be a positive integer; got 0"),
        (dict(k=-2), r"k must be a positive integer; got -2"),
        (dict(temperature=0.0), r"temperature must be a number > 0"),
        (dict(eval_steps=0), r"eval_steps must be a positive number of optimizer steps .*; got 0"),
        (dict(eval_steps=-5), r"eval_steps must be a positive"),
        (dict(eval_steps=None), r"eval_steps must be a positive"),
        (dict(budgets_hours=5), r"budgets_hours must be a list of positive numbers of hours.*got 5"),
        (dict(budgets_hours=[1, -1]), r"budgets_hours must be a list"),
        (dict(max_new_tokens=0), r"max_new_tokens must be a positive integer"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(kk=2), r"unknown avg_at_k arguments \['kk'\]"),
        (dict(dataset=None), r"eval_dataset is None"),
        (dict(dataset=Dataset.from_dict({"prompt": []})), r"eval_dataset \(the avg@k test set\) has no rows"),
        (
            dict(dataset=Dataset.from_dict({"question": ["a"]})),
            r"eval_dataset \(the avg@k test set\) has no 'prompt' column",
        ),
        (
            dict(dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "a"}], []]})),
            r"eval_dataset \(the avg@k test set\) row 1: the prompt",
        ),
    ],
)
def test_callback_arguments_are_checked_at_construction(arguments, match):
    # Before: a k of 0 logged NaN, an empty test set -inf, a zero interval divided by zero at the first step, a bare
    # number of hours failed in tuple(), a zero temperature in generate.
    dataset = arguments.pop("dataset", Dataset.from_dict({"prompt": ["a"]}))
    with pytest.raises(ValueError, match=r"BestWithinBudgetsCallback: " + match):
        BestWithinBudgetsCallback(dataset, **arguments)


def test_a_test_set_without_a_column_the_rewards_read(char_tokenizer, tmp_path):
    # Before: every test row scored 0 (a reward reading the column from **kwargs) or failed after the first step.
    from helpers.tiny_trainer import PROMPTS, make_args

    from srpo_trl import SRPOTrainer

    train = PROMPTS.add_column("answer", ["x"] * len(PROMPTS))

    def correctness(completions, answer, **kwargs):
        return [1.0] * len(completions)

    def lenient(completions, **kwargs):
        return [1.0 if kwargs.get("answer") else 0.0 for _ in completions]

    def build(reward, test_set):
        return SRPOTrainer(
            build_tiny_model(char_tokenizer), reward, args=make_args(tmp_path, max_steps=1), train_dataset=train,
            processing_class=char_tokenizer, callbacks=[BestWithinBudgetsCallback(test_set)],
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"'correctness' reads the column 'answer', which the test set lacks"):
        build(correctness, PROMPTS)
    with pytest.warns(UserWarning, match=r"test set lacks the training columns \['answer'\]"):
        build(lenient, PROMPTS)
    build(correctness, train)


def test_avg_at_k_refuses_what_evaluates_nothing(char_tokenizer):
    model = build_tiny_model(char_tokenizer)
    reward = lambda completions, **kwargs: [1.0] * len(completions)  # noqa: E731
    with pytest.raises(ValueError, match="avg_at_k: k must be a positive integer; got 0"):
        avg_at_k(model, char_tokenizer, Dataset.from_dict({"prompt": ["a"]}), [reward], k=0)
    with pytest.raises(ValueError, match="the test set has no rows"):
        avg_at_k(model, char_tokenizer, Dataset.from_dict({"prompt": []}), [reward], k=1)


def test_avg_at_k_alone_awaits_async_rewards_and_names_what_needs_a_trainer(char_tokenizer):
    model = build_tiny_model(char_tokenizer)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "a"}]]})

    async def one(completions, **kwargs):
        return [1.0] * len(completions)

    assert avg_at_k(model, char_tokenizer, dataset, [one], k=2, max_new_tokens=2) == 1.0
    with pytest.raises(ValueError, match=r"scores a reward model \(Qwen3ForSequenceClassification\) only through"):
        avg_at_k(model, char_tokenizer, dataset, [tiny_reward_model(char_tokenizer)], k=1, max_new_tokens=2)

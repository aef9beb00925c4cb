import math

import pytest
import torch

from srpo_trl.testbed import pretrain as pretrain_module
from srpo_trl.testbed.abilities import measure_testbed_abilities
from srpo_trl.testbed.pretrain import PretrainConfig, config_hash, pretrained_testbed_model
from srpo_trl.testbed.task import (
    SYSTEM_PROMPT,
    format_completion,
    make_arithmetic_dataset,
    problem_pool,
    reward,
    teacher_prompt,
)
from srpo_trl.testbed.tokenizer import build_char_tokenizer

torch.set_num_threads(1)

# Just enough pre-training to produce a checkpoint: the cache tests check plumbing, not quality.
TINY_CONFIG = PretrainConfig(hidden_size=16, num_layers=1, num_heads=2, max_steps=2, batch_size=4)


def _questions(dataset) -> set[str]:
    return {prompt[-1]["content"] for prompt in dataset["prompt"]}


def test_dataset_is_deterministic_and_seeded():
    first, second = make_arithmetic_dataset(seed=0), make_arithmetic_dataset(seed=0)
    assert first["train"].to_list() == second["train"].to_list()
    assert first["test"].to_list() == second["test"].to_list()
    assert first["test"].to_list() != make_arithmetic_dataset(seed=1)["test"].to_list()


def test_dataset_rows_are_well_formed():
    dataset = make_arithmetic_dataset(num_train=300, num_test=100)
    assert (len(dataset["train"]), len(dataset["test"])) == (300, 100)
    for row in dataset["train"].to_list() + dataset["test"].to_list():
        system, user = row["prompt"]
        assert system == {"role": "system", "content": SYSTEM_PROMPT}
        assert user["role"] == "user"
        assert len(system["content"]) + len(user["content"]) <= 60
        assert len(format_completion(row["answer"])) <= 20
        a, b = user["content"].removesuffix("=?").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert row["answer"] == str(int(a) + int(b))


def test_pools_are_disjoint_whatever_the_seed():
    pretrain_questions = {question for question, _ in problem_pool("pretrain")}
    tests = _questions(make_arithmetic_dataset(num_train=0, num_test=800, seed=3)["test"])
    trains = _questions(make_arithmetic_dataset(num_train=1600, num_test=0, seed=4)["train"])
    assert not tests & trains
    assert not tests & pretrain_questions
    assert not trains & pretrain_questions


def test_oversized_split_is_refused():
    with pytest.raises(ValueError, match="test pool"):
        make_arithmetic_dataset(num_test=10**6)


def test_reward_on_oracle_and_wrong_answers():
    dataset = make_arithmetic_dataset(num_train=0, num_test=50)["test"]
    answers = dataset["answer"]
    oracle = [[{"role": "assistant", "content": format_completion(a)}] for a in answers]
    assert reward(oracle, answers) == [1.0] * len(answers)
    assert reward([format_completion(a) for a in answers], answers) == [1.0] * len(answers)
    wrong = [format_completion(str(int(a) + 1)) for a in answers]
    assert reward(wrong, answers) == [0.0] * len(answers)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("42", 1.0),  # no tag: the whole text
        ("so <answer>42</answer> then", 1.0),
        (" <answer> 42 </answer>\n", 1.0),
        ("<answer>41</answer><answer>42</answer>", 1.0),  # the last tag wins
        ("<answer>42", 1.0),  # unclosed: the rest of the text
        ("<answer>42</answer><answer>41</answer>", 0.0),
        ("<answer>042</answer>", 0.0),
        ("42.", 0.0),
        ("", 0.0),
        ("<answer></answer>", 0.0),
        ("</answer>42<answer>", 0.0),
        ("\x00ü<|im_end|>", 0.0),
        ([], 0.0),
        ([{}], 0.0),
        ([{"role": "assistant", "content": None}], 0.0),
        (None, 0.0),
        (42, 0.0),
    ],
)
def test_reward_parses_answers_and_never_raises(completion, expected):
    assert reward([completion], ["42"]) == [expected]


def test_teacher_prompt_follows_spec_and_keeps_the_student_prompt():
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "U\nCorrect solution:\n\nD\n\nCorrectly solve the original question."
    assert teacher_prompt(prompt, "D") == [{"role": "system", "content": "S"}, {"role": "user", "content": expected}]
    assert prompt[1]["content"] == "U"


def test_cache_round_trip(tmp_path, monkeypatch):
    model, tokenizer = pretrained_testbed_model(TINY_CONFIG, cache_dir=tmp_path)
    assert (tmp_path / config_hash(TINY_CONFIG)).is_dir()

    def fail(config):
        raise AssertionError("a cached config must not be pre-trained again")

    monkeypatch.setattr(pretrain_module, "pretrain", fail)
    loaded_model, loaded_tokenizer = pretrained_testbed_model(TINY_CONFIG, cache_dir=tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded_model.state_dict()[name], tensor, rtol=0, atol=0)
    # The loaded tokenizer renders and tokenizes prompts exactly like a freshly built one.
    messages = make_arithmetic_dataset(num_train=0, num_test=1)["test"][0]["prompt"]
    render = dict(tokenize=True, add_generation_prompt=True, enable_thinking=False, return_dict=False)
    assert loaded_tokenizer.apply_chat_template(messages, **render) == tokenizer.apply_chat_template(
        messages, **render
    )
    assert loaded_tokenizer.get_vocab() == build_char_tokenizer().get_vocab()


def test_cache_dir_from_environment_and_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("SRPO_TESTBED_CACHE", str(tmp_path))
    pretrained_testbed_model(TINY_CONFIG)
    assert (tmp_path / config_hash(TINY_CONFIG)).is_dir()
    assert config_hash(TINY_CONFIG) == config_hash(PretrainConfig(**vars(TINY_CONFIG)))
    assert config_hash(TINY_CONFIG) != config_hash(PretrainConfig(**{**vars(TINY_CONFIG), "seed": 1}))


@pytest.mark.slow
def test_default_testbed_model_has_both_abilities():
    # The default cache, so that later tests of the same run (and later runs) load this checkpoint.
    model, tokenizer = pretrained_testbed_model()
    metrics = measure_testbed_abilities(model, tokenizer)
    print(metrics)
    # (a) Sometimes right, often wrong: GRPO groups of 8 mix rewards.
    assert 0.1 <= metrics["student/accuracy_sampled"] <= 0.6
    assert metrics["student/accuracy_greedy"] >= 0.3
    assert metrics["student/mixed_group_frac"] >= 0.6
    # (b) A correct solution in the prompt makes the right answer much more likely.
    assert metrics["teacher/accuracy_greedy"] >= 0.9
    assert metrics["teacher/accuracy_sampled"] >= metrics["student/accuracy_sampled"] + 0.3
    assert metrics["teacher/answer_logprob"] - metrics["student/answer_logprob"] >= math.log(2)  # twice as likely

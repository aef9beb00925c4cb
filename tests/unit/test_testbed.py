import math
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from srpo_trl.testbed import pretrain as pretrain_module
from srpo_trl.testbed.abilities import measure_testbed_abilities
from srpo_trl.testbed.pretrain import PretrainConfig, config_hash, pretrained_testbed_model
from srpo_trl.testbed.task import (
    TASK_FAMILIES,
    format_completion,
    make_testbed_dataset,
    problem_pool,
    reward,
    task_family,
    teacher_prompt,
)
from srpo_trl.testbed.tokenizer import build_char_tokenizer

torch.set_num_threads(1)

# Just enough pre-training to produce a checkpoint: the cache tests check plumbing, not quality.
TINY_CONFIG = PretrainConfig(hidden_size=16, num_layers=1, num_heads=2, max_steps=2, batch_size=4)


def _questions(dataset) -> set[str]:
    return {prompt[-1]["content"] for prompt in dataset["prompt"]}


@pytest.mark.parametrize("task", TASK_FAMILIES)
def test_dataset_is_deterministic_and_seeded(task):
    first, second = make_testbed_dataset(seed=0, task=task), make_testbed_dataset(seed=0, task=task)
    assert first["train"].to_list() == second["train"].to_list()
    assert first["test"].to_list() == second["test"].to_list()
    assert first["test"].to_list() != make_testbed_dataset(seed=1, task=task)["test"].to_list()


def _operands(task: str, question: str) -> tuple[str, str]:
    """The operands of a question and the answer they imply, read back from the text."""
    if task == "addition":
        a, b = question.removesuffix("=?").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        return question, str(int(a) + int(b))
    digits = question.removesuffix(" reversed=?")
    assert len(digits) == 4 and digits.isdigit()
    return question, digits[::-1]


@pytest.mark.parametrize("task", TASK_FAMILIES)
def test_dataset_rows_are_well_formed(task):
    dataset = make_testbed_dataset(num_train=300, num_test=100, task=task)
    assert (len(dataset["train"]), len(dataset["test"])) == (300, 100)
    for row in dataset["train"].to_list() + dataset["test"].to_list():
        system, user = row["prompt"]
        assert system == {"role": "system", "content": task_family(task).system_prompt}
        assert user["role"] == "user"
        assert len(system["content"]) + len(user["content"]) <= 60
        assert len(format_completion(row["answer"])) <= 21
        assert row["answer"] == _operands(task, user["content"])[1]


def test_families_differ():
    addition, reversal = (make_testbed_dataset(num_train=0, num_test=5, task=t)["test"] for t in TASK_FAMILIES)
    assert addition["prompt"][0][0] != reversal["prompt"][0][0]
    with pytest.raises(ValueError, match="Unknown testbed task"):
        make_testbed_dataset(task="subtraction")


@pytest.mark.parametrize("task", TASK_FAMILIES)
def test_near_misses_are_wrong_answers_of_the_same_shape(task):
    rng = random.Random(0)
    for _, answer in problem_pool("test", task)[:200]:
        miss = task_family(task).near_miss(answer, rng)
        assert miss != answer and miss.isdigit()
        assert reward([format_completion(miss)], [answer]) == [0.0]
        if task == "reversal":  # one digit off by one
            assert len(miss) == len(answer)
            assert sum(m != a for m, a in zip(miss, answer, strict=True)) == 1


@pytest.mark.parametrize("task", TASK_FAMILIES)
def test_pools_are_disjoint_whatever_the_seed(task):
    pretrain_questions = {question for question, _ in problem_pool("pretrain", task)}
    test_size, train_size = len(problem_pool("test", task)), len(problem_pool("train", task))
    tests = _questions(make_testbed_dataset(num_train=0, num_test=test_size, seed=3, task=task)["test"])
    trains = _questions(make_testbed_dataset(num_train=train_size, num_test=0, seed=4, task=task)["train"])
    assert not tests & trains
    assert not tests & pretrain_questions
    assert not trains & pretrain_questions


def test_oversized_split_is_refused():
    with pytest.raises(ValueError, match="test pool"):
        make_testbed_dataset(num_test=10**6)


@pytest.mark.parametrize("task", TASK_FAMILIES)
def test_reward_on_oracle_and_wrong_answers(task):
    dataset = make_testbed_dataset(num_train=0, num_test=50, task=task)["test"]
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
    messages = make_testbed_dataset(num_train=0, num_test=1)["test"][0]["prompt"]
    render = dict(tokenize=True, add_generation_prompt=True, enable_thinking=False, return_dict=False)
    assert loaded_tokenizer.apply_chat_template(messages, **render) == tokenizer.apply_chat_template(
        messages, **render
    )
    assert loaded_tokenizer.get_vocab() == build_char_tokenizer().get_vocab()


def test_concurrent_callers_pre_train_a_config_once(tmp_path, monkeypatch):
    # Two ranks of a launch, or two test workers, asking for the same uncached checkpoint at once: one pre-trains,
    # the other waits for the cache entry. Callers are threads here, so the loading after the lock is stood in:
    # transformers' `from_pretrained` swaps class attributes while it loads (`no_tie_weights`, `no_init_weights`),
    # and two threads loading at once can leave them swapped for the whole process (seen: no model tied its
    # embeddings any more in the test worker that ran this).
    calls, real_pretrain = [], pretrain_module.pretrain

    def slow_pretrain(config):
        calls.append(config)
        time.sleep(0.5)  # both callers are past the cache check by now, unless the second waited at the lock
        return real_pretrain(config)

    class Loaded:
        @staticmethod
        def from_pretrained(path):
            assert (path / "config.json").is_file(), "loaded before the cache entry was complete"
            return torch.nn.Module()

    monkeypatch.setattr(pretrain_module, "pretrain", slow_pretrain)
    monkeypatch.setattr(pretrain_module, "Qwen3ForCausalLM", Loaded)
    monkeypatch.setattr(pretrain_module, "PreTrainedTokenizerFast", Loaded)
    loaded = []
    callers = [
        threading.Thread(target=lambda: loaded.append(pretrained_testbed_model(TINY_CONFIG, tmp_path)))
        for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(calls) == 1 and len(loaded) == 2


def test_make_test_pre_trains_every_task_family_first():
    # `make testbed-models` (a prerequisite of `make test`) names the families for make's -j2; a family missing there
    # would be pre-trained inside the first test that asks, one after the other.
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if line.startswith("TESTBED_FAMILIES =")]
    assert sorted(line.split("=", 1)[1].split()) == sorted(TASK_FAMILIES)


def test_cache_dir_from_environment_and_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("SRPO_TESTBED_CACHE", str(tmp_path))
    pretrained_testbed_model(TINY_CONFIG)
    assert (tmp_path / config_hash(TINY_CONFIG)).is_dir()
    assert config_hash(TINY_CONFIG) == config_hash(PretrainConfig(**vars(TINY_CONFIG)))
    assert config_hash(TINY_CONFIG) != config_hash(PretrainConfig(**{**vars(TINY_CONFIG), "seed": 1}))


def test_cache_key_of_a_task_family():
    reversal = PretrainConfig(task="reversal")
    # The family's own label noise is the default, and spelling it out is the same checkpoint.
    assert reversal.label_noise == task_family("reversal").label_noise != PretrainConfig().label_noise
    assert config_hash(reversal) == config_hash(PretrainConfig(task="reversal", label_noise=reversal.label_noise))
    assert config_hash(reversal) != config_hash(PretrainConfig(task="reversal", label_noise=0.5))
    assert config_hash(reversal) != config_hash(PretrainConfig(task="addition", label_noise=reversal.label_noise))
    with pytest.raises(ValueError, match="Unknown testbed task"):
        PretrainConfig(task="subtraction")


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_FAMILIES)
def test_default_testbed_model_has_both_abilities(task):
    # The default cache, so that later tests of the same run (and later runs) load this checkpoint.
    model, tokenizer = pretrained_testbed_model(PretrainConfig(task=task))
    metrics = measure_testbed_abilities(model, tokenizer, task=task)
    print(metrics)
    # (a) Sometimes right, often wrong: GRPO groups of 8 mix rewards.
    assert 0.1 <= metrics["student/accuracy_sampled"] <= 0.6
    assert metrics["student/mixed_group_frac"] >= 0.6
    # The family's regime: a skill partly learnt (greedy decoding often right), or known and sampled noisily
    # (greedy decoding always right).
    assert metrics["student/accuracy_greedy"] >= {"addition": 0.3, "reversal": 0.95}[task]
    # (b) A correct solution in the prompt makes the right answer much more likely.
    assert metrics["teacher/accuracy_greedy"] >= 0.9
    assert metrics["teacher/accuracy_sampled"] >= metrics["student/accuracy_sampled"] + 0.3
    assert metrics["teacher/answer_logprob"] - metrics["student/answer_logprob"] >= math.log(2)  # twice as likely

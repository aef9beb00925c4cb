"""Tests for `srpo_trl.tasks`: benchmark loaders (local files, Hub via a stand-in) and reward functions."""

import json
import random
import re
import warnings
from pathlib import Path

import datasets
import pytest

from srpo_trl.tasks import (
    SCIENCE_TASKS,
    SCIKNOWEVAL_HUB_REPO,
    TASKS,
    get_reward_funcs,
    load_task_dataset,
    multiple_choice_reward,
    parse_tool_calls,
    reference_tool_use_reward,
    tool_use_reward,
)

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"

ROW_COUNTS = {
    ("chemistry", "train"): 1890,
    ("chemistry", "test"): 210,
    ("physics", "train"): 720,
    ("physics", "test"): 80,
    ("biology", "train"): 450,
    ("biology", "test"): 50,
    ("material", "train"): 841,
    ("material", "test"): 94,
    ("tooluse", "test"): 68,
}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="module")
def loaded(data_dir):
    return {key: load_task_dataset(*key, data_path=data_dir) for key in ROW_COUNTS}


def split_file(data_dir, task, split):
    return data_dir / ("tooluse" if task == "tooluse" else f"sciknoweval/{task}") / f"{split}.json"


def raw_rows(data_dir, task, split):
    with split_file(data_dir, task, split).open() as file:
        return [json.loads(line) for line in file]


def multiple_choice_completion(letter):
    return f"<reasoning>\nThe options, weighed.\n</reasoning>\n<answer>\n{letter}\n</answer>"


def tool_use_completion(gold_answer):
    """A gold tool-use answer written out as the model is asked to write it."""
    calls = json.loads(gold_answer)
    return "\n".join(f"Thought: call it.\nAction: {c['Action']}\nAction Input: {c['Action_Input']}" for c in calls)


def oracle_completions(dataset):
    if dataset[0]["kind"] == "tooluse":
        return [tool_use_completion(answer) for answer in dataset["answer"]]
    return [multiple_choice_completion(answer) for answer in dataset["answer"]]


def as_sciknoweval_item(row, index):
    """Rebuild the SciKnowEval item an SDPO row was made from (the inverse of the reference formatting)."""
    body = row["prompt"].removesuffix("\nPlease reason step by step.")
    question, _, options = body.rpartition("\n\nA: ")
    options = re.split(r"\n(?=[B-D]: )", "A: " + options)
    return {
        "question": question,
        "choices": {"label": [option[0] for option in options], "text": [option[3:] for option in options]},
        "answerKey": row["answer"],
        "type": f"mcq-{len(options)}-choices",
        "domain": "Biology",
        "details": {"level": "L3", "task": "t", "subtask": f"s{index}"},
    }


def sciknoweval_item(question, labels, answer, domain="Chemistry", level="L3", kind="mcq-4-choices"):
    return {
        "question": question,
        "choices": {"label": list(labels), "text": [f"option {label}" for label in labels]},
        "answerKey": answer,
        "type": kind,
        "domain": domain,
        "details": {"level": level, "task": "t", "subtask": "s"},
    }


class FakeHub:
    """Stands in for `datasets.load_dataset`, recording how it was called."""

    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def __call__(self, path, split=None, revision=None, **kwargs):
        self.calls.append({"path": path, "split": split, "revision": revision, **kwargs})
        return datasets.Dataset.from_list(self.rows)


def write_json_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


VALID_ROW = {"idx": 0, "kind": "mcq", "answer": "B", "prompt": "Which?\n\nA: x\nB: y", "system": "Answer."}


# ---------------------------------------------------------------------------------------------------------------------
# Local loading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "split"), list(ROW_COUNTS))
def test_split_row_counts(loaded, task, split):
    assert len(loaded[task, split]) == ROW_COUNTS[task, split]
    assert loaded[task, split].column_names == ["prompt", "answer", "kind", "idx"]


@pytest.mark.parametrize(("task", "split"), list(ROW_COUNTS))
def test_prompts_are_built_like_the_reference(loaded, data_dir, task, split):
    dataset = loaded[task, split]
    for row, raw in zip(dataset, raw_rows(data_dir, task, split), strict=True):
        expected = [{"role": "user", "content": raw["prompt"]}]
        if raw["system"] is not None:
            expected.insert(0, {"role": "system", "content": raw["system"]})
        assert row["prompt"] == expected
        assert (row["answer"], row["kind"], row["idx"]) == (raw["answer"], raw["kind"], raw["idx"])
    roles = [message["role"] for message in dataset[0]["prompt"]]
    assert roles == (["user"] if task == "tooluse" else ["system", "user"])


def test_directory_forms_resolve_to_the_same_rows(loaded, data_dir):
    expected = loaded["physics", "test"]
    for data_path in (data_dir / "sciknoweval" / "physics", data_dir / "sciknoweval/physics/test.json"):
        assert load_task_dataset("physics", "test", data_path=data_path).to_list() == expected.to_list()


def test_parquet_and_save_to_disk_load(loaded, data_dir, tmp_path):
    expected = loaded["tooluse", "test"].to_list()
    raw = datasets.Dataset.from_list(raw_rows(data_dir, "tooluse", "test"))

    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    raw.to_parquet(str(parquet_dir / "test.parquet"))
    raw.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": raw}).save_to_disk(str(tmp_path / "saved_dict"))

    for data_path in (parquet_dir / "test.parquet", parquet_dir, tmp_path / "saved", tmp_path / "saved_dict"):
        assert load_task_dataset("tooluse", "test", data_path=data_path).to_list() == expected, data_path


# ---------------------------------------------------------------------------------------------------------------------
# Rewards on the benchmark data
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "split"), list(ROW_COUNTS))
def test_oracle_answers_score_full_marks(loaded, task, split):
    dataset = loaded[task, split]
    completions = oracle_completions(dataset)
    conversational = [[{"role": "assistant", "content": completion}] for completion in completions]
    for reward_func in get_reward_funcs(task):
        assert reward_func(completions, dataset["answer"]) == [1.0] * len(dataset)
        assert reward_func(conversational, dataset["answer"]) == [1.0] * len(dataset)


def test_wrong_letters_score_about_chance(loaded):
    answers = [
        answer for task in SCIENCE_TASKS for split in ("train", "test") for answer in loaded[task, split]["answer"]
    ]
    rng = random.Random(0)
    shuffled = rng.sample(answers, len(answers))
    uniform = [rng.choice("ABCD") for _ in answers]
    for letters in (shuffled, uniform):
        rewards = multiple_choice_reward([multiple_choice_completion(letter) for letter in letters], answers)
        assert 0.2 < sum(rewards) / len(rewards) < 0.3


def test_tool_use_parser_beats_reference_regexes(loaded):
    dataset = loaded["tooluse", "test"]
    completions = oracle_completions(dataset)
    rewards = tool_use_reward(completions, dataset["answer"])
    reference_rewards = reference_tool_use_reward(completions, dataset["answer"])

    assert sum(rewards) == 68
    assert sum(reference_rewards) == 66
    missed = [
        json.loads(answer) for answer, reward in zip(dataset["answer"], reference_rewards, strict=True) if not reward
    ]
    # Both gold answers the regexes miss have a nested input object; one also calls a name outside `\w`.
    has_nested_input = [
        any(isinstance(value, dict) for call in calls for value in json.loads(call["Action_Input"]).values())
        for calls in missed
    ]
    assert has_nested_input == [True, True]
    assert [call["Action"] for calls in missed for call in calls if not call["Action"].isidentifier()] == [
        "[Optional]updateUserProfile"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Reward semantics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("<answer>\nB\n</answer>", 1.0),
        ("<answer>A</answer> on second thought <answer> B </answer>", 1.0),  # the last tag decides
        ("<answer>B</answer> on second thought <answer>A</answer>", 0.0),
        ("  B \n", 1.0),  # no tag: the whole text
        ("<answer>B", 1.0),  # unclosed tag
        ("The answer is B", 0.0),
        ("<answer>b</answer>", 0.0),
        ("<answer>B.</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_multiple_choice_reward_reads_the_last_answer_tag(completion, reward):
    assert multiple_choice_reward([completion], ["B"]) == [reward]


GOLD = json.dumps(
    [
        {"Action": "[Optional]update", "Action_Input": json.dumps({"user": "u1", "profile": {"tags": ["a", "}"]}})},
        {"Action": "getPage", "Action_Input": json.dumps({"page": 2, "strict": True})},
    ]
)


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (
            'Action: [Optional]update\nAction Input: {"user": "u1", "profile": {"tags": ["a", "}"]}}\n'
            'Action: getPage\nAction Input: {"page": 2, "strict": true}',
            1.0,
        ),
        # Order of calls and where the inputs sit do not matter, only the multiset of names and the merged inputs.
        (
            'Action: getPage\nAction: [Optional]update\nAction Input:\n{"page": 2.0}\nAction Input: {"strict": true, '
            '"user": "u1", "profile": {"tags": ["a", "}"]}} trailing words',
            1.0,
        ),
        ('Action: [Optional]update\nAction Input: {"user": "u1", "profile": {"tags": ["a", "}"]}, "page": 2}', 0.0),
        (
            'Action: [Optional]update\nAction: getPage\nAction: getPage\nAction Input: {"user": "u1", "profile": '
            '{"tags": ["a", "}"]}, "page": 2, "strict": true}',
            0.0,
        ),
        (  # types matter: "2" is not 2, 1 is not true
            'Action: [Optional]update\nAction: getPage\nAction Input: {"user": "u1", "profile": {"tags": ["a", "}"]},'
            ' "page": "2", "strict": true}',
            0.0,
        ),
        (
            'Action: [Optional]update\nAction: getPage\nAction Input: {"user": "u1", "profile": {"tags": ["a", "}"]},'
            ' "page": 2, "strict": 1}',
            0.0,
        ),
        (  # an unreadable input is an invalid call
            'Action: [Optional]update\nAction: getPage\nAction Input: {"user": "u1", "profile": {"tags": ["a", "}"]},'
            ' "page": 2, "strict": true}\nAction Input: {oops',
            0.0,
        ),
    ],
)
def test_tool_use_reward_compares_names_and_merged_inputs(completion, reward):
    assert tool_use_reward([completion], [GOLD]) == [reward]


def test_reference_regexes_cannot_read_nested_inputs_or_odd_names():
    gold = json.dumps([{"Action": "find", "Action_Input": json.dumps({"filter": {"year": 2020}})}])
    nested = 'Action: find\nAction Input: {"filter": {"year": 2020}}'
    assert tool_use_reward([nested], [gold]) == [1.0]
    assert reference_tool_use_reward([nested], [gold]) == [0.0]
    gold = json.dumps([{"Action": "[Optional]find", "Action_Input": "{}"}])
    assert tool_use_reward(["Action: [Optional]find\nAction Input: {}"], [gold]) == [1.0]
    assert reference_tool_use_reward(["Action: [Optional]find\nAction Input: {}"], [gold]) == [0.0]


def test_parse_tool_calls():
    text = 'Thought: Action: inside a thought is no call\nAction: a b\r\nAction Input: {"x": {"y": "{"}}\nAction: c'
    actions, arguments = parse_tool_calls(text)
    assert dict(actions) == {"a b": 1, "c": 1}
    assert arguments == {"x": {"y": "{"}}
    assert parse_tool_calls("Action: a\nAction Input: [1, 2]") is None


GARBAGE_COMPLETIONS = [
    None,
    42,
    3.5,
    {"content": "B"},
    [],
    [None, 7],
    [{"role": "assistant", "content": None}],
    [{"role": "assistant", "content": [{"type": "text", "text": None}, "part", {"type": "image"}]}],
    [{"role": "assistant"}],
    "x" * 1_000_000,
    "<answer>" * 100_000,
    "Action: a\nAction Input: {" * 2_000,
    "Action: a\nAction Input: " + '{"a":' * 50_000,
    "Action: a\nAction Input: " + '{"a":' * 900 + "1" + "}" * 900,
    'Action: a\nAction Input: {"a": NaN, "b": 1e999}',
    "\x00\udcff\ufffd",
]
GARBAGE_ANSWERS = [
    None,
    5,
    "",
    "not json",
    "[1, 2]",
    '[{"Action": 1}]',
    '[{"Action": "a", "Action_Input": "[]"}]',
    "B",
]


@pytest.mark.parametrize(
    "reward_func", [multiple_choice_reward, tool_use_reward, reference_tool_use_reward], ids=lambda f: f.__name__
)
def test_rewards_return_floats_on_garbage(reward_func):
    for answer in GARBAGE_ANSWERS:
        rewards = reward_func(GARBAGE_COMPLETIONS, [answer] * len(GARBAGE_COMPLETIONS))
        assert len(rewards) == len(GARBAGE_COMPLETIONS)
        assert all(type(reward) is float for reward in rewards)


def test_rewards_refuse_misaligned_batches():
    with pytest.raises(ValueError, match="3 completions but 2 answers"):
        multiple_choice_reward(["A", "B", "C"], ["A", "B"])


def test_reward_registry():
    for task in TASKS:
        funcs = get_reward_funcs(task)
        funcs.append(None)  # callers get their own list
        assert get_reward_funcs(task) == [tool_use_reward if task == "tooluse" else multiple_choice_reward]
    with pytest.raises(ValueError, match="chemistry, physics, biology, material, tooluse"):
        get_reward_funcs("maths")


# ---------------------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_task_or_split(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown task 'chem'; expected one of: chemistry, physics, biology"):
        load_task_dataset("chem", data_path=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown split 'validation'; expected one of: train, test"):
        load_task_dataset("chemistry", "validation", data_path=tmp_path)


def test_missing_path_or_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_task_dataset("chemistry", data_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:
        load_task_dataset("tooluse", "train", data_path=tmp_path)
    assert str(tmp_path / "train.json") in str(error.value)
    assert str(tmp_path / "tooluse" / "train.json") in str(error.value)


def test_hub_options_with_local_path(tmp_path):
    with pytest.raises(ValueError, match="cannot be combined with `data_path`"):
        load_task_dataset("chemistry", data_path=tmp_path, revision="main")


@pytest.mark.parametrize(
    ("lines", "task", "message"),
    [
        ([], "chemistry", r"train\.json: no rows"),
        (["", "  "], "chemistry", r"train\.json: no rows"),
        ([json.dumps(VALID_ROW), "{'idx': 1}"], "chemistry", r"train\.json, line 2: not valid JSON"),
        ([json.dumps([VALID_ROW])], "chemistry", r"train\.json, line 1: expected a JSON object, got list"),
        (
            [json.dumps(VALID_ROW), "", json.dumps({**VALID_ROW, "answer": 1})],
            "chemistry",
            r"train\.json, line 3: field 'answer' should be str, got int",
        ),
        (
            [json.dumps({k: v for k, v in VALID_ROW.items() if k != "answer"})],
            "chemistry",
            r"train\.json, line 1: missing field 'answer' \(fields present: idx, kind, prompt, system\)",
        ),
        ([json.dumps({**VALID_ROW, "idx": "0"})], "chemistry", r"line 1: field 'idx' should be int, got str"),
        ([json.dumps({**VALID_ROW, "idx": True})], "chemistry", r"line 1: field 'idx' should be int, got bool"),
        ([json.dumps({**VALID_ROW, "system": ["x"]})], "chemistry", r"line 1: field 'system' should be str"),
        ([json.dumps({**VALID_ROW, "answer": " "})], "chemistry", r"line 1: field 'answer' is empty"),
        ([json.dumps(VALID_ROW)], "tooluse", r"line 1: field 'kind' is 'mcq' but this task expects 'tooluse'"),
        (
            [json.dumps({**VALID_ROW, "kind": "tooluse", "answer": '[{"Action": "a", "Action_Input": "{x"}]'})],
            "tooluse",
            r"line 1: field 'answer' is not a list of gold tool calls: call 0: Action_Input is not valid JSON",
        ),
    ],
)
def test_bad_json_lines_are_reported_with_file_line_and_field(tmp_path, lines, task, message):
    path = tmp_path / "train.json"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        load_task_dataset(task, "train", data_path=tmp_path)


def test_bad_bytes_and_file_types_are_reported(tmp_path):
    (tmp_path / "train.json").write_bytes(json.dumps(VALID_ROW).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"train\.json, line 2: not UTF-8 text"):
        load_task_dataset("chemistry", data_path=tmp_path)
    write_json_lines(tmp_path / "rows.csv", [VALID_ROW])
    with pytest.raises(ValueError, match=r"rows\.csv: unsupported file type '\.csv'"):
        load_task_dataset("chemistry", data_path=tmp_path / "rows.csv")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file"):
        load_task_dataset("chemistry", data_path=tmp_path / "broken.parquet")


def test_bad_parquet_and_saved_rows_are_reported_with_row_and_field(tmp_path):
    rows = [VALID_ROW, {**VALID_ROW, "idx": 1}]
    datasets.Dataset.from_list(rows).remove_columns("kind").to_parquet(str(tmp_path / "test.parquet"))
    with pytest.raises(ValueError, match=r"test\.parquet, row 0: missing field 'kind'"):
        load_task_dataset("chemistry", "test", data_path=tmp_path / "test.parquet")

    wrong_type = datasets.Dataset.from_list([{**row, "idx": str(row["idx"])} for row in rows])
    wrong_type.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved, row 0: field 'idx' should be int, got str"):
        load_task_dataset("chemistry", data_path=tmp_path / "saved")

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    with pytest.raises(ValueError, match=r"saved_dict: the saved DatasetDict has no split 'test' \(splits: train\)"):
        load_task_dataset("chemistry", "test", data_path=tmp_path / "saved_dict")


# ---------------------------------------------------------------------------------------------------------------------
# Hub loading, through a stand-in for `datasets.load_dataset`
# ---------------------------------------------------------------------------------------------------------------------


def test_sciknoweval_from_hub_filters_formats_and_splits(monkeypatch):
    kept = [sciknoweval_item(f"Q{i}?", "ABCD", "C") for i in range(18)]
    kept.insert(5, sciknoweval_item("Two options?", "AB", "B", kind="mcq-2-choices"))
    kept.insert(9, sciknoweval_item("Another?", "AB", "A", kind="mcq-2-choices"))
    dropped = [
        sciknoweval_item("Physics?", "ABCD", "A", domain="Physics"),
        sciknoweval_item("Easy?", "ABCD", "A", level="L1"),
        sciknoweval_item("True?", "AB", "A", kind="true_or_false"),
    ]
    hub = FakeHub(dropped[:1] + kept[:10] + dropped[1:] + kept[10:])
    monkeypatch.setattr(datasets, "load_dataset", hub)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pinned revision needs no warning
        train = load_task_dataset("chemistry", "train", revision="abc123")
        test = load_task_dataset("chemistry", "test", revision="abc123")

    assert hub.calls[0] == {"path": SCIKNOWEVAL_HUB_REPO, "split": "test", "revision": "abc123"}
    assert (len(train), len(test)) == (18, 2)
    assert sorted([*train["idx"], *test["idx"]]) == list(range(20))
    two_options = next(row for row in train.to_list() + test.to_list() if row["idx"] == 5)
    system, user = two_options["prompt"]
    assert system["role"] == "system" and "<answer>" in system["content"]
    assert user == {"role": "user", "content": "Two options?\n\nA: option A\nB: option B\nPlease reason step by step."}
    assert (two_options["answer"], two_options["kind"]) == ("B", "mcq")


def test_sciknoweval_from_hub_warns_when_unpinned(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FakeHub([sciknoweval_item(f"Q{i}", "AB", "A") for i in range(10)]))
    with pytest.warns(UserWarning, match="re-upload.*Pass `revision`"):
        load_task_dataset("chemistry", "test")


def test_sciknoweval_from_hub_reproduces_the_committed_split(monkeypatch, data_dir):
    rows = sorted(
        raw_rows(data_dir, "biology", "train") + raw_rows(data_dir, "biology", "test"), key=lambda r: r["idx"]
    )
    items = [as_sciknoweval_item(row, index) for index, row in enumerate(rows)]
    items.insert(100, {**items[0], "domain": "Chemistry"})  # filtered out, so the split must not move
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(items))
    for split in ("train", "test"):
        from_hub = load_task_dataset("biology", split, revision="pinned")
        assert from_hub.to_list() == load_task_dataset("biology", split, data_path=data_dir).to_list()


def test_sciknoweval_from_hub_reports_schema_mismatch(monkeypatch):
    item = sciknoweval_item("Q?", "ABCD", "A")
    del item["answerKey"]
    monkeypatch.setattr(datasets, "load_dataset", FakeHub([item] * 10))
    with pytest.raises(ValueError, match=r"hicai-zju/SciKnowEval, Chemistry row 0: .*KeyError: 'answerKey'"):
        load_task_dataset("chemistry", revision="abc")
    monkeypatch.setattr(datasets, "load_dataset", FakeHub([sciknoweval_item("Q?", "ABCD", "A", level="L1")]))
    with pytest.raises(ValueError, match=r"no rows with domain 'Chemistry', level 'L3'"):
        load_task_dataset("chemistry", revision="abc")


def test_hub_failures_say_how_to_train_from_local_files(monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"Could not load hicai-zju/SciKnowEval .*ConnectionError.* pass data_path"):
        load_task_dataset("chemistry", revision="abc")


def test_tool_use_from_hub(monkeypatch):
    answer = json.dumps([{"Action": "getFacts", "Action_Input": '{"limit": 3}'}])
    row = {"idx": 7, "kind": "tooluse", "answer": answer, "prompt": "Use the tools.", "system": None, "elo": 1500}
    hub = FakeHub([row])
    monkeypatch.setattr(datasets, "load_dataset", hub)

    with pytest.raises(ValueError, match=r"no Hub copy .* pass data_path \(--data_path\) pointing at lasgroup/SDPO"):
        load_task_dataset("tooluse", "train")
    dataset = load_task_dataset("tooluse", "train", hub_repo="someone/tools")
    assert hub.calls[-1] == {"path": "someone/tools", "split": "train", "revision": None}
    assert dataset.to_list() == [
        {"prompt": [{"role": "user", "content": "Use the tools."}], "answer": answer, "kind": "tooluse", "idx": 7}
    ]

    load_task_dataset("tooluse", "test", revision="v1", hub_repo="someone/tools")
    assert hub.calls[-1] == {"path": "someone/tools", "split": "test", "revision": "v1"}

    monkeypatch.setattr(datasets, "load_dataset", FakeHub([{**row, "answer": "[]", "kind": None}]))
    with pytest.raises(
        ValueError, match=r"someone/tools@v1 \(tooluse, test split\), row 0: field 'kind' should be str"
    ):
        load_task_dataset("tooluse", "test", revision="v1", hub_repo="someone/tools")


def test_each_task_is_one_registry_entry_that_the_loader_reads(shared_data):
    from srpo_trl.tasks import get_task

    for name in TASKS:
        task = get_task(name)
        assert (shared_data / task.local_folder / "test.json").is_file(), task
        assert get_reward_funcs(name) == list(task.reward_funcs)
        assert task.hub_dataset == (SCIKNOWEVAL_HUB_REPO if name in SCIENCE_TASKS else None)
        assert (task.sciknoweval_domain is None) == (task.missing_hub_copy is not None)
    with pytest.raises(ValueError, match="Unknown task 'nope'; expected one of: chemistry"):
        get_task("nope")

"""Loaders for the SDPO benchmarks (SciKnowEval L3 multiple choice and ToolAlpaca tool use).

Whatever the source, rows are validated against the SDPO row format (`prompt`, `system`, `answer`, `kind`, `idx`) and
turned into what `GRPOTrainer` consumes: a conversational `prompt` column plus the `answer`, `kind` and `idx` columns,
which the trainer forwards to the reward functions as keyword arguments. The package ships no data: rows come from a
local path or from the Hugging Face Hub.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import datasets

from .registry import SCIKNOWEVAL_HUB_REPO, Task, get_task
from .rewards import parse_gold_tool_calls

SPLITS = ("train", "test")

# The reference filters (lasgroup/SDPO, data/format/sciknoweval.py) and split (data/split_tasks.py, test ratio 0.1,
# seed 42). The split depends only on the number of rows left after filtering and on their order.
_SCIKNOWEVAL_LEVEL = "L3"
_SCIKNOWEVAL_TYPES = ("mcq-4-choices", "mcq-2-choices")
_TEST_FRACTION = 0.1
_SPLIT_SEED = 42

# Verbatim from the reference, which uses it for the two-option items too; changing a word would change the task.
_SCIKNOWEVAL_SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not \
restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""

# Field -> type of the SDPO rows this module reads; `system` (a string or null) may be absent, as in the reference.
_REQUIRED_FIELDS = {"prompt": str, "answer": str, "kind": str, "idx": int}

# A row together with where it came from ("file.json, line 3"), so that every error can point at it.
_LocatedRow = tuple[str, Any]


def load_task_dataset(
    task: str,
    split: str = "train",
    data_path: str | Path | None = None,
    revision: str | None = None,
    hub_repo: str | None = None,
) -> datasets.Dataset:
    """
    Load one split of an SDPO benchmark, ready for `GRPOTrainer`.

    Args:
        task (`str`):
            One of `"chemistry"`, `"physics"`, `"biology"`, `"material"` (SciKnowEval) or `"tooluse"` (ToolAlpaca).
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` or `"test"`.
        data_path (`str` or `Path`, *optional*):
            Local data in the SDPO row format. One of:

            - a directory holding `{split}.json` (or `.jsonl`, `.parquet`), or the SDPO layout under it
              (`sciknoweval/{task}/{split}.json`, `tooluse/{split}.json`);
            - a JSON Lines (`.json`, `.jsonl`) or `.parquet` file, used whatever `split` is;
            - a directory written by `Dataset.save_to_disk` (used whatever `split` is) or `DatasetDict.save_to_disk`
              (`split` picks the split).

            When `None`, the data comes from the Hub: SciKnowEval from [`SCIKNOWEVAL_HUB_REPO`], filtered and split
            like the reference; tool use needs `hub_repo` (see [`TOOLUSE_SOURCE`]).
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) to load. Pin it: the SciKnowEval split is only reproducible on fixed
            upstream data.
        hub_repo (`str`, *optional*):
            Hub dataset to load instead of the default one for `task`.

    Returns:
        [`~datasets.Dataset`]: Columns `prompt` (a system message when the row has one, then the user message),
        `answer` (option letter, or JSON list of gold tool calls), `kind` (`"mcq"` or `"tooluse"`) and `idx`.

    Raises:
        `ValueError`: Unknown task or split, unreadable file, or a row that does not fit the SDPO format; the message
            names the file (or Hub dataset), the line or row and the field.
        `FileNotFoundError`: If `data_path` does not exist or holds no file for `split`.

    Example:

    ```python
    >>> from srpo_trl.tasks import get_reward_funcs, load_task_dataset
    >>> train_dataset = load_task_dataset("chemistry", "train", data_path="SDPO/datasets")
    >>> train_dataset[0]["prompt"][1]["role"], train_dataset[0]["answer"]
    ('user', 'A')
    >>> reward_funcs = get_reward_funcs("chemistry")
    ```
    """
    entry = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of: {', '.join(SPLITS)}.")
    if data_path is None:
        source, rows = _hub_rows(entry, split, revision, hub_repo)
    elif revision is not None or hub_repo is not None:
        raise ValueError("`revision` and `hub_repo` select Hub data; they cannot be combined with `data_path`.")
    else:
        source, rows = _local_rows(entry, split, Path(data_path).expanduser())
    if not rows:
        raise ValueError(f"{source}: no rows.")
    return datasets.Dataset.from_list([_to_trainer_row(_validated(row, where, entry.kind)) for where, row in rows])


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> trainer rows
# ---------------------------------------------------------------------------------------------------------------------


def _validated(row: Any, where: str, kind: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    for field, expected_type in _REQUIRED_FIELDS.items():
        if field not in row:
            raise ValueError(f"{where}: missing field {field!r} (fields present: {', '.join(sorted(row)) or 'none'}).")
        _check_type(row[field], expected_type, where, field)
    if row.get("system") is not None:
        _check_type(row["system"], str, where, "system")
    if row["kind"] != kind:
        raise ValueError(f"{where}: field 'kind' is {row['kind']!r} but this task expects {kind!r}.")
    if kind == "tooluse":
        try:
            parse_gold_tool_calls(row["answer"])
        except ValueError as error:
            raise ValueError(f"{where}: field 'answer' is not a list of gold tool calls: {error}.") from None
    elif not row["answer"].strip():
        raise ValueError(f"{where}: field 'answer' is empty.")
    return row


def _check_type(value: Any, expected_type: type, where: str, field: str) -> None:
    # `bool` is a subclass of `int`, but `true` is no row index.
    if not isinstance(value, expected_type) or isinstance(value, bool):
        raise ValueError(
            f"{where}: field {field!r} should be {expected_type.__name__}, got {type(value).__name__} ({value!r:.80})."
        )


def _to_trainer_row(row: dict) -> dict:
    # The reference builds the prompt the same way (lasgroup/SDPO, data/preprocess.py).
    system = [] if row.get("system") is None else [{"role": "system", "content": row["system"]}]
    return {
        "prompt": [*system, {"role": "user", "content": row["prompt"]}],
        "answer": row["answer"],
        "kind": row["kind"],
        "idx": row["idx"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Local sources
# ---------------------------------------------------------------------------------------------------------------------


def _local_rows(task: Task, split: str, path: Path) -> tuple[str, list[_LocatedRow]]:
    if not path.exists():
        raise FileNotFoundError(f"data_path {path} does not exist.")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset_rows(path, split)
        path = _split_file(path, task, split)
    if path.suffix.lower() in (".json", ".jsonl"):
        return str(path), _json_lines_rows(path)
    if path.suffix.lower() == ".parquet":
        return str(path), _dataset_rows(_read_parquet(path), str(path))
    raise ValueError(
        f"{path}: unsupported file type {path.suffix!r}; expected JSON Lines (.json, .jsonl), .parquet, or a "
        "directory written by `save_to_disk`."
    )


def _split_file(directory: Path, task: Task, split: str) -> Path:
    candidates = [
        base / f"{split}{suffix}"
        for base in (directory, directory / task.local_folder)
        for suffix in (".json", ".jsonl", ".parquet")
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"No {split!r} file for task {task.name!r} under {directory}; looked for: {', '.join(map(str, candidates))}."
    )


def _json_lines_rows(path: Path) -> list[_LocatedRow]:
    rows = []
    with path.open("rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected one JSON object per "
                    "line (JSON Lines)."
                ) from None
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text.") from None
    return rows


def _read_parquet(path: Path) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_parquet(str(path))
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise ValueError(f"{path}: not a readable parquet file ({error}).") from error


def _saved_dataset_rows(path: Path, split: str) -> tuple[str, list[_LocatedRow]]:
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged save fails in many ways inside `datasets` and pyarrow
        raise ValueError(f"{path}: not a readable `save_to_disk` directory ({error}).") from error
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{path}: the saved DatasetDict has no split {split!r} (splits: {', '.join(saved)}).")
        saved = saved[split]
        path = path / split
    return str(path), _dataset_rows(saved, str(path))


def _dataset_rows(dataset: datasets.Dataset, source: str) -> list[_LocatedRow]:
    return [(f"{source}, row {index}", row) for index, row in enumerate(dataset.to_list())]


# ---------------------------------------------------------------------------------------------------------------------
# Hub sources
# ---------------------------------------------------------------------------------------------------------------------


def _hub_rows(task: Task, split: str, revision: str | None, hub_repo: str | None) -> tuple[str, list[_LocatedRow]]:
    if task.sciknoweval_domain:
        repo_id = hub_repo or SCIKNOWEVAL_HUB_REPO
        rows = _sciknoweval_split(repo_id, task, split, revision)
    elif hub_repo is None:
        raise ValueError(
            f"The {task.name} task has no Hub copy in the SDPO row format: pass data_path (--data_path) pointing at "
            f"{task.missing_hub_copy} (or at the directory above `{task.local_folder}/`), or hub_repo for a copy of "
            "your own."
        )
    else:
        repo_id = hub_repo
        rows = _from_hub(datasets.load_dataset, repo_id, split=split, revision=revision).to_list()
    source = f"{repo_id}@{revision or 'default revision'} ({task.name}, {split} split)"
    return source, [(f"{source}, row {index}", row) for index, row in enumerate(rows)]


def _from_hub(load, repo_id: str, **kwargs):
    """`load(repo_id, **kwargs)`, with the way to do without the Hub in the error when it fails (no network, a
    missing dataset or revision)."""
    try:
        return load(repo_id, **kwargs)
    except Exception as error:  # datasets raises several types (ConnectionError, DatasetNotFoundError, OSError, ...)
        raise ValueError(
            f"Could not load {repo_id} (revision {kwargs.get('revision') or 'latest'}) from the Hugging Face Hub: "
            f"{type(error).__name__}: {error}. To train from local files, pass data_path (--data_path): a directory "
            "in the SDPO layout (sciknoweval/<task>/<split>.json, tooluse/<split>.json), or one file per split."
        ) from error


def _sciknoweval_split(repo_id: str, task: Task, split: str, revision: str | None) -> list[dict]:
    if revision is None:
        warnings.warn(
            f"Building the {task.name} split from {repo_id} at its latest revision: an upstream re-upload can change the "
            "rows and so shift the train/test split away from SDPO's. Pass `revision` to pin it.",
            stacklevel=4,  # the caller of `load_task_dataset`
        )
    domain = task.sciknoweval_domain
    # SciKnowEval publishes everything as one "test" split; train/test are carved out of it below.
    published = _from_hub(datasets.load_dataset, repo_id, split="test", revision=revision)
    items = [row for row in published if _is_sdpo_item(row, domain)]
    if not items:
        raise ValueError(
            f"{repo_id}: no rows with domain {domain!r}, level {_SCIKNOWEVAL_LEVEL!r} and type in "
            f"{_SCIKNOWEVAL_TYPES}."
        )
    rows = []
    for index, item in enumerate(items):
        try:
            rows.append({**sciknoweval_to_sdpo(item), "idx": index})
        except (KeyError, TypeError, ValueError) as error:  # ValueError: as many labels as texts
            raise ValueError(
                f"{repo_id}, {domain} row {index}: does not match the SciKnowEval schema ({type(error).__name__}: "
                f"{error}); expected 'question', 'choices' {{'label', 'text'}} and 'answerKey'."
            ) from None
    halves = datasets.Dataset.from_list(rows).train_test_split(test_size=_TEST_FRACTION, seed=_SPLIT_SEED)
    return halves[split].to_list()


def _is_sdpo_item(row: dict, domain: str) -> bool:
    details = row.get("details") or {}
    return (
        row.get("domain") == domain
        and details.get("level") == _SCIKNOWEVAL_LEVEL
        and row.get("type") in _SCIKNOWEVAL_TYPES
    )


def sciknoweval_to_sdpo(item: dict) -> dict:
    """
    Turn one SciKnowEval multiple-choice item into an SDPO row (without its `idx`), as the reference does.

    SciKnowEval items (hicai-zju/SciKnowEval) look like `{"question": str, "choices": {"label": ["A", ...], "text":
    [...]}, "answerKey": "B", "type": "mcq-4-choices", "domain": "Chemistry", "details": {"level": "L3", "task": ...,
    "subtask": ...}, ...}`. Only `question`, `choices` and `answerKey` are read here; `type`, `domain` and
    `details.level` only decide which items are kept.

    Args:
        item (`dict`):
            One SciKnowEval item.

    Returns:
        `dict`: `prompt` (question, the options as `"A: text"` lines, then `"Please reason step by step."`), `system`
        (the reference's answer-format instructions), `answer` (the option letter) and `kind` (`"mcq"`).
    """
    choices = item["choices"]
    options = "\n".join(f"{label}: {text}" for label, text in zip(choices["label"], choices["text"], strict=True))
    return {
        "prompt": f"{item['question']}\n\n{options}\nPlease reason step by step.",
        "system": _SCIKNOWEVAL_SYSTEM_PROMPT,
        "answer": item["answerKey"],
        "kind": "mcq",
    }

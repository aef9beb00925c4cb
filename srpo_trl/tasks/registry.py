"""The paper's benchmarks, one entry per task: its name, answer format, rewards, local layout and Hub source.

A new task is one more `Task` in `_REGISTERED` (and its reward function in `rewards.py`); loaders, the training
script and the model card read everything else from the entry.
"""

from collections.abc import Callable
from dataclasses import dataclass

from .rewards import multiple_choice_reward, tool_use_reward

SCIKNOWEVAL_HUB_REPO = "hicai-zju/SciKnowEval"
"""Hub dataset the SciKnowEval tasks are built from when no `data_path` is given."""

TOOLUSE_SOURCE = "lasgroup/SDPO at commit 0e6d510, datasets/tooluse/{train,test}.json"
"""Where the tool-use splits live: the ToolAlpaca splits as SDPO committed them (Apache-2.0). There is no canonical Hub
copy in the SDPO row format, so the tool-use task loads from `data_path` (or an explicit `hub_repo`)."""


@dataclass(frozen=True)
class Task:
    """
    One benchmark.

    Attributes:
        name (`str`): what `--task` and [`load_task_dataset`] take.
        kind (`str`): the answer format, as the SDPO rows' `kind` column names it (`"mcq"` or `"tooluse"`).
        reward_funcs (`tuple[Callable, ...]`): its verifiable rewards, for `GRPOTrainer(reward_funcs=...)`.
        local_folder (`str`): where the SDPO layout keeps its `{split}.json` files, under a `data_path` folder.
        sciknoweval_domain (`str` or `None`): the SciKnowEval domain its Hub rows are filtered by and split from
            (`None`: no Hub copy in the SDPO format; see `missing_hub_copy`).
        missing_hub_copy (`str` or `None`): where its data is to be had instead, for tasks without a Hub copy.
    """

    name: str
    kind: str
    reward_funcs: tuple[Callable, ...]
    local_folder: str
    sciknoweval_domain: str | None = None
    missing_hub_copy: str | None = None

    @property
    def hub_dataset(self) -> str | None:
        """The Hub dataset a model card credits (`None` when the data has no Hub copy)."""
        return SCIKNOWEVAL_HUB_REPO if self.sciknoweval_domain else None


def _science(name: str) -> Task:
    return Task(name, "mcq", (multiple_choice_reward,), f"sciknoweval/{name}", sciknoweval_domain=name.capitalize())


_REGISTERED = (
    *(_science(name) for name in ("chemistry", "physics", "biology", "material")),
    Task("tooluse", "tooluse", (tool_use_reward,), "tooluse", missing_hub_copy=TOOLUSE_SOURCE),
)
_BY_NAME = {task.name: task for task in _REGISTERED}

TASKS = tuple(_BY_NAME)
"""Every task name [`load_task_dataset`] and [`get_reward_funcs`] accept."""

SCIENCE_TASKS = tuple(task.name for task in _REGISTERED if task.sciknoweval_domain)
"""SciKnowEval domains (level L3, multiple choice), each one task."""


def get_task(name: str) -> Task:
    """
    The registered task called `name`.

    Raises:
        `ValueError`: If `name` is not one of [`TASKS`]; the message lists them.
    """
    if name not in _BY_NAME:
        raise ValueError(f"Unknown task {name!r}; expected one of: {', '.join(TASKS)}.")
    return _BY_NAME[name]


def check_task(task: str) -> str:
    """`task` itself once [`get_task`] knows it (a `ValueError` listing the tasks otherwise)."""
    return get_task(task).name


def task_kind(task: str) -> str:
    """Answer format of a task, as the SDPO data's `kind` column names it: `"mcq"` or `"tooluse"`."""
    return get_task(task).kind


def get_reward_funcs(task: str) -> list[Callable]:
    """
    Reward functions of a task, ready for `GRPOTrainer(reward_funcs=...)`.

    Args:
        task (`str`):
            Task name, one of [`TASKS`].

    Returns:
        `list[Callable]`: A new list on each call, so callers may extend it.

    Example:

    ```python
    >>> from srpo_trl.tasks import get_reward_funcs
    >>> get_reward_funcs("chemistry")
    [<function multiple_choice_reward at ...>]
    ```
    """
    return list(get_task(task).reward_funcs)

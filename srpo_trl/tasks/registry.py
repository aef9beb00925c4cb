"""Task names and the reward functions a training script looks up by task name."""

from collections.abc import Callable

from .rewards import multiple_choice_reward, tool_use_reward

SCIENCE_TASKS = ("chemistry", "physics", "biology", "material")
"""SciKnowEval domains (level L3, multiple choice), each one task."""

TASKS = (*SCIENCE_TASKS, "tooluse")
"""Every task name [`load_task_dataset`] and [`get_reward_funcs`] accept."""

_REWARD_FUNCS: dict[str, tuple[Callable, ...]] = {
    **dict.fromkeys(SCIENCE_TASKS, (multiple_choice_reward,)),
    "tooluse": (tool_use_reward,),
}


def check_task(task: str) -> str:
    """
    Validate a task name.

    Args:
        task (`str`):
            Task name.

    Returns:
        `str`: `task` itself.

    Raises:
        `ValueError`: If `task` is not one of [`TASKS`]; the message lists them.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of: {', '.join(TASKS)}.")
    return task


def task_kind(task: str) -> str:
    """
    Answer format of a task, as the SDPO data's `kind` column names it: `"mcq"` or `"tooluse"`.

    Args:
        task (`str`):
            Task name, one of [`TASKS`].

    Returns:
        `str`: `"tooluse"` for the tool-use task, `"mcq"` for the science tasks.
    """
    return "tooluse" if check_task(task) == "tooluse" else "mcq"


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
    return list(_REWARD_FUNCS[check_task(task)])

"""SDPO benchmarks for SRPO: dataset loaders and rule-based rewards.

```python
from srpo_trl.tasks import get_reward_funcs, load_task_dataset

train_dataset = load_task_dataset("chemistry", "train", data_path="SDPO/datasets")
reward_funcs = get_reward_funcs("chemistry")  # pass both to the trainer
```
"""

from .data import SPLITS, load_task_dataset, sciknoweval_to_sdpo
from .registry import (
    SCIENCE_TASKS,
    SCIKNOWEVAL_HUB_REPO,
    TASKS,
    TOOLUSE_SOURCE,
    Task,
    check_task,
    get_reward_funcs,
    get_task,
    task_kind,
)
from .rewards import (
    completion_text,
    extract_choice,
    multiple_choice_reward,
    parse_gold_tool_calls,
    parse_tool_calls,
    reference_tool_use_reward,
    tool_use_reward,
)

__all__ = [
    "SCIENCE_TASKS",
    "SCIKNOWEVAL_HUB_REPO",
    "SPLITS",
    "TASKS",
    "TOOLUSE_SOURCE",
    "Task",
    "check_task",
    "completion_text",
    "extract_choice",
    "get_reward_funcs",
    "get_task",
    "load_task_dataset",
    "multiple_choice_reward",
    "parse_gold_tool_calls",
    "parse_tool_calls",
    "reference_tool_use_reward",
    "sciknoweval_to_sdpo",
    "task_kind",
    "tool_use_reward",
]

"""A CPU testbed for RL post-training: generated task families and a tiny pre-trained model per family.

`pretrained_testbed_model(PretrainConfig(task=...))` returns a character-level Qwen3 (pre-trained in a few minutes on
one CPU core, then cached) whose sampled rollouts on that task mix correct and wrong answers, and that uses a correct
solution put in its prompt: GRPO groups mix rewards, and the SRPO self-teacher knows better than the student.
`TASK_FAMILIES` lists the tasks (one per regime: a skill partly learnt, a skill known but sampled noisily);
`measure_testbed_abilities` measures both abilities. `tiny_model_and_tokenizer` (and `python -m srpo_trl.testbed
OUTPUT_DIR [--pretrained]`, which saves it) gives a tiny model for a first CPU run of your own task.
"""

from .abilities import measure_testbed_abilities
from .model import build_tiny_model
from .pretrain import PretrainConfig, default_cache_dir, pretrained_testbed_model
from .task import TASK_FAMILIES, make_testbed_dataset, reward, teacher_prompt
from .tiny import save_tiny_model, tiny_model_and_tokenizer
from .tokenizer import build_char_tokenizer

__all__ = [
    "TASK_FAMILIES",
    "PretrainConfig",
    "build_char_tokenizer",
    "build_tiny_model",
    "default_cache_dir",
    "make_testbed_dataset",
    "measure_testbed_abilities",
    "pretrained_testbed_model",
    "reward",
    "save_tiny_model",
    "teacher_prompt",
    "tiny_model_and_tokenizer",
]

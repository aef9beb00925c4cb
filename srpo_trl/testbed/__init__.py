"""A CPU testbed for RL post-training: generated arithmetic problems and a tiny pre-trained model.

`pretrained_testbed_model()` returns a character-level Qwen3 (pre-trained in about 100 seconds on one CPU core, then
cached) that solves about a quarter of held-out problems at temperature 1 (three quarters greedily) and most of them
when its prompt holds a correct solution: GRPO groups mix rewards, and the SRPO self-teacher knows better than the
student. `measure_testbed_abilities` measures both.
"""

from .abilities import measure_testbed_abilities
from .model import build_tiny_model
from .pretrain import PretrainConfig, default_cache_dir, pretrained_testbed_model
from .task import make_arithmetic_dataset, reward, teacher_prompt
from .tokenizer import build_char_tokenizer

__all__ = [
    "PretrainConfig",
    "build_char_tokenizer",
    "build_tiny_model",
    "default_cache_dir",
    "make_arithmetic_dataset",
    "measure_testbed_abilities",
    "pretrained_testbed_model",
    "reward",
    "teacher_prompt",
]

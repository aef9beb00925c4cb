"""Generated task families, shaped like the real benchmarks, for the CPU testbed.

A family is a fixed set of `(question, answer)` problems, the system prompt that asks for them, and the near misses
pre-training mislabels student examples with. Its rows look like the SciKnowEval rows once loaded: a conversational
`prompt` (system + user message) and a string `answer`, and the model must reply `<answer>...</answer>`. Prompts and
completions are a few dozen characters, which keeps a character-level model's RL steps fast on CPU.

The families cover the two regimes RL post-training meets (`TASK_FAMILIES`):

- `"addition"`, `a+b=?` with two-digit operands (8,100 problems): the pre-trained model has only partly learnt the
  skill (greedy decoding solves about three quarters of held-out problems, sampling at temperature 1 a quarter);
  RL has to improve what the model knows.
- `"reversal"`, a four-digit string written backwards (10,000 problems): the model knows every answer (greedy
  decoding solves all of them) but its sampling is noisy (temperature 1 solves about a third); RL only sharpens.

Every problem belongs to exactly one pool, `"pretrain"`, `"train"` or `"test"`, chosen by a stable hash of its
question. The seed only picks which problems of a pool a dataset draws, so the test problems are never seen in
pre-training and RL training problems are new to the pre-trained model, whatever the seeds.
"""

import itertools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..prompts import build_teacher_prompt
from ..tasks.rewards import multiple_choice_reward

# Hash buckets (out of 10) of each pool: 10% test, 20% RL train, 70% pre-training.
POOL_BUCKETS = {"test": {0}, "train": {1, 2}, "pretrain": {3, 4, 5, 6, 7, 8, 9}}


@dataclass(frozen=True)
class TaskFamily:
    """
    One generated task.

    Attributes:
        system_prompt: the instruction every prompt starts with. No `<answer>...</answer>` example in it: the tiny
            model would copy from it (as it learns to copy the answer of a teacher prompt's demonstration).
        problems: every `(question, answer)` of the family, in a fixed order.
        near_miss: a plausible wrong answer for `answer`, drawn with `rng`; pre-training labels a fraction
            (`label_noise`) of student examples with one, so that sampling at temperature 1 often fails.
        label_noise: that fraction, the family's default `PretrainConfig.label_noise`; it sets the regime.
    """

    system_prompt: str
    problems: Callable[[], list[tuple[str, str]]]
    near_miss: Callable[[str, random.Random], str]
    label_noise: float


def _additions() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=?", str(a + b)) for a in range(10, 100) for b in range(10, 100)]


def _units_slip(answer: str, rng: random.Random) -> str:
    # A slip in the units digit. Slips in the tens digit would blur the carry, the hard part of the skill, and the
    # model then takes several times longer to learn it.
    return str(int(answer) + rng.choice((-2, -1, 1, 2)))


def _reversals() -> list[tuple[str, str]]:
    digits = ("".join(d) for d in itertools.product("0123456789", repeat=4))
    return [(f"{s} reversed=?", s[::-1]) for s in digits]


def _one_digit_slip(answer: str, rng: random.Random) -> str:
    # One digit, anywhere, off by one. Slips spread over every position and two directions, so that with most labels
    # slipped (the family's label noise, 0.9) the right digit is still by far the likeliest at each position (about
    # 3 in 4): greedy decoding is always right while a sample at temperature 1 rarely gets all four digits right.
    position = rng.randrange(len(answer))
    digit = (int(answer[position]) + rng.choice((-1, 1))) % 10
    return answer[:position] + str(digit) + answer[position + 1 :]


TASK_FAMILIES = {
    "addition": TaskFamily("Put the sum in answer tags.", _additions, _units_slip, label_noise=0.4),
    "reversal": TaskFamily("Put the digits reversed in answer tags.", _reversals, _one_digit_slip, label_noise=0.9),
}


def task_family(task: str) -> TaskFamily:
    if task not in TASK_FAMILIES:
        raise ValueError(f"Unknown testbed task {task!r}; one of {sorted(TASK_FAMILIES)}.")
    return TASK_FAMILIES[task]


def problem_pool(pool: str, task: str = "addition") -> list[tuple[str, str]]:
    """
    The `(question, answer)` pairs of one pool of a task family, in a fixed order.

    Args:
        pool (`str`):
            `"pretrain"`, `"train"` or `"test"`.
        task (`str`, *optional*, defaults to `"addition"`):
            A key of `TASK_FAMILIES`.
    """
    buckets = POOL_BUCKETS[pool]
    return [(q, a) for q, a in task_family(task).problems() if zlib.crc32(q.encode()) % 10 in buckets]


def student_prompt(question: str, task: str = "addition") -> list[dict[str, str]]:
    """The conversational prompt the policy sees for `question`."""
    return [{"role": "system", "content": task_family(task).system_prompt}, {"role": "user", "content": question}]


def format_completion(answer: str) -> str:
    """The completion that states `answer` in the expected format (what a correct rollout looks like)."""
    return f"<answer>{answer}</answer>"


def teacher_prompt(prompt: list[dict[str, str]], demonstration: str) -> list[dict[str, str]]:
    """The self-teacher's prompt (method §3) exactly as `SRPOTrainer` builds it, for pre-training on it."""
    return build_teacher_prompt(prompt, demonstration)


def make_testbed_dataset(
    num_train: int = 1000, num_test: int = 200, seed: int = 0, task: str = "addition"
) -> DatasetDict:
    """
    RL train and test splits of a task family, with the columns TRL trainers expect.

    Args:
        num_train (`int`, *optional*, defaults to `1000`):
            Rows of the `"train"` split (at most the size of the train pool: about 1,600 additions, 2,000 reversals).
        num_test (`int`, *optional*, defaults to `200`):
            Rows of the `"test"` split (at most the size of the test pool: about 800 additions, 1,000 reversals).
        seed (`int`, *optional*, defaults to `0`):
            Picks which problems of each pool are drawn, and their order.
        task (`str`, *optional*, defaults to `"addition"`):
            A key of `TASK_FAMILIES`.

    Returns:
        `DatasetDict`: `"train"` and `"test"` splits with a conversational `prompt` column and a string `answer`
        column.
    """
    rng = random.Random(seed)
    splits = {}
    for split, size in (("train", num_train), ("test", num_test)):
        pool = problem_pool(split, task)
        if size > len(pool):
            raise ValueError(f"The {split} pool of {task!r} has {len(pool)} problems; {size} were requested.")
        problems = rng.sample(pool, size)
        splits[split] = Dataset.from_dict(
            {"prompt": [student_prompt(q, task) for q, _ in problems], "answer": [a for _, a in problems]}
        )
    return DatasetDict(splits)


def reward(completions: list, answer: list, **kwargs) -> list[float]:
    """
    TRL reward function of every family: 1.0 where the text in the last `<answer>` tag (the whole text without a
    tag), stripped, is the answer, else 0.0. The benchmarks' multiple-choice rule, so the testbed scores as they do;
    it never raises on a malformed completion.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Plain-string or conversational completions.
        answer (`list[str]`):
            The answer of each completion's problem.
    """
    return multiple_choice_reward(completions, answer)


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of conversational prompts, rendered as `GRPOTrainer` does with `enable_thinking=False`."""
    texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_completion(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of the completion stating `answer`, ending with EOS as a generated rollout does."""
    return tokenizer(format_completion(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

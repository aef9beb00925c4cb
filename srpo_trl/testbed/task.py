"""Generated two-digit additions, shaped like the real benchmarks, for the CPU testbed.

Each problem is `a+b=?` with two-digit operands (8,100 problems). Rows look like the SciKnowEval rows once loaded:
a conversational `prompt` (system + user message) and a string `answer`, and the model must reply
`<answer>...</answer>`. Prompts are 34 characters and completions at most 20, which keeps a character-level model's
RL steps fast on CPU. (Subtraction as well would double what the tiny model must learn, and pre-training would no
longer fit in about two minutes.)

Every problem belongs to exactly one pool, `"pretrain"`, `"train"` or `"test"`, chosen by a stable hash of its
question. The seed only picks which problems of a pool a dataset draws, so the test problems are never seen in
pre-training and RL training problems are new to the pre-trained model, whatever the seeds.
"""

import random
import zlib

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..prompts import build_teacher_prompt
from ..tasks.rewards import multiple_choice_reward

# No `<answer>...</answer>` example here: the tiny model would copy from it (as it learns to copy the answer of a
# teacher prompt's demonstration), and learning to add would take several times longer for some seeds.
SYSTEM_PROMPT = "Put the sum in answer tags."
OPERANDS = range(10, 100)
# Hash buckets (out of 10) of each pool: 10% test, 20% RL train, 70% pre-training.
POOL_BUCKETS = {"test": {0}, "train": {1, 2}, "pretrain": {3, 4, 5, 6, 7, 8, 9}}


def _all_problems() -> list[tuple[str, str]]:
    """Every `(question, answer)` of the family, in a fixed order."""
    return [(f"{a}+{b}=?", str(a + b)) for a in OPERANDS for b in OPERANDS]


def problem_pool(pool: str) -> list[tuple[str, str]]:
    """
    The `(question, answer)` pairs of one pool, in a fixed order.

    Args:
        pool (`str`):
            `"pretrain"`, `"train"` or `"test"`.
    """
    buckets = POOL_BUCKETS[pool]
    return [(q, a) for q, a in _all_problems() if zlib.crc32(q.encode()) % 10 in buckets]


def student_prompt(question: str) -> list[dict[str, str]]:
    """The conversational prompt the policy sees for `question`."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def format_completion(answer: str) -> str:
    """The completion that states `answer` in the expected format (what a correct rollout looks like)."""
    return f"<answer>{answer}</answer>"


def teacher_prompt(prompt: list[dict[str, str]], demonstration: str) -> list[dict[str, str]]:
    """The self-teacher's prompt (SPEC section 3) exactly as `SRPOTrainer` builds it, for pre-training on it."""
    return build_teacher_prompt(prompt, demonstration)


def make_arithmetic_dataset(num_train: int = 1000, num_test: int = 200, seed: int = 0) -> DatasetDict:
    """
    RL train and test splits of the addition task, with the columns TRL trainers expect.

    Args:
        num_train (`int`, *optional*, defaults to `1000`):
            Rows of the `"train"` split (at most the size of the train pool, about 1,600).
        num_test (`int`, *optional*, defaults to `200`):
            Rows of the `"test"` split (at most the size of the test pool, about 800).
        seed (`int`, *optional*, defaults to `0`):
            Picks which problems of each pool are drawn, and their order.

    Returns:
        `DatasetDict`: `"train"` and `"test"` splits with a conversational `prompt` column and a string `answer`
        column.
    """
    rng = random.Random(seed)
    splits = {}
    for split, size in (("train", num_train), ("test", num_test)):
        pool = problem_pool(split)
        if size > len(pool):
            raise ValueError(f"The {split} pool has {len(pool)} problems; {size} were requested.")
        problems = rng.sample(pool, size)
        splits[split] = Dataset.from_dict(
            {"prompt": [student_prompt(q) for q, _ in problems], "answer": [a for _, a in problems]}
        )
    return DatasetDict(splits)


def reward(completions: list, answer: list, **kwargs) -> list[float]:
    """
    TRL reward function of the task: 1.0 where the text in the last `<answer>` tag (the whole text without a tag),
    stripped, is the sum, else 0.0. The benchmarks' multiple-choice rule, so the testbed scores as they do; it never
    raises on a malformed completion.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Plain-string or conversational completions.
        answer (`list[str]`):
            The sum for each completion's problem.
    """
    return multiple_choice_reward(completions, answer)


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of conversational prompts, rendered as `GRPOTrainer` does with `enable_thinking=False`."""
    texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_completion(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Token ids of the completion stating `answer`, ending with EOS as a generated rollout does."""
    return tokenizer(format_completion(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

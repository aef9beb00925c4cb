"""The self-teacher's prompt (method §3): the student's question plus a correct sibling's answer."""

import copy
import re
from collections.abc import Callable

THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
SOLUTION_TEMPLATE = (
    "{question}\nCorrect solution:\n\n{demonstration}\n{feedback}\nCorrectly solve the original question."
)
# method §3's optional block, between the solution and the closing instruction (empty without feedback).
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}\n"
ELISION = "\n...\n"


def demonstration_from_completion(completion: str) -> str:
    """A sibling's decoded completion without its `<think>...</think>` blocks: the teacher sees the answer, not
    the reasoning trace (an unterminated block, cut by the length limit, is dropped to the end too)."""
    text = THINK_BLOCK.sub("", completion)
    return text.split("<think>", 1)[0].strip()


def teacher_prompt_problem(prompt: str | list[dict]) -> str | None:
    """Why the teacher prompt cannot be built from `prompt` (method §3 rewrites the last user turn's text), or None."""
    if isinstance(prompt, str):
        return None
    user_turns = [message for message in prompt if message.get("role") == "user"]
    if not user_turns:
        return (
            f"SRPO's teacher prompt rewrites the last user turn, and this conversational prompt has no user turn "
            f"(roles found: {[message.get('role') for message in prompt]}): put the question in a "
            "{'role': 'user', 'content': ...} message, or train with routing='grpo'."
        )
    content = user_turns[-1].get("content")
    if not isinstance(content, str):
        return (
            "SRPO's teacher prompt rewrites the last user turn's text, so its content must be a string; got "
            f"{type(content).__name__} (multimodal content is not supported): use text prompts, or routing='grpo'."
        )
    return None


def build_teacher_prompt(
    prompt: str | list[dict], demonstration: str, feedback: str | None = None
) -> str | list[dict]:
    """Replace the last user turn's text `U` (or a plain-text prompt) by the method §3 template; system turns stay.
    A non-empty `feedback` (on the rollout being distilled) goes between the solution and the closing instruction."""
    block = FEEDBACK_TEMPLATE.format(feedback=feedback) if feedback else ""

    def rewrite(question: str) -> str:
        return SOLUTION_TEMPLATE.format(question=question, demonstration=demonstration, feedback=block)

    if isinstance(prompt, str):
        return rewrite(prompt)
    problem = teacher_prompt_problem(prompt)
    if problem is not None:
        raise ValueError(problem)
    last = [i for i, message in enumerate(prompt) if message.get("role") == "user"][-1]
    messages = copy.deepcopy(prompt)
    messages[last]["content"] = rewrite(messages[last]["content"])
    return messages


def elide_middle(text: str, keep: int) -> str:
    """Keep `keep` characters of `text`: its start (the approach) and its end (where the final answer sits)."""
    if keep >= len(text):
        return text
    head = keep // 2
    return text[:head] + ELISION + text[len(text) - (keep - head) :]


def fit_teacher_prompt(
    prompt: str | list[dict],
    demonstration: str,
    tokenize: Callable[[str | list[dict]], list[int]],
    max_length: int,
    feedback: str | None = None,
) -> tuple[list[int], int]:
    """Token ids of the teacher prompt, at most `max_length` long if cutting the demonstration can achieve it, and
    how many of the demonstration's characters it kept.

    Only the demonstration is shortened (binary search on how many of its characters to keep, cut in the middle);
    the question, the system turns, the feedback and the closing instruction are never cut. When they alone leave no
    room, the demonstration goes entirely (0 characters kept) and the prompt keeps its full length over the limit.
    """
    ids = tokenize(build_teacher_prompt(prompt, demonstration, feedback))
    if len(ids) <= max_length:
        return ids, len(demonstration)
    low, high = 0, len(demonstration) - 1  # invariant: keeping `low` characters fits (or low == 0)
    best = tokenize(build_teacher_prompt(prompt, "", feedback))
    while low < high:
        keep = (low + high + 1) // 2
        candidate = tokenize(build_teacher_prompt(prompt, elide_middle(demonstration, keep), feedback))
        if len(candidate) <= max_length:
            low, best = keep, candidate
        else:
            high = keep - 1
    return best, low

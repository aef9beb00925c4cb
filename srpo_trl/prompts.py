"""The self-teacher's prompt (method §3): the student's question plus a correct sibling's answer."""

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import pyarrow as pa
import pyarrow.compute as pc
import torch

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


def empty_prompt_problem(prompt) -> str | None:
    """Why GRPOTrainer cannot render `prompt` at all (an empty text or conversation), or None."""
    if prompt is None or len(prompt) == 0:
        return (
            f"the prompt is {prompt!r}: every row needs a question, as a non-empty string or a non-empty list of "
            "{'role': ..., 'content': ...} messages; drop such rows (dataset.filter(lambda row: row['prompt']))."
        )
    return None


def prompt_column_problem(column: pa.ChunkedArray, teacher: bool) -> tuple[int, str] | None:
    """The first row of a dataset's `prompt` column that cannot be trained (empty), or, with `teacher`, that the
    teacher prompt cannot be built from (`teacher_prompt_problem`), with why; None when every row is fine.

    Column-wise on the Arrow data (fast on millions of rows): the vectorised tests only find candidate rows, and
    the row-level functions decide on those, in order, so the answer is exactly theirs."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.utf8_length(column) if _is_text(column.type) else _list_lengths(column), 0)
    candidates = numpy.flatnonzero(lengths.to_numpy(zero_copy_only=False) == 0)
    if teacher and _is_list(column.type):
        candidates = numpy.union1d(candidates, _rows_whose_user_turn_may_not_be_text(column))
    for row in candidates.tolist():
        prompt = column[row].as_py()
        problem = empty_prompt_problem(prompt) or (teacher_prompt_problem(prompt) if teacher else None)
        if problem is not None:
            return row, problem
    return None


def _is_text(arrow_type) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_list(arrow_type) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def _list_lengths(column: pa.Array) -> pa.Array:
    if _is_list(column.type):
        return pc.list_value_length(column)
    return pa.array(numpy.ones(len(column), dtype=numpy.int64))  # another type: GRPOTrainer's to judge


def _rows_whose_user_turn_may_not_be_text(column: pa.Array) -> numpy.ndarray:
    """Rows without a `user` message, or with a user message whose content is not a string: a superset of the rows
    `teacher_prompt_problem` refuses (it looks at the last user turn only)."""
    messages = pc.list_flatten(column)
    parents = pc.list_parent_indices(column).to_numpy()
    every_row = numpy.arange(len(column))
    if not pa.types.is_struct(messages.type) or messages.type.get_field_index("role") < 0:
        return every_row
    is_user = pc.fill_null(pc.equal(messages.field("role"), "user"), False).to_numpy(zero_copy_only=False)
    without_user = numpy.setdiff1d(every_row, parents[is_user])
    if messages.type.get_field_index("content") < 0 or not _is_text(messages.field("content").type):
        return every_row  # multimodal content (a list of parts) in every row
    untext = pc.is_null(messages.field("content")).to_numpy(zero_copy_only=False) & is_user
    return numpy.union1d(without_user, parents[untext])


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


@dataclass
class BatchTeacherPrompts:
    """The teacher prompts of one process's routed rows.

    Attributes:
        ids: token ids of each routed row's teacher prompt, in row order, for the rows that keep their teacher.
        truncated: `(rows,)` which rows' demonstration was shortened to fit.
        no_room: `(rows,)` which routed rows' prompt leaves no room for any of the demonstration (or for the
            completion, within the model's context): they are routed as if no sibling were correct.
        longest_without_room: the length of such a prompt without its demonstration, for the warning (0 if none).
    """

    ids: list[list[int]]
    truncated: torch.Tensor
    no_room: torch.Tensor
    longest_without_room: int = 0


def batch_teacher_prompts(
    routed: list[tuple[int, int]],
    prompts: list,
    sibling_completion: Callable[[int], str],
    tokenize: Callable[[str | list[dict], int], list[int]],
    budget: int,
    over_context: bool,
    feedback: list[str | None] | None = None,
    one_per_sibling: bool = True,
    source: str = "the dataset",
) -> BatchTeacherPrompts:
    """The teacher prompts (method §3) of the `routed` rows, `(row, sibling)` pairs of this process's batch row and
    the global index of its demonstration, within `budget` tokens.

    `sibling_completion(index)` is the decoded completion of the rollout at global `index`; `tokenize(prompt, row)`
    renders a prompt as the student's row `row` is rendered. A group's routed rows share one teacher prompt (the
    question, the same sibling), built once when `one_per_sibling` (not with per-row feedback or tool environments).
    `over_context`: `budget` is the model's context, not the setting: a prompt over it cannot be scored at all.
    A prompt the template cannot rewrite (a streamed dataset's, met here rather than at construction) is an error
    naming `source` and the prompt.
    """
    truncated = torch.zeros(len(prompts), dtype=torch.bool)
    no_room = torch.zeros_like(truncated)
    ids, built, longest = [], {}, 0
    for row, sibling in routed:
        key = sibling if one_per_sibling else (sibling, row)
        if key not in built:
            demonstration = demonstration_from_completion(sibling_completion(sibling))
            try:
                fitted = fit_teacher_prompt(
                    prompts[row],
                    demonstration,
                    functools.partial(tokenize, row=row),
                    budget,
                    feedback=None if feedback is None else feedback[row],
                )
            except ValueError as error:
                raise ValueError(f"A prompt of {source}, {prompts[row]!r:.200}: {error}") from error
            built[key] = (demonstration, *fitted)
        demonstration, prompt_ids, kept = built[key]
        # Over the setting, a prompt without its demonstration is a teacher that never saw the answer; over the
        # context, the model cannot score it at all.
        if (kept == 0 and demonstration) or (over_context and len(prompt_ids) > budget):
            no_room[row] = True
            longest = max(longest, len(prompt_ids))
        else:
            truncated[row] = kept < len(demonstration)
            ids.append(prompt_ids)
    return BatchTeacherPrompts(ids, truncated, no_room, longest)


def teacher_prompt_budget(setting: int, context: int | None, completion_length: int) -> tuple[int, bool]:
    """The longest teacher prompt of a batch whose completions take `completion_length` tokens: the setting
    (`max_teacher_prompt_length`), or less where the teacher prompt and the completion would pass the model's
    `context`; and whether the context is what limits it (a prompt over it then cannot be scored at all)."""
    if context is None or context - completion_length >= setting:
        return setting, False
    return context - completion_length, True

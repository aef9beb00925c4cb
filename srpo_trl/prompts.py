"""The self-teacher's prompt (method §3): the student's question plus a correct sibling's answer, and (beyond the
paper) the dataset's `privileged_context` for the question and the reward's feedback on the rollout."""

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.utils import gather_object

from .routing import siblings_to_share

THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
TEACHER_TEMPLATE = "{question}{solution}{context}{feedback}\nCorrectly solve the original question."
# The correct sibling's answer (method §3); absent only for a rollout distilled from its privileged context alone.
SOLUTION_BLOCK = "\nCorrect solution:\n\n{demonstration}\n"
# Beyond the paper: the dataset's `privileged_context` (a reference solution, environment feedback), as TRL's SDPO
# reads the column; empty without one.
CONTEXT_BLOCK = "\nThe following is reference information about the question:\n\n{context}\n"
# method §3's optional block, between the solution and the closing instruction (empty without feedback).
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}\n"
PRIVILEGED_CONTEXT_COLUMN = "privileged_context"  # TRL SDPO's name for the dataset column
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


def prompt_column_problem(
    column: pa.ChunkedArray, teacher: bool, decode: Callable[[int], object] | None = None
) -> tuple[int, str] | None:
    """The first row of a dataset's `prompt` column that cannot be trained (empty), or, with `teacher`, that the
    teacher prompt cannot be built from (`teacher_prompt_problem`), with why; None when every row is fine.

    Column-wise on the Arrow data (fast on millions of rows): the vectorised tests only find candidate rows, and
    the row-level functions decide on those, in order, so the answer is exactly theirs. `decode(row)` gives a row's
    prompt as the dataset hands it to the trainer (`datasets` decodes some columns: messages with keys of their own,
    a `name`, are stored as JSON text); without it, the Arrow value as it is."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.utf8_length(column) if _is_text(column.type) else _list_lengths(column), 0)
    candidates = numpy.flatnonzero(lengths.to_numpy(zero_copy_only=False) == 0)
    if teacher and _is_list(column.type):
        candidates = numpy.union1d(candidates, _rows_whose_user_turn_may_not_be_text(column))
    for row in candidates.tolist():
        prompt = column[row].as_py() if decode is None else decode(row)
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
    prompt: str | list[dict], demonstration: str | None, feedback: str | None = None, context: str | None = None
) -> str | list[dict]:
    """Replace the last user turn's text `U` (or a plain-text prompt) by the method §3 template; system turns stay.
    A non-empty privileged `context` (of the question) and `feedback` (on the rollout being distilled) go between
    the solution and the closing instruction; a `demonstration` of None (no correct sibling) leaves out the solution."""
    blocks = {
        "solution": "" if demonstration is None else SOLUTION_BLOCK.format(demonstration=demonstration),
        "context": CONTEXT_BLOCK.format(context=context) if context else "",
        "feedback": FEEDBACK_TEMPLATE.format(feedback=feedback) if feedback else "",
    }

    def rewrite(question: str) -> str:
        return TEACHER_TEMPLATE.format(question=question, **blocks)

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
    demonstration: str | None,
    tokenize: Callable[[str | list[dict]], list[int]],
    max_length: int,
    feedback: str | None = None,
    context: str | None = None,
) -> tuple[list[int], int]:
    """Token ids of the teacher prompt, at most `max_length` long if cutting the demonstration can achieve it, and
    how many of the demonstration's characters it kept.

    Only the demonstration is shortened (binary search on how many of its characters to keep, cut in the middle);
    the question, the system turns, the context, the feedback and the closing instruction are never cut. When they
    alone leave no room, the demonstration goes entirely (0 characters kept) and the prompt keeps its full length over
    the limit (as does a prompt without a demonstration).
    """
    build = functools.partial(build_teacher_prompt, prompt, feedback=feedback, context=context)
    ids = tokenize(build(demonstration))
    if len(ids) <= max_length or demonstration is None:
        return ids, len(demonstration or "")
    low, high = 0, len(demonstration) - 1  # invariant: keeping `low` characters fits (or low == 0)
    best = tokenize(build(""))
    while low < high:
        keep = (low + high + 1) // 2
        candidate = tokenize(build(elide_middle(demonstration, keep)))
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
        crowded_by: what else such prompts carry that is never cut (`"privileged context"`, `"feedback"`), for the
            warning: it, not the question, may be what fills them.
        solution_tokens: `(rows, longest completion)` `solution_departure_tokens` of the rows that keep their teacher.
    """

    ids: list[list[int]]
    truncated: torch.Tensor
    no_room: torch.Tensor
    longest_without_room: int = 0
    solution_tokens: torch.Tensor | None = None
    crowded_by: tuple[str, ...] = ()


def batch_teacher_prompts(
    routed: list[tuple[int, int]],
    prompts: list,
    sibling_ids: Callable[[int], list[int]],
    decode: Callable[[list[int]], str],
    tokenize: Callable[[str | list[dict], int], list[int]],
    *,
    budget: int,
    over_context: bool,
    feedback: list[str | None] | None = None,
    one_per_sibling: bool = True,
    source: str = "the dataset",
    contexts: list[str | None] | None = None,
    completion_ids: list[list[int]] | None = None,
) -> BatchTeacherPrompts:
    """The teacher prompts (method §3) of this process's `routed` rows. A group's routed rows share one teacher
    prompt (the question, the same sibling). A prompt the template cannot rewrite (a streamed dataset's, met here
    rather than at construction) is an error naming `source` and the prompt.

    Args:
        routed: `(row, sibling)` pairs: this process's batch row, and the global index of its demonstration (`-1`:
            none, a rollout distilled from its privileged context alone).
        prompts: this process's rows' prompts.
        sibling_ids: `sibling_ids(index)`, the completion ids of the rollout at global `index`.
        decode: makes completion ids text (the sibling's completion).
        tokenize: `tokenize(prompt, row)` renders a prompt as the student's row `row` is rendered.
        budget: the most tokens a teacher prompt may have.
        over_context: `budget` is the model's context, not the setting: a prompt over it cannot be scored at all.
        feedback: per row, the reward functions' feedback shown to the teacher (`teacher_feedback`), or None.
        one_per_sibling: build a group's shared prompt once (not with per-row feedback or tool environments).
        source: how errors name the dataset.
        contexts: per row, the dataset's privileged context, shown where present.
        completion_ids: this process's rows' own completions (for `solution_tokens`).
    """
    truncated = torch.zeros(len(prompts), dtype=torch.bool)
    no_room = torch.zeros_like(truncated)
    ids, built, longest, shown_whole, crowded_by = [], {}, 0, [], set()

    @functools.cache
    def sibling_completion(index: int) -> str:
        return decode(sibling_ids(index))

    for row, sibling in routed:
        key = sibling if one_per_sibling and sibling >= 0 else (sibling, row)  # a group's rows share its context
        if key not in built:
            demonstration = demonstration_from_completion(sibling_completion(sibling)) if sibling >= 0 else None
            try:
                fitted = fit_teacher_prompt(
                    prompts[row],
                    demonstration,
                    functools.partial(tokenize, row=row),
                    budget,
                    feedback=None if feedback is None else feedback[row],
                    context=None if contexts is None else contexts[row],
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
            if contexts is not None and contexts[row]:
                crowded_by.add("privileged context")
            if feedback is not None and feedback[row]:
                crowded_by.add("feedback")
        else:
            truncated[row] = kept < len(demonstration or "")
            ids.append(prompt_ids)
            if not truncated[row]:  # the teacher read the whole demonstration
                shown_whole.append((row, sibling))
    solution_tokens = None
    if completion_ids is not None:
        demonstrations = {key if isinstance(key, int) else key[0]: value[0] for key, value in built.items()}
        solution_tokens = solution_departure_tokens(
            shown_whole, completion_ids, sibling_ids, demonstrations, sibling_completion
        )
    return BatchTeacherPrompts(ids, truncated, no_room, longest, solution_tokens, tuple(sorted(crowded_by)))


def teacher_prompt_budget(setting: int, context: int | None, completion_length: int) -> tuple[int, bool]:
    """The longest teacher prompt of a batch whose completions take `completion_length` tokens: the setting
    (`max_teacher_prompt_length`), or less where the teacher prompt and the completion would pass the model's
    `context`; and whether the context is what limits it (a prompt over it then cannot be scored at all)."""
    if context is None or context - completion_length >= setting:
        return setting, False
    return context - completion_length, True


def privileged_contexts(inputs: list[dict]) -> list[str | None]:
    """Each rollout's `privileged_context` (GRPOTrainer's `inputs` repeat a dataset row per rollout and keep its
    extra columns), None where the row has none (an empty or blank text counts as none)."""
    contexts = [example.get(PRIVILEGED_CONTEXT_COLUMN) for example in inputs]
    for context in contexts:
        if context is not None and not isinstance(context, str):
            raise ValueError(
                f"The dataset column {PRIVILEGED_CONTEXT_COLUMN!r} holds the teacher's privileged context, one text "
                f"(or None) per row; got {type(context).__name__} {context!r:.100}. Convert it to text, or rename "
                "the column if it is not meant for the teacher."
            )
    return [context if context and context.strip() else None for context in contexts]  # blank: no context


def privileged_rollouts(contexts: list[str | None], enabled: bool, accelerator) -> torch.Tensor | None:
    """Which rollouts of the global batch may be distilled from their privileged context alone (`route_rollouts`'
    `privileged`), gathered from every process (a collective); None unless `distill_without_sibling`."""
    if not enabled:
        return None
    present = [context is not None for context in contexts]
    return accelerator.gather(torch.tensor(present, dtype=torch.bool, device=accelerator.device))


def solution_departure(own: list[int], shown: list[int]) -> int | None:
    """The first position where a rollout's tokens `own` leave the tokens `shown`, None where it never does (it is a
    prefix of them, or they of it)."""
    return next((t for t, (a, b) in enumerate(zip(own, shown, strict=False)) if a != b), None)


def solution_departure_tokens(
    routed: list[tuple[int, int]],
    completion_ids: list[list[int]],
    sibling_ids: Callable[[int], list[int]],
    demonstrations: dict[int, str],
    sibling_text: Callable[[int], str],
) -> torch.Tensor:
    """`(rows, longest completion)`: at the position where each routed rollout `(row, sibling)` first leaves the
    completion of the sibling it is shown, that sibling's token there; -1 everywhere else (the teacher's probability
    of these tokens is method §9's `srpo/teacher_solution_prob`).

    The teacher of a routed rollout has read the sibling's answer; where the rollout departs from it, a teacher that
    uses what it read puts the answer's next token first. Only siblings shown whole count (`demonstrations[sibling]`,
    what it was shown as, is its decoded completion `sibling_text(sibling)`): one whose `<think>` blocks were left
    out shows other tokens than it sampled. A rollout that never departs (a prefix of the answer) has no position."""
    tokens = torch.full((len(completion_ids), max(map(len, completion_ids), default=0)), -1, dtype=torch.long)
    for row, sibling in routed:
        if sibling < 0 or demonstrations[sibling] != sibling_text(sibling).strip():
            continue
        shown = sibling_ids(sibling)
        position = solution_departure(completion_ids[row], shown)
        if position is not None:
            tokens[row, position] = shown[position]
    return tokens


def sibling_completions(routes, completion_ids: list[list[int]], local: slice, num_processes: int):
    """`sibling_ids(index)`: the completion of the rollout at global `index`, this process's own (`completion_ids`,
    global rows `local`) or fetched from the process that holds it. Only the demonstrations some process needs from
    another cross (`routing.siblings_to_share`), in one collective when any do (every process agrees whether)."""
    shared = {}
    to_share = siblings_to_share(routes, num_processes) if routes.needs_teacher.any() else []
    if to_share:
        mine = {i: completion_ids[i - local.start] for i in to_share if local.start <= i < local.stop}
        for part in gather_object([mine]):
            shared.update(part)

    def sibling_ids(index: int) -> list[int]:
        return completion_ids[index - local.start] if local.start <= index < local.stop else shared[index]

    return sibling_ids

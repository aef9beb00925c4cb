"""Rule-based reward functions for the SDPO benchmarks, in the signature `GRPOTrainer` expects.

Every reward function has the signature `reward(completions, answer, **kwargs) -> list[float]`: `completions` holds
either plain strings or conversational completions (lists of `{"role", "content"}` messages) and `answer` holds the
gold answer of each completion's prompt (the dataset's `answer` column, which `GRPOTrainer` forwards). They return one
float per completion and never raise on malformed completions or gold answers: a reward that crashes mid-run throws
away the whole generation batch, so anything unreadable scores 0.0 instead. Only a batch whose completions and answers
differ in number raises, since that is a wiring bug rather than a bad sample.
"""

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

# A tool-use answer reduced to what the reward compares: the multiset of called action names and the merge of every
# action input (later keys win, as in the reference code).
ToolCalls = tuple[Counter, dict]


def completion_text(completion: Any) -> str:
    """
    Text of one completion, as the reward functions read it.

    Args:
        completion (`str` or `list[dict]`):
            A plain-text completion, or a conversational one: a list of messages whose assistant `content` is a string
            or a list of `{"type": "text", "text": ...}` parts.

    Returns:
        `str`: The completion itself, or the text of its assistant messages joined by newlines. Anything else (`None`,
        numbers, malformed messages) reads as the empty string.
    """
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, list):
        return ""
    # Only assistant turns are the model's output; tool results interleaved by a tool-calling loop are not.
    return "\n".join(
        _message_text(message)
        for message in completion
        if isinstance(message, dict) and message.get("role") == "assistant"
    )


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal chat formats split the text into typed parts
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return "".join(text for text in texts if isinstance(text, str))
    return ""


def _paired(completions: Sequence, answer: Sequence) -> Iterator[tuple[Any, Any]]:
    # Scoring a shifted pairing would silently train on noise.
    if len(completions) != len(answer):
        raise ValueError(f"Got {len(completions)} completions but {len(answer)} answers; they must pair one to one.")
    return zip(completions, answer, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice (SciKnowEval)
# ---------------------------------------------------------------------------------------------------------------------


def extract_choice(text: str) -> str:
    """
    Chosen option of a multiple-choice completion.

    Args:
        text (`str`):
            Completion text, expected to end with `<answer>X</answer>`.

    Returns:
        `str`: The text after the last `<answer>` and before the next `</answer>`, stripped; the whole stripped text
        when there is no `<answer>` tag.
    """
    after_last_open = text.rsplit("<answer>", 1)[-1]
    return after_last_open.split("</answer>", 1)[0].strip()


def multiple_choice_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float]:
    """
    Reward 1.0 for a completion whose [`extract_choice`] equals the gold option letter, else 0.0.

    Args:
        completions (`Sequence[str]` or `Sequence[list[dict]]`):
            Completions, plain or conversational (see [`completion_text`]).
        answer (`Sequence[str]`):
            Gold option letter of each completion's prompt, e.g. `"B"`.
        **kwargs:
            Other dataset columns and trainer arguments, ignored.

    Returns:
        `list[float]`: One reward per completion.
    """
    return [
        float(isinstance(gold, str) and extract_choice(completion_text(completion)) == gold.strip())
        for completion, gold in _paired(completions, answer)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Tool use (ToolAlpaca)
# ---------------------------------------------------------------------------------------------------------------------

# An `Action:` line names one call; the name is the rest of the line, whatever its characters (ToolAlpaca has names
# like `[Optional]updateUserProfile`).
_ACTION_LINE = re.compile(r"^[ \t]*Action:(.*)$", re.MULTILINE)
# The JSON of an `Action Input:` may start on the same line or the next one.
_ACTION_INPUT_PREFIX = re.compile(r"^[ \t]*Action Input:\s*", re.MULTILINE)
_JSON_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str) -> ToolCalls | None:
    """
    Read the tool calls of a ReAct-style completion (`Action: name` / `Action Input: {json}` lines).

    Each action input is decoded with a real JSON decoder from the `{` on, so nested objects and braces inside strings
    are read correctly, unlike a regular expression.

    Args:
        text (`str`):
            Completion text.

    Returns:
        `tuple[Counter, dict]` or `None`: The multiset of action names and the merge of all action inputs, or `None`
        when some `Action Input:` is not followed by a JSON object. Such a call could not be executed, and accepting it
        would let `Action Input: {oops` pass for any tool whose gold input is empty.
    """
    actions = Counter(match.group(1).strip() for match in _ACTION_LINE.finditer(text))
    arguments = {}
    for match in _ACTION_INPUT_PREFIX.finditer(text):
        try:
            action_input, _ = _JSON_DECODER.raw_decode(text, match.end())
        except (ValueError, RecursionError):  # RecursionError: pathologically deep nesting
            return None
        if not isinstance(action_input, dict):
            return None
        arguments.update(action_input)
    return actions, arguments


def parse_gold_tool_calls(answer: str) -> ToolCalls:
    """
    Read a gold tool-use answer in the SDPO format.

    Args:
        answer (`str`):
            JSON list of `{"Action": name, "Action_Input": json_object_as_string}`, e.g.
            `'[{"Action": "getFacts", "Action_Input": "{\\"limit\\": 3}"}]'`.

    Returns:
        `tuple[Counter, dict]`: The multiset of action names and the merge of all action inputs.

    Raises:
        `ValueError`: If `answer` is not in that format; the message says what is wrong.
    """
    if not isinstance(answer, str):
        raise ValueError(f"expected a JSON string, got {type(answer).__name__}")
    try:
        calls = json.loads(answer)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(calls, list):
        raise ValueError(f"expected a JSON list of calls, got {type(calls).__name__}")
    actions = Counter()
    arguments = {}
    for position, call in enumerate(calls):
        if not (isinstance(call, dict) and all(isinstance(call.get(key), str) for key in ("Action", "Action_Input"))):
            raise ValueError(f"call {position} is not {{'Action': str, 'Action_Input': str}}: {call!r:.200}")
        try:
            action_input = json.loads(call["Action_Input"])
        except (ValueError, RecursionError) as error:
            raise ValueError(f"call {position}: Action_Input is not valid JSON ({error})") from None
        if not isinstance(action_input, dict):
            raise ValueError(f"call {position}: Action_Input is not a JSON object")
        actions[call["Action"]] += 1
        arguments.update(action_input)
    return actions, arguments


def _same_json(a: Any, b: Any) -> bool:
    # `==` except that booleans never equal numbers: Python has `True == 1`, JSON keeps them apart.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b  # JSON has a single number type: 3 and 3.0 are the same value
    return type(a) is type(b) and a == b


def _tool_use_score(text: str, gold: Any) -> float:
    try:
        expected_actions, expected_arguments = parse_gold_tool_calls(gold)
    except ValueError:
        return 0.0
    predicted = parse_tool_calls(text)
    if predicted is None:
        return 0.0
    predicted_actions, predicted_arguments = predicted
    try:
        return float(predicted_actions == expected_actions and _same_json(predicted_arguments, expected_arguments))
    except RecursionError:  # inputs nested deeper than the comparison can walk
        return 0.0


def tool_use_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float]:
    """
    Reward 1.0 for a completion that makes the gold tool calls, else 0.0.

    A completion is correct when the multiset of its `Action:` names equals the gold one and the merge of its
    `Action Input:` objects equals the merge of the gold inputs, with JSON types compared strictly (`"3"` is not `3`,
    `true` is not `1`). See [`parse_tool_calls`] and [`parse_gold_tool_calls`].

    Args:
        completions (`Sequence[str]` or `Sequence[list[dict]]`):
            Completions, plain or conversational (see [`completion_text`]).
        answer (`Sequence[str]`):
            Gold answer of each completion's prompt, in the format [`parse_gold_tool_calls`] reads.
        **kwargs:
            Other dataset columns and trainer arguments, ignored.

    Returns:
        `list[float]`: One reward per completion.
    """
    return [_tool_use_score(completion_text(completion), gold) for completion, gold in _paired(completions, answer)]


# ---------------------------------------------------------------------------------------------------------------------
# Reference behaviour, for comparison only
# ---------------------------------------------------------------------------------------------------------------------

# The SDPO reference's patterns (lasgroup/SDPO, verl/utils/reward_score/feedback/tooluse.py). `\w+` cannot read names
# such as `[Optional]x`, and the lazy `{.*?}` stops at the first `}`, cutting every nested object short.
_REFERENCE_ACTION = re.compile(r"Action:\s*(\w+)")
_REFERENCE_ACTION_INPUT = re.compile(r"Action Input:\s*({.*?})", re.DOTALL)


def _reference_merge(action_inputs: list) -> dict:
    merged = {}
    for action_input in action_inputs:
        try:
            parsed = json.loads(action_input) if isinstance(action_input, str) else action_input
        except (ValueError, RecursionError):
            continue  # the reference drops inputs it cannot decode
        if isinstance(parsed, dict):
            merged.update(parsed)
    return merged


def _reference_tool_use_score(text: str, gold: Any) -> float:
    try:
        calls = json.loads(gold)
        expected_actions = Counter(call["Action"] for call in calls)
        expected_arguments = _reference_merge([call["Action_Input"] for call in calls])
    except (TypeError, ValueError, KeyError, RecursionError):  # the reference would crash; we score 0 instead
        return 0.0
    predicted_actions = Counter(_REFERENCE_ACTION.findall(text))
    predicted_arguments = _reference_merge(_REFERENCE_ACTION_INPUT.findall(text))
    return float(predicted_actions == expected_actions and predicted_arguments == expected_arguments)


def reference_tool_use_reward(completions: Sequence, answer: Sequence, **kwargs) -> list[float]:
    """
    Re-implementation of the SDPO reference tool-use reward, kept only to measure how much its regular expressions
    miss. Train with [`tool_use_reward`] instead.

    It follows the reference's parsing exactly (`Action:\\s*(\\w+)` for names, `Action Input:\\s*({.*?})` for inputs,
    undecodable inputs dropped, Python `==` on the merged inputs), so it scores nested inputs and names outside `\\w`
    as wrong even when they match the gold answer. Unlike the reference, it returns 0.0 instead of raising on a
    malformed gold answer. Like the reference, its lazy pattern takes quadratic time on text with many unclosed
    `Action Input: {`, so keep it away from adversarial or very long completions.

    Args:
        completions (`Sequence[str]` or `Sequence[list[dict]]`):
            Completions, plain or conversational (see [`completion_text`]).
        answer (`Sequence[str]`):
            Gold answer of each completion's prompt, in the SDPO tool-use format.
        **kwargs:
            Ignored.

    Returns:
        `list[float]`: One reward per completion.
    """
    return [
        _reference_tool_use_score(completion_text(completion), gold)
        for completion, gold in _paired(completions, answer)
    ]

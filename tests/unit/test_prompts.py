import pytest

from srpo_trl.prompts import build_teacher_prompt, demonstration_from_completion, elide_middle, fit_teacher_prompt

CLOSING = "\n\nCorrectly solve the original question."


def test_template_replaces_last_user_turn_and_keeps_system():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    teacher = build_teacher_prompt(prompt, "4")
    assert teacher[:3] == prompt[:3]
    assert teacher[3]["content"] == "What is 2+2?\nCorrect solution:\n\n4" + CLOSING
    assert prompt[3]["content"] == "What is 2+2?"  # the student's prompt is untouched


def test_plain_text_prompt():
    assert build_teacher_prompt("Q", "A") == "Q\nCorrect solution:\n\nA" + CLOSING


def test_feedback_goes_between_the_solution_and_the_closing_instruction():
    feedback_block = "\nThe following is feedback from your unsuccessful earlier attempt:\n\nwrong unit"
    assert build_teacher_prompt("Q", "A", "wrong unit") == "Q\nCorrect solution:\n\nA\n" + feedback_block + CLOSING
    assert build_teacher_prompt("Q", "A", "") == build_teacher_prompt("Q", "A", None) == build_teacher_prompt("Q", "A")


def test_bad_prompts_name_the_problem():
    with pytest.raises(ValueError, match=r"no user turn \(roles found: \['system', 'assistant'\]\)"):
        build_teacher_prompt([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "A")
    with pytest.raises(ValueError, match=r"must be a string; got list \(multimodal"):
        build_teacher_prompt([{"role": "user", "content": [{"type": "text", "text": "q"}]}], "A")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\nlong reasoning\n</think>\n\nThe answer is B.", "The answer is B."),
        ("a<think>x</think>b<think>y</think>c", "abc"),
        ("no thinking", "no thinking"),
        ("answer first<think>cut off by the length limit", "answer first"),
    ],
)
def test_demonstration_strips_thinking(completion, expected):
    assert demonstration_from_completion(completion) == expected


def test_elide_middle_keeps_both_ends():
    text = "START" + "x" * 100 + "END"
    short = elide_middle(text, 10)
    assert short.startswith("START") and short.endswith("END") and len(short) < len(text)
    assert elide_middle("short", 10) == "short"


def test_truncation_cuts_only_the_demonstration(char_tokenizer):
    prompt = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "QUESTION?"}]
    demonstration = "BEGIN " + "step " * 200 + " FINAL ANSWER"

    def tokenize(p):
        return char_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]

    full = len(tokenize(build_teacher_prompt(prompt, demonstration)))
    ids, kept = fit_teacher_prompt(prompt, demonstration, tokenize, max_length=full - 300)
    text = char_tokenizer.decode(ids)
    assert 0 < kept < len(demonstration) and full - 300 - 10 <= len(ids) <= full - 300  # as long as fits
    for part in ("SYSTEM", "QUESTION?", "BEGIN", "FINAL ANSWER", "Correctly solve the original question."):
        assert part in text
    assert fit_teacher_prompt(prompt, demonstration, tokenize, max_length=full) == (
        tokenize(build_teacher_prompt(prompt, demonstration)),
        len(demonstration),
    )
    # Feedback is kept whole, like the question: only the demonstration is cut.
    ids, kept = fit_teacher_prompt(prompt, demonstration, tokenize, max_length=full - 300, feedback="FEEDBACK!")
    assert kept < len(demonstration) and len(ids) <= full - 300
    assert "FEEDBACK!" in char_tokenizer.decode(ids) and "FINAL ANSWER" in char_tokenizer.decode(ids)
    # A question longer than the limit is never cut: the demonstration goes, the question stays.
    ids, kept = fit_teacher_prompt(prompt, demonstration, tokenize, max_length=5)
    assert kept == 0 and "QUESTION?" in char_tokenizer.decode(ids) and "BEGIN" not in char_tokenizer.decode(ids)
    assert ids == tokenize(build_teacher_prompt(prompt, ""))

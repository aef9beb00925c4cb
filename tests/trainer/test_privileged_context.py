"""The dataset's `privileged_context` in the teacher prompt, `distill_without_sibling` (all-failed groups distilled
from it), and the teacher-reliability signal `srpo/teacher_solution_prob`."""

import pytest
import torch
from datasets import Dataset
from helpers.tiny_trainer import PROMPTS, first_letter_reward, logged, make_args, make_trainer

import srpo_trl.prompts
from srpo_trl import SRPOConfig, SRPOTrainer
from srpo_trl.prompts import (
    build_teacher_prompt,
    privileged_contexts,
    solution_departure,
    solution_departure_tokens,
)
from srpo_trl.routing import route_rollouts
from srpo_trl.testbed.model import build_tiny_model
from srpo_trl.vocab import Logits, teacher_statistics

CLOSING = "\nCorrectly solve the original question."
CONTEXT = "\nThe following is reference information about the question:\n\n"


def test_context_block_sits_after_the_solution_and_replaces_it_without_a_sibling():
    assert build_teacher_prompt("Q", "A", context="R") == "Q\nCorrect solution:\n\nA\n" + CONTEXT + "R\n" + CLOSING
    assert build_teacher_prompt("Q", None, context="R") == "Q" + CONTEXT + "R\n" + CLOSING
    assert build_teacher_prompt("Q", "A", context="") == build_teacher_prompt("Q", "A")
    feedback = build_teacher_prompt("Q", "A", "F", "R")
    assert feedback.index("R\n") < feedback.index("feedback from your unsuccessful")


def test_privileged_contexts_read_per_rollout_and_refuse_non_text():
    assert privileged_contexts([{"prompt": "q"}, {"prompt": "q", "privileged_context": ""}]) == [None, None]
    assert privileged_contexts([{"privileged_context": "ref"}]) == ["ref"]
    with pytest.raises(ValueError, match="'privileged_context' holds the teacher's privileged context"):
        privileged_contexts([{"privileged_context": 3}])


def test_route_distils_all_failed_groups_with_a_privileged_context():
    # groups of 2: [fail, fail] with context, [fail, fail] without, [fail, correct] with context
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    privileged = torch.tensor([True, True, False, False, True, True])
    routes = route_rollouts(rewards, 2, 1.0, "srpo", privileged=privileged)
    assert routes.distilled.tolist() == [True, True, False, False, True, False]
    assert routes.privileged.tolist() == [True, True, False, False, False, False], "row 4 has a sibling"
    assert routes.sibling.tolist() == [-1, -1, -1, -1, 5, -1]
    assert routes.fallback.tolist() == [False, False, True, True, False, False]
    assert not route_rollouts(rewards, 2, 1.0, "advantage_mix", privileged=privileged).privileged.any()
    assert route_rollouts(rewards, 2, 1.0, "srpo").privileged is None


def test_distill_without_sibling_needs_a_routing_that_distils_failed_rollouts(tmp_path):
    with pytest.raises(ValueError, match="distill_without_sibling must be False unless routing distils"):
        SRPOConfig(str(tmp_path), use_cpu=True, routing="grpo", distill_without_sibling=True)


def never_correct(completions, **kwargs):
    return [0.0] * len(completions)


def contexts_dataset():
    rows = PROMPTS.to_list()
    return Dataset.from_list([dict(row, privileged_context=f"It is spelt {i}.") for i, row in enumerate(rows)])


def recording_fit(monkeypatch, tokenizer) -> list[str]:
    built = []
    fit = srpo_trl.prompts.fit_teacher_prompt

    def record(*args, **kwargs):
        ids, kept = fit(*args, **kwargs)
        built.append(tokenizer.decode(ids))
        return ids, kept

    monkeypatch.setattr(srpo_trl.prompts, "fit_teacher_prompt", record)
    return built


def contexts_trainer(char_tokenizer, tmp_path, reward, **overrides):
    args = make_args(tmp_path, max_steps=1, **overrides)
    return SRPOTrainer(
        model=build_tiny_model(char_tokenizer, seed=0),
        reward_funcs=reward,
        args=args,
        train_dataset=contexts_dataset(),
        processing_class=char_tokenizer,
    )


def test_all_failed_groups_are_distilled_from_their_context(char_tokenizer, tmp_path, monkeypatch):
    built = recording_fit(monkeypatch, char_tokenizer)
    trainer = contexts_trainer(char_tokenizer, tmp_path, never_correct, distill_without_sibling=True)
    trainer.train()
    assert logged(trainer, "srpo/route/privileged_frac") == [1.0]
    assert logged(trainer, "srpo/route/sdpo_frac") == [1.0] and logged(trainer, "srpo/loss/sdpo")[0] != 0
    assert built and all("reference information" in text and "Correct solution" not in text for text in built)


def test_context_is_shown_beside_the_demonstration_and_without_distill_without_sibling(
    char_tokenizer, tmp_path, monkeypatch
):
    built = recording_fit(monkeypatch, char_tokenizer)
    trainer = contexts_trainer(char_tokenizer, tmp_path, first_letter_reward)
    trainer.train()
    assert not logged(trainer, "srpo/route/privileged_frac")
    assert built and all("Correct solution" in text and "It is spelt" in text for text in built)


def test_solution_departure_and_its_tokens():
    assert solution_departure([1, 2, 3], [1, 2, 4, 5]) == 2
    assert solution_departure([1, 2], [1, 2, 3]) is None and solution_departure([7], [8]) == 0
    completions = [[1, 2, 3], [1, 9], [1, 2, 3]]
    texts = {0: "a", 1: "<think>x</think>b", 2: "a"}
    tokens = solution_departure_tokens(
        [(1, 0), (0, 1), (2, 0)],
        completions,
        lambda i: completions[i],
        {0: "a", 1: "b"},
        texts.__getitem__,
    )
    # row 1 departs from row 0 at 1 (token 2); row 0's sibling showed a think-less demonstration; row 2 never departs
    assert tokens.tolist() == [[-1, -1, -1], [-1, 2, -1], [-1, -1, -1]]


def test_statistics_of_two_tokens_per_position_equal_two_calls():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 5, generator=generator), torch.randn(11, 5, generator=generator)
    tokens = torch.randint(11, (7, 2), generator=generator)
    logits = Logits(torch.float32, 1.0)
    _, both, _ = teacher_statistics(hidden, weight, None, logits, tokens)
    for column in range(2):
        _, one, _ = teacher_statistics(hidden, weight, None, logits, tokens[:, column])
        assert torch.allclose(both[:, column], one)


def test_teacher_solution_prob_is_logged(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2)
    trainer.train()
    values = logged(trainer, "srpo/teacher_solution_prob")
    assert values and all(0.0 < value < 1.0 for value in values)


def test_a_context_only_row_without_room_falls_back_instead_of_staying_routed():
    # Before: the row whose context-only prompt had no room stayed distilled, and the scorer paired every later row
    # with the next row's prompt.
    rewards = torch.zeros(4)
    privileged = torch.tensor([True, True, True, True])
    not_shown = torch.tensor([False, True, False, False])
    routes = route_rollouts(rewards, 2, 1.0, "srpo", not_shown=not_shown, privileged=privileged)
    assert routes.distilled.tolist() == [True, False, True, True]
    assert routes.needs_teacher.tolist() == routes.distilled.tolist()
    assert routes.fallback.tolist() == [False, True, False, False]


def test_the_scorer_refuses_rows_and_prompts_that_do_not_pair(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path)
    batch = {"completion_ids": torch.ones(2, 3, dtype=torch.long), "completion_mask": torch.ones(2, 3)}
    with pytest.raises(RuntimeError, match="2 routed rows but 1 teacher prompts"):
        trainer.teacher_scorer.score(batch, batch["completion_mask"].bool(), [0, 1], [[5, 6]], 8, False, True)


def test_contexts_too_long_for_the_model_fall_back_and_are_named(char_tokenizer, tmp_path):
    model = build_tiny_model(char_tokenizer, seed=0)
    model.config.max_position_embeddings = 120
    rows = [dict(row, privileged_context="reference " * 20) for row in PROMPTS.to_list()]
    args = make_args(tmp_path, max_steps=1, distill_without_sibling=True)
    trainer = SRPOTrainer(model, never_correct, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=char_tokenizer)  # fmt: skip
    with pytest.warns(UserWarning, match=r"system turns, privileged context and closing.*shorter privileged context"):
        trainer.train()
    assert logged(trainer, "srpo/route/sdpo_frac") == [0.0] and logged(trainer, "srpo/route/fallback_frac") == [1.0]
    assert logged(trainer, "srpo/teacher_prompt_dropped_frac") == [1.0] and logged(trainer, "srpo/loss/sdpo") == [0.0]


def test_distill_without_sibling_without_contexts_is_refused(char_tokenizer, tmp_path):
    # Before: the option did nothing, and nothing said so; blank contexts counted as contexts.
    args = make_args(tmp_path, max_steps=1, distill_without_sibling=True)

    def build(dataset):
        return SRPOTrainer(build_tiny_model(char_tokenizer, seed=0), never_correct, args=args, train_dataset=dataset,
                           processing_class=char_tokenizer)  # fmt: skip

    with pytest.raises(ValueError, match=r"distill_without_sibling=True .* train_dataset has none \(its columns"):
        build(PROMPTS)
    blank = Dataset.from_list([dict(row, privileged_context=" \n") for row in PROMPTS.to_list()])
    with pytest.raises(ValueError, match=r"every 'privileged_context' of train_dataset is empty or blank"):
        build(blank)
    assert privileged_contexts([{"privileged_context": "  \t"}, {"privileged_context": " ref "}]) == [None, " ref "]

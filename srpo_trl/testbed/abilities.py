"""Measure the two abilities that make the testbed useful for SRPO.

1. Solving held-out problems sometimes but not always: groups of rollouts then mix correct and wrong answers, so
   GRPO has advantages to follow and failed rollouts have correct siblings to learn from.
2. Using a correct solution put in the prompt (the method §3 teacher prompt): then the self-teacher knows
   better than the student, and distilling from it helps.
"""

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .pretrain import collate_completions
from .task import (
    format_completion,
    make_testbed_dataset,
    render_completion,
    render_prompts,
    reward,
    teacher_prompt,
)

# The longest completion is `<answer>1234</answer>` (21 characters) plus EOS; a little slack shows overlong ones.
MAX_COMPLETION_TOKENS = 24


@torch.no_grad()
def measure_testbed_abilities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset | None = None,
    num_samples: int = 8,
    seed: int = 0,
    task: str = "addition",
) -> dict[str, float]:
    """
    Accuracy and likelihood of the right answer, with and without a correct solution in the prompt.

    Every metric is measured on the student prompt (`student/...`) and on the teacher prompt whose demonstration
    is the correct completion (`teacher/...`):

    - `accuracy_greedy`: fraction of problems solved by greedy decoding;
    - `accuracy_sampled`: mean reward of `num_samples` samples per problem at temperature 1 (no top-k/top-p), as
      GRPO rollouts are drawn;
    - `mixed_group_frac`: fraction of problems whose `num_samples` samples hold both a correct and a wrong one;
    - `answer_logprob`: mean log-probability of the correct completion (EOS included).

    Args:
        model (`PreTrainedModel`):
            Causal LM to measure.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer, with a chat template.
        dataset (`Dataset`, *optional*):
            Rows with `prompt` and `answer`; defaults to 200 problems of `task`'s test split.
        num_samples (`int`, *optional*, defaults to `8`):
            Samples per problem at temperature 1 (a GRPO group).
        seed (`int`, *optional*, defaults to `0`):
            Seeds the sampling; the global RNG state is left untouched.
        task (`str`, *optional*, defaults to `"addition"`):
            The task family of the default dataset.

    Returns:
        `dict[str, float]`: the metrics above, keyed `student/<name>` and `teacher/<name>`.
    """
    if dataset is None:
        dataset = make_testbed_dataset(num_train=0, num_test=200, task=task)["test"]
    answers = list(dataset["answer"])
    prompts = {
        "student": list(dataset["prompt"]),
        "teacher": [teacher_prompt(p, format_completion(a)) for p, a in zip(dataset["prompt"], answers, strict=True)],
    }
    was_training = model.training
    model.eval()
    metrics = {}
    for name, conversations in prompts.items():
        prompt_ids = render_prompts(tokenizer, conversations)
        greedy = _generate(model, tokenizer, prompt_ids, num_samples=1, seed=seed)
        sampled = torch.tensor(
            reward(_generate(model, tokenizer, prompt_ids, num_samples, seed), _repeat(answers, num_samples))
        ).view(len(answers), num_samples)
        metrics[f"{name}/accuracy_greedy"] = sum(reward(greedy, answers)) / len(answers)
        metrics[f"{name}/accuracy_sampled"] = sampled.mean().item()
        metrics[f"{name}/mixed_group_frac"] = (
            ((sampled.min(1).values == 0) & (sampled.max(1).values == 1)).float().mean().item()
        )
        metrics[f"{name}/answer_logprob"] = _answer_logprob(model, tokenizer, prompt_ids, answers)
    model.train(was_training)
    return metrics


def _repeat(items: list, times: int) -> list:
    """Each item `times` times in a row, the order of `generate(num_return_sequences=times)`."""
    return [item for item in items for _ in range(times)]


def _left_pad(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(map(len, sequences))
    input_ids = torch.tensor([[pad_token_id] * (length - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    num_samples: int,
    seed: int,
) -> list[str]:
    """Decoded completions: greedy when `num_samples == 1`, else `num_samples` per prompt at temperature 1."""
    inputs = _left_pad(prompt_ids, tokenizer.pad_token_id)
    sampling = (
        {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if num_samples > 1 else {"do_sample": False}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(
            **inputs, max_new_tokens=MAX_COMPLETION_TOKENS, num_return_sequences=num_samples, **sampling
        )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _answer_logprob(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], answers: list[str]
) -> float:
    """Mean over problems of log p(correct completion + EOS | prompt)."""
    completions = [render_completion(tokenizer, answer) for answer in answers]
    batch = collate_completions(list(zip(prompt_ids, completions, strict=True)), tokenizer.pad_token_id)
    logprobs = model(input_ids=batch["input_ids"]).logits[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    token_logprobs = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token_logprobs * (labels != -100)).sum().item() / len(answers)

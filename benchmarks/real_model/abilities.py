"""The real model's abilities on a task family: the student's accuracy (greedy, and sampled at temperature 1 as
rollouts are) and the self-teacher's with a correct solution shown, through the package's own teacher prompt
(`srpo_trl.prompts.build_teacher_prompt`), and the fraction of sampled groups that mix right and wrong answers."""

import tasks
import torch

from srpo_trl.prompts import build_teacher_prompt


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list, k: int, sample: bool, max_new_tokens: int, seed: int) -> list:
    """`k` completions per conversational prompt (greedy when not `sample`), in prompt order, through the chat
    template; the global RNG state is left as it was."""
    rendered = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(rendered, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    options = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=k,
                                pad_token_id=tokenizer.pad_token_id, **options)  # fmt: skip
    model.train(was_training)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def teacher_prompts(dataset) -> list:
    """Each problem's teacher prompt with its correct answer shown as the sibling's solution (method §3)."""
    return [build_teacher_prompt(p, a) for p, a in zip(dataset["prompt"], dataset["answer"], strict=True)]


def measure(model, tokenizer, dataset, k: int = 4, max_new_tokens: int = 12, seed: int = 0, teacher=None) -> dict:
    """`student/...` on the student prompts and `teacher/...` on the teacher prompts (of `teacher`, a model, or the
    student itself): `accuracy_greedy`, `accuracy_sampled` (k samples per problem) and `mixed_group_frac`."""
    answers, kinds = list(dataset["answer"]), list(dataset["kind"])
    out = {}
    for name, prompts, net in (("student", list(dataset["prompt"]), model),
                               ("teacher", teacher_prompts(dataset), teacher or model)):  # fmt: skip
        greedy = generate_texts(net, tokenizer, prompts, 1, False, max_new_tokens, seed)
        sampled = generate_texts(net, tokenizer, prompts, k, True, max_new_tokens, seed)
        rewards = torch.tensor(
            tasks.reward(sampled, [a for a in answers for _ in range(k)], [c for c in kinds for _ in range(k)])
        ).view(-1, k)
        out[f"{name}/accuracy_greedy"] = sum(tasks.reward(greedy, answers, kinds)) / len(answers)
        out[f"{name}/accuracy_sampled"] = rewards.mean().item()
        out[f"{name}/mixed_group_frac"] = (
            ((rewards.min(1).values == 0) & (rewards.max(1).values == 1)).float().mean().item()
        )
    return out

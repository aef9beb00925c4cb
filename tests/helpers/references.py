"""References written out from the method (docs/method.md, float64 on full logits) and from TRL's documented loss
aggregation (Python floats), not from the package's code: what the trainer's distillation terms, losses and
advantages must equal."""

import torch
from helpers.tiny_trainer import make_trainer

from srpo_trl import SRPOTrainer
from srpo_trl.testbed.model import build_tiny_model


def sharp_tiny_model(tokenizer):
    """The tiny model with a 20x LM head: peaked distributions that a teacher prompt visibly moves (the plain
    random model is near uniform, and its distillation terms are too small to tell a wrong computation apart)."""
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def reference_rows(trainer, prompts, batch, routing):
    """For every rollout, its completion's full-vocabulary log-probs `(T, V)` in float64 under the student prompt, and
    under the teacher prompt (method §3) when it has a teacher in `routing` (method §2, §8; else None), from a fresh copy
    of the initial model (the policy and the teacher at step 0). One generation batch on one process, unshuffled,
    groups of 4, rewarded by `first_letter_reward`."""
    tokenizer = trainer.processing_class
    model = sharp_tiny_model(tokenizer).eval()
    mask = batch["completion_mask"].bool()
    texts = [
        tokenizer.decode(i[m], skip_special_tokens=True) for i, m in zip(batch["completion_ids"], mask, strict=True)
    ]
    correct = [text[:1].islower() for text in texts]  # first_letter_reward
    render = dict(add_generation_prompt=True, tokenize=True, enable_thinking=False, return_dict=False)

    def completion_logps(messages, row):
        prompt_ids = tokenizer.apply_chat_template(messages, **render)
        ids = torch.cat([torch.tensor(prompt_ids), batch["completion_ids"][row][mask[row]]])
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, len(prompt_ids) - 1 : -1].double()
        return (logits / trainer.temperature).log_softmax(-1)

    for row in range(len(texts)):
        student = completion_logps(prompts[row], row)
        group = range(row - row % 4, row - row % 4 + 4)
        siblings = [j for j in group if j != row and correct[j]]
        if not siblings or (routing == "srpo" and correct[row]):
            yield row, student, None
            continue
        user = prompts[row][-1]["content"]
        solution = texts[siblings[0]].strip()
        teacher_text = f"{user}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."
        yield row, student, completion_logps([{"role": "user", "content": teacher_text}], row)


def reference_teacher_rows(trainer, prompts, batch, routing):
    return ((row, s, t) for row, s, t in reference_rows(trainer, prompts, batch, routing) if t is not None)


def reference_distillation_terms(trainer, teacher_rows) -> dict[int, torch.Tensor]:
    """method §5's `w_t D_t` per token of each distilled row: top-k + tail JSD, entropy weights over all of them."""
    k, alpha = trainer.args.distillation_topk, trainer.args.distillation_alpha
    divergences, entropies = {}, {}
    for row, student, teacher in teacher_rows:
        support = student.topk(k, dim=-1).indices
        p, q = student.exp().gather(-1, support), teacher.exp().gather(-1, support)
        p, q = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1), torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
        m = (1 - alpha) * p + alpha * q
        divergences[row] = (1 - alpha) * (p * (p / m).log()).sum(-1) + alpha * (q * (q / m).log()).sum(-1)
        entropies[row] = -(teacher.exp() * teacher).sum(-1)
    confidence = {row: torch.exp(-entropy) for row, entropy in entropies.items()}
    count = sum(len(c) for c in confidence.values())
    total = sum(c.sum() for c in confidence.values())
    return {row: confidence[row] * count / total * divergences[row] for row in divergences}


def reference_distillation_loss(trainer, prompts, batch, routing):
    """method §6's distillation sum over all valid tokens (loss_type="dapo")."""
    terms = reference_distillation_terms(trainer, reference_teacher_rows(trainer, prompts, batch, routing))
    return (sum(t.sum() for t in terms.values()) / batch["completion_mask"].sum()).item()


def train_one_step_recording_the_batch(char_tokenizer, tmp_path, monkeypatch, **overrides):
    """Train one step of the sharp tiny model; return the trainer, the prompts and the scored generation batch."""
    recorded = []
    generate_and_score = SRPOTrainer._generate_and_score_completions

    def record(self, inputs):
        batch = generate_and_score(self, inputs)
        recorded.append(([x["prompt"] for x in inputs], {k: v for k, v in batch.items() if torch.is_tensor(v)}))
        return batch

    monkeypatch.setattr(SRPOTrainer, "_generate_and_score_completions", record)
    trainer = make_trainer(
        char_tokenizer, tmp_path, model=sharp_tiny_model(char_tokenizer), max_steps=1, distillation_topk=5, **overrides
    )
    trainer.train()
    ((prompts, batch),) = recorded
    return trainer, prompts, batch


def reference_aggregate(per_token, mask, loss_type, accumulation, max_length, global_count):
    """TRL 1.16's documented aggregation per `loss_type`, written out on Python floats, row by row."""
    rows = [[x for x, m in zip(r, mr, strict=True) if m] for r, mr in zip(per_token, mask, strict=True)]
    total = sum(sum(r) for r in rows)
    tokens = sum(len(r) for r in rows)
    if loss_type in ("grpo", "sapo"):
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows) / accumulation
    if loss_type == "luspo":
        return sum(sum(r) for r in rows) / len(rows) / accumulation
    if loss_type == "bnpo":
        return total / max(tokens, 1) / accumulation
    if loss_type == "dr_grpo":
        return total / (len(rows) * max_length) / accumulation
    return total / global_count

"""The SRPOTrainer the real-model tests train (tests/end_to_end/test_real_model.py, tests/real_vllm/): SmolLM2-135M-
Instruct from `srpo_trl.testbed.real_model` on one-number arithmetic questions under its own chat template, with
rewards fixed by a rollout's place in its batch (`PlacedReward`), so that every step routes, distils and falls back
whatever the model samples. Steps are tiny: 2 prompts x 4 rollouts x 6 tokens."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from srpo_trl import SRPOConfig, SRPOTrainer

GROUP = 4
QUESTIONS = [f"What is {a} + {b}? Answer with one number." for a, b in [(2, 3), (4, 1), (6, 2), (3, 5)]]
PROMPTS = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})
DEFAULT_SYSTEM_TURN = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
# Per batch of two groups: one correct rollout (three distilled from it), then a group that all failed (fallback).
PATTERN = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


class PlacedReward:
    """Rewards by place in the batch (`PATTERN`); remembers the completions it saw."""

    __name__ = "placed_reward"

    def __init__(self):
        self.completions = []

    def __call__(self, completions, **kwargs):
        self.completions.append([c[0]["content"] for c in completions])
        return [PATTERN[i % len(PATTERN)] for i in range(len(completions))]


def real_trainer(
    model_dir, tokenizer, tmp_path, dtype=torch.float32, reward=None, peft_config=None, callbacks=None, **overrides
):
    torch.manual_seed(0)
    settings = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2 * GROUP,
        num_generations=GROUP,
        max_completion_length=6,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        learning_rate=1e-4,
        teacher_update_rate=0.3,
        max_teacher_prompt_length=1024,  # within the model's 8,192-token context
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        reward_funcs=reward or PlacedReward(),
        args=SRPOConfig(**settings),
        train_dataset=PROMPTS,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )

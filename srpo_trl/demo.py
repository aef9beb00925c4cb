"""`make demo` / `python -m srpo_trl.demo`: SRPO on CPU in a few minutes, routing visible step by step.

A tiny Qwen3-shaped model, pre-trained here on generated two-digit arithmetic (cached after the first run), is
post-trained with SRPO. Each step prints the reward, where the rollouts went (GRPO as correct or as fallback, or
self-distillation) and each branch's share of the loss; held-out accuracy is measured before and after.
"""

import argparse
import time

import torch
from transformers import PrinterCallback, TrainerCallback

from . import SRPOConfig, SRPOTrainer
from .evaluation import avg_at_k
from .testbed.pretrain import PretrainConfig, config_hash, default_cache_dir, pretrained_testbed_model
from .testbed.task import make_testbed_dataset, reward

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="SRPO optimizer steps")
    parser.add_argument("--routing", default="srpo", help="srpo | grpo | sdpo | advantage_mix")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models are fastest (and steadiest) on one thread

    started = time.monotonic()
    print(loading_message(), flush=True)
    model, tokenizer = pretrained_testbed_model()
    print(f"  ready ({time.monotonic() - started:.0f} s)", flush=True)
    data = make_testbed_dataset(num_train=1000, num_test=100, seed=args.seed)
    config = SRPOConfig(
        output_dir=args.output_dir,
        routing=args.routing,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=64,  # 8 prompts x 8 rollouts
        num_generations=8,
        max_completion_length=24,
        learning_rate=2e-4,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        distillation_topk=16,
        chat_template_kwargs={"enable_thinking": False},
        seed=args.seed,
    )
    trainer = SRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=data["train"], processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)  # the table below replaces Trainer's raw log dicts
    trainer.add_callback(RoutingTable())

    def held_out_accuracy() -> float:
        return avg_at_k(
            trainer.model,
            tokenizer,
            data["test"],
            [reward],
            k=4,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=24,
            batch_size=50,
            chat_template_kwargs=config.chat_template_kwargs,
            success_reward_threshold=config.success_reward_threshold,  # correct as training counts it
        )

    torch.manual_seed(args.seed)
    before = held_out_accuracy()
    print(f"held-out accuracy (avg@4, T=1) before: {before:.3f}\n", flush=True)
    trainer.train()
    after = held_out_accuracy()
    print(f"\nheld-out accuracy (avg@4, T=1): {before:.3f} -> {after:.3f}   ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

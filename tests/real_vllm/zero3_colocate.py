"""SRPO under DeepSpeed ZeRO-3 on 2 processes, each with its own colocated vLLM CPU engine, as the paper's launch
does on 8 GPUs. Launched by `test_real_engine.py` with `torchrun --nproc_per_node=2`; writes, from rank 0, every
process's engine-policy gaps around each weight sync and the log history to `--output_dir`/result.json."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/: the shared helpers

torch.set_num_threads(1)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_dir", required=True)
    args = parser.parse_args()

    from accelerate.utils import gather_object
    from engine_probe import record_syncs
    from helpers.tiny_trainer import PROMPTS, first_letter_reward, make_args  # the main suite's settings, reward

    from srpo_trl import SRPOTrainer
    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    config = make_args(
        args.output_dir,
        ddp_backend="gloo",
        deepspeed={
            # A threshold below the tiny model's matrices, so ZeRO-3 really shards them (as tests/distributed does)
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
        },
        per_device_train_batch_size=4,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=False,
        vllm_max_model_length=128,
    )
    trainer = SRPOTrainer(
        model=args.model_dir,
        reward_funcs=first_letter_reward,
        args=config,
        train_dataset=PROMPTS,
        processing_class=build_char_tokenizer(),
    )
    assert trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    gaps = record_syncs(trainer)
    trainer.train()
    sharded = any(weight.numel() == 0 for _, weight in trainer.teacher._teacher_weights())
    every_gap = gather_object([{"gaps": gaps, "sharded": sharded, "engine": type(trainer.vllm_generation).__name__}])
    if trainer.accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump({"processes": every_gap, "log": trainer.state.log_history}, f)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()

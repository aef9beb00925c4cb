"""One tiny SRPO run that ends with the same weights however it is launched: 1 process, or 2 processes with DDP,
DeepSpeed ZeRO-2 or ZeRO-3. `tests/end_to_end/test_distributed.py` launches it (with `torchrun` and `DS_ACCELERATOR=cpu`).

What makes process splits comparable: greedy decoding, a reward that depends on the rollout's place in the global
batch (so routing is the same, with groups on both processes and a process that has no routed rows at all), SGD,
and 16 rollouts (4 prompts x 4) per optimizer step in every layout. Rank 0 writes the final policy and teacher weights
(whole, fp32) and the log history to `--output_dir`.
"""

import argparse
import json
import os
import sys

import torch
from transformers import TrainerCallback

torch.set_num_threads(1)

# Groups of 4 in the global batch: all correct, all failed, one correct, three correct (shifted by 4 every step)
PATTERN = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1]
# avg@k's test rows (`--avg_at_k`): over 2 processes, rows 0, 2, 4 (labels 1, 0, 1) and rows 1, 3 (0, 0)
AVG_AT_K_LABELS = [1, 0, 0, 0, 1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--backend", choices=["none", "ddp", "zero2", "zero3", "fsdp2"], default="none")
    parser.add_argument("--world_size", type=int, default=1, help="how many processes the launcher must have started")
    parser.add_argument(
        "--accelerate",
        action="store_true",
        help="launched by `accelerate launch --config_file`, which sets up DDP/DeepSpeed",
    )
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    parser.add_argument("--resume_from_checkpoint", default=None)
    parser.add_argument(
        "--save_start", action="store_true", help="also write the weights training begins with (after a resume)"
    )
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (the teacher is a second adapter)")
    parser.add_argument("--from_path", action="store_true", help="pass the model as a saved path, not an object")
    parser.add_argument(
        "--steps_per_generation", type=int, default=None, help="default: one optimizer step per generation batch"
    )
    parser.add_argument("--num_generations", type=int, default=4, help="16: one group over both processes")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and compute, as the shipped recipes")
    parser.add_argument("--teacher_model_kind", default="ema", help="SRPOConfig.teacher_model_kind")
    parser.add_argument(
        "--identical_teacher",
        action="store_true",
        help="attention outputs zeroed: a teacher prompt then changes nothing, and at step 1 the teacher is the student",
    )
    parser.add_argument(
        "--cast_lm_head_to_fp32", action="store_true", help="TRL's fp32 LM head (a patched `lm_head.forward`)"
    )
    parser.add_argument(
        "--avg_at_k",
        action="store_true",
        help="evaluate avg@2 after the last step on AVG_AT_K_LABELS' 5 test rows (the reward: each row's label)",
    )
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import save_file

    import srpo_trl.prompts
    from srpo_trl import SRPOConfig, SRPOTrainer
    from srpo_trl.testbed.model import build_tiny_model
    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    deepspeed = None
    if args.backend.startswith("zero") and not args.accelerate:
        deepspeed = {
            # A threshold below the tiny model's matrices, so ZeRO-3 really shards them (small norms stay whole)
            "zero_optimization": {"stage": int(args.backend[-1]), "stage3_param_persistence_threshold": 100},
            "zero_allow_untested_optimizer": True,  # SGD
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
        }
    fsdp = {}
    if args.backend == "fsdp2":
        allow_fsdp_on_cpu()
        layers = ["Qwen3DecoderLayer"]
        # Sharded checkpoints: torch 2.13 loads a full optimizer state dict only onto an accelerator device
        state_dict_type = "SHARDED_STATE_DICT"
        fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": layers, "state_dict_type": state_dict_type}
        fsdp = dict(fsdp=True, fsdp_config=fsdp_config)
    config = SRPOConfig(
        **fsdp,
        output_dir=args.output_dir,
        report_to=[],
        use_cpu=True,  # also under DeepSpeed (with DS_ACCELERATOR=cpu): Accelerate then counts every process
        ddp_backend="gloo" if args.world_size > 1 else None,
        deepspeed=deepspeed,
        bf16=args.bf16,
        cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
        per_device_train_batch_size=8 // args.world_size,
        gradient_accumulation_steps=2,
        steps_per_generation=args.steps_per_generation,
        num_generations=args.num_generations,
        max_completion_length=6,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=0,
        data_seed=0,
        optim="sgd",
        learning_rate=0.02,
        lr_scheduler_type="constant",
        teacher_update_rate=0.5,
        teacher_model_kind=args.teacher_model_kind,
        distillation_topk=8,
        generation_kwargs={"do_sample": False},
        chat_template_kwargs={"enable_thinking": False},
        disable_tqdm=True,
    )
    state = config.distributed_state
    assert state.num_processes == args.world_size, f"{state.num_processes} processes, expected {args.world_size}"

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():  # peaked next-token distributions: the teacher differs visibly from the student
        model.lm_head.weight.mul_(40.0)
        for name, weight in model.named_parameters():
            if args.identical_teacher and "o_proj" in name:
                weight.zero_()
    if args.bf16:
        model.to(torch.bfloat16)
    if args.from_path:  # loaded by GRPOTrainer itself (under ZeRO-3: partitioned as it loads)
        path = os.path.join(args.output_dir, "initial_model")
        if state.is_main_process:
            model.save_pretrained(path)
        state.wait_for_everyone()
        model = path

    def global_index_reward(completions, label=None, **kwargs):
        if label is not None:  # avg@k's test rows: the row's own label, whatever was sampled
            return [float(value) for value in label]
        start = state.process_index * len(completions) + 4 * trainer.state.global_step
        return [float(PATTERN[(start + i) % len(PATTERN)]) for i in range(len(completions))]

    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Spell {c}"}] for c in "abcdefghijklmnop"]})
    callbacks = []
    if args.avg_at_k:
        from srpo_trl.evaluation import BestWithinBudgetsCallback

        test_rows = {
            "prompt": [[{"role": "user", "content": f"Spell {c}"}] for c in "vwxyz"],
            "label": AVG_AT_K_LABELS,
        }
        test = Dataset.from_dict(test_rows)
        callbacks.append(
            BestWithinBudgetsCallback(test, eval_steps=args.max_steps, k=2, batch_size=2, max_new_tokens=4)
        )
    trainer = SRPOTrainer(
        model=model,
        reward_funcs=global_index_reward,
        args=config,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if args.lora else None,
        callbacks=callbacks,
    )
    if args.backend.startswith("zero"):
        assert trainer.accelerator.state.deepspeed_plugin.zero_stage == int(args.backend[-1])
    exchanged = []  # how many completions crossed processes for the teacher prompts, per exchange
    gather = srpo_trl.prompts.gather_object  # the teacher prompts' exchange of demonstrations

    def counting_gather(objects):
        gathered = gather(objects)
        exchanged.append(sum(len(part) for part in gathered))
        return gathered

    srpo_trl.prompts.gather_object = counting_gather
    head_calls = []  # the sizes of the teacher's LM head weight seen by its module calls (gathered: its whole size)
    if not args.lora:  # the teacher is its own model, whose head only the teacher's passes could call
        teacher_head = trainer.teacher.model.get_output_embeddings()
        teacher_head.register_forward_pre_hook(lambda module, inputs: head_calls.append(module.weight.numel()))
    if args.save_start:
        trainer.add_callback(SaveWeightsAtTrainBegin(trainer, args.output_dir))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if deepspeed and args.backend == "zero3" and trainer.teacher.owns_weights:  # the teacher really is sharded
        assert any(weight.numel() == 0 for _, weight in trainer.teacher._teacher_weights())
    if args.backend == "fsdp2":  # likewise: FSDP2 DTensors, this process holding half of each
        from torch.distributed.tensor import DTensor

        assert all(isinstance(weight, DTensor) for _, weight in trainer.teacher._teacher_weights())

    policy = whole_weights(trainer.accelerator.unwrap_model(trainer.model))
    teacher = {name: policy[name] for name in trainer.teacher.weight_names()} if args.lora else None
    teacher = teacher or whole_weights(trainer.teacher.model)
    if state.is_main_process:
        save_file(policy, os.path.join(args.output_dir, "policy.safetensors"))
        save_file(teacher, os.path.join(args.output_dir, "teacher.safetensors"))
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        with open(os.path.join(args.output_dir, "exchanged.json"), "w") as f:
            json.dump(exchanged, f)
        with open(os.path.join(args.output_dir, "teacher_head_calls.json"), "w") as f:
            json.dump(head_calls, f)
    state.wait_for_everyone()
    # Everything is written: leave without the interpreter's teardown, where the native threads of gloo / DeepSpeed's
    # CPU communication op sometimes abort a run that succeeded ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class SaveWeightsAtTrainBegin(TrainerCallback):
    """Writes the policy's and the teacher's whole weights as training begins, after a resume loaded them, to
    `start_policy.safetensors` and `start_teacher.safetensors`."""

    def __init__(self, trainer, output_dir: str):
        self.trainer, self.output_dir = trainer, output_dir

    def on_train_begin(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        policy = whole_weights(self.trainer.accelerator.unwrap_model(self.trainer.model))  # collective under ZeRO-3
        teacher = whole_weights(self.trainer.teacher.model)
        if state.is_world_process_zero:
            save_file(policy, os.path.join(self.output_dir, "start_policy.safetensors"))
            save_file(teacher, os.path.join(self.output_dir, "start_teacher.safetensors"))


def whole_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered one at a time when ZeRO-3 sharded it, or FSDP2), as fp32 on CPU."""
    import deepspeed
    from torch.distributed.tensor import DTensor

    weights = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            weights[name] = whole.detach().float().cpu().clone()
    return weights


def allow_fsdp_on_cpu():
    """Accelerate 1.15 turns FSDP on for accelerator devices only: CPU processes stay MULTI_CPU and the FSDP plugin is
    dropped. FSDP2 itself (`fully_shard`, `DTensor` weights, gloo collectives) runs on CPU, so for this test a CPU
    state given an FSDP plugin takes Accelerate's FSDP branch, with the mixed-precision policy that branch sets (bf16
    compute over fp32 master weights, as `accelerate_configs/fsdp2.yaml` runs on GPUs); nothing else is changed."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def take_the_fsdp_branch(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = state.PartialState().distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs["fsdp_plugin"]
            if self._mixed_precision != "no":
                self.fsdp_plugin.set_mixed_precision(self._mixed_precision)

    state.AcceleratorState.__init__ = take_the_fsdp_branch


if __name__ == "__main__":
    main()

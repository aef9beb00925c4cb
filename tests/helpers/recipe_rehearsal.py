"""A CPU rehearsal of the shipped 8-GPU recipe: `accelerate launch examples/train_chemistry.py --config
recipes/qwen3_8b/<recipe>.yaml`, the recipe as is, under ZeRO-3, with only what a CPU forces overridden.

What a CPU forces (`CPU_OVERRIDES`): a local tiny Qwen3-shaped model in place of Qwen3-8B, local data, 2 processes
with the CPU twin of the ZeRO-3 accelerate config, `use_cpu`, short lengths, a few steps, an evaluation and checkpoints
within them, a small evaluation. Everything else — bf16 weights and autocast, gradient checkpointing, batch layout,
learning rate and schedule, SRPO's settings, `save_total_limit`, trackio logging — is the recipe's.

The model answers multiple-choice questions with one letter (`answering_tiny_model`), right 25-50% of the time, so
groups mix correct and failed rollouts and SRPO routes, as Qwen3 would.
"""

import json
import os
import subprocess
from pathlib import Path

import torch
from helpers.launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[2]
CPU_ZERO3 = ROOT / "accelerate_configs" / "cpu_zero3.yaml"


def answering_tiny_model(tokenizer, hidden_size=64, num_heads=2, num_layers=2, vocab_size: int | None = None):
    """A Qwen3 (tiny by default) that, after the generation prompt (which ends in a newline), samples one of A-D and
    ends its turn: a bigram model carried by the embeddings and the LM head, the layers scaled down to a small
    perturbation (so a teacher prompt still moves the distribution a little). `vocab_size` pads the vocabulary (to a
    real model's LM-head cost) with rows it practically never samples."""
    from srpo_trl.testbed.model import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seed=0)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    # the recipes' vllm_max_model_length: a vLLM engine refuses a context longer than the model's (characters here)
    model.config.max_position_embeddings = 10240
    newline, letters = tokenizer.convert_tokens_to_ids("\n"), tokenizer.convert_tokens_to_ids(list("ABCD"))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.mul_(0.1)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed.mul_(0.05)
        embed[newline] = 0.0
        embed[newline, 0] = 1.0  # direction 0: "an answer comes next"
        embed[letters] = 0.0
        embed[letters, 1] = 1.0  # direction 1: "the answer was given"
        head.mul_(0.05)
        head[letters, 0] = 3.0
        head[tokenizer.eos_token_id, 1] = 3.0
    return model


def cpu_overrides(model_dir: str, data_dir: str, output_dir: str) -> list[str]:
    return [
        f"--model_name_or_path={model_dir}",
        f"--data_path={data_dir}",
        f"--output_dir={output_dir}",
        "--use_cpu=true",
        "--max_train_samples=64",
        "--max_eval_samples=4",
        "--max_completion_length=16",
        "--max_steps=3",
        "--eval_every_steps=3",
        "--eval_k=2",
        "--eval_max_new_tokens=8",
        "--save_steps=1",
    ]


TEARDOWN_ABORT = "terminate called without an active exception"


def rehearse(recipe: str, model_dir: str, data_dir: str, output_dir: Path, *extra: str, env: dict | None = None):
    """Launch the example with the recipe and the CPU overrides (plus `extra`); return the final checkpoint's log
    history. Fails with the run's output when the launch fails."""
    command = accelerate_launch(CPU_ZERO3)
    command += [str(ROOT / "examples" / "train_chemistry.py"), "--config", str(ROOT / "recipes" / "qwen3_8b" / recipe)]
    command += [*cpu_overrides(model_dir, data_dir, str(output_dir)), *extra]
    environment = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRACKIO_DIR": str(output_dir / "trackio"),
        **(env or {}),
    }
    result = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=1200, cwd=output_dir.parent
    )
    finished = any(output_dir.glob("*.safetensors"))  # `save_model`, after training, on every process's way out
    # DeepSpeed's CPU communication op sometimes aborts a process at interpreter exit, after the run has trained and
    # saved (a native thread still joinable at teardown); the run itself succeeded. Anything else is a failure.
    aborted_at_exit = finished and TEARDOWN_ABORT in result.stderr
    assert result.returncode == 0 or aborted_at_exit, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    last = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())["log_history"]

"""Multi-process SRPO on CPU: 2 processes with DDP, DeepSpeed ZeRO-2 and ZeRO-3 end with the single-process weights
(policy and teacher), LoRA included, bf16 steps under ZeRO-3 and FSDP2 compute the single-process objective, and
ZeRO-3 and FSDP2 runs resume exactly from their sharded checkpoints, and avg@k over both processes scores each test
row once. `make test-distributed` runs this file (not `make test`: about 30 launches of 2 processes); CI runs both.

Each case launches `tests/distributed/train_tiny.py` (with `torchrun --standalone`, or `accelerate launch` and a config
of `accelerate_configs/`; gloo, `DS_ACCELERATOR=cpu`); the script asserts that the launcher really started the
processes (`accelerate launch --cpu --num_processes 2`, or a MULTI_CPU config, starts only one). The first DeepSpeed run on a machine compiles a small
communication op (about 45 s, cached under ~/.cache/torch_extensions).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.launch import accelerate_launch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[1] / "distributed" / "train_tiny.py"
CONFIGS = Path(__file__).parents[2] / "accelerate_configs"


def run_script(output_dir: Path, backend: str = "none", *options: str, accelerate_config: str | None = None):
    """Run the tiny SRPO script on 1 process (backend "none") or 2, with `torchrun`, or with `accelerate launch` and
    one of the repository's `accelerate_configs/`."""
    command = [sys.executable]
    if accelerate_config is not None:
        command = accelerate_launch(CONFIGS / accelerate_config)
        options += ("--accelerate",)
    elif backend != "none":
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(SCRIPT), f"--output_dir={output_dir}", f"--backend={backend}"]
    command += [f"--world_size={1 if backend == 'none' else 2}", *options]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def launch(output_dir: Path, backend: str = "none", *options: str, accelerate_config: str | None = None) -> dict:
    """`run_script`, which must succeed; the final weights and the log history."""
    result = run_script(output_dir, backend, *options, accelerate_config=accelerate_config)
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return {
        "policy": load_file(output_dir / "policy.safetensors"),
        "teacher": load_file(output_dir / "teacher.safetensors"),
        "log": [entry for entry in json.loads((output_dir / "log_history.json").read_text()) if "loss" in entry],
        "exchanged": json.loads((output_dir / "exchanged.json").read_text()),
        "teacher_head_calls": json.loads((output_dir / "teacher_head_calls.json").read_text()),
    }


def assert_same_run(ours: dict, reference: dict, atol: float = 1e-6) -> None:
    for kind in ("policy", "teacher"):
        assert ours[kind].keys() == reference[kind].keys(), kind
        for name, value in ours[kind].items():
            torch.testing.assert_close(value, reference[kind][name], atol=atol, rtol=0, msg=f"{kind} {name}")
    assert len(ours["log"]) == len(reference["log"]) > 0
    for entry, expected in zip(ours["log"], reference["log"], strict=True):
        for key in ("loss", "srpo/loss/grpo", "srpo/loss/sdpo", "srpo/route/sdpo_frac", "reward"):
            if key in expected or key in entry:  # generation metrics: only on steps that generate
                assert entry[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The 1-process run with these options, launched once for the module: several 2-process cases compare with it."""
    runs = {}

    def run(*options: str) -> dict:
        if options not in runs:
            runs[options] = launch(tmp_path_factory.mktemp("single"), "none", *options)
        return runs[options]

    return run


@pytest.fixture(scope="module")
def single_process(single_process_run):
    return single_process_run()


@pytest.mark.parametrize(
    ("backend", "accelerate_config"),
    [("ddp", None), ("zero2", "cpu_zero2.yaml"), ("zero3", None), ("fsdp2", None)],
    ids=["ddp-torchrun", "zero2-accelerate", "zero3-torchrun", "fsdp2-torchrun"],
)
def test_two_processes_end_with_the_single_process_weights(single_process, tmp_path, backend, accelerate_config):
    # ZeRO-3 by torchrun: the script's own DeepSpeed config shards even this tiny model's small matrices.
    assert single_process["log"][0]["srpo/loss/sdpo"] > 0.01, "the distillation term must weigh in the comparison"
    assert_same_run(launch(tmp_path, backend, accelerate_config=accelerate_config), single_process)


@pytest.fixture(scope="module")
def single_process_bf16(single_process_run):
    return single_process_run("--bf16", "--max_steps=1")


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_bf16_sharded_step_computes_the_single_process_objective(single_process_bf16, tmp_path, backend):
    # The shipped recipes' precision (bf16 weights, bf16=True; under FSDP2 Accelerate's bf16 compute over fp32 master
    # weights): the first step's routing, teacher statistics and both branches' losses are those of one process. Later
    # steps are not compared: one process updates bf16 weights in place, the sharded engines fp32 masters.
    ours = launch(tmp_path, backend, "--bf16", "--max_steps=1")
    expected = single_process_bf16["log"][0]
    assert expected["srpo/loss/sdpo"] > 0.01
    for key in ("loss", "srpo/loss/grpo", "srpo/loss/sdpo", "srpo/route/sdpo_frac", "srpo/teacher_entropy/mean"):
        assert ours["log"][0][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_bf16_sharded_identical_teacher_distils_nothing(tmp_path, backend):
    # Step 1 with attention zeroed: the teacher is the student, so the distillation term must vanish. Under FSDP2 it was
    # 4.3e-6 while the CPU test ran without Accelerate's mixed-precision policy (an fp32 student against a bf16
    # teacher); one process and ZeRO-3 give 4e-10.
    ours = launch(tmp_path, backend, "--bf16", "--identical_teacher", "--max_steps=1")
    assert ours["log"][0]["srpo/route/sdpo_frac"] > 0
    assert abs(ours["log"][0]["srpo/loss/sdpo"]) <= 1e-6


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_fp32_lm_head_under_sharding_is_the_teachers_own(single_process_run, tmp_path, backend):
    # TRL's cast_lm_head_to_fp32 patches `lm_head.forward` with a closure over the policy's head: the teacher's copy
    # called the policy's head, and its prefix pass failed on the policy's shards ("size mismatch, got input (0)").
    options = ("--cast_lm_head_to_fp32", "--max_steps=1")
    reference = single_process_run(*options)
    assert reference["log"][0]["srpo/loss/sdpo"] > 0.01
    ours = launch(tmp_path / backend, backend, *options)
    assert_same_run(ours, reference)
    # The teacher's passes project no logits and never call its head's module, which under ZeRO-3 gathered the whole
    # head (all 6528 weights here) from both processes for each pass (before: 2 per process in this one step).
    assert ours["teacher_head_calls"] == reference["teacher_head_calls"] == []


def test_groups_over_two_processes_move_only_the_demonstrations_they_need(single_process_run, tmp_path):
    # One group of 16 over both processes: the failed rollouts of one process are taught by a correct sibling on the
    # other. Only that sibling's completion crosses (before: every process received all 16 completions).
    options = ("--num_generations=16",)
    reference = single_process_run(*options)
    ours = launch(tmp_path / "ddp", "ddp", *options)
    assert reference["log"][0]["srpo/loss/sdpo"] > 0.01
    assert_same_run(ours, reference)
    assert reference["exchanged"] == []  # one process: nothing to exchange
    assert ours["exchanged"] and all(count == 1 for count in ours["exchanged"]), ours["exchanged"]


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_avg_at_k_over_two_processes_scores_each_test_row_once(tmp_path, backend):
    # 5 test rows, 2 at a time: one process scores rows 0, 2, 4 (its last batch padded with a copy), the other rows
    # 1, 3 (its last batch empty, padded with a test row) in GRPOTrainer's reward call, which gathers every process's
    # scores. The reward is the row's label, so avg@2 is the labels' mean exactly when each process keeps its own
    # scores and counts none of the padding.
    launch(tmp_path, backend, "--avg_at_k", "--max_steps=1")
    log = json.loads((tmp_path / "log_history.json").read_text())
    (evaluation,) = [row for row in log if "eval_avg@2" in row]
    assert evaluation["eval_avg@2"] == evaluation["eval_mean_reward@2"] == pytest.approx(0.4)


def test_two_optimizer_steps_per_generation_under_zero3(tmp_path):
    # The EMA moves the sharded teacher between the two steps: the second one distils with the LM head the teacher
    # scored with, copied (gathered) at scoring time on every process. Compared with DDP on 2 processes, which
    # splits the generation batch into the same optimizer steps (one process would group the rows differently).
    options = ("--steps_per_generation=4",)
    reference = launch(tmp_path / "ddp", "ddp", *options)
    assert reference["log"][1]["srpo/loss/sdpo"] > 0.01
    assert_same_run(launch(tmp_path / "zero3", "zero3", *options), reference)


def test_lora_under_zero3_ends_with_the_single_process_weights(single_process_run, tmp_path):
    reference = single_process_run("--lora")
    assert all(".srpo_teacher." in name for name in reference["teacher"])
    assert_same_run(launch(tmp_path / "zero3", "zero3", "--lora"), reference)


def test_lora_under_fsdp2_ends_with_the_single_process_weights(single_process_run, tmp_path):
    reference = single_process_run("--lora")
    assert_same_run(launch(tmp_path / "fsdp2", "fsdp2", "--lora"), reference)


def test_fsdp2_resume_restores_the_sharded_teacher_exactly(tmp_path):
    options = ("--max_steps=4",)
    straight = launch(tmp_path / "straight", "fsdp2", *options, "--save_steps=2")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.glob("srpo_teacher*")) == [
        "srpo_teacher-rank0-of-2.safetensors",
        "srpo_teacher-rank1-of-2.safetensors",
    ]
    resumed = launch(tmp_path / "resumed", "fsdp2", *options, f"--resume_from_checkpoint={checkpoint}")
    assert_same_run(resumed, straight, atol=0.0)


ZERO3_RESUME = ("--from_path", "--max_steps=4")


@pytest.fixture(scope="module")
def zero3_checkpointed(tmp_path_factory):
    """A ZeRO-3 run launched as documented (accelerate_configs/cpu_zero3.yaml), with the model given as a path:
    GRPOTrainer then loads the policy already partitioned (zero.Init), and the teacher is built as its partitioned
    twin. It checkpoints at step 2."""
    folder = tmp_path_factory.mktemp("zero3-straight")
    run = launch(folder, "zero3", *ZERO3_RESUME, "--save_steps=2", accelerate_config="cpu_zero3.yaml")
    return run, folder / "checkpoint-2"


def test_zero3_resume_restores_the_sharded_teacher_exactly(tmp_path, zero3_checkpointed):
    straight, checkpoint = zero3_checkpointed
    assert sorted(path.name for path in checkpoint.glob("srpo_teacher*")) == [
        "srpo_teacher-rank0-of-2.safetensors",
        "srpo_teacher-rank1-of-2.safetensors",
    ]
    resume = f"--resume_from_checkpoint={checkpoint}"
    resumed = launch(tmp_path / "resumed", "zero3", *ZERO3_RESUME, resume, accelerate_config="cpu_zero3.yaml")
    assert_same_run(resumed, straight, atol=0.0)
    assert [entry["loss"] for entry in resumed["log"]] == [entry["loss"] for entry in straight["log"]]


def test_zero3_resume_without_teacher_shards_restarts_the_teacher_from_the_policy(tmp_path, zero3_checkpointed):
    _, saved = zero3_checkpointed
    # One process's shard missing: an error on every process, naming it (not a hang, not a silent restart).
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(saved, checkpoint)
    (checkpoint / "srpo_teacher-rank1-of-2.safetensors").unlink()
    resume = f"--resume_from_checkpoint={checkpoint}"
    failed = run_script(tmp_path / "partial", "zero3", *ZERO3_RESUME, resume, accelerate_config="cpu_zero3.yaml")
    assert failed.returncode != 0 and "lacks the SRPO teacher shards of processes [1]" in failed.stderr
    # None at all: every process restarts its shards of the teacher from the resumed policy's.
    (checkpoint / "srpo_teacher-rank0-of-2.safetensors").unlink()
    options = (*ZERO3_RESUME, resume, "--save_start")
    launch(tmp_path / "restarted", "zero3", *options, accelerate_config="cpu_zero3.yaml")
    policy = load_file(tmp_path / "restarted" / "start_policy.safetensors")
    teacher = load_file(tmp_path / "restarted" / "start_teacher.safetensors")
    assert policy.keys() == teacher.keys()
    for name, value in teacher.items():
        assert torch.equal(value, policy[name]), name


# Teacher kinds (method §4): the same policy and teacher as one process, and a ZeRO-3 and an FSDP2 resume of a kind
# rebuilt from the initial weights. `base` is `trust_region`'s layout (a copy of the initial weights) without its
# update, so the two sharded layouts are `live` (no copy) and `trust_region` (the resume test's straight runs).
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_sharded_live_teacher_ends_with_the_single_process_weights(single_process_run, tmp_path, backend):
    option = "--teacher_model_kind=live"
    reference = single_process_run(option)
    assert reference["log"][0]["srpo/loss/sdpo"] > 0.01, "the distillation term must weigh in the comparison"
    assert_same_run(launch(tmp_path / backend, backend, option), reference)


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_sharded_trust_region_teacher_ends_with_the_single_process_weights_and_resumes_exactly(
    single_process_run, tmp_path, backend
):
    # The policy is already the resumed one when the teacher is sharded: the teacher must keep its initial weights.
    # ZeRO-3 as documented: the model given as a path, loaded partitioned (zero.Init), the teacher its twin.
    zero3 = backend == "zero3"
    options = (*(ZERO3_RESUME if zero3 else ("--max_steps=4",)), "--teacher_model_kind=trust_region", "--save_steps=2")
    config = "cpu_zero3.yaml" if zero3 else None
    straight = launch(tmp_path / "straight", backend, *options, accelerate_config=config)
    reference = single_process_run(*options)
    assert reference["log"][0]["srpo/loss/sdpo"] > 0.01, "the distillation term must weigh in the comparison"
    assert_same_run(straight, reference)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    resume = f"--resume_from_checkpoint={checkpoint}"
    resumed = launch(tmp_path / "resumed", backend, *options, resume, accelerate_config=config)
    assert_same_run(resumed, straight, atol=0.0)

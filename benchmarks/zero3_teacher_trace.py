"""Under DeepSpeed ZeRO-3, does SRPO's teacher forward follow DeepSpeed's parameter trace (and so prefetch)?

DeepSpeed ZeRO-3 records the order in which a model's submodules run, starting at the top-level module's forward
(`_start_of_forward_hook` resets the step), and prefetches the next layers' parameters along that trace once it is
complete. A forward that enters below the top-level module never resets the step: the trace is invalidated and never
recorded again, and every layer's parameters are gathered on demand, not prefetched. This script runs
`tests/distributed/train_tiny.py` (2 processes, ZeRO-3, CPU) and prints the teacher engine's trace state after each
teacher pass, then after direct backbone calls (how the teacher ran before issue 14):

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node=2 \
        benchmarks/zero3_teacher_trace.py --output_dir=/tmp/zero3-trace --backend=zero3 --world_size=2 --max_steps=3
"""

import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from srpo_trl.model_parts import backbone_and_head  # noqa: E402
from srpo_trl.teacher_scoring import TeacherScorer  # noqa: E402
from srpo_trl.trainer import SRPOTrainer  # noqa: E402

TRAINING = []  # the SRPOTrainer whose train() runs: its teacher engine holds the trace


def trace_state(trainer) -> str:
    """The teacher engine's trace: mode (RECORD, COMPLETE, INVALID), submodules in it, whether the LM head is."""
    coordinator = trainer._teacher_engine.optimizer.get_param_coordinator()
    order = coordinator._PartitionedParameterCoordinator__submodule_order
    mode = coordinator._PartitionedParameterCoordinator__trace_mode.name
    head = backbone_and_head(trainer.teacher.model)[1]
    return f"{mode}, {len(order)} submodules{', LM head included' if any(m is head for m in order) else ''}"


def report(name, method):
    def wrapper(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        print(f"rank {torch.distributed.get_rank()} after {name}: {trace_state(TRAINING[-1])}", flush=True)
        return out

    return wrapper


def train(self, *args, **kwargs):
    TRAINING.append(self)
    out = TRAIN(self, *args, **kwargs)
    backbone, _ = backbone_and_head(self.teacher.model)
    with torch.no_grad():
        for call in range(2):
            backbone(input_ids=torch.tensor([[5, 6, 7, 8]]))
            print(f"rank {torch.distributed.get_rank()} after direct backbone call {call + 1}: {trace_state(self)}")
    return out


TRAIN = SRPOTrainer.train
SRPOTrainer.train = train
for name in ("prefix_pass", "continuation_hidden", "whole_sequence_hidden"):  # the teacher's passes
    setattr(TeacherScorer, name, report(name, getattr(TeacherScorer, name)))
sys.argv = [str(ROOT / "tests" / "distributed" / "train_tiny.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")

"""The self-teacher (SPEC §4): an EMA of the policy, accumulated in fp32, used only to re-score completions.

Two layouts, one interface:
- full fine-tuning: a frozen copy of the policy, plus fp32 accumulators for its non-fp32 weights;
- PEFT: a second adapter ("srpo_teacher") on the policy's own frozen base; only adapter weights are averaged.
The EMA itself is `ema_update_`, a pure in-place function; `state_dict` is what checkpoints hold.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import PreTrainedModel
from transformers.trainer_callback import TrainerCallback
from trl.trainer.utils import use_adapter

TEACHER_ADAPTER = "srpo_teacher"


def ema_update_(accumulator: torch.Tensor, value: torch.Tensor, rate: float) -> None:
    """`accumulator <- (1 - rate) * accumulator + rate * value`, in the accumulator's dtype (fp32)."""
    accumulator.lerp_(value.to(accumulator.dtype), rate)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def causal_lm(model) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (adapters injected), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (returns final hidden states) and the LM head of a causal LM, PEFT-wrapped or not."""
    lm = causal_lm(model)
    return lm.base_model, lm.get_output_embeddings()


class SelfTeacher:
    """EMA self-teacher of `policy` (an unwrapped model, before Accelerate/DeepSpeed wrapping).

    Args:
        policy: the policy at its initial weights; the teacher starts equal to it.
        update_rate: `η` of `θ_T <- (1 - η) θ_T + η θ`.
    """

    def __init__(self, policy: torch.nn.Module, update_rate: float):
        self.update_rate = update_rate
        self.peft = is_peft(policy)
        if self.peft:
            policy.add_adapter(TEACHER_ADAPTER, copy.deepcopy(policy.peft_config[policy.active_adapter]))
            self.student_adapter = policy.active_adapter
            self.model = policy
        else:
            self.model = copy.deepcopy(policy)
        pairs = list(self._weight_pairs(policy))
        with torch.no_grad():
            for teacher_weight, student_weight in pairs:
                teacher_weight.requires_grad_(False)
                teacher_weight.copy_(student_weight)  # a PEFT adapter starts at the student's, not at zero
        self.model.eval() if not self.peft else None
        # fp32 accumulators only where the teacher's own weights are not fp32 (bf16 would round η-sized steps away)
        self.accumulators = {
            name: weight.detach().float().clone()
            for name, (weight, _) in zip(self.weight_names(policy), pairs, strict=True)
            if weight.dtype != torch.float32
        }

    def weight_names(self, policy) -> list[str]:
        return [name for name, _ in self._named_weight_pairs(policy)]

    def _named_weight_pairs(self, policy) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
        if self.peft:
            student = dict(policy.named_parameters())
            tag = f".{TEACHER_ADAPTER}."
            for name, weight in student.items():
                if tag in name:
                    yield name, (weight, student[name.replace(tag, f".{self.student_adapter}.")])
        else:
            student = dict(policy.named_parameters())
            for name, weight in self.model.named_parameters():
                yield name, (weight, student[name])

    def _weight_pairs(self, policy) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (pair for _, pair in self._named_weight_pairs(policy))

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        """One EMA step towards `policy` (call after each optimizer step)."""
        for name, (teacher_weight, student_weight) in self._named_weight_pairs(policy):
            accumulator = self.accumulators.get(name, teacher_weight)
            ema_update_(accumulator, student_weight.detach(), self.update_rate)
            if accumulator is not teacher_weight:
                teacher_weight.copy_(accumulator)

    @contextmanager
    def active(self):
        """Context in which `self.model` computes the teacher (switches the PEFT adapter; a no-op otherwise)."""
        with use_adapter(self.model, TEACHER_ADAPTER) if self.peft else nullcontext():
            yield self.model

    def state_dict(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The teacher's weights at full (fp32 accumulator) precision, keyed by parameter name."""
        return {
            name: self.accumulators.get(name, weight).detach().float().cpu().contiguous()
            for name, (weight, _) in self._named_weight_pairs(policy)
        }

    @torch.no_grad()
    def load_state_dict(self, policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        names = self.weight_names(policy)
        if set(names) != set(state):
            missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
            raise ValueError(
                f"Teacher checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, (weight, _) in self._named_weight_pairs(policy):
            weight.copy_(state[name])
            if name in self.accumulators:
                self.accumulators[name].copy_(state[name])


class TeacherEMACallback(TrainerCallback):
    """Runs the teacher's EMA after every optimizer step (`on_step_end` follows `optimizer.step()`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.teacher.update(self.trainer.accelerator.unwrap_model(self.trainer.model))

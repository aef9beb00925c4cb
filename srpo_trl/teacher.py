"""The self-teacher (method §4): an EMA of the policy, accumulated in fp32, used only to re-score completions.

Two layouts, one interface:
- full fine-tuning: a frozen copy of the policy, plus fp32 accumulators for its non-fp32 weights;
- PEFT: a second adapter ("srpo_teacher") on the policy's own frozen base; only adapter weights are averaged.
Under DeepSpeed ZeRO-3 every weight is partitioned across processes; the EMA, the accumulators and the state
then cover this process's shard of each weight (`local_part`) and never gather a whole parameter.
The EMA itself is `ema_update_`, a pure in-place function; `state_dict` is what checkpoints hold.
`build_self_teacher` lays it out like the policy (a copy, a ZeRO-3 engine, or an adapter) and `shard_like_policy`
shards it under FSDP2. How it scores completions is `teacher_scoring.py`.
"""

import copy
import functools
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.trainer_callback import TrainerCallback
from trl.models import prepare_deepspeed
from trl.trainer.utils import use_adapter

TEACHER_ADAPTER = "srpo_teacher"


def ema_update_(accumulator: torch.Tensor, value: torch.Tensor, rate: float) -> None:
    """`accumulator <- (1 - rate) * accumulator + rate * value`, in the accumulator's dtype (fp32)."""
    accumulator.lerp_(value.to(accumulator.dtype), rate)


def local_part(weight: torch.Tensor) -> torch.Tensor:
    """The part of `weight` this process holds: its ZeRO-3 shard (`ds_tensor`) once DeepSpeed partitioned it, its
    FSDP2 shard (a `DTensor`'s local tensor, a view of its storage), else the weight itself. Both shard every weight
    on its own by its shape, so a teacher weight's shard lines up with its policy weight's."""
    if isinstance(weight, DTensor):
        return weight.to_local()
    return weight.ds_tensor if getattr(weight, "ds_tensor", None) is not None else weight


def refresh_persistent(weights: list[torch.Tensor]) -> None:
    """ZeRO-3 keeps small ("persistent") weights whole on every process, copied from the shards when it gathers
    them: after the shards changed, drop the stale whole copies and gather them again (a collective)."""
    persistent = [weight for weight in weights if getattr(weight, "ds_persist", False)]
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def causal_lm(model) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (adapters injected), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (returns final hidden states) and the LM head of a causal LM, PEFT-wrapped or not."""
    lm = causal_lm(model)
    return lm.base_model, lm.get_output_embeddings()


def save_student_adapter_only(policy, student_adapter: str) -> None:
    """Make the PEFT `policy`'s `save_pretrained` write `student_adapter` alone by default, wherever it is called
    (`trainer.save_model`, `push_to_hub`, or the user's own `trainer.model.save_pretrained(...)`): PEFT's default
    saves every adapter, which would publish the teacher's, training state. An explicit `selected_adapters` wins."""
    policy.save_pretrained = functools.partial(
        type(policy).save_pretrained, policy, selected_adapters=[student_adapter]
    )


def context_length(model) -> int | None:
    """How many positions `model` scores (`max_position_embeddings`, GPT-2's `n_positions`), None when its
    configuration names no limit."""
    config = causal_lm(model).config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _closure_values(function: types.FunctionType) -> list:
    values = []
    for cell in function.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a free variable not yet assigned
            values.append(cell)
    return values


def rebind_forwards(copied: torch.nn.Module, original: torch.nn.Module) -> None:
    """Point the instance-level `forward` patches of `copied`'s submodules at `copied`'s own modules. A deep copy
    keeps functions as they are, so a patch closing over `original`'s modules goes on computing with the original's
    weights: TRL's `cast_lm_head_to_fp32` replaces `lm_head.forward` by a closure over the policy's head, which
    under ZeRO-3 and FSDP2 then met the policy's shards (`size mismatch, got input (0)`)."""
    name_of = {id(module): name for name, module in original.named_modules()}
    twins = dict(copied.named_modules())
    for module in copied.modules():
        forward = module.__dict__.get("forward")
        if not isinstance(forward, types.FunctionType):
            continue
        values = _closure_values(forward)
        if not any(id(value) in name_of for value in values):
            continue
        cells = tuple(
            types.CellType(twins[name_of[id(value)]]) if id(value) in name_of else forward.__closure__[i]
            for i, value in enumerate(values)
        )
        rebound = types.FunctionType(
            forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__, cells
        )
        module.forward = functools.update_wrapper(rebound, forward)


class SelfTeacher:
    """EMA self-teacher of `policy` (an unwrapped model, before Accelerate/DeepSpeed wrapping).

    Args:
        policy: the policy at its initial weights; the teacher starts equal to it.
        update_rate: `η` of `θ_T <- (1 - η) θ_T + η θ`.
        model: for full fine-tuning, a teacher model already equal to `policy` (e.g. one DeepSpeed ZeRO-3 has
            partitioned); by default a copy of `policy`. Ignored with PEFT, where the teacher is an adapter.
    """

    def __init__(self, policy: torch.nn.Module, update_rate: float, model: torch.nn.Module | None = None):
        self.update_rate = update_rate
        self.peft = is_peft(policy)
        if self.peft:
            self.student_adapter = policy.active_adapter
            if self.student_adapter == TEACHER_ADAPTER:
                raise ValueError(
                    f"The PEFT model's active adapter is {TEACHER_ADAPTER!r}, the name SRPO gives its teacher: "
                    "activate the adapter to train (model.set_adapter(name)) before passing the model."
                )
            if TEACHER_ADAPTER in policy.peft_config:  # a model an earlier SRPOTrainer trained: a fresh teacher
                policy.delete_adapter(TEACHER_ADAPTER)
            policy.add_adapter(TEACHER_ADAPTER, copy.deepcopy(policy.peft_config[self.student_adapter]))
            save_student_adapter_only(policy, self.student_adapter)
            self.model = policy
            with torch.no_grad():
                for teacher_weight, student_weight in self._weight_pairs(policy):
                    teacher_weight.copy_(student_weight)  # an adapter starts at the student's, not at zero
        else:
            self.model = copy.deepcopy(policy) if model is None else model
            # GRPOTrainer patched the policy's `forward` (TRL's fused LM head) with a closure whose plain path calls
            # the *policy's* original forward; a copy must run its own, its class's.
            self.model.__dict__.pop("forward", None)
            rebind_forwards(self.model, policy)
            self.model.eval()
        for _, weight in self._teacher_weights():
            weight.requires_grad_(False)
        self._accumulators = None

    @property
    def accumulators(self) -> dict[str, torch.Tensor]:
        """fp32 copies of the teacher's non-fp32 weights (bf16 would round η-sized steps away), by name.

        Built on first use, i.e. after DeepSpeed (if any) partitioned the weights: they then hold the shards."""
        if self._accumulators is None:
            self._accumulators = {
                name: local_part(weight).detach().float().clone()
                for name, weight in self._teacher_weights()
                if weight.dtype != torch.float32
            }
        return self._accumulators

    def _teacher_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        tag = f".{TEACHER_ADAPTER}."
        return ((n, w) for n, w in self.model.named_parameters() if not self.peft or tag in n)

    def weight_names(self) -> list[str]:
        return [name for name, _ in self._teacher_weights()]

    def _named_weight_pairs(self, policy) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
        student = dict(policy.named_parameters())
        for name, weight in self._teacher_weights():
            student_name = name.replace(f".{TEACHER_ADAPTER}.", f".{self.student_adapter}.") if self.peft else name
            yield name, (weight, student[student_name])

    def _weight_pairs(self, policy) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (pair for _, pair in self._named_weight_pairs(policy))

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        """One EMA step towards `policy` (call after each optimizer step)."""
        for name, (teacher_weight, student_weight) in self._named_weight_pairs(policy):
            target = local_part(teacher_weight)
            accumulator = self.accumulators.get(name, target)
            ema_update_(accumulator, local_part(student_weight).detach(), self.update_rate)
            if accumulator is not target:
                target.copy_(accumulator)
        refresh_persistent([weight for _, weight in self._teacher_weights()])

    @torch.no_grad()
    def restart_from(self, policy: torch.nn.Module) -> None:
        """Make the teacher equal to `policy`'s current weights: a resume from a checkpoint without teacher state
        restarts the EMA there, not at the initial weights the resumed policy has moved away from."""
        for name, (teacher_weight, student_weight) in self._named_weight_pairs(policy):
            weights = local_part(student_weight)
            local_part(teacher_weight).copy_(weights)
            if name in self.accumulators:
                self.accumulators[name].copy_(weights)
        refresh_persistent([weight for _, weight in self._teacher_weights()])

    @contextmanager
    def active(self):
        """Context in which `self.model` computes the teacher: the teacher's adapter (PEFT), in eval mode, so that no
        dropout (the adapter's `lora_dropout`, the model's own) makes its targets random (method §12)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with use_adapter(self.model, TEACHER_ADAPTER) if self.peft else nullcontext():
                yield self.model
        finally:
            self.model.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's weights (this process's shards under ZeRO-3) at full fp32 precision, by parameter name."""
        return {
            name: self.accumulators.get(name, local_part(weight)).detach().float().cpu().contiguous()
            for name, weight in self._teacher_weights()
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = self.weight_names()
        if set(names) != set(state):
            missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
            raise ValueError(
                f"Teacher checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, weight in self._teacher_weights():
            target = local_part(weight)
            if state[name].shape != target.shape:
                raise ValueError(
                    f"Teacher checkpoint does not match the model: {name} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(target.shape)} (ZeRO-3 shards need the same number of processes)."
                )
            target.copy_(state[name])
            if name in self.accumulators:
                self.accumulators[name].copy_(state[name])
        refresh_persistent([weight for _, weight in self._teacher_weights()])


class SelfTeacherCallback(TrainerCallback):
    """Keeps the self-teacher in step with training: sharded like the policy once training starts (FSDP2; the
    policy is sharded when `train()` prepares it), and its EMA after every optimizer step (`on_step_end` follows
    `optimizer.step()`)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.shard_teacher_like_policy()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.teacher.update(self.trainer.accelerator.unwrap_model(self.trainer.model))


def build_self_teacher(policy, update_rate: float, accelerator, is_zero3: bool, is_fsdp: bool):
    """The self-teacher of `policy`, laid out like it, before Accelerate/DeepSpeed wrap the policy in `train()` (a PEFT
    teacher adapter added now is partitioned and placed with the policy's own weights). Returns the teacher and, under
    ZeRO-3, the DeepSpeed engine that owns its gathering hooks (the caller keeps it alive)."""
    if is_peft(policy) or is_fsdp:  # FSDP2: a whole copy until Accelerate has sharded the policy (`shard_like_policy`)
        return SelfTeacher(policy, update_rate), None
    if not is_zero3:
        teacher = SelfTeacher(policy, update_rate)
        teacher.model.to(accelerator.device)
        return teacher, None
    # ZeRO-3: the teacher is partitioned like the policy, and DeepSpeed gathers it layer by layer in forward.
    if hasattr(next(policy.parameters()), "ds_id"):
        # Already partitioned (loaded from a model id under zero.Init): a copy would share DeepSpeed's per-parameter
        # state. Build a partitioned twin and copy the policy's shards, which line up.
        model = type(policy)._from_config(policy.config, dtype=policy.dtype)
        with torch.no_grad():
            for teacher_weight, weight in zip(model.parameters(), policy.parameters(), strict=True):
                teacher_weight.ds_tensor.copy_(weight.ds_tensor)
    else:
        model = copy.deepcopy(policy)
    engine = prepare_deepspeed(model, accelerator)
    return SelfTeacher(policy, update_rate, model=engine.module), engine


def shard_like_policy(teacher: SelfTeacher, accelerator, policy) -> None:
    """FSDP2: shard the (whole-copy) teacher as Accelerate sharded `policy` (unwrapped), then take the policy's own
    shards, right on every process whatever the loading (`cpu_ram_efficient_loading` loads on the main process only).
    Once, after Accelerate prepared the policy; with PEFT the teacher is an adapter the policy's sharding covers."""
    if teacher.peft or isinstance(teacher.model, FSDPModule):
        return
    model = fsdp2_prepare_model(accelerator, teacher.model)
    with torch.no_grad():
        for teacher_weight, weight in zip(model.parameters(), policy.parameters(), strict=True):
            local_part(teacher_weight).copy_(local_part(weight))
    teacher.model = model

"""The self-teacher (method §4): an EMA of the policy, accumulated in fp32, used only to re-score completions.

Its kind (`SRPOConfig.teacher_model_kind`) is data, `TEACHER_KINDS`: the EMA (the paper's), the initial student
frozen (`base`), the current student itself (`live`), or a trust region between the initial student and the current
one (`trust_region`). `SelfTeacher` reads the kind's fields and never its name.

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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers.trainer_callback import TrainerCallback
from trl.models import prepare_deepspeed
from trl.trainer.utils import use_adapter

from .compat import empty_model_like
from .model_parts import is_peft, rebind_forwards, save_student_adapter_only

TEACHER_ADAPTER = "srpo_teacher"


@dataclass(frozen=True)
class TeacherKind:
    """What one value of `SRPOConfig.teacher_model_kind` builds and does (method §4).

    Attributes:
        keeps_copy: the teacher has weights of its own: a copy of the policy (full fine-tuning) or the
            `srpo_teacher` adapter (PEFT). Without one the teacher is the policy itself.
        updates: its weights move after every optimizer step (`SelfTeacher.update`, at `teacher_update_rate`).
        mixes_from_initial: each step is `θ_T = (1-η) θ_0 + η θ` from the initial weights `θ_0` (kept in fp32),
            not the EMA's `θ_T <- (1-η) θ_T + η θ` from the teacher's own.
        peft_adapter_disabled: with PEFT the teacher is the base model with every adapter disabled (no copy: the
            frozen base is the initial student when the student's adapter starts as the identity, LoRA's default).
            An adapter that does not (`adapter_is_identity`) gets a frozen copy instead, as `trust_region` does.
    """

    keeps_copy: bool
    updates: bool
    mixes_from_initial: bool = False
    peft_adapter_disabled: bool = False

    @property
    def has_history(self) -> bool:
        """Its weights depend on the whole trajectory (the EMA): checkpoints must hold them. Any other kind is a
        function of the initial weights and the current policy, both of which a resume rebuilds."""
        return self.updates and not self.mixes_from_initial


TEACHER_KINDS: dict[str, TeacherKind] = {
    "ema": TeacherKind(keeps_copy=True, updates=True),
    "base": TeacherKind(keeps_copy=True, updates=False, peft_adapter_disabled=True),
    "live": TeacherKind(keeps_copy=False, updates=False),
    "trust_region": TeacherKind(keeps_copy=True, updates=True, mixes_from_initial=True),
}


def fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A float64 `(sum, sum of squares)` of `weight`: what a checkpoint keeps of weights a resume rebuilds (the
    initial ones), to tell that the rebuilt ones are the run's."""
    weight = weight.detach().double()
    return torch.stack([weight.sum(), weight.square().sum()]).cpu()


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


def adapter_is_identity(policy, adapter: str) -> bool:
    """Whether the PEFT `policy`'s `adapter` adds nothing yet, so that the base model with adapters disabled computes
    the student: every layer of it is LoRA with a zero `B` (LoRA's default initialisation). Any other initialisation
    (PiSSA, OLoRA, `init_lora_weights=False`, which also move the base weights or start `B` off zero), an adapter
    trained before, another adapter type, or weights already sharded (each process would see only its part) count as
    not the identity: the safe answer, which costs a copy of the adapter."""
    for module in policy.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        names = [name for name in module.adapter_layer_names if adapter in getattr(module, name, {})]
        if not names:
            continue
        if not set(names) <= {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}:
            return False
        for name in ("lora_B", "lora_embedding_B"):
            if name in names:
                part = getattr(module, name)[adapter]
                weight = part.weight if isinstance(part, torch.nn.Module) else part
                if isinstance(weight, DTensor) or hasattr(weight, "ds_id") or weight.count_nonzero():
                    return False
    return True


class SelfTeacher:
    """Self-teacher of `policy` (an unwrapped model, before Accelerate/DeepSpeed wrapping), of one `TeacherKind`.

    Args:
        policy: the policy at its initial weights; the teacher starts equal to it.
        update_rate: `η` of the EMA `θ_T <- (1 - η) θ_T + η θ`, or of the trust region `θ_T = (1 - η) θ_0 + η θ`.
        model: for full fine-tuning, a teacher model already equal to `policy` (e.g. one DeepSpeed ZeRO-3 has
            partitioned); by default a copy of `policy`. Ignored with PEFT, where the teacher is an adapter.
        kind: a key of `TEACHER_KINDS`.
    """

    def __init__(
        self, policy: torch.nn.Module, update_rate: float, model: torch.nn.Module | None = None, kind: str = "ema"
    ):
        self.update_rate = update_rate
        self.kind = TEACHER_KINDS[kind]
        self.peft = is_peft(policy)
        # The teacher's weights: an adapter of its own (PEFT), a copy (full fine-tuning), or none (the policy's).
        # Adapters disabled are the initial student only if the student's adapter adds nothing yet; otherwise (PiSSA,
        # `init_lora_weights=False`, an adapter trained before) the teacher is a frozen copy of it.
        disabled = self.peft and self.kind.peft_adapter_disabled and adapter_is_identity(policy, policy.active_adapter)
        self.owns_adapter = self.peft and self.kind.keeps_copy and not disabled
        self.owns_model = not self.peft and self.kind.keeps_copy
        if self.peft:
            self.student_adapter = policy.active_adapter
            if self.student_adapter == TEACHER_ADAPTER:
                raise ValueError(
                    f"The PEFT model's active adapter is {TEACHER_ADAPTER!r}, the name SRPO gives its teacher: "
                    "activate the adapter to train (model.set_adapter(name)) before passing the model."
                )
            if TEACHER_ADAPTER in policy.peft_config:  # a model an earlier SRPOTrainer trained: a fresh teacher
                policy.delete_adapter(TEACHER_ADAPTER)
            save_student_adapter_only(policy, self.student_adapter)
            self.model = policy
            if self.owns_adapter:
                policy.add_adapter(TEACHER_ADAPTER, copy.deepcopy(policy.peft_config[self.student_adapter]))
                with torch.no_grad():
                    for teacher_weight, student_weight in self._weight_pairs(policy):
                        teacher_weight.copy_(student_weight)  # an adapter starts at the student's, not at zero
        elif self.owns_model:
            self.model = copy.deepcopy(policy) if model is None else model
            # GRPOTrainer patched the policy's `forward` (TRL's fused LM head) with a closure whose plain path calls
            # the *policy's* original forward; a copy must run its own, its class's.
            self.model.__dict__.pop("forward", None)
            rebind_forwards(self.model, policy)
            self.model.eval()
        else:  # `live`: the policy itself, scored in eval mode without gradients
            self.model = policy
        for _, weight in self._teacher_weights():
            weight.requires_grad_(False)
        self._accumulators = None

    @property
    def owns_weights(self) -> bool:
        """Whether the teacher has weights of its own (a copy or an adapter), apart from the policy's."""
        return self.owns_adapter or self.owns_model

    @property
    def accumulators(self) -> dict[str, torch.Tensor]:
        """fp32 weights the teacher's step starts from, by name: the EMA's copies of its non-fp32 weights (bf16 would
        round η-sized steps away), the trust region's initial weights (all of them), none for a teacher that does not
        move.

        Built on first use, i.e. after DeepSpeed (if any) partitioned the weights: they then hold the shards."""
        if self._accumulators is None:
            self._accumulators = {
                name: local_part(weight).detach().float().clone()
                for name, weight in self._teacher_weights()
                if self.kind.updates and (self.kind.mixes_from_initial or weight.dtype != torch.float32)
            }
        return self._accumulators

    def _teacher_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.owns_weights:
            return iter(())
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
        """One step towards `policy` (call after each optimizer step): the EMA's, or the trust region's mix of the
        initial weights and `policy`'s; nothing for a teacher that does not move."""
        if not self.kind.updates:
            return
        for name, (teacher_weight, student_weight) in self._named_weight_pairs(policy):
            target = local_part(teacher_weight)
            start = self.accumulators.get(name, target)
            student = local_part(student_weight).detach()
            if self.kind.mixes_from_initial:
                target.copy_(torch.lerp(start, student.to(start.dtype), self.update_rate))
                continue
            ema_update_(start, student, self.update_rate)
            if start is not target:
                target.copy_(start)
        refresh_persistent([weight for _, weight in self._teacher_weights()])

    @torch.no_grad()
    def restart_from(self, policy: torch.nn.Module) -> None:
        """After a resume from a checkpoint without teacher state: the EMA restarts at `policy`'s current weights (not
        at the initial weights the resumed policy has moved away from); the trust region is mixed anew from its
        initial weights; the other kinds are what they are (the initial student, or the policy)."""
        if self.kind.mixes_from_initial:
            self.update(policy)
        if not self.kind.has_history:
            return
        for name, (teacher_weight, student_weight) in self._named_weight_pairs(policy):
            weights = local_part(student_weight)
            local_part(teacher_weight).copy_(weights)
            if name in self.accumulators:
                self.accumulators[name].copy_(weights)
        refresh_persistent([weight for _, weight in self._teacher_weights()])

    @contextmanager
    def active(self):
        """Context in which `self.model` computes the teacher: the teacher's adapter (PEFT; every adapter disabled for
        `base`, the student's for `live`), in eval mode, so that no dropout (the adapter's `lora_dropout`, the model's
        own) makes its targets random (method §12)."""
        was_training = self.model.training
        self.model.eval()
        if self.owns_adapter:
            adapter = use_adapter(self.model, TEACHER_ADAPTER)
        elif self.peft and self.kind.peft_adapter_disabled:  # an identity adapter: the base model is the student
            adapter = use_adapter(self.model, None)
        else:
            adapter = nullcontext()
        try:
            with adapter:
                yield self.model
        finally:
            self.model.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds (this process's shards under ZeRO-3 and FSDP2), by parameter name: the EMA's weights
        at full fp32 precision; for the kinds a resume rebuilds from the initial model (`base`, `trust_region`) a
        `fingerprint` of the initial weights, to check that the model passed on resume is the run's; nothing without
        weights of its own (`live`, PEFT `base`)."""
        if not self.kind.has_history:
            return {name: fingerprint(self.initial_weight(name, weight)) for name, weight in self._teacher_weights()}
        return {
            name: self.accumulators.get(name, local_part(weight)).detach().float().cpu().contiguous()
            for name, weight in self._teacher_weights()
        }

    def initial_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """This process's part of the initial weight `name` of a teacher without history: the trust region's fp32
        copy, or the frozen teacher's weight itself."""
        return self.accumulators.get(name, local_part(weight))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], policy: torch.nn.Module | None = None) -> None:
        """Restore what `state_dict` gave; `policy` (the resumed one) re-mixes a trust-region teacher."""
        names = self.weight_names()
        if set(names) != set(state):
            missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
            raise ValueError(
                f"Teacher checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if not self.kind.has_history:
            self._check_initial_weights(state)
            if self.kind.updates and policy is not None:
                self.update(policy)
            return
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

    def _check_initial_weights(self, state: dict[str, torch.Tensor]) -> None:
        for name, weight in self._teacher_weights():
            saved = state[name].double().cpu()
            if saved.shape != (2,) or not torch.allclose(
                fingerprint(self.initial_weight(name, weight)), saved, rtol=1e-6
            ):
                raise ValueError(
                    f"the teacher is the initial model, rebuilt from the model given to the trainer, and {name} "
                    "differs from the initial weights of the run that saved it (the checkpoint's policy was passed "
                    "as the model, the number of processes changed, or with PEFT another seed initialised the adapter); "
                    "pass the model the run started from, with its seed, and resume_from_checkpoint loads the trained "
                    "policy"
                )


class SelfTeacherCallback(TrainerCallback):
    """Keeps the self-teacher in step with training, on the model the callback events carry: sharded like the policy
    once training starts (FSDP2, when `shard` is set; the policy is sharded when `train()` prepares it), and its EMA
    after every optimizer step (`on_step_end` follows `optimizer.step()`).

    Args:
        teacher: the `SelfTeacher`.
        accelerator: the trainer's; it unwraps the model the events pass.
        shard: shard the teacher like the policy when training begins (FSDP2).
    """

    def __init__(self, teacher: "SelfTeacher", accelerator, shard: bool):
        self.teacher, self.accelerator, self.shard = teacher, accelerator, shard

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.shard:
            shard_like_policy(self.teacher, self.accelerator, self.accelerator.unwrap_model(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.teacher.update(self.accelerator.unwrap_model(model))


def build_self_teacher(policy, args, accelerator, is_zero3: bool, is_fsdp: bool):
    """The self-teacher of `policy` (of `args.teacher_model_kind`, at `args.teacher_update_rate`), laid out like it, before Accelerate/DeepSpeed wrap the policy in
    `train()` (a PEFT teacher adapter added now is partitioned and placed with the policy's own weights). Returns the
    teacher and, under ZeRO-3, the DeepSpeed engine that owns its gathering hooks (the caller keeps it alive)."""
    update_rate, kind = args.teacher_update_rate, args.teacher_model_kind
    # FSDP2: a whole copy until Accelerate has sharded the policy (`shard_like_policy`); no copy: the policy's layout
    if is_peft(policy) or is_fsdp or not TEACHER_KINDS[kind].keeps_copy:
        return SelfTeacher(policy, update_rate, kind=kind), None
    if not is_zero3:
        teacher = SelfTeacher(policy, update_rate, kind=kind)
        teacher.model.to(accelerator.device)
        return teacher, None
    # ZeRO-3: the teacher is partitioned like the policy, and DeepSpeed gathers it layer by layer in forward.
    if hasattr(next(policy.parameters()), "ds_id"):
        # Already partitioned (loaded from a model id under zero.Init): a copy would share DeepSpeed's per-parameter
        # state. Build a partitioned twin and copy the policy's shards, which line up.
        model = empty_model_like(policy)
        with torch.no_grad():
            for teacher_weight, weight in zip(model.parameters(), policy.parameters(), strict=True):
                teacher_weight.ds_tensor.copy_(weight.ds_tensor)
    else:
        model = copy.deepcopy(policy)
    engine = prepare_deepspeed(model, accelerator)
    return SelfTeacher(policy, update_rate, model=engine.module, kind=kind), engine


def shard_like_policy(teacher: SelfTeacher, accelerator, policy) -> None:
    """FSDP2: shard the (whole-copy) teacher as Accelerate sharded `policy` (unwrapped), then take the policy's own
    shards, right on every process whatever the loading (`cpu_ram_efficient_loading` loads on the main process only).
    Once, after Accelerate prepared the policy; with PEFT the teacher is an adapter the policy's sharding covers, and
    a teacher without weights of its own is the sharded policy. A teacher of the initial weights (`base`,
    `trust_region`) keeps its own: the policy may already be the resumed one, and Accelerate's sharding broadcasts
    the main process's copy (the initial weights) when only it loaded the model (`cpu_ram_efficient_loading`)."""
    if not teacher.owns_weights:
        teacher.model = policy
    if not teacher.owns_model or isinstance(teacher.model, FSDPModule):
        return
    model = fsdp2_prepare_model(accelerator, teacher.model)
    if teacher.kind.has_history:
        with torch.no_grad():
            for teacher_weight, weight in zip(model.parameters(), policy.parameters(), strict=True):
                local_part(teacher_weight).copy_(local_part(weight))
    teacher.model = model

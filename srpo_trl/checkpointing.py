"""The self-teacher is training state (method §4): every checkpoint holds it, `resume_from_checkpoint` restores it.

`TeacherCheckpointing` is mixed into `SRPOTrainer` ahead of `GRPOTrainer`, at Trainer's two checkpoint hooks: the
teacher is written with the optimizer (before Trainer writes `trainer_state.json`, pushes and rotates checkpoints),
atomically, one file per process when weights are sharded (DeepSpeed ZeRO-3, FSDP2), with the step it belongs to;
on resume it is read back, checked (damaged, non-finite, another layout, another step: errors naming the file and
the fix), or restarted from the resumed policy when the checkpoint holds none. `train(resume_from_checkpoint=True)`
resumes the newest *complete* checkpoint.
"""

import json
import math
import os
import re
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TEACHER_STATE_FILE = "srpo_teacher.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"  # Trainer writes it last: a checkpoint without it is incomplete
STEP_KEY = "global_step"  # the teacher file's metadata: the optimizer step whose teacher it holds
KIND_KEY = "teacher_model_kind"  # and the kind of teacher it holds (files without it hold the EMA)
DTYPE_KEY = (
    "model_dtype"  # and the dtype of the model that saved it (a teacher rebuilt from the initial model needs it)
)


def is_complete(checkpoint: str) -> bool:
    """Whether Trainer finished writing `checkpoint`: its `trainer_state.json`, written last, is there and readable
    (a run stopped, or a disk filled, while writing it leaves a cut one)."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_FILE)) as file:
            return isinstance(json.load(file), dict)
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(folder: str) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-N` in `folder` that Trainer finished writing (`is_complete`), and the newer incomplete
    ones passed over (a run stopped while writing them), newest first."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps[int(match.group(1))] = os.path.join(folder, name)
    skipped = []
    for step in sorted(steps, reverse=True):
        if is_complete(steps[step]):
            return steps[step], skipped
        skipped.append(steps[step])
    return None, skipped


def generation_batch_period(gradient_accumulation_steps: int, steps_per_generation: int, num_iterations: int) -> int:
    """Every how many optimizer steps GRPOTrainer's rollout buffer starts a new generation batch at a step boundary:
    a checkpoint written then resumes exactly; one written between holds no buffered rollouts (TRL does not save
    them), so its resume generates a new batch where the straight run reused the old one."""
    generate_every = steps_per_generation * num_iterations  # micro-batches per generation batch
    return math.lcm(generate_every, gradient_accumulation_steps) // gradient_accumulation_steps


class TeacherCheckpointing:
    """Checkpoint hooks for a trainer with a `teacher` (a `SelfTeacher`, or None), `_sharded` and
    `shard_teacher_like_policy`: `SRPOTrainer`."""

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        # Here, not after `_save_checkpoint`: Trainer then writes trainer_state.json, pushes the checkpoint and rotates
        # old ones away, so a checkpoint is complete only with its teacher and a failed write keeps the older ones.
        # (`save_only_model` checkpoints hold no optimizer and no teacher: a resume restarts it from the policy.)
        # Under ZeRO-3 and FSDP2 every process holds (and saves) its own shards of the teacher.
        self._warn_if_mid_generation_batch(output_dir)
        if self.teacher is not None and (self.args.should_save or self._sharded):
            self._write_teacher_state(self._teacher_state_path(output_dir))
            if self._sharded:
                self.accelerator.wait_for_everyone()  # every shard is on disk before process 0 rotates checkpoints

    def _warn_if_mid_generation_batch(self, output_dir: str) -> None:
        """Once per run: this checkpoint falls inside a generation batch, and its resume will not be exact."""
        args = self.args
        period = generation_batch_period(
            args.gradient_accumulation_steps, args.steps_per_generation, self.num_iterations
        )
        if self.state.global_step % period == 0 or getattr(self, "_warned_mid_generation_batch", False):
            return
        self._warned_mid_generation_batch = True
        if self.args.should_save:
            warnings.warn(
                f"{output_dir} is written in the middle of a generation batch (one spans {period} optimizer steps: "
                f"steps_per_generation={args.steps_per_generation}, num_iterations={self.num_iterations}, "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}). Checkpoints do not hold the "
                "buffered rollouts (as in GRPOTrainer), so a resume from it generates a new batch and does not "
                f"reproduce the run exactly; resume is exact from checkpoints at multiples of {period} steps. Set "
                f"save_steps to a multiple of {period} for exact resumes.",
                stacklevel=3,
            )

    def _write_teacher_state(self, path: str) -> None:
        """Write the teacher's state to `path` atomically, with the step it belongs to: a crash mid-write leaves no
        file there, never a cut one; a failed write (a full disk) is an error naming the file and the fix."""
        partial = f"{path}.partial"
        try:
            metadata = {
                STEP_KEY: str(self.state.global_step),
                KIND_KEY: self.args.teacher_model_kind,
                DTYPE_KEY: str(self.accelerator.unwrap_model(self.model).dtype),
            }
            save_file(self.teacher.state_dict(), partial, metadata=metadata)
            with open(partial, "rb") as file:
                os.fsync(file.fileno())  # on disk before the name says the checkpoint holds it
            os.replace(partial, path)
        except (SafetensorError, OSError) as error:
            earlier, _ = last_complete_checkpoint(self.args.output_dir)
            then = (
                f"then resume with resume_from_checkpoint=True, which takes the newest complete checkpoint ({earlier})"
                if earlier is not None
                else "then start the run again: no earlier checkpoint is complete"
            )
            raise OSError(
                f"Cannot write the SRPO teacher state {path} ({type(error).__name__}: {error}). The checkpoint is "
                "incomplete (no trainer_state.json) and the older ones were kept: free disk space where output_dir "
                f"is (or lower save_total_limit, or set output_dir elsewhere), {then}."
            ) from error
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # Trainer resolves True to the newest checkpoint folder, complete or not, and loads a folder given by path
        # whatever its state: a run stopped while writing one (Ctrl-C, a full disk) leaves one without
        # trainer_state.json, or with a cut one, on which the resume fails. "Complete" is loadable (`is_complete`).
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._newest_complete_checkpoint()
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and not is_complete(resume_from_checkpoint):
            given = str(resume_from_checkpoint)
            if not os.path.isdir(given):
                raise ValueError(f"resume_from_checkpoint={given!r}: no such checkpoint folder.")
            earlier, _ = last_complete_checkpoint(os.path.dirname(os.path.abspath(given)))
            raise ValueError(
                f"resume_from_checkpoint={given!r} is incomplete: it lacks {TRAINER_STATE_FILE}, or holds a cut one "
                "(the run stopped while writing it). Resume from "
                + (f"{earlier}, the newest complete checkpoint beside it" if earlier else "a complete checkpoint")
                + ", or with resume_from_checkpoint=True."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _newest_complete_checkpoint(self):
        """What `resume_from_checkpoint=True` resumes: the newest complete checkpoint of `output_dir`, the newer
        incomplete ones skipped (a warning names them); with none but incomplete ones, an error naming them; with
        none at all, True (Trainer's own error)."""
        checkpoint, skipped = last_complete_checkpoint(self.args.output_dir)
        cut = f"{', '.join(skipped)} lacks {TRAINER_STATE_FILE}, or holds a cut one (the run stopped while writing it)"
        if checkpoint is None and skipped:  # Trainer would pick the incomplete one, and fail on it
            raise ValueError(
                f"resume_from_checkpoint=True: {self.args.output_dir} holds no complete checkpoint; {cut}. Delete "
                "the incomplete folder to start afresh, or resume from another run's checkpoint by path."
            )
        if skipped:
            warnings.warn(
                f"resume_from_checkpoint=True: {cut}, so it is incomplete and skipped; resuming from {checkpoint}. "
                "Delete the incomplete folder.",
                stacklevel=3,
            )
        return checkpoint if checkpoint is not None else True

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self.shard_teacher_like_policy()  # before its shards are restored
        if checkpoint is None:
            return
        if self.teacher is not None:
            self._load_teacher_state(checkpoint)
            return
        saved = self._teacher_files(checkpoint)
        if saved and self.args.should_save:
            warnings.warn(
                f"{checkpoint} holds an SRPO teacher state ({saved[0]}), but routing={self.args.routing!r} trains "
                "without a teacher: it is ignored, and the checkpoints this run writes hold none (a later SRPO resume "
                "from them restarts the teacher from the policy). Resume with the routing that saved it to keep it.",
                stacklevel=2,
            )

    def _load_teacher_state(self, checkpoint: str) -> None:
        """Restore the teacher from `checkpoint`, or restart it from the resumed policy (already loaded by Trainer)
        when the checkpoint holds no teacher state; a damaged or mismatched state is an error naming its file."""
        path = self._teacher_state_path(checkpoint)
        file_name = os.path.basename(path)
        fix = (
            f"resume from an earlier checkpoint, or delete {file_name} to restart the teacher from the resumed policy"
        )
        if not self._teacher_state_found(checkpoint, path):
            if not self.teacher.kind.has_history:  # rebuilt exactly from the initial model and the resumed policy
                self.teacher.restart_from(self.accelerator.unwrap_model(self.model))
                return
            warnings.warn(
                f"{checkpoint} holds no SRPO teacher state ({file_name}): the teacher restarts from the "
                "resumed policy and its EMA history is lost. Checkpoints written by GRPOTrainer or with "
                "save_only_model=True hold none.",
                stacklevel=2,
            )
            self.teacher.restart_from(self.accelerator.unwrap_model(self.model))
            return
        try:
            state = load_file(path)
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"Cannot read the SRPO teacher state {path} ({error}): the file is damaged or incomplete; {fix}."
            ) from error
        self._check_teacher_step(checkpoint, path, metadata.get(STEP_KEY))
        if (saved_kind := metadata.get(KIND_KEY, "ema")) != self.args.teacher_model_kind:
            raise ValueError(
                f"The SRPO teacher state {path} holds a teacher_model_kind={saved_kind!r} teacher, but this run's is "
                f"{self.args.teacher_model_kind!r}: resume with teacher_model_kind={saved_kind!r}, or delete "
                f"{file_name} to start this run's teacher from the resumed policy (an 'ema' teacher restarts there)."
            )
        dtype = str(self.accelerator.unwrap_model(self.model).dtype)
        if not self.teacher.kind.has_history and metadata.get(DTYPE_KEY, dtype) != dtype:
            raise ValueError(
                f"The SRPO teacher state {path} was saved by a run whose model was {metadata[DTYPE_KEY]}, and this "
                f"run's is {dtype}: a teacher_model_kind={self.args.teacher_model_kind!r} teacher is rebuilt from the "
                f"initial model, whose weights differ in another dtype. Resume with the model in "
                f"{metadata[DTYPE_KEY]} (model_init_kwargs={{'dtype': ...}}, --dtype), or delete {file_name} to rebuild "
                "the teacher from this run's model."
            )
        non_finite = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if non_finite:
            more = f" and {len(non_finite) - 1} more tensors" if len(non_finite) > 1 else ""
            raise ValueError(
                f"The SRPO teacher state {path} holds non-finite values in {non_finite[0]}{more}: that teacher would "
                f"turn the policy to NaN in one step; {fix}."
            )
        try:
            self.teacher.load_state_dict(
                {name: t.to(self.accelerator.device) for name, t in state.items()},
                self.accelerator.unwrap_model(self.model),
            )
        except ValueError as error:
            raise ValueError(
                f"Cannot resume the SRPO teacher from {path}: {error}. Resume with the model (and, under DeepSpeed "
                f"ZeRO-3 or FSDP2, the number of processes) that saved it, or delete {file_name} to restart the teacher from "
                "the resumed policy."
            ) from error

    @staticmethod
    def _check_teacher_step(checkpoint: str, path: str, saved_step: str | None) -> None:
        """The teacher file belongs to the checkpoint's step: a teacher file copied from another checkpoint would
        resume the policy with a stale teacher. Files written before the step was recorded are loaded, with a
        warning."""
        state_file = os.path.join(checkpoint, TRAINER_STATE_FILE)
        if not os.path.exists(state_file):
            return  # an explicitly chosen incomplete checkpoint: Trainer's own state loading decides
        step = TrainerState.load_from_json(state_file).global_step
        if saved_step is None:
            warnings.warn(
                f"The SRPO teacher state {path} records no step (written by an older srpo_trl): it is loaded as the "
                f"teacher of step {step} without a check that it is.",
                stacklevel=3,
            )
        elif int(saved_step) != step:
            raise ValueError(
                f"The SRPO teacher state {path} is the teacher of step {saved_step}, but {checkpoint} resumes step "
                f"{step} ({TRAINER_STATE_FILE}): it was copied from another checkpoint. Put back the teacher file "
                f"saved with this checkpoint, resume from the checkpoint of step {saved_step}, or delete "
                f"{os.path.basename(path)} to restart the teacher from the resumed policy."
            )

    def _teacher_files(self, checkpoint: str) -> list[str]:
        stem = TEACHER_STATE_FILE.removesuffix(".safetensors")
        return sorted(f for f in os.listdir(checkpoint) if f.startswith(stem) and f.endswith(".safetensors"))

    def _teacher_state_found(self, checkpoint: str, path: str) -> bool:
        """Whether `checkpoint` holds the teacher state at `path` (on every process under ZeRO-3, where each saves its
        own shards). Holding only some processes' shards, or the teacher in another layout, is an error: restarting
        from the policy would silently drop a teacher that exists."""
        found = os.path.exists(path)
        if self._sharded:  # every process decides alike: a restart from the policy is collective
            everywhere = self.accelerator.gather(torch.tensor([found], device=self.accelerator.device))
            if everywhere.any() and not everywhere.all():
                missing = (~everywhere.bool()).nonzero().squeeze(1).tolist()
                raise ValueError(
                    f"{checkpoint} lacks the SRPO teacher shards of processes {missing} (DeepSpeed ZeRO-3 and FSDP2 "
                    "save one file per process): resume from a checkpoint that holds them all, or delete every "
                    f"{TEACHER_STATE_FILE.replace('.safetensors', '-rank*')} file there to restart the teacher from "
                    "the resumed policy."
                )
            found = bool(everywhere.all())
        if not found:
            self._refuse_teacher_in_another_layout(checkpoint, path)
        return found

    def _refuse_teacher_in_another_layout(self, checkpoint: str, path: str) -> None:
        """An error when `checkpoint` holds teacher files other than `path`: ZeRO-3's per-process shards of another
        number of processes, or one whole-teacher file against ZeRO-3's shards (or the other way round)."""
        stem = TEACHER_STATE_FILE.removesuffix(".safetensors")
        others = self._teacher_files(checkpoint)
        if not others:
            return
        shards = re.fullmatch(rf"{stem}-rank\d+-of-(\d+)\.safetensors", others[0])
        saved_by = (
            f"saved by {shards.group(1)} processes under DeepSpeed ZeRO-3 or FSDP2"
            if shards
            else "saved whole, without ZeRO-3 or FSDP2"
        )
        raise ValueError(
            f"{checkpoint} holds the SRPO teacher as {', '.join(others[:2])}{', ...' if len(others) > 2 else ''} "
            f"({saved_by}), but this run needs {os.path.basename(path)}: resume with the launch configuration that "
            "saved it, or delete those files to restart the teacher from the resumed policy."
        )

    def _teacher_state_path(self, folder: str) -> str:
        if not self._sharded:
            return os.path.join(folder, TEACHER_STATE_FILE)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return os.path.join(folder, TEACHER_STATE_FILE.replace(".safetensors", f"-rank{rank}-of-{world}.safetensors"))

"""The self-teacher is training state (method §4): every checkpoint holds it, `resume_from_checkpoint` restores it.

`TeacherCheckpointing` is mixed into `SRPOTrainer` ahead of `GRPOTrainer`, at Trainer's two checkpoint hooks: the
teacher is written with the optimizer (before Trainer writes `trainer_state.json`, pushes and rotates checkpoints),
atomically, one file per process when weights are sharded (DeepSpeed ZeRO-3, FSDP2); on resume it is read back,
checked (damaged, non-finite, another layout: errors naming the file and the fix), or restarted from the resumed
policy when the checkpoint holds none.
"""

import os
import re
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TEACHER_STATE_FILE = "srpo_teacher.safetensors"


class TeacherCheckpointing:
    """Checkpoint hooks for a trainer with a `teacher` (a `SelfTeacher`, or None), `_sharded` and
    `shard_teacher_like_policy`: `SRPOTrainer`."""

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        # Here, not after `_save_checkpoint`: Trainer then writes trainer_state.json, pushes the checkpoint and rotates
        # old ones away, so a checkpoint is complete only with its teacher and a failed write keeps the older ones.
        # (`save_only_model` checkpoints hold no optimizer and no teacher: a resume restarts it from the policy.)
        # Under ZeRO-3 and FSDP2 every process holds (and saves) its own shards of the teacher.
        if self.teacher is not None and (self.args.should_save or self._sharded):
            self._write_teacher_state(self._teacher_state_path(output_dir))
            if self._sharded:
                self.accelerator.wait_for_everyone()  # every shard is on disk before process 0 rotates checkpoints

    def _write_teacher_state(self, path: str) -> None:
        """Write the teacher's state to `path` atomically: a crash mid-write leaves no file there, never a cut one."""
        partial = f"{path}.partial"
        try:
            save_file(self.teacher.state_dict(), partial)
            with open(partial, "rb") as file:
                os.fsync(file.fileno())  # on disk before the name says the checkpoint holds it
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self.shard_teacher_like_policy()  # before its shards are restored
        if self.teacher is not None and checkpoint is not None:
            self._load_teacher_state(checkpoint)

    def _load_teacher_state(self, checkpoint: str) -> None:
        """Restore the teacher from `checkpoint`, or restart it from the resumed policy (already loaded by Trainer)
        when the checkpoint holds no teacher state; a damaged or mismatched state is an error naming its file."""
        path = self._teacher_state_path(checkpoint)
        file_name = os.path.basename(path)
        fix = (
            f"resume from an earlier checkpoint, or delete {file_name} to restart the teacher from the resumed policy"
        )
        if not self._teacher_state_found(checkpoint, path):
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
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"Cannot read the SRPO teacher state {path} ({error}): the file is damaged or incomplete; {fix}."
            ) from error
        non_finite = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if non_finite:
            more = f" and {len(non_finite) - 1} more tensors" if len(non_finite) > 1 else ""
            raise ValueError(
                f"The SRPO teacher state {path} holds non-finite values in {non_finite[0]}{more}: that teacher would "
                f"turn the policy to NaN in one step; {fix}."
            )
        try:
            self.teacher.load_state_dict({name: t.to(self.accelerator.device) for name, t in state.items()})
        except ValueError as error:
            raise ValueError(
                f"Cannot resume the SRPO teacher from {path}: {error}. Resume with the model (and, under DeepSpeed "
                f"ZeRO-3 or FSDP2, the number of processes) that saved it, or delete {file_name} to restart the teacher from "
                "the resumed policy."
            ) from error

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

    @staticmethod
    def _refuse_teacher_in_another_layout(checkpoint: str, path: str) -> None:
        """An error when `checkpoint` holds teacher files other than `path`: ZeRO-3's per-process shards of another
        number of processes, or one whole-teacher file against ZeRO-3's shards (or the other way round)."""
        stem = TEACHER_STATE_FILE.removesuffix(".safetensors")
        others = sorted(f for f in os.listdir(checkpoint) if f.startswith(stem) and f.endswith(".safetensors"))
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

"""The teacher is training state: checkpoints restore it (LoRA too), a failed or damaged save loses nothing silently,
while `save_model`/`push_to_hub` write the policy alone, with an SRPO model card made by TRL's card machinery. All
offline."""

import math
import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from test_trainer import logged, make_trainer, parameters
from transformers import AutoModelForCausalLM, TrainerCallback

import srpo_trl.checkpointing
from srpo_trl.checkpointing import TEACHER_STATE_FILE
from srpo_trl.teacher import TEACHER_ADAPTER
from srpo_trl.testbed.model import build_tiny_model

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def test_lora_resume_restores_teacher_adapter_exactly(char_tokenizer, tmp_path):
    settings = dict(max_steps=4, teacher_update_rate=0.3, learning_rate=1e-2)
    straight = make_trainer(char_tokenizer, tmp_path / "straight", peft_config=LoraConfig(**LORA), **settings)
    straight.train()
    checkpointed = dict(settings, save_strategy="steps", save_steps=2)
    make_trainer(char_tokenizer, tmp_path / "resumed", peft_config=LoraConfig(**LORA), **checkpointed).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert not (checkpoint / TEACHER_ADAPTER).exists(), "the checkpoint's model files hold the policy adapter only"
    resumed = make_trainer(char_tokenizer, tmp_path / "resumed", peft_config=LoraConfig(**LORA), **checkpointed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert logged(resumed, "loss") == logged(straight, "loss")
    expected = parameters(straight)
    for name, value in parameters(resumed).items():  # policy adapter, teacher adapter and the frozen base
        assert torch.equal(value, expected[name]), name
    teacher_names = resumed.teacher.weight_names()
    assert any(not torch.equal(expected[n], expected[n.replace(TEACHER_ADAPTER, "default")]) for n in teacher_names)


def test_a_crash_writing_the_teacher_keeps_the_previous_checkpoint(char_tokenizer, tmp_path, monkeypatch):
    # The write of checkpoint-2's teacher dies half-way, with save_total_limit=1: checkpoint-1 must not have been
    # rotated away, no checkpoint may look complete without its teacher, and checkpoint-1 resumes exactly.
    straight = make_trainer(char_tokenizer, tmp_path / "straight", teacher_update_rate=0.3)
    straight.train()
    saving = dict(teacher_update_rate=0.3, save_strategy="steps", save_steps=1, save_total_limit=1)
    writes = []

    def crash_on_second_write(tensors, path):
        writes.append(path)
        save_file(tensors, path)
        if len(writes) == 2:
            with open(path, "r+b") as file:
                file.truncate(os.path.getsize(path) // 2)
            raise OSError("No space left on device")

    monkeypatch.setattr(srpo_trl.checkpointing, "save_file", crash_on_second_write)
    with pytest.raises(OSError, match="No space left"):
        make_trainer(char_tokenizer, tmp_path / "run", **saving).train()
    monkeypatch.undo()
    first, second = tmp_path / "run" / "checkpoint-1", tmp_path / "run" / "checkpoint-2"
    assert (first / TEACHER_STATE_FILE).exists() and (first / "trainer_state.json").exists()
    assert sorted(os.listdir(second)) and not {TEACHER_STATE_FILE, "trainer_state.json"} & set(os.listdir(second))
    assert not [name for name in os.listdir(second) if name.startswith(TEACHER_STATE_FILE)], "a cut file is left"
    resumed = make_trainer(char_tokenizer, tmp_path / "run", **saving)
    resumed.train(resume_from_checkpoint=str(first))
    assert logged(resumed, "loss") == logged(straight, "loss")
    teacher = dict(straight.teacher.model.named_parameters())
    for name, value in resumed.teacher.model.named_parameters():
        assert torch.equal(value, teacher[name]), name


def saved_checkpoint(char_tokenizer, tmp_path):
    make_trainer(char_tokenizer, tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
    return tmp_path / "checkpoint-1"


class WeightsAtTrainBegin(TrainerCallback):
    """The policy's and the teacher's weights when training begins: as a resume leaves them."""

    def __init__(self, trainer):
        self.trainer, self.policy, self.teacher = trainer, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.policy = parameters(self.trainer)
        self.teacher = {name: p.detach().clone() for name, p in self.trainer.teacher.model.named_parameters()}


def resume(char_tokenizer, tmp_path, checkpoint) -> WeightsAtTrainBegin:
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    weights = WeightsAtTrainBegin(trainer)
    trainer.add_callback(weights)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return weights


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def with_nan(path):
    state = load_file(path)
    state["model.layers.0.mlp.up_proj.weight"][1, 2] = math.nan
    save_file(state, path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (cut_in_half, r"Cannot read the SRPO teacher state .*checkpoint-1/srpo_teacher\.safetensors .*damaged"),
        (lambda path: path.write_bytes(b""), r"Cannot read the SRPO teacher state .*checkpoint-1/srpo_teacher"),
        (
            with_nan,
            r"teacher state .*checkpoint-1/srpo_teacher\.safetensors holds non-finite values in model\.layers\.0",
        ),
    ],
    ids=["truncated", "empty", "nan"],
)
def test_a_damaged_teacher_state_names_the_file_and_the_fix(char_tokenizer, tmp_path, damage, message):
    checkpoint = saved_checkpoint(char_tokenizer, tmp_path)
    damage(checkpoint / TEACHER_STATE_FILE)
    with pytest.raises(ValueError, match=message) as error:
        resume(char_tokenizer, tmp_path, checkpoint)
    assert "resume from an earlier checkpoint, or delete srpo_teacher.safetensors" in str(error.value)


def test_resume_without_teacher_state_restarts_the_teacher_from_the_resumed_policy(char_tokenizer, tmp_path):
    checkpoint = saved_checkpoint(char_tokenizer, tmp_path)
    (checkpoint / TEACHER_STATE_FILE).unlink()
    with pytest.warns(
        UserWarning, match=r"checkpoint-1 holds no SRPO teacher state .*restarts from the resumed policy"
    ):
        resumed = resume(char_tokenizer, tmp_path, checkpoint)
    initial = parameters(make_trainer(char_tokenizer, tmp_path / "initial"))
    assert any(not torch.equal(resumed.policy[n], initial[n]) for n in initial), "the saved step moved the policy"
    for name, value in resumed.teacher.items():
        assert torch.equal(value, resumed.policy[name]), name


def test_lora_save_model_writes_the_policy_adapter_only(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path / "run", peft_config=LoraConfig(**LORA), max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert saved and not any(TEACHER_ADAPTER in key for key in saved)
    assert not (tmp_path / "saved" / TEACHER_ADAPTER).exists()
    assert TEACHER_ADAPTER in trainer.model.peft_config, "saving must leave the teacher adapter in place"
    policy = {n: p for n, p in trainer.model.named_parameters() if ".default." in n}
    assert len(saved) == len(policy)


class FakeHub:
    """Stands in for the Hub client `Trainer.push_to_hub` uses: records what would be uploaded."""

    def __init__(self):
        self.uploaded = None

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        self.uploaded = {
            os.path.relpath(os.path.join(root, name), folder_path)
            for root, _, names in os.walk(folder_path)
            for name in names
        }
        self.uploaded = {path for path in self.uploaded if not path.startswith(("checkpoint-", "_"))}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_push_to_hub_uploads_the_policy_with_an_srpo_model_card(char_tokenizer, tmp_path, monkeypatch, lora):
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    trainer = make_trainer(
        char_tokenizer, tmp_path / "run", peft_config=LoraConfig(**LORA) if lora else None, max_steps=1
    )
    trainer.train()
    trainer.push_to_hub()
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert weights in hub.uploaded and "README.md" in hub.uploaded
    assert not any(TEACHER_ADAPTER in path for path in hub.uploaded), "the teacher is training state, never pushed"
    assert not any(TEACHER_ADAPTER in key for key in load_file(tmp_path / "run" / weights))
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Sample-Routed Policy Optimization" in card
    assert "https://huggingface.co/papers/2604.02288" in card
    assert "@article{li2026srpo" in card
    for tag in ("trl", "srpo"):
        assert f"- {tag}\n" in card, tag


def test_save_model_writes_a_model_card_that_names_a_local_base_model(char_tokenizer, tmp_path):
    base = tmp_path / "base"
    build_tiny_model(char_tokenizer, seed=0).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = make_trainer(char_tokenizer, tmp_path / "run", model=model, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "Sample-Routed Policy Optimization" in card
    assert f"a fine-tuned version of the local model `{base}`" in card
    assert "[None]" not in card

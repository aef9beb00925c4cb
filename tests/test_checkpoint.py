"""The teacher is training state: checkpoints restore it (LoRA too), while `save_model`/`push_to_hub` write the policy
alone, with an SRPO model card made by TRL's card machinery. All offline."""

import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from test_trainer import logged, make_trainer, parameters

from srpo_trl.teacher import TEACHER_ADAPTER

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

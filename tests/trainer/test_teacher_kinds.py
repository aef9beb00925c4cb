"""Teacher kinds (`teacher_model_kind`): each teacher is what it should be after training steps (base: the initial
weights; live: the policy; trust_region: `(1-η) θ_0 + η θ`), costs what it must, resumes exactly, with PEFT too."""

import pytest
import torch
from helpers.tiny_trainer import logged, make_trainer, parameters
from peft import LoraConfig

from srpo_trl.checkpointing import TEACHER_STATE_FILE
from srpo_trl.teacher import TEACHER_ADAPTER, SelfTeacher
from srpo_trl.testbed.model import build_tiny_model

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def perturb_(model, generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.01)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_base_teacher_stays_the_initial_model_and_keeps_no_accumulators(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    teacher = SelfTeacher(policy, update_rate=0.5, kind="base")
    start = snapshot(policy)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        perturb_(policy, generator)
        teacher.update(policy)
    for name, weight in teacher.model.named_parameters():
        assert torch.equal(weight, start[name]), name
        assert not weight.requires_grad
    assert teacher.accumulators == {}, "a frozen teacher needs no fp32 accumulators"
    assert all(state.shape == (2,) for state in teacher.state_dict().values()), "fingerprints, not weights"


def test_live_teacher_is_the_policy_without_a_copy(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0)
    teacher = SelfTeacher(policy, update_rate=0.05, kind="live")
    assert teacher.model is policy and teacher.weight_names() == [] and teacher.state_dict() == {}
    policy.train()
    with teacher.active() as model:
        assert model is policy and not model.training, "scored in eval mode: no dropout in its targets"
    assert policy.training
    assert all(p.requires_grad for p in policy.parameters()), "the live teacher must not freeze the policy"


def test_trust_region_teacher_mixes_the_initial_and_current_weights(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    teacher = SelfTeacher(policy, update_rate=0.25, kind="trust_region")
    start = {name: p.detach().float() for name, p in policy.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        perturb_(policy, generator)
        teacher.update(policy)
    for name, weight in teacher.model.named_parameters():
        expected = 0.75 * start[name] + 0.25 * policy.get_parameter(name).float()  # not path-dependent, unlike EMA
        assert torch.allclose(weight.float(), expected.to(torch.bfloat16).float()), name
        assert torch.equal(teacher.accumulators[name], start[name]), "the initial weights, kept in fp32"


def test_anchored_teachers_refuse_a_model_other_than_the_initial_one(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0)
    state = SelfTeacher(policy, update_rate=0.25, kind="trust_region").state_dict()
    SelfTeacher(build_tiny_model(char_tokenizer, seed=0), 0.25, kind="trust_region").load_state_dict(state)
    other = SelfTeacher(build_tiny_model(char_tokenizer, seed=1), 0.25, kind="trust_region")
    with pytest.raises(ValueError, match="pass the model the run started from"):
        other.load_state_dict(state)


@pytest.mark.parametrize("kind", ["base", "live", "trust_region"])
def test_teacher_after_training_steps(char_tokenizer, tmp_path, kind):
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2, teacher_update_rate=0.3, teacher_model_kind=kind)
    start = parameters(trainer)
    trainer.train()
    assert any(logged(trainer, "srpo/loss/sdpo")), "the test needs distilled rollouts"
    now = parameters(trainer)
    assert any(not torch.equal(start[n], now[n]) for n in start), "the policy must have moved"
    if kind == "live":
        assert trainer.teacher.model is trainer.model
        return
    for name, weight in trainer.teacher.model.named_parameters():
        expected = start[name] if kind == "base" else 0.7 * start[name] + 0.3 * now[name]
        assert torch.allclose(weight, expected, atol=1e-7), name


@pytest.mark.parametrize("kind", ["base", "live", "trust_region"])
def test_resume_is_exact(char_tokenizer, tmp_path, kind):
    settings = dict(max_steps=4, teacher_update_rate=0.3, teacher_model_kind=kind)
    straight = make_trainer(char_tokenizer, tmp_path / "straight", **settings)
    straight.train()
    saving = dict(settings, save_strategy="steps", save_steps=2)
    make_trainer(char_tokenizer, tmp_path / "resumed", **saving).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / TEACHER_STATE_FILE).stat().st_size < 4096, "nothing but fingerprints (or nothing) is saved"
    resumed = make_trainer(char_tokenizer, tmp_path / "resumed", **saving)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_training(resumed, straight)


def assert_same_training(resumed, straight) -> None:
    """The same losses, and bit-identical policy and teacher weights (a PEFT teacher adapter is in the policy's)."""
    assert logged(resumed, "loss") == logged(straight, "loss")
    for ours, theirs in ((resumed.model, straight.model), (resumed.teacher.model, straight.teacher.model)):
        expected = dict(theirs.named_parameters())
        assert all(torch.equal(value, expected[name]) for name, value in ours.named_parameters())


def test_resume_with_the_checkpoints_policy_as_model_is_refused(char_tokenizer, tmp_path):
    saving = dict(max_steps=2, teacher_model_kind="base", save_strategy="steps", save_steps=2)
    make_trainer(char_tokenizer, tmp_path, **saving).train()
    trained = build_tiny_model(char_tokenizer, seed=1)  # stands for the checkpoint's policy passed as the model
    resumed = make_trainer(char_tokenizer, tmp_path, model=trained, **dict(saving, max_steps=3))
    with pytest.raises(ValueError, match="pass the model the run started from"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def lora_trainer(char_tokenizer, path, kind, **settings):
    return make_trainer(
        char_tokenizer,
        path,
        peft_config=LoraConfig(**LORA),
        teacher_model_kind=kind,
        teacher_update_rate=0.3,
        **settings,
    )


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["base", "live", "trust_region"])
def test_lora_teachers(char_tokenizer, tmp_path, kind):
    trainer = lora_trainer(char_tokenizer, tmp_path, kind, max_steps=2)
    start = parameters(trainer)
    trainer.train()
    policy, teacher = trainer.model, trainer.teacher
    has_adapter = TEACHER_ADAPTER in policy.peft_config
    assert has_adapter == (kind == "trust_region"), "only a teacher with weights of its own gets an adapter"
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    with teacher.active() as model:
        scored = logits(model, ids)
    if kind == "base":
        with policy.disable_adapter():
            assert torch.equal(scored, logits(policy, ids))
        policy.eval()
        assert not torch.allclose(scored, logits(policy, ids)), "the student's adapter must have moved"
    elif kind == "live":
        policy.eval()
        assert torch.equal(scored, logits(policy, ids))
    else:
        now = parameters(trainer)
        for name in teacher.weight_names():
            student = name.replace(TEACHER_ADAPTER, "default")
            expected = 0.7 * start[student] + 0.3 * now[student]
            assert torch.allclose(now[name], expected, atol=1e-7), name


def test_lora_trust_region_resume_is_exact(char_tokenizer, tmp_path):
    straight = lora_trainer(char_tokenizer, tmp_path / "straight", "trust_region", max_steps=4)
    straight.train()
    saving = dict(max_steps=4, save_strategy="steps", save_steps=2)
    lora_trainer(char_tokenizer, tmp_path / "resumed", "trust_region", **saving).train()
    resumed = lora_trainer(char_tokenizer, tmp_path / "resumed", "trust_region", **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert_same_training(resumed, straight)


def test_resume_with_another_teacher_kind_is_refused(char_tokenizer, tmp_path):
    saving = dict(max_steps=2, save_strategy="steps", save_steps=2)
    make_trainer(char_tokenizer, tmp_path, **saving).train()
    resumed = make_trainer(char_tokenizer, tmp_path, teacher_model_kind="trust_region", **dict(saving, max_steps=3))
    with pytest.raises(ValueError, match="holds a teacher_model_kind='ema' teacher, but this run's is 'trust_region'"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize("init", [False, "pissa"])
def test_base_teacher_is_the_initial_student_whatever_the_lora_initialisation(char_tokenizer, tmp_path, init):
    # Before: "adapters disabled" was the teacher, 0.4-0.7 in max |Δ logits| from the initial student for a LoRA
    # that does not start as the identity.
    torch.manual_seed(0)
    trainer = make_trainer(
        char_tokenizer, tmp_path, peft_config=LoraConfig(**LORA, init_lora_weights=init), teacher_model_kind="base",
        max_steps=2,
    )  # fmt: skip
    policy, teacher, ids = trainer.model, trainer.teacher, torch.tensor([[1, 5, 7, 9, 4]])
    policy.eval()
    initial = logits(policy, ids)
    with teacher.active() as model:
        torch.testing.assert_close(logits(model, ids), initial, rtol=0, atol=1e-6)
    trainer.train()
    with teacher.active() as model:
        torch.testing.assert_close(logits(model, ids), initial, rtol=0, atol=1e-6)
    policy.eval()
    assert not torch.allclose(logits(policy, ids), initial), "the student's adapter must have moved"


def test_base_teacher_of_a_default_lora_keeps_no_copy(char_tokenizer, tmp_path):
    trainer = lora_trainer(char_tokenizer, tmp_path, "base")
    assert TEACHER_ADAPTER not in trainer.model.peft_config and not trainer.teacher.owns_weights

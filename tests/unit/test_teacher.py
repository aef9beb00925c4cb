"""The self-teacher: fp32 EMA (closed form), bf16 models that still move, PEFT adapters, state round trips."""

import pytest
import torch

from srpo_trl.teacher import TEACHER_ADAPTER, SelfTeacher, ema_update_
from srpo_trl.testbed.model import build_tiny_model


def test_ema_update_formula():
    accumulator = torch.tensor([1.0, 2.0])
    ema_update_(accumulator, torch.tensor([3.0, 2.0]), 0.25)
    assert torch.allclose(accumulator, torch.tensor([1.5, 2.0]))


def test_teacher_is_closed_form_ema_of_the_policy_trajectory(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0)
    teacher = SelfTeacher(policy, update_rate=0.1)
    start = {name: p.detach().clone().double() for name, p in policy.named_parameters()}
    trajectory = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(6):
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
            trajectory.append({name: p.detach().clone().double() for name, p in policy.named_parameters()})
            teacher.update(policy)
    # θ_T(N) = (1-η)^N θ_0 + Σ_n η (1-η)^(N-n) θ_n
    eta, steps = 0.1, len(trajectory)
    for name, weight in teacher.model.named_parameters():
        expected = (1 - eta) ** steps * start[name]
        for n, point in enumerate(trajectory, start=1):
            expected = expected + eta * (1 - eta) ** (steps - n) * point[name]
        assert torch.allclose(weight.double(), expected, atol=1e-6), name
        assert not weight.requires_grad


def test_bf16_teacher_moves_where_a_bf16_ema_would_stall(char_tokenizer):
    """A step of one bf16 ulp times η=0.05 rounds away in bf16; the fp32 accumulator keeps it."""
    policy = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    teacher = SelfTeacher(policy, update_rate=0.05)
    naive = {name: p.detach().clone() for name, p in policy.named_parameters()}
    start = {name: p.detach().clone() for name, p in policy.named_parameters()}
    with torch.no_grad():
        for p in policy.parameters():  # the policy moves by ~2 ulps once (what lr 1e-6 Adam steps add up to)
            p.copy_(p.float() * (1 + 2**-7) + 2**-10)
        for _ in range(30):
            teacher.update(policy)
            for name, p in policy.named_parameters():
                naive[name].mul_(0.95).add_(p, alpha=0.05)  # the bf16 EMA TRL's SDPOTrainer does
    moved = sum((teacher.model.get_parameter(n) != start[n]).float().mean() for n in start) / len(start)
    naive_moved = sum((naive[n] != start[n]).float().mean() for n in start) / len(start)
    assert moved > 0.9, f"fp32-accumulated teacher moved on {moved:.0%} of weights"
    assert naive_moved < 0.5, "the bf16 EMA was expected to stall; the test no longer shows the difference"
    # and the accumulator tracks the closed form 1 - 0.95^30 of the gap
    name = "model.layers.0.mlp.up_proj.weight"
    gap = policy.get_parameter(name).float() - start[name].float()
    expected = start[name].float() + (1 - 0.95**30) * gap
    assert torch.allclose(teacher.accumulators[name], expected, atol=1e-5)


def test_state_dict_round_trip_is_exact(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    teacher = SelfTeacher(policy, update_rate=0.3)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    teacher.update(policy)
    state = teacher.state_dict()
    assert all(t.dtype == torch.float32 for t in state.values())
    fresh = SelfTeacher(build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16), update_rate=0.3)
    fresh.load_state_dict(state)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name])
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict({"bogus": torch.zeros(1)})


def test_peft_teacher_is_an_adapter_on_the_shared_base(char_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(char_tokenizer, seed=0)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    parameters_before = sum(p.numel() for p in policy.parameters())
    teacher = SelfTeacher(policy, update_rate=0.5)
    added = sum(p.numel() for p in policy.parameters()) - parameters_before
    adapter = sum(p.numel() for n, p in policy.named_parameters() if ".default." in n)
    assert added == adapter, "the teacher must add one adapter, not a second base model"
    assert policy.active_adapter == "default"
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        student_logits = policy(input_ids=ids).logits
        with teacher.active() as model:
            teacher_logits = model(input_ids=ids).logits
    assert torch.allclose(student_logits, teacher_logits), "the teacher adapter starts equal to the student's"
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".default." in n:
                p.add_(1.0)
    teacher.update(policy)
    name = next(n for n, _ in policy.named_parameters() if f".{TEACHER_ADAPTER}." in n)
    student_name = name.replace(f".{TEACHER_ADAPTER}.", ".default.")
    start = policy.get_parameter(student_name) - 1.0
    assert torch.allclose(policy.get_parameter(name), start + 0.5, atol=1e-6)


def shard_like_zero3(model, regathered):
    """Make `model` look partitioned as ZeRO-3 leaves it on one of two processes: each weight's data is empty (kept
    whole for 1-d "persistent" weights), `ds_tensor` holds this process's half, and re-gathering is recorded."""
    for weight in model.parameters():
        half = (weight.numel() + 1) // 2
        weight.ds_tensor = weight.detach().flatten()[:half].clone()
        weight.ds_persist = weight.dim() == 1
        weight.partition = lambda params: None
        weight.all_gather = lambda params: regathered.append(len(params))
        if not weight.ds_persist:
            weight.data = torch.empty(0, dtype=weight.dtype)


def test_zero3_ema_state_and_restore_touch_this_process_shards_only(char_tokenizer):
    policy = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    twin = build_tiny_model(char_tokenizer, seed=0, dtype=torch.bfloat16)
    regathered = []
    shard_like_zero3(policy, [])
    shard_like_zero3(twin, regathered)
    teacher = SelfTeacher(policy, update_rate=0.25, model=twin)
    start = {name: w.ds_tensor.float().clone() for name, w in twin.named_parameters()}
    with torch.no_grad():
        for weight in policy.parameters():
            weight.ds_tensor.add_(1.0)
    teacher.update(policy)
    moved = {name: w.ds_tensor.float() for name, w in policy.named_parameters()}
    persistent = sum(w.ds_persist for w in twin.parameters())
    assert regathered == [persistent] and persistent > 0, "weights kept whole are gathered again from their shards"
    for name, weight in twin.named_parameters():
        assert teacher.accumulators[name].shape == weight.ds_tensor.shape
        assert teacher.accumulators[name].dtype == torch.float32
        expected = start[name] + 0.25 * (moved[name] - start[name])
        assert torch.allclose(teacher.accumulators[name], expected, atol=1e-6), name
        assert torch.equal(weight.ds_tensor, teacher.accumulators[name].to(torch.bfloat16)), name
        assert weight.ds_persist or weight.numel() == 0, "no whole parameter was materialised"
    state = teacher.state_dict()
    assert all(state[name].shape == w.ds_tensor.shape for name, w in twin.named_parameters())
    fresh_twin = build_tiny_model(char_tokenizer, seed=1, dtype=torch.bfloat16)
    shard_like_zero3(fresh_twin, regathered)
    fresh = SelfTeacher(policy, update_rate=0.25, model=fresh_twin)
    fresh.load_state_dict(state)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with pytest.raises(ValueError, match="same number of processes"):
        fresh.load_state_dict({name: tensor[:-1] for name, tensor in state.items()})

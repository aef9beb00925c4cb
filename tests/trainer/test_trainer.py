"""SRPOTrainer end to end on a tiny local Qwen3: parity with GRPOTrainer, accumulation, teacher calls, EMA,
metrics, degenerate groups, checkpoints."""

import math
import re
import warnings

import pytest
import torch
from datasets import Dataset
from helpers.references import (
    reference_distillation_loss,
    reference_teacher_rows,
    sharp_tiny_model,
    train_one_step_recording_the_batch,
)
from helpers.tiny_trainer import (
    PROMPTS,
    RecordingReward,
    count_rows,
    expected_routing,
    first_letter_reward,
    graded_reward,
    logged,
    make_args,
    make_trainer,
    parameters,
    patterned_reward,
)
from helpers.vllm_stand_in import record_distillation, rollout_importance_ratio, stand_in_vllm
from transformers import TrainerCallback
from trl import GRPOTrainer

from srpo_trl import SRPOTrainer
from srpo_trl.teacher import TEACHER_ADAPTER
from srpo_trl.testbed.model import build_tiny_model


@pytest.mark.parametrize("routing", ["grpo", "srpo"])
def test_parity_with_grpo_trainer_when_nothing_is_routed(char_tokenizer, tmp_path, routing):
    reference = make_trainer(char_tokenizer, tmp_path / "grpo", reward=graded_reward, trainer_class=GRPOTrainer)
    reference.train()
    ours = make_trainer(char_tokenizer, tmp_path / routing, reward=graded_reward, routing=routing)
    ours.train()
    assert (ours.teacher is None) == (routing == "grpo")
    assert logged(ours, "loss") == logged(reference, "loss")
    assert logged(ours, "reward") == logged(reference, "reward")
    expected = parameters(reference)
    for name, value in parameters(ours).items():
        assert torch.equal(value, expected[name]), name
    if routing == "srpo":
        assert logged(ours, "srpo/route/sdpo_frac") == [0.0, 0.0]
        assert logged(ours, "srpo/route/fallback_frac") == [1.0, 1.0]


@pytest.mark.parametrize(
    "prompt, message",
    [
        (
            [{"role": "system", "content": "Spell a"}],
            r"train_dataset row 0: .*no user turn \(roles found: \['system'\]\)",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "Spell a"}]}], r"row 0: .*got list \(multimodal"),
    ],
    ids=["no-user-turn", "multimodal"],
)
def test_prompts_the_teacher_cannot_rewrite_fail_at_construction(char_tokenizer, tmp_path, prompt, message):
    # Not when a rollout of theirs is first routed, maybe hours into training; GRPO needs no teacher prompt.
    prompts = Dataset.from_dict({"prompt": [prompt] * 16})

    def build(routing):
        args = make_args(tmp_path, routing=routing)
        model = build_tiny_model(char_tokenizer)
        return SRPOTrainer(
            model, first_letter_reward, args=args, train_dataset=prompts, processing_class=char_tokenizer
        )

    with pytest.raises(ValueError, match=message):
        build("srpo")
    build("grpo")


def test_rows_without_room_for_the_demonstration_are_trained_by_grpo(char_tokenizer, tmp_path):
    # max_teacher_prompt_length below every prompt: no teacher could see a correct answer, so SRPO is GRPO exactly
    # (not a distillation towards a teacher without the demonstration), says so once, and counts the rows.
    reference = make_trainer(char_tokenizer, tmp_path / "grpo", trainer_class=GRPOTrainer)
    reference.train()
    ours = make_trainer(char_tokenizer, tmp_path / "srpo", max_teacher_prompt_length=1, log_completions=True)
    counter = count_rows(ours.teacher.model.model)
    with pytest.warns(
        UserWarning, match=r"max_teacher_prompt_length=1 leaves no room for the demonstration"
    ) as caught:
        ours.train()
    assert sum("leaves no room" in str(w.message) for w in caught) == 1
    assert counter["calls"] == 0
    assert logged(ours, "loss") == logged(reference, "loss")
    expected = parameters(reference)
    for name, value in parameters(ours).items():
        assert torch.equal(value, expected[name]), name
    assert logged(ours, "srpo/route/sdpo_frac") == [0.0, 0.0]
    assert logged(ours, "srpo/teacher_prompt_dropped_frac") == [1.0, 1.0]
    assert logged(ours, "srpo/teacher_prompt_truncated_frac") == []  # no teacher prompt left: left out of the logs
    assert "sdpo" not in ours._logs["extra"]["route"] and "failed" in ours._logs["extra"]["route"]


def always_one(completions, **kwargs):
    """A 0/1 reward every completion earns (a format check, say): beside first_letter_reward the sum is 1 or 2."""
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "reward, message",
    [
        ([first_letter_reward, always_one], r"Every rollout .* \[1\.0, 2\.0\].*correct_frac stays 1.*weighted sum"),
        (graded_reward, r"No rollout .* \[0\.0, 0\.\d+\].*teacher_available_frac stays 0.*plain GRPO"),
        (first_letter_reward, None),
        (always_one, None),  # under routing="sdpo", which distils correct rollouts too
    ],
    ids=["two-0/1-rewards", "never-reached", "reachable", "sdpo-all-correct"],
)
def test_a_threshold_that_routes_nothing_is_reported_after_five_batches(char_tokenizer, tmp_path, reward, message):
    routing = "sdpo" if reward is always_one else "srpo"
    trainer = make_trainer(char_tokenizer, tmp_path, reward=reward, max_steps=6, routing=routing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "success_reward_threshold=1.0" in str(w.message)]
    assert len(said) == (message is not None)
    if message is not None:
        assert re.search(message, said[0]) and "first 5 generation batches" in said[0]


def test_routed_fraction_teacher_calls_and_metrics(char_tokenizer, tmp_path):
    reward = RecordingReward(first_letter_reward)
    trainer = make_trainer(char_tokenizer, tmp_path, reward=reward, max_steps=3)
    counter = count_rows(trainer.teacher.model.model)
    trainer.train()
    routed_per_step = [expected_routing(batch) for batch in reward.batches]
    assert counter["rows"] == sum(r for r, _, _, _ in routed_per_step) > 0, "the teacher scores routed rows only"
    # one teacher prompt per group with routed rollouts, computed once whatever the number of its routed rollouts
    assert counter["prefix_rows"] == sum(g for _, _, _, g in routed_per_step) < counter["rows"]
    assert logged(trainer, "srpo/route/sdpo_frac") == pytest.approx([r / 8 for r, _, _, _ in routed_per_step])
    assert logged(trainer, "srpo/route/correct_frac") == pytest.approx([c for _, c, _, _ in routed_per_step])
    assert logged(trainer, "srpo/route/fallback_frac") == pytest.approx([f for _, _, f, _ in routed_per_step])
    for key in ("loss", "srpo/loss/grpo", "srpo/loss/sdpo", "srpo/teacher_entropy/mean", "srpo/time/teacher_s"):
        assert all(math.isfinite(v) for v in logged(trainer, key)), key
    for entry in trainer.state.log_history[:-1]:
        assert entry["loss"] == pytest.approx(entry["srpo/loss/grpo"] + entry["srpo/loss/sdpo"], abs=1e-6)
        if entry["srpo/route/sdpo_frac"] > 0:
            assert entry["srpo/loss/sdpo"] > 0
            assert entry["srpo/weight/min"] <= 1.0 <= entry["srpo/weight/max"]


def test_no_teacher_pass_when_nothing_is_routed(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, reward=lambda completions, **kw: [0.0] * len(completions))
    counter = count_rows(trainer.teacher.model.model)
    trainer.train()
    assert counter["calls"] == 0
    # Planning an empty batch costs microseconds; the bound leaves room for a busy machine preempting the process
    # (0.013 s measured under load), far below one teacher pass.
    assert logged(trainer, "srpo/time/teacher_s") == [pytest.approx(0.0, abs=0.05)] * 2


def sgd_step_delta(char_tokenizer, tmp_path, **overrides):
    trainer = make_trainer(
        char_tokenizer, tmp_path, optim="sgd", max_steps=1, lr_scheduler_type="constant", **overrides
    )
    before = parameters(trainer)
    trainer.train()
    return {name: value - before[name] for name, value in parameters(trainer).items()}, trainer


@pytest.mark.parametrize("routing", ["srpo", "sdpo"])
def test_gradient_accumulation_equals_one_big_batch(char_tokenizer, tmp_path, routing):
    whole, whole_trainer = sgd_step_delta(char_tokenizer, tmp_path / "whole", routing=routing)
    split, split_trainer = sgd_step_delta(
        char_tokenizer,
        tmp_path / "split",
        routing=routing,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    assert logged(whole_trainer, "reward") == logged(split_trainer, "reward")  # the same rollouts
    assert logged(whole_trainer, "srpo/route/sdpo_frac")[0] > 0
    total = sum(delta.abs().sum() for delta in whole.values())
    assert total > 0
    for name, delta in whole.items():
        assert torch.allclose(split[name], delta, atol=1e-7, rtol=1e-4), name


def test_teacher_is_closed_form_ema_of_the_training_trajectory(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=3, teacher_update_rate=0.2)
    trajectory = [parameters(trainer)]

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trajectory.append(parameters(trainer))

    trainer.add_callback(Record())
    trainer.train()
    eta, steps = 0.2, len(trajectory) - 1
    for name, weight in trainer.teacher.model.named_parameters():
        expected = (1 - eta) ** steps * trajectory[0][name].double()
        for n in range(1, steps + 1):
            expected = expected + eta * (1 - eta) ** (steps - n) * trajectory[n][name].double()
        assert torch.allclose(weight.double(), expected, atol=1e-6), name
    assert any(not torch.equal(trajectory[0][n], trajectory[-1][n]) for n in trajectory[0])


@pytest.mark.parametrize("routing", ["srpo", "sdpo", "advantage_mix"])
def test_degenerate_groups_give_finite_losses_and_the_right_routes(char_tokenizer, tmp_path, routing):
    trainer = make_trainer(
        char_tokenizer, tmp_path, reward=patterned_reward, routing=routing, per_device_train_batch_size=16, max_steps=1
    )
    trainer.train()
    entry = trainer.state.log_history[0]
    assert math.isfinite(entry["loss"])
    assert entry["srpo/route/correct_frac"] == 8 / 16
    assert entry["srpo/route/fallback_frac"] == 4 / 16
    assert entry["srpo/teacher_available_frac"] == 11 / 16  # the lone correct rollout has no teacher
    assert entry["srpo/route/sdpo_frac"] == {"srpo": 4 / 16, "sdpo": 11 / 16, "advantage_mix": 0.0}[routing]


def overflowing_reward(completions, **kwargs):
    return [math.inf] + first_letter_reward(completions)[1:]


def test_infinite_rewards_are_refused_naming_the_reward_function(char_tokenizer, tmp_path):
    # With scale_rewards="none" one infinite reward would turn the policy and the teacher to NaN in one step.
    trainer = make_trainer(char_tokenizer, tmp_path, reward=overflowing_reward, max_steps=1)
    before = parameters(trainer)
    message = r"reward function 'overflowing_reward' returned inf \(for 1 of 8 completions .*Return None"
    with pytest.raises(ValueError, match=message):
        trainer.train()
    for name, value in parameters(trainer).items():
        assert torch.equal(value, before[name]), name


def test_truncated_completions_masked_out_give_finite_loss(char_tokenizer, tmp_path):
    trainer = make_trainer(
        char_tokenizer, tmp_path, mask_truncated_completions=True, max_completion_length=2, max_steps=2
    )
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_resume_restores_teacher_exactly(char_tokenizer, tmp_path):
    straight = make_trainer(char_tokenizer, tmp_path / "straight", max_steps=4, teacher_update_rate=0.3)
    straight.train()
    first = make_trainer(
        char_tokenizer, tmp_path / "resumed", max_steps=4, teacher_update_rate=0.3, save_strategy="steps", save_steps=2
    )
    first.train()
    resumed = make_trainer(
        char_tokenizer, tmp_path / "resumed", max_steps=4, teacher_update_rate=0.3, save_strategy="steps", save_steps=2
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert logged(resumed, "loss") == logged(straight, "loss")  # steps 1-2 come from the checkpoint
    policy = parameters(straight)
    for name, value in parameters(resumed).items():
        assert torch.equal(value, policy[name]), name
    teacher = dict(straight.teacher.model.named_parameters())
    for name, value in resumed.teacher.model.named_parameters():
        assert torch.equal(value, teacher[name]), name


def test_lora_teacher_is_an_ema_adapter_on_the_shared_base(char_tokenizer, tmp_path):
    from peft import LoraConfig

    reward = RecordingReward(first_letter_reward)
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        reward=reward,
        max_steps=3,
        teacher_update_rate=0.5,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    named = dict(trainer.model.named_parameters())
    teacher_names = [n for n in named if ".srpo_teacher." in n]
    start = {n: named[n].detach().clone() for n in teacher_names}
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    counter = count_rows(trainer.model.get_base_model().model)
    trainer.train()
    assert teacher_names and all(not named[n].requires_grad for n in teacher_names)
    assert any(not torch.equal(named[n], start[n]) for n in teacher_names), "the teacher adapter follows the policy"
    for name, value in base.items():
        assert torch.equal(named[name], value), f"base weight {name} changed"
    assert sum(expected_routing(batch)[0] for batch in reward.batches) > 0
    assert all(math.isfinite(v) for v in logged(trainer, "srpo/loss/sdpo"))
    assert counter["calls"] > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_vllm_colocate_sleep_mode_rollout_is_weights_reach_the_sdpo_branch(
    char_tokenizer, tmp_path, monkeypatch, lora
):
    from peft import LoraConfig

    engines = stand_in_vllm(monkeypatch, char_tokenizer)

    distilled = record_distillation(monkeypatch)

    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=True,
    )
    (engine,) = engines
    if lora:  # what vLLM receives is the base merged with the policy's adapter only
        layers = [m for m in trainer.model.modules() if hasattr(m, "merged_adapters")]
        assert layers

        def only_the_policy_adapter_is_merged():
            assert all(layer.merged_adapters == ["default"] for layer in layers)

        monkeypatch.setattr(engine, "probe", only_the_policy_adapter_is_merged)
    trainer.train()

    assert logged(trainer, "srpo/route/sdpo_frac") == [0.5, 0.5]
    # the teacher never reaches vLLM: every tensor sent is the policy's own
    policy = {p.data_ptr() for p in trainer.model.parameters()}
    assert engine.loaded and all(tensor.data_ptr() in policy for _, tensor in engine.loaded)
    assert not any("lora" in name or TEACHER_ADAPTER in name for name, _ in engine.loaded)
    if not lora:
        assert not {p.data_ptr() for p in trainer.teacher.model.parameters()} & policy
    # sleep mode: asleep after start-up, woken for each weight sync and generation, asleep again after it
    assert engine.events == ["sleep2"] + ["wake:weights", "wake:kv_cache", "generate", "sleep2"] * 2
    # rollout IS weights (vLLM's log-probs against the policy's) multiply the distillation term
    assert len(distilled) == 2
    for record in distilled:
        rollout_is = rollout_importance_ratio(record["inputs"])
        assert rollout_is.max() < 0.5, "the stand-in's log-probs differ from the policy's"
        torch.testing.assert_close(record["ratio"], rollout_is, rtol=1e-4, atol=0)


def test_completion_log_shows_each_rollouts_route(char_tokenizer, tmp_path):
    import pandas as pd

    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        reward=patterned_reward,
        per_device_train_batch_size=16,
        max_steps=1,
        log_completions=True,
    )
    trainer.train()
    table = pd.read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    assert table["route"].tolist() == ["correct"] * 4 + ["fallback"] * 4 + ["sdpo", "sdpo", "correct", "sdpo"] + [
        "correct",
        "correct",
        "sdpo",
        "correct",
    ]
    siblings = table["teacher_sibling"].tolist()  # parquet stores the missing siblings as NaN
    assert siblings[8:12] == [2, 2, pytest.approx(math.nan, nan_ok=True), 2] and siblings[14] == 0
    # The advantage column shows what a GRPO term trained with: none for distilled rows.
    distilled = table["route"] == "sdpo"
    assert table["advantage"][distilled].isna().all() and table["advantage"][~distilled].notna().all()


@pytest.mark.parametrize("routing", ["srpo", "sdpo"])
def test_distillation_loss_equals_a_full_vocabulary_reference(char_tokenizer, tmp_path, monkeypatch, routing):
    trainer, prompts, batch = train_one_step_recording_the_batch(
        char_tokenizer, tmp_path, monkeypatch, routing=routing
    )
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0
    expected = reference_distillation_loss(trainer, prompts, batch, routing)
    assert expected > 0.01
    assert logged(trainer, "srpo/loss/sdpo")[0] == pytest.approx(expected, rel=1e-5)


def test_advantage_mix_equals_a_full_vocabulary_reference(char_tokenizer, tmp_path, monkeypatch):
    trainer, prompts, batch = train_one_step_recording_the_batch(
        char_tokenizer, tmp_path, monkeypatch, routing="advantage_mix"
    )
    mask = batch["completion_mask"].bool()
    rewards = torch.tensor(
        [float(trainer.processing_class.decode(i[m], skip_special_tokens=True)[:1].islower())
         for i, m in zip(batch["completion_ids"], mask, strict=True)]
    )  # fmt: skip
    group_advantage = rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)  # scale_rewards="none"
    lam = trainer.args.advantage_mix_lambda
    expected = (lam * group_advantage[:, None] * mask).double()
    teacher_rows = 0
    for row, student, teacher in reference_teacher_rows(trainer, prompts, batch, "advantage_mix"):
        tokens = batch["completion_ids"][row][mask[row]]
        dense = (teacher - student).gather(-1, tokens[:, None]).squeeze(-1)  # π_old = the policy at step 0
        expected[row, mask[row]] += (1 - lam) * dense
        teacher_rows += 1
    assert teacher_rows > 0
    torch.testing.assert_close(batch["advantages"].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layout",
    [dict(per_device_train_batch_size=4, steps_per_generation=2), dict(num_iterations=2)],
    ids=["steps_per_generation=2", "num_iterations=2"],
)
def test_several_optimizer_steps_per_generation_keep_the_scoring_teachers_head(char_tokenizer, tmp_path, layout):
    # Two optimizer steps per generation batch: the EMA moves the teacher between them, so the second step's
    # distillation must use the head the teacher scored with, not the moved one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="steps_per_generation")
        trainer = make_trainer(char_tokenizer, tmp_path, max_steps=2, **layout)
    initial_head = trainer.teacher.model.lm_head.weight.detach().clone()
    trainer.train()
    assert len(logged(trainer, "srpo/route/sdpo_frac")) == 1 and logged(trainer, "srpo/route/sdpo_frac")[0] > 0
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    assert logged(trainer, "srpo/loss/sdpo")[1] > 0  # the second step distils, from the cached batch
    head, _ = trainer.teacher_states["train"].head
    assert torch.equal(head, initial_head)
    assert not torch.equal(trainer.teacher.model.lm_head.weight, initial_head)


def test_bf16_model_distils_like_fp32(char_tokenizer, tmp_path, monkeypatch):
    # Weights, hidden states and the teacher's cached hidden states in bf16 (softmax statistics in fp32): the first
    # step's distillation term is the fp32 one up to bf16 rounding.
    fp32, _, _ = train_one_step_recording_the_batch(char_tokenizer, tmp_path / "fp32", monkeypatch)
    model = sharp_tiny_model(char_tokenizer).to(torch.bfloat16)
    trainer = make_trainer(char_tokenizer, tmp_path / "bf16", model=model, max_steps=1, distillation_topk=5)
    trainer.train()
    assert trainer.teacher_states["train"].hidden.dtype == torch.bfloat16
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    assert logged(trainer, "reward")[0] == logged(fp32, "reward")[0]  # the same rollouts
    assert logged(trainer, "srpo/loss/sdpo")[0] == pytest.approx(logged(fp32, "srpo/loss/sdpo")[0], rel=0.05)


def feedback_reward(completions, log_extra, **kwargs):
    """`first_letter_reward`, plus feedback on every completion through TRL's `log_extra`."""
    log_extra("feedback", [f"no lowercase in {c[0]['content'][:1]!r}" for c in completions])
    return first_letter_reward(completions)


def test_teacher_feedback_reaches_the_teacher_prompt(char_tokenizer, tmp_path, monkeypatch):
    import srpo_trl.losses
    import srpo_trl.prompts

    built = []
    fit = srpo_trl.prompts.fit_teacher_prompt

    def record(prompt, demonstration, tokenize, max_length, feedback=None, **kwargs):
        ids, kept = fit(prompt, demonstration, tokenize, max_length, feedback=feedback, **kwargs)
        built.append((feedback, char_tokenizer.decode(ids)))
        return ids, kept

    monkeypatch.setattr(srpo_trl.prompts, "fit_teacher_prompt", record)
    trainer = make_trainer(char_tokenizer, tmp_path, reward=feedback_reward, max_steps=1, teacher_feedback=True)
    trainer.train()
    assert built and all(feedback.startswith("no lowercase in") for feedback, _ in built)
    assert all(f"unsuccessful earlier attempt:\n\n{feedback}\n" in text for feedback, text in built)
    # Off by default: the same reward's feedback stays out of the teacher prompt.
    built.clear()
    make_trainer(char_tokenizer, tmp_path / "off", reward=feedback_reward, max_steps=1).train()
    assert built and all(feedback is None and "feedback" not in text for feedback, text in built)


def test_teacher_feedback_without_logged_feedback_names_the_fix(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, max_steps=1, teacher_feedback=True)
    with pytest.raises(ValueError, match=r"SRPOConfig.teacher_feedback=True needs one feedback string .* got 0 for 8"):
        trainer.train()


def test_evaluation_routes_and_distils_like_training(char_tokenizer, tmp_path):
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        model=sharp_tiny_model(char_tokenizer),
        eval_dataset=PROMPTS.select(range(4)),
        max_steps=1,
        per_device_eval_batch_size=8,
        distillation_topk=5,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_srpo/route/sdpo_frac"] > 0
    # (`eval_loss` is Trainer's average over batches, weighted by its own batch-size count; the SRPO metrics are
    # plain per-batch means, so the two are not compared here.)
    assert metrics["eval_srpo/loss/sdpo"] > 0 and math.isfinite(metrics["eval_srpo/loss/grpo"])
    assert math.isfinite(metrics["eval_srpo/teacher_entropy/mean"])
    assert trainer.teacher_states["eval"] is None  # released after each eval batch's loss


def test_each_completion_token_goes_through_one_lm_head_pass(char_tokenizer, tmp_path, monkeypatch):
    # GRPOTrainer's fused head projects the GRPO rows' tokens, the distillation the SDPO rows' ones: no vocabulary-
    # sized work twice, and (on CPU as on GPU) none on prompt positions.
    import trl.trainer.utils as trl_utils

    import srpo_trl.losses
    import srpo_trl.prompts

    projected = {"grpo": 0, "sdpo": 0}
    fused, topk = trl_utils._ChunkedLogProbFunction.apply, srpo_trl.losses.student_topk_logps

    def count_fused(hidden, *args):
        projected["grpo"] += hidden.size(0)
        return fused(hidden, *args)

    def count_topk(hidden, *args):
        projected["sdpo"] += hidden.size(0)
        return topk(hidden, *args)

    scored = []
    compute_loss = SRPOTrainer._compute_loss

    def record(self, model, inputs):
        scored.append(inputs)
        projected.update(grpo=0, sdpo=0)
        loss = compute_loss(self, model, inputs)
        scored.append(dict(projected))
        return loss

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", count_fused)
    monkeypatch.setattr(srpo_trl.losses, "student_topk_logps", count_topk)
    monkeypatch.setattr(SRPOTrainer, "_compute_loss", record)
    trainer = make_trainer(
        char_tokenizer, tmp_path, reward=patterned_reward, per_device_train_batch_size=16, max_steps=1
    )
    trainer.train()
    inputs, counts = scored
    tokens = inputs["completion_mask"].bool()
    assert inputs["srpo_distilled_rows"].any() and inputs["srpo_grpo_rows"].any()
    assert counts["grpo"] == tokens[inputs["srpo_grpo_rows"]].sum().item()
    assert counts["sdpo"] == tokens[inputs["srpo_distilled_rows"]].sum().item()


def test_steps_without_routed_rows_leave_the_teachers_statistics_out(char_tokenizer, tmp_path):
    trainer = make_trainer(char_tokenizer, tmp_path, reward=graded_reward, max_steps=1)
    trainer.train()
    (entry,) = [row for row in trainer.state.log_history if "loss" in row]
    assert entry["srpo/route/sdpo_frac"] == 0.0
    for key in ("srpo/teacher_entropy/mean", "srpo/teacher_prompt_truncated_frac", "srpo/weight/min"):
        assert key not in entry  # rather than `None`
    assert None not in entry.values()


def test_fsdp1_is_refused_before_the_model_loads(char_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(NotImplementedError, match="supports FSDP2, not FSDP1: set fsdp_version: 2"):
        SRPOTrainer(model="no-such/model", reward_funcs=first_letter_reward, args=make_args(tmp_path))

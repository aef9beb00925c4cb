"""SRPO in the configurations TRL users run (method §12): bf16, PEFT with dropout, logit-scaled and soft-capped model
families, GRPO's extra loss terms, unscorable rollouts, tool environments, and the setups SRPO refuses."""

import math
import re

import pytest
import torch
from helpers.tiny_trainer import PROMPTS, first_letter_reward, logged, make_trainer, parameters, patterned_reward

from srpo_trl import SRPOTrainer, checks
from srpo_trl.testbed.model import build_tiny_model


def without_attention(model):
    """Zero every attention output: each position then sees only its own token, so a teacher prompt (which only
    adds context) changes nothing, and the teacher at step 1 is the student exactly."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "o_proj" in name:
                weight.zero_()
    return model


def peaked(model, factor=20.0):
    """Logits of a trained LLM's size (about ±20, where bf16's step is 0.125)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


@pytest.mark.parametrize("routing", ["srpo", "sdpo"])
def test_identical_teacher_and_student_distil_nothing_in_bf16(char_tokenizer, tmp_path, routing):
    # The measurement: 3.6e-7 in fp32 but 4.3e-3 in bf16 when the teacher's normaliser came from bf16 logits
    # and its support log-probs from an unrounded fp32 product.
    model = peaked(without_attention(build_tiny_model(char_tokenizer, seed=0))).to(torch.bfloat16)
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        model=model,
        reward=patterned_reward,
        routing=routing,
        per_device_train_batch_size=16,
        max_steps=1,
        bf16=True,
        optim="sgd",
        lr_scheduler_type="constant",
        distillation_topk=50,
    )
    before = parameters(trainer)
    trainer.train()
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0
    assert abs(logged(trainer, "srpo/loss/sdpo")[0]) <= 1e-4
    if routing == "sdpo":  # the distillation is the whole loss: its gradient moves nothing
        moved = max(
            (value.float() - before[name].float()).abs().max().item() for name, value in parameters(trainer).items()
        )
        assert moved <= 1e-2 * 1e-4  # lr x 1e-4


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_teacher_scores_deterministically_through_the_top_level_forward(char_tokenizer, tmp_path, lora):
    from peft import LoraConfig

    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        peft_config=LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]) if lora else None,
        disable_dropout=False,
    )
    trainer.model.train()  # as during training: the policy (and with PEFT, the teacher's adapter) in train mode
    calls = []
    trainer.teacher.model.register_forward_hook(lambda module, args, output: calls.append(output))
    generator = torch.Generator().manual_seed(0)
    batch = {
        "completion_ids": torch.randint(5, 90, (3, 7), generator=generator),
        "completion_mask": torch.ones(3, 7, dtype=torch.long),
    }
    prompts = [char_tokenizer.encode("a teacher prompt"), char_tokenizer.encode("another one")]

    def score():
        with torch.no_grad(), trainer.teacher.active() as model:
            prefix = trainer.teacher_scorer.prefix_pass(model, prompts)
            return trainer.teacher_scorer.continuation_hidden(model, prefix, [0, 1, 0], batch, torch.arange(3))

    assert torch.equal(score(), score())
    assert trainer.model.training, "the policy's mode is restored"
    assert len(calls) == 4  # a prefix pass and a completion pass each time
    assert all(output.logits.shape[1] == 0 for output in calls)  # no vocabulary-sized work in the forward


def tiny_family_model(char_tokenizer, family):
    import transformers

    common = dict(
        vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=char_tokenizer.pad_token_id,
        eos_token_id=char_tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    config = {
        "gemma2": lambda: transformers.Gemma2Config(**common, final_logit_softcapping=3.0),
        "granite": lambda: transformers.GraniteConfig(**common, logits_scaling=4.0),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = char_tokenizer.pad_token_id
    model.generation_config.eos_token_id = char_tokenizer.eos_token_id
    return peaked(without_attention(model), 40.0)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_teacher_log_probs_are_grpos_on_scaled_and_softcapped_models(char_tokenizer, tmp_path, family):
    # advantage_mix adds (1-λ)(log q(y_t) - log π_old(y_t)) to each token's advantage. With the teacher equal to the
    # student (step 1, attention zeroed), that term is zero only if SRPO's teacher log-probs and GRPOTrainer's
    # π_old apply the model's soft-capping / logit scaling alike (before: -4.134 vs -4.155 on a tiny Granite).
    recorded = []
    generate_and_score = SRPOTrainer._generate_and_score_completions

    class Recording(SRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            batch = generate_and_score(self, inputs)
            recorded.append(batch)
            return batch

    args = make_trainer(char_tokenizer, tmp_path, max_steps=1).args
    args.routing, args.per_device_train_batch_size = "advantage_mix", 16
    trainer = Recording(
        model=tiny_family_model(char_tokenizer, family),
        reward_funcs=patterned_reward,
        args=args,
        train_dataset=PROMPTS,
        processing_class=char_tokenizer,
    )
    trainer.train()
    (batch,) = recorded
    mask = batch["completion_mask"].bool()
    rewards = torch.tensor([float(r) for r in patterned_reward([None] * 16)])
    group_advantage = rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4)
    expected = args.advantage_mix_lambda * group_advantage[:, None] * mask
    assert logged(trainer, "srpo/teacher_available_frac")[0] > 0
    torch.testing.assert_close(batch["advantages"], expected, rtol=0, atol=1e-5)


def model_directory(char_tokenizer, tmp_path):
    """A saved tiny model: GRPOTrainer builds its reference model (beta > 0) from a path."""
    path = tmp_path / "model"
    build_tiny_model(char_tokenizer, seed=0).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return str(path)


def test_reference_kl_and_entropy_bonus_never_reach_distilled_rows(char_tokenizer, tmp_path):
    # routing="sdpo": no GRPO token at all, so GRPO's reference KL and entropy bonus must add nothing; before, they
    # acted on the distilled rows too.
    model = model_directory(char_tokenizer, tmp_path)
    common = dict(routing="sdpo", optim="sgd", lr_scheduler_type="constant", max_steps=2, model=model)
    plain = make_trainer(char_tokenizer, tmp_path / "plain", **common)
    plain.train()
    extra = make_trainer(char_tokenizer, tmp_path / "extra", beta=0.5, entropy_coef=0.5, **common)
    extra.train()
    assert logged(extra, "reward") == logged(plain, "reward")  # the same rollouts
    assert logged(plain, "srpo/route/sdpo_frac")[0] > 0
    expected = parameters(plain)
    for name, value in parameters(extra).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-7)
    # ...while on GRPO rows they still act (srpo routing keeps GRPO rows)
    grpo_rows = make_trainer(
        char_tokenizer, tmp_path / "grpo-rows", beta=0.5, entropy_coef=0.5, **{**common, "routing": "srpo"}
    )
    grpo_rows.train()
    assert any(not torch.equal(v, expected[n]) for n, v in parameters(grpo_rows).items())


def test_entropy_quantile_is_chosen_among_grpo_tokens(char_tokenizer, tmp_path, monkeypatch):
    masks = []
    quantile_mask = SRPOTrainer.get_high_entropy_mask

    def record(self, entropies, mask, threshold):
        masks.append(mask.clone())
        return quantile_mask(self, entropies, mask, threshold)

    monkeypatch.setattr(SRPOTrainer, "get_high_entropy_mask", record)
    scored = []
    compute_loss = SRPOTrainer._compute_loss

    def record_inputs(self, model, inputs):
        scored.append(inputs)
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(SRPOTrainer, "_compute_loss", record_inputs)
    trainer = make_trainer(
        char_tokenizer, tmp_path, reward=patterned_reward, per_device_train_batch_size=16, max_steps=1,
        top_entropy_quantile=0.5,
    )  # fmt: skip
    trainer.train()
    (mask,), (inputs,) = masks, scored
    grpo_tokens = inputs["completion_mask"].bool() & inputs["srpo_grpo_rows"].unsqueeze(1)
    assert inputs["srpo_distilled_rows"].any()
    assert torch.equal(mask.bool(), grpo_tokens)


def nan_for_lowercase(completions, **kwargs):
    """`first_letter_reward` that cannot score lowercase starts (None): a group's failed rollouts are unscorable."""
    return [None if c[0]["content"][:1].islower() else 0.0 for c in completions]


def test_unscorable_rollouts_are_never_distilled(char_tokenizer, tmp_path, monkeypatch):
    routed = []
    teacher_prompts = SRPOTrainer._teacher_prompts

    def record(self, scored, routes, local, mode):
        routed.append((scored.rewards_per_func.clone(), routes))
        return teacher_prompts(self, scored, routes, local, mode)

    monkeypatch.setattr(SRPOTrainer, "_teacher_prompts", record)
    trainer = make_trainer(char_tokenizer, tmp_path, reward=[first_letter_reward, nan_for_lowercase], max_steps=1)
    trainer.reward_weights = torch.tensor([1.0, 1.0])
    trainer.train()
    ((rewards_per_func, routes),) = routed
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    assert not unscorable.any()  # first_letter_reward always scores: every rollout is scorable here
    # Now with the only reward function unable to score the lowercase (correct) rollouts' siblings:
    routed.clear()

    def unscorable_failures(completions, **kwargs):
        return [1.0 if c[0]["content"][:1].islower() else None for c in completions]

    trainer = make_trainer(char_tokenizer, tmp_path / "nan", reward=unscorable_failures, max_steps=1)
    trainer.train()
    ((rewards_per_func, routes),) = routed
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    assert unscorable.any() and routes.teacher_available[unscorable].any()
    assert not routes.distilled[unscorable].any() and not routes.needs_teacher[unscorable].any()
    assert routes.grpo[unscorable].all()  # GRPO's branch, where GRPOTrainer gives them a zero advantage
    assert math.isfinite(logged(trainer, "loss")[0])


class LookupEnvironment:
    """A tool environment: one tool, no reward of its own."""

    def reset(self, **kwargs):
        return None

    def lookup(self, key: str) -> str:
        """
        Look a key up.

        Args:
            key: The key to look up.
        """
        return key.upper()


def test_tool_environment_run_with_routed_rows(char_tokenizer, tmp_path, monkeypatch):
    from trl.chat_template_utils import qwen3_chat_template

    import srpo_trl.prompts

    tokenizer = char_tokenizer.__class__.from_pretrained(model_directory(char_tokenizer, tmp_path))
    tokenizer.chat_template = qwen3_chat_template
    built = []
    fit = srpo_trl.prompts.fit_teacher_prompt

    def record(prompt, demonstration, tokenize, max_length, feedback=None, **kwargs):
        ids, truncated = fit(prompt, demonstration, tokenize, max_length, feedback=feedback, **kwargs)
        built.append(tokenizer.decode(ids))
        return ids, truncated

    monkeypatch.setattr(srpo_trl.prompts, "fit_teacher_prompt", record)
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    args = make_trainer(char_tokenizer, tmp_path, max_steps=1).args
    trainer = SRPOTrainer(
        model=build_tiny_model(tokenizer, seed=0),
        reward_funcs=first_letter_reward,
        args=args,
        train_dataset=PROMPTS,
        processing_class=tokenizer,
        environment_factory=LookupEnvironment,
    )
    trainer.train()
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0 and built
    assert all('"lookup"' in text and "Correct solution:" in text for text in built)  # the row's tools kept


def inexact_setup(**overrides):
    settings = dict(routing="srpo", loss_type="dapo", entropy_bonus=False, aux_loss=False, zero_config=None)
    return checks.inexact_setup_problem(**{**settings, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_type="bnpo", entropy_bonus=True), "loss_type='bnpo' with an entropy bonus"),
        (dict(loss_type="bnpo", aux_loss=True), "loss_type='bnpo' with a MoE load-balancing loss"),
        (dict(zero_config={"stage": 3, "zero_hpz_partition_size": 8}), "zero_hpz_partition_size=8"),
    ],
    ids=["bnpo-entropy", "bnpo-aux", "zero-hpz"],
)
def test_setups_that_would_be_silently_wrong_are_refused(overrides, message):
    assert re.search(message, inexact_setup(**overrides))
    assert inexact_setup() is None  # the paper's setting passes


def test_bnpo_with_an_entropy_bonus_is_refused_at_construction(char_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Use loss_type='dapo'"):
        make_trainer(char_tokenizer, tmp_path, loss_type="bnpo", entropy_coef=0.1)


def test_shared_prefix_scoring_equals_scoring_each_row_alone(char_tokenizer, tmp_path):
    # Seven routed rows continuing two teacher prompts of different lengths, with padded completions: the teacher's
    # hidden states equal one full forward of each row's prompt + completion (fp32, 1e-5).
    trainer = make_trainer(char_tokenizer, tmp_path, model=peaked(build_tiny_model(char_tokenizer, seed=1), 10.0))
    generator = torch.Generator().manual_seed(1)
    batch = {
        "completion_ids": torch.randint(5, 90, (7, 9), generator=generator),
        "completion_mask": (torch.arange(9) < torch.tensor([9, 4, 7, 9, 1, 6, 9])[:, None]).long(),
    }
    prompts = [char_tokenizer.encode("the question and a correct solution"), char_tokenizer.encode("short")]
    continues = [0, 1, 1, 0, 0, 1, 0]
    mask = batch["completion_mask"].bool()
    with torch.no_grad(), trainer.teacher.active() as model:
        prefix = trainer.teacher_scorer.prefix_pass(model, prompts)
        shared = trainer.teacher_scorer.continuation_hidden(model, prefix, continues, batch, torch.arange(7))
        for row, prompt in enumerate(continues):
            ids = torch.tensor(prompts[prompt] + batch["completion_ids"][row].tolist())[None]
            alone = model.model(input_ids=ids).last_hidden_state[0, len(prompts[prompt]) - 1 : -1]
            torch.testing.assert_close(shared[row][mask[row]], alone[mask[row]], rtol=1e-5, atol=1e-5)


def test_teacher_prefix_plan():
    from srpo_trl.teacher_scoring import shared_prefix_plan, unique_prefixes

    prefixes, prefix_of_row = unique_prefixes([[1, 2], [3], [1, 2], [4, 5], [3], [1, 2]])
    assert prefixes == [[1, 2], [3], [4, 5]] and prefix_of_row == [0, 1, 0, 2, 1, 0]
    assert shared_prefix_plan(prefix_of_row, 2) == [([0, 1], [[0, 1], [2, 4], [5]]), ([2], [[3]])]
    assert shared_prefix_plan([], 2) == []


def tiny_hybrid_model(tokenizer):
    """A tiny Nemotron-H (Mamba, attention and MoE blocks): its cache keeps a running state, not rows of keys."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        layers_block_type=["mamba", "attention", "moe"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        mamba_num_heads=8,
        mamba_head_dim=4,
        mamba_n_groups=1,
        ssm_state_size=16,
        mamba_d_conv=4,
        mamba_expand=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        use_mamba_kernels=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    return NemotronHForCausalLM(config)


def test_hybrid_model_teacher_scores_each_row_in_one_pass(char_tokenizer, tmp_path):
    # Nemotron-H's cache cannot select rows (its Mamba layers keep a running state): the teacher scores each teacher
    # prompt with its completion in one pass, equal to the model's own forward; before, the first routed step failed
    # in `batch_select_indices` (TRL's own test_train[tiny-NemotronHForCausalLM-nano], with SRPOTrainer bound).
    trainer = make_trainer(
        char_tokenizer,
        tmp_path,
        model=tiny_hybrid_model(char_tokenizer),
        reward=patterned_reward,
        per_device_train_batch_size=16,
        max_steps=1,
    )
    assert not trainer.teacher_scorer.continues_from_cache
    generator = torch.Generator().manual_seed(1)
    batch = {
        "completion_ids": torch.randint(5, 90, (3, 9), generator=generator),
        "completion_mask": (torch.arange(9) < torch.tensor([9, 4, 7])[:, None]).long(),
    }
    prompts = [char_tokenizer.encode("the question and a correct solution"), char_tokenizer.encode("short")]
    rows = [0, 1, 0]
    mask = batch["completion_mask"].bool()
    with torch.no_grad(), trainer.teacher.active() as model:
        scored = trainer.teacher_scorer.whole_sequence_hidden(
            model, [prompts[p] for p in rows], batch, torch.arange(3)
        )
        for row, prompt in enumerate(rows):
            ids = torch.tensor(prompts[prompt] + batch["completion_ids"][row].tolist())[None]
            alone = model.model(input_ids=ids).last_hidden_state[0, len(prompts[prompt]) - 1 : -1]
            torch.testing.assert_close(scored[row][mask[row]], alone[mask[row]], rtol=1e-5, atol=1e-5)
    trainer.train()
    assert logged(trainer, "srpo/route/sdpo_frac")[0] > 0 and logged(trainer, "srpo/loss/sdpo")[0] != 0


def test_attention_models_share_teacher_prefixes(char_tokenizer, tmp_path):
    assert make_trainer(char_tokenizer, tmp_path).teacher_scorer.continues_from_cache

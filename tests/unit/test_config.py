import warnings

import pytest

from srpo_trl import SRPOConfig, SRPOTrainer


def config(**overrides):
    return SRPOConfig(output_dir="/tmp/srpo-config-test", report_to=[], use_cpu=True, bf16=False, **overrides)


def test_paper_defaults():
    args = config()
    assert (args.routing, args.success_reward_threshold, args.teacher_update_rate) == ("srpo", 1.0, 0.05)
    assert (args.distillation_topk, args.distillation_alpha, args.distillation_is_clip) == (100, 0.5, 2.0)
    assert (args.dynamic_weighting, args.weighting_temperature, args.max_teacher_prompt_length) == (True, 1.0, 10240)
    assert (args.learning_rate, args.scale_rewards, args.epsilon, args.epsilon_high) == (5e-6, "none", 0.2, 0.28)
    assert (args.loss_type, args.beta) == ("dapo", 0.0)
    assert (args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max) == ("token_truncate", 2.0)


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("routing", "grpo_plus", "one of ('srpo', 'grpo', 'sdpo', 'advantage_mix')"),
        ("teacher_update_rate", -0.1, "in (0, 1]"),
        ("teacher_update_rate", 0.0, "in (0, 1]"),
        ("distillation_topk", 0, "an integer >= 1"),
        ("distillation_alpha", 1.5, "in [0, 1]"),
        ("distillation_is_clip", 0.0, "> 0"),
        ("weighting_temperature", -1.0, "> 0"),
        ("advantage_mix_lambda", 2.0, "in [0, 1]"),
        ("max_teacher_prompt_length", 0, "a positive token count"),
        ("success_reward_threshold", float("nan"), "a finite number"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(field, value, fix):
    with pytest.raises(ValueError) as error:
        config(**{field: value})
    message = str(error.value)
    assert f"SRPOConfig.{field}" in message and fix in message and repr(value) in message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("success_reward_threshold", None, "a number"),
        ("success_reward_threshold", "1.0", "a number"),  # YAML reads `1e-2`-style numbers as strings
        ("teacher_update_rate", "0.05", "a number"),
        ("distillation_alpha", None, "a number"),
        ("distillation_topk", 2.5, "an integer"),
        ("distillation_topk", True, "an integer"),
        ("max_teacher_prompt_length", None, "an integer"),
        ("max_teacher_prompt_length", 512.5, "an integer"),
        ("routing", 3, "one of ('srpo', 'grpo', 'sdpo', 'advantage_mix')"),
        ("dynamic_weighting", "false", "True or False"),
        ("teacher_feedback", 1, "True or False"),
    ],
)
def test_wrong_types_name_the_field_the_value_and_the_expected_type(field, value, expected):
    with pytest.raises(ValueError) as error:
        config(**{field: value})
    assert f"SRPOConfig.{field} must be {expected}; got {value!r} ({type(value).__name__})." in str(error.value)


def test_integers_are_numbers():
    assert config(success_reward_threshold=2, teacher_update_rate=1).success_reward_threshold == 2


def test_numpy_scalars_are_accepted_as_python_numbers():
    # GRPOConfig accepts them (a sweep over np.arange, a value read with numpy); SRPO's fields hold Python types.
    import numpy as np

    args = config(
        distillation_topk=np.int64(8), teacher_update_rate=np.float32(0.25), dynamic_weighting=np.bool_(False)
    )
    assert (args.distillation_topk, args.teacher_update_rate, args.dynamic_weighting) == (8, 0.25, False)
    assert [type(v) for v in (args.distillation_topk, args.teacher_update_rate, args.dynamic_weighting)] == [
        int,
        float,
        bool,
    ]
    with pytest.raises(ValueError, match=r"SRPOConfig\.distillation_topk must be an integer.*float64"):
        config(distillation_topk=np.float64(8.0))
    with pytest.raises(ValueError, match=r"SRPOConfig\.distillation_topk must be an integer.*bool"):
        config(distillation_topk=np.bool_(True))


def test_num_generations_below_two_is_rejected():
    with pytest.raises(ValueError, match="num_generations"):
        config(num_generations=1, per_device_train_batch_size=2)


def test_generation_batch_spanning_several_steps_warns():
    with pytest.warns(UserWarning, match="steps_per_generation"):
        config(steps_per_generation=2, gradient_accumulation_steps=1, per_device_train_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        config(routing="grpo", steps_per_generation=2, gradient_accumulation_steps=1, per_device_train_batch_size=8)


def test_trainer_rejects_a_plain_grpo_config_and_its_hint_works(char_tokenizer, tmp_path):
    # A GRPO user's config, with some fields changed: the TypeError's hint converts it, keeping what was set.
    from helpers.tiny_trainer import PROMPTS, first_letter_reward
    from trl import GRPOConfig

    from srpo_trl.testbed.model import build_tiny_model

    grpo = GRPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=6, learning_rate=3e-6, steps_per_generation=2,
        gradient_accumulation_steps=2, temperature=0.7, max_steps=1, gradient_checkpointing=False,
    )  # fmt: skip
    build = dict(reward_funcs=first_letter_reward, train_dataset=PROMPTS, processing_class=char_tokenizer)
    with pytest.raises(TypeError, match=r"SRPOConfig\.from_grpo_config\(your_config\)"):
        SRPOTrainer(build_tiny_model(char_tokenizer), args=grpo, **build)

    args = SRPOConfig.from_grpo_config(grpo, distillation_topk=8)
    kept = ("learning_rate", "num_generations", "temperature", "max_completion_length", "gradient_checkpointing")
    assert {name: getattr(args, name) for name in kept} == {name: getattr(grpo, name) for name in kept}
    assert (args.steps_per_generation, args.generation_batch_size) == (2, grpo.generation_batch_size)
    # GRPO's defaults where SRPO's differ are not "set": the paper's apply.
    assert (args.scale_rewards, args.epsilon_high) == ("none", 0.28) != (grpo.scale_rewards, grpo.epsilon_high)
    assert (args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max) == ("token_truncate", 2.0)
    assert (args.routing, args.distillation_topk) == ("srpo", 8)
    assert SRPOConfig.from_grpo_config(GRPOConfig(use_cpu=True, bf16=False)).learning_rate == 5e-6
    trainer = SRPOTrainer(build_tiny_model(char_tokenizer), args=args, **build)
    trainer.train()
    assert any("srpo/route/sdpo_frac" in row for row in trainer.state.log_history)


def test_from_grpo_config_carries_a_generation_batch_size_over():
    from trl import GRPOConfig

    grpo = GRPOConfig(use_cpu=True, bf16=False, per_device_train_batch_size=8, generation_batch_size=16)
    args = SRPOConfig.from_grpo_config(grpo, routing="grpo")
    assert (args.generation_batch_size, args.steps_per_generation) == (16, 2)
    changed = SRPOConfig.from_grpo_config(grpo, routing="grpo", generation_batch_size=32)
    assert (changed.generation_batch_size, changed.steps_per_generation) == (32, 4)


def test_topk_larger_than_the_vocabulary_is_rejected(char_tokenizer):
    from datasets import Dataset

    from srpo_trl.testbed.model import build_tiny_model

    with pytest.raises(ValueError, match=r"distillation_topk=500 exceeds the model's vocabulary \(102\)"):
        SRPOTrainer(
            build_tiny_model(char_tokenizer),
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=config(distillation_topk=500, per_device_train_batch_size=8),
            train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}),
            processing_class=char_tokenizer,
        )


def test_bf16_left_unset_is_off_where_no_gpu_supports_it():
    # GRPO's default bf16=True is refused without a bf16 GPU ("Your setup doesn't support bf16/gpu"): the README's
    # SRPOConfig(output_dir=..., chat_template_kwargs=...) must build on a CPU, in fp32.
    from transformers.utils import is_torch_bf16_gpu_available

    args = SRPOConfig(output_dir="/tmp/srpo-config-test", chat_template_kwargs={"enable_thinking": False})
    assert args.bf16 is is_torch_bf16_gpu_available()
    assert SRPOConfig(output_dir="/tmp/srpo-config-test", use_cpu=True).bf16  # use_cpu: as in GRPO (CPU autocast)


def test_from_grpo_config_keeps_an_srpo_configs_fields_and_names_the_defaults_it_replaces(tmp_path):
    # Before: an SRPOConfig lost every SRPO field; GRPO's own defaults set on purpose became SRPO's without a word.
    from trl import GRPOConfig

    srpo = config(routing="sdpo", success_reward_threshold=2.0, teacher_model_kind="base", learning_rate=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = SRPOConfig.from_grpo_config(srpo, distillation_topk=7)
    assert (copied.routing, copied.success_reward_threshold, copied.teacher_model_kind) == ("sdpo", 2.0, "base")
    assert (copied.learning_rate, copied.distillation_topk) == (1e-6, 7)
    grpo = GRPOConfig(str(tmp_path), use_cpu=True, bf16=False, learning_rate=1e-6, scale_rewards="group")
    with pytest.warns(UserWarning, match=r"learning_rate=1e-06 -> 5e-06, .*scale_rewards='group' -> 'none'.*"
                      r"from_grpo_config\(config, learning_rate=1e-06, .*scale_rewards='group'"):  # fmt: skip
        converted = SRPOConfig.from_grpo_config(grpo)
    assert (converted.learning_rate, converted.scale_rewards) == (5e-6, "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = SRPOConfig.from_grpo_config(
            grpo, learning_rate=1e-6, scale_rewards="group", epsilon_high=None,
            vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=3.0,
        )  # fmt: skip
    assert (kept.learning_rate, kept.scale_rewards) == (1e-6, "group")
    with pytest.raises(
        TypeError, match=r"from_grpo_config converts a GRPOConfig; got dict.*SRPOConfig\(\*\*settings\)"
    ):
        SRPOConfig.from_grpo_config({"learning_rate": 1e-6})


@pytest.mark.parametrize(
    "settings, unread",
    [
        (
            dict(routing="grpo", teacher_feedback=True),
            r"teacher_feedback=True has no effect: routing='grpo' builds no",
        ),
        (dict(routing="grpo", distillation_topk=8), r"distillation_topk=8 has no effect"),
        (dict(teacher_model_kind="base", teacher_update_rate=0.1), r"teacher_update_rate=0.1 .*'base' has no update"),
        (dict(teacher_model_kind="live", teacher_update_rate=0.1), r"teacher_update_rate=0.1 .*'live' has no update"),
        (dict(routing="advantage_mix", distillation_alpha=0.2), r"distillation_alpha=0.2 .*distils nothing"),
        (dict(advantage_mix_lambda=0.5), r"advantage_mix_lambda=0.5 has no effect: only routing='advantage_mix'"),
        (dict(dynamic_weighting=False, weighting_temperature=2.0), r"weighting_temperature=2.0 has no effect"),
    ],
)
def test_settings_the_routing_or_teacher_never_reads_are_named(settings, unread):
    # Before: an option that does nothing under the chosen routing or teacher said nothing.
    with pytest.warns(UserWarning, match=r"SRPOConfig: .*" + unread):
        config(**settings)


def test_settings_that_are_read_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config(routing="advantage_mix", advantage_mix_lambda=0.5, teacher_update_rate=0.1)
        config(routing="sdpo", distillation_topk=8, teacher_model_kind="trust_region", teacher_update_rate=0.1)
        config(routing="grpo", dynamic_weighting=True)  # its default

"""The tiny SRPOTrainer the trainer tests train: a random tiny Qwen3 (`srpo_trl.testbed`), 16 "Spell x" prompts in
groups of 4, rewards with mixed, graded or patterned outcomes, and what the tests read back (logged metrics,
parameters, teacher rows, resumed weights)."""

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from srpo_trl import SRPOConfig, SRPOTrainer
from srpo_trl.testbed.model import build_tiny_model

PROMPTS = Dataset.from_dict(
    {"prompt": [[{"role": "user", "content": f"Spell {word}"}] for word in "abcdefghijklmnop"]}
)


def first_letter_reward(completions, **kwargs):
    """About half the random model's completions start with a lowercase letter: groups of mixed outcomes."""
    return [1.0 if c[0]["content"][:1].islower() else 0.0 for c in completions]


def graded_reward(completions, **kwargs):
    """Rewards that vary but never reach the success threshold: GRPO signal, nothing routed."""
    return [0.1 * (len(c[0]["content"]) % 9) for c in completions]


SRPO_PAPER_DEFAULTS = dict(
    scale_rewards="none",
    epsilon_high=0.28,
    vllm_importance_sampling_mode="token_truncate",
    vllm_importance_sampling_clip_max=2.0,
)


def make_args(tmp_path, config_class=SRPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        learning_rate=1e-2,
        distillation_topk=8,
        chat_template_kwargs={"enable_thinking": False},
        disable_tqdm=True,
    )
    if config_class is GRPOConfig:  # GRPO with SRPOConfig's paper defaults, so both trainers get the same settings
        settings.pop("distillation_topk")
        settings.update(SRPO_PAPER_DEFAULTS)
    settings.update(overrides)
    return config_class(**settings)


def make_trainer(
    char_tokenizer,
    tmp_path,
    reward=first_letter_reward,
    trainer_class=SRPOTrainer,
    peft_config=None,
    model=None,
    eval_dataset=None,
    **overrides,
):
    args = make_args(tmp_path, GRPOConfig if trainer_class is GRPOTrainer else SRPOConfig, **overrides)
    return trainer_class(
        model=build_tiny_model(char_tokenizer, seed=0) if model is None else model,
        reward_funcs=reward,
        args=args,
        train_dataset=PROMPTS,
        eval_dataset=eval_dataset,
        processing_class=char_tokenizer,
        peft_config=peft_config,
    )


def parameters(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def count_rows(module):
    """Count the calls of `module` and the rows they carry: `prefix_rows` start a sequence, `rows` continue cached
    prefixes (the teacher's completions) or are whole sequences."""
    counter = {"rows": 0, "calls": 0, "prefix_rows": 0}

    def hook(module, args, kwargs):
        cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        counter["rows" if cached or not kwargs.get("use_cache") else "prefix_rows"] += kwargs["input_ids"].size(0)
        counter["calls"] += 1

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


class RecordingReward:
    """A reward function that remembers every batch of rewards it returned."""

    __name__ = "recording_reward"

    def __init__(self, reward):
        self.reward, self.batches = reward, []

    def __call__(self, completions, **kwargs):
        rewards = self.reward(completions)
        self.batches.append(rewards)
        return rewards


def expected_routing(rewards, group_size=4):
    """Routed rollouts, correct and fallback fractions, and groups with routed rollouts (their teacher prompts)."""
    routed = correct = fallback = routed_groups = 0
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        wins = sum(r >= 1.0 for r in group)
        correct += wins
        routed += sum(1 for r in group if r < 1.0 and wins > 0)
        routed_groups += 0 < wins < len(group)
        fallback += len(group) if wins == 0 else 0
    n = len(rewards)
    return routed, correct / n, fallback / n, routed_groups


def patterned_reward(completions, **kwargs):
    """Groups of four: all correct, all failed, one correct, all-but-one correct."""
    pattern = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1]
    return [float(pattern[i % 16]) for i in range(len(completions))]


def built(tokenizer, tmp_path, reward=first_letter_reward, dataset=PROMPTS, eval_dataset=None, **overrides):
    return SRPOTrainer(
        build_tiny_model(tokenizer, seed=0),
        reward_funcs=reward,
        args=make_args(tmp_path, **dict(dict(max_steps=1), **overrides)),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


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

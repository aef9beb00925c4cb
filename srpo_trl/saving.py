"""`save_model` and `push_to_hub` write the policy alone (the teacher is training state, in checkpoints:
`checkpointing.py`; a PEFT policy's `save_pretrained` writes the student's adapter, `model_parts.save_student_adapter_only`),
with TRL's model card, filled in: the base model (a local folder too), a quick start that loads this model, and the
SRPO configuration it was trained with."""

import dataclasses
import os
import shutil
import textwrap

from huggingface_hub import ModelCard
from trl import GRPOConfig

from .model_parts import causal_lm, is_peft


class PolicySaving:
    """Saving hooks of `SRPOTrainer`, mixed in ahead of `GRPOTrainer`, and what its model card says of the method."""

    _tag_names = ["trl", "srpo"]
    _card_model_dir = None  # set by `save_model` while it writes the card: where the model was saved
    _name = "Sample-Routed Policy Optimization (SRPO)"  # how the model card names the method
    _paper = {
        "title": "Unifying Group-Relative and Self-Distillation Policy Optimization via Sample Routing",
        "id": "2604.02288",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{li2026srpo,
                title        = {{Unifying Group-Relative and Self-Distillation Policy Optimization via Sample Routing}},
                author       = {Gengsheng Li and Tianyu Yang and Junfeng Fang and Mingyang Song and Mao Zheng and Haiyun Guo and Dan Zhang and Jinqiao Wang and Tat-Seng Chua},
                year         = 2026,
                eprint       = {arXiv:2604.02288},
            }"""),
    }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        record_absolute_base(self.model)
        super().save_model(output_dir, _internal_call)
        # A user's save gets the model card too (GRPOTrainer writes one with each checkpoint and push only).
        if not _internal_call and self.is_world_process_zero():
            output_dir = output_dir or self.args.output_dir
            self._card_model_dir = output_dir  # the card's quick start loads the model from where it was saved
            self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
            self._card_model_dir = None
            card = os.path.join(self.args.output_dir, "README.md")
            if os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
                shutil.copyfile(card, os.path.join(output_dir, "README.md"))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name, dataset_name, tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not (self.is_world_process_zero() and os.path.isfile(path)):
            return
        card = ModelCard.load(path)
        source = causal_lm(self.model).config.name_or_path
        fill_model_card(
            card,
            local_base=source if source and os.path.isdir(source) else None,
            model_id=self.hub_model_id or os.path.abspath(self._card_model_dir or self.args.output_dir),
            configuration=configuration_section(self.args, self.reward_func_names, self.model),
        )
        card.save(path)


def record_absolute_base(model) -> None:
    """A base model loaded from a local folder is recorded by its absolute path (the model's config, a PEFT adapter's
    `base_model_name_or_path`): a relative one would be looked up from wherever the model is loaded, then on the Hub."""
    config = causal_lm(model).config
    if config.name_or_path and os.path.isdir(config.name_or_path):
        config.name_or_path = os.path.abspath(config.name_or_path)
    for adapter in getattr(model, "peft_config", {}).values() if is_peft(model) else ():
        base = adapter.base_model_name_or_path
        if base and os.path.isdir(base):
            adapter.base_model_name_or_path = os.path.abspath(base)


def fill_model_card(card: ModelCard, local_base: str | None, model_id: str, configuration: str) -> None:
    """Fill in what TRL's card template leaves as placeholders: the base model (`None` for a local folder), the quick
    start's model (`None` unless pushed), the licence (the placeholder `license`), and the training procedure."""
    card.data.pop("licence", None)  # TRL writes `licence: license`, a placeholder no one fills
    text = card.text
    if local_base is not None:
        text = text.replace("[None](https://huggingface.co/None)", f"the local model `{local_base}`")
    else:
        text = text.replace("[None](https://huggingface.co/None)", "a model without a Hub id")
    text = text.replace('model="None"', f"model={model_id!r}")
    marker = "### Framework versions"
    card.text = text.replace(marker, f"{configuration}\n{marker}", 1) if marker in text else f"{text}\n{configuration}"


# GRPO fields that say how a run trained, beside SRPO's own (every SRPOConfig field absent from GRPOConfig).
_TRAINING_FIELDS = (
    "learning_rate",
    "num_generations",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_completion_length",
    "loss_type",
    "scale_rewards",
    "epsilon",
    "epsilon_high",
    "beta",
    "temperature",
    "seed",
)


def configuration_section(args, reward_func_names: list[str], model) -> str:
    """The model card's record of the run: SRPO's settings, GRPO's main ones, the rewards and any LoRA adapter."""
    grpo = {spec.name for spec in dataclasses.fields(GRPOConfig)}
    srpo = [spec.name for spec in dataclasses.fields(args) if spec.name not in grpo]
    weights = args.reward_weights or [1.0] * len(reward_func_names)
    lines = ["### SRPO configuration", ""]
    lines += [
        "Rollouts whose weighted reward reaches `success_reward_threshold` are correct and trained by GRPO; failed "
        "rollouts with a correct sibling are distilled from the self-teacher, which is shown that sibling's answer; "
        "the others get GRPO's advantage.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | `{getattr(args, name)!r}` |" for name in (*srpo, *_TRAINING_FIELDS)]
    rewards = ", ".join(f"`{name}` × {weight:g}" for name, weight in zip(reward_func_names, weights, strict=True))
    lines.append(f"| reward functions × weights | {rewards} |")
    if is_peft(model):
        adapter = model.peft_config[model.active_adapter]
        lines.append(f"| LoRA adapter | `r={adapter.r}`, `lora_alpha={adapter.lora_alpha}` |")
    return "\n".join(lines) + "\n"

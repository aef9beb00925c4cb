"""`save_model` and `push_to_hub` write the policy alone (the teacher is training state, in checkpoints:
`checkpointing.py`; a PEFT policy's `save_pretrained` writes the student's adapter, `teacher.save_student_adapter_only`),
with TRL's model card, which names a base model loaded from a local folder too."""

import os
import shutil
import textwrap

from .model_parts import causal_lm


class PolicySaving:
    """Saving hooks of `SRPOTrainer`, mixed in ahead of `GRPOTrainer`, and what its model card says of the method."""

    _tag_names = ["trl", "srpo"]
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
        super().save_model(output_dir, _internal_call)
        # A user's save gets the model card too (GRPOTrainer writes one with each checkpoint and push only).
        if not _internal_call and self.is_world_process_zero():
            output_dir = output_dir or self.args.output_dir
            self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
            card = os.path.join(self.args.output_dir, "README.md")
            if os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
                shutil.copyfile(card, os.path.join(output_dir, "README.md"))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name, dataset_name, tags)
        # TRL names a base model by its Hub id only; one loaded from a local folder read "a fine-tuned version of
        # [None](https://huggingface.co/None)".
        card = os.path.join(self.args.output_dir, "README.md")
        if not (self.is_world_process_zero() and os.path.isfile(card)):
            return
        source = causal_lm(self.model).config.name_or_path
        named = f"the local model `{source}`" if source and os.path.isdir(source) else "a model without a Hub id"
        with open(card, encoding="utf-8") as file:
            text = file.read()
        with open(card, "w", encoding="utf-8") as file:
            file.write(text.replace("[None](https://huggingface.co/None)", named))

"""The parts of a causal LM that SRPO reaches into, for the policy and the teacher alike: the transformers model inside
a PEFT wrapper, its decoder stack and LM head, the backbone's final hidden states of a forward, its context length."""

from contextlib import contextmanager

import torch
from transformers import PreTrainedModel


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def causal_lm(model) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (adapters injected), or the model itself."""
    return model.get_base_model() if is_peft(model) else model


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (returns final hidden states) and the LM head of a causal LM, PEFT-wrapped or not."""
    lm = causal_lm(model)
    return lm.base_model, lm.get_output_embeddings()


def context_length(model) -> int | None:
    """How many positions `model` scores (`max_position_embeddings`, GPT-2's `n_positions`), None when its
    configuration names no limit."""
    config = causal_lm(model).config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextmanager
def captured_hidden_states(model):
    """Keep the backbone's final hidden states of `model`'s forward passes (for the policy, the one GRPOTrainer's
    loss runs anyway)."""
    captured = []
    backbone, _ = backbone_and_head(model)
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        yield captured
    finally:
        handle.remove()

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
    """The decoder stack (returns final hidden states) and the LM head of a causal LM, PEFT-wrapped or not: the
    module `get_decoder()` names, which the causal LM's forward calls (OPT's calls `model.decoder`, not `model`)."""
    lm = causal_lm(model)
    return lm.get_decoder(), lm.get_output_embeddings()


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
    if not captured:  # checked at construction where weights are whole; under sharding, at the first pass
        raise RuntimeError(uncaptured_message(model, "no call of it", "(rows, length, hidden)"))


def uncaptured_message(model, seen: str, expected: str) -> str:
    """Why the final hidden states of `model` could not be read: a forward pass gave `seen`, not `expected`."""
    backbone, _ = backbone_and_head(model)
    return (
        f"SRPO reads the final hidden states of {type(causal_lm(model)).__name__} at its decoder stack "
        f"({type(backbone).__name__}, what `get_decoder()` returns), and a forward pass gave {seen} (expected "
        f"{expected}): this model family computes its layers around that module, so the self-teacher cannot "
        "score it. Train it with routing='grpo', or use a model family whose forward calls its decoder stack."
    )

"""The parts of a causal LM that SRPO reaches into, for the policy and the teacher alike: the transformers model inside
a PEFT wrapper, its decoder stack and LM head, the backbone's final hidden states of a forward (`checks.
uncaptured_backbone_problem` tells whether a family gives them), its context length, a PEFT policy's saving of its own
adapter, and a copy's forward patches."""

import functools
import types
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


def reshard_fsdp2(model: torch.nn.Module) -> None:
    """Give FSDP2's units back their shards. FSDP2 keeps some units' weights whole after a forward (the root's: a
    backward would need them at once); after forwards with no backward (the teacher's passes, an evaluation's
    generation) the weights would stay whole, and the teacher's EMA, which works on shards, would meet whole ones."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


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


def save_student_adapter_only(policy, student_adapter: str) -> None:
    """Make the PEFT `policy`'s `save_pretrained` write `student_adapter` alone by default, wherever it is called
    (`trainer.save_model`, `push_to_hub`, or the user's own `trainer.model.save_pretrained(...)`): PEFT's default
    saves every adapter, which would publish the teacher's, training state. An explicit `selected_adapters` wins."""
    policy.save_pretrained = functools.partial(
        type(policy).save_pretrained, policy, selected_adapters=[student_adapter]
    )


def _closure_values(function: types.FunctionType) -> list:
    values = []
    for cell in function.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a free variable not yet assigned
            values.append(cell)
    return values


def rebind_forwards(copied: torch.nn.Module, original: torch.nn.Module) -> None:
    """Point the instance-level `forward` patches of `copied`'s submodules at `copied`'s own modules. A deep copy
    keeps functions as they are, so a patch closing over `original`'s modules goes on computing with the original's
    weights: TRL's `cast_lm_head_to_fp32` replaces `lm_head.forward` by a closure over the policy's head, which
    under ZeRO-3 and FSDP2 then met the policy's shards (`size mismatch, got input (0)`)."""
    name_of = {id(module): name for name, module in original.named_modules()}
    twins = dict(copied.named_modules())
    for module in copied.modules():
        forward = module.__dict__.get("forward")
        if not isinstance(forward, types.FunctionType):
            continue
        values = _closure_values(forward)
        if not any(id(value) in name_of for value in values):
            continue
        cells = tuple(
            types.CellType(twins[name_of[id(value)]]) if id(value) in name_of else forward.__closure__[i]
            for i, value in enumerate(values)
        )
        rebound = types.FunctionType(
            forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__, cells
        )
        module.forward = functools.update_wrapper(rebound, forward)

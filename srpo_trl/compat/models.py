"""transformers' and DeepSpeed's version-dependent model internals that SRPO relies on, in one place.

Written against transformers 5.25 (supported: 5.10.4 to 5.x) and DeepSpeed 0.19.0: the key/value cache's argument
name, its layers and row selection, RoPE's length-dependent frequencies and their reset, the parameter table
DeepSpeed's engine flags, `PreTrainedModel._from_config`. Review on each bump.
"""

import copy
import inspect
from contextlib import contextmanager

import torch
from transformers import DynamicCache, cache_utils

NO_LOGITS = torch.empty(0, dtype=torch.long)  # `logits_to_keep` that projects no position


def cache_argument(model_class: type) -> str:
    """The name of a causal LM forward's key/value cache argument: transformers 5.18 renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def output_cache(output):
    """The key/value cache a forward returned, under its name of either version."""
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


def adopt_activation_checkpointing_name(config) -> None:
    """Move TRL's `gradient_checkpointing` default (True, in TRL's config) to transformers' new name
    `activation_checkpointing` where it exists (newer transformers), before `TrainingArguments.__post_init__`
    resolves the alias: it warns on every config otherwise, whether or not the user wrote the old name."""
    if getattr(config, "activation_checkpointing", False) is None and config.gradient_checkpointing is not None:
        config.activation_checkpointing = config.gradient_checkpointing


def cache_rows(cache, rows: torch.Tensor):
    """A cache holding the batch `rows` of `cache`, which stays as it was (for the next chunk of continuations).
    Shallow copies of the cache and its layers: selecting rows makes new key/value tensors (advanced indexing) and a
    continuation appends to the copy's, so only the selected rows are copied, never the whole prefix cache (a deep
    copy was ~5.6 GiB per chunk at the Qwen3-8B recipe's sizes)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


def rope_types(config) -> set[str]:
    """The RoPE types of a model (one per layer type where a model mixes them), read as transformers 5 reads them:
    `rope_parameters`, or the older `rope_scaling`; "default" without either."""
    text = config.get_text_config()
    parameters = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    per_layer_type = parameters and all(isinstance(value, dict) for value in parameters.values())
    groups = parameters.values() if per_layer_type else [parameters]
    return {str(group.get("rope_type", group.get("type", "default"))) for group in groups}


def has_length_dependent_rope(config) -> bool:
    """Whether a model's RoPE frequencies depend on the longest position of each forward call: transformers'
    `dynamic_rope_update` rescales them for dynamic NTK (any "dynamic" type) and switches LongRoPE (Phi-3,
    Phi-4-mini) to its long factors past `original_max_position_embeddings`. A cached prefix and its continuation
    (or a row padded to a longer one) would then be scored with other frequencies than the row alone."""
    return any("dynamic" in rope_type or rope_type == "longrope" for rope_type in rope_types(config))


def reset_dynamic_rope(model: torch.nn.Module) -> None:
    """Return dynamic-NTK rotary embeddings to their original frequencies. transformers keeps the frequencies of
    the longest call so far and only recomputes them for a longer one: a row's scores would depend on the rows scored
    before it. Done here as transformers' own reset does it (its original frequencies back in `inv_freq`, the cached
    length back to the original), without a forward call (no module hook runs: ZeRO-3 would record it in its prefetch
    trace) and whichever attribute name the installed version keeps the cached length under (transformers 5.10 writes
    it as `None_max_seq_len_cached` and so never resets by itself)."""
    for module in model.modules():
        if not hasattr(module, "original_inv_freq") or not hasattr(module, "max_seq_len_cached"):
            continue
        layer_types = list(module.rope_type) if isinstance(module.rope_type, dict) else [None]
        for layer_type in layer_types:
            rope_type = module.rope_type if layer_type is None else module.rope_type[layer_type]
            prefix = "" if layer_type is None else f"{layer_type}_"
            original = getattr(module, f"{prefix}original_inv_freq", None)
            if "dynamic" not in rope_type or original is None:
                continue
            device = getattr(module, f"{prefix}inv_freq").device
            module.register_buffer(f"{prefix}inv_freq", original.to(device), persistent=False)
            for name in {f"{prefix}max_seq_len_cached", f"{layer_type}_max_seq_len_cached"}:
                setattr(module, name, module.original_max_seq_len)


def cache_rows_selectable(config) -> bool:
    """Whether every layer of the key/value cache transformers builds for `config` is attention whose rows can be
    selected (`batch_select_indices`): linear-attention and recurrent layers (hybrid models such as Nemotron-H) keep
    a running state instead (`LinearAttentionCacheLayerMixin`, transformers >= 5.18)."""
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a cache transformers cannot build from the config: treated as not selectable
        return False
    linear = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    return all(hasattr(layer, "batch_select_indices") and not isinstance(layer, linear) for layer in layers)


def empty_model_like(model: torch.nn.Module) -> torch.nn.Module:
    """A freshly initialised model of `model`'s class, configuration and dtype (transformers' private
    `_from_config`, which under DeepSpeed's `zero.Init` builds it partitioned)."""
    return type(model)._from_config(model.config, dtype=model.dtype)


class ParameterTable(dict):
    """An empty parameter table that takes attributes."""


class NoPositions(torch.nn.Module):
    """Stands in for a causal LM's head in passes that project no position (`logits_to_keep=NO_LOGITS`): `(…, 0,
    vocab)` logits, without the head's module call. Under ZeRO-3 that call alone gathers the whole head from every
    process (its forward hook does, whatever the number of positions: 1.24 GB for Qwen3-8B in bf16, per teacher pass)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        # DeepSpeed 0.19.0's engine flags every module's parameter table before each forward
        # (`module._parameters._in_forward = True`): ZeRO-3's tables take attributes, a plain dict does not.
        self._parameters = ParameterTable()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], self.vocab_size)  # no memory, whatever the positions


@contextmanager
def head_not_called(lm):
    """The causal LM `lm`'s head replaced by `NoPositions` for passes that project no logits (the statistics use its
    weights, gathered once per call, `vocab.teacher_statistics`); the model's top-level forward still runs, whose
    module order ZeRO-3's prefetching follows."""
    head = lm.get_output_embeddings()
    name = next(name for name, module in lm.named_modules() if module is head)
    parent_name, _, attribute = name.rpartition(".")
    parent = lm.get_submodule(parent_name)
    setattr(parent, attribute, NoPositions(getattr(head, "out_features", None) or head.weight.size(0)))
    try:
        yield
    finally:
        setattr(parent, attribute, head)

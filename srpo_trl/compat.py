"""The private or version-dependent names of TRL and transformers that srpo_trl relies on, in one place.

TRL is pinned to 1.16.x and transformers ranges over 5.10.4 to 5.x: review this module on each bump. Everything else in
the package reaches these names through the functions here.
"""

import inspect
import warnings


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


def quiet_trl_checkpointing_calls() -> None:
    """TRL 1.16 toggles gradient checkpointing around generation through transformers' old method names
    (`is_gradient_checkpointing`, `gradient_checkpointing_enable/disable`), which newer transformers deprecate:
    a warning per run that no SRPO or TRL user can act on."""
    for name in ("is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"):
        warnings.filterwarnings("ignore", message=f"`{name}` is deprecated", category=FutureWarning)

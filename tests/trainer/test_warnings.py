"""A run prints warnings a user can act on, and no deprecation warnings of transformers' renamed arguments."""

import warnings

import torch
from helpers.tiny_trainer import make_trainer

from srpo_trl.testbed import pretrain
from srpo_trl.testbed.model import build_tiny_model


def _deprecations(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, (FutureWarning, DeprecationWarning))]


def test_a_training_step_gives_no_deprecation_warning(char_tokenizer, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = make_trainer(char_tokenizer, tmp_path, max_steps=1, gradient_checkpointing=True)
        trainer.train()
    found = [m for m in _deprecations(record) if "checkpointing" in m or "past_key_values" in m or "cache" in m]
    assert not found, found


def test_testbed_pretraining_uses_the_current_cache_argument(char_tokenizer):
    model = build_tiny_model(char_tokenizer, seed=0)
    prefix = torch.tensor(char_tokenizer("<|im_start|>system")["input_ids"])
    ids = torch.tensor([char_tokenizer("ab")["input_ids"]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, len(prefix) + ids.size(1)), "labels": ids}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = pretrain._completion_loss(model, prefix, batch)
    assert torch.isfinite(loss)
    assert not [m for m in _deprecations(record) if "past_key_values" in m], _deprecations(record)

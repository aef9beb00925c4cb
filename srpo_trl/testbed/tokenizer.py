"""A character-level tokenizer with a Qwen3-style chat template, built offline.

Tests, the demo and the learning testbed need a real `PreTrainedTokenizerFast` with a chat template, without
touching the Hub. One token per character keeps the vocabulary tiny (about 100 ids) and makes every string
round-trip exactly.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHARACTERS = sorted(set(string.printable) - set("\r\x0b\x0c"))

# Qwen3's template, reduced to what the testbed uses: system/user/assistant turns and `enable_thinking`.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return a character-level tokenizer: the special tokens take the first ids, then one id per character."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:3],
    )
    # As in Qwen3, the thinking markers are added but not special: they survive `skip_special_tokens=True`.
    tokenizer.add_tokens(SPECIAL_TOKENS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

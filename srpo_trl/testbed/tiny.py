"""A tiny local model and tokenizer for a first CPU run of your own task, saved where `--model_name_or_path` finds it.

```bash
python -m srpo_trl.testbed tiny-qwen3 --pretrained   # then: python -m srpo_trl.train --model_name_or_path tiny-qwen3 ...
```
"""

import argparse
from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from .model import build_tiny_model
from .pretrain import pretrained_testbed_model
from .tokenizer import build_char_tokenizer


def tiny_model_and_tokenizer(
    pretrained: bool = False, seed: int = 0
) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """
    A Qwen3-shaped model of about 100k parameters and its character-level tokenizer (with a Qwen3-style chat
    template and `enable_thinking`), built offline: enough to check a pipeline on CPU in seconds, nowhere near enough
    to learn a real task.

    Args:
        pretrained (`bool`, *optional*, defaults to `False`):
            `False`: randomly initialised (its completions are random characters, so it scores nearly nothing).
            `True`: the testbed model pre-trained on two-digit additions (system prompt `"Put the sum in answer
            tags."`, user turn `"12+34=?"`, reply `<answer>46</answer>`), right about a quarter of the time at
            temperature 1: groups of rollouts mix rewards and SRPO routes. Pre-trained on the first call (a few
            minutes of one CPU core), then loaded from the cache (`srpo_trl.testbed.default_cache_dir()`).
        seed (`int`, *optional*, defaults to `0`):
            Initial weights of the random model.

    Returns:
        `tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]`: the model (float32) and the tokenizer.

    Example:

    ```python
    >>> from srpo_trl.testbed import tiny_model_and_tokenizer
    >>> model, tokenizer = tiny_model_and_tokenizer()
    >>> model.save_pretrained("tiny-qwen3"); tokenizer.save_pretrained("tiny-qwen3")
    ```
    """
    if pretrained:
        return pretrained_testbed_model()
    tokenizer = build_char_tokenizer()
    return build_tiny_model(tokenizer, seed=seed), tokenizer


def save_tiny_model(output_dir: str | Path, pretrained: bool = False, seed: int = 0) -> Path:
    """Save [`tiny_model_and_tokenizer`]'s model and tokenizer to `output_dir` (a folder `from_pretrained` and
    `--model_name_or_path` take); returns it."""
    model, tokenizer = tiny_model_and_tokenizer(pretrained=pretrained, seed=seed)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m srpo_trl.testbed",
        description="Save a tiny Qwen3-shaped model and its tokenizer to a folder, for a first CPU run.",
    )
    parser.add_argument("output_dir", help="folder to write (e.g. tiny-qwen3)")
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="the model pre-trained on two-digit additions (a few minutes on the first call, then cached); "
        "default: randomly initialised",
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights of the random model")
    args = parser.parse_args(argv)
    print(f"Saved to {save_tiny_model(args.output_dir, pretrained=args.pretrained, seed=args.seed)}")

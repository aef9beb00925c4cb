"""Pre-train the tiny testbed model on CPU, and cache it.

An RL algorithm can only be checked on a model that sometimes solves its problems (so groups of rollouts mix
rewards) and, for the self-distillation branch, that reads a correct solution put in its prompt. The pre-training
mix teaches both on one task family of `task.py`:

- student examples, the prompt the policy sees, with a fraction of the labels replaced by near misses: the model
  learns the format and the skill, but spreads its probability over wrong answers, so sampling at temperature 1
  often fails and RL has something to sharpen;
- teacher examples, the method §3 teacher prompt holding a correct demonstration, always labelled correctly:
  the model learns that the answer in the demonstration is the answer.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3ForCausalLM,
    get_cosine_schedule_with_warmup,
)

from ..compat import cache_argument, output_cache
from .model import build_tiny_model
from .task import (
    format_completion,
    problem_pool,
    render_completion,
    render_prompts,
    student_prompt,
    task_family,
    teacher_prompt,
)
from .tokenizer import build_char_tokenizer


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """
    What the testbed model is and how it is pre-trained; the checkpoint cache is keyed by a hash of these values.

    Args:
        task (`str`, *optional*, defaults to `"addition"`):
            The task family (a key of `task.TASK_FAMILIES`) pre-trained on.
        hidden_size (`int`, *optional*, defaults to `64`):
            Width of the tiny Qwen3 model.
        num_layers (`int`, *optional*, defaults to `2`):
            Number of decoder layers (two are enough to copy a span from the prompt).
        num_heads (`int`, *optional*, defaults to `4`):
            Number of attention heads.
        max_steps (`int`, *optional*, defaults to `1000`):
            Optimizer steps of pre-training.
        batch_size (`int`, *optional*, defaults to `64`):
            Sequences per optimizer step.
        learning_rate (`float`, *optional*, defaults to `3e-3`):
            Peak AdamW learning rate (linear warm-up, cosine decay).
        label_noise (`float`, *optional*):
            Fraction of student examples whose label is a near miss instead of the answer; defaults to the task
            family's (`TaskFamily.label_noise`), which puts the model in that family's regime.
        teacher_fraction (`float`, *optional*, defaults to `0.4`):
            Fraction of steps that train on teacher-prompt examples instead of student ones.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the initial weights and the data stream.
    """

    task: str = "addition"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    label_noise: float | None = None
    teacher_fraction: float = 0.4
    seed: int = 0

    def __post_init__(self):
        # Resolved here, so that the cache key of the default and of the same value spelt out is one.
        if self.label_noise is None:
            object.__setattr__(self, "label_noise", task_family(self.task).label_noise)


def config_hash(config: PretrainConfig) -> str:
    """
    A short hash of `config` and of the testbed's source files. Any edit of the task, the model, the tokenizer or
    the training code changes it, so that a cache never serves a checkpoint of older code.
    """
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for source in ("task.py", "tokenizer.py", "model.py", "pretrain.py"):
        digest.update((Path(__file__).parent / source).read_bytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$SRPO_TESTBED_CACHE` if set, else `~/.cache/srpo_trl/testbed`."""
    return Path(os.environ.get("SRPO_TESTBED_CACHE", Path.home() / ".cache" / "srpo_trl" / "testbed"))


def pretrained_testbed_model(
    config: PretrainConfig | None = None, cache_dir: str | Path | None = None
) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """
    The pre-trained testbed model and its tokenizer: loaded from the cache, or pre-trained (about 100 seconds on one
    CPU core for the default config) and cached.

    Args:
        config (`PretrainConfig`, *optional*):
            Model and pre-training settings; defaults to `PretrainConfig()`.
        cache_dir (`str` or `Path`, *optional*):
            Root of the checkpoint cache; defaults to `default_cache_dir()`. The checkpoint lives in
            `<cache_dir>/<config_hash(config)>`.

    Returns:
        `tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]`: the model (float32, eval mode) and the tokenizer.
    """
    config = config or PretrainConfig()
    checkpoint = Path(cache_dir or default_cache_dir()) / config_hash(config)
    with cache_lock(checkpoint):
        if not checkpoint.is_dir():
            model, tokenizer = pretrain(config)
            _save_atomically(model, tokenizer, config, checkpoint)
    model = Qwen3ForCausalLM.from_pretrained(checkpoint)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    return model.eval(), tokenizer


@contextlib.contextmanager
def cache_lock(entry: Path):
    """Hold `<entry>.lock` exclusively: processes that want the same cache entry at once (several ranks of a launch,
    parallel test workers) wait for the first to build it instead of all building it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save_atomically(
    model: Qwen3ForCausalLM, tokenizer: PreTrainedTokenizerBase, config: PretrainConfig, checkpoint: Path
) -> None:
    """Save into a temporary sibling folder, then rename it: a reader never sees half a checkpoint."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=checkpoint.parent, prefix=f".{checkpoint.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "testbed_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    try:
        staging.rename(checkpoint)
    except OSError:
        # Another process cached the same config first; both checkpoints come from the same seeded run.
        shutil.rmtree(staging)


def pretrain(config: PretrainConfig) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """Build the tiny model and pre-train it on the student/teacher mix (no caching), on one CPU thread."""
    # The tiny model's ops gain little from a second thread and lose a lot when the cores are shared (on a busy
    # 2-core machine, 2 threads ran 7x slower than 1). One thread also makes the checkpoint independent of the
    # caller's thread setting, which the cache key does not record.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(config)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(config: PretrainConfig) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, config.hidden_size, config.num_layers, config.num_heads, seed=config.seed)
    examples = _ExampleSource(tokenizer, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.max_steps // 20, config.max_steps)
    model.train()
    for _ in range(config.max_steps):
        loss = _completion_loss(model, examples.shared_prefix, examples.batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), tokenizer


def _completion_loss(
    model: Qwen3ForCausalLM, shared_prefix: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """
    Mean next-token loss over the completion tokens of `batch`, whose rows all continue `shared_prefix`.

    Every prompt starts with the same system message and chat markup, half of a student example. The prefix runs
    once and its key/value cache is repeated over the batch: the loss and gradients are those of the full sequences
    for about a third less compute.
    """
    cache = output_cache(model(input_ids=shared_prefix[None], use_cache=True))
    cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    return model(**batch, **{cache_argument(type(model)): cache}).loss


class _ExampleSource:
    """
    Seeded stream of pre-training batches. A row is prompt + completion + EOS with the loss on the completion only,
    minus `shared_prefix`, the leading tokens common to every prompt.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PretrainConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.rng = random.Random(config.seed)
        self.family = task_family(config.task)
        self.problems = problem_pool("pretrain", config.task)
        # Rendering every prompt once up front is far cheaper than running the chat template on every example.
        prompts = [student_prompt(question, config.task) for question, _ in self.problems]
        student_ids = render_prompts(tokenizer, prompts)
        teacher_ids = render_prompts(
            tokenizer,
            [teacher_prompt(p, format_completion(a)) for p, (_, a) in zip(prompts, self.problems, strict=True)],
        )
        # `commonprefix` compares element-wise, so it works on lists of token ids as on strings.
        prefix = os.path.commonprefix(student_ids + teacher_ids)
        self.shared_prefix = torch.tensor(prefix)
        self.student_prompt_ids = [ids[len(prefix) :] for ids in student_ids]
        self.teacher_prompt_ids = [ids[len(prefix) :] for ids in teacher_ids]

    def batch(self) -> dict[str, torch.Tensor]:
        # A batch is all teacher or all student examples: teacher prompts are much longer, so mixing them would
        # mostly add padding.
        teacher = self.rng.random() < self.config.teacher_fraction
        sequences = []
        for index in self.rng.sample(range(len(self.problems)), self.config.batch_size):
            answer = self.problems[index][1]
            if teacher:
                prompt_ids = self.teacher_prompt_ids[index]
            else:
                prompt_ids = self.student_prompt_ids[index]
                if self.rng.random() < self.config.label_noise:
                    answer = self.family.near_miss(answer, self.rng)
            sequences.append((prompt_ids, render_completion(self.tokenizer, answer)))
        return collate_completions(sequences, self.tokenizer.pad_token_id)


def collate_completions(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """
    Right-pad `(prompt_ids, completion_ids)` pairs into model inputs whose labels mask all but the completion.

    No attention mask: under causal attention no real token attends to the padding after it, and the padding has no
    label, so the loss is the same, and attention takes its faster causal-only path.
    """
    length = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id)
    labels = torch.full((len(sequences), length), -100)
    for row, (prompt, completion) in enumerate(sequences):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(completion)
    return {"input_ids": input_ids, "labels": labels}

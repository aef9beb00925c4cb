"""Step cost of SRPO against GRPO (`trl.GRPOTrainer`) and TRL's SDPO (`trl.experimental.sdpo.SDPOTrainer`).

Every arm trains the *same* batch. A fixed set of completions is replayed in place of generation, so the arms see
identical token ids and generation, which costs every arm the same, is left out of the step. A reward function that
depends only on a rollout's position in its group controls the fraction `f` of routed rollouts: the last `k_g`
rollouts of group `g` fail and the others are correct, with `sum_g k_g = round(f * batch)` and at least one correct
rollout per group (so the largest `f` is `(G - 1) / G`; the tables show the `f` actually used).

What is measured, with one torch thread:

- step time of each arm at each `f`: the trainer's own optimizer step inside `Trainer.train` (prepare = replayed
  generation + rewards + routing + SRPO's teacher scoring; forward+backward; optimizer + EMA), interleaved across
  arms and `f` and repeated. On CPU the clock is this process's CPU time (see `clock`). SRPO/GRPO and SRPO/SDPO are
  taken per repeat (the arms of one repeat run back to back) and shown as min/median/max, plus the ratio of the
  fastest steps, the estimate least moved by other processes on the machine;
- SRPO's teacher share: its `_score_with_teacher` (what `srpo/time/teacher_s` times) and, within it, the teacher's
  forward (teacher backbone + `teacher_statistics`), fitted against `f`;
- where the time goes: a torch-profiler breakdown per arm and a decomposition of SRPO's overhead at `f = 0`;
- peak memory of each phase, each configuration in a fresh process (see `Probe`): per arm, and SRPO vs GRPO (SDPO
  where its full logits fit) as the vocabulary and the completion length grow.

Usage:
    python benchmarks/step_cost.py --quick                    # about two minutes
    python benchmarks/step_cost.py                            # full CPU run (about 15 minutes on 2 cores)
    python benchmarks/step_cost.py --write-results            # ... and rewrite this device's block of RESULTS.md
    benchmarks/gpu.sh                                         # the same on one GPU, bf16, Qwen3-0.6B-shaped model
"""

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = ("grpo", "srpo", "sdpo")
PHASES = ("prepare", "forward_backward", "optimizer")
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Model and batch of one benchmark configuration."""

    name: str
    vocab: int = 4096
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    intermediate: int | None = None
    tie_embeddings: bool = False
    num_prompts: int = 5
    group: int = 8
    prompt_chars: int = 16
    completion_len: int = 96
    topk: int = 100

    @property
    def batch(self) -> int:
        return self.num_prompts * self.group

    def describe(self) -> str:
        return (
            f"Qwen3 vocab {self.vocab}, hidden {self.hidden}, {self.layers} layers; {self.num_prompts} prompt(s) x "
            f"{self.group} rollouts, completions of {self.completion_len} tokens, top-k {self.topk}"
        )


@dataclass
class Plan:
    """What one run measures."""

    timing_shapes: list[Shape]
    fractions: list[float]
    repeats: int
    memory_shape: Shape | None = None  # per-arm memory at `memory_fractions` (fresh process each)
    memory_fractions: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    vocab_sweep: list[Shape] = field(default_factory=list)
    length_sweep: list[Shape] = field(default_factory=list)
    sweep_fraction: float = 0.5
    arms: tuple[str, ...] = ARMS
    memory_steps: int = 2  # per-arm memory: the last of this many steps
    sweep_steps: int = 1  # sweeps: large configurations, one step
    profile: bool = True  # torch-profiler breakdown and f = 0 decomposition on the first timing shape
    in_process_memory: bool = False  # toy runs: the same code path without the subprocess
    malloc: str = "cache"  # CPU timing: glibc policy after the allocator comparison (see `set_malloc`)


# Tiny: the test model's size with a 4k vocabulary; small: a backbone/LM-head balance closer to real models.
TINY = Shape("tiny", vocab=4096, hidden=64, layers=2, heads=4, kv_heads=2, num_prompts=5, completion_len=96)
SMALL = Shape("small", vocab=8192, hidden=256, layers=4, heads=8, kv_heads=4, num_prompts=1, completion_len=192)
# Sweeps: a tiny backbone, so that the LM head (the part that grows with the vocabulary) dominates.
SWEEP = Shape(
    "sweep", vocab=151936, hidden=64, layers=2, heads=4, kv_heads=2, num_prompts=1, group=4, completion_len=256
)
QWEN3_0_6B = Shape(
    "qwen3-0.6b",
    vocab=151936,
    hidden=1024,
    layers=28,
    heads=16,
    kv_heads=8,
    head_dim=128,
    intermediate=3072,
    tie_embeddings=True,
    num_prompts=2,
    group=8,
    prompt_chars=200,
    completion_len=1024,
)

FRACTIONS = [0.0, 0.25, 0.4, 0.5, 1.0]


def plan_for(mode: str, device: str) -> Plan:
    if mode == "toy":  # tests/test_benchmarks.py: seconds, every code path
        toy = Shape(
            "toy",
            vocab=512,
            hidden=32,
            layers=1,
            heads=2,
            kv_heads=1,
            num_prompts=1,
            group=4,
            prompt_chars=4,
            completion_len=8,
            topk=8,
        )
        return Plan(
            [toy],
            [0.0, 0.5],
            1,
            toy,
            [0.5],
            [replace(toy, name="toy-v1024", vocab=1024)],
            [replace(toy, name="toy-L16", completion_len=16)],
            memory_steps=1,
            in_process_memory=True,
            malloc="default",
        )  # in-process (pytest): leave the allocator alone
    if device == "cuda":
        big, full = QWEN3_0_6B, mode == "full"
        vocabs = (32768, 65536, 151936) if full else (32768, 151936)
        lengths = (1024, 4096, 8192) if full else (1024, 4096)
        return Plan(
            [big],
            FRACTIONS if full else [0.0, 0.4, 1.0],
            5 if full else 3,
            big,
            memory_fractions=[0.0, 0.4, 1.0] if full else [0.4],
            vocab_sweep=[
                replace(big, name=f"v{v}", vocab=v, num_prompts=1, group=4, completion_len=2048) for v in vocabs
            ],
            length_sweep=[replace(big, name=f"L{n}", num_prompts=1, group=2, completion_len=n) for n in lengths],
        )
    if mode == "quick":
        return Plan(
            [TINY],
            [0.0, 0.4, 1.0],
            3,
            vocab_sweep=[replace(SWEEP, name=f"v{v}", vocab=v) for v in (32768, 151936)],
            profile=False,
        )
    return Plan(
        [TINY, SMALL],
        FRACTIONS,
        5,
        TINY,
        vocab_sweep=[replace(SWEEP, name=f"v{v}", vocab=v) for v in (32768, 65536, 151936)],
        length_sweep=[
            replace(SWEEP, name=f"L{n}", vocab=32768, group=2, completion_len=n) for n in (1024, 4096, 8192)
        ],
    )


# ----------------------------------------------------------------------------------------------------------------
# Routing control, replayed rollouts, model
# ----------------------------------------------------------------------------------------------------------------


def failures_per_group(f: float, num_prompts: int, group: int) -> list[int]:
    """Failed rollouts per group for a routed fraction close to `f` (each group keeps one correct rollout)."""
    total = min(round(f * num_prompts * group), num_prompts * (group - 1))
    base, extra = divmod(total, num_prompts)
    return [base + (g < extra) for g in range(num_prompts)]


def srpo_routed_fraction(failures: list[int], group: int) -> float:
    """SPEC §2 on this pattern: every failed rollout has a correct sibling, so all of them are routed."""
    return sum(failures) / (len(failures) * group)


class PositionalReward:
    """Reward 0 for the last `failures[g]` rollouts of group `g`, 1 for the others: the batch's routing, by position.

    GRPOTrainer and SDPOTrainer both score the generation batch in sampler order, a prompt's rollouts contiguous.
    """

    __name__ = "positional_reward"

    def __init__(self, group: int):
        self.group, self.failures = group, [0]

    def __call__(self, completions, **kwargs):
        rewards = []
        for i in range(len(completions)):
            g, j = divmod(i, self.group)
            rewards.append(0.0 if j >= self.group - self.failures[g % len(self.failures)] else 1.0)
        return rewards


def char_tokenizer():
    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def replay_completions(tokenizer, shape: Shape, seed: int = 0) -> list[list[int]]:
    """`batch` completions of exactly `completion_len` tokens: random letters/digits/spaces, then EOS.

    Only ids the character tokenizer round-trips, so a demonstration decodes and re-encodes to the same length (the
    model's vocabulary may be larger than the tokenizer's). A randomly initialised model samples close to uniformly
    anyway, and the content changes no arm's cost.
    """
    alphabet = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789 "]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(alphabet), (shape.batch, shape.completion_len - 1), generator=generator)
    return [[alphabet[i] for i in row] + [tokenizer.eos_token_id] for row in picks.tolist()]


def prompt_text(shape: Shape) -> str:
    return ("Spell " + "xyzw" * shape.prompt_chars)[: max(shape.prompt_chars, 1)]


def save_model(shape: Shape, tokenizer, folder: str, dtype: torch.dtype, seed: int = 0) -> str:
    """A randomly initialised Qwen3 of `shape`, saved, so that every arm (and SDPO's EMA teacher) loads the same one."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shape.vocab < len(tokenizer):
        raise ValueError(f"vocab {shape.vocab} < tokenizer size {len(tokenizer)}")
    config = Qwen3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate or 2 * shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim or shape.hidden // shape.heads,
        max_position_embeddings=40960,  # Qwen3's; rotary embeddings allocate nothing per position
        tie_word_embeddings=shape.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    return folder


def model_key(shape: Shape) -> str:
    """The fields that define the model (not the batch): configurations that share it share one saved copy."""
    return "-".join(
        str(getattr(shape, name))
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "tie_embeddings")
    )


def cached_model(shape: Shape, tokenizer, folder: str, device: str) -> str:
    path = os.path.join(folder, model_key(shape))
    if not os.path.exists(os.path.join(path, "config.json")):
        save_model(shape, tokenizer, path, torch.bfloat16 if device == "cuda" else torch.float32)
    return path


def sdpo_logits_bytes(shape: Shape, device: str) -> int:
    """Size of one `[batch, completion + 1, vocab]` logits tensor, which TRL's SDPO holds for student and teacher."""
    return shape.batch * (shape.completion_len + 1) * shape.vocab * (2 if device == "cuda" else 4)


def sdpo_fits(shape: Shape, device: str) -> bool:
    """SDPO's peak is several such tensors. CPU: at most 1 GiB each (the machine is shared, and an out-of-memory kill
    would hit someone else's process); GPU: at most a quarter of the device (an OOM there is caught and reported)."""
    limit = torch.cuda.get_device_properties(0).total_memory // 4 if device == "cuda" else 2**30
    return sdpo_logits_bytes(shape, device) <= limit


# ----------------------------------------------------------------------------------------------------------------
# Clocks and phase probes
# ----------------------------------------------------------------------------------------------------------------


def clock(device: str) -> float:
    """Seconds. CPU: this process's CPU time (one torch thread; CPU autograd runs on the calling thread), which
    processes competing for the cores move much less than the wall clock. GPU: the wall clock, synchronised."""
    return time.perf_counter() if device == "cuda" else time.process_time()


def _rusage() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def set_malloc(policy: str) -> bool:
    """glibc's policy for large blocks. `"cache"`: never `mmap` them, never trim the heap, so that freed memory is
    reused instead of handed back to the kernel and faulted in (zeroed) again on the next allocation, as PyTorch's
    caching allocator does on GPU. `"default"`: glibc's settings (blocks of 32 MiB and more always `mmap`ed). Returns
    whether the policy could be set (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if policy == "cache":
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return bool(libc.mallopt(M_MMAP_MAX, 65536)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field_name}:\s+(\d+)", status.read()).group(1))


class Probe:
    """Time (see `clock`) and peak memory of named phases.

    GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the allocation at the start.
    CPU: torch's CPU tensors are plain `malloc`s that tracemalloc does not see, so the probe reads the process's
    resident-set high-water mark (`VmHWM`), reset at the start of each phase by writing `5` to
    `/proc/self/clear_refs` (Linux >= 4.0), minus the resident set at the start (after `malloc_trim`). It counts every
    byte the process touches, so each configuration runs in a fresh process with glibc told to return freed blocks
    of 128 KiB and more to the system at once (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).
    """

    def __init__(self, device: str, memory: bool = True):
        self.device, self.memory = device, memory
        self.started, self.records = {}, {}
        self.cpu_resettable = device == "cpu" and memory and os.path.exists("/proc/self/clear_refs")
        self._libc = None
        if self.cpu_resettable:
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL("libc.so.6")

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def begin(self, name: str):
        self._sync()
        base = None
        if self.memory and self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif self.cpu_resettable:
            if self._libc is not None:
                self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            base = _proc_status_kib("VmRSS") * 1024
        self.started[name] = (clock(self.device), time.perf_counter(), _rusage(), base)

    def end(self, name: str):
        self._sync()
        if name not in self.started:
            return
        start, wall_start, usage_start, base = self.started.pop(name)
        usage = _rusage()
        peak = None
        if base is not None:
            top = torch.cuda.max_memory_allocated() if self.device == "cuda" else _proc_status_kib("VmHWM") * 1024
            peak = max(top - base, 0)
        self.records[name] = {
            "s": clock(self.device) - start,
            "wall_s": time.perf_counter() - wall_start,
            "user_s": usage[0] - usage_start[0],
            "sys_s": usage[1] - usage_start[1],
            "minor_faults": usage[2] - usage_start[2],
            "peak_bytes": peak,
            "base_bytes": base,
        }


class _Timers:
    """Cumulative seconds (see `clock`) of named sub-steps."""

    def __init__(self, device: str):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = clock(self.device)
        try:
            yield
        finally:
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + clock(self.device) - start


# ----------------------------------------------------------------------------------------------------------------
# The three trainers, with generation replayed and the phases probed
# ----------------------------------------------------------------------------------------------------------------


class _BenchMixin:
    """Replaces generation by the fixed completions and probes prepare / forward+backward / optimizer+EMA."""

    bench_completions: list[list[int]]
    bench_probe: Probe
    bench_timers: _Timers

    def _prepare_inputs(self, generation_batch):
        self.bench_probe.begin("prepare")
        inputs = super()._prepare_inputs(generation_batch)
        self.bench_probe.end("prepare")
        self.bench_probe.begin("forward_backward")
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.bench_probe.end("forward_backward")
        self.bench_probe.begin("optimizer")
        return loss


def _replayed(rows: int, completions: list[list[int]]) -> list[list[int]]:
    if rows > len(completions):
        raise ValueError(f"{rows} rows but only {len(completions)} replayed completions")
    return [list(c) for c in completions[:rows]]


def trainer_classes():
    from trl import GRPOTrainer
    from trl.experimental.sdpo import SDPOTrainer

    from srpo_trl import SRPOTrainer

    class BenchGRPO(_BenchMixin, GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            return _replayed(len(prompt_ids), self.bench_completions), None

    class BenchSRPO(_BenchMixin, SRPOTrainer):
        # SRPOTrainer's internals this times; `tests/test_benchmarks.py` fails if they stop being called.
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            return _replayed(len(prompt_ids), self.bench_completions), None

        def _score_with_teacher(self, *args, **kwargs):
            with self.bench_timers("score_with_teacher"):
                return super()._score_with_teacher(*args, **kwargs)

        def _prefix_pass(self, *args, **kwargs):  # the teacher's passes: its prompts, then the completions
            with self.bench_timers("teacher_backbone"):
                return super()._prefix_pass(*args, **kwargs)

        def _continuation_hidden(self, *args, **kwargs):
            with self.bench_timers("teacher_backbone"):
                return super()._continuation_hidden(*args, **kwargs)

        def _distillation_token_losses(self, *args, **kwargs):
            with self.bench_timers("distillation_forward"):
                return super()._distillation_token_losses(*args, **kwargs)

    class BenchSDPO(_BenchMixin, SDPOTrainer):
        def _generate_transformers(self, prompt_ids):
            return prompt_ids, _replayed(len(prompt_ids), self.bench_completions)

    return {"grpo": BenchGRPO, "srpo": BenchSRPO, "sdpo": BenchSDPO}


@contextlib.contextmanager
def timed_teacher_statistics(timers: _Timers):
    """Time the teacher's vocabulary pass where SRPO's trainer calls it (in this process only; no file is changed)."""
    import srpo_trl.trainer as srpo_trainer

    original = srpo_trainer.teacher_statistics

    def timed(*args, **kwargs):
        with timers("teacher_statistics"):
            return original(*args, **kwargs)

    srpo_trainer.teacher_statistics = timed
    try:
        yield
    finally:
        srpo_trainer.teacher_statistics = original


class _StepEnd(TrainerCallback):
    """Closes the optimizer phase at `on_step_end`, after the optimizer step and the teachers' EMA callbacks."""

    def __init__(self, probe: Probe):
        self.probe = probe

    def on_step_end(self, args, state, control, **kwargs):
        self.probe.end("optimizer")


def common_args(shape: Shape, output_dir: str, device: str) -> dict:
    """The settings every arm shares: SRPO's paper defaults where GRPOConfig's differ (SPEC §10)."""
    return dict(
        output_dir=output_dir,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        per_device_train_batch_size=shape.batch,
        gradient_accumulation_steps=1,
        num_generations=shape.group,
        max_completion_length=shape.completion_len,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        disable_tqdm=True,
        dataloader_num_workers=0,
        chat_template_kwargs={"enable_thinking": False},
        scale_rewards="none",
        epsilon_high=0.28,
        loss_type="dapo",
        beta=0.0,
        temperature=1.0,
    )


def build_trainer(arm: str, shape: Shape, model_dir: str, tokenizer, reward, completions, device: str, work: str):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig
    from trl.experimental.sdpo import SDPOConfig

    from srpo_trl import SRPOConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    settings = common_args(shape, os.path.join(work, arm), device)
    if arm == "grpo":
        args = GRPOConfig(**settings)
    elif arm == "srpo":
        args = SRPOConfig(**settings, distillation_topk=shape.topk)
    else:
        # The paper's SDPO arm on TRL's trainer: pure self-distillation, top-k JSD (alpha 0.5) with a tail bucket, IS
        # clip 2, EMA teacher at rate 0.05. It distills every rollout that has a successful sibling, correct ones too.
        args = SDPOConfig(
            **settings,
            distillation_weight=1.0,
            distillation_mode="topk_logits",
            distillation_topk=shape.topk,
            distillation_add_tail=True,
            distillation_alpha=0.5,
            distillation_is_clip=2.0,
            teacher_model_kind="ema",
            teacher_update_rate=0.05,
            success_reward_threshold=1.0,
            max_prompt_length=None,
        )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": prompt_text(shape)}]] * shape.num_prompts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_classes()[arm](
            model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
        )
    trainer.remove_callback(PrinterCallback)  # the logs are read from `trainer.state.log_history`
    trainer.bench_completions = completions
    trainer.bench_probe = Probe(device, memory=False)
    trainer.bench_timers = _Timers(device)
    trainer.add_callback(_StepEnd(trainer.bench_probe))
    return trainer


def run_step(trainer, reward: PositionalReward, failures: list[int], steps: int = 1) -> dict:
    """`steps` calls of `trainer.train()` (one optimizer step each) on the replayed batch; the last one's record."""
    reward.failures = failures
    record = None
    for _ in range(steps):
        trainer.bench_probe.records = {}
        trainer.bench_timers.seconds = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        probe = trainer.bench_probe.records
        logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
        record = {
            "step_s": sum(probe[p]["s"] for p in PHASES if p in probe),
            "step_wall_s": sum(probe[p]["wall_s"] for p in PHASES if p in probe),
            "phases": {k: dict(v) for k, v in probe.items()},
            "trl_step_time": logs.get("step_time"),
            "teacher_s": logs.get("srpo/time/teacher_s"),
            "sdpo_frac": logs.get("srpo/route/sdpo_frac"),
            "sdpo_reprompt_frac": logs.get("self_distillation/reprompt_sample_fraction"),
            "loss": logs.get("loss", logs.get("train_loss")),
            "timers": dict(trainer.bench_timers.seconds),
        }
    return record


def _srpo_timing(trainer, arm: str):
    return timed_teacher_statistics(trainer.bench_timers) if arm == "srpo" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Timing: all arms in one process, interleaved
# ----------------------------------------------------------------------------------------------------------------


def time_shape(shape: Shape, plan: Plan, device: str, log=print) -> list[dict]:
    tokenizer = char_tokenizer()
    completions = replay_completions(tokenizer, shape)
    work = tempfile.mkdtemp(prefix=f"srpo-bench-{shape.name}-")
    rows = []
    try:
        model_dir = cached_model(shape, tokenizer, work, device)
        reward = PositionalReward(shape.group)
        trainers, errors = {}, {}
        for arm in plan.arms:
            if arm == "sdpo" and not sdpo_fits(shape, device):
                errors[arm] = (
                    f"skipped: [batch, length, vocab] logits of {sdpo_logits_bytes(shape, device) / 2**30:.1f} GiB"
                )
                continue
            try:
                trainers[arm] = build_trainer(arm, shape, model_dir, tokenizer, reward, completions, device, work)
            except Exception as error:  # noqa: BLE001 - reported as the reason the arm is missing
                errors[arm] = f"{type(error).__name__}: {error}"
        warm = failures_per_group(0.5, shape.num_prompts, shape.group)
        for arm, trainer in list(trainers.items()):  # warm-up step (allocations, lazy init): not recorded
            try:
                with _srpo_timing(trainer, arm):
                    run_step(trainer, reward, warm)
            except Exception as error:  # noqa: BLE001
                errors[arm] = f"{type(error).__name__}: {str(error)[:300]}"
                del trainers[arm]
                if device == "cuda":
                    torch.cuda.empty_cache()
        for arm, message in errors.items():
            log(f"  [{shape.name}] {arm} not measured: {message}")
        if device == "cpu" and plan.malloc == "cache" and shape is plan.timing_shapes[0]:
            rows += allocator_comparison(trainers, shape, reward, log)
        # Everything built so far is long-lived: keep it out of the collector's scans (the full collection
        # `Trainer.train` runs first, and the automatic ones inside timed steps).
        gc.collect()
        gc.freeze()
        for repeat in range(plan.repeats):
            shift = repeat % len(plan.fractions)
            for f in plan.fractions[shift:] + plan.fractions[:shift]:
                failures = failures_per_group(f, shape.num_prompts, shape.group)
                arms = list(trainers)
                arms = arms[repeat % len(arms) :] + arms[: repeat % len(arms)]
                for arm in arms:
                    with _srpo_timing(trainers[arm], arm):
                        record = run_step(trainers[arm], reward, failures)
                    record.update(
                        kind="timing",
                        shape=shape.name,
                        arm=arm,
                        repeat=repeat,
                        f_target=f,
                        f=srpo_routed_fraction(failures, shape.group),
                    )
                    rows.append(record)
                log(
                    f"  [{shape.name}] repeat {repeat} f={rows[-1]['f']:.3f} "
                    + " ".join(f"{r['arm']}={r['step_s']:.3f}s" for r in rows[-len(arms) :])
                )
        rows += [
            {"kind": "timing", "shape": shape.name, "arm": arm, "error": message} for arm, message in errors.items()
        ]
        if plan.profile and shape is plan.timing_shapes[0] and trainers:
            rows.append(f0_overhead(trainers, shape, reward, device, log))
            rows += profile_arms(trainers, shape, reward, device, log)
    finally:
        gc.unfreeze()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def allocator_comparison(trainers: dict, shape: Shape, reward, log=print, steps: int = 2) -> list[dict]:
    """The same steps under glibc's default policy, then under the caching one (which the timing then keeps)."""
    failures = failures_per_group(0.5, shape.num_prompts, shape.group)
    rows = []
    for policy in ("default", "cache"):
        if not set_malloc(policy):
            log("  glibc mallopt unavailable: timing with the platform allocator")
            return rows
        for arm, trainer in trainers.items():
            with _srpo_timing(trainer, arm):
                records = [run_step(trainer, reward, failures) for _ in range(steps)]
            best = min(records, key=lambda r: r["step_s"])
            rows.append(
                {
                    "kind": "allocator",
                    "shape": shape.name,
                    "arm": arm,
                    "malloc": policy,
                    "f": srpo_routed_fraction(failures, shape.group),
                    **best,
                }
            )
            phases = best["phases"]
            log(
                f"  [{shape.name}] malloc={policy} {arm}: step {best['step_s']:.3f}s "
                f"(sys {sum(p['sys_s'] for p in phases.values()):.3f}s, "
                f"{sum(p['minor_faults'] for p in phases.values())} page faults)"
            )
    return rows


def _per_call_s(function, device: str, calls: int = 30) -> float:
    function()
    start = clock(device)
    for _ in range(calls):
        function()
    return (clock(device) - start) / calls


def f0_overhead(trainers: dict, shape: Shape, reward, device: str, log=print) -> dict:
    """What SRPO adds to GRPO's step at f = 0, piece by piece (each piece timed alone, so noise does not add up)."""
    record = {"kind": "f0_overhead", "shape": shape.name}
    failures = failures_per_group(0.0, shape.num_prompts, shape.group)
    for arm in ("grpo", "srpo"):
        if arm not in trainers:
            return record
        trainer = trainers[arm]
        original = trainer.accelerator.unwrap_model
        calls = []

        def counting(*args, _original=original, _calls=calls, **kwargs):
            _calls.append(1)
            return _original(*args, **kwargs)

        trainer.accelerator.unwrap_model = counting
        try:
            steps = [run_step(trainer, reward, failures) for _ in range(3)]
        finally:
            del trainer.accelerator.unwrap_model
        record[f"{arm}_unwrap_calls"] = len(calls) / 3
        record[f"{arm}_step_min_s"] = min(s["step_s"] for s in steps)
        record[f"{arm}_phases_min_s"] = {p: min(s["phases"][p]["s"] for s in steps) for p in PHASES}
        if arm == "srpo":
            record["srpo_score_with_teacher_s"] = statistics.median(
                s["timers"].get("score_with_teacher", 0.0) for s in steps
            )
    srpo = trainers["srpo"]
    record["unwrap_model_s"] = _per_call_s(lambda: srpo.accelerator.unwrap_model(srpo.model), device)
    ema = [c for c in srpo.callback_handler.callbacks if type(c).__name__ == "SelfTeacherCallback"]
    if ema:  # the EMA callback as the trainer calls it (unwrap + update); a few extra EMA steps change nothing here
        record["ema_callback_s"] = _per_call_s(
            lambda: ema[0].on_step_end(srpo.args, srpo.state, srpo.control), device, calls=10
        )
    record["optimizer_step_s"] = record["grpo_phases_min_s"]["optimizer"]
    log(f"  [{shape.name}] f=0 overhead pieces: " + json.dumps({k: v for k, v in record.items() if k.endswith("_s")}))
    return record


PROFILE_GROUPS = {
    "TRL fused LM head (GRPO loss)": ("ChunkedLogProbFunction", "ChunkedLogProbFunctionBackward"),
    "SRPO student head (distillation)": ("_TopKLogProbs", "_TopKLogProbsBackward"),
    "top-k": ("aten::topk",),
    "log_softmax (+backward)": ("aten::log_softmax", "aten::_log_softmax_backward_data"),
    "attention": (
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
}


def profile_arms(trainers: dict, shape: Shape, reward, device: str, log=print, f: float = 0.5, steps: int = 2):
    """torch-profiler totals of a few operations per arm, as fractions of the profiled steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    failures = failures_per_group(f, shape.num_prompts, shape.group)
    rows = []
    for arm, trainer in trainers.items():
        with profile(activities=activities) as prof, _srpo_timing(trainer, arm):
            wall = sum(run_step(trainer, reward, failures)["step_wall_s"] for _ in range(steps))
        totals = {}
        for event in prof.key_averages():
            time_us = event.device_time_total if device == "cuda" else event.cpu_time_total
            totals[event.key] = totals.get(event.key, 0.0) + time_us
        groups = {
            name: sum(totals.get(key, 0.0) for key in keys) / 1e6 / wall for name, keys in PROFILE_GROUPS.items()
        }
        top = sorted(
            (
                (e.key, (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e6 / wall)
                for e in prof.key_averages()
            ),
            key=lambda item: -item[1],
        )[:6]
        rows.append(
            {
                "kind": "profile",
                "shape": shape.name,
                "arm": arm,
                "f": srpo_routed_fraction(failures, shape.group),
                "groups": groups,
                "top_self": top,
                "wall_s": wall / steps,
            }
        )
        log(f"  [{shape.name}] profile {arm}: " + ", ".join(f"{k} {v:.0%}" for k, v in groups.items() if v))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Memory: one configuration per fresh process
# ----------------------------------------------------------------------------------------------------------------


def measure_memory(arm: str, shape: Shape, f: float, device: str, steps: int, models: str) -> dict:
    """Peak memory of each phase of the last of `steps` steps, for one arm (meant for a fresh process)."""
    tokenizer = char_tokenizer()
    completions = replay_completions(tokenizer, shape)
    work = tempfile.mkdtemp(prefix=f"srpo-mem-{arm}-")
    try:
        model_dir = cached_model(shape, tokenizer, models, device)
        reward = PositionalReward(shape.group)
        trainer = build_trainer(arm, shape, model_dir, tokenizer, reward, completions, device, work)
        probe = Probe(device, memory=True)
        trainer.bench_probe = probe
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, _StepEnd):
                callback.probe = probe
        failures = failures_per_group(f, shape.num_prompts, shape.group)
        baseline = _proc_status_kib("VmRSS") * 1024 if device == "cpu" else torch.cuda.memory_allocated()
        with _srpo_timing(trainer, arm):
            record = run_step(trainer, reward, failures, steps=steps)
        record.update(
            shape=shape.name,
            arm=arm,
            f=srpo_routed_fraction(failures, shape.group),
            vocab=shape.vocab,
            completion_len=shape.completion_len,
            batch=shape.batch,
            baseline_bytes=baseline,
        )
        if device == "cuda":
            record["process_peak_bytes"] = torch.cuda.max_memory_allocated()
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory_subprocess(
    arm: str, shape: Shape, f: float, device: str, steps: int, in_process: bool, models: str
) -> dict:
    if arm == "sdpo" and not sdpo_fits(shape, device):
        gib = sdpo_logits_bytes(shape, device) / 2**30
        return {"shape": shape.name, "arm": arm, "f": f, "skipped": f"[batch, length, vocab] logits of {gib:.1f} GiB"}
    if in_process:
        try:
            return measure_memory(arm, shape, f, device, steps, models)
        except Exception as error:  # noqa: BLE001
            return {"shape": shape.name, "arm": arm, "f": f, "error": f"{type(error).__name__}: {error}"}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_TRIM_THRESHOLD_=str(2**20))
    spec = json.dumps({"arm": arm, "shape": asdict(shape), "f": f, "device": device, "steps": steps, "models": models})
    result = subprocess.run(
        [sys.executable, __file__, "--memory-worker", spec], capture_output=True, text=True, env=env, cwd=ROOT
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-2:]
        return {"shape": shape.name, "arm": arm, "f": f, "error": f"exit {result.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def memory_runs(plan: Plan, device: str, log=print) -> list[dict]:
    jobs = []
    if plan.memory_shape is not None:
        jobs += [
            (arm, plan.memory_shape, f, "arms", plan.memory_steps) for f in plan.memory_fractions for arm in plan.arms
        ]
    jobs += [(arm, s, plan.sweep_fraction, "vocab", plan.sweep_steps) for s in plan.vocab_sweep for arm in plan.arms]
    jobs += [(arm, s, plan.sweep_fraction, "length", plan.sweep_steps) for s in plan.length_sweep for arm in plan.arms]
    rows = []
    models = tempfile.mkdtemp(prefix="srpo-mem-models-")  # each model saved once, loaded by every process using it
    try:
        for arm, shape, f, kind, steps in jobs:
            record = memory_subprocess(arm, shape, f, device, steps, plan.in_process_memory, models)
            record.update(kind=kind, vocab=shape.vocab, completion_len=shape.completion_len, batch=shape.batch)
            rows.append(record)
            if "phases" in record:
                log(
                    f"  [memory {kind} {shape.name}] {arm} f={record['f']:.2f}: "
                    + " ".join(f"{p}={_mib(v['peak_bytes'])}MiB/{v['s']:.1f}s" for p, v in record["phases"].items())
                )
            else:
                log(f"  [memory {kind} {shape.name}] {arm}: {record.get('error') or record.get('skipped')}")
    finally:
        shutil.rmtree(models, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def table_header(*columns: str) -> list[str]:
    """The first two lines of a markdown table."""
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def _mmm(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "n/a"
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares `y = a + b x`: `(a, b, r2)`."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return float("nan"), float("nan"), float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot else float("nan")


def _ok(rows, **keys):
    return [r for r in rows if "error" not in r and "skipped" not in r and all(r.get(k) == v for k, v in keys.items())]


def teacher_block_s(record: dict) -> float:
    """SRPO's `_score_with_teacher` on the benchmark's clock: the span `srpo/time/teacher_s` times (wall clock),
    plus the entropy weights and metrics after it."""
    return record["timers"].get("score_with_teacher", record.get("teacher_s") or 0.0)


def teacher_forward_s(record: dict) -> float:
    return record["timers"].get("teacher_backbone", 0.0) + record["timers"].get("teacher_statistics", 0.0)


def timing_tables(rows: list[dict], shape: Shape, device: str) -> tuple[str, dict]:
    """Markdown tables for one shape, and the numbers the targets are checked on."""
    ok = _ok(rows, kind="timing", shape=shape.name)
    fs = sorted({r["f"] for r in ok})
    arms = [a for a in ARMS if any(r["arm"] == a for r in ok)]
    unit = "CPU seconds of this process" if device == "cpu" else "seconds (wall clock, synchronised)"
    summary = {"shape": shape.name, "per_f": {}}
    lines = [
        f"**{shape.name}**: {shape.describe()}. Step = prepare (replayed generation, rewards, routing, SRPO's teacher "
        f"scoring) + forward/backward + optimizer/EMA, in {unit}, median over repeats. Ratios: per repeat, "
        "min/median/max, then the ratio of the fastest steps (`best`). Teacher shares: of SRPO's step (median).",
        "",
        *table_header(
            "f (routed)",
            *(f"{a.upper()} step" for a in arms),
            *("SRPO/GRPO", "best", "SRPO/SDPO", "best", "`_score_with_teacher` share", "teacher-forward share"),
        ),
    ]
    for f in fs:
        med = {a: statistics.median([r["step_s"] for r in _ok(ok, arm=a, f=f)]) for a in arms}
        best = {a: min(r["step_s"] for r in _ok(ok, arm=a, f=f)) for a in arms}
        ratios, best_ratio = {}, {}
        for other in ("grpo", "sdpo"):
            pairs = []
            for srpo in _ok(ok, arm="srpo", f=f):
                match = _ok(ok, arm=other, f=f, repeat=srpo["repeat"])
                if match:
                    pairs.append(srpo["step_s"] / match[0]["step_s"])
            ratios[other] = pairs
            best_ratio[other] = best["srpo"] / best[other] if "srpo" in best and other in best else None
        srpo_rows = _ok(ok, arm="srpo", f=f)
        share = [teacher_block_s(r) / r["step_s"] for r in srpo_rows]
        tshare = [teacher_forward_s(r) / r["step_s"] for r in srpo_rows]
        # SRPO = GRPO + teacher would give SRPO/GRPO = 1 + teacher / GRPO: the teacher in GRPO steps, per repeat
        over_grpo = [
            teacher_forward_s(r) / _ok(ok, arm="grpo", f=f, repeat=r["repeat"])[0]["step_s"]
            for r in srpo_rows
            if _ok(ok, arm="grpo", f=f, repeat=r["repeat"])
        ]
        summary["per_f"][f] = {
            "median_s": med,
            "best_s": best,
            "srpo_over_grpo": ratios["grpo"],
            "srpo_over_sdpo": ratios["sdpo"],
            "best_ratio": best_ratio,
            "teacher_share": share,
            "teacher_forward_share": tshare,
            "teacher_forward_over_grpo": over_grpo,
        }

        def fmt_best(value):
            return "n/a" if value is None else f"{value:.3f}"

        lines.append(
            f"| {f:.3f} | "
            + " | ".join(f"{med[a]:.3f}" for a in arms)
            + f" | {_mmm(ratios['grpo'])} | {fmt_best(best_ratio['grpo'])} | {_mmm(ratios['sdpo'])} | "
            f"{fmt_best(best_ratio['sdpo'])} | {statistics.median(share) if share else float('nan'):.3f} | "
            f"{statistics.median(tshare) if tshare else float('nan'):.3f} |"
        )
    lines += [
        "",
        "Where the time goes (median): phases per arm as prepare / forward+backward / optimizer+EMA; SRPO's teacher "
        "pass (backbone, then `teacher_statistics`); SRPO's distillation forward (inside its forward+backward: the "
        "student's top-k log-probs and the teacher's log-probs on them); SDPO's share of distilled rollouts (TRL's "
        "`self_distillation/reprompt_sample_fraction`).",
        "",
        *table_header(
            "f",
            *(f"{a.upper()} prep / fwd+bwd / opt" for a in arms),
            *("SRPO teacher backbone / stats", "SRPO distill fwd", "SDPO distilled"),
        ),
    ]
    for f in fs:
        cells = []
        for a in arms:
            rs = _ok(ok, arm=a, f=f)
            cells.append(" / ".join(f"{statistics.median([r['phases'][p]['s'] for r in rs]):.3f}" for p in PHASES))
        rs = _ok(ok, arm="srpo", f=f)

        def med_timer(*names, _rs=rs):
            return statistics.median([sum(r["timers"].get(n, 0.0) for n in names) for r in _rs]) if _rs else 0.0

        sdpo_rows = _ok(ok, arm="sdpo", f=f)
        distilled = sdpo_rows[0].get("sdpo_reprompt_frac") if sdpo_rows else None
        lines.append(
            f"| {f:.3f} | "
            + " | ".join(cells)
            + f" | {med_timer('teacher_backbone'):.3f} / {med_timer('teacher_statistics'):.3f}"
            + f" | {med_timer('distillation_forward'):.3f} | {'n/a' if distilled is None else f'{distilled:.3f}'} |"
        )
    near = min(fs, key=lambda f: abs(f - 0.4)) if fs else None
    if near is not None and {"grpo", "srpo"} <= set(arms):
        lines += ["", *itemized_extra(ok, near)]
    srpo_rows = _ok(ok, arm="srpo")
    if srpo_rows:
        a, b, r2 = _fit_line([r["f"] for r in srpo_rows], [teacher_block_s(r) for r in srpo_rows])
        a2, b2, r22 = _fit_line([r["f"] for r in srpo_rows], [teacher_forward_s(r) for r in srpo_rows])
        zero = [r["teacher_s"] for r in srpo_rows if r["f"] == 0.0 and r.get("teacher_s") is not None]
        at_zero = max(zero) if zero else float("nan")
        summary["teacher_fit"] = {
            "a": a,
            "b": b,
            "r2": r2,
            "fwd_a": a2,
            "fwd_b": b2,
            "fwd_r2": r22,
            "at_zero": at_zero,
        }
        lines += [
            "",
            f"Teacher time against f, least squares over every SRPO step: `_score_with_teacher` = {a:.4f} + {b:.4f} f "
            f"(R² = {r2:.3f}); teacher forward alone = {a2:.4f} + {b2:.4f} f (R² = {r22:.3f}); the largest "
            f"`srpo/time/teacher_s` SRPO logged at f = 0: {at_zero:.6f} s.",
        ]
    for r in rows:
        if r.get("kind") == "timing" and r.get("shape") == shape.name and "error" in r:
            lines += ["", f"{r['arm'].upper()} not measured: `{r['error']}`"]
    return "\n".join(lines), summary


def itemized_extra(ok: list[dict], f: float) -> list[str]:
    """SRPO's step minus GRPO's at `f`, item by item (medians), in GRPO steps."""

    def med(arm, get):
        values = [get(r) for r in _ok(ok, arm=arm, f=f)]
        return statistics.median(values) if values else float("nan")

    def phase(name):
        return lambda r: r["phases"][name]["s"]

    def timer(*names):
        return lambda r: sum(r["timers"].get(n, 0.0) for n in names)

    grpo = med("grpo", lambda r: r["step_s"])
    teacher = med("srpo", timer("teacher_backbone", "teacher_statistics"))
    items = [
        ("teacher forward (backbone + `teacher_statistics`)", teacher),
        (
            "rest of prepare (teacher prompts, scatter, weights, metrics)",
            med("srpo", phase("prepare")) - teacher - med("grpo", phase("prepare")),
        ),
        (
            "distillation loss: forward+backward beyond GRPO's",
            med("srpo", phase("forward_backward")) - med("grpo", phase("forward_backward")),
        ),
        ("optimizer + EMA beyond GRPO's", med("srpo", phase("optimizer")) - med("grpo", phase("optimizer"))),
    ]
    total = med("srpo", lambda r: r["step_s"]) - grpo
    lines = [
        f"SRPO's step minus GRPO's at f = {f:.3f}, item by item (medians; CPU/GPU seconds and in GRPO steps):",
        "",
        *table_header("item", "seconds", "/ GRPO step"),
        *[f"| {name} | {value:.3f} | {value / grpo:.3f} |" for name, value in items],
        f"| total (SRPO step - GRPO step) | {total:.3f} | {total / grpo:.3f} |",
    ]
    sdpo = med("sdpo", lambda r: r["step_s"])
    if sdpo == sdpo:  # SDPO measured
        lines += [
            "",
            f"SDPO's step is {sdpo / grpo:.3f} GRPO steps. If SRPO added only its teacher forward, SRPO/SDPO would be "
            f"{(grpo + teacher) / sdpo:.3f} at this f, and {grpo / sdpo:.3f} at f = 0 (SRPO never costs less than "
            "GRPO: it runs GRPO's whole loss pass).",
        ]
    return lines


def profile_tables(rows: list[dict], device: str) -> str:
    lines = []
    alloc = [r for r in rows if r.get("kind") == "allocator"]
    if alloc:
        lines += [
            f"**CPU allocator** ({alloc[0]['shape']}, f = {alloc[0]['f']:.3f}, fastest of 2 steps per arm): the same "
            "steps under glibc's default policy, which hands blocks of 32 MiB and more back to the kernel on free, and "
            "under the caching policy the timings above use (`set_malloc`: no `mmap`, no trimming). CPU seconds, and "
            "the kernel's share (system time, minor page faults) of the forward+backward phase:",
            "",
            *table_header(
                "arm",
                *("step, default", "of which system", "page faults"),
                *("step, caching", "of which system", "page faults"),
                "default / caching",
            ),
        ]
        for arm in ARMS:
            by = {r["malloc"]: r for r in alloc if r["arm"] == arm}
            if set(by) != {"default", "cache"}:
                continue
            d, c = by["default"], by["cache"]
            fb_d, fb_c = d["phases"]["forward_backward"], c["phases"]["forward_backward"]
            lines.append(
                f"| {arm.upper()} | {d['step_s']:.3f} | {fb_d['sys_s']:.3f} | {fb_d['minor_faults']} | "
                f"{c['step_s']:.3f} | {fb_c['sys_s']:.3f} | {fb_c['minor_faults']} | {d['step_s'] / c['step_s']:.2f} |"
            )
        lines.append("")
    over = [r for r in rows if r.get("kind") == "f0_overhead" and "srpo_step_min_s" in r]
    for r in over:
        grpo_step = r["grpo_step_min_s"]
        extra_unwrap = (r["srpo_unwrap_calls"] - r["grpo_unwrap_calls"]) * r["unwrap_model_s"]
        pieces = {
            "`_score_with_teacher` at f = 0 (allocations, routing metrics)": r["srpo_score_with_teacher_s"],
            "EMA callback (`unwrap_model` + `SelfTeacher.update`)": r.get("ema_callback_s", 0.0),
            f"other `accelerator.unwrap_model` calls ({r['srpo_unwrap_calls'] - r['grpo_unwrap_calls'] - 1:.0f}/step)": max(
                extra_unwrap - r["unwrap_model_s"], 0.0
            ),
        }
        lines += [
            f"**SRPO's overhead at f = 0, piece by piece** ({r['shape']}; each piece timed alone; GRPO's fastest step "
            f"{grpo_step * 1e3:.1f} ms, its optimizer step {r['optimizer_step_s'] * 1e3:.2f} ms; one "
            f"`unwrap_model` call {r['unwrap_model_s'] * 1e3:.2f} ms):",
            "",
            *table_header("piece", "ms per step", "share of GRPO's step"),
        ]
        for name, seconds in pieces.items():
            lines.append(f"| {name} | {seconds * 1e3:.2f} | {seconds / grpo_step:.2%} |")
        total = sum(pieces.values())
        lines += [f"| total | {total * 1e3:.2f} | {total / grpo_step:.2%} |", ""]
    prof = [r for r in rows if r.get("kind") == "profile"]
    if prof:
        clock_name = "GPU kernel time" if device == "cuda" else "CPU time"
        lines += [
            f"**Profile** ({prof[0]['shape']}, f = {prof[0]['f']:.3f}, torch.profiler {clock_name} as a share of the "
            "profiled steps' wall time; inclusive, so groups can overlap):",
            "",
            *table_header("arm", "step (wall, profiled)", *PROFILE_GROUPS, "top self-time operations"),
        ]
        for r in prof:
            top = ", ".join(f"{k} {v:.0%}" for k, v in r["top_self"][:4])
            lines.append(
                f"| {r['arm'].upper()} | {r['wall_s']:.3f} s | "
                + " | ".join(f"{r['groups'][g]:.0%}" for g in PROFILE_GROUPS)
                + f" | {top} |"
            )
        lines.append("")
    return "\n".join(lines)


def memory_tables(rows: list[dict], plan: Plan) -> tuple[str, dict]:
    lines, summary = [], {}

    def peak(r, phase):
        return (r.get("phases", {}).get(phase) or {}).get("peak_bytes")

    def step_peak(r):
        values = [peak(r, p) for p in PHASES if peak(r, p) is not None]
        return max(values) if values else None

    arms_rows = [r for r in rows if r.get("kind") == "arms"]
    if arms_rows and plan.memory_shape is not None:
        lines += [
            f"**Peak memory per arm** ({plan.memory_shape.name} shape), MiB above the memory in use when the phase "
            f"starts, prepare / forward+backward / optimizer+EMA, step {plan.memory_steps} of a fresh process:",
            "",
            *table_header("f", *(a.upper() for a in plan.arms), "SRPO/GRPO fwd+bwd"),
        ]
        for f in sorted({r["f"] for r in arms_rows}):
            cells, loss = [], {}
            for a in plan.arms:
                rs = [r for r in arms_rows if r["arm"] == a and r["f"] == f]
                if not rs or "phases" not in rs[0]:
                    cells.append(rs[0].get("skipped", "error") if rs else "n/a")
                    continue
                loss[a] = peak(rs[0], "forward_backward")
                cells.append(" / ".join(_mib(peak(rs[0], p)) for p in PHASES))
            ratio = loss["srpo"] / loss["grpo"] if loss.get("grpo") and loss.get("srpo") is not None else float("nan")
            lines.append(f"| {f:.3f} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        lines.append("")
    for kind, key, label in (("vocab", "vocab", "vocabulary"), ("length", "completion_len", "completion length")):
        sweep = [r for r in rows if r.get("kind") == kind]
        measured = [r for r in sweep if "phases" in r]
        if not measured:
            continue
        one = measured[0]
        lines += [
            f"**Peak memory as the {label} grows** ({one['batch']} rollouts, f = {one['f']:.2f}, "
            f"{'vocab ' + str(one['vocab']) if kind == 'length' else str(one['completion_len']) + '-token completions'}"
            f"): MiB above the memory in use when the phase starts, first step of a fresh process. `logits` is one "
            "`[batch, completion, vocab]` float32 tensor, for scale.",
            "",
            *table_header(
                label,
                *("GRPO fwd+bwd", "SRPO fwd+bwd", "SRPO/GRPO", "SDPO fwd+bwd", "SRPO prepare (teacher)"),
                *("step peak SRPO/GRPO", "logits"),
            ),
        ]
        for value in sorted({r[key] for r in sweep}):
            by_arm = {r["arm"]: r for r in sweep if r[key] == value}
            g, s, d = by_arm.get("grpo", {}), by_arm.get("srpo", {}), by_arm.get("sdpo", {})
            if "phases" not in g or "phases" not in s:
                continue
            ratio = peak(s, "forward_backward") / max(peak(g, "forward_backward") or 1, 1)
            summary.setdefault(kind, {})[value] = ratio
            sdpo_cell = _mib(peak(d, "forward_backward")) if "phases" in d else d.get("skipped", d.get("error", "n/a"))
            logits = s["batch"] * s["completion_len"] * s["vocab"] * 4
            lines.append(
                f"| {value} | {_mib(peak(g, 'forward_backward'))} | {_mib(peak(s, 'forward_backward'))} | {ratio:.2f} | "
                f"{sdpo_cell} | {_mib(peak(s, 'prepare'))} | {step_peak(s) / max(step_peak(g) or 1, 1):.2f} | "
                f"{_mib(logits)} |"
            )
        lines.append("")
    for r in rows:
        if "error" in r:
            lines.append(f"Memory run {r.get('kind')} {r['shape']} {r['arm']} failed: `{r['error']}`")
    return "\n".join(lines), summary


def targets_table(timing: list[dict], memory: dict) -> str:
    lines = table_header("target", "measured (median of per-repeat ratios; fastest steps in brackets)", "met")

    def yes(ok):
        return "yes" if ok else "**no**"

    for s in timing:
        per_f = s["per_f"]
        if 0.0 in per_f and per_f[0.0]["srpo_over_grpo"]:
            med = statistics.median(per_f[0.0]["srpo_over_grpo"])
            best = per_f[0.0]["best_ratio"]["grpo"]
            lines.append(
                f"| {s['shape']}: f = 0, SRPO/GRPO step time <= 1.02 | {med:.3f} ({best:.3f}) | {yes(med <= 1.02)} |"
            )
        near = min(per_f, key=lambda f: abs(f - 0.4)) if per_f else None
        if near is not None and per_f[near]["srpo_over_grpo"]:
            med = statistics.median(per_f[near]["srpo_over_grpo"])
            best = per_f[near]["best_ratio"]["grpo"]
            share = statistics.median(per_f[near]["teacher_forward_share"])
            over = statistics.median(per_f[near]["teacher_forward_over_grpo"] or [float("nan")])
            lines.append(
                f"| {s['shape']}: f = {near:.3f}, SRPO/GRPO <= 1 + teacher-forward share | {med:.3f} ({best:.3f}) vs "
                f"1 + {over:.3f} (teacher forward / GRPO step; {share:.3f} of SRPO's step) | {yes(med <= 1 + over)} |"
            )
            if per_f[near]["srpo_over_sdpo"]:
                med = statistics.median(per_f[near]["srpo_over_sdpo"])
                best = per_f[near]["best_ratio"]["sdpo"]
                lines.append(
                    f"| {s['shape']}: f = {near:.3f}, SRPO/SDPO <= 0.7 | {med:.3f} ({best:.3f}) | {yes(med <= 0.7)} |"
                )
        fit = s.get("teacher_fit")
        if fit:
            ok = fit["fwd_r2"] > 0.9 and fit["at_zero"] < 1e-3
            lines.append(
                f"| {s['shape']}: teacher time linear in f, zero at f = 0 | R² = {fit['fwd_r2']:.3f} (teacher forward), "
                f"{fit['r2']:.3f} (`_score_with_teacher`); {fit['at_zero'] * 1e3:.3f} ms logged at f = 0 | {yes(ok)} |"
            )
    vocab = memory.get("vocab", {})
    if vocab:
        top = max(vocab)
        lines.append(
            f"| loss-step peak memory at vocab {top}: SRPO <= 1.3 x GRPO | {vocab[top]:.2f} x | "
            f"{yes(vocab[top] <= 1.3)} |"
        )
    return "\n".join(lines)


def environment(device: str) -> str:
    import accelerate
    import datasets
    import transformers
    import trl

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    memory = ""
    with contextlib.suppress(OSError, AttributeError):
        total_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {total_kib / 2**20:.0f} GiB RAM"
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    load = f"; load average {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}{memory}{gpu}; {torch.get_num_threads()} torch thread(s){load}. Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"accelerate {accelerate.__version__}, datasets {datasets.__version__}."
    )


def plot(rows: list[dict], shapes: list[Shape], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in shapes if _ok(rows, kind="timing", shape=s.name)]
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5.2 * (len(shapes) + 1), 4.2), squeeze=False)
    axes = axes[0]
    unit = "CPU s" if device == "cpu" else "s"
    for ax, shape in zip(axes, shapes, strict=False):
        ok = _ok(rows, kind="timing", shape=shape.name)
        for arm, style in (("grpo", "o-"), ("srpo", "s-"), ("sdpo", "^-")):
            rs = [r for r in ok if r["arm"] == arm]
            if not rs:
                continue
            fs = sorted({r["f"] for r in rs})
            med = [statistics.median([r["step_s"] for r in rs if r["f"] == f]) for f in fs]
            lo = [min(r["step_s"] for r in rs if r["f"] == f) for f in fs]
            hi = [max(r["step_s"] for r in rs if r["f"] == f) for f in fs]
            ax.plot(fs, med, style, label=arm.upper())
            ax.fill_between(fs, lo, hi, alpha=0.2)
        ax.set_title(f"{shape.name} ({device}): step time vs f")
        ax.set_xlabel("f = fraction of routed rollouts")
        ax.set_ylabel(f"{unit} per step (median; band min-max)")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax = axes[-1]
    for shape in shapes:
        rs = _ok(rows, kind="timing", shape=shape.name, arm="srpo")
        grpo = _ok(rows, kind="timing", shape=shape.name, arm="grpo")
        if not rs or not grpo:
            continue
        fs = sorted({r["f"] for r in rs})
        unit_s = statistics.median(r["step_s"] for r in grpo)  # teacher time in GRPO steps: comparable across shapes
        block = [statistics.median([teacher_block_s(r) for r in rs if r["f"] == f]) / unit_s for f in fs]
        fwd = [statistics.median([teacher_forward_s(r) for r in rs if r["f"] == f]) / unit_s for f in fs]
        ax.plot(fs, block, "s-", label=f"{shape.name}: _score_with_teacher")
        ax.plot(fs, fwd, "x--", label=f"{shape.name}: teacher forward")
    ax.set_title("SRPO: teacher time vs f")
    ax.set_xlabel("f = fraction of routed rollouts")
    ax.set_ylabel("median time / GRPO's median step")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_block(results_md: Path, tag: str, text: str) -> None:
    """Replace the text between `<!-- results:{tag}:begin -->` and `<!-- results:{tag}:end -->` in RESULTS.md."""
    begin, end = f"<!-- results:{tag}:begin -->", f"<!-- results:{tag}:end -->"
    content = results_md.read_text() if results_md.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in content and end in content:
        content = content[: content.index(begin)] + block + content[content.index(end) + len(end) :]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(content)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="about two minutes: tiny model, 3 repeats, 2 sweep points"
    )
    parser.add_argument("--toy", action="store_true", help="seconds: what tests/test_benchmarks.py runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="override the mode's number of repeats")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", default=None, help="folder for the JSON and the PNG (default: benchmarks/)")
    parser.add_argument("--write-results", action="store_true", help="rewrite this device's block of RESULTS.md")
    parser.add_argument(
        "--malloc",
        default=None,
        choices=["cache", "default"],
        help="CPU timing allocator policy (default: cache, after a comparison of both; see set_malloc)",
    )
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        record = measure_memory(
            spec["arm"], Shape(**spec["shape"]), spec["f"], spec["device"], spec["steps"], spec["models"]
        )
        print(json.dumps(record))
        return record

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    mode = "toy" if args.toy else "quick" if args.quick else "full"
    plan = plan_for(mode, device)
    if args.repeats:
        plan.repeats = args.repeats
    if args.malloc:
        plan.malloc = args.malloc
    out = Path(args.out) if args.out else HERE
    out.mkdir(parents=True, exist_ok=True)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/step_cost.py", *given])
    started = time.perf_counter()

    timing_rows, memory_rows = [], []
    if not args.skip_timing:
        for shape in plan.timing_shapes:
            print(f"timing {shape.name} on {device} ...", flush=True)
            timing_rows += time_shape(shape, plan, device)
    if not args.skip_memory:
        print("memory ...", flush=True)
        memory_rows = memory_runs(plan, device)

    sections, summaries = [], []
    for shape in plan.timing_shapes if timing_rows else []:
        text, summary = timing_tables(timing_rows, shape, device)
        sections.append(text)
        summaries.append(summary)
    profile_text = profile_tables(timing_rows, device)
    memory_text, memory_summary = memory_tables(memory_rows, plan) if memory_rows else ("", {})
    elapsed = time.perf_counter() - started
    report = "\n\n".join(
        part
        for part in [
            f"Measured with `{command}` ({mode} mode, {elapsed / 60:.1f} min) on: {environment(device)}"
            + (f" CPU timing with glibc's `{plan.malloc}` allocator policy." if device == "cpu" else ""),
            *sections,
            profile_text,
            memory_text,
            "**Targets**\n\n" + targets_table(summaries, memory_summary),
        ]
        if part
    )
    (out / f"results-{device}-{mode}.json").write_text(
        json.dumps({"timing": timing_rows, "memory": memory_rows, "command": command}, indent=1, default=str)
    )
    if timing_rows:
        png = out / f"step_time_vs_f_{device}{'' if mode == 'full' else '_' + mode}.png"
        plot(timing_rows, plan.timing_shapes, png, device)
        report += f"\n\n![step time vs f]({png.name})"
    print("\n" + report)
    if args.write_results:
        write_block(HERE / "RESULTS.md", device, report)
    return {"timing": timing_rows, "memory": memory_rows, "report": report}


if __name__ == "__main__":
    main()

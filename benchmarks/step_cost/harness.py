"""The step-cost benchmark's harness: shapes, arms, clocks, probes, and the runs that fill the records.

`__main__.py` (the command line) runs it and `report.py` turns its records into RESULTS.md's tables.

Every arm is the real trainer (`trl.GRPOTrainer`, `SRPOTrainer`, TRL's `SDPOTrainer`) on the *same* batch: a fixed
set of completions is replayed in place of generation, so every arm trains identical token ids and generation, which
costs every arm the same, is left out. A reward that depends only on a rollout's position in its group sets the
routing: the last `k_g` rollouts of group `g` fail, the rest are correct (`failures_per_group`).

On CPU, TRL 1.16's fused LM head projects every position of the batch (prompt positions included) where a Triton
device projects only the labelled ones. Every arm here runs the Triton devices' choice
(`srpo_trl.compat.compact_fused_head_on_cpu`), so that the CPU arms compare as GPU arms would; only that choice is
changed, TRL's torch code still computes the head.

What a step spends where is read from the trainers' named spans, TRL's `profiling_context(trainer, name)`: GRPOTrainer's
own (`_prepare_inputs`, `_calculate_rewards`, `compute_loss`, ...) and SRPOTrainer's (`teacher_prompts`,
`teacher_prefix`, `teacher_continuation`, `teacher_whole_sequence`, `teacher_statistics`, `distillation`), timed on
the benchmark's clock (`recorded_spans`). No trainer method is wrapped, so the figures survive refactors of the
trainer that keep its spans.

Records (plain dicts, `kind` says which):
- `timing`: one optimizer step of one arm at one routed fraction `f`, with its phases (prepare / forward+backward /
  optimizer+EMA) and the seconds of each named span (`Timers`);
- `prefix`: SRPO's teacher scoring of one batch with `k` routed rollouts per group, each group's teacher prompt
  computed once (`shared`) or once per routed rollout (`per_row`, `srpo_trl.teacher_scoring.unique_prefixes`
  patched);
- `profile`: torch-profiler totals per arm; `memory` (`vocab`/`length` sweeps): peak memory per phase, one
  configuration per fresh process.
"""

import contextlib
import ctypes
import gc
import json
import os
import re
import shutil
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

from srpo_trl.compat import compact_fused_head_on_cpu  # noqa: E402

transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]  # the repository: the memory workers run `python -m benchmarks.step_cost`

ARMS = ("grpo", "srpo", "sdpo")
PHASES = ("prepare", "forward_backward", "optimizer")
SHARING = ("shared", "per_row")


# ---- settings ----


@dataclass(frozen=True)
class Shape:
    """Model and batch of one configuration."""

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
    prefix_rows: list[int] = field(default_factory=lambda: list(range(1, 8)))  # routed rollouts per group
    vocab_sweep: list[Shape] = field(default_factory=list)
    length_sweep: list[Shape] = field(default_factory=list)
    sweep_fraction: float = 0.5
    arms: tuple[str, ...] = ARMS
    profile: bool = True  # torch-profiler breakdown on the first timing shape
    in_process_memory: bool = False  # toy runs: the memory code path without the subprocess
    malloc: str = "cache"  # CPU: glibc policy for the timing process (see `set_malloc`)


# Tiny: the test models' size with a 4k vocabulary; small: a backbone/LM-head balance closer to real models.
TINY = Shape("tiny", vocab=4096, hidden=64, layers=2, heads=4, kv_heads=2, num_prompts=5, completion_len=96)
SMALL = Shape("small", vocab=8192, hidden=256, layers=4, heads=8, kv_heads=4, num_prompts=1, completion_len=192)
# Memory sweeps: a tiny backbone, so that the LM head (the part that grows with the vocabulary) dominates.
SWEEP = Shape("sweep", vocab=151936, num_prompts=1, group=4, completion_len=256)
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
    prompt_chars=200,
    completion_len=1024,
)
TOY = Shape(
    "toy", vocab=512, hidden=32, layers=1, heads=2, kv_heads=1, num_prompts=1, group=4, prompt_chars=4,
    completion_len=8, topk=8,
)  # fmt: skip


def plan_for(mode: str, device: str) -> Plan:
    if (
        mode == "toy"
    ):  # tests/end_to_end/test_benchmarks.py: seconds, every code path, in-process (leave the allocator alone)
        return Plan(
            [TOY],
            [0.0, 0.5],
            1,
            prefix_rows=[1, 2],
            vocab_sweep=[replace(TOY, name="toy-v1024", vocab=1024)],
            length_sweep=[replace(TOY, name="toy-L16", completion_len=16)],
            in_process_memory=True,
            malloc="default",
        )
    if device == "cuda":
        big, full = QWEN3_0_6B, mode == "full"
        return Plan(
            [big],
            [0.0, 0.25, 0.4, 0.5, 1.0] if full else [0.0, 0.4, 1.0],
            5 if full else 3,
            prefix_rows=list(range(1, 8)) if full else [1, 4, 7],
            vocab_sweep=[
                replace(big, name=f"v{v}", vocab=v, num_prompts=1, group=4, completion_len=2048)
                for v in ((32768, 65536, 151936) if full else (32768, 151936))
            ],
            length_sweep=[
                replace(big, name=f"L{n}", num_prompts=1, group=2, completion_len=n)
                for n in ((1024, 4096, 8192) if full else (1024, 4096))
            ],
        )
    if mode == "quick":
        return Plan(
            [TINY],
            [0.0, 0.4, 1.0],
            3,
            prefix_rows=[1, 4, 7],
            vocab_sweep=[replace(SWEEP, name=f"v{v}", vocab=v) for v in (32768, 151936)],
            profile=False,
        )
    return Plan(
        [TINY, SMALL],
        [0.0, 0.25, 0.4, 0.5, 1.0],
        5,
        vocab_sweep=[replace(SWEEP, name=f"v{v}", vocab=v) for v in (32768, 65536, 151936)],
        length_sweep=[
            replace(SWEEP, name=f"L{n}", vocab=32768, group=2, completion_len=n) for n in (1024, 4096, 8192)
        ],
    )


# ---- routing control, replayed rollouts, model ----


def failures_per_group(f: float, num_prompts: int, group: int) -> list[int]:
    """Failed rollouts per group for a routed fraction close to `f` (each group keeps one correct rollout, so every
    failed rollout has a correct sibling and is routed: the largest `f` is `(G - 1) / G`)."""
    total = min(round(f * num_prompts * group), num_prompts * (group - 1))
    base, extra = divmod(total, num_prompts)
    return [base + (g < extra) for g in range(num_prompts)]


def routed_fraction(failures: list[int], group: int) -> float:
    return sum(failures) / (len(failures) * group)


class PositionalReward:
    """Reward 0 for the last `failures[g]` rollouts of group `g`, 1 for the others (GRPOTrainer and SDPOTrainer score
    a generation batch in sampler order, a prompt's rollouts contiguous)."""

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
    """`batch` completions of exactly `completion_len` tokens: random letters, digits and spaces, then EOS. Only ids
    the character tokenizer round-trips, so that a demonstration (a correct sibling, method §3) re-encodes to the same
    length: the teacher prompt holds a demonstration as long as the completion it scores."""
    alphabet = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789 "]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(alphabet), (shape.batch, shape.completion_len - 1), generator=generator)
    return [[alphabet[i] for i in row] + [tokenizer.eos_token_id] for row in picks.tolist()]


def prompt_text(shape: Shape) -> str:
    return ("Spell " + "xyzw" * shape.prompt_chars)[: max(shape.prompt_chars, 1)]


def cached_model(shape: Shape, tokenizer, folder: str, device: str) -> str:
    """A randomly initialised Qwen3 of `shape`, saved once under `folder` for every arm (and teacher) to load."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "tie_embeddings")
    path = os.path.join(folder, "-".join(str(getattr(shape, name)) for name in fields))
    if os.path.exists(os.path.join(path, "config.json")):
        return path
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
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    return path


def sdpo_logits_bytes(shape: Shape, device: str) -> int:
    """One `[batch, completion + 1, vocab]` logits tensor: TRL's SDPO holds several (student and teacher)."""
    return shape.batch * (shape.completion_len + 1) * shape.vocab * (2 if device == "cuda" else 4)


def sdpo_skip_reason(shape: Shape, device: str) -> str | None:
    """SDPO is skipped where one such tensor exceeds 1 GiB on CPU (an out-of-memory kill on a shared machine would hit
    someone else's process) or a quarter of the GPU."""
    limit = torch.cuda.get_device_properties(0).total_memory // 4 if device == "cuda" else 2**30
    size = sdpo_logits_bytes(shape, device)
    return None if size <= limit else f"skipped: [batch, length, vocab] logits of {size / 2**30:.1f} GiB"


# ---- clocks and probes ----


def clock(device: str) -> float:
    """Seconds. CPU: this process's CPU time (one torch thread; CPU autograd runs on the calling thread), which other
    processes competing for the cores move much less than the wall clock. GPU: the wall clock, synchronised."""
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def set_malloc(policy: str) -> bool:
    """glibc's policy for large blocks. `"cache"`: never `mmap` them and never trim the heap, so that freed memory is
    reused rather than returned to the kernel and faulted in (zeroed) again on the next allocation, as PyTorch's
    CUDA caching allocator does; under glibc's default every block of 32 MiB or more is `mmap`ed and an LM-head
    pass's temporaries cost more kernel time than arithmetic (steps 1.7-2.5x slower: RESULTS.md at commit 2b9f78e).
    Returns whether the policy could be set (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    if policy == "cache":
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    return bool(libc.mallopt(m_mmap_max, 65536)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def _proc_status_bytes(name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{name}:\s+(\d+)", status.read()).group(1)) * 1024


class Probe:
    """Time (`clock`) and, with `memory`, peak memory of named phases.

    GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the allocation at the start.
    CPU: torch's CPU tensors are plain `malloc`s, so the probe reads the process's resident-set high-water mark
    (`VmHWM`), reset at the start of each phase (`5` into `/proc/self/clear_refs`, Linux >= 4.0, after
    `malloc_trim`), minus the resident set at the start. It counts every byte the process touches: each memory
    configuration runs in a fresh process whose glibc returns freed blocks of 1 MiB and more at once.
    """

    def __init__(self, device: str, memory: bool = False):
        self.device, self.memory, self.started, self.records = device, memory, {}, {}
        self._libc = ctypes.CDLL("libc.so.6") if memory and device == "cpu" else None

    def begin(self, name: str):
        base = None
        if self.memory and self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif self.memory:
            self._libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            base = _proc_status_bytes("VmRSS")
        self.started[name] = (clock(self.device), base)

    def end(self, name: str):
        if name not in self.started:
            return
        start, base = self.started.pop(name)
        seconds, peak = clock(self.device) - start, None
        if base is not None:
            top = torch.cuda.max_memory_allocated() if self.device == "cuda" else _proc_status_bytes("VmHWM")
            peak = max(top - base, 0)
        self.records[name] = {"s": seconds, "peak_bytes": peak, "start_bytes": base}


class Timers:
    """Cumulative seconds (`clock`) of the named spans of a step, and the spans open now."""

    def __init__(self, device: str):
        self.device, self.seconds, self.open = device, {}, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = clock(self.device)
        self.open.append(name)
        try:
            yield
        finally:
            self.open.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + clock(self.device) - start


# ---- the three trainers, generation replayed, phases probed ----


class _BenchMixin:
    """Replays the fixed completions and probes prepare / forward+backward / optimizer+EMA."""

    def _prepare_inputs(self, generation_batch):
        self.bench_generation_batch = generation_batch  # for `prefix_sweep`
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

    def _replayed(self, rows: int) -> list[list[int]]:
        if rows > len(self.bench_completions):
            raise ValueError(f"{rows} rows but only {len(self.bench_completions)} replayed completions")
        return [list(c) for c in self.bench_completions[:rows]]


class _ReplayedRollouts(_BenchMixin):
    """GRPOTrainer's generation (and so SRPOTrainer's) replaced by the fixed completions."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return self._replayed(len(prompt_ids)), None


def trainer_classes():
    from trl import GRPOTrainer
    from trl.experimental.sdpo import SDPOTrainer

    from srpo_trl import SRPOTrainer

    class BenchGRPO(_ReplayedRollouts, GRPOTrainer):
        pass

    class BenchSRPO(_ReplayedRollouts, SRPOTrainer):
        pass

    class BenchSDPO(_BenchMixin, SDPOTrainer):
        def _generate_transformers(self, prompt_ids):
            return prompt_ids, self._replayed(len(prompt_ids))

    return {"grpo": BenchGRPO, "srpo": BenchSRPO, "sdpo": BenchSDPO}


TEACHER_FORWARD = ("teacher_prefix", "teacher_continuation", "teacher_statistics")  # SRPOTrainer's spans


@contextlib.contextmanager
def patched(owner, name: str, replacement):
    """`owner.name` replaced by `replacement(original)` for the duration (a module's function, a class's method)."""
    original, own = getattr(owner, name), name in vars(owner)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original) if own else delattr(owner, name)


def span_name(context) -> str:
    """A span's name as the trainer opened it: `profiling_context` prefixes the trainer's class
    (`BenchSRPO.teacher_prefix`)."""
    return context.name.split(".", 1)[-1]


@contextlib.contextmanager
def recorded_spans(timers: Timers):
    """Every span a trainer opens (`trl.extras.profiling.ProfilingContext`, what `profiling_context` returns) also
    timed into `timers` under its name, on the benchmark's clock: CPU time on CPU, like the phases (TRL's own timing,
    on the wall clock, runs as before). Among them `student_topk`, the student's top-k support selection within the
    `distillation` span (method §5), work GRPO's loss does not have and SDPO's does."""
    from trl.extras.profiling import ProfilingContext

    def enter(original):
        def timed_enter(context):
            entered = original(context)
            context.bench_span = timers(span_name(context))
            context.bench_span.__enter__()
            return entered

        return timed_enter

    def exit_(original):
        def timed_exit(context, *exception):
            context.bench_span.__exit__(*exception)
            return original(context, *exception)

        return timed_exit

    with patched(ProfilingContext, "__enter__", enter), patched(ProfilingContext, "__exit__", exit_):
        yield


def one_prefix_per_row():
    """SRPOTrainer without prefix sharing: every routed rollout's teacher prompt computed on its own."""
    from srpo_trl import teacher_scoring

    return patched(
        teacher_scoring,
        "unique_prefixes",
        lambda _: lambda prompts: ([list(p) for p in prompts], list(range(len(prompts)))),
    )


class _StepEnd(TrainerCallback):
    """Closes the optimizer phase at `on_step_end`, after the optimizer step and the teachers' EMA callbacks."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.bench_probe.end("optimizer")


def build_trainer(
    arm: str, shape: Shape, model_dir: str, tokenizer, reward, completions, device: str, work: str, model=None,
    **overrides,
):  # fmt: skip
    """The arm's trainer with the settings every arm shares: SRPO's paper defaults where GRPOConfig's differ (method
    §10), one optimizer step per generation batch. `model` (a built model) replaces loading `model_dir`; `overrides`
    replace or add config fields (benchmarks/memory_probe.py: gradient checkpointing, routing)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig
    from trl.experimental.sdpo import SDPOConfig

    from srpo_trl import SRPOConfig

    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
    settings = dict(
        output_dir=os.path.join(work, arm),
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        per_device_train_batch_size=shape.batch,
        num_generations=shape.group,
        max_completion_length=shape.completion_len,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        disable_tqdm=True,
        chat_template_kwargs={"enable_thinking": False},
        scale_rewards="none",
        epsilon_high=0.28,
        loss_type="dapo",
        beta=0.0,
    )
    settings.update(overrides)
    if arm == "grpo":
        args = GRPOConfig(**settings)
    elif arm == "srpo":
        args = SRPOConfig(**settings, distillation_topk=shape.topk)
    else:  # the paper's SDPO arm on TRL's trainer: top-k JSD with a tail bucket, IS clip 2, EMA teacher at 0.05
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
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32
        )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": prompt_text(shape)}]] * shape.num_prompts})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_classes()[arm](
            model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
        )
    trainer.remove_callback(PrinterCallback)  # logs are read from `trainer.state.log_history`
    trainer.bench_completions = completions
    trainer.bench_probe = Probe(device)
    trainer.bench_timers = Timers(device)
    trainer.add_callback(_StepEnd(trainer))
    return trainer


def run_step(trainer, reward: PositionalReward, failures: list[int], steps: int = 1) -> dict:
    """`steps` calls of `trainer.train()` (one optimizer step each) on the replayed batch; the last one's record."""
    reward.failures = failures
    for _ in range(steps):
        trainer.bench_probe.records, trainer.bench_timers.seconds = {}, {}
        with warnings.catch_warnings(), compact_fused_head_on_cpu(), recorded_spans(trainer.bench_timers):
            warnings.simplefilter("ignore")
            trainer.train()
    phases = trainer.bench_probe.records
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    return {
        "step_s": sum(phases[p]["s"] for p in PHASES if p in phases),
        "phases": {k: dict(v) for k, v in phases.items()},
        "timers": dict(trainer.bench_timers.seconds),
        "teacher_s": logs.get("srpo/time/teacher_s"),
        "sdpo_frac": logs.get("srpo/route/sdpo_frac"),
        "sdpo_reprompt_frac": logs.get("self_distillation/reprompt_sample_fraction"),
        "loss": logs.get("loss", logs.get("train_loss")),
    }


# ---- timing: every arm in one process, interleaved ----


def time_shape(shape: Shape, plan: Plan, device: str, log=print) -> list[dict]:
    """Warm-up step per arm, then `plan.repeats` rounds over the fractions (order rotated each round) and, within a
    fraction, over the arms (rotated too): the arms of one round run back to back, so that per-round ratios share
    the machine's state. Then the teacher-prefix sweep and the profile on the same trainers."""
    tokenizer = char_tokenizer()
    completions = replay_completions(tokenizer, shape)
    work = tempfile.mkdtemp(prefix=f"srpo-bench-{shape.name}-")
    rows, trainers = [], {}
    try:
        model_dir = cached_model(shape, tokenizer, work, device)
        reward = PositionalReward(shape.group)
        for arm in plan.arms:
            skip = sdpo_skip_reason(shape, device) if arm == "sdpo" else None
            try:
                if skip is None:
                    trainer = build_trainer(arm, shape, model_dir, tokenizer, reward, completions, device, work)
                    run_step(trainer, reward, failures_per_group(0.5, shape.num_prompts, shape.group))  # warm-up
                    trainers[arm] = trainer
            except Exception as error:  # noqa: BLE001 - reported as the reason the arm is missing
                skip = f"{type(error).__name__}: {str(error)[:300]}"
            if skip:
                rows.append({"kind": "timing", "shape": shape.name, "arm": arm, "error": skip})
                log(f"  [{shape.name}] {arm} not measured: {skip}")
        gc.collect()
        gc.freeze()  # the trainers are long-lived: keep them out of the collector's scans inside timed steps
        for repeat in range(plan.repeats):
            shift = repeat % len(plan.fractions)
            for f in plan.fractions[shift:] + plan.fractions[:shift]:
                failures = failures_per_group(f, shape.num_prompts, shape.group)
                arms = list(trainers)[repeat % len(trainers) :] + list(trainers)[: repeat % len(trainers)]
                for arm in arms:
                    record = run_step(trainers[arm], reward, failures)
                    f_used = routed_fraction(failures, shape.group)
                    rows.append({"kind": "timing", "shape": shape.name, "arm": arm, "repeat": repeat, "f": f_used})
                    rows[-1].update(record)
                log(
                    f"  [{shape.name}] repeat {repeat} f={rows[-1]['f']:.3f} "
                    + " ".join(f"{r['arm']}={r['step_s']:.3f}s" for r in rows[-len(arms) :])
                )
        if "srpo" in trainers:
            rows += prefix_sweep(trainers["srpo"], shape, plan, reward, log)
        if plan.profile and shape is plan.timing_shapes[0]:
            rows += profile_arms(trainers, shape, reward, device, log)
    finally:
        gc.unfreeze()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def prefix_sweep(trainer, shape: Shape, plan: Plan, reward: PositionalReward, log=print) -> list[dict]:
    """SRPO's teacher scoring of the replayed batch (prepare alone: generation replayed, rewards, routing, teacher)
    with `k` routed rollouts in every group, sharing each group's teacher prompt or not, interleaved."""
    rows = []
    for repeat in range(plan.repeats):
        for k in plan.prefix_rows:
            if k >= shape.group:
                continue
            reward.failures = [k] * shape.num_prompts
            order = SHARING if (repeat + k) % 2 == 0 else SHARING[::-1]
            normalizers = {}
            for sharing in order:
                trainer.bench_timers.seconds = {}
                trainer.model.train()
                with one_prefix_per_row() if sharing == "per_row" else contextlib.nullcontext():
                    with recorded_spans(trainer.bench_timers), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        trainer._generate_and_score_completions(trainer.bench_generation_batch)
                normalizers[sharing] = trainer.teacher_states["train"].log_normalizer
                timers = dict(trainer.bench_timers.seconds)
                rows.append(
                    {"kind": "prefix", "shape": shape.name, "repeat": repeat, "k": k, "sharing": sharing,
                     "timers": timers}
                )  # fmt: skip
            difference = (normalizers["shared"] - normalizers["per_row"]).abs().max().item()
            for row in rows[-2:]:
                row["log_normalizer_max_diff"] = difference
            log(
                f"  [{shape.name}] prefix repeat {repeat} k={k} "
                + " ".join(
                    f"{r['sharing']}={sum(r['timers'].get(n, 0) for n in TEACHER_FORWARD):.3f}s" for r in rows[-2:]
                )
                + f" (max |log Z| difference {difference:.1e})"
            )
    trainer.teacher_states["train"] = None
    return rows


PROFILE_GROUPS = {
    "TRL fused LM head (GRPO rows)": ("ChunkedLogProbFunction", "ChunkedLogProbFunctionBackward"),
    "SRPO student head (distilled rows)": ("_TopKLogProbs", "_TopKLogProbsBackward"),
    "top-k": ("aten::topk",),
    # SDPA's kernels, forward and backward (not `aten::scaled_dot_product_attention`, which contains the forward's):
    # FlashAttention takes no explicit mask, so a pass that needs one (a continuation of cached keys and values)
    # shows up under the other kernels on GPU.
    "attention, flash kernel": tuple(
        f"aten::_scaled_dot_product_flash_attention{suffix}"
        for suffix in ("", "_backward", "_for_cpu", "_for_cpu_backward")
    ),
    "attention, other kernels": tuple(
        f"aten::_scaled_dot_product_{kernel}_attention{suffix}"
        for kernel in ("efficient", "cudnn", "fused")
        for suffix in ("", "_backward")
    )
    + ("aten::_scaled_dot_product_attention_math",),
}


def profile_arms(trainers: dict, shape: Shape, reward, device: str, log=print, f: float = 0.4, steps: int = 2):
    """torch-profiler totals of a few operations per arm, as shares of the profiled steps' wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    failures = failures_per_group(f, shape.num_prompts, shape.group)
    rows = []
    for arm, trainer in trainers.items():
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            for _ in range(steps):
                run_step(trainer, reward, failures)
            wall = time.perf_counter() - started
        events = prof.key_averages()
        total = {}
        for event in events:
            total[event.key] = total.get(event.key, 0.0) + (
                event.device_time_total if device == "cuda" else event.cpu_time_total
            )
        groups = {name: sum(total.get(k, 0.0) for k in keys) / 1e6 / wall for name, keys in PROFILE_GROUPS.items()}
        self_time = [
            (e.key, (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total)) for e in events
        ]
        top = [(key, t / 1e6 / wall) for key, t in sorted(self_time, key=lambda item: -item[1])[:4]]
        f_used = routed_fraction(failures, shape.group)
        rows.append(
            {"kind": "profile", "shape": shape.name, "arm": arm, "f": f_used, "groups": groups, "top_self": top,
             "wall_s": wall / steps}
        )  # fmt: skip
        log(f"  [{shape.name}] profile {arm}: " + ", ".join(f"{k} {v:.0%}" for k, v in groups.items() if v))
    return rows


# ---- memory: one configuration per fresh process ----


def measure_memory(arm: str, shape: Shape, f: float, device: str, models: str) -> dict:
    """Peak memory of each phase of one step of one arm (meant for a fresh process)."""
    tokenizer = char_tokenizer()
    work = tempfile.mkdtemp(prefix=f"srpo-mem-{arm}-")
    try:
        model_dir = cached_model(shape, tokenizer, models, device)
        reward = PositionalReward(shape.group)
        completions = replay_completions(tokenizer, shape)
        trainer = build_trainer(arm, shape, model_dir, tokenizer, reward, completions, device, work)
        trainer.bench_probe = Probe(device, memory=True)
        failures = failures_per_group(f, shape.num_prompts, shape.group)
        return {"arm": arm, "f": routed_fraction(failures, shape.group), **run_step(trainer, reward, failures)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory_runs(plan: Plan, device: str, log=print) -> list[dict]:
    jobs = [("vocab", shape) for shape in plan.vocab_sweep] + [("length", shape) for shape in plan.length_sweep]
    rows = []
    models = tempfile.mkdtemp(prefix="srpo-mem-models-")  # each model saved once, loaded by every process using it
    try:
        for kind, shape in jobs:
            for arm in plan.arms:
                record = {"kind": kind, "shape": shape.name, "arm": arm, "f": plan.sweep_fraction}
                record.update(vocab=shape.vocab, completion_len=shape.completion_len, batch=shape.batch)
                skip = sdpo_skip_reason(shape, device) if arm == "sdpo" else None
                if skip:
                    record["skipped"] = skip
                elif plan.in_process_memory:
                    record.update(measure_memory(arm, shape, plan.sweep_fraction, device, models))
                else:
                    record.update(_memory_subprocess(arm, shape, plan.sweep_fraction, device, models))
                rows.append(record)
                if "phases" in record:
                    peaks = " ".join(
                        f"{p}={(v['peak_bytes'] or 0) / 2**20:.0f}MiB" for p, v in record["phases"].items()
                    )
                    log(f"  [memory {kind} {shape.name}] {arm}: {peaks}")
                else:
                    log(f"  [memory {kind} {shape.name}] {arm}: {record.get('error') or record.get('skipped')}")
    finally:
        shutil.rmtree(models, ignore_errors=True)
    return rows


def _memory_subprocess(arm: str, shape: Shape, f: float, device: str, models: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_TRIM_THRESHOLD_=str(2**20))
    spec = json.dumps({"arm": arm, "shape": asdict(shape), "f": f, "device": device, "models": models})
    command = [sys.executable, "-m", "benchmarks.step_cost", "--memory-worker", spec]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-2:]
        return {"error": f"exit {result.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def memory_worker(spec: str) -> dict:
    spec = json.loads(spec)
    return measure_memory(spec["arm"], Shape(**spec["shape"]), spec["f"], spec["device"], spec["models"])

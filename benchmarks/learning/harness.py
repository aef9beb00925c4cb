"""The learning benchmark's harness: arms, one run with its clock and probes, and many runs (cached).

An arm is a method (one `SRPOTrainer` `routing` mode, and how many optimizer steps it takes per generation batch) at
one learning rate. A run trains one arm with one seed on one testbed task family (`srpo_trl.testbed.TASK_FAMILIES`),
from that family's pre-trained model, and records:

- the held-out avg@k curve, every `eval_every` RL steps, each evaluation sampled from the same seeded RNG state, so
  that the arms of a seed are compared on the same problems and the same evaluation samples;
- the CPU seconds of training at each evaluation (this process, one torch thread, evaluation and probes excluded:
  on a shared machine wall-clock time mostly measures the other jobs);
- every `probe_every` RL steps, `gradient_probe` of the step's generation batch: each branch's gradient norm and
  what the teacher says about the routed tokens (too costly to log on every step of a real run);
- the trainer's log history (its `srpo/*` metrics), and `measure_testbed_abilities` of the final policy and teacher.
"""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    routing: str
    dynamic_weighting: bool = True
    steps_per_generation: int = 1  # optimizer steps per generation batch
    config: tuple = ()  # other `SRPOConfig` fields, as (name, value) pairs


METHODS = {
    "grpo": Method("GRPO", "grpo"),
    "sdpo": Method("SDPO", "sdpo", dynamic_weighting=False),
    "srpo": Method("SRPO", "srpo"),
    # The paper's GRPO baseline: a quarter of the generation batch per optimizer step (four steps per batch).
    "grpo_4steps": Method("GRPO, 4 optimizer steps per batch", "grpo", steps_per_generation=4),
    "srpo_no_dw": Method("SRPO w/o dynamic weighting", "srpo", dynamic_weighting=False),
    "advantage_mix": Method("advantage mix", "advantage_mix"),
    # The paper's knob on the teacher: a slower EMA keeps more of the pre-trained model's reading of a solution.
    "srpo_slow_teacher": Method("SRPO, teacher_update_rate 0.01", "srpo", config=(("teacher_update_rate", 0.01),)),
    # Beyond the paper: other teachers (`SRPOConfig.teacher_model_kind`): the initial model frozen, the current
    # student itself, and a trust region between the two at the default share 0.05 of the student.
    "srpo_base_teacher": Method("SRPO, frozen initial teacher", "srpo", config=(("teacher_model_kind", "base"),)),
    "srpo_live_teacher": Method("SRPO, live teacher", "srpo", config=(("teacher_model_kind", "live"),)),
    "srpo_trust_region": Method(
        "SRPO, trust-region teacher", "srpo", config=(("teacher_model_kind", "trust_region"),)
    ),
    # Beyond the paper: routed rollouts also keep their GRPO advantage (`SRPOConfig.routed_grpo_weight`).
    "srpo_routed_grpo": Method(
        "SRPO, routed rows keep GRPO's advantage", "srpo", config=(("routed_grpo_weight", 1.0),)
    ),
    # Beyond the paper: a routed rollout is distilled only where the teacher follows the shown solution
    # (`SRPOConfig.min_teacher_solution_prob`), GRPO otherwise.
    "srpo_gated": Method("SRPO, reliability gate 0.5", "srpo", config=(("min_teacher_solution_prob", 0.5),)),
}


@dataclasses.dataclass
class Settings:
    """Everything a run depends on besides its arm and seed (recorded in each run's json)."""

    task: str = "addition"  # a key of srpo_trl.testbed.TASK_FAMILIES
    steps: int = 100  # RL steps = generation batches
    prompts: int = 8  # prompts per generation batch
    num_generations: int = 8  # rollouts per prompt
    warmup_steps: int = 5  # RL steps of linear warm-up (then constant)
    eval_every: int = 10  # RL steps between held-out evaluations (they cost more CPU than training)
    eval_k: int = 4
    eval_temperature: float = 0.6  # the paper's evaluation sampling (method §10)
    eval_top_p: float = 0.95
    num_train: int = 1500
    num_test: int = 400
    max_completion_length: int = 24
    distillation_topk: int = 16
    probe_every: int = 10  # RL steps between gradient probes (0: none)
    ability_problems: int = 100  # test problems `measure_testbed_abilities` probes the final policy and teacher on
    testbed: dict = dataclasses.field(default_factory=dict)  # PretrainConfig overrides ({}: the family's default)


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:.0e}-seed{seed}"


# ---------------------------------------------------------------------------------------------------- one run


class CpuClock:
    """This process's CPU seconds since `start()`, less those spent under `paused()` (evaluation, probes)."""

    def __init__(self):
        self.start()

    def start(self):
        self._origin, self._paused = time.process_time(), 0.0

    @contextmanager
    def paused(self):
        since = time.process_time()
        try:
            yield
        finally:
            self._paused += time.process_time() - since

    def read(self) -> float:
        return time.process_time() - self._origin - self._paused


def arm_config(benchmark: str, method: str, lr: float, seed: int, settings, spg: int = 1, **fields):
    """The `SRPOConfig` of one run of a benchmark (this one, or the real model's): `method`'s routing and settings at
    `lr` and `seed`, with what every arm shares (CPU, fp32, sampling at temperature 1, a constant rate after warm-up,
    gradient clipping, a log row per step, nothing saved or reported) and the benchmark's own `fields`. `spg`
    optimizer steps per generation batch: the batch, warm-up and step counts are in generation batches."""
    from srpo_trl import SRPOConfig

    spec = METHODS[method]
    return SRPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / f"srpo-{benchmark}-{method}-{seed}-{os.getpid()}"),
        routing=spec.routing,
        dynamic_weighting=spec.dynamic_weighting,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps * spg,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=settings.prompts * settings.num_generations // spg,
        steps_per_generation=spg,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=1.0,
        distillation_topk=settings.distillation_topk,
        max_steps=settings.steps * spg,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=seed,
        **dict(spec.config),
        **fields,
    )


def run_one(method: str, lr: float, seed: int, settings: Settings, path: Path) -> dict:
    """Train one arm with one seed on `settings.task`; save and return the record."""
    import torch

    torch.set_num_threads(1)
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as transformers_logging

    from srpo_trl import SRPOTrainer
    from srpo_trl.evaluation import avg_at_k
    from srpo_trl.testbed import make_testbed_dataset, measure_testbed_abilities, reward

    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    spec = METHODS[method]
    model, tokenizer = load_testbed(settings)
    # The test split is the same for every seed and arm; the seed picks and orders the RL train problems.
    test = make_testbed_dataset(num_train=0, num_test=settings.num_test, seed=0, task=settings.task)["test"]
    train = make_testbed_dataset(num_train=settings.num_train, num_test=0, seed=seed, task=settings.task)["train"]
    spg = spec.steps_per_generation
    config = arm_config(
        "learning", method, lr, seed, settings, spg,
        weight_decay=0.01, gradient_checkpointing=False, chat_template_kwargs={"enable_thinking": False},
    )  # fmt: skip
    trainer = SRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=train, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)
    clock = CpuClock()

    def evaluate() -> float:
        # Every evaluation of a seed samples from the same RNG state (common random numbers across arms), and
        # evaluating does not shift the training RNG stream.
        with torch.random.fork_rng(devices=[]), clock.paused():
            torch.manual_seed(10_000 + seed)
            return avg_at_k(trainer.model, tokenizer, test, [reward], k=settings.eval_k,
                            temperature=settings.eval_temperature, top_p=settings.eval_top_p,
                            max_new_tokens=settings.max_completion_length, batch_size=100,
                            chat_template_kwargs=config.chat_template_kwargs, show_progress=False)  # fmt: skip

    curve = [{"step": 0, "cpu_seconds": 0.0, "accuracy": evaluate()}]

    class Evaluation(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % (settings.eval_every * spg) == 0:
                seconds = clock.read()
                curve.append({"step": state.global_step // spg, "cpu_seconds": seconds, "accuracy": evaluate()})

    trainer.add_callback(Evaluation())
    probes = []
    if settings.probe_every and spg == 1:  # a probe's gradient is one optimizer step's
        score = trainer._generate_and_score_completions

        def score_and_probe(inputs):
            batch = score(inputs)
            step = trainer.state.global_step + 1
            if trainer.model.training and (step == 1 or step % settings.probe_every == 0):
                with clock.paused():
                    probes.append({"step": step, **gradient_probe(trainer, batch)})
            return batch

        trainer._generate_and_score_completions = score_and_probe
    trainer.train()
    # What training did to the two abilities: the policy's own, and (arms with a teacher) the EMA teacher's, whose
    # reading of a correct solution is the distillation signal.
    probe_set = make_testbed_dataset(num_train=0, num_test=settings.ability_problems, seed=0, task=settings.task)
    probe_set = probe_set["test"]
    abilities = {"policy": measure_testbed_abilities(trainer.model, tokenizer, probe_set)}
    if trainer.teacher is not None:
        with trainer.teacher.active() as teacher_model:
            abilities["teacher"] = measure_testbed_abilities(teacher_model, tokenizer, probe_set)
    record = {
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "testbed": testbed_identity(settings),
        "code": code_identity(),
        "settings": dataclasses.asdict(settings),
        "steps_per_generation": spg,
        "curve": curve,
        "probes": probes,
        "final_abilities": abilities,
        "wall_seconds": time.monotonic() - started,
        "log_history": trainer.state.log_history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, default=_json_default))
    return record


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# ---------------------------------------------------------------------------------------------------- the probe


def gradient_probe(trainer, batch: dict) -> dict:
    """
    Each branch's part of the gradient of one scored generation batch, at the parameters about to train on it
    (before clipping), and the teacher's view of the routed tokens. Uses the trainer's loss on edited copies of the
    batch: without the routed rows (`grpo`), with every advantage zeroed (`distillation`: the GRPO term then has no
    gradient, as `beta=0` and no entropy bonus), and, for SRPO, the routed rows on GRPO's branch with the advantage
    GRPO would have given them (`grpo_on_routed`: what routing replaces). For GRPO, the positive- and
    negative-advantage rollouts' parts. The trainer's logged metrics are left as they were.
    """
    import torch

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    metrics = trainer._metrics["train"]
    logged = {key: len(values) for key, values in metrics.items()}

    def gradient(**changes) -> torch.Tensor:
        loss = trainer._compute_loss(trainer.model, {**batch, **changes})
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)]
        )

    advantages = batch["advantages"]
    try:
        total = gradient()
        out = {"total": total.norm().item()}
        if "srpo_distilled_rows" not in batch:  # GRPO: its positive and negative advantages
            out["positive"] = gradient(advantages=advantages.clamp(min=0)).norm().item()
            out["negative"] = gradient(advantages=advantages.clamp(max=0)).norm().item()
            return out
        routed = batch["srpo_distilled_rows"]
        nothing = torch.zeros_like(routed)
        grpo = gradient(srpo_distilled_rows=nothing)
        distillation = gradient(advantages=torch.zeros_like(advantages))
        out.update(grpo=grpo.norm().item(), distillation=distillation.norm().item())
        # The two parts add up to the step's gradient (the loss is their sum): a check of the probe itself.
        out["parts_residual"] = ((grpo + distillation - total).norm() / total.norm().clamp(min=1e-30)).item()
        if trainer.args.routing == "srpo" and routed.any():
            replaced = gradient(
                srpo_grpo_rows=routed,
                srpo_distilled_rows=nothing,
                advantages=_grpo_advantages_of_routed(batch, trainer.num_generations),
            )
            out["grpo_on_routed"] = replaced.norm().item()
            out["cosine_distillation_grpo_on_routed"] = torch.nn.functional.cosine_similarity(
                distillation, replaced, dim=0
            ).item()
        out.update(_teacher_view(trainer, batch))
        return out
    finally:
        for key in list(metrics):
            if key not in logged:
                del metrics[key]
            else:
                del metrics[key][logged[key] :]


def _grpo_advantages_of_routed(batch: dict, group_size: int):
    """The advantage GRPO gives each routed rollout, zero elsewhere: with 0/1 rewards and `scale_rewards="none"`
    (the testbed's), a failed rollout's advantage is minus its group's success rate, and a routed rollout's group
    has its correct rollouts on GRPO's branch with a positive advantage. Rows are in group order at scoring."""
    routed = batch["srpo_distilled_rows"].view(-1, group_size)
    correct = (batch["srpo_grpo_rows"] & (batch["advantages"] > 0)).view(-1, group_size)
    return (-correct.float().mean(1, keepdim=True) * routed).flatten()


def _teacher_view(trainer, batch: dict) -> dict:
    """On the distilled tokens: how often the teacher's top-1 differs from the sampled token (exactly, over the
    whole vocabulary; the trainer's `srpo/teacher_rejects_sampled_frac` is its cheap bound), the mean
    full-vocabulary divergence between the policy and the teacher, and that divergence on the tokens where the
    teacher's top-1 differs."""
    import torch

    from srpo_trl.losses import generalized_jsd

    states = trainer.teacher_states["train"]
    index = batch["srpo_teacher_state_index"]
    tokens = (index >= 0) & batch["srpo_distilled_rows"].unsqueeze(1) & batch["completion_mask"].bool()
    if states is None or not tokens.any():
        return {}
    with torch.no_grad():
        teacher = torch.log_softmax(states.logits(states.hidden[index[tokens].long()], *states.head), dim=-1)
        prompt_length = batch["prompt_ids"].size(1)
        logits = trainer.model(
            input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
        ).logits[:, prompt_length - 1 : -1]
        student = torch.log_softmax(logits.float() / trainer.temperature, dim=-1)[tokens]
        divergence = generalized_jsd(student, teacher, trainer.args.distillation_alpha)
    sampled = batch["completion_ids"][tokens]
    differs = teacher.argmax(-1) != sampled
    return {
        "routed_tokens": int(tokens.sum()),
        "teacher_top1_differs_frac": differs.float().mean().item(),
        "divergence_mean": divergence.mean().item(),
        "divergence_where_top1_differs": divergence[differs].mean().item() if differs.any() else math.nan,
    }


# ---------------------------------------------------------------------------------------------------- the testbed


def testbed_config(settings: Settings):
    """The family's pre-training config, `settings.testbed` overriding its defaults."""
    from srpo_trl.testbed import PretrainConfig

    return PretrainConfig(task=settings.task, **settings.testbed)


def testbed_identity(settings: Settings) -> dict:
    """Which pre-trained checkpoint the runs start from: its cache key (a hash of the config and of the testbed's
    sources) and its config."""
    from srpo_trl.testbed import pretrain

    config = testbed_config(settings)
    return {"config_hash": pretrain.config_hash(config), "config": dataclasses.asdict(config)}


def load_testbed(settings: Settings):
    from srpo_trl.testbed import pretrained_testbed_model

    return pretrained_testbed_model(testbed_config(settings))


def code_identity() -> str:
    """A hash of the imported `srpo_trl` package's sources: runs of different code are not silently mixed."""
    import srpo_trl

    digest = hashlib.sha256()
    for source in sorted(Path(srpo_trl.__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------- many runs


def cached_record(path: Path, settings: Settings) -> dict | None:
    """The saved record at `path` if it was run with these settings, from the current testbed checkpoint and code."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = (
        Settings(**record["settings"]) == settings  # a field added since then takes its default
        and record.get("testbed", {}).get("config_hash") == testbed_identity(settings)["config_hash"]
        and record.get("code") == code_identity()
    )
    return record if same else None


def run_all(arms: list[tuple[str, float, int]], settings: Settings, runs_dir: Path, jobs: int, package_root=None):
    """Each `(method, lr, seed)` not already saved with these settings, `jobs` worker processes at a time (one
    torch thread each); returns every record, in `arms` order. Workers import `srpo_trl` from `package_root`."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    load_testbed(settings)  # pre-train (and cache) the checkpoint once, before workers race to do it
    paths = [runs_dir / f"{run_name(*arm)}.json" for arm in arms]
    queue = [(arm, path) for arm, path in zip(arms, paths, strict=True) if cached_record(path, settings) is None]
    print(f"{settings.task}: {len(arms) - len(queue)} of {len(arms)} runs cached, {len(queue)} to run", flush=True)
    settings_path = runs_dir / "settings.json"
    settings_path.write_text(json.dumps(dataclasses.asdict(settings)))
    running, failures, done = [], [], 0
    while queue or running:
        while queue and len(running) < jobs:
            (method, lr, seed), path = queue.pop(0)
            path.unlink(missing_ok=True)
            log = open(path.with_suffix(".log"), "w")
            script = HERE if package_root is None else package_root / "benchmarks" / "learning"
            command = [sys.executable, str(script / "run.py"), "--worker", method, repr(lr), str(seed),
                       str(settings_path), str(path)]  # fmt: skip
            if package_root is not None:
                command += ["--package-root", str(package_root)]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), path, log))
        time.sleep(0.5)
        for item in [item for item in running if item[0].poll() is not None]:
            process, path, log = item
            running.remove(item)
            log.close()
            done += 1
            if process.returncode or not path.exists():
                failures.append(f"{path.stem} (exit {process.returncode}, see {path.with_suffix('.log')})")
                print(f"[{done}] FAILED: {failures[-1]}", flush=True)
            else:
                path.with_suffix(".log").unlink(missing_ok=True)
                _progress(json.loads(path.read_text()), done, done + len(queue) + len(running))
    if failures:
        raise RuntimeError("runs failed: " + "; ".join(failures))
    return [json.loads(path.read_text()) for path in paths]


def _progress(record: dict, done: int, total: int) -> None:
    curve = record["curve"]
    print(
        f"[{done}/{total}] {run_name(record['method'], record['learning_rate'], record['seed'])}: avg@k "
        f"{curve[0]['accuracy']:.3f} -> {curve[-1]['accuracy']:.3f}, {curve[-1]['cpu_seconds']:.0f} CPU s of "
        f"training, {record['wall_seconds']:.0f} s",
        flush=True,
    )

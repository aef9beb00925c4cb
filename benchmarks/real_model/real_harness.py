"""One run of the real-model learning benchmark: an arm of `benchmarks/learning/harness.METHODS` (one `SRPOTrainer`
`routing` mode and its settings) at one learning rate and seed, post-training SmolLM2-135M-Instruct (the Q4_1 weights
dequantized, `srpo_trl.testbed.real_model`) on one family of `tasks.FAMILIES`. It records:

- the held-out accuracy every `eval_every` RL steps on a fixed test set: sampled (`eval_k` samples per problem at
  temperature 1, as rollouts are drawn; the same RNG state at every evaluation of every arm and seed, so arms are
  compared on the same samples) and greedy; and, for arms with a teacher, the teacher's greedy accuracy with the
  correct answer shown (`abilities.teacher_prompts`);
- the CPU seconds of training at each evaluation (one torch thread; evaluation and probes excluded) and where they
  went, from the trainers' named spans (TRL's `profiling_context`: generation, `compute_loss`, the teacher's passes,
  the distillation; `benchmarks.step_cost.harness.recorded_spans` times them on this process's CPU clock);
- at every step, for SRPO, the departure tokens (where a routed rollout first leaves the correct sibling it is shown):
  the teacher's probability of the solution's token there, its entropy and the entropy weight the loss gives the
  token (read from `srpo_trl.diagnostics.routing_metrics`' arguments, which the trainer calls once per batch);
- `gradient_probe` (the learning harness's) at the steps in `probe_steps`: each branch's gradient norm;
- the trainer's log history (its `srpo/*` metrics).
"""

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (str(REPO), str(REPO / "benchmarks" / "learning"), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import harness as learning  # noqa: E402  (benchmarks/learning/harness.py)

ARMS = ("grpo", "sdpo", "srpo", "srpo_base_teacher", "srpo_routed_grpo", "srpo_gated")
METHODS = {name: learning.METHODS[name] for name in ARMS}


@dataclasses.dataclass
class Settings:
    family: str = "addition"
    steps: int = 30
    prompts: int = 4
    num_generations: int = 4
    max_completion_length: int = 12
    warmup_steps: int = 2
    eval_every: int = 10
    eval_problems: int = 16
    eval_k: int = 4
    num_train: int = 400
    distillation_topk: int = 100
    probe_steps: tuple = (5,)  # RL steps with a gradient probe (each costs about 3 steps), of `probe_seeds` only
    probe_seeds: tuple = (1,)


def run_name(method: str, lr: float, seed: int) -> str:
    return learning.run_name(method, lr, seed)


def datasets(settings: Settings, seed: int):
    import tasks

    test = tasks.make_dataset(settings.family, settings.eval_problems, seed=0)
    train = tasks.make_dataset(settings.family, settings.num_train, seed=seed, exclude=tasks.questions(test))
    return train, test


def evaluate(model, tokenizer, test, settings: Settings, teacher=None) -> dict:
    """Student sampled and greedy accuracy on `test`; with `teacher` (a model), its greedy accuracy with the answer
    shown. Same seed every time: common random numbers across evaluations, arms and seeds."""
    import tasks
    from abilities import generate_texts, teacher_prompts

    answers, kinds = list(test["answer"]), list(test["kind"])
    k, n = settings.eval_k, settings.max_completion_length
    sampled = generate_texts(model, tokenizer, list(test["prompt"]), k, True, n, seed=1234)
    greedy = generate_texts(model, tokenizer, list(test["prompt"]), 1, False, n, seed=1234)
    out = {
        "accuracy": sum(
            tasks.reward(sampled, [a for a in answers for _ in range(k)], [c for c in kinds for _ in range(k)])
        )
        / len(sampled),
        "greedy": sum(tasks.reward(greedy, answers, kinds)) / len(answers),
    }
    if teacher is not None:
        shown = generate_texts(teacher, tokenizer, teacher_prompts(test), 1, False, n, seed=1234)
        out["teacher_greedy_shown"] = sum(tasks.reward(shown, answers, kinds)) / len(answers)
    return out


def run_one(method: str, lr: float, seed: int, settings: Settings, path: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import tasks
    from transformers import PrinterCallback, TrainerCallback
    from transformers.utils import logging as transformers_logging

    import srpo_trl.trainer as trainer_module
    from benchmarks.step_cost.harness import Timers, recorded_spans
    from srpo_trl import SRPOTrainer
    from srpo_trl.compat import compact_fused_head_on_cpu
    from srpo_trl.testbed.real_model import real_model_and_tokenizer

    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    model, tokenizer = real_model_and_tokenizer()
    train, test = datasets(settings, seed)
    config = learning.arm_config("real", method, lr, seed, settings)
    trainer = SRPOTrainer(model=model, reward_funcs=tasks.reward, args=config, train_dataset=train,
                          processing_class=tokenizer)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    clock = learning.CpuClock()
    timers = Timers("cpu")
    record = {"method": method, "learning_rate": lr, "seed": seed, "settings": dataclasses.asdict(settings),
              "code": learning.code_identity(), "curve": [], "probes": [], "departures": [],
              "steps_per_generation": 1}  # fmt: skip

    def save(done: bool):
        record.update(spans=dict(timers.seconds), wall_seconds=time.monotonic() - started, done=done,
                      log_history=trainer.state.log_history)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(record, default=learning._json_default))
        path.with_suffix(".tmp").replace(path)

    def evaluation(step: int):
        with clock.paused(), torch.random.fork_rng(devices=[]):
            teacher = trainer.teacher
            if teacher is None and step == 0:
                result = evaluate(trainer.model, tokenizer, test, settings, teacher=trainer.model)
            elif teacher is None:
                result = evaluate(trainer.model, tokenizer, test, settings)
            else:
                with teacher.active() as teacher_model:
                    result = evaluate(trainer.model, tokenizer, test, settings, teacher=teacher_model)
        record["curve"].append({"step": step, "cpu_seconds": clock.read(), **result})
        print(f"{run_name(method, lr, seed)} step {step}: {result} ({clock.read():.0f} CPU s)", flush=True)
        save(False)

    class Evaluation(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timers.seconds.clear()
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % settings.eval_every == 0 or state.global_step == settings.steps:
                evaluation(state.global_step)

    trainer.add_callback(Evaluation())
    # The departure tokens' teacher statistics: `routing_metrics` receives the batch's teacher scores and entropy
    # weights once per batch (a public function of the package, wrapped where the trainer imported it).
    routing_metrics = trainer_module.routing_metrics

    def recording_routing_metrics(routes, mask, scores, *, weights, **kwargs):
        if scores.solution_logps is not None:
            departures = mask.bool() & ~scores.solution_logps.isnan() & routes.distilled.unsqueeze(1)
            record["departures"].append({
                "step": trainer.state.global_step + 1,
                "solution_prob": scores.solution_logps[departures].exp().tolist(),
                "entropy": scores.entropy[departures].tolist(),
                "weight": weights[departures].tolist(),
                "sampled_prob": scores.token_logps[departures].exp().tolist(),
            })  # fmt: skip
        return routing_metrics(routes, mask, scores, weights=weights, **kwargs)

    trainer_module.routing_metrics = recording_routing_metrics
    score = trainer._generate_and_score_completions

    def score_and_probe(inputs):
        batch = score(inputs)
        step = trainer.state.global_step + 1
        if trainer.model.training and step in settings.probe_steps and seed in settings.probe_seeds:
            with clock.paused():
                record["probes"].append({"step": step, **learning.gradient_probe(trainer, batch)})
        return batch

    trainer._generate_and_score_completions = score_and_probe
    # Step 0 is the same model for every arm and seed (and its teachers are that model): evaluated once per family.
    initial = path.parent / f"initial-{settings.family}.json"
    if initial.exists():
        record["curve"].append(json.loads(initial.read_text()))
    else:
        evaluation(0)
        initial.write_text(json.dumps(record["curve"][0]))
    # TRL's fused LM head then projects only the completion positions on CPU, as it does on GPUs.
    with recorded_spans(timers), compact_fused_head_on_cpu():
        trainer.train()
    save(True)
    return record

"""`SRPOTrainer`: GRPOTrainer with per-rollout routing to self-distillation from a self-teacher (an EMA by default).

The trainer is glue at GRPOTrainer's extension points; the method lives in the modules it calls (docs/method.md):

| override | what it adds | where the logic lives |
|---|---|---|
| `__init__` | refusals, checked reward functions, the self-teacher and its scorer | `checks.py`, `rewards.py`, `teacher.py`, `teacher_scoring.py` |
| `_calculate_rewards` | keeps what routing needs (prompts, completion ids, the batch's rewards, feedback) | `checks.py` |
| `_generate_and_score_completions` | routes the batch, builds teacher prompts, scores the routed rows, logs | `routing.py`, `prompts.py`, `teacher_scoring.py`, `losses.py`, `diagnostics.py` |
| `_compute_loss` | GRPO's loss on GRPO tokens, then `losses.srpo_loss` on `losses.LossInputs`: the distillation term, one normaliser | `losses.py`, `vocab.py`, `compat/grpo_loss.py` |
| checkpoint hooks (mixed in) | the teacher's state in every checkpoint | `checkpointing.py` |
| `save_model`, `create_model_card` (mixed in) | the policy alone, with a card naming a local base model | `saving.py` |

`_generate_and_score_completions` attaches per-token tensors (an index into the teacher's kept states, the entropy
weights) that GRPOTrainer then shuffles and splits into micro-batches; the loss computes the distillation term from
the hidden states of GRPOTrainer's own forward pass (the student needs no pass of its own). Under ZeRO-3 and FSDP2
weights are gathered collectively, so every process makes as many teacher passes and LM-head uses as the busiest one
(docs/scaling.md). TRL's private names are listed in `compat/`.
"""

import functools
import os
import warnings
from dataclasses import dataclass

import torch
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from . import checks, compat, routing
from .checkpointing import TeacherCheckpointing
from .config import SRPOConfig
from .diagnostics import RoutingWatch, no_demonstration_room, one_process_of_several, routing_metrics
from .evaluation import bind_evaluation_callbacks
from .losses import LossInputs, mixed_token_advantages, srpo_loss, teacher_entropy_weights
from .model_parts import backbone_and_head, captured_hidden_states, causal_lm, context_length
from .prompts import (
    batch_teacher_prompts,
    privileged_contexts,
    privileged_rollouts,
    sibling_completions,
    teacher_prompt_budget,
)
from .rewards import checked_reward_function
from .saving import PolicySaving
from .teacher import SelfTeacherCallback, build_self_teacher, shard_like_policy
from .teacher_scoring import TeacherScorer
from .vllm_cpu import check_cpu_vllm_settings, use_cpu_weight_sync
from .vocab import Logits, logit_scale_and_softcap, sampling_logits

FEEDBACK_COLUMN = "feedback"  # the `log_extra` column reward functions write feedback to (`teacher_feedback`)
ROUTING_WATCH_BATCHES = 5  # training generation batches after which routing that never distils is reported


@dataclass
class _ScoredRollouts:
    """What `_calculate_rewards` saw: this process's prompts, completions, their feedback (`teacher_feedback`) and
    `privileged_context`, and every process's rewards."""

    prompts: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor
    contexts: list[str | None]
    feedback: list[str | None] | None = None


class SRPOTrainer(TeacherCheckpointing, PolicySaving, GRPOTrainer):
    """Sample-Routed Policy Optimization ([arXiv 2604.02288](https://huggingface.co/papers/2604.02288)).

    Takes exactly [`~trl.GRPOTrainer`]'s arguments, with an [`SRPOConfig`] as `args`. Correct rollouts (and failed
    ones whose whole group failed) are trained by GRPO; failed rollouts with a correct sibling are distilled
    towards an EMA self-teacher that sees that sibling's answer. See `SRPOConfig.routing` for the baselines.
    """

    def __init__(self, model, reward_funcs=None, args: SRPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = SRPOConfig(f"{str(name).split('/')[-1]}-SRPO")
        elif not isinstance(args, SRPOConfig):
            raise TypeError(
                f"SRPOTrainer needs an SRPOConfig, got {type(args).__name__}; convert it with "
                "SRPOConfig.from_grpo_config(your_config), which keeps what you set and takes SRPO's defaults for "
                "the rest (pass routing='grpo' for plain GRPO)."
            )
        self.routing_mode = routing.ROUTING_MODES[args.routing]
        if self.routing_mode.uses_teacher and (problem := checks.fsdp1_problem(args)):  # before the model loads
            raise NotImplementedError(problem)
        check_cpu_vllm_settings(args)  # before GRPOTrainer starts vLLM: the CPU backend has no sleep mode
        compat.quiet_trl_checkpointing_calls()
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if message := one_process_of_several(os.environ, self.accelerator.num_processes):
            warnings.warn(message, stacklevel=2)
        bind_evaluation_callbacks(self)  # evaluation callbacks given in `callbacks=[...]` need the trainer
        use_cpu_weight_sync(self)  # vLLM colocate on a CPU engine: weight sync through vLLM's reload path
        self.teacher = None
        self.distributed = compat.distributed_layout(self)  # `is_zero3`, `is_fsdp`
        self.teacher_states = {"train": None, "eval": None}  # the teacher's states the loss needs, per mode
        self._routing_watch = RoutingWatch(args.success_reward_threshold, ROUTING_WATCH_BATCHES)
        self._warned: set[str] = set()  # keys of the warnings given once
        self.reward_funcs = [
            checked_reward_function(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        if problem := checks.datasets_problem(self.train_dataset, self.eval_dataset, self.routing_mode.uses_teacher):
            raise ValueError(problem)
        if problem := checks.privileged_context_problem(self.train_dataset, args.distill_without_sibling):
            raise ValueError(problem)
        if not self.routing_mode.uses_teacher:
            return
        zero = self.accelerator.state.deepspeed_plugin.deepspeed_config if self.distributed.is_zero3 else {}
        vocab_size = causal_lm(self.model).config.get_text_config().vocab_size
        extras = (compat.entropy_bonus_enabled(self), self.aux_loss_enabled, zero.get("zero_optimization"))
        if problem := checks.teacher_setup_problem(args, vocab_size, self.loss_type, *extras):
            raise ValueError(problem)
        self._context_length = context_length(self.model)
        # A budget is capped to the context anyway: warn only of a value the user chose (not the default 10240)
        length = args.max_teacher_prompt_length
        message = checks.teacher_context_warning(length, self._context_length, args.max_completion_length)
        if message and length != SRPOConfig.max_teacher_prompt_length:
            warnings.warn(message, stacklevel=2)
        self._logit_scale_and_softcap = logit_scale_and_softcap(causal_lm(self.model).config)
        self.teacher, self._teacher_engine = build_self_teacher(
            self.model, args, self.accelerator, self.distributed.is_zero3, self.distributed.is_fsdp
        )
        if not self._sharded:  # sharded weights: a forward is a collective; the first pass checks it then
            with self.teacher.active() as teacher_model:
                if problem := checks.uncaptured_backbone_problem(teacher_model):
                    raise ValueError(problem)
        span = functools.partial(profiling_context, self)
        self.teacher_scorer = TeacherScorer(
            self.teacher, self.accelerator, compat.pad_token_id(self), self._logits, self.distributed, span
        )
        self.add_callback(SelfTeacherCallback(self.teacher, self.accelerator, shard=self.distributed.is_fsdp))

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        bind_evaluation_callbacks(self)

    def shard_teacher_like_policy(self) -> None:
        """FSDP2: shard the teacher as Accelerate sharded the policy (once: on resume, or when training starts)."""
        if self.teacher is not None and self.distributed.is_fsdp:
            shard_like_policy(self.teacher, self.accelerator, self.accelerator.unwrap_model(self.model))

    @property
    def _sharded(self) -> bool:
        """Weights sharded (ZeRO-3, FSDP2): forward passes and LM-head gathers are collectives every process makes."""
        return self.distributed.is_zero3 or self.distributed.is_fsdp

    # ---- generation time: route, then score the routed rows with the teacher ----

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if problem := checks.infinite_reward_problem(rewards_per_func, self.reward_func_names):
            raise ValueError(problem)  # the rewards are every process's (gathered): every process raises alike
        feedback = None
        if self.args.teacher_feedback and self.teacher is not None:
            # Logged through `log_extra` by the reward functions just called; GRPOTrainer flushes it afterwards.
            feedback = compat.logged_extra(self, FEEDBACK_COLUMN)
            if problem := checks.feedback_problem(feedback, len(prompts), FEEDBACK_COLUMN):
                raise ValueError(problem)
        contexts = privileged_contexts(inputs)  # the dataset column, per rollout (GRPOTrainer keeps extra columns)
        self._scored = _ScoredRollouts(prompts, completion_ids_list, rewards_per_func, contexts, feedback)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self.teacher_states[mode] = None  # the previous batch is used up: free its memory before generating
        batch = super()._generate_and_score_completions(inputs)
        if self.teacher is None:
            return batch
        scored, self._scored = self._scored, None
        rewards = routing.weighted_rewards(scored.rewards_per_func, self.reward_weights)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        threshold = self.args.success_reward_threshold
        privileged = privileged_rollouts(scored.contexts, self.args.distill_without_sibling, self.accelerator)
        route = functools.partial(routing.route_rollouts, rewards, num_generations, threshold, self.args.routing)
        routes = route(privileged=privileged)  # again below, with the rows whose prompt had no room
        self._watch_routing(routes, rewards, mode, scored.rewards_per_func)
        start = self.accelerator.process_index * len(scored.prompts)
        local = slice(start, start + len(scored.prompts))
        prompts = self._teacher_prompts(scored, routes, local, mode)
        # Rows whose teacher prompt has no room for the demonstration are routed as if no sibling were correct
        # (`srpo/teacher_prompt_dropped_frac`); routes are global, so every process learns every process's rows.
        if routes.needs_teacher.any():
            dropped = self.accelerator.gather(prompts.no_room.to(batch["completion_mask"].device)).bool()
            dropped_frac = dropped.sum().item() / routes.needs_teacher.sum().item()
            compat.log_metrics(self, mode, {"srpo/teacher_prompt_dropped_frac": dropped_frac})
            if dropped.any():
                routes = route(not_shown=dropped, privileged=privileged)
        batch.update(self._score_with_teacher(batch, routes, prompts, local, mode))
        return batch

    def _teacher_prompts(self, scored: _ScoredRollouts, routes: routing.Routes, local: slice, mode: str):
        """This process's routed rows' teacher prompts (method §3), each sibling's completion fetched from the process
        that holds it: only those some process needs from another cross (a collective when any do)."""
        sibling_ids = sibling_completions(routes, scored.completion_ids, local, self.accelerator.num_processes)
        budget, over_context = teacher_prompt_budget(
            self.args.max_teacher_prompt_length, self._context_length, max(map(len, scored.completion_ids), default=0)
        )
        rows = routes.needs_teacher[local].nonzero().squeeze(1).tolist()
        with profiling_context(self, "teacher_prompts"):
            prompts = batch_teacher_prompts(
                [(row, routes.sibling[local][row].item()) for row in rows],
                scored.prompts,
                sibling_ids,
                functools.partial(self.processing_class.decode, skip_special_tokens=True),
                functools.partial(compat.tokenize_one_prompt, self),
                budget=budget,
                over_context=over_context,
                feedback=scored.feedback,
                one_per_sibling=scored.feedback is None and self.environment_factories is None,
                source=f"the {mode} dataset",
                contexts=scored.contexts,
                completion_ids=scored.completion_ids,
            )
        if prompts.no_room.any():
            setting, context, longest = (
                self.args.max_teacher_prompt_length,
                self._context_length,
                prompts.longest_without_room,
            )
            self._warn_once(*no_demonstration_room(longest, budget, setting, context, prompts.crowded_by))
        return prompts

    def _score_with_teacher(self, batch, routes: routing.Routes, prompts, local: slice, mode: str) -> dict:
        """The teacher's scores of this process's routed rows: what the loss needs is kept on the trainer; the batch
        gets per-token tensors (an index into those states, the entropy weights) or, for `advantage_mix`, the mixed
        advantages. The reliability gate (`min_teacher_solution_prob`) reroutes on these scores, before the entropy
        weights are normalised over the distilled tokens that remain."""
        mask = compat.loss_mask(batch)
        rows = routes.needs_teacher[local].nonzero().squeeze(1).tolist()
        scores = self.teacher_scorer.score(
            batch,
            mask,
            rows,
            prompts.ids,
            self._rows_per_pass(mode),
            lockstep=self._sharded and bool(routes.needs_teacher.any()),  # `routes` is global: all agree
            keep=self.routing_mode.distils,
            snapshot_head=mode == "train" and not self._scored_by_current_teacher,
            solution_tokens=prompts.solution_tokens,
        )
        self.teacher_states[mode] = scores.states
        if self.args.min_teacher_solution_prob > 0:  # routes are global: every process's rows' probabilities
            departure_probs = self.accelerator.gather(scores.departure_solution_probs(mask))
            routes = routing.gate_unreliable_teachers(routes, departure_probs, self.args.min_teacher_solution_prob)
        self._log_route_labels(routes, mode)
        distilled_tokens = mask & routes.distilled[local].unsqueeze(1)
        if self.args.dynamic_weighting:
            temperature = self.args.weighting_temperature
            weights = teacher_entropy_weights(scores.entropy, distilled_tokens, temperature, self._all_reduce)
        else:
            weights = distilled_tokens.float()
        truncated, reduce = prompts.truncated.to(mask.device), self._all_reduce
        metrics = routing_metrics(
            routes, mask, scores, weights=weights, truncated=truncated, local=local, all_reduce=reduce
        )
        compat.log_metrics(self, mode, metrics)
        if self.routing_mode.teacher_mixes_advantages:
            old_token_logps = batch.get("old_per_token_logps")
            if old_token_logps is None:  # GRPOTrainer skips them when π_old is the policy being trained
                old_token_logps = compat.policy_token_logps(self, batch, self._rows_per_pass(mode))
            advantages = mixed_token_advantages(
                batch["advantages"],
                scores.token_logps,
                old_token_logps,
                routes.needs_teacher[local],
                self.args.advantage_mix_lambda,
            )
            return {"advantages": advantages * mask}
        grpo_weights = routing.grpo_advantage_weights(routes, self.args.routed_grpo_weight)[local]
        return {
            # GRPOTrainer's loss then trains exactly the rows with a GRPO weight: the others carry no advantage.
            "advantages": batch["advantages"] * grpo_weights,
            "srpo_grpo_rows": grpo_weights > 0,
            "srpo_distilled_rows": routes.distilled[local],
            "srpo_teacher_state_index": scores.teacher_state_index,
            "srpo_token_weights": weights,
        }

    @property
    def _scored_by_current_teacher(self) -> bool:
        """Whether every loss step on a generation batch sees the teacher (and the policy) of its scoring: true
        when the batch is used within one optimizer step, as GRPOTrainer decides when it skips `old_per_token_logps`."""
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) == 0

    def _log_route_labels(self, routes: routing.Routes, mode: str) -> None:
        """The completions table (`log_completions`): `route` and `teacher_sibling` columns say what each rollout
        was trained with (README, "Metrics"), and its `advantage` column what a GRPO term trained with."""
        if not self.log_completions:
            return
        group = self.num_generations if mode == "train" else self.num_generations_eval
        labels, siblings = routing.route_labels(routes, group)
        compat.add_completion_columns(self, {"route": labels, "teacher_sibling": siblings})
        compat.replace_logged_advantages(  # GRPOTrainer's, for this batch's rows, in `routes`' order
            self, len(labels), lambda batch: routing.trained_advantages(batch, routes, self.args.routed_grpo_weight)
        )

    def _watch_routing(self, routes: routing.Routes, rewards: torch.Tensor, mode: str, rewards_per_func) -> None:
        """Warn once when the first training batches show that `success_reward_threshold` does not fit the rewards."""
        if mode != "train":
            return
        done = self.state.global_step * self.args.gradient_accumulation_steps // self.args.steps_per_generation
        message = self._routing_watch.observe(  # a resume: the batches done before it were checked
            routes, rewards, rewards_per_func, self.reward_weights, self.reward_func_names, batches_before=done
        )
        if message is not None and self.accelerator.is_main_process:  # every process sees the same global rewards
            warnings.warn(message, stacklevel=2)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _rows_per_pass(self, mode: str) -> int:
        return self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

    def _logits(self, hidden: torch.Tensor) -> Logits:
        """The sampling distribution's logits as GRPOTrainer's fused LM head makes them, in the current autocast."""
        return sampling_logits(hidden, self.args.cast_lm_head_to_fp32, self.temperature, self._logit_scale_and_softcap)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """`tensor` summed, or its elementwise maximum, over the processes."""
        if op == "max":
            return self.accelerator.gather(tensor.unsqueeze(0)).max(dim=0).values
        return self.accelerator.reduce(tensor, reduction="sum")

    # ---- loss time: one per-token loss, GRPO's term on GRPO rows and the distillation term on distilled rows ----

    def _compute_loss(self, model, inputs):
        if "srpo_token_weights" not in inputs:  # nothing distilled: GRPOTrainer's loss as is
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mask = compat.loss_mask(inputs)
        grpo_rows, distilled_rows = inputs["srpo_grpo_rows"], inputs["srpo_distilled_rows"]
        grpo_tokens, distilled_tokens = mask & grpo_rows.unsqueeze(1), mask & distilled_rows.unsqueeze(1)
        # GRPOTrainer's loss sees GRPO tokens only (through its `tool_mask`), so that its other per-token terms (the
        # reference KL, the entropy bonus) and the statistics that choose tokens (entropy quantiles) act on GRPO
        # tokens alone: a routed rollout carries one signal, the distillation term (method §12).
        grpo_inputs = {**inputs, "tool_mask": grpo_tokens.to(inputs["completion_mask"].dtype)}
        policy = self.accelerator.unwrap_model(model)
        logged_before = compat.metric_counts(self, mode)
        with captured_hidden_states(policy) as captured, compat.fused_head_scores_only(causal_lm(policy), grpo_rows):
            grpo_loss = super()._compute_loss(model, grpo_inputs)
        training = mode == "train"
        accumulation = self.current_gradient_accumulation_steps if training else 1
        per_generation = self.args.steps_per_generation if training else 1
        processes = self.accelerator.num_processes
        count = compat.global_token_normaliser(inputs["num_items_in_batch"], processes, accumulation, per_generation)
        loss_inputs = LossInputs(grpo_loss, mask, grpo_tokens, distilled_tokens, count)
        # Under ZeRO-3 the distillation gathers the LM heads, a collective: every process joins, routed rows or not
        # (the teacher's states exist on every process or on none: routing is global).
        teacher_states = self.teacher_states[mode]
        if teacher_states is not None and (distilled_rows.any() or self._sharded):
            hidden = captured[0] if len(captured) == 1 else torch.cat(captured)  # one forward unless GRPO chunked it
            self._add_distillation_inputs(loss_inputs, policy, hidden, inputs, teacher_states)
        if mode == "eval":  # one loss per scored eval batch: do not hold its teacher states through training
            self.teacher_states["eval"] = None
        loss, terms = srpo_loss(
            loss_inputs,
            loss_type=self.loss_type,
            accumulation_steps=accumulation,
            max_completion_length=self.max_completion_length,
            topk=self.args.distillation_topk,
            alpha=self.args.distillation_alpha,
            is_clip=self.args.distillation_is_clip,
            span=functools.partial(profiling_context, self),
        )
        self._log_loss_terms(mode, terms["grpo"], terms["distillation"], grpo_tokens, logged_before)
        return loss

    def _add_distillation_inputs(self, loss_inputs: LossInputs, policy, hidden, inputs, teacher_states) -> None:
        """The distilled tokens' part of `LossInputs` (the student's hidden states from GRPOTrainer's own forward)."""
        tokens = loss_inputs.distilled_tokens
        start = inputs["prompt_ids"].size(1) - 1
        loss_inputs.student_hidden = hidden[:, start : start + inputs["completion_ids"].size(1)][tokens]
        with self.accelerator.autocast():
            loss_inputs.student_logits = self._logits(loss_inputs.student_hidden)
        loss_inputs.student_head = backbone_and_head(policy)[1]
        loss_inputs.tokens = inputs["completion_ids"][tokens]
        loss_inputs.teacher = teacher_states
        loss_inputs.teacher_state_index = inputs["srpo_teacher_state_index"][tokens].long()
        loss_inputs.token_weights = inputs["srpo_token_weights"][tokens]
        if "old_per_token_logps" in inputs:  # computed at generation when the policy has moved since
            loss_inputs.old_logps = inputs["old_per_token_logps"][tokens]
        if self.use_vllm and self.vllm_importance_sampling_correction:
            loss_inputs.rollout_ratio = inputs["importance_sampling_ratio"].expand_as(tokens)[tokens]

    def _log_loss_terms(self, mode, grpo_loss, distillation_loss, grpo_tokens, logged_before) -> None:
        """Each branch's share of the step's loss (one gather), and a stop at the first non-finite one. GRPOTrainer's
        statistics over its loss mask (`entropy`, `kl`, `clip_ratio/*`, ...) are left out of a step with no GRPO token
        on any process (every row distilled): they come out 0 or NaN, not statistics."""
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1  # per-step share, method §9
        values = torch.stack([grpo_loss.detach().float(), distillation_loss.detach().float()])
        counts = torch.cat([values, grpo_tokens.sum().float().reshape(1)])
        gathered = self.accelerator.gather(counts.unsqueeze(0))
        grpo_value, distillation_value = (gathered[:, :2].mean(dim=0) * scale).tolist()
        compat.log_metrics(self, mode, {"srpo/loss/grpo": grpo_value, "srpo/loss/sdpo": distillation_value})
        if not gathered[:, 2].sum():
            compat.drop_grpo_token_statistics(self, mode, logged_before)
        where = f"training step {self.state.global_step + 1}" if mode == "train" else "evaluation"
        if problem := checks.non_finite_loss_problem(where, grpo_value, distillation_value):
            raise FloatingPointError(problem)

"""`SRPOTrainer`: GRPOTrainer with per-rollout routing to self-distillation from an EMA self-teacher.

The glue, at GRPOTrainer's extension points:
- `_calculate_rewards` keeps what routing needs (prompts, completion ids, rewards of the whole batch);
- `_generate_and_score_completions` routes the batch, runs the teacher on the routed rows only, keeps its hidden
  states and log-normalisers of their tokens (`_TeacherCache`), and attaches per-token tensors (an index into
  that cache, the entropy weights) that GRPOTrainer then shuffles and splits into micro-batches;
- `_compute_loss` builds one per-token loss: GRPOTrainer's own loss on the GRPO tokens (the only tokens its loss mask
  then holds, so its KL, entropy bonus and entropy quantiles skip distilled rows), plus the distillation term on the
  SDPO tokens, computed from the same forward pass's hidden states (the student's top-k support is picked there, so
  the student needs no pass of its own at scoring), reduced as GRPOTrainer reduces its loss for `loss_type`;
- `_save_checkpoint` / `_load_optimizer_and_scheduler` carry the teacher's fp32 state (per-process shards under
  DeepSpeed ZeRO-3), and `_save` keeps it out of `save_model`/`push_to_hub`.
Under ZeRO-3 weights are gathered collectively, so every process makes as many teacher passes and LM-head uses as
the busiest one (docs/scaling.md). The math lives in `routing.py`, `prompts.py`, `losses.py` and `vocab.py`.
"""

import copy
import functools
import math
import os
import textwrap
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from .config import SRPOConfig
from .losses import (
    LOCAL_TOKEN_LOSS_TYPES,
    aggregate_token_loss,
    clipped_importance_ratio,
    mixed_token_advantages,
    sdpo_token_losses,
    teacher_entropy_weights,
    topk_distillation_divergence,
)
from .prompts import demonstration_from_completion, fit_teacher_prompt
from .routing import Routes, route_labels, route_rollouts
from .teacher import SelfTeacher, TeacherEMACallback, backbone_and_head, causal_lm, is_peft
from .vocab import Logits, logit_scale_and_softcap, logps_on_support, student_topk_logps, teacher_statistics

TEACHER_STATE_FILE = "srpo_teacher.safetensors"
FEEDBACK_COLUMN = "feedback"  # the `log_extra` column reward functions write feedback to (`teacher_feedback`)


def _loss_mask(batch: dict) -> torch.Tensor:
    """The completion tokens GRPOTrainer's loss counts (tool outputs excluded), as a bool `(rows, length)`."""
    mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
    return mask.bool()


@dataclass
class _TeacherCache:
    """What the loss needs of the teacher's scoring of one generation batch, for this process's routed tokens:
    final hidden states `(n, hidden)`, log-normalisers `(n,)`, and the LM head (weight, bias) and `Logits` that go
    with them. The batch's `srpo_teacher_index` says which row belongs to which token."""

    hidden: torch.Tensor
    log_normalizer: torch.Tensor
    head: tuple[torch.Tensor, torch.Tensor | None]
    logits: Logits


@dataclass
class _ScoredRollouts:
    """What `_calculate_rewards` saw: this process's prompts and completions (and the rewards' feedback on them, with
    `teacher_feedback`), and every process's rewards."""

    prompts: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor
    feedback: list[str | None] | None = None


class SRPOTrainer(GRPOTrainer):
    """Sample-Routed Policy Optimization ([arXiv 2604.02288](https://huggingface.co/papers/2604.02288)).

    Takes exactly [`~trl.GRPOTrainer`]'s arguments, with an [`SRPOConfig`] as `args`. Correct rollouts (and failed
    ones whose whole group failed) are trained by GRPO; failed rollouts with a correct sibling are distilled
    towards an EMA self-teacher that sees that sibling's answer. See `SRPOConfig.routing` for the baselines.
    """

    _tag_names = ["trl", "srpo"]
    _name = "Sample-Routed Policy Optimization (SRPO)"  # how the model card names the method
    _paper = {
        "title": "Unifying Group-Relative and Self-Distillation Policy Optimization via Sample Routing",
        "id": "2604.02288",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{li2026srpo,
                title        = {{Unifying Group-Relative and Self-Distillation Policy Optimization via Sample Routing}},
                author       = {Gengsheng Li and Tianyu Yang and Junfeng Fang and Mingyang Song and Mao Zheng and Haiyun Guo and Dan Zhang and Jinqiao Wang and Tat-Seng Chua},
                year         = 2026,
                eprint       = {arXiv:2604.02288},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: SRPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SRPOConfig(f"{str(name).split('/')[-1]}-SRPO")
        elif not isinstance(args, SRPOConfig):
            raise TypeError(
                f"SRPOTrainer needs an SRPOConfig, got {type(args).__name__}; build one with "
                "SRPOConfig(**your_config.to_dict()) or pass routing='grpo' for plain GRPO."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.teacher = None
        self._teacher_cache: dict[str, _TeacherCache | None] = {"train": None, "eval": None}
        if args.routing == "grpo":
            return
        vocab_size = causal_lm(self.model).config.get_text_config().vocab_size
        if args.distillation_topk > vocab_size:
            raise ValueError(
                f"SRPOConfig.distillation_topk={args.distillation_topk} exceeds the model's vocabulary "
                f"({vocab_size}); set distillation_topk <= {vocab_size}."
            )
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                f"routing={args.routing!r} needs SRPO's self-teacher, which does not support FSDP yet: launch with "
                "DeepSpeed (accelerate_configs/zero3.yaml), or use routing='grpo' under FSDP."
            )
        self._refuse_inexact_setups()
        self._logit_scale_and_softcap = logit_scale_and_softcap(causal_lm(self.model).config)
        self.teacher = self._build_teacher()
        self.add_callback(TeacherEMACallback(self))

    def _refuse_inexact_setups(self) -> None:
        """Settings under which SRPO's objective would be silently wrong, refused before anything trains."""
        if self.loss_type in LOCAL_TOKEN_LOSS_TYPES and (self._entropy_bonus_enabled or self.aux_loss_enabled):
            extra = (
                "an entropy bonus (entropy_coef / use_adaptive_entropy)"
                if self._entropy_bonus_enabled
                else ("a MoE load-balancing loss (output_router_logits)")
            )
            raise ValueError(
                f"loss_type={self.loss_type!r} with {extra} is not supported with routing={self.args.routing!r}: "
                f"SRPO rescales GRPO's {self.loss_type} term to the micro-batch's full token count, which would "
                "rescale that term too. Use loss_type='dapo' (the paper's), or drop the extra term."
            )
        if self._dist.is_zero3:
            zero = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            if int(zero.get("zero_hpz_partition_size", 1)) > 1:
                raise ValueError(
                    f"DeepSpeed ZeRO++ hierarchical partitioning (zero_hpz_partition_size="
                    f"{zero['zero_hpz_partition_size']}) is not supported with routing={self.args.routing!r}: "
                    "DeepSpeed gathers the teacher from a secondary copy that SRPO's shard-local EMA does not "
                    "refresh, so the teacher would stay at its initial weights. Set zero_hpz_partition_size to 1."
                )

    def _build_teacher(self) -> SelfTeacher:
        # `self.model` is not wrapped yet (Accelerate/DeepSpeed wrap it in `train()`), so a PEFT teacher adapter
        # added now is partitioned and placed with the policy's own weights.
        policy, rate = self.model, self.args.teacher_update_rate
        if is_peft(policy):
            return SelfTeacher(policy, rate)
        if not self._dist.is_zero3:
            teacher = SelfTeacher(policy, rate)
            teacher.model.to(self.accelerator.device)
            return teacher
        # ZeRO-3: the teacher is partitioned like the policy, and DeepSpeed gathers it layer by layer in forward.
        if hasattr(next(policy.parameters()), "ds_id"):
            # Already partitioned (loaded from a model id under zero.Init): a copy would share DeepSpeed's
            # per-parameter state. Build a partitioned twin and copy the policy's shards, which line up.
            model = type(policy)._from_config(policy.config, dtype=policy.dtype)
            with torch.no_grad():
                for teacher_weight, weight in zip(model.parameters(), policy.parameters(), strict=True):
                    teacher_weight.ds_tensor.copy_(weight.ds_tensor)
        else:
            model = copy.deepcopy(policy)
        self._teacher_engine = prepare_deepspeed(model, self.accelerator)  # kept: it owns the gathering hooks
        return SelfTeacher(policy, rate, model=self._teacher_engine.module)

    # ---- generation time: route, then score the routed rows with the teacher ----

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        feedback = None
        if self.args.teacher_feedback and self.teacher is not None:
            # Logged through `log_extra` by the reward functions just called; GRPOTrainer flushes it afterwards.
            feedback = list(self._pending_extra_logs.get(FEEDBACK_COLUMN, []))
            if len(feedback) != len(prompts):
                raise ValueError(
                    f"SRPOConfig.teacher_feedback=True needs one feedback string (or None) per completion, logged by "
                    f"a reward function with log_extra({FEEDBACK_COLUMN!r}, texts); got {len(feedback)} for "
                    f"{len(prompts)} completions. Log it from exactly one reward function, or set "
                    "teacher_feedback=False."
                )
        self._scored = _ScoredRollouts(prompts, completion_ids_list, rewards_per_func, feedback)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self._teacher_cache[mode] = None  # the previous batch is used up: free its memory before generating
        batch = super()._generate_and_score_completions(inputs)
        if self.teacher is None:
            return batch
        scored, self._scored = self._scored, None
        rewards = (scored.rewards_per_func * self.reward_weights.to(scored.rewards_per_func.device)).nansum(dim=1)
        rewards[torch.isnan(scored.rewards_per_func).all(dim=1)] = torch.nan  # unscorable: never correct
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        routes = route_rollouts(rewards, num_generations, self.args.success_reward_threshold, self.args.routing)
        if self.log_completions:  # extra columns of the completions table: what each rollout was trained with
            labels, siblings = route_labels(routes, num_generations)
            self._logs["extra"]["route"].extend(labels)
            self._logs["extra"]["teacher_sibling"].extend(siblings)
        start = self.accelerator.process_index * len(scored.prompts)
        local = slice(start, start + len(scored.prompts))
        batch.update(self._score_with_teacher(batch, scored, routes, local, mode))
        return batch

    def _score_with_teacher(self, batch, scored: _ScoredRollouts, routes: Routes, local: slice, mode: str) -> dict:
        """Teacher statistics for this process's routed rows: what the loss needs is cached on the trainer
        (`_TeacherCache`); the batch gets per-token tensors (an index into the cache, the entropy weights)."""
        mask = _loss_mask(batch)
        rows = routes.needs_teacher[local].nonzero().squeeze(1).tolist()
        teacher_prompts, truncated = self._teacher_prompts(scored, routes, local, rows)
        cache_index, teacher_token_logps, entropy, seconds = self._run_teacher(
            batch, mask, rows, teacher_prompts, routes, mode
        )

        sdpo_tokens = mask & routes.sdpo[local].unsqueeze(1)
        teacher_tokens = mask & routes.needs_teacher[local].unsqueeze(1)
        if self.args.dynamic_weighting:
            weights = teacher_entropy_weights(entropy, sdpo_tokens, self.args.weighting_temperature, self._all_reduce)
        else:
            weights = sdpo_tokens.float()
        self._log_routing(mode, routes, mask, sdpo_tokens, teacher_tokens, entropy, weights, truncated, seconds)
        self._log_teacher_disagreement(mode, sdpo_tokens, teacher_token_logps)

        if self.args.routing == "advantage_mix":
            old_token_logps = batch.get("old_per_token_logps")
            if old_token_logps is None:  # GRPOTrainer skips them when π_old is the policy being trained
                old_token_logps = self._policy_token_logps(batch, mode)
            advantages = mixed_token_advantages(
                batch["advantages"],
                teacher_token_logps,
                old_token_logps,
                routes.needs_teacher[local],
                self.args.advantage_mix_lambda,
            )
            return {"advantages": advantages * mask}
        grpo_weights = self._grpo_weights(routes, local)
        return {
            # GRPOTrainer's loss then trains exactly the rows with a GRPO weight: the others carry no advantage.
            "advantages": batch["advantages"] * grpo_weights,
            "srpo_grpo_mask": grpo_weights > 0,
            "srpo_sdpo_mask": routes.sdpo[local],
            "srpo_teacher_index": cache_index,
            "srpo_token_weights": weights,
        }

    def _grpo_weights(self, routes: Routes, local: slice) -> torch.Tensor:
        """The share of its GRPO advantage each of this process's rows trains with: 1 on GRPO's branch, and
        `routed_grpo_weight` on the routed rows (0, the paper's: they carry the distillation term alone)."""
        return routes.grpo[local].float() + self.args.routed_grpo_weight * routes.sdpo[local].float()

    def _teacher_prompts(self, scored: _ScoredRollouts, routes: Routes, local: slice, rows: list[int]):
        """Token ids of each routed row's teacher prompt (SPEC §3), and which rows had their demonstration cut."""
        truncated = torch.zeros(len(scored.prompts), dtype=torch.bool, device=self.accelerator.device)
        teacher_prompts = []
        if not routes.needs_teacher.any():  # nothing routed on any process (`routes` is global): no collective
            return teacher_prompts, truncated
        every_completion = gather_object(scored.completion_ids)  # siblings may sit on other processes
        for row in rows:
            sibling = every_completion[routes.sibling[local][row]]
            demonstration = demonstration_from_completion(
                self.processing_class.decode(sibling, skip_special_tokens=True)
            )
            ids, truncated[row] = fit_teacher_prompt(
                scored.prompts[row],
                demonstration,
                functools.partial(self._tokenize_one_prompt, row=row),
                self.args.max_teacher_prompt_length,
                feedback=None if scored.feedback is None else scored.feedback[row],
            )
            teacher_prompts.append(ids)
        return teacher_prompts, truncated

    def _run_teacher(self, batch, mask, rows: list[int], teacher_prompts, routes: Routes, mode: str):
        """Teacher passes over the routed `rows`, a few rows at a time (none when nothing is routed). Caches what the
        loss needs; returns, per token of the batch, the cache index (-1 off the routed rows), the teacher's
        sampled-token log-prob and entropy, and the seconds the passes took (SPEC §9's `srpo/time/teacher_s`).
        Per-token tensors survive GRPOTrainer's shuffle and split of the batch; the cache holds routed tokens only."""
        device = mask.device
        cache_index = torch.full(mask.shape, -1, dtype=torch.int32, device=device)
        teacher_token_logps = torch.zeros(mask.shape, device=device)
        entropy = torch.zeros_like(teacher_token_logps)
        hidden, log_normalizer, logits = [], [], None
        started = time.perf_counter()
        chunks = self._row_chunks(rows, mode)
        for chunk in chunks:
            index = torch.tensor([rows[i] for i in chunk], dtype=torch.long, device=device)
            chunk_hidden, chunk_normalizer, chunk_token_logps, chunk_entropy, logits = self._score_rows(
                batch, index, mask[index], [teacher_prompts[i] for i in chunk]
            )
            chunk_rows, positions = mask[index].nonzero(as_tuple=True)
            start = sum(len(h) for h in hidden)
            cache_index[index[chunk_rows], positions] = torch.arange(
                start, start + len(positions), dtype=torch.int32, device=device
            )
            teacher_token_logps[index[chunk_rows], positions] = chunk_token_logps
            entropy[index[chunk_rows], positions] = chunk_entropy
            hidden.append(chunk_hidden)
            log_normalizer.append(chunk_normalizer)
        # ZeRO-3 gathers each layer's weights from all processes as it runs them: a process with fewer routed rows
        # keeps in step with passes over a dummy row whose tokens are all masked out. Their empty results keep the
        # cache's shapes on a process without routed rows.
        for _ in range(self._max_row_chunks(routes, mode) - len(chunks) if self._dist.is_zero3 else 0):
            index = torch.zeros(1, dtype=torch.long, device=device)
            dummy_hidden, dummy_normalizer, _, _, logits = self._score_rows(
                batch, index, torch.zeros_like(mask[index]), [[self._tokenizer.pad_token_id]]
            )
            hidden.append(dummy_hidden)
            log_normalizer.append(dummy_normalizer)
        seconds = time.perf_counter() - started
        if self.args.routing != "advantage_mix" and hidden:  # advantage_mix does not distil
            self._teacher_cache[mode] = _TeacherCache(
                torch.cat(hidden),
                torch.cat(log_normalizer),
                self._teacher_head(snapshot=mode == "train" and not self._scored_by_current_teacher),
                logits,
            )
        return cache_index, teacher_token_logps, entropy, seconds

    @property
    def _scored_by_current_teacher(self) -> bool:
        """Whether every loss step on a generation batch sees the teacher (and the policy) of its scoring: true
        when the batch is used within one optimizer step, as GRPOTrainer decides when it skips `old_per_token_logps`."""
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) == 0

    def _teacher_head(self, snapshot: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head (weight, bias) for the loss: the live parameters, or a copy when the EMA will
        move them before the loss has used this batch (several optimizer steps per generation batch)."""
        with self.teacher.active() as teacher_model:
            _, head = backbone_and_head(teacher_model)
        if not snapshot:
            return head.weight, head.bias
        with maybe_gather_lm_head_ctx(head.weight, head.bias):  # a collective under ZeRO-3: every process calls
            return head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone()

    @torch.no_grad()
    def _policy_token_logps(self, batch, mode: str) -> torch.Tensor:
        """The policy's log-probs of the sampled tokens, computed as GRPOTrainer computes `old_per_token_logps`."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
                batch["completion_ids"].size(1),
                batch_size=self._rows_per_pass(mode),
            )
        return logps

    def _tokenize_one_prompt(self, prompt, row: int) -> list[int]:
        """GRPOTrainer's own prompt tokenization (the same chat template and `chat_template_kwargs` as the student)
        of a prompt for this process's batch row `row`: with `environment_factory`, rendered with that row's tools."""
        environments = getattr(self, "_batch_environments", None)
        if self.environment_factories is None or environments is None:
            return list(self._tokenize_prompts([prompt])[0][0])
        self._batch_environments = [environments[row]]  # GRPOTrainer pairs prompts with these, one per prompt
        try:
            return list(self._tokenize_prompts([prompt])[0][0])
        finally:
            self._batch_environments = environments

    def _rows_per_pass(self, mode: str) -> int:
        return self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

    def _row_chunks(self, rows: list[int], mode: str) -> list[range]:
        size = self._rows_per_pass(mode)
        return [range(start, min(start + size, len(rows))) for start in range(0, len(rows), size)]

    def _max_row_chunks(self, routes: Routes, mode: str) -> int:
        """The most teacher passes any process makes (`routes` is global, so every process knows them all)."""
        most_rows = routes.needs_teacher.view(self.accelerator.num_processes, -1).sum(dim=1).max().item()
        return -(-most_rows // self._rows_per_pass(mode))

    def _score_rows(self, batch, index: torch.Tensor, row_mask: torch.Tensor, teacher_prompts: list[list[int]]):
        """The teacher's final hidden states, log-normaliser, sampled-token log-probs and entropy at `row_mask`'s
        tokens of the batch rows `index`, seeing `teacher_prompts` before the same completions; and the `Logits`
        they were computed with."""
        device = self.accelerator.device
        teacher_ids = [torch.tensor(ids) for ids in teacher_prompts]
        with self.teacher.active() as teacher_model, self.accelerator.autocast():
            hidden, head = self._completion_hidden_states(
                teacher_model,
                pad(teacher_ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
                pad([torch.ones_like(ids) for ids in teacher_ids], padding_value=0, padding_side="left").to(device),
                batch["completion_ids"][index],
                batch["completion_mask"][index],
            )
            hidden = hidden[row_mask]
            tokens = batch["completion_ids"][index][row_mask]
            logits = self._logits(hidden)
            statistics = teacher_statistics(hidden, head.weight, head.bias, logits, tokens)
        return hidden, *statistics, logits

    @torch.no_grad()
    def _completion_hidden_states(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """Final hidden states predicting each completion token `(rows, C, hidden)`, and the model's LM head.

        The pass goes through the model's top-level forward (under ZeRO-3, DeepSpeed's prefetching follows the
        top-level module's hooks), builds no KV cache and projects no logits: the hidden states are taken at the
        backbone's output, and the loss projects only the rows it needs."""
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
        with self._capture_hidden_states(model) as captured:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=no_logits)
        start = prompt_ids.size(1) - 1
        return captured[-1][:, start : start + completion_ids.size(1)], backbone_and_head(model)[1]

    def _logits(self, hidden: torch.Tensor) -> Logits:
        """How GRPOTrainer's fused LM head turns this model's `hidden` states into the sampling distribution's logits
        in the current autocast context: SRPO's log-probs are then GRPOTrainer's, in bf16 as in fp32."""
        if self.args.cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
        else:
            dtype = hidden.dtype
        return Logits(dtype, self.temperature, *self._logit_scale_and_softcap)

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if op == "max":
            return self.accelerator.gather(tensor).max().reshape(1)
        return self.accelerator.reduce(tensor, reduction="sum")

    def _log_routing(self, mode, routes, mask, sdpo_tokens, teacher_tokens, entropy, weights, truncated, seconds):
        metrics = self._metrics[mode]
        metrics["srpo/route/sdpo_frac"].append(routes.sdpo.float().mean().item())
        metrics["srpo/route/correct_frac"].append(routes.correct.float().mean().item())
        metrics["srpo/route/fallback_frac"].append(routes.fallback.float().mean().item())
        metrics["srpo/teacher_available_frac"].append(routes.teacher_available.float().mean().item())
        totals = self._all_reduce(
            torch.stack(
                [
                    sdpo_tokens.sum(),
                    mask.sum(),
                    (entropy * teacher_tokens).sum(),
                    teacher_tokens.sum(),
                    truncated.sum(),
                ]
            ).float(),
            "sum",
        ).tolist()
        sdpo_count, token_count, entropy_sum, teacher_count, truncated_count = totals
        teacher_rows = routes.needs_teacher.sum().item()
        metrics["srpo/sdpo_token_frac"].append(sdpo_count / max(token_count, 1.0))
        metrics["srpo/teacher_entropy/mean"].append(entropy_sum / teacher_count if teacher_count else float("nan"))
        metrics["srpo/teacher_prompt_truncated_frac"].append(
            truncated_count / teacher_rows if teacher_rows else float("nan")
        )
        selected = weights[sdpo_tokens]
        extremes = torch.stack(
            [
                -selected.min() if selected.numel() else torch.tensor(-torch.inf, device=weights.device),
                selected.max() if selected.numel() else torch.tensor(-torch.inf, device=weights.device),
            ]
        )
        extremes = self.accelerator.gather(extremes.unsqueeze(0)).max(dim=0).values.tolist()
        metrics["srpo/weight/min"].append(-extremes[0] if sdpo_count else float("nan"))
        metrics["srpo/weight/max"].append(extremes[1] if sdpo_count else float("nan"))
        metrics["srpo/time/teacher_s"].append(
            self.accelerator.gather(torch.tensor([seconds], device=mask.device)).max().item()
        )

    def _log_teacher_disagreement(self, mode, sdpo_tokens: torch.Tensor, teacher_token_logps: torch.Tensor) -> None:
        """`srpo/teacher_rejects_sampled_frac`: the share of distilled tokens to which the teacher gives less than half
        its probability. Elsewhere the sampled token is the teacher's top-1 and the distillation mostly sharpens what
        the student already does; these tokens are where it moves the student off what it sampled (for a teacher as
        confident as the paper's, about where its top-1 differs from the sampled token). From the teacher's
        log-probs of the sampled tokens, which scoring computes anyway."""
        rejected = sdpo_tokens & (teacher_token_logps < math.log(0.5))
        counts = self._all_reduce(torch.stack([rejected.sum(), sdpo_tokens.sum()]).float(), "sum").tolist()
        self._metrics[mode]["srpo/teacher_rejects_sampled_frac"].append(
            counts[0] / counts[1] if counts[1] else float("nan")
        )

    # ---- loss time: one per-token loss, GRPO's term on GRPO rows and the distillation term on SDPO rows ----

    def _compute_loss(self, model, inputs):
        if "srpo_token_weights" not in inputs:  # routing="grpo" or "advantage_mix": GRPOTrainer's loss as is
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mask = _loss_mask(inputs)
        grpo_rows, sdpo_rows = inputs["srpo_grpo_mask"], inputs["srpo_sdpo_mask"]
        grpo_tokens = mask & grpo_rows.unsqueeze(1)
        # GRPOTrainer's loss sees GRPO tokens only (through its `tool_mask`), so that its other per-token terms (the
        # reference KL, the entropy bonus) and the statistics that choose tokens (entropy quantiles) act on GRPO
        # tokens alone: a routed rollout carries one signal, the distillation term (SPEC §12).
        grpo_inputs = {**inputs, "tool_mask": grpo_tokens.to(inputs["completion_mask"].dtype)}
        policy = self.accelerator.unwrap_model(model)
        with self._capture_hidden_states(policy) as captured, self._head_scores_only(policy, grpo_rows):
            grpo_loss = super()._compute_loss(model, grpo_inputs)
        if self.loss_type in LOCAL_TOKEN_LOSS_TYPES:  # bnpo divided by the GRPO tokens; SRPO shares all of them
            grpo_loss = grpo_loss * (grpo_tokens.sum().clamp(min=1) / mask.sum().clamp(min=1))
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1  # per-step share, see SPEC §9
        self._metrics[mode]["srpo/loss/grpo"].append(self.accelerator.gather(grpo_loss.detach()).mean().item() * scale)
        # Under ZeRO-3 the distillation gathers the LM heads, a collective: every process joins, routed rows or not
        # (the cache exists on every process or on none: routing is global).
        cache = self._teacher_cache[mode]
        distillation_loss = torch.zeros((), device=grpo_loss.device)
        if cache is not None and (sdpo_rows.any() or self._dist.is_zero3):
            sdpo_tokens = mask & sdpo_rows.unsqueeze(1)
            hidden = captured[0] if len(captured) == 1 else torch.cat(captured)  # one forward unless GRPO chunked it
            token_losses = self._distillation_token_losses(policy, hidden, inputs, sdpo_tokens, cache)
            per_token = torch.zeros(mask.shape, dtype=token_losses.dtype, device=mask.device)
            distillation_loss = aggregate_token_loss(
                per_token.masked_scatter(sdpo_tokens, token_losses),
                mask,
                self.loss_type,
                self.current_gradient_accumulation_steps if mode == "train" else 1,
                self.max_completion_length,
                self._token_normalizer(inputs, mode),
            )
        if mode == "eval":  # one loss per scored eval batch: do not hold its teacher states through training
            self._teacher_cache["eval"] = None
        self._metrics[mode]["srpo/loss/sdpo"].append(
            self.accelerator.gather(distillation_loss.detach().float()).mean().item() * scale
        )
        return grpo_loss + distillation_loss

    @contextmanager
    def _capture_hidden_states(self, model):
        """Keep the backbone's final hidden states of `model`'s forward passes (for the policy, the one GRPOTrainer's
        loss runs anyway)."""
        captured = []
        backbone, _ = backbone_and_head(model)
        handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            yield captured
        finally:
            handle.remove()

    @contextmanager
    def _head_scores_only(self, policy, rows: torch.Tensor):
        """GRPOTrainer's fused LM head scores only `rows` (the others' labels become -100): on GPU, TRL's kernel then
        skips the distilled rows' vocabulary work, which the distillation does itself."""
        offset = 0

        def drop_labels(module, args, kwargs):
            nonlocal offset
            labels = kwargs.get("labels")
            if not kwargs.get("fused_lm_head") or labels is None:
                return None
            keep = rows[offset : offset + labels.size(0)]
            offset += labels.size(0)
            return args, {**kwargs, "labels": labels.masked_fill(~keep.unsqueeze(1), -100)}

        handle = causal_lm(policy).register_forward_pre_hook(drop_labels, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _distillation_token_losses(self, policy, hidden, inputs, sdpo_tokens, cache: _TeacherCache) -> torch.Tensor:
        """`w_t · IS_t · D_t` at this micro-batch's SDPO tokens, in row-major order (SPEC §5), differentiable through
        `hidden`."""
        start = inputs["prompt_ids"].size(1) - 1
        hidden = hidden[:, start : start + inputs["completion_ids"].size(1)][sdpo_tokens]
        _, head = backbone_and_head(policy)

        def select(name):
            return inputs[name][sdpo_tokens]

        with self.accelerator.autocast():
            support, support_logps, token_logps = student_topk_logps(
                hidden,
                head.weight,
                head.bias,
                self._logits(hidden),
                select("completion_ids"),
                self.args.distillation_topk,
            )
        at = select("srpo_teacher_index").long()
        teacher_support_logps = logps_on_support(
            cache.hidden[at], *cache.head, cache.logits, cache.log_normalizer[at], support
        )
        divergence = topk_distillation_divergence(support_logps, teacher_support_logps, self.args.distillation_alpha)
        # π_old as GRPOTrainer has it: computed at generation when the policy has moved since, else this policy.
        old_logps = token_logps.detach() if "old_per_token_logps" not in inputs else select("old_per_token_logps")
        ratio = clipped_importance_ratio(token_logps, old_logps, self.args.distillation_is_clip)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = ratio * inputs["importance_sampling_ratio"].expand_as(sdpo_tokens)[sdpo_tokens]
        return sdpo_token_losses(divergence, select("srpo_token_weights"), ratio)

    def _token_normalizer(self, inputs, mode: str) -> torch.Tensor:
        # GRPOTrainer's token-count normaliser for loss_type "dapo"/"cispo"/"vespo": the generation batch's valid
        # tokens (all processes), per process and per micro-batch. test_trainer's accumulation test guards the match.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    # ---- the teacher is training state ----

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Under ZeRO-3 every process holds (and saves) its own shards of the teacher.
        if self.teacher is not None and (self.args.should_save or self._dist.is_zero3):
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            save_file(self.teacher.state_dict(), self._teacher_state_path(folder))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.teacher is None or checkpoint is None:
            return
        path = self._teacher_state_path(checkpoint)
        if not os.path.exists(path):
            warnings.warn(
                f"{checkpoint} holds no SRPO teacher state {os.path.basename(path)} (a ZeRO-3 checkpoint resumes with "
                "as many processes as saved it); the teacher keeps the initial weights of the model given to the trainer.",
                stacklevel=2,
            )
            return
        self.teacher.load_state_dict({name: t.to(self.accelerator.device) for name, t in load_file(path).items()})

    def _teacher_state_path(self, folder: str) -> str:
        if not self._dist.is_zero3:
            return os.path.join(folder, TEACHER_STATE_FILE)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return os.path.join(folder, TEACHER_STATE_FILE.replace(".safetensors", f"-rank{rank}-of-{world}.safetensors"))

    def _save(self, output_dir=None, state_dict=None):
        # `save_model` and `push_to_hub` write the policy: the teacher is training state, kept by `_save_checkpoint`.
        with self.teacher.policy_only_saving() if self.teacher is not None else nullcontext():
            super()._save(output_dir, state_dict)

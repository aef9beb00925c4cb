"""`SRPOTrainer`: GRPOTrainer with per-rollout routing to self-distillation from an EMA self-teacher.

The glue, at GRPOTrainer's extension points:
- `_calculate_rewards` keeps what routing needs (prompts, completion ids, rewards of the whole batch) and refuses
  infinite rewards;
- `_generate_and_score_completions` routes the batch, runs the teacher on the routed rows only, keeps its hidden
  states and log-normalisers of their tokens (`_TeacherCache`), and attaches per-token tensors (an index into
  that cache, the entropy weights) that GRPOTrainer then shuffles and splits into micro-batches;
- `_compute_loss` builds one per-token loss: GRPOTrainer's own loss on the GRPO tokens (the only tokens its loss mask
  then holds, so its KL, entropy bonus and entropy quantiles skip distilled rows), plus the distillation term on the
  SDPO tokens, computed from the same forward pass's hidden states (the student's top-k support is picked there, so
  the student needs no pass of its own at scoring), reduced as GRPOTrainer reduces its loss for `loss_type`;
- checkpoints carry the teacher's fp32 state (`checkpointing.TeacherCheckpointing`: per-process shards under DeepSpeed
  ZeRO-3 and FSDP2); a PEFT policy's `save_pretrained` writes the student's adapter alone (`save_model`, `push_to_hub`).
Under ZeRO-3 and FSDP2 weights are gathered collectively, so every process makes as many teacher passes and LM-head
uses as the busiest one (docs/scaling.md). The math lives in `routing.py`, `prompts.py`, `losses.py` and `vocab.py`.
"""

import copy
import functools
import inspect
import math
import os
import shutil
import textwrap
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from accelerate.utils import gather_object
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from datasets import Dataset
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache, cache_utils
from trl import GRPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import utils as trl_utils
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from .checkpointing import TeacherCheckpointing
from .compat import quiet_trl_checkpointing_calls
from .config import SRPOConfig
from .diagnostics import threshold_misfit
from .evaluation import bind_evaluation_callbacks
from .losses import (
    LOCAL_TOKEN_LOSS_TYPES,
    aggregate_token_loss,
    clipped_importance_ratio,
    mixed_token_advantages,
    sdpo_token_losses,
    teacher_entropy_weights,
    topk_distillation_divergence,
)
from .prompts import demonstration_from_completion, fit_teacher_prompt, prompt_column_problem
from .rewards import checked_reward_function
from .routing import Routes, route_labels, route_rollouts, siblings_to_share
from .teacher import (
    SelfTeacher,
    SelfTeacherCallback,
    backbone_and_head,
    causal_lm,
    context_length,
    has_length_dependent_rope,
    is_peft,
    local_part,
    reset_dynamic_rope,
    shared_prefix_plan,
    unique_prefixes,
)
from .vllm_cpu import check_cpu_vllm_settings, use_cpu_weight_sync
from .vocab import Logits, logit_scale_and_softcap, logps_on_support, student_topk_logps, teacher_statistics

FEEDBACK_COLUMN = "feedback"  # the `log_extra` column reward functions write feedback to (`teacher_feedback`)
ROUTING_WATCH_BATCHES = 5  # training generation batches after which routing that never distils is reported


def _fsdp_version(args) -> int | None:
    """The FSDP version this run asks for (`fsdp`/`fsdp_config` in the arguments, or an Accelerate FSDP config under
    `accelerate launch`), None without FSDP."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if not (args.fsdp or from_launcher):
        return None
    config = args.fsdp_config or {}
    return int(config.get("version", config.get("fsdp_version", os.environ.get("FSDP_VERSION", 2))))


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
class _Prefix:
    """A batch of teacher prompts after their pass: its keys and values, attention mask and last hidden states."""

    cache: object
    attention_mask: torch.Tensor
    last_hidden: torch.Tensor


_NO_LOGITS = torch.empty(0, dtype=torch.long)  # `logits_to_keep` that projects no position


class _NoPositions(torch.nn.Module):
    """Stands in for a causal LM's head in passes that project no position (`logits_to_keep=_NO_LOGITS`): `(…, 0,
    vocab)` logits, without the head's module call. Under ZeRO-3 that call alone gathers the whole head from every
    process (its forward hook does, whatever the number of positions: 1.24 GB for Qwen3-8B in bf16, per teacher pass)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], self.vocab_size)  # no memory, whatever the positions


@contextmanager
def _head_not_called(model):
    """`model`'s LM head replaced by `_NoPositions` for the teacher's passes (the statistics use its weights, gathered
    once per call, `vocab.teacher_statistics`); the model's top-level forward still runs, whose module order ZeRO-3's
    prefetching follows."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    name = next(name for name, module in lm.named_modules() if module is head)
    parent_name, _, attribute = name.rpartition(".")
    parent = lm.get_submodule(parent_name)
    setattr(parent, attribute, _NoPositions(getattr(head, "out_features", None) or head.weight.size(0)))
    try:
        yield
    finally:
        setattr(parent, attribute, head)


def is_grpo_token_statistic(key: str) -> bool:
    """Whether GRPOTrainer 1.16 logs metric `key` as a statistic over the tokens of its loss mask."""
    return key in ("entropy", "kl", "cispo_clip_ratio") or key.startswith(("clip_ratio/", "vespo/"))


def cache_rows(cache, rows: torch.Tensor):
    """A cache holding the batch `rows` of `cache`, which stays as it was (for the next chunk of continuations).
    Shallow copies of the cache and its layers: selecting rows makes new key/value tensors (advanced indexing) and a
    continuation appends to the copy's, so only the selected rows are copied, never the whole prefix cache (a deep
    copy was ~5.6 GiB per chunk at the Qwen3-8B recipe's sizes)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


@dataclass
class _ScoredRollouts:
    """What `_calculate_rewards` saw: this process's prompts and completions (and the rewards' feedback on them, with
    `teacher_feedback`), and every process's rewards."""

    prompts: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor
    feedback: list[str | None] | None = None


@dataclass
class _RoutingWatch:
    """What the first training batches' routing saw (`SRPOTrainer._watch_routing`): the rewards it compared and which
    counted as correct, batch by batch."""

    rewards: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)
    distilled: list[torch.Tensor] = field(default_factory=list)


class SRPOTrainer(TeacherCheckpointing, GRPOTrainer):
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
                f"SRPOTrainer needs an SRPOConfig, got {type(args).__name__}; convert it with "
                "SRPOConfig.from_grpo_config(your_config), which keeps what you set and takes SRPO's defaults for "
                "the rest (pass routing='grpo' for plain GRPO)."
            )
        if args.routing != "grpo" and _fsdp_version(args) == 1:  # before the model loads and vLLM starts
            raise NotImplementedError(
                f"routing={args.routing!r} needs SRPO's self-teacher, which supports FSDP2, not FSDP1: set "
                "fsdp_version: 2 in the accelerate config (accelerate_configs/fsdp2.yaml), or use DeepSpeed "
                "(accelerate_configs/zero3.yaml)."
            )
        check_cpu_vllm_settings(args)  # before GRPOTrainer starts vLLM: the CPU backend has no sleep mode
        quiet_trl_checkpointing_calls()
        super().__init__(model, reward_funcs, args=args, **kwargs)
        bind_evaluation_callbacks(self)  # evaluation callbacks given in `callbacks=[...]` need the trainer
        use_cpu_weight_sync(self)  # vLLM colocate on a CPU engine: weight sync through vLLM's reload path
        self.teacher = None
        self._teacher_cache: dict[str, _TeacherCache | None] = {"train": None, "eval": None}
        self._routing_watch = _RoutingWatch()
        self._warned: set[str] = set()  # keys of the warnings given once
        self.reward_funcs = [
            checked_reward_function(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        self._check_prompts(teacher=args.routing != "grpo")
        if args.routing == "grpo":
            return
        vocab_size = causal_lm(self.model).config.get_text_config().vocab_size
        if args.distillation_topk > vocab_size:
            raise ValueError(
                f"SRPOConfig.distillation_topk={args.distillation_topk} exceeds the model's vocabulary "
                f"({vocab_size}); set distillation_topk <= {vocab_size}."
            )
        self._refuse_inexact_setups()
        self._context_length = context_length(self.model)
        if self._context_length is not None and args.max_teacher_prompt_length > self._context_length:
            warnings.warn(
                f"SRPOConfig.max_teacher_prompt_length={args.max_teacher_prompt_length} exceeds the model's context "
                f"({self._context_length} positions): a teacher prompt gets at most the context minus its batch's "
                "completion length, its demonstration cut to fit, and rollouts whose teacher prompt cannot fit are "
                "trained as if no sibling were correct. Set max_teacher_prompt_length <= "
                f"{self._context_length - args.max_completion_length} to say so explicitly.",
                stacklevel=2,
            )
        self._logit_scale_and_softcap = logit_scale_and_softcap(causal_lm(self.model).config)
        # transformers 5.18 renamed the forward's `past_key_values` to `cache`
        forward = inspect.signature(type(causal_lm(self.model)).forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self.teacher = self._build_teacher()
        self.add_callback(SelfTeacherCallback(self))

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        bind_evaluation_callbacks(self)

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

    def _check_prompts(self, teacher: bool) -> None:
        """Every row of map-style datasets has a prompt GRPOTrainer can render and, with a `teacher`, one the teacher
        prompt can rewrite (method §3 rewrites the last user turn): found now, column-wise (fast on millions of
        rows), not when a rollout of theirs is first met, maybe hours in. Streamed datasets are met at routing."""
        named = {"train_dataset": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            named.update({f"eval_dataset[{key!r}]": dataset for key, dataset in self.eval_dataset.items()})
        else:
            named["eval_dataset"] = self.eval_dataset
        for name, dataset in named.items():
            columns = getattr(dataset, "column_names", None)  # None: a stream that does not know them
            if columns is not None and "prompt" not in columns:
                raise ValueError(
                    f"{name} has no 'prompt' column (its columns: {columns}): GRPOTrainer and SRPO read each row's "
                    "question from it. Rename the question's column (dataset.rename_column('question', 'prompt')) "
                    "or map each row to a 'prompt'."
                )
            if not isinstance(dataset, Dataset):
                continue
            if len(dataset) == 0:
                raise ValueError(f"{name} has no rows: check the split and any filter applied to it.")
            found = prompt_column_problem(
                dataset.select_columns(["prompt"]).with_format("arrow")[:]["prompt"], teacher
            )
            if found is not None:
                raise ValueError(f"{name} row {found[0]}: {found[1]}")

    def _build_teacher(self) -> SelfTeacher:
        # `self.model` is not wrapped yet (Accelerate/DeepSpeed wrap it in `train()`), so a PEFT teacher adapter
        # added now is partitioned and placed with the policy's own weights.
        policy, rate = self.model, self.args.teacher_update_rate
        if is_peft(policy):
            return SelfTeacher(policy, rate)
        if self._dist.is_fsdp:  # a whole copy until Accelerate has sharded the policy: `shard_teacher_like_policy`
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

    def shard_teacher_like_policy(self) -> None:
        """FSDP2: shard the (whole-copy) teacher as Accelerate sharded the policy, then take the policy's own shards,
        right on every process whatever the loading (`cpu_ram_efficient_loading` loads on the main process only).
        Runs once, after Accelerate prepared the policy (a resume, or the start of training); with PEFT the teacher
        is an adapter the policy's sharding already covers."""
        if self.teacher is None or self.teacher.peft or not self._dist.is_fsdp:
            return
        if isinstance(self.teacher.model, FSDPModule):
            return
        teacher = fsdp2_prepare_model(self.accelerator, self.teacher.model)
        policy = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for teacher_weight, weight in zip(teacher.parameters(), policy.parameters(), strict=True):
                local_part(teacher_weight).copy_(local_part(weight))
        self.teacher.model = teacher

    @property
    def _sharded(self) -> bool:
        """Whether weights are sharded across processes (ZeRO-3, FSDP2): forward passes and LM-head gathers are then
        collectives, which every process makes alike."""
        return self._dist.is_zero3 or self._dist.is_fsdp

    # ---- generation time: route, then score the routed rows with the teacher ----

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._refuse_infinite_rewards(rewards_per_func)
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

    def _refuse_infinite_rewards(self, rewards_per_func: torch.Tensor) -> None:
        """method §12: None/NaN means unscorable; any other non-finite reward is an error. With `scale_rewards="none"`
        an infinite reward makes its group's advantages NaN, and one step turns the policy and the teacher to NaN.
        The rewards are every process's (gathered), so every process raises alike."""
        infinite = torch.isinf(rewards_per_func)
        if not infinite.any():
            return
        row, column = infinite.nonzero()[0].tolist()
        raise ValueError(
            f"The reward function '{self.reward_func_names[column]}' returned {rewards_per_func[row, column].item()} "
            f"(for {int(infinite[:, column].sum())} of {len(rewards_per_func)} completions of this batch): SRPO needs "
            "finite rewards. Return None for a completion that cannot be scored, or bound the reward."
        )

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
        self._watch_routing(routes, rewards, mode)
        start = self.accelerator.process_index * len(scored.prompts)
        local = slice(start, start + len(scored.prompts))
        batch.update(self._score_with_teacher(batch, scored, routes, local, mode))
        return batch

    def _score_with_teacher(self, batch, scored: _ScoredRollouts, routes: Routes, local: slice, mode: str) -> dict:
        """Teacher statistics for this process's routed rows: what the loss needs is cached on the trainer
        (`_TeacherCache`); the batch gets per-token tensors (an index into the cache, the entropy weights)."""
        mask = _loss_mask(batch)
        teacher_prompts, truncated, routes = self._teacher_prompts(scored, routes, local, mode)
        self._log_route_labels(routes, mode)
        rows = routes.needs_teacher[local].nonzero().squeeze(1).tolist()
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

    def _teacher_prompts(self, scored: _ScoredRollouts, routes: Routes, local: slice, mode: str):
        """Token ids of each routed row's teacher prompt (method §3), which rows had their demonstration cut, and the
        routes, where rows whose prompt leaves no room for any of the demonstration no longer need the teacher."""
        truncated = torch.zeros(len(scored.prompts), dtype=torch.bool, device=self.accelerator.device)
        no_room = torch.zeros_like(truncated)
        teacher_prompts = []
        if not routes.needs_teacher.any():  # nothing routed on any process (`routes` is global): no collective
            return teacher_prompts, truncated, routes
        # A sibling may sit on another process: only those some process needs from another cross.
        shared = {}
        to_share = siblings_to_share(routes, self.accelerator.num_processes)
        if to_share:
            mine = {i: scored.completion_ids[i - local.start] for i in to_share if local.start <= i < local.stop}
            for part in gather_object([mine]):
                shared.update(part)
        # A group's routed rows share one teacher prompt (the question, the same sibling): built once. Not with
        # feedback (each row's own) nor tool environments (each row's own tools and observation).
        built = {}
        budget = self._teacher_prompt_budget(max(map(len, scored.completion_ids), default=0))
        for row in routes.needs_teacher[local].nonzero().squeeze(1).tolist():
            index = routes.sibling[local][row].item()
            key = index if scored.feedback is None and self.environment_factories is None else (index, row)
            if key not in built:
                sibling = (
                    scored.completion_ids[index - local.start] if local.start <= index < local.stop else shared[index]
                )
                demonstration = demonstration_from_completion(
                    self.processing_class.decode(sibling, skip_special_tokens=True)
                )
                try:
                    fitted = fit_teacher_prompt(
                        scored.prompts[row],
                        demonstration,
                        functools.partial(self._tokenize_one_prompt, row=row),
                        budget,
                        feedback=None if scored.feedback is None else scored.feedback[row],
                    )
                except ValueError as error:  # a streamed dataset's prompt: its rows are met here, not at construction
                    raise ValueError(
                        f"A prompt of the {mode} dataset, {scored.prompts[row]!r:.200}: {error}"
                    ) from error
                built[key] = (demonstration, *fitted)
            demonstration, ids, kept = built[key]
            # Over the setting, a prompt without its demonstration is a teacher that never saw the answer; over the
            # context, the model cannot score it at all.
            past_context = budget < self.args.max_teacher_prompt_length and len(ids) > budget
            if (kept == 0 and demonstration) or past_context:
                no_room[row] = True
                self._warn_no_demonstration_room(len(ids), budget)
            else:
                truncated[row] = kept < len(demonstration)
                teacher_prompts.append(ids)
        return teacher_prompts, truncated, self._without_teacher_where_no_room(routes, no_room, mode)

    def _without_teacher_where_no_room(self, routes: Routes, no_room: torch.Tensor, mode: str) -> Routes:
        """`routes` with the rows whose teacher prompt has no room for the demonstration (`no_room`, this process's
        rows) treated as rows without a correct sibling: a teacher that never saw a correct answer has nothing to
        teach. `routing="srpo"` trains them by GRPO instead, `"sdpo"` leaves them out (as its rows without a
        teacher), `"advantage_mix"` gives them GRPO's advantage alone. Counted in `srpo/teacher_prompt_dropped_frac`.
        Routes are global, so every process learns every process's rows (a collective)."""
        dropped = self.accelerator.gather(no_room.to(torch.uint8)).bool()
        self._metrics[mode]["srpo/teacher_prompt_dropped_frac"].append(
            dropped.sum().item() / routes.needs_teacher.sum().item()
        )
        if not dropped.any():
            return routes
        needs_teacher = routes.needs_teacher & ~dropped
        return replace(
            routes,
            sdpo=routes.sdpo & ~dropped,
            grpo=routes.grpo | (routes.sdpo & dropped) if self.args.routing == "srpo" else routes.grpo,
            needs_teacher=needs_teacher,
            sibling=torch.where(needs_teacher, routes.sibling, -1),
        )

    def _teacher_prompt_budget(self, completion_length: int) -> int:
        """The longest teacher prompt of a batch whose completions are `completion_length` tokens long (padded): the
        setting, or less where the teacher prompt and the completion would pass the model's context."""
        if self._context_length is None:
            return self.args.max_teacher_prompt_length
        return min(self.args.max_teacher_prompt_length, self._context_length - completion_length)

    def _warn_no_demonstration_room(self, prompt_length: int, budget: int) -> None:
        consequence = (
            "Such rollouts are trained as if no sibling were correct (by GRPO under routing='srpo'), not distilled by "
            "a teacher that never saw the correct answer (counted in srpo/teacher_prompt_dropped_frac)."
        )
        if budget < self.args.max_teacher_prompt_length:
            self._warn_once(
                "no_context_room",
                f"The model's context ({self._context_length} positions) minus this batch's completions "
                f"({self._context_length - budget} tokens) leaves {budget} tokens for the teacher prompt, which takes "
                f"{prompt_length} tokens without its demonstration (its question, system turns and closing "
                f"instruction are never cut). {consequence} Use a model with a longer context, a shorter "
                "max_completion_length, or shorter prompts.",
            )
            return
        self._warn_once(
            "no_demonstration_room",
            f"max_teacher_prompt_length={self.args.max_teacher_prompt_length} leaves no room for the demonstration: "
            f"a teacher prompt takes {prompt_length} tokens without it (its question, system turns and closing "
            f"instruction are never cut). {consequence} Raise "
            f"max_teacher_prompt_length above {prompt_length} by a demonstration's length, or shorten the prompts.",
        )

    def _log_route_labels(self, routes: Routes, mode: str) -> None:
        """The completions table (`log_completions`): `route` and `teacher_sibling` columns say what each rollout
        was trained with (README, "Metrics"), and its `advantage` column keeps only the advantage a GRPO term trained
        with: NaN for a rollout with none (distilled, or in no branch)."""
        if not self.log_completions:
            return
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        labels, siblings = route_labels(routes, num_generations)
        self._logs["extra"]["route"].extend(labels)
        self._logs["extra"]["teacher_sibling"].extend(siblings)
        advantages = self._logs["advantages"]  # GRPOTrainer's, for this batch's rows last, in `routes`' order
        offset = len(advantages) - len(labels)
        for row, weight in enumerate(self._grpo_weights(routes, slice(None)).tolist()):
            if weight != 1.0:
                advantages[offset + row] = advantages[offset + row] * weight if weight else math.nan

    def _watch_routing(self, routes: Routes, rewards: torch.Tensor, mode: str) -> None:
        """Warn once when the first training batches show that `success_reward_threshold` does not fit the rewards
        (`diagnostics.threshold_misfit`: nothing correct, everything correct, or a threshold on another scale)."""
        watch = self._routing_watch
        if mode != "train" or watch is None:
            return
        watch.rewards.append(rewards.detach().cpu())
        watch.correct.append(routes.correct.cpu())
        watch.distilled.append(routes.sdpo.cpu())
        if len(watch.rewards) < ROUTING_WATCH_BATCHES:
            return
        self._routing_watch = None  # checked once
        message = threshold_misfit(
            torch.cat(watch.rewards),
            torch.cat(watch.correct),
            self.args.success_reward_threshold,
            len(watch.rewards),
            torch.cat(watch.distilled),
        )
        if message is not None and self.accelerator.is_main_process:  # every process sees the same global rewards
            warnings.warn(message, stacklevel=2)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _run_teacher(self, batch, mask, rows: list[int], teacher_prompts, routes: Routes, mode: str):
        """Teacher passes over the routed `rows` (none when nothing is routed): each distinct teacher prompt once, then
        the rows' completions from its cached keys and values, a few sequences per pass. Caches what the loss needs;
        returns, per token of the batch, the cache index (-1 off the routed rows), the teacher's sampled-token
        log-prob and entropy, and the seconds the passes took (method §9's `srpo/time/teacher_s`). Per-token tensors
        survive GRPOTrainer's shuffle and split of the batch; the cache holds routed tokens only."""
        device = mask.device
        cache_index = torch.full(mask.shape, -1, dtype=torch.int32, device=device)
        teacher_token_logps = torch.zeros(mask.shape, device=device)
        entropy = torch.zeros_like(teacher_token_logps)
        prefixes, prefix_of_row = unique_prefixes(teacher_prompts)
        plan = shared_prefix_plan(prefix_of_row, self._teacher_rows_per_pass(mode))
        shares = self._teacher_continues_from_cache
        passes = sum(int(shares) + len(row_chunks) for _, row_chunks in plan)
        # ZeRO-3 gathers each layer's weights from all processes as it runs them (and the LM head for the
        # statistics): every process makes as many passes as the busiest one, agreed on before any, and one
        # statistics call. `routes` is global: every process agrees whether anything is routed.
        lockstep = self._sharded and routes.needs_teacher.any()
        most = int(self.accelerator.gather(torch.tensor([passes], device=device)).max()) if lockstep else passes
        hidden, tokens = [], []
        started = time.perf_counter()
        with torch.no_grad(), self.teacher.active() as model, self.accelerator.autocast():
            with _head_not_called(model):  # the passes project no logits: no head call (ZeRO-3 gathers it)
                for prefix_batch, row_chunks in plan:
                    prefix = self._prefix_pass(model, [prefixes[p] for p in prefix_batch]) if shares else None
                    for chunk in row_chunks:
                        index = torch.tensor([rows[i] for i in chunk], dtype=torch.long, device=device)
                        continues = [prefix_batch.index(prefix_of_row[i]) for i in chunk]
                        chunk_rows, positions = mask[index].nonzero(as_tuple=True)
                        start = sum(len(h) for h in hidden)
                        cache_index[index[chunk_rows], positions] = torch.arange(
                            start, start + len(positions), dtype=torch.int32, device=device
                        )
                        if prefix is None:
                            chunk_hidden = self._whole_sequence_hidden(
                                model, [prefixes[prefix_of_row[i]] for i in chunk], batch, index
                            )
                        else:
                            chunk_hidden = self._continuation_hidden(model, prefix, continues, batch, index)
                        hidden.append(chunk_hidden[mask[index]])
                        tokens.append(batch["completion_ids"][index][mask[index]])
                for _ in range(most - passes):  # a one-token dummy prompt; its empty result keeps the cache's shapes
                    hidden.append(self._prefix_pass(model, [[self._tokenizer.pad_token_id]]).last_hidden[:0])
                    tokens.append(torch.zeros(0, dtype=torch.long, device=device))
            if hidden:
                hidden, tokens = torch.cat(hidden), torch.cat(tokens)
                logits = self._logits(hidden)
                _, head = backbone_and_head(model)
                log_normalizer, token_logps, token_entropy = teacher_statistics(
                    hidden, head.weight, head.bias, logits, tokens
                )
                scored = cache_index >= 0
                teacher_token_logps[scored] = token_logps[cache_index[scored]]
                entropy[scored] = token_entropy[cache_index[scored]]
            # FSDP2 keeps some units' weights whole after a forward (the root's: a backward would need them at once);
            # the teacher has no backward, and its EMA works on shards.
            for unit in model.modules() if self._dist.is_fsdp else ():
                if isinstance(unit, FSDPModule):
                    unit.reshard()
        seconds = time.perf_counter() - started
        if self.args.routing != "advantage_mix" and most:  # advantage_mix does not distil
            self._teacher_cache[mode] = _TeacherCache(
                hidden,
                log_normalizer,
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

    def _teacher_rows_per_pass(self, mode: str) -> int:
        # Length-dependent RoPE: a row gets the frequencies of its own length only in a pass of its own.
        return 1 if self._length_dependent_rope else self._rows_per_pass(mode)

    @functools.cached_property
    def _length_dependent_rope(self) -> bool:
        return has_length_dependent_rope(causal_lm(self.model).config)

    @functools.cached_property
    def _teacher_continues_from_cache(self) -> bool:
        """Whether the teacher can continue several completions from one teacher prompt's cached keys and values,
        equal to scoring each row in one pass. Every layer of the model's cache must be attention whose rows can be
        selected: linear-attention and recurrent layers (hybrid models such as Nemotron-H) keep a running state
        instead. And the RoPE frequencies must not depend on the length of each call (dynamic NTK, LongRoPE:
        `has_length_dependent_rope`), or the prefix and its continuation would use different ones. Other models'
        teacher scores each teacher prompt with its completion in one pass."""
        if self._length_dependent_rope:
            return False
        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # a cache transformers cannot build from the config: one pass per row is always right
            return False
        linear = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())  # transformers >= 5.18
        return all(hasattr(layer, "batch_select_indices") and not isinstance(layer, linear) for layer in layers)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        ids = [torch.tensor(prompt) for prompt in prompts]
        input_ids = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left").to(device)
        return input_ids, attention_mask

    def _prefix_pass(self, model, prefixes: list[list[int]]) -> _Prefix:
        """The teacher over `prompts` (left-padded), keeping its keys and values for the completions that follow.

        It goes through the model's top-level forward (under ZeRO-3, DeepSpeed's prefetching follows the top-level
        module's hooks) and projects no logits: hidden states are taken at the backbone's output."""
        input_ids, attention_mask = self._left_padded(prefixes)
        with self._capture_hidden_states(model) as captured:
            output = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=_NO_LOGITS
            )
        cache = output.cache if hasattr(output, "cache") else output.past_key_values  # transformers >= 5.18 / older
        return _Prefix(cache, attention_mask, captured[-1][:, -1])

    def _continuation_hidden(self, model, prefix: _Prefix, continues: list[int], batch, index) -> torch.Tensor:
        """The teacher's final hidden states predicting each completion token `(rows, C, hidden)` of the batch rows
        `index`, each continuing the prompt `continues[i]` of `prefix` from its cached keys and values."""
        at = torch.tensor(continues, device=index.device)
        cache = cache_rows(prefix.cache, at)
        attention_mask = torch.cat([prefix.attention_mask[at], batch["completion_mask"][index]], dim=1)
        with self._capture_hidden_states(model) as captured:
            model(
                input_ids=batch["completion_ids"][index],
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=_NO_LOGITS,
                **{self._cache_argument: cache},
            )
        # Completion token t is predicted from position t - 1: the first one from the prompt's last position.
        return torch.cat([prefix.last_hidden[at].unsqueeze(1), captured[-1][:, :-1]], dim=1)

    def _whole_sequence_hidden(self, model, prompts: list[list[int]], batch, index) -> torch.Tensor:
        """The teacher's final hidden states predicting each completion token `(rows, C, hidden)` of the batch rows
        `index`, each after its own teacher prompt, in one pass without a cache (models that cannot continue one).
        The passes end at the rows' last completion token: a row alone is then exactly its prompt and completion (what
        length-dependent RoPE needs); the positions past it are zeros."""
        prompt_ids, prompt_mask = self._left_padded(prompts)
        completion_mask = batch["completion_mask"][index]
        length = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 1
        if self._length_dependent_rope:
            reset_dynamic_rope(model)
        with self._capture_hidden_states(model) as captured:
            model(
                input_ids=torch.cat([prompt_ids, batch["completion_ids"][index, :length]], dim=1),
                attention_mask=torch.cat([prompt_mask, completion_mask[:, :length]], dim=1),
                use_cache=False,
                logits_to_keep=_NO_LOGITS,
            )
        # Completion token t is predicted from position t - 1: the first one from the prompt's last position.
        hidden = captured[-1][:, prompt_ids.size(1) - 1 : -1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, completion_mask.size(1) - length))

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
        # Statistics of the teacher's rows and tokens are left out of steps without any (no `None` in the logs).
        if teacher_count:
            metrics["srpo/teacher_entropy/mean"].append(entropy_sum / teacher_count)
        if teacher_rows:
            metrics["srpo/teacher_prompt_truncated_frac"].append(truncated_count / teacher_rows)
        selected = weights[sdpo_tokens]
        extremes = torch.stack(
            [
                -selected.min() if selected.numel() else torch.tensor(-torch.inf, device=weights.device),
                selected.max() if selected.numel() else torch.tensor(-torch.inf, device=weights.device),
            ]
        )
        extremes = self.accelerator.gather(extremes.unsqueeze(0)).max(dim=0).values.tolist()
        if sdpo_count:
            metrics["srpo/weight/min"].append(-extremes[0])
            metrics["srpo/weight/max"].append(extremes[1])
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
        if counts[1]:  # left out of steps without distilled tokens, like the teacher's other statistics
            self._metrics[mode]["srpo/teacher_rejects_sampled_frac"].append(counts[0] / counts[1])

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
        # tokens alone: a routed rollout carries one signal, the distillation term (method §12).
        grpo_inputs = {**inputs, "tool_mask": grpo_tokens.to(inputs["completion_mask"].dtype)}
        policy = self.accelerator.unwrap_model(model)
        with (
            self._capture_hidden_states(policy) as captured,
            self._head_scores_only(policy, grpo_rows),
            self._token_statistics_need_grpo_tokens(mode, grpo_tokens),
        ):
            grpo_loss = super()._compute_loss(model, grpo_inputs)
        if self.loss_type in LOCAL_TOKEN_LOSS_TYPES:  # bnpo divided by the GRPO tokens; SRPO shares all of them
            grpo_loss = grpo_loss * (grpo_tokens.sum().clamp(min=1) / mask.sum().clamp(min=1))
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1  # per-step share, see method §9
        grpo_value = self.accelerator.gather(grpo_loss.detach()).mean().item() * scale
        self._metrics[mode]["srpo/loss/grpo"].append(grpo_value)
        # Under ZeRO-3 the distillation gathers the LM heads, a collective: every process joins, routed rows or not
        # (the cache exists on every process or on none: routing is global).
        cache = self._teacher_cache[mode]
        distillation_loss = torch.zeros((), device=grpo_loss.device)
        if cache is not None and (sdpo_rows.any() or self._sharded):
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
        distillation_value = self.accelerator.gather(distillation_loss.detach().float()).mean().item() * scale
        self._metrics[mode]["srpo/loss/sdpo"].append(distillation_value)
        self._refuse_non_finite_loss(mode, grpo_value, distillation_value)
        return grpo_loss + distillation_loss

    def _refuse_non_finite_loss(self, mode: str, grpo_value: float, distillation_value: float) -> None:
        """Stop at the first non-finite loss (from the values logged anyway: no extra synchronisation). One backward
        of it turns the policy and, through the EMA, the teacher to NaN, while Trainer's `logging_nan_inf_filter`
        would log the step's loss as 0.0. The values are gathered: every process raises alike."""
        for term, value in (("GRPO", grpo_value), ("distillation", distillation_value)):
            if not math.isfinite(value):
                where = f"training step {self.state.global_step + 1}" if mode == "train" else "evaluation"
                raise FloatingPointError(
                    f"The SRPO loss's {term} term is {value} at {where}, stopped before the optimizer used it: the "
                    f"policy{' or the teacher' if term == 'distillation' else ''} has diverged or a reward is "
                    "extreme. Lower learning_rate (or bound the rewards), and resume from a checkpoint before this "
                    "step, whose weights are finite."
                )

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
    def _token_statistics_need_grpo_tokens(self, mode: str, grpo_tokens: torch.Tensor):
        """GRPOTrainer's statistics over its loss mask (`entropy`, `kl`, `clip_ratio/*`, ...) are averages over the
        GRPO tokens of all processes: with none (every row distilled) they come out 0 or NaN, logged as 0 or None.
        They are left out of those micro-batches, as SRPO leaves out its own statistics of empty selections."""
        metrics = self._metrics[mode]
        before = {key: len(values) for key, values in metrics.items()}
        yield
        if self._all_reduce(grpo_tokens.sum().float().reshape(1), "sum").item():  # every process joins
            return
        for key in [key for key in metrics if is_grpo_token_statistic(key)]:
            del metrics[key][before.get(key, 0) :]
            if not metrics[key]:
                del metrics[key]

    @contextmanager
    def _head_scores_only(self, policy, rows: torch.Tensor):
        """GRPOTrainer's fused LM head scores only `rows`: the others' labels become -100, and TRL's head skips the
        positions labelled -100. That is its GPU path; on CPU TRL 1.16 projects every position instead (a fixed tile
        shape, for devices that recompile), which is lifted here. Each distilled token's vocabulary work is then done
        once, by the distillation. With every row on GRPO nothing changes: SRPO is GRPOTrainer bit for bit."""
        if rows.all():
            yield
            return
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
        compact_on = trl_utils._use_triton
        trl_utils._use_triton = lambda device: device.type == "cpu" or compact_on(device)
        try:
            yield
        finally:
            trl_utils._use_triton = compact_on
            handle.remove()

    def _distillation_token_losses(self, policy, hidden, inputs, sdpo_tokens, cache: _TeacherCache) -> torch.Tensor:
        """`w_t · IS_t · D_t` at this micro-batch's SDPO tokens, in row-major order (method §5), differentiable through
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

    # ---- saving: the policy alone (the teacher is training state, in checkpoints: `TeacherCheckpointing`) ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        # A user's save gets the model card too (GRPOTrainer writes one with each checkpoint and push only).
        if not _internal_call and self.is_world_process_zero():
            output_dir = output_dir or self.args.output_dir
            self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
            card = os.path.join(self.args.output_dir, "README.md")
            if os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
                shutil.copyfile(card, os.path.join(output_dir, "README.md"))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name, dataset_name, tags)
        # TRL names a base model by its Hub id only; one loaded from a local folder read "a fine-tuned version of
        # [None](https://huggingface.co/None)".
        card = os.path.join(self.args.output_dir, "README.md")
        if not (self.is_world_process_zero() and os.path.isfile(card)):
            return
        source = causal_lm(self.model).config._name_or_path
        named = f"the local model `{source}`" if source and os.path.isdir(source) else "a model without a Hub id"
        with open(card, encoding="utf-8") as file:
            text = file.read()
        with open(card, "w", encoding="utf-8") as file:
            file.write(text.replace("[None](https://huggingface.co/None)", named))

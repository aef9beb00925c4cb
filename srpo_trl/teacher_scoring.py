"""How the self-teacher scores the routed rollouts (method §7): its forward passes, their key/value cache, and the
teacher states the loss keeps of them (`TeacherStates`: "cache" here always means a key/value cache).

`TeacherScorer.score` runs the teacher over each routed row's teacher prompt followed by the student's completion:
each distinct teacher prompt once, then its rows' completions continued from its cached keys and values, a few
sequences per pass. That equals one pass per row except where the cache cannot be continued row by row (hybrid
Mamba/linear-attention models) or where RoPE's frequencies depend on each call's length (dynamic NTK, LongRoPE):
those models are scored one pass per row (method §12). The passes project no logits; the final hidden states are
taken at the backbone and turned into the teacher's statistics in chunks (`vocab.teacher_statistics`).

Under ZeRO-3 and FSDP2 a forward pass is a collective: every process makes as many passes as the busiest one.
"""

import functools
import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from .compat import (
    NO_LOGITS,
    cache_argument,
    cache_rows,
    cache_rows_selectable,
    has_length_dependent_rope,
    head_not_called,
    output_cache,
    reset_dynamic_rope,
)
from .model_parts import backbone_and_head, captured_hidden_states, causal_lm, reshard_fsdp2
from .teacher import SelfTeacher
from .vocab import Logits, teacher_statistics


@dataclass
class TeacherStates:
    """What the loss needs of the teacher's scoring of one generation batch, for this process's routed tokens:
    final hidden states `(n, hidden)`, log-normalisers `(n,)`, and the LM head (weight, bias) and `Logits` that go
    with them. `TeacherScores.teacher_state_index` says which row belongs to which token."""

    hidden: torch.Tensor
    log_normalizer: torch.Tensor
    head: tuple[torch.Tensor, torch.Tensor | None]
    logits: Logits


@dataclass
class TeacherScores:
    """One generation batch scored, per token of this process's batch `(rows, length)`: the index into `states` (-1
    off the routed tokens), the teacher's log-prob of the sampled token and its entropy (0 off them), the seconds
    the passes took, and what the loss keeps (None when nothing is distilled). Per-token tensors survive
    GRPOTrainer's shuffle and split of the batch; `states` holds routed tokens only. `solution_logps`: the teacher's
    log-prob of the `solution_tokens` it was asked about, NaN elsewhere; None when it was asked about none."""

    teacher_state_index: torch.Tensor
    token_logps: torch.Tensor
    entropy: torch.Tensor
    seconds: float
    states: TeacherStates | None
    solution_logps: torch.Tensor | None = None

    def departure_solution_probs(self, mask: torch.Tensor) -> torch.Tensor:
        """`(rows,)`: the teacher's probability of the shown solution's token where each row first leaves that
        solution (a row has one such token at most, among its loss tokens `mask`), NaN for a row without one."""
        if self.solution_logps is None:
            return torch.full(mask.shape[:1], torch.nan, device=mask.device)
        logps = self.solution_logps.masked_fill(~mask, torch.nan)
        found = ~logps.isnan().all(dim=1)
        return torch.where(found, logps.nan_to_num(nan=-torch.inf).amax(dim=1).exp(), torch.nan)


@dataclass
class Prefix:
    """A batch of teacher prompts after their pass: its keys and values, attention mask and last hidden states."""

    cache: object
    attention_mask: torch.Tensor
    last_hidden: torch.Tensor


def unique_prefixes(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct teacher prompts, in first-seen order, and which one each row uses. The routed rollouts of a group
    share theirs (the question, the same correct sibling, the instruction), so each is computed once."""
    index: dict[tuple[int, ...], int] = {}
    prefix_of_row = [index.setdefault(tuple(prompt), len(index)) for prompt in prompts]
    return [list(prompt) for prompt in index], prefix_of_row


def shared_prefix_plan(prefix_of_row: list[int], rows_per_pass: int) -> list[tuple[list[int], list[list[int]]]]:
    """The teacher's forward passes: batches of at most `rows_per_pass` prefixes, each followed by the passes of the
    rows that continue them (at most `rows_per_pass` rows each) from the prefixes' cached keys and values."""
    prefixes = list(dict.fromkeys(prefix_of_row))
    plan = []
    for start in range(0, len(prefixes), rows_per_pass):
        batch = prefixes[start : start + rows_per_pass]
        rows = [row for row, prefix in enumerate(prefix_of_row) if prefix in batch]
        plan.append((batch, [rows[i : i + rows_per_pass] for i in range(0, len(rows), rows_per_pass)]))
    return plan


@dataclass
class TeacherPassPlan:
    """The teacher's forward passes over one batch's routed rows, decided before any runs.

    Attributes:
        prefixes: the distinct teacher prompts (`unique_prefixes`).
        prefix_of_row: for each routed row (its position in the scorer's `rows`), the index of its prompt.
        batches: `(prefix indices, row chunks)` per batch of prompts (`shared_prefix_plan`): each row chunk is one
            pass of rows continuing those prompts' cached keys and values.
        continues_prefixes: each batch of prompts is one pass of its own whose cache the row chunks continue; else
            every row chunk is scored whole, prompts included.
    """

    prefixes: list[list[int]]
    prefix_of_row: list[int]
    batches: list[tuple[list[int], list[list[int]]]]
    continues_prefixes: bool

    @property
    def pass_count(self) -> int:
        return sum(int(self.continues_prefixes) + len(chunks) for _, chunks in self.batches)


def plan_teacher_passes(teacher_prompts, rows_per_pass: int, continues_prefixes: bool) -> TeacherPassPlan:
    """The passes that score rows after their `teacher_prompts` entries, at most `rows_per_pass` sequences each."""
    prefixes, prefix_of_row = unique_prefixes(teacher_prompts)
    batches = shared_prefix_plan(prefix_of_row, rows_per_pass)
    return TeacherPassPlan(prefixes, prefix_of_row, batches, continues_prefixes)


def widened(solution_tokens: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """`solution_tokens` padded with -1 (none) to `mask`'s width and device."""
    if solution_tokens is None:
        return None
    width = mask.size(1) - solution_tokens.size(1)
    return torch.nn.functional.pad(solution_tokens.to(mask.device), (0, width), value=-1)


def asked_tokens(completion_ids: torch.Tensor, solution_tokens: torch.Tensor | None) -> torch.Tensor:
    """The tokens whose log-probs the statistics give: the sampled ones `(rows, length)`, with the solution's second
    `(rows, length, 2)` when there is one."""
    if solution_tokens is None:
        return completion_ids
    return torch.stack([completion_ids, solution_tokens.clamp(min=0)], dim=-1)


def teacher_token_statistics(hidden: torch.Tensor, head, logits: Logits, tokens: torch.Tensor):
    """The teacher's log-normaliser `(n,)`, log-probs of the asked `tokens` (`(n,)` or `(n, 2)`) and entropy `(n,)`
    at its final hidden states `(n, hidden)` (`vocab.teacher_statistics` with the LM `head`)."""
    return teacher_statistics(hidden, head.weight, head.bias, logits, tokens)


def per_token_scores(state_index: torch.Tensor, statistics, solution_tokens: torch.Tensor | None):
    """The statistics of the scored tokens spread over the batch's `(rows, length)` grid, by `state_index` (-1 off
    them): the sampled token's log-prob and the entropy (0 off them), and the solution token's log-prob (NaN off them
    and where there is none; None without `solution_tokens`). `statistics`: `teacher_token_statistics`' result, or
    None when no pass ran."""
    token_logps = torch.zeros(state_index.shape, device=state_index.device)
    entropy = torch.zeros_like(token_logps)
    solution_logps = None if solution_tokens is None else torch.full_like(token_logps, torch.nan)
    if statistics is None:
        return token_logps, entropy, solution_logps
    _, scored_logps, scored_entropy = statistics
    scored = state_index >= 0
    at = state_index[scored]
    if solution_logps is not None:
        scored_logps, solution_scored = scored_logps.unbind(-1)
        solution_logps[scored] = solution_scored[at]
        solution_logps[solution_tokens < 0] = torch.nan
    token_logps[scored] = scored_logps[at]
    entropy[scored] = scored_entropy[at]
    return token_logps, entropy, solution_logps


class TeacherScorer:
    """Scores completions with the self-teacher.

    Args:
        teacher: the `SelfTeacher`.
        accelerator: the trainer's (device, autocast, and the passes' lockstep under sharding).
        pad_token_id: pads the teacher prompts (left).
        logits: how hidden states become the sampling distribution's logits (the trainer's `Logits` for them).
        dist: the trainer's distributed layout (`is_zero3`, `is_fsdp`): sharded weights make the passes collectives,
            and FSDP2's units are resharded after them.
        span: `span(name)` times a named part of the scoring (the trainer's: TRL's `profiling_context`, which logs
            `profiling/Time taken: SRPOTrainer.{name}`); `teacher_prefix`, `teacher_continuation`,
            `teacher_whole_sequence` (one per pass) and `teacher_statistics`.
    """

    def __init__(self, teacher: SelfTeacher, accelerator, pad_token_id: int, logits, dist, span=None):
        self.teacher, self.accelerator, self.pad_token_id, self.logits = teacher, accelerator, pad_token_id, logits
        self.sharded, self.fsdp = dist.is_zero3 or dist.is_fsdp, dist.is_fsdp
        self.span = span or (lambda name: nullcontext())
        config = causal_lm(teacher.model).config
        self.length_dependent_rope = has_length_dependent_rope(config)
        self.cache_argument = cache_argument(type(causal_lm(teacher.model)))
        self.takes_position_ids = (
            "position_ids" in inspect.signature(type(causal_lm(teacher.model)).forward).parameters
        )
        self._config = config

    @functools.cached_property
    def continues_from_cache(self) -> bool:
        """Whether several completions can continue one teacher prompt's cached keys and values, equal to scoring each
        row in one pass. Every layer of the model's cache must be attention whose rows can be selected: linear-attention
        and recurrent layers (hybrid models such as Nemotron-H) keep a running state instead. And the RoPE frequencies
        must not depend on the length of each call (`has_length_dependent_rope`), or the prefix and its continuation
        would use different ones. Other models score each teacher prompt with its completion in one pass."""
        return not self.length_dependent_rope and cache_rows_selectable(self._config)

    def score(
        self,
        batch,
        mask,
        rows: list[int],
        teacher_prompts,
        rows_per_pass: int,
        lockstep: bool,
        keep: bool,
        snapshot_head: bool = False,
        solution_tokens: torch.Tensor | None = None,
    ) -> TeacherScores:
        """The teacher's scores of this process's routed batch rows: plan the passes (`plan_teacher_passes`), run
        them (`run_passes`), then the statistics of their hidden states (`teacher_token_statistics`, spread over the
        batch's tokens by `per_token_scores`).

        Args:
            batch: GRPOTrainer's batch (`completion_ids`, `completion_mask`).
            mask: `(rows, length)` bool, the tokens scored.
            rows: the routed batch rows, each scored after its `teacher_prompts` entry (paired by position).
            teacher_prompts: one token-id list per routed row.
            rows_per_pass: the most sequences one pass holds.
            lockstep: weights are sharded and some process has routed rows: every process makes as many passes as
                the busiest (agreed on first) and one statistics call.
            keep: the loss distils: what it needs is kept (`TeacherScores.states`).
            snapshot_head: keep a copy of the head (the EMA moves it before the loss has used this batch).
            solution_tokens: `(rows, length')`, a second token per position (-1: none; narrower than `mask` when
                its completions are shorter) whose log-prob the statistics also give, from the same logits.
        """
        if len(rows) != len(teacher_prompts):  # they are paired by position: a missing prompt shifts every later row
            raise RuntimeError(
                f"{len(rows)} routed rows but {len(teacher_prompts)} teacher prompts: every row the teacher scores "
                "needs its own prompt (a row whose prompt was dropped must be routed away first)."
            )
        # Length-dependent RoPE: a row gets the frequencies of its own length only in a pass of its own.
        per_pass = 1 if self.length_dependent_rope else rows_per_pass
        plan = plan_teacher_passes(teacher_prompts, per_pass, self.continues_from_cache)
        total = plan.pass_count
        if lockstep:
            total = int(self.accelerator.gather(torch.tensor([total], device=mask.device)).max())
        solution_tokens = widened(solution_tokens, mask)
        asked = asked_tokens(batch["completion_ids"], solution_tokens)
        started = time.perf_counter()
        statistics, states = None, None
        with torch.no_grad(), self.teacher.active() as model, self.accelerator.autocast():
            hidden, tokens, state_index = self.run_passes(model, plan, total, batch, mask, rows, asked)
            if total:  # every process calls, with or without tokens of its own (a collective under ZeRO-3)
                logits = self.logits(hidden)
                _, head = backbone_and_head(model)
                with self.span("teacher_statistics"):
                    statistics = teacher_token_statistics(hidden, head, logits, tokens)
            if self.fsdp:
                reshard_fsdp2(model)
        seconds = time.perf_counter() - started
        if keep and total:
            states = TeacherStates(hidden, statistics[0], self.head_for_loss(snapshot_head), logits)
        token_logps, entropy, solution_logps = per_token_scores(state_index, statistics, solution_tokens)
        return TeacherScores(state_index, token_logps, entropy, seconds, states, solution_logps)

    def run_passes(self, model, plan: "TeacherPassPlan", total: int, batch, mask, rows: list[int], asked):
        """The teacher's `plan`ned passes, then dummy ones up to `total` (one-token prompts whose empty results keep
        the shapes). Returns the final hidden states predicting each scored token `(n, hidden)`, the tokens asked
        about there `(n,)` (or `(n, 2)`), and the `(rows, length)` index of each token's row (-1 off them)."""
        device = mask.device
        state_index = torch.full(mask.shape, -1, dtype=torch.int32, device=device)
        hidden, tokens = [], []
        with head_not_called(causal_lm(model)):  # the passes project no logits: no head call (ZeRO-3 gathers it)
            for prefix_batch, row_chunks in plan.batches:
                prompts = [plan.prefixes[p] for p in prefix_batch]
                prefix = self.prefix_pass(model, prompts) if plan.continues_prefixes else None
                for chunk in row_chunks:
                    index = torch.tensor([rows[i] for i in chunk], dtype=torch.long, device=device)
                    chunk_rows, positions = mask[index].nonzero(as_tuple=True)
                    start = sum(len(h) for h in hidden)
                    state_index[index[chunk_rows], positions] = torch.arange(
                        start, start + len(positions), dtype=torch.int32, device=device
                    )
                    if prefix is None:
                        chunk_prompts = [plan.prefixes[plan.prefix_of_row[i]] for i in chunk]
                        chunk_hidden = self.whole_sequence_hidden(model, chunk_prompts, batch, index)
                    else:
                        continues = [prefix_batch.index(plan.prefix_of_row[i]) for i in chunk]
                        chunk_hidden = self.continuation_hidden(model, prefix, continues, batch, index)
                    hidden.append(chunk_hidden[mask[index]])
                    tokens.append(asked[index][mask[index]])
            for _ in range(total - plan.pass_count):
                hidden.append(self.prefix_pass(model, [[self.pad_token_id]]).last_hidden[:0])
                tokens.append(asked.new_zeros((0, *asked.shape[2:])))
        if not hidden:
            return None, None, state_index
        return torch.cat(hidden), torch.cat(tokens), state_index

    def head_for_loss(self, snapshot: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head (weight, bias) for the loss: the live parameters, or a copy when the EMA will move
        them before the loss has used this batch (several optimizer steps per generation batch)."""
        with self.teacher.active() as teacher_model:
            _, head = backbone_and_head(teacher_model)
        if not snapshot:
            return head.weight, head.bias
        with maybe_gather_lm_head_ctx(head.weight, head.bias):  # a collective under ZeRO-3: every process calls
            return head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone()

    def _positions(self, attention_mask: torch.Tensor, last: int | None = None) -> dict:
        """`position_ids` counted over the attention mask (the last `last` columns), as generation counts them, for
        a forward that takes them: a row's positions then do not depend on the left padding of the pass it is in
        (learned absolute positions, GPT-2's, would otherwise shift with it; RoPE is unchanged by the shift)."""
        if not self.takes_position_ids:
            return {}
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return {"position_ids": positions if last is None else positions[:, -last:]}

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        ids = [torch.tensor(prompt) for prompt in prompts]
        input_ids = pad(ids, padding_value=self.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left").to(device)
        return input_ids, attention_mask

    def prefix_pass(self, model, prefixes: list[list[int]]) -> Prefix:
        """The teacher over `prefixes` (left-padded), keeping its keys and values for the completions that follow.

        It goes through the model's top-level forward (under ZeRO-3, DeepSpeed's prefetching follows the top-level
        module's hooks) and projects no logits: hidden states are taken at the backbone's output."""
        input_ids, attention_mask = self._left_padded(prefixes)
        with captured_hidden_states(model) as captured, self.span("teacher_prefix"):
            output = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=NO_LOGITS,
                **self._positions(attention_mask),
            )
        return Prefix(output_cache(output), attention_mask, captured[-1][:, -1])

    def continuation_hidden(self, model, prefix: Prefix, continues: list[int], batch, index) -> torch.Tensor:
        """The teacher's final hidden states predicting each completion token `(rows, C, hidden)` of the batch rows
        `index`, each continuing the prompt `continues[i]` of `prefix` from its cached keys and values."""
        at = torch.tensor(continues, device=index.device)
        cache = cache_rows(prefix.cache, at)
        attention_mask = torch.cat([prefix.attention_mask[at], batch["completion_mask"][index]], dim=1)
        with captured_hidden_states(model) as captured, self.span("teacher_continuation"):
            model(
                input_ids=batch["completion_ids"][index],
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=NO_LOGITS,
                **{self.cache_argument: cache},
                **self._positions(attention_mask, last=batch["completion_ids"].size(1)),
            )
        # Completion token t is predicted from position t - 1: the first one from the prompt's last position.
        return torch.cat([prefix.last_hidden[at].unsqueeze(1), captured[-1][:, :-1]], dim=1)

    def whole_sequence_hidden(self, model, prompts: list[list[int]], batch, index) -> torch.Tensor:
        """The teacher's final hidden states predicting each completion token `(rows, C, hidden)` of the batch rows
        `index`, each after its own teacher prompt, in one pass without a cache (models that cannot continue one).
        The passes end at the rows' last completion token: a row alone is then exactly its prompt and completion (what
        length-dependent RoPE needs); the positions past it are zeros."""
        prompt_ids, prompt_mask = self._left_padded(prompts)
        completion_mask = batch["completion_mask"][index]
        length = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 1
        if self.length_dependent_rope:
            reset_dynamic_rope(model)
        attention_mask = torch.cat([prompt_mask, completion_mask[:, :length]], dim=1)
        with captured_hidden_states(model) as captured, self.span("teacher_whole_sequence"):
            model(
                input_ids=torch.cat([prompt_ids, batch["completion_ids"][index, :length]], dim=1),
                attention_mask=attention_mask,
                use_cache=False,
                logits_to_keep=NO_LOGITS,
                **self._positions(attention_mask),
            )
        # Completion token t is predicted from position t - 1: the first one from the prompt's last position.
        hidden = captured[-1][:, prompt_ids.size(1) - 1 : -1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, completion_mask.size(1) - length))

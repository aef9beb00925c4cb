"""What SRPO refuses, and why: each check a pure function returning the problem's message, or None.

The trainer raises what these return, at construction (before anything trains) or at the step that met the problem.
Every message names the setting, field, column or reward function at fault and the fix.
"""

import math
import os

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from .compat import NO_LOGITS, divides_by_local_tokens, head_not_called
from .model_parts import backbone_and_head, captured_hidden_states, causal_lm, uncaptured_message
from .prompts import PRIVILEGED_CONTEXT_COLUMN, prompt_column_problem


def fsdp_version(args) -> int | None:
    """The FSDP version this run asks for (`fsdp`/`fsdp_config` in the arguments, or an Accelerate FSDP config under
    `accelerate launch`), None without FSDP."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if not (args.fsdp or from_launcher):
        return None
    config = args.fsdp_config or {}
    return int(config.get("version", config.get("fsdp_version", os.environ.get("FSDP_VERSION", 2))))


def fsdp1_problem(args) -> str | None:
    """Before the model loads and vLLM starts: the self-teacher is sharded with FSDP2's API only."""
    if fsdp_version(args) != 1:
        return None
    return (
        f"routing={args.routing!r} needs SRPO's self-teacher, which supports FSDP2, not FSDP1: set fsdp_version: 2 "
        "in the accelerate config (accelerate_configs/fsdp2.yaml), or use DeepSpeed (accelerate_configs/zero3.yaml)."
    )


def inexact_setup_problem(
    routing: str, loss_type: str, entropy_bonus: bool, aux_loss: bool, zero_config: dict | None
) -> str | None:
    """Settings under which SRPO's objective would be silently wrong."""
    if divides_by_local_tokens(loss_type) and (entropy_bonus or aux_loss):
        extra = (
            "an entropy bonus (entropy_coef / use_adaptive_entropy)"
            if entropy_bonus
            else "a MoE load-balancing loss (output_router_logits)"
        )
        return (
            f"loss_type={loss_type!r} with {extra} is not supported with routing={routing!r}: SRPO rescales GRPO's "
            f"{loss_type} term to the micro-batch's full token count, which would rescale that term too. Use "
            "loss_type='dapo' (the paper's), or drop the extra term."
        )
    hpz = int((zero_config or {}).get("zero_hpz_partition_size", 1))
    if hpz > 1:
        return (
            f"DeepSpeed ZeRO++ hierarchical partitioning (zero_hpz_partition_size={hpz}) is not supported with "
            f"routing={routing!r}: DeepSpeed gathers the teacher from a secondary copy that SRPO's shard-local EMA "
            "does not refresh, so the teacher would stay at its initial weights. Set zero_hpz_partition_size to 1."
        )
    return None


def distillation_topk_problem(topk: int, vocab_size: int) -> str | None:
    """The student's top-k support must fit in the vocabulary."""
    if topk <= vocab_size:
        return None
    return (
        f"SRPOConfig.distillation_topk={topk} exceeds the model's vocabulary ({vocab_size}); set "
        f"distillation_topk <= {vocab_size}."
    )


def teacher_setup_problem(
    args, vocab_size: int, loss_type: str, entropy_bonus: bool, aux_loss: bool, zero_config: dict | None
) -> str | None:
    """What a run with a self-teacher refuses at construction: `distillation_topk_problem`, then
    `inexact_setup_problem`."""
    return distillation_topk_problem(args.distillation_topk, vocab_size) or inexact_setup_problem(
        args.routing, loss_type, entropy_bonus, aux_loss, zero_config
    )


def teacher_context_warning(max_teacher_prompt_length: int, context: int | None, max_completion_length: int):
    """A warning when the teacher-prompt setting exceeds the model's context (the budget is then the context)."""
    if context is None or max_teacher_prompt_length <= context:
        return None
    return (
        f"SRPOConfig.max_teacher_prompt_length={max_teacher_prompt_length} exceeds the model's context ({context} "
        "positions): a teacher prompt gets at most the context minus its batch's completion length, its "
        "demonstration cut to fit, and rollouts whose teacher prompt cannot fit are trained as if no sibling were "
        f"correct. Set max_teacher_prompt_length <= {context - max_completion_length} to say so explicitly."
    )


def datasets_problem(train_dataset, eval_dataset, teacher: bool) -> str | None:
    """`dataset_problem` of the training set, then of each evaluation set (one, or a dict of them)."""
    named = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        named.update({f"eval_dataset[{key!r}]": dataset for key, dataset in eval_dataset.items()})
    else:
        named["eval_dataset"] = eval_dataset
    problems = (dataset_problem(name, dataset, teacher) for name, dataset in named.items() if dataset is not None)
    return next((problem for problem in problems if problem), None)


def dataset_problem(name: str, dataset, teacher: bool) -> str | None:
    """Whether every row of a map-style dataset has a prompt GRPOTrainer can render and, with a `teacher`, one the
    teacher prompt can rewrite (method §3 rewrites the last user turn): found at construction, column-wise (fast on
    millions of rows), not when a rollout of theirs is first met, maybe hours in. Streamed datasets are met at
    routing."""
    columns = getattr(dataset, "column_names", None)  # None: a stream that does not know them
    if columns is not None and "prompt" not in columns:
        return (
            f"{name} has no 'prompt' column (its columns: {columns}): GRPOTrainer and SRPO read each row's question "
            "from it. Rename the question's column (dataset.rename_column('question', 'prompt')) or map each row to a "
            "'prompt'."
        )
    if not isinstance(dataset, Dataset):
        return None
    if len(dataset) == 0:
        return f"{name} has no rows: check the split and any filter applied to it."
    prompts = dataset.select_columns(["prompt"])
    decode = lambda row: prompts[row]["prompt"]  # noqa: E731  (as the trainer reads it)
    found = prompt_column_problem(prompts.with_format("arrow")[:]["prompt"], teacher, decode)
    return None if found is None else f"{name} row {found[0]}: {found[1]}"


def privileged_context_problem(dataset, distill_without_sibling: bool) -> str | None:
    """`distill_without_sibling` does nothing without a privileged context to distil from: a training set (whose
    columns are known) without a `privileged_context` column, or whose contexts are all empty or blank."""
    columns = getattr(dataset, "column_names", None)
    if not distill_without_sibling or columns is None:
        return None
    if PRIVILEGED_CONTEXT_COLUMN not in columns:
        return (
            f"SRPOConfig.distill_without_sibling=True distils all-failed groups from the dataset's "
            f"{PRIVILEGED_CONTEXT_COLUMN!r} column, and train_dataset has none (its columns: {columns}): add one (a "
            "reference solution per row, None where there is none), or leave distill_without_sibling False."
        )
    if not isinstance(dataset, Dataset):
        return None
    column = dataset.select_columns([PRIVILEGED_CONTEXT_COLUMN]).with_format("arrow")[:][PRIVILEGED_CONTEXT_COLUMN]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        return None  # not text: refused, naming the column, when a row of it is met
    if pa.types.is_null(column.type) or not pc.max(pc.utf8_length(pc.utf8_trim_whitespace(column))).as_py():
        return (
            f"SRPOConfig.distill_without_sibling=True, but every {PRIVILEGED_CONTEXT_COLUMN!r} of train_dataset is "
            "empty or blank: no rollout can be distilled from one. Fill the column, or leave distill_without_sibling "
            "False."
        )
    return None


def infinite_reward_problem(rewards_per_func: torch.Tensor, names: list[str]) -> str | None:
    """None/NaN means unscorable (method §12); any other non-finite reward is an error. With `scale_rewards="none"`
    an infinite reward makes its group's advantages NaN, and one step turns the policy and the teacher to NaN."""
    infinite = torch.isinf(rewards_per_func)
    if not infinite.any():
        return None
    row, column = infinite.nonzero()[0].tolist()
    return (
        f"The reward function '{names[column]}' returned {rewards_per_func[row, column].item()} (for "
        f"{int(infinite[:, column].sum())} of {len(rewards_per_func)} completions of this batch): SRPO needs finite "
        "rewards. Return None for a completion that cannot be scored, or bound the reward."
    )


def feedback_problem(feedback: list, completions: int, column: str) -> str | None:
    """`teacher_feedback=True` needs one feedback per completion, logged with `log_extra(column, texts)`."""
    if len(feedback) == completions:
        return None
    return (
        f"SRPOConfig.teacher_feedback=True needs one feedback string (or None) per completion, logged by a reward "
        f"function with log_extra({column!r}, texts); got {len(feedback)} for {completions} completions. Log it from "
        "exactly one reward function, or set teacher_feedback=False."
    )


def non_finite_loss_problem(where: str, grpo_value: float, distillation_value: float) -> str | None:
    """The first non-finite term of the loss, stopped before the optimizer uses it: one backward of it turns the
    policy and, through the EMA, the teacher to NaN, while Trainer's `logging_nan_inf_filter` would log 0.0."""
    for term, value in (("GRPO", grpo_value), ("distillation", distillation_value)):
        if not math.isfinite(value):
            return (
                f"The SRPO loss's {term} term is {value} at {where}, stopped before the optimizer used it: the "
                f"policy{' or the teacher' if term == 'distillation' else ''} has diverged or a reward is extreme. "
                "Lower learning_rate (or bound the rewards), and resume from a checkpoint before this step, whose "
                "weights are finite."
            )
    return None


def uncaptured_backbone_problem(model) -> str | None:
    """Why SRPO cannot read `model`'s final hidden states, or None: a two-token forward (no gradient, no logits)
    must run the decoder stack that `backbone_and_head` names and give hidden states as wide as the LM head's input.
    A family whose causal LM forward calls its layers some other way (around that module) would leave the teacher
    and the distillation term without them."""
    _, head = backbone_and_head(model)
    lm = causal_lm(model)
    ids = torch.zeros((1, 2), dtype=torch.long, device=head.weight.device)
    captured = []
    try:
        with torch.no_grad(), head_not_called(lm), captured_hidden_states(model) as captured:
            lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=NO_LOGITS)
    except RuntimeError as error:
        if not str(error).startswith("SRPO reads the final hidden states"):
            raise
        return str(error)
    hidden, width = captured[-1], head.weight.size(-1)
    if hidden.dim() == 3 and tuple(hidden.shape) == (1, 2, width):
        return None
    return uncaptured_message(model, f"an output of shape {tuple(hidden.shape)}", f"(1, 2, {width})")

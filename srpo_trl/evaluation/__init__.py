"""The paper's evaluation protocol (method §10): avg@k on a test split, and the best avg@k within wall-clock budgets.

`avg_at_k` samples `k` completions per problem (temperature 0.6, top-p 0.95 by default) and returns the fraction of
them that are correct, by the rule training routes with: the reward functions' outputs weighted by `reward_weights`
and summed (as `GRPOTrainer` does), at least `success_reward_threshold`. The mean weighted reward comes beside it.
`BestWithinBudgetsCallback` runs it every few steps during training and keeps, for each budget (1 h, 5 h, 10 h by
default), the best value reached before the budget ran out: the numbers of the paper's Table 1.

Memory: with vLLM (`use_vllm`), the evaluation samples with the run's own engine, whose KV cache is already reserved
(TRL's weight sync and sleep/wake included); without it, `model.generate` runs on bounded batches of sequences, since
a batch of 8 problems x 16 samples x 8k tokens of Qwen3-8B would need about 150 GB of KV cache (docs/scaling.md).
"""

from .callbacks import BestWithinBudgetsCallback, bind_evaluation_callbacks
from .scoring import AvgAtK, avg_at_k, eval_mode, sampling_problem

__all__ = [
    "AvgAtK",
    "BestWithinBudgetsCallback",
    "avg_at_k",
    "bind_evaluation_callbacks",
    "eval_mode",
    "sampling_problem",
]

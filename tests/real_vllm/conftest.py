"""Each test here runs in a pytest process of its own, as each real vLLM engine needs: vLLM sets up
torch.distributed and process-wide state in the process that starts it (as in TRL's colocate mode, one engine per
training process), and a second engine in the same process finds that state. The parent process runs the test's
node id in a child `pytest` and reports its outcome, with the child's output on failure.

The children share one saved model and one vLLM cache (under pytest's temporary folder): vLLM's CPU backend compiles
the model's graph with inductor, keyed on the model's path, so only the first engine pays for the compilation."""

import os
import subprocess
import sys

import pytest

CHILD = "SRPO_VLLM_TEST_CHILD"
MODEL_DIR = "SRPO_VLLM_TEST_MODEL_DIR"
TIMEOUT_S = 600


def save_tiny_model(tokenizer, path) -> str:
    """The tiny Qwen3 of the other tests with head_dim 32 (vLLM's CPU attention refuses 16), and its tokenizer."""
    from srpo_trl.testbed.model import build_tiny_model

    build_tiny_model(tokenizer, hidden_size=128, num_heads=4, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def shared_engine_files(tmp_path_factory, char_tokenizer):
    if os.environ.get(CHILD) == "1":
        return
    root = tmp_path_factory.mktemp("vllm")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm-cache"))  # not the user's ~/.cache/vllm
    os.environ[MODEL_DIR] = save_tiny_model(char_tokenizer, root / "tiny-qwen3")


@pytest.fixture
def model_dir(char_tokenizer, tmp_path):
    """Where vLLM loads the model from: the parent's shared folder, or one of its own when run alone."""
    return os.environ.get(MODEL_DIR) or save_tiny_model(char_tokenizer, tmp_path / "tiny-qwen3")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if os.environ.get(CHILD) == "1":
        return None  # the child: run the test here
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", pyfuncitem.nodeid]
    child = subprocess.run(
        command,
        cwd=pyfuncitem.config.rootpath,
        env={**os.environ, CHILD: "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
    )
    if child.returncode != 0:
        lines = [line for line in child.stdout.splitlines() if " INFO " not in line and "DEBUG" not in line]
        pytest.fail(f"{' '.join(command)} exited with {child.returncode}:\n" + "\n".join(lines[-150:]), pytrace=False)
    return True

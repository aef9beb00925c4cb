"""Shared fixtures: one torch thread (tiny ops are erratic with two here), a local tokenizer and tiny models.

The tiers' folders (`unit/`, `trainer/`, `end_to_end/`, `real_vllm/`) import the shared builders from `helpers/`
(the tiny trainer, references, the vLLM stand-in, the recipe rehearsal, the script loader, launches on a free
port): this folder is on `sys.path` here whatever pytest's import mode."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trackio reads its directory once, at import: point it at a scratch folder before anything imports it.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="srpo-trackio-"))

TESTS = Path(__file__).resolve().parent
# The benchmark splits beside the checkout, or where SRPO_TEST_DATA says (a checkout elsewhere, e.g. a git worktree).
SHARED_DATA = Path(os.environ.get("SRPO_TEST_DATA") or TESTS.parents[1] / "shared" / "data")
if str(TESTS) not in sys.path:  # pytest's default ("prepend") mode has put it there already
    sys.path.insert(0, str(TESTS))


def _load_time_swaps() -> dict:
    """What transformers swaps out, process-wide, while it builds or loads a model (`no_tie_weights`,
    `no_init_weights`) and puts back after."""
    from transformers import PreTrainedModel

    swapped = {"PreTrainedModel.tie_weights": PreTrainedModel.tie_weights}
    swapped["PreTrainedModel.init_weights"] = PreTrainedModel.init_weights
    swapped.update(
        {f"torch.nn.init.{name}": getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "zeros_")}
    )
    return swapped


@pytest.fixture(autouse=True)
def transformers_left_as_found():
    """Fail the test that leaves one of those swapped: every later model in the process would silently lose its tied
    embeddings or its initialisation (two threads loading at once did it once, and the failure surfaced tests away)."""
    before = _load_time_swaps()
    yield
    left = [name for name, value in _load_time_swaps().items() if value is not before[name]]
    assert not left, f"transformers was left with {left} swapped (a model loaded from two threads at once?)"


@pytest.fixture(scope="session")
def char_tokenizer():
    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark splits beside the checkout (`../shared/data`); tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA

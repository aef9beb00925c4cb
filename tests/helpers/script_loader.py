"""Scripts that are not part of the package (`benchmarks/...`), imported as modules by the tests that exercise them.

(Not in `conftest.py`: `tests/real_vllm/` has a conftest of its own, and a plain `from conftest import` would get
whichever was imported last.)"""

import importlib.util
from pathlib import Path


def load_script(path: Path, name: str):
    """Import the script at `path` as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

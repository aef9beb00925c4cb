"""`make install`'s torch (tools/install_torch.py): the CPU build on a machine without a GPU. What pip would install
is checked with `--dry-run --report` (metadata only), nothing is downloaded."""

import json
import subprocess
import sys
from pathlib import Path

from helpers.script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
install_torch = load_script(ROOT / "tools" / "install_torch.py", "install_torch")

CUDA_TORCH = {
    "metadata": {"name": "torch", "version": "2.13.0", "requires_dist": ["filelock", "cuda-toolkit[cudart]==13.0.2"]},
    "download_info": {"url": "https://files.pythonhosted.org/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"},
}
CPU_TORCH = {
    "metadata": {"name": "torch", "version": "2.13.0+cpu", "requires_dist": ["filelock", "sympy>=1.13.3"]},
    "download_info": {"url": "file:///opt/wheels/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl"},
}


def test_without_a_gpu_a_cuda_wheel_is_replaced_by_the_cpu_index_with_the_plain_index_as_fallback():
    plain = ["py", "-m", "pip", "install", "-q", "torch==2.13.0"]
    commands = install_torch.install_commands("py", "torch==2.13.0", gpu=False, planned=CUDA_TORCH)
    assert len(commands) == 2 and commands[1] == plain
    assert commands[0][: len(plain)] == plain and commands[0][len(plain) :][:2] == [
        "--index-url",
        install_torch.CPU_INDEX,
    ]
    # a GPU, a CPU wheel on offer (a local wheel, macOS) or torch already installed: the configured index as is
    for gpu, planned in ((True, CUDA_TORCH), (False, CPU_TORCH), (False, None)):
        assert install_torch.install_commands("py", "torch==2.13.0", gpu, planned) == [plain]


def test_the_makefile_installs_torch_through_the_selection():
    # --no-print-directory: under a calling make (make test-vllm runs this suite) make prints "Entering directory"
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "install"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert dry.splitlines()[0].endswith('tools/install_torch.py "torch==2.13.0"')


def test_what_make_install_resolves_here_is_the_cpu_build_when_there_is_no_gpu():
    # As on a clean machine (--ignore-installed): the first command `make install` would run, resolved by pip.
    python, requirement = sys.executable, "torch==2.13.0"
    planned = install_torch.planned_install(python, requirement, ("--ignore-installed",))
    first = install_torch.install_commands(python, requirement, install_torch.has_gpu(), planned)[0]
    resolved = install_torch.planned_install(python, requirement, ("--ignore-installed", *first[6:]))
    assert resolved is not None and resolved["metadata"]["version"].startswith("2.13.0")
    if not install_torch.has_gpu():
        assert not install_torch.is_cuda_build(resolved), json.dumps(resolved["metadata"].get("requires_dist"))


def test_an_unreachable_cpu_index_falls_back_to_the_configured_index(monkeypatch, capsys):
    ran = []

    def run(command, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, 1 if "--index-url" in command else 0)

    monkeypatch.setattr(install_torch, "has_gpu", lambda: False)
    monkeypatch.setattr(install_torch, "planned_install", lambda *args: CUDA_TORCH)
    monkeypatch.setattr(install_torch.subprocess, "run", run)
    assert install_torch.main(["torch==2.13.0"]) == 0
    assert [("--index-url" in command) for command in ran] == [True, False]
    assert "could not be reached" in capsys.readouterr().err


def test_pip_accepts_the_cpu_index_command_and_resolves_a_cpu_build():
    # Here the CPU index is unreachable and a local CPU wheel (find-links) answers; on a user's machine, the index.
    python, requirement = sys.executable, "torch==2.13.0"
    first = install_torch.install_commands(python, requirement, gpu=False, planned=CUDA_TORCH)[0]
    resolved = install_torch.planned_install(python, requirement, ("--ignore-installed", *first[6:]))
    assert resolved is not None and not install_torch.is_cuda_build(resolved)

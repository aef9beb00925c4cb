"""`accelerate launch` of several processes from a test: each launch gets a port of its own, because accelerate's
default (29500) is taken whenever another launch runs at the same time (parallel pytest workers, another job)."""

import socket
import sys
from pathlib import Path


def accelerate_launch(config_file: Path) -> list[str]:
    """The command line's start: this interpreter's `accelerate launch --config_file=...` on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        f"--config_file={config_file}",
        f"--main_process_port={port}",
    ]

"""The stages of `benchmarks/gpu_session.sh`, one subcommand each, and its summary.

    python3 benchmarks/gpu_session.py pins                 # what the GPU machine lacks, at the versions here
    python3 benchmarks/gpu_session.py install --wheels WHEELS --target SITE
    python3 benchmarks/gpu_session.py environment OUT_FILE
    python3 benchmarks/gpu_session.py rehearsal --work W --data D --out OUT [--dry]
    python3 benchmarks/gpu_session.py step-cost --work W --out OUT [--dry]
    python3 benchmarks/gpu_session.py summary --work W --out OUT [--dry]

Only small files go to OUT (the device tool brings back at most 8 files of 16 MiB, 2 folders deep, named in letters,
digits, '.', '_' and '-'): checkpoints, models and logs stay in the work folder W (logs come back as one tarball).
"""

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # `benchmarks.step_cost`; the tests' recipe rehearsal

MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
NEEDED = ("trl", "datasets", "dill", "multiprocess")  # what the GPU machine lacks (benchmarks/gpu_session_prepare.sh)
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "datasets",
    "peft",
    "pyarrow",
    "deepspeed",
    "vllm",
    "trackio",
)
NOT_COVERED = [
    "vLLM: a CUDA vLLM wheel (~400 MB) does not fit what a run may carry (64 MiB), so the rehearsal runs with "
    "`use_vllm false` (transformers' `generate`); colocated vLLM, sleep mode and its memory are covered on CPU "
    "(make test-vllm) and estimated (docs/scaling.md, 'Memory per GPU').",
    "DeepSpeed ZeRO-3 and 8 processes: one GPU here, so the rehearsal runs accelerate_configs/single_gpu.yaml; the "
    "sharded paths are tested on CPU (2 processes, make test).",
    "trackio: not installed there; the rehearsal logs with `report_to none`.",
    "Qwen3-8B itself: no weights can be fetched; the rehearsal uses a random Qwen3-0.6B-shaped model and the memory "
    "probe Qwen3-8B's width at 2 and 4 layers.",
]
STAGE_FILES = {  # what each stage leaves under OUT (dry runs name the step cost's files cpu_toy)
    "rehearsal": ["rehearsal_trainer_state.json"],
    "step_cost": ["results-*.json", "step_time_vs_f_*.png"],
    "memory_probe": ["memory_probe.json"],
}


# ---- install ----


def pins() -> list[str]:
    """`NAME==VERSION` of each package the GPU machine lacks, at the version installed here (the one tested)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in NEEDED]


def install(wheels: Path, target: Path) -> int:
    """pip-install the carried wheels into `target` without the network, for Python 3.12 (the GPU machine's, also
    from another Python in a dry run). Without wheels, the packages must be importable already."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
        print(f"no wheels in {wheels}; missing here: {missing or 'none'}")
        return 1 if missing else 0
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--only-binary=:all:", "--python-version", "3.12"]
    command += ["--implementation", "cp", "--target", str(target), *files]
    return subprocess.run(command).returncode


# ---- environment ----


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return {"python": platform.python_version(), "gpu": gpu, "packages": versions}


# ---- rehearsal: the shipped recipe on one GPU ----


def rehearsal_command(model_dir: Path, data: str, output_dir: Path, dry: bool) -> list[str]:
    """`accelerate launch ... examples/train_chemistry.py --config recipes/qwen3_8b/srpo.yaml` as shipped, with what one
    offline GPU forces overridden (dry: what a CPU forces, tests/helpers/recipe_rehearsal.py's overrides)."""
    from helpers.recipe_rehearsal import cpu_overrides

    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += (
        ["--cpu", "--num_processes=1"] if dry else ["--config_file", str(ROOT / "accelerate_configs/single_gpu.yaml")]
    )
    script = [str(ROOT / "examples/train_chemistry.py"), "--config", str(ROOT / "recipes/qwen3_8b/srpo.yaml")]
    if dry:
        # one group of 8 a step: the logic, not the recipe's layout
        overrides = cpu_overrides(str(model_dir), data, str(output_dir)) + [
            "--max_steps=1",
            "--eval_every_steps=1",
            "--per_device_train_batch_size=8",
            "--gradient_accumulation_steps=1",
            "--steps_per_generation=1",
        ]
    else:
        overrides = [
            f"--model_name_or_path={model_dir}", f"--data_path={data}", f"--output_dir={output_dir}",
            "--max_train_samples=512", "--max_eval_samples=8", "--max_completion_length=256", "--max_steps=6",
            "--eval_every_steps=3", "--eval_k=4", "--eval_max_new_tokens=128", "--save_steps=6",
        ]  # fmt: skip
    return launch + script + overrides + ["--use_vllm=false", "--report_to=none"]


def build_rehearsal_model(folder: Path, dry: bool) -> int:
    """The answering model of tests/helpers/recipe_rehearsal.py: Qwen3-0.6B's width, depth and vocabulary on a GPU (its heads
    are 64 wide, not 128), the tiny default when dry. Returns its parameter count."""
    import torch
    from helpers.recipe_rehearsal import answering_tiny_model

    from srpo_trl.testbed.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    size = {} if dry else dict(hidden_size=1024, num_heads=16, num_layers=28, vocab_size=151936)
    model = answering_tiny_model(tokenizer, **size)
    (model if dry else model.to(torch.bfloat16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def rehearsal_block(history: list[dict], seconds: float, parameters: int) -> str:
    rows = [r for r in history if "loss" in r]
    lines = [
        f"`benchmarks/gpu_session.sh`: recipes/qwen3_8b/srpo.yaml on one GPU, a random answering model of "
        f"{parameters / 1e6:.1f} M parameters, {len(rows)} steps in {seconds:.0f} s (model build and evaluation "
        "included).",
        "",
        "| step | loss | srpo/route/sdpo_frac | srpo/loss/sdpo | srpo/time/teacher_s | step_time |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {r['loss']:.4f} | {r.get('srpo/route/sdpo_frac', 0):.3f} | "
        f"{r.get('srpo/loss/sdpo', 0):.3g} | {r.get('srpo/time/teacher_s', 0):.3f} | {r.get('step_time', 0):.3f} |"
        for r in rows
    ]
    evaluations = [{k: v for k, v in r.items() if k.startswith(("eval_", "best_"))} | {"step": r["step"]}
                   for r in history if any(k.startswith("eval_avg@") for k in r)]  # fmt: skip
    lines.append(f"\nEvaluations: {evaluations}")
    return "\n".join(lines)


def rehearsal(work: Path, data: str, out: Path, dry: bool) -> int:
    started = time.perf_counter()
    model_dir, run_dir = work / "rehearsal-model", work / "rehearsal"
    parameters = build_rehearsal_model(model_dir, dry)
    print(f"rehearsal model: {parameters / 1e6:.1f} M parameters", flush=True)
    result = subprocess.run(rehearsal_command(model_dir, data, run_dir, dry), cwd=work)
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        print(f"no checkpoint written (exit {result.returncode})", flush=True)
        return result.returncode or 1
    state = checkpoints[-1] / "trainer_state.json"
    shutil.copyfile(state, out / "rehearsal_trainer_state.json")
    history = json.loads(state.read_text())["log_history"]
    block = rehearsal_block(history, time.perf_counter() - started, parameters)
    (work / "rehearsal_block.md").write_text(block)
    print(block, flush=True)
    return result.returncode


# ---- step cost ----


def step_cost(work: Path, out: Path, dry: bool) -> int:
    """The step-cost benchmark (`benchmarks/step_cost/`) on the GPU (quick, timing and prefix tables, no memory sweep:
    the memory probe measures memory); its JSON and PNG to OUT, the RESULTS.md block it would write to the work
    folder (for the summary)."""
    from benchmarks.step_cost.__main__ import main

    argv = ["--toy", "--device", "cpu", "--skip-memory"] if dry else ["--quick", "--device", "cuda", "--skip-memory"]
    if not dry:
        argv += ["--repeats", "2"]
    result = main([*argv, "--out", str(out)])
    (work / "step_cost_block.md").write_text(result["report"])
    return 0


# ---- summary ----


def out_violations(out: Path) -> list[str]:
    """What in OUT would not come back from the device tool."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files (at most {MAX_FILES})"] if len(files) > MAX_FILES else []
    for path in out.rglob("*"):
        relative = path.relative_to(out)
        if not all(NAME.match(part) for part in relative.parts):
            problems.append(f"{relative}: a name outside letters, digits, '.', '_', '-'")
        if path.is_file() and len(relative.parts) - 1 > MAX_DEPTH:
            problems.append(f"{relative}: more than {MAX_DEPTH} folders down")
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{relative}: {path.stat().st_size / 2**20:.1f} MiB (at most 16)")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{relative}: not a plain file")
    return problems


def read_stages(work: Path) -> list[dict]:
    stages = []
    for line in (work / "stages.tsv").read_text().splitlines():
        name, code, seconds, limit = line.split("\t")
        stages.append({"stage": name, "exit": code, "seconds": int(seconds), "limit_s": int(limit)})
    return stages


def summary_text(
    stages: list[dict], files: dict[str, list[str]], env: dict | None, blocks: dict[str, str], probe: str | None,
    dry: bool,
) -> str:  # fmt: skip
    lines = ["# GPU session" + (" (dry run: CPU, toy sizes)" if dry else ""), ""]
    if env:
        lines.append(f"Python {env['python']}; GPU: {env['gpu']}; packages: " + json.dumps(env["packages"]))
        lines.append("")
    lines += ["| stage | exit code | seconds | limit (s) | files |", "|---|---|---|---|---|"]
    for s in stages:
        note = "timed out" if s["exit"] in ("124", "137") else ""
        lines.append(f"| {s['stage']} | {s['exit']}{' (' + note + ')' if note else ''} | {s['seconds']} | "
                     f"{s['limit_s']} | {', '.join(files.get(s['stage'], [])) or '-'} |")  # fmt: skip
    lines.append(f"\nTotal: {sum(s['seconds'] for s in stages)} s. Logs of every stage: logs.tar.gz.")
    lines += ["", "## Not covered here", ""] + [f"- {item}" for item in NOT_COVERED]
    for title, block in blocks.items():
        lines += ["", f"## {title}", "", block]
    if probe:
        lines += ["", "## Memory probe (benchmarks/memory_probe.py): measured / estimated", "", probe]
    return "\n".join(lines) + "\n"


def summary(work: Path, out: Path, dry: bool) -> int:
    env_file = work / "environment.json"
    env = json.loads(env_file.read_text()) if env_file.exists() else None
    blocks = {}
    for title, name in (("Rehearsal (RESULTS.md block gpu-rehearsal)", "rehearsal_block.md"),
                        ("Step cost (RESULTS.md block of this device)", "step_cost_block.md")):  # fmt: skip
        if (work / name).exists():
            blocks[title] = (work / name).read_text()
    probe_file = out / "memory_probe.json"
    probe = json.loads(probe_file.read_text()).get("markdown") if probe_file.exists() else None
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        for log in sorted((work / "logs").glob("*.log")):
            archive.add(log, arcname=log.name)
    files = {stage: sorted(p.name for pattern in patterns for p in out.glob(pattern))
             for stage, patterns in STAGE_FILES.items()}  # fmt: skip
    text = summary_text(read_stages(work), files, env, blocks, probe, dry)
    (out / "summary.md").write_text(text)
    problems = out_violations(out)
    if problems:
        (out / "summary.md").write_text(text + "\n## Files that will not come back\n\n- " + "\n- ".join(problems))
    print(text)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("environment").add_argument("out_file")
    commands.add_parser("pins")
    installer = commands.add_parser("install")
    installer.add_argument("--wheels", required=True, type=Path)
    installer.add_argument("--target", required=True, type=Path)
    for name in ("rehearsal", "step-cost", "summary"):
        command = commands.add_parser(name)
        command.add_argument("--work", required=True, type=Path)
        command.add_argument("--out", required=True, type=Path)
        command.add_argument("--dry", action="store_true")
        if name == "rehearsal":
            command.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    if args.command == "pins":
        print(" ".join(pins()))
        return 0
    if args.command == "install":
        return install(args.wheels, args.target)
    if args.command == "environment":
        Path(args.out_file).write_text(json.dumps(environment(), indent=1))
        print(Path(args.out_file).read_text())
        return 0
    if args.command == "rehearsal":
        return rehearsal(args.work, args.data, args.out, args.dry)
    if args.command == "step-cost":
        return step_cost(args.work, args.out, args.dry)
    return summary(args.work, args.out, args.dry)


if __name__ == "__main__":
    sys.exit(main())

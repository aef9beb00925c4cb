"""`accelerate launch --cpu --num_processes 2` starts one process (Accelerate's CPU launcher needs mpirun for more):
the environment it leaves tells, and SRPOTrainer warns with the commands that do start two."""

import json
import subprocess

import pytest

from srpo_trl.diagnostics import one_process_of_several

# Each process writes its own file: two processes' long lines on one shared stdout pipe interleave.
ENV_SCRIPT = (
    "import json, os, sys\n"
    "with open(os.path.join(sys.argv[1], f'env-{os.getpid()}.json'), 'w') as f:\n"
    "    json.dump(dict(os.environ), f)\n"
)


def launched_environments(tmp_path, launcher: list[str]) -> list[dict]:
    script, out = tmp_path / "env.py", tmp_path / "environments"
    script.write_text(ENV_SCRIPT)
    out.mkdir(exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    result = subprocess.run(
        [*launcher, str(script), str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(path.read_text()) for path in sorted(out.iterdir())]


def test_accelerate_cpu_with_two_processes_starts_one_and_is_detected(tmp_path):
    (env,) = launched_environments(tmp_path, ["accelerate", "launch", "--cpu", "--num_processes", "2"])  # one
    message = one_process_of_several(env, num_processes=1)
    assert message is not None and "torchrun --standalone --nproc_per_node=2" in message
    (single,) = launched_environments(tmp_path, ["accelerate", "launch", "--cpu", "--num_processes", "1"])
    assert one_process_of_several(single, num_processes=1) is None  # one asked, one started


@pytest.mark.parametrize("launcher", [["torchrun", "--standalone", "--nproc_per_node=2"]], ids=["torchrun"])
def test_launchers_that_start_two_processes_are_not_reported(tmp_path, launcher):
    environments = launched_environments(tmp_path, launcher)
    assert len(environments) == 2
    assert all(one_process_of_several(env, num_processes=2) is None for env in environments)


def test_a_plain_python_run_is_not_reported():
    assert one_process_of_several({"PATH": "/usr/bin", "MASTER_ADDR": "10.0.0.1"}, num_processes=1) is None


def test_the_trainer_warns_when_accelerate_started_one_process_of_several(char_tokenizer, tmp_path, monkeypatch):
    from helpers.tiny_trainer import make_trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` leaves
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.warns(UserWarning, match="accelerate launch was asked for several processes but started one"):
        make_trainer(char_tokenizer, tmp_path)

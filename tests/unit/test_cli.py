"""The `trl grpo`-style command line: `python -m srpo_trl.train`, its help, rewards by name or import path, the
user's own dataset, and the README's "Your own task" commands run as written."""

import configparser
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from srpo_trl.cli import parse_args, resolve_reward_funcs
from srpo_trl.tasks import multiple_choice_reward, tool_use_reward
from srpo_trl.train import cli, main

ROOT = Path(__file__).resolve().parents[2]

REWARDS = """
def first_letter(completions, **kwargs):
    return [1.0 if c[0]["content"][:1].islower() else 0.0 for c in completions]
"""


def test_help_starts_with_a_description_and_an_example_and_lists_srpo_before_grpo():
    result = subprocess.run(
        [sys.executable, "-m", "srpo_trl.train", "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("usage: python -m srpo_trl.train [--config YAML]")
    assert (
        text.index("Train a model with SRPO")
        < text.index("python -m srpo_trl.train --config")
        < text.index("  -h, --help")
    )
    groups = [
        "Data, rewards and evaluation:",
        "SRPO (SRPOConfig):",
        "Model (trl.ModelConfig):",
        "GRPO and training (trl.GRPOConfig):",
    ]
    assert [text.index(group) for group in groups] == sorted(text.index(group) for group in groups)
    srpo, grpo = text.index("SRPO (SRPOConfig):"), text.index("GRPO and training (trl.GRPOConfig):")
    for name in ("--routing", "--success_reward_threshold", "--learning_rate", "--scale_rewards"):
        assert srpo < text.index(f"  {name} ") < grpo  # the paper's defaults of GRPO fields sit with SRPO's
    assert text.index("  --num_generations ") > grpo and text.index("  --dataset_name ") < srpo


def test_console_script_is_the_cli():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    (entry,) = [line for line in setup["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    name, target = (part.strip() for part in entry.split("="))
    module, function = target.split(":")
    assert name == "srpo-trl" and getattr(importlib.import_module(module), function) is cli


def test_reward_funcs_by_name_and_import_path(tmp_path, monkeypatch):
    from trl.rewards import think_format_reward

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS + "not_a_function = 3\n")
    names = ["chemistry", "tool_use", "multiple_choice", "think_format_reward", "my_rewards.first_letter"]
    funcs = resolve_reward_funcs(names)
    assert funcs[:4] == [multiple_choice_reward, tool_use_reward, multiple_choice_reward, think_format_reward]
    assert funcs[4].__name__ == "first_letter"
    errors = {
        "no_such_module.reward": r"--reward_funcs 'no_such_module.reward': no module named 'no_such_module' \(in ",
        "my_rewards.missing": r"'my_rewards.missing': module 'my_rewards' \(.*my_rewards.py\) has nothing named",
        "my_rewards.not_a_function": r"has int named 'not_a_function'",
        "accuracy": r"'accuracy': it is neither a known name nor an import path",
    }
    for name, message in errors.items():
        with pytest.raises(ValueError, match=message) as error:
            resolve_reward_funcs([name])
        assert "Give an import path package.module.function" in str(error.value)


def _own_task(tmp_path, columns=("prompt",), splits=("train", "test")):
    from srpo_trl.testbed import save_tiny_model

    data = tmp_path / "my_task"
    data.mkdir()
    for split in splits:
        rows = [{"prompt": [{"role": "user", "content": f"Spell {w}"}], "answer": w} for w in "abcdefgh"]
        rows = [{key: value for key, value in row.items() if key in (*columns, "answer")} for row in rows]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    save_tiny_model(tmp_path / "tiny")
    return [
        "--model_name_or_path", str(tmp_path / "tiny"), "--dataset_name", str(data),
        "--reward_funcs", "my_rewards.first_letter", "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "4", "--distillation_topk", "8", "--max_steps", "1",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--chat_template_kwargs", '{"enable_thinking": false}',
    ]  # fmt: skip


def test_own_jsonl_folder_trains_and_evaluates_on_its_test_split(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _own_task(tmp_path)
    argv += ["--eval_strategy", "steps", "--eval_steps", "1", "--per_device_eval_batch_size", "8"]
    argv += [
        "--eval_every_steps",
        "1",
        "--eval_k",
        "2",
        "--reward_weights",
        "0.5",
        "--success_reward_threshold",
        "0.5",
    ]
    trainer = main(*parse_args(argv))
    assert len(trainer.eval_dataset) == 8 and trainer.reward_func_names == ["first_letter"]
    logged = {key for row in trainer.state.log_history for key in row}
    assert {"srpo/route/sdpo_frac", "eval_reward", "eval_avg@2", "eval_mean_reward@2"} <= logged
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert f"Model saved to {tmp_path / 'out'}." in capsys.readouterr().out  # as `trl grpo` ends


def test_own_dataset_errors_name_the_argument_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _own_task(tmp_path, columns=("question",))
    with pytest.raises(ValueError, match=r"split has no 'prompt' column \(columns: \['answer'\]\)"):
        main(*parse_args(argv))
    with pytest.raises(ValueError, match="--task is for the paper's benchmarks, --dataset_name for your own data"):
        main(*parse_args([*argv, "--task", "physics"]))
    no_reward = [a for a in argv if a not in ("--reward_funcs", "my_rewards.first_letter")]
    with pytest.raises(ValueError, match="--dataset_name .* needs a reward: --reward_funcs"):
        main(*parse_args(no_reward))


def test_a_missing_test_split_turns_avg_at_k_off_unless_asked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _own_task(tmp_path, splits=("train",))
    with pytest.raises(ValueError, match=r"--dataset_test_split test: .* has the splits \['train'\]"):
        main(*parse_args([*argv, "--eval_every_steps", "2"]))
    trainer = main(*parse_args(argv))  # no test split, no evaluation asked for: trains
    assert not any("eval_avg@16" in row for row in trainer.state.log_history)
    # `trl grpo`'s --test_split_size carves one out of train.jsonl (seeded: the same rows on every process and run)
    trainer = main(*parse_args([*argv, "--test_split_size", "0.25", "--eval_every_steps", "1", "--eval_k", "2"]))
    assert len(trainer.train_dataset) == 6 and any("eval_avg@2" in row for row in trainer.state.log_history)


def test_example_scripts_default_task_and_the_cpu_recipe_parse():
    script_args, training_args, *_ = parse_args(["--use_cpu", "true", "--bf16", "false"], task="physics")
    assert script_args.task == "physics" and training_args.routing == "srpo"
    script_args, training_args, model_args, _ = parse_args(
        ["--config", str(ROOT / "recipes" / "cpu_tiny.yaml"), "--model_name_or_path", "tiny", "--dataset_name", "d"]
    )
    assert (training_args.use_cpu, training_args.bf16, model_args.dtype) == (True, False, "float32")
    assert training_args.per_device_train_batch_size // training_args.num_generations == 4  # prompts per step
    assert (script_args.eval_every_steps, script_args.eval_k, script_args.max_eval_samples) == (10, 4, 32)


def _readme_own_task() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Your own task") :].split("\n## ", 1)[0]


def _commands(section: str) -> list[str]:
    """Each `python ...` command of the section's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python ")]


@pytest.mark.slow
def test_readme_own_task_commands_train_and_route(tmp_path):
    # The README's files and commands as written, shortened to 2 steps with an evaluation (on the pre-trained tiny
    # model, cached by the demo, the notebook and the testbed tests: a cold cache adds its pre-training, minutes).
    section = _readme_own_task()
    for block in re.findall(r"```python\n(# (\S+\.py)\n.*?)```", section, re.S):
        (tmp_path / block[1]).write_text(block[0])
    assert {"make_data.py", "my_rewards.py"} <= {p.name for p in tmp_path.iterdir()}
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    commands = _commands(section)
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "srpo_trl.testbed"], ["python", "make_data.py"], ["python", "-m", "srpo_trl.train"]
    ]  # fmt: skip
    shorter = ["--max_steps", "2", "--eval_every_steps", "2", "--max_eval_samples", "8", "--disable_tqdm", "true"]
    for command in commands:
        argv = [sys.executable, *shlex.split(command)[1:]]
        argv += shorter if "srpo_trl.train" in command else []
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    routed = [float(v) for v in re.findall(r"'srpo/route/sdpo_frac': '([\d.e-]+)'", result.stdout)]
    assert len(routed) == 2 and max(routed) > 0, result.stdout[-3000:]  # it trains, and routes
    assert "'eval_avg@4'" in result.stdout and "'eval_mean_reward@4'" in result.stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "outputs" / "my_task")  # the README's reload
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path / "outputs" / "my_task"))


def test_usage_names_the_command_as_it_was_called():
    from srpo_trl import cli as cli_module

    assert cli_module._prog(str(ROOT / "srpo_trl" / "train.py")) == "python -m srpo_trl.train"
    assert cli_module._prog("/usr/local/bin/srpo-trl") == "srpo-trl"
    usage = cli_module.SRPOParser(prog="srpo-trl").format_usage()
    assert usage.startswith("usage: srpo-trl [--config YAML] [--task TASK | --dataset_name DATA]")


def test_without_data_or_model_the_error_names_what_is_missing(tmp_path, monkeypatch):
    # Nothing but a model on a CPU: no bf16 refusal first, no chemistry benchmark fetched from the Hub.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--model_name_or_path is required"):
        main(*parse_args([]))
    with pytest.raises(ValueError, match=r"No data: give --dataset_name .* or --task, one of the paper's benchmarks"):
        main(*parse_args(["--model_name_or_path", str(tmp_path / "tiny")]))


def test_datasets_mixture_streaming_and_test_split_size_as_trl_grpo_takes_them(tmp_path, monkeypatch):
    from trl import DatasetMixtureConfig

    from srpo_trl.train import _Splits

    monkeypatch.chdir(tmp_path)
    argv = _own_task(tmp_path, splits=("train",))
    data = argv[argv.index("--dataset_name") + 1]
    config = tmp_path / "mixture.yaml"
    config.write_text(f"datasets:\n  - path: {data}\n  - path: {data}\ntest_split_size: 0.25\n")
    mixture = [a for a in argv if a not in ("--dataset_name", data)] + ["--config", str(config)]
    script_args, training_args, _, dataset_args = parse_args(mixture)
    assert len(dataset_args.datasets) == 2 and dataset_args.test_split_size == 0.25
    splits = [_Splits(script_args, dataset_args) for _ in range(2)]
    assert [len(s.train()) for s in splits] == [12, 12] and [len(s.test()) for s in splits] == [4, 4]
    with pytest.raises(ValueError, match="a `datasets` mixture needs a reward: --reward_funcs"):
        main(*parse_args([a for a in mixture if a not in ("--reward_funcs", "my_rewards.first_letter")]))
    with pytest.raises(ValueError, match="--task is for the paper's benchmarks, a `datasets` mixture for your own"):
        main(*parse_args([*mixture, "--task", "physics"]))
    streamed, *_ = parse_args([*argv, "--dataset_streaming", "true", "--max_train_samples", "3"])
    assert len(list(_Splits(streamed, DatasetMixtureConfig()).train())) == 3  # an IterableDataset
    with pytest.raises(ValueError, match="--test_split_size cannot split a streamed dataset"):
        main(*parse_args([*argv, "--dataset_streaming", "true", "--test_split_size", "0.25"]))


@pytest.mark.slow
def test_readme_two_cpu_processes_command_starts_two(tmp_path):
    # The Scaling section's torchrun command on the "Your own task" files, one step: 2 processes x 4 prompts of the
    # 256 make 1/32 of an epoch (one process would make 1/64). A random tiny model: plumbing, not learning.
    from srpo_trl.testbed import save_tiny_model

    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```python\n(# (\S+\.py)\n.*?)```", _readme_own_task(), re.S):
        (tmp_path / block[1]).write_text(block[0])
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    subprocess.run([sys.executable, "make_data.py"], cwd=tmp_path, check=True)
    save_tiny_model(tmp_path / "tiny-qwen3")
    scaling = readme[readme.index("## Scaling") :].split("\n## ", 1)[0]
    (command,) = [c for c in re.findall(r"```bash\n(.*?)```", scaling, re.S)[0].replace("\\\n", " ").splitlines()
                  if c.startswith("torchrun")]  # fmt: skip
    argv = [*shlex.split(command), "--max_steps", "1", "--eval_every_steps", "0", "--disable_tqdm", "true"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'epoch': '0.03125'" in result.stdout and result.stdout.count("Training completed.") == 1


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--eval_k", "-2"], r"--eval_k must be an integer >= 1; got -2"),
        (["--eval_k", "0"], r"--eval_k must be an integer >= 1; got 0"),
        (["--max_train_samples", "-3"], r"--max_train_samples must be an integer >= 1; got -3"),
        (["--max_eval_samples", "0"], r"--max_eval_samples must be an integer >= 1"),
        (["--eval_every_steps", "-5"], r"--eval_every_steps must be an integer >= 0 \(0: no avg@k\); got -5"),
        (["--eval_max_new_tokens", "0"], r"--eval_max_new_tokens must be an integer >= 1"),
        (["--eval_temperature", "0"], r"--eval_temperature must be > 0"),
        (["--eval_top_p", "1.5"], r"--eval_top_p must be in \(0, 1\]"),
        (["--eval_budgets_hours", "0"], r"--eval_budgets_hours must be positive numbers of hours"),
    ],
)
def test_cli_argument_checks_name_the_flag(flags, match):
    # Before: a negative count sliced the data silently, a zero temperature or interval failed after the first step.
    with pytest.raises(ValueError, match=match):
        parse_args(["--model_name_or_path", "tiny", "--dataset_name", "data", *flags])


def test_a_streamed_training_set_needs_max_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _own_task(tmp_path)
    argv[argv.index("--max_steps") + 1] = "-1"
    with pytest.raises(ValueError, match=r"streamed training set .* set --max_steps"):
        main(*parse_args([*argv, "--dataset_streaming", "true", "--max_train_samples", "3"]))

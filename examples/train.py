"""SRPO training, as `python -m srpo_trl.train` (`--help` lists the arguments): one of the paper's benchmarks
(`accelerate launch examples/train.py --task physics --config ...`), or your own data and rewards (`--dataset_name
my_task --reward_funcs my_rewards.correctness`)."""

from srpo_trl.train import cli

if __name__ == "__main__":
    cli()

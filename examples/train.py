"""Train any of the five benchmarks with SRPO: `accelerate launch examples/train.py --task physics --config ...`."""

from srpo_trl.train import cli

if __name__ == "__main__":
    cli()

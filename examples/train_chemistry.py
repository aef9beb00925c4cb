"""SRPO on SciKnowEval Chemistry, the paper's headline setting.

    accelerate launch --config_file accelerate_configs/zero3.yaml examples/train_chemistry.py \
        --config recipes/qwen3_8b/srpo.yaml
"""

from srpo_trl.train import cli

if __name__ == "__main__":
    cli(task="chemistry")

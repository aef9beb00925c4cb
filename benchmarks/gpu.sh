#!/usr/bin/env bash
# The step-cost benchmark (benchmarks/step_cost/) on one GPU, and the GPU block of benchmarks/RESULTS.md written
# from it (with the PNG and the JSON of every record): bf16, a randomly initialised Qwen3-0.6B-shaped model (vocab
# 151,936, hidden 1024, 28 layers, tied embeddings), nothing downloaded. Step time of GRPO/SRPO/SDPO against the routed
# fraction f (wall clock, CUDA-synchronised), the teacher forward with and without one prefix per group (1-7 routed
# rollouts per group), a profile, and peak memory (torch.cuda.max_memory_allocated, one fresh process per
# configuration) as the vocabulary and the completion length grow. What the block must show: RESULTS.md, "Findings".
#
#   benchmarks/gpu.sh                    # full: f in {0, .25, .4, .5, 1}, 5 repeats, k = 1..7, vocab and length sweeps
#   benchmarks/gpu.sh --quick            # f in {0, .4, 1}, 3 repeats, k in {1, 4, 7}, 2 + 2 sweep points
#   benchmarks/gpu.sh --quick --skip-memory   # the shortest run that still fills the timing and prefix tables
#
# The block is rewritten on every run (it names the mode it was measured in); re-report saved records with
#   python -m benchmarks.step_cost --report benchmarks/results-cuda-full.json --write-results
#
# Offline GPU machines: the script needs torch with CUDA plus this repository's pins (trl 1.16, transformers,
# accelerate, datasets, peft) and matplotlib. Where some are missing, build a wheelhouse on a connected machine of the
# same platform and Python, put it in benchmarks/wheels/ (or point WHEELS at it), and this script installs from it
# without the network:
#   pip download --only-binary=:all: -d benchmarks/wheels "trl>=1.16,<1.17" "transformers>=5.10.4,<6" \
#       "accelerate>=1.15,<2" "datasets>=4.7,<6" "peft>=0.21,<0.22" matplotlib   # setup.cfg's ranges
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${WHEELS:-benchmarks/wheels}"
PYTHON="${PYTHON:-python3}"

missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "trl", "accelerate", "datasets", "peft", "matplotlib"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n "$missing" ]]; then
    if [[ -d "$WHEELS" ]]; then
        echo "installing from $WHEELS: $missing"
        "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $missing
    else
        echo "missing: $missing (no wheelhouse at $WHEELS; see the header of $0)" >&2
        exit 1
    fi
fi
# The benchmark imports this checkout's srpo_trl, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: run python -m benchmarks.step_cost for the CPU benchmark")
props = torch.cuda.get_device_properties(0)
print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

exec "$PYTHON" -m benchmarks.step_cost --device cuda --write-results "$@"

#!/usr/bin/env bash
# The step-cost benchmark (benchmarks/step_cost.py) on one GPU: bf16, a randomly initialised Qwen3-0.6B-shaped model
# (vocab 151,936, hidden 1024, 28 layers, tied embeddings), nothing downloaded. Timing on the wall clock with CUDA
# synchronisation, peak memory from torch.cuda.max_memory_allocated, one fresh process per memory configuration.
#
#   benchmarks/gpu.sh                    # full: f in {0, .25, .4, .5, 1}, 5 repeats, vocab and length sweeps
#   benchmarks/gpu.sh --quick            # a few minutes
#   benchmarks/gpu.sh --write-results    # also rewrite the GPU block of benchmarks/RESULTS.md (+ step_time_vs_f_cuda.png)
#
# Offline GPU machines: the script needs torch with CUDA plus this repository's pins (trl 1.16, transformers 5.23,
# accelerate, datasets, peft) and matplotlib. Where some are missing, build a wheelhouse on a connected machine of
# the same platform and Python, put it in benchmarks/wheels/ (or point WHEELS at it), and this script installs from it
# without the network:
#   pip download --only-binary=:all: -d benchmarks/wheels \
#       trl==1.16.0 transformers==5.23.0 accelerate==1.15.0 "datasets>=4,<6" peft==0.21.2 matplotlib
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${WHEELS:-benchmarks/wheels}"
PYTHON="${PYTHON:-python}"

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
if ! "$PYTHON" -c "import srpo_trl" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
        || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: run benchmarks/step_cost.py for the CPU benchmark")
props = torch.cuda.get_device_properties(0)
print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

exec "$PYTHON" benchmarks/step_cost.py --device cuda "$@"

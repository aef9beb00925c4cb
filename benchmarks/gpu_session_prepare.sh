#!/usr/bin/env bash
# Builds .gpu/ (ignored by git), everything benchmarks/gpu_session.sh carries to a GPU machine of kind nvidia-h200
# (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft, pyarrow, matplotlib, ... and no network):
#   .gpu/wheels  the packages that machine lacks, at the versions installed here (the ones the tests run):
#                trl, datasets and datasets' dill and multiprocess. Not deepspeed (one GPU needs no ZeRO; it ships
#                as source only) nor vllm (a CUDA wheel is ~400 MB) nor trackio (the rehearsal logs nowhere).
#   .gpu/data    the SciKnowEval Chemistry splits the rehearsal trains and evaluates on (../shared/data).
# The device tool carries at most 64 MiB a call; this stays under 60 MiB and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DATA_SOURCE="${GPU_SESSION_DATA_SOURCE:-../shared/data}"
LIMIT_MIB=60

rm -rf .gpu/wheels .gpu/data
mkdir -p .gpu/wheels .gpu/data/sciknoweval
read -ra pins <<<"$("$PYTHON" benchmarks/gpu_session.py pins)"  # gpu_session.NEEDED, at the versions here
# All four are py3-none-any or py312-none-any wheels, which pip takes for any --platform named; the platforms are the
# machine's (x86-64, glibc 2.28+), for a package with compiled wheels added later.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels "${pins[@]}"
cp -r "$DATA_SOURCE/sciknoweval/chemistry" .gpu/data/sciknoweval/

size_kib=$(du -sk .gpu/wheels .gpu/data | awk '{s += $1} END {print s}')
echo "carried: ${pins[*]} and $(du -sh .gpu/data | cut -f1) of data"
echo ".gpu/: $((size_kib / 1024)) MiB ($size_kib KiB; limit ${LIMIT_MIB} MiB)"
if ((size_kib > LIMIT_MIB * 1024)); then
    echo "over ${LIMIT_MIB} MiB: the device tool carries at most 64 MiB a call" >&2
    exit 1
fi

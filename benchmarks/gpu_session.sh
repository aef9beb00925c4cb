#!/usr/bin/env bash
# The first run of a session lent a GPU (one H200, no network), within 8 minutes, every result under $OUT:
#   install       the wheels that machine lacks (.gpu/wheels, from `make gpu-session-prepare`), into a folder
#   environment   versions there (in summary.md)
#   rehearsal     examples/train_chemistry.py --config recipes/qwen3_8b/srpo.yaml as shipped on one GPU, 6 steps, a
#                 random Qwen3-0.6B-shaped answering model, vLLM off: rehearsal_trainer_state.json, a RESULTS block
#   memory_probe  benchmarks/memory_probe.py, peak memory per phase at Qwen3-8B width: memory_probe.json
#   step_cost     benchmarks/step_cost/ --quick --skip-memory: results-cuda-quick.json, its PNG, a RESULTS block
# then summary.md (each stage's exit code and seconds, what it cannot cover, the RESULTS blocks) and logs.tar.gz.
# Each stage has its own timeout (450 s in all) and none stops the others. Checkpoints and models stay in /tmp: the
# device tool brings back at most 8 files of 16 MiB each, and $OUT holds 7.
#
#   make gpu-session-prepare                                       # here, once: builds .gpu/ (<= 60 MiB)
#   run(command="benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=540)   # the device tool
#   GPU_SESSION_DRY=1 OUT=/tmp/out benchmarks/gpu_session.sh       # CPU, toy sizes (tests/end_to_end/test_gpu_session.py)
# Afterwards, here: copy summary.md's blocks into benchmarks/RESULTS.md (the step-cost block also with
#   python -m benchmarks.step_cost --report <files_at>/results-cuda-quick.json --write-results).
set -uo pipefail  # not -e: a failed stage is recorded and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=python3
DRY="${GPU_SESSION_DRY:-0}"
OUT="${OUT:-$ROOT/outputs/gpu-session}"  # the device tool sets OUT; outputs/ is ignored, never carried
DATA="${GPU_SESSION_DATA:-$ROOT/.gpu/data}"
WHEELS="${GPU_SESSION_WHEELS:-$ROOT/.gpu/wheels}"
WORK=$(mktemp -d /tmp/srpo-gpu-session.XXXXXX)
mkdir -p "$OUT" "$WORK/logs"

# Nothing there reaches the network: every library offline, no tracker.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_DISABLED=true
export TRACKIO_DIR="$WORK/trackio" HF_HOME="$WORK/hf" HF_DATASETS_CACHE="$WORK/hf/datasets"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1 DO_NOT_TRACK=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
dry_flag=()
if [[ "$DRY" == 1 ]]; then
    dry_flag=(--dry)
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
fi

# stage NAME SECONDS COMMAND...: run under its own timeout, log to $WORK/logs/NAME.log, record exit code and seconds.
stage() {
    local name=$1 limit=$2 start=$SECONDS code
    shift 2
    timeout --kill-after=5 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" "$limit" >>"$WORK/stages.tsv"
    echo "[$name] exit $code in $((SECONDS - start)) s (limit $limit s)"
    [[ $code == 0 ]] || tail -n 8 "$WORK/logs/$name.log"
    return "$code"
}

# The dry run installs for Python 3.12 too, but keeps its own packages (the wheels are another Python's).
if stage install 30 "$PYTHON" benchmarks/gpu_session.py install --wheels "$WHEELS" --target "$WORK/site" &&
    [[ "$DRY" != 1 && -d "$WORK/site" ]]; then
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
stage environment 20 "$PYTHON" benchmarks/gpu_session.py environment "$WORK/environment.json"
stage rehearsal 170 "$PYTHON" benchmarks/gpu_session.py rehearsal --work "$WORK" --data "$DATA" --out "$OUT" \
    "${dry_flag[@]}"
stage memory_probe 120 "$PYTHON" benchmarks/memory_probe.py --out "$OUT/memory_probe.json" "${dry_flag[@]}"
stage step_cost 110 "$PYTHON" benchmarks/gpu_session.py step-cost --work "$WORK" --out "$OUT" "${dry_flag[@]}"
"$PYTHON" benchmarks/gpu_session.py summary --work "$WORK" --out "$OUT" "${dry_flag[@]}" >/dev/null
code=$?
cat "$OUT/summary.md"
rm -rf "$WORK"
exit "$code"

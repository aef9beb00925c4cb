#!/usr/bin/env bash
# The first run of a session lent a GPU (one H200, no network): the recipe rehearsal on one GPU, then the step-cost
# benchmark (benchmarks/gpu.sh), within about 8 minutes, both writing their figures to benchmarks/RESULTS.md.
#
# Rehearsal: `examples/train_chemistry.py --config recipes/qwen3_8b/srpo.yaml` as shipped (bf16, gradient
# checkpointing, the recipe's batch layout, evaluation and checkpoints), on one GPU with a randomly initialised
# Qwen3-0.6B-shaped model that answers with a letter (tests/recipe_rehearsal.py), for 10 steps. vLLM is switched off:
# the GPU image has no vLLM and a CUDA vLLM wheel (~400 MB) is over what a call can carry (64 MiB); the CPU engine
# covers that path (make test-vllm).
#
# Prepare on the CPU machine, once (nothing here reaches the network):
#   mkdir -p .gpu && cp -r ../shared/data .gpu/data && grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels \
#       trl==1.16.0 datasets dill xxhash multiprocess pyarrow matplotlib   # what the image lacks (KINDS.md)
# Then, with the device tool: run(command="benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export WHEELS="${WHEELS:-.gpu/wheels}" PYTHON PYTHONPATH="$PWD:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-.gpu/out}"
mkdir -p "$OUT_DIR"

if [[ -d "$WHEELS" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

start=$(date +%s)
"$PYTHON" - <<'EOF'
import torch

from recipe_rehearsal import answering_tiny_model
from srpo_trl.testbed.tokenizer import build_char_tokenizer

tokenizer = build_char_tokenizer()  # Qwen3-0.6B's width, depth and vocabulary; its heads are 64 wide, not 128
model = answering_tiny_model(tokenizer, hidden_size=1024, num_heads=16, num_layers=28, vocab_size=151936)
model.to(torch.bfloat16).save_pretrained(".gpu/model")
tokenizer.save_pretrained(".gpu/model")
print(f"rehearsal model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
EOF

accelerate launch --config_file accelerate_configs/single_gpu.yaml examples/train_chemistry.py \
    --config recipes/qwen3_8b/srpo.yaml --model_name_or_path .gpu/model --data_path .gpu/data \
    --output_dir "$OUT_DIR/rehearsal" --max_train_samples 512 --max_eval_samples 16 --max_completion_length 256 \
    --max_steps 10 --eval_every_steps 5 --eval_k 4 --save_steps 5 --use_vllm false --report_to none \
    2>&1 | tee "$OUT_DIR/rehearsal.log" | grep -E "'loss'|eval_avg|Error" || true
rehearsal_s=$(( $(date +%s) - start ))

"$PYTHON" - "$OUT_DIR/rehearsal" "$rehearsal_s" <<'EOF'
import json, pathlib, sys
from step_cost_report import write_block

folder, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
history = json.loads((last / "trainer_state.json").read_text())["log_history"]
rows = [r for r in history if "loss" in r]
lines = [
    f"`benchmarks/gpu_session.sh`: recipes/qwen3_8b/srpo.yaml on one GPU, a random Qwen3-0.6B-shaped model, "
    f"{len(rows)} steps in {seconds} s (model build and evaluation included).",
    "",
    "| step | loss | srpo/route/sdpo_frac | srpo/loss/sdpo | srpo/time/teacher_s | step_time |",
    "|---|---|---|---|---|---|",
]
lines += [
    f"| {r['step']} | {r['loss']:.4f} | {r.get('srpo/route/sdpo_frac', 0):.3f} | {r.get('srpo/loss/sdpo', 0):.5f} "
    f"| {r.get('srpo/time/teacher_s', 0):.3f} | {r.get('step_time', 0):.3f} |"
    for r in rows
]
evaluations = [r for r in history if any(k.startswith("eval_avg@") for k in r)]
lines.append(f"\nEvaluations: {evaluations}; checkpoints kept: {sorted(p.name for p in folder.glob('checkpoint-*'))}")
write_block(pathlib.Path("benchmarks/RESULTS.md"), "gpu-rehearsal", "\n".join(lines))
EOF

exec benchmarks/gpu.sh --quick --skip-memory

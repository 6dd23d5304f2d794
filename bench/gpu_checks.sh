#!/usr/bin/env bash
# The measurements issue 17 leaves for a GPU, as one command for a lent H100 / H200, run from the repository root:
#
#   bash bench/gpu_checks.sh "$OUT"          # JSON lines and logs into $OUT; a few minutes
#
# 1. bench/step_ratio.py at LLaMA-7B layer shapes (hidden 4096, intermediate 11008, 2 layers, r 64, bf16, 2 x 2048
#    tokens): MiLoRA offset / subtract against plain LoRA, lora_dropout 0.05 and 0, wall time, device synchronised.
# 2. The same shapes at r 128 (the paper's and LLaVA-1.5's visual rank, where the offset form's extra arithmetic is
#    largest: 4.0% of a LoRA step at LLaMA-2-7B's shapes, counted), offset with either offset_backward,
#    lora_dropout 0.05 (LLaVA's).
# 3. bench/step_ratio.py on the CPU table's stack (hidden 1024), bf16: the same shapes as BENCHMARKS.md's CPU rows.
# 4. bench/packing.py: padded / grouped / packed useful tokens per second, bf16, a 4-layer hidden-2048 model.
#
# Both benchmarks import torch, transformers, peft and this checkout only (no deepspeed, no datasets), which the GPU
# image has; the checkout goes on PYTHONPATH, so nothing is installed. Environment: PYTHON (default python3),
# DEVICE (default cuda), GPU_CHECKS_SMALL=1 (tiny sizes: what the test suite runs on a CPU to check the plumbing).
set -euo pipefail

OUT=${1:-gpu_checks_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${GPU_CHECKS_SMALL:-0}" == "1" ]]; then
  BIG=(--hidden 64 --intermediate 128 --layers 1 --vocab 64 --batch 2 --seq 16 --rounds 2 --warmup 1)
  RANK128=(--r 8)  # r 128 needs matrices of rank 128
  STACK=("${BIG[@]}")
  PACK=(--samples 4 --batch 2 --hidden 64 --layers 1)
else
  BIG=(--hidden 4096 --intermediate 11008 --layers 2 --batch 2 --seq 2048 --rounds 30)
  RANK128=(--r 128)
  STACK=(--rounds 30)
  PACK=(--samples 512 --batch 16 --hidden 2048 --layers 4)
fi

{
  date -u +%FT%TZ
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  # what the two benchmarks import, so that a missing package stops the run here, by name (a package the image lacks
  # goes into ../shared/gpu/bundle_wheels.sh's .whl folder: its extra arguments)
  "$PY" -c "import torch, transformers, peft, milora_vlm.milora, milora_vlm.model.load, milora_vlm.data.collator; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} | tee "$OUT/machine.txt"

run() {  # NAME ARGS...: stdout (JSON lines) to OUT/NAME.jsonl, stderr to OUT/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$PY" "$@" 2> "$OUT/$name.log" | tee "$OUT/$name.jsonl"
  echo "== $name: $((SECONDS - start)) s"
}
run step_ratio_7b_layers bench/step_ratio.py --device "$DEVICE" --dtype bf16 "${BIG[@]}"
run step_ratio_7b_layers_r128 bench/step_ratio.py --device "$DEVICE" --dtype bf16 "${BIG[@]}" "${RANK128[@]}" \
  --variants offset offset_residual_copy --dropout 0.05
run step_ratio_stack bench/step_ratio.py --device "$DEVICE" --dtype bf16 "${STACK[@]}"
run packing bench/packing.py --device "$DEVICE" --dtype bf16 "${PACK[@]}"

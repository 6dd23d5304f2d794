#!/usr/bin/env bash
# The embedded default: MiLoRA on a tiny LLaVA, easy-VQA data, no download.
#
#   bash scripts/demo.sh [OUTPUT_DIR]          (default OUTPUT_DIR: demo_out)
#
# 1. data_prep/easy_vqa.py: easy-VQA (pip package, images inside) as two task families:
#    old = "what color is the shape?" ("pretrained knowledge"), new = "what is the <colour> shape?" ("new task").
# 2. scripts/build_demo_base.py: stage 0, a tiny LLaVA trained from scratch on the old family (reused when present).
# 3. scripts/train_vlm.py under the deepspeed launcher (GPUs) or torchrun (2 CPU processes): MiLoRA on the language model (configs/demo/easyvqa_milora.yaml), on the new
#    family plus 40% replayed old-family questions (train_new_replay.jsonl; DEMO_TRAIN_FILE=train_new.jsonl: none).
# 4. eval/generate.py + eval/score.py: base and finetuned model on both families' test questions (on CPU the two
#    models side by side, one process each).
# 5. scripts/demo_report.py: the table (printed, results.md) and results.json.
#
# Environment: DEMO_TRAIN_FILE (stage-2 data in OUTPUT_DIR/data, default train_new_replay.jsonl), NUM_GPUS (default: the GPUs torch sees; 2 CPU processes on a machine without one),
# DEMO_EVAL_LIMIT (test questions per family, default 0 = all: 1,280 old and 1,257 new), DEMO_TRAIN_ARGS (extra overrides for
# train_vlm.py, e.g. "--max_steps 20"), DEMO_BASE_ARGS (extra scripts/build_demo_base.py options, e.g. cut-down
# sizes for tests), DEMO_MAX_TRAIN (training questions per family written by step 1; default all).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-demo_out}" && cd "${1:-demo_out}" && pwd)"
cd "$ROOT"
START=$(date +%s)
PY=${PYTHON:-python}

if [[ -z "${NUM_GPUS:-}" ]]; then
  # without nvidia-smi there is no GPU to count: no torch import (seconds on a loaded CPU box) to learn it
  if command -v nvidia-smi > /dev/null 2>&1; then
    NUM_GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  else
    NUM_GPUS=0
  fi
fi
PORT=${MASTER_PORT:-$((29500 + RANDOM % 400))}
LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT")
CPU=0
if [[ "$NUM_GPUS" == "0" ]]; then
  # CPU: two DeepSpeed processes (gloo), one thread each; more threads per process are 5-10x slower on a
  # 2-core box (measured, see README). The single-process steps keep torch's default threads. torchrun starts
  # them: the deepspeed launcher's own two processes each import deepspeed first, ~9 s more per launch on the
  # loaded 2-core box (bench/startup.py, BENCHMARKS.md); the pipeline runs the same under either.
  CPU=1
  NUM_GPUS=2
  LAUNCH=(env "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" "$PY" -m torch.distributed.run --nproc_per_node 2 --master_port "$PORT")
fi
EVAL_LIMIT=${DEMO_EVAL_LIMIT:-0}
TRAIN_FILE=${DEMO_TRAIN_FILE:-train_new_replay.jsonl}

step() { echo; echo "=== [demo $(($(date +%s) - START)) s] $*"; }
mark() { date +%s > "$OUT/timing.$1"; }  # stage end times, read by demo_report.py
mark start

step "1/5 data: easy-VQA -> $OUT/data"
if [[ -f "$OUT/data/summary.json" ]]; then
  echo "already converted ($OUT/data/summary.json)"
else
  $PY data_prep/easy_vqa.py --output "$OUT/data" ${DEMO_MAX_TRAIN:+--max-train "$DEMO_MAX_TRAIN"}
fi
if [[ "$EVAL_LIMIT" != "0" ]]; then
  # the same seeded subset for every model
  $PY scripts/demo_report.py subset --input "$OUT/data/test_old.jsonl" --limit "$EVAL_LIMIT" --output "$OUT/eval/questions_old.jsonl"
  $PY scripts/demo_report.py subset --input "$OUT/data/test_new.jsonl" --limit "$EVAL_LIMIT" --output "$OUT/eval/questions_new.jsonl"
else
  mkdir -p "$OUT/eval"
  cp "$OUT/data/test_old.jsonl" "$OUT/eval/questions_old.jsonl"
  cp "$OUT/data/test_new.jsonl" "$OUT/eval/questions_new.jsonl"
fi
cat "$OUT/eval/questions_old.jsonl" "$OUT/eval/questions_new.jsonl" > "$OUT/eval/questions_all.jsonl"
mark data

step "2/5 base model (stage 0) -> $OUT/base"
# shellcheck disable=SC2086
$PY scripts/build_demo_base.py --data "$OUT/data" --output "$OUT/base" --logging-dir "$OUT/base_runs" ${DEMO_BASE_ARGS:-}
mark base

step "3/5 MiLoRA finetuning on the new task: ${LAUNCH[*]}"
rm -rf "$OUT/milora"
# shellcheck disable=SC2086
"${LAUNCH[@]}" scripts/train_vlm.py --config configs/demo/easyvqa_milora.yaml \
  --model.path "$OUT/base" --data.train_file "$OUT/data/$TRAIN_FILE" --data.image_folder "$OUT/data/images" \
  --output_dir "$OUT/milora" ${DEMO_TRAIN_ARGS:-}
mark train

step "4/5 answers and scores (base and MiLoRA, old and new family)"
generate() {  # one generation pass of model $1 over both families, run by the command words after it
  local model=$1
  shift
  "$@" eval/generate.py --model "$OUT/$model" --template chatml \
    --question-file "$OUT/eval/questions_all.jsonl" --image-folder "$OUT/data/images" \
    --answers-file "$OUT/eval/answers_$model.jsonl" --max-new-tokens 8 --batch-size 64
}
# Old answers go first: generate.py resumes from an existing answers file, and these models may be new.
rm -f "$OUT"/eval/answers_{base,milora}.jsonl "$OUT"/eval/answers_{base,milora}.jsonl.part*
if [[ "$CPU" == "1" ]]; then
  # the two models side by side, one single-threaded process each: the same two cores' work as two 2-process
  # launches in turn, without the launcher's own processes and with half the model loads
  pids=()
  for model in base milora; do
    generate "$model" env OMP_NUM_THREADS=1 "$PY" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
else
  for model in base milora; do  # the launcher splits the questions across its processes
    generate "$model" "${LAUNCH[@]}"
  done
fi
for model in base milora; do
  for family in old new; do
    $PY eval/score.py --task exact --predictions "$OUT/eval/answers_$model.jsonl" --allow-unknown \
      --questions "$OUT/eval/questions_$family.jsonl" --output "$OUT/eval/score_${model}_$family.json" > /dev/null
  done
done
mark eval

step "5/5 results"
$PY scripts/demo_report.py report --output "$OUT"

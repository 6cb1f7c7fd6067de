#!/usr/bin/env bash
# Hyperparameter sweeps on the device, following a plan file (experiments/sweeps/*.json): for each format,
# two processes (plans "A" and "B") share one GPU (the reference models are too small to fill it;
# timings under this sharing are only indicative).
#   bash experiments/gpu_sweep.sh PLAN.json MODEL_DIR CORPUS_DIR OUT_DIR
set -uo pipefail
plan=$1; model=$2; corpus=$3; out=$4
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache OMP_NUM_THREADS=4
name=$(basename "$model"); tag=$(basename "$plan" .json)
# warm the tokenizer cache once, so the processes do not race to write it
python3 -c "from llm.pipeline import load_data; load_data('$model', '$corpus/train.txt.xz', '$corpus/validation.txt.xz', 512, 8)"
variants() { python3 -c "import json,sys; [print(json.dumps(v)) for v in json.load(open('$plan'))['$1']['$2']]"; }
steps=$(python3 -c "import json; print(json.load(open('$plan'))['steps'])")
for fmt in $(python3 -c "import json; print(' '.join(json.load(open('$plan'))['formats']))"); do
  for part in A B; do
    mapfile -t calib < <(variants $part calib); mapfile -t ft < <(variants $part finetune)
    timeout "${LIMIT_S:-560}" python3 -m experiments.sweep "$model" --train "$corpus/train.txt.xz" \
      --validation "$corpus/validation.txt.xz" --steps "$steps" --budget-s "${BUDGET_S:-470}" --format "$fmt" \
      --out "$out/${tag}_${name}_${fmt}_$part.json" --calib "${calib[@]}" --finetune "${ft[@]}" \
      > "$out/log_${tag}_${name}_${fmt}_$part.txt" 2>&1 &
  done
done
wait
for f in "$out"/log_*; do echo "== $f"; grep -E '^\{|Error|error' "$f" | cut -c1-300; done

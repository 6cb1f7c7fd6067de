#!/usr/bin/env bash
# Hyperparameter sweeps on the device, following a plan file (experiments/sweeps/*.json): every entry
# of its "runs" (a format, calibration variants, fine-tuning variants) is one process, and all of them
# share the one GPU (the reference models are too small to fill it; timings are only indicative).
# Each writes its JSON as it goes, and each is stopped after LIMIT_S seconds, so a run cut short keeps
# what it measured; then everything is packed into OUT_DIR/TAG_MODEL.tgz (the device returns few files).
#   bash experiments/gpu_sweep.sh PLAN.json MODEL_DIR CORPUS_DIR OUT_DIR
set -uo pipefail
plan=$1; model=$2; corpus=$3; final=$4
out=$(mktemp -d)
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache OMP_NUM_THREADS=2
name=$(basename "$model"); tag=$(basename "$plan" .json)
# warm the tokenizer cache once, so the processes do not race to write it
python3 -m experiments.warm_tokenizer "$model" "$corpus"
field() { python3 -c "import json; r=json.load(open('$plan'))['runs'][$1]; v=r['$2']; print(v if isinstance(v, str) else '\n'.join(json.dumps(x) for x in v))"; }
steps=$(python3 -c "import json; print(json.load(open('$plan'))['steps'])")
n=$(python3 -c "import json; print(len(json.load(open('$plan'))['runs']))")
for i in $(seq 0 $((n - 1))); do
  fmt=$(field $i format); run=$(field $i name)
  mapfile -t calib < <(field $i calib); mapfile -t ft < <(field $i finetune)
  timeout "${LIMIT_S:-560}" python3 -m experiments.sweep "$model" --train "$corpus/train.txt.xz" \
    --validation "$corpus/validation.txt.xz" --steps "$steps" --budget-s "${BUDGET_S:-470}" --format "$fmt" \
    --out "$out/${tag}_${name}_${fmt}_$run.json" --calib "${calib[@]}" --finetune "${ft[@]}" \
    > "$out/log_${tag}_${name}_${fmt}_$run.txt" 2>&1 &
done
wait
for f in "$out"/log_*; do echo "== $(basename "$f")"; grep -E '^\{|Error|error' "$f" | cut -c1-300; done
tar czf "$final/${tag}_$name.tgz" -C "$out" .

#!/usr/bin/env bash
# The acceptance run on the device: the whole pipeline (calibrate, fine-tune with every strategy at
# equal steps and data, evaluate) for one reference model at ~2 and ~1 bits, with the CLI's tuned
# defaults. The two formats run side by side on the one GPU (the reference models leave it mostly
# idle), so each reported time is an upper bound on that format's time alone.
#   bash experiments/gpu_pipeline.sh MODEL_DIR CORPUS_DIR OUT_DIR [STEPS]
# Environment: FORMATS (default "2x8g8 1x8g8"), STRATEGIES, LIMIT_S (per run), EXTRA (more CLI flags).
set -uo pipefail
model=$1; corpus=$2; out=$3; steps=${4:-200}
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache OMP_NUM_THREADS=8
name=$(basename "$model")
python3 -c "from llm.pipeline import load_data; load_data('$model', '$corpus/train.txt.xz', '$corpus/validation.txt.xz', 512, 8)"
for fmt in ${FORMATS:-2x8g8 1x8g8}; do
  cmd=(python3 -m llm.cli pipeline "$model" --train "$corpus/train.txt.xz" --validation "$corpus/validation.txt.xz"
       --out "/tmp/runs/$name-$fmt" --format "$fmt" --strategies "${STRATEGIES:-pv,continuous,ste,stochastic,linearized_pv}"
       --steps "$steps" --device cuda ${EXTRA:-})
  echo "${cmd[*]}" > "$out/command_${name}_$fmt.txt"
  ( timeout "${LIMIT_S:-570}" "${cmd[@]}" > "$out/log_${name}_$fmt.txt" 2>&1; echo "$fmt exit $?" ) &
done
wait
for fmt in ${FORMATS:-2x8g8 1x8g8}; do
  tr '\r' '\n' < "$out/log_${name}_$fmt.txt" | grep -E "error|Error|ppl|summary" | tail -12
  cp "/tmp/runs/$name-$fmt/summary.json" "$out/summary_${name}_$fmt.json" 2>/dev/null
  cp "/tmp/runs/$name-$fmt/calibrated/meta.json" "$out/calibration_${name}_$fmt.json" 2>/dev/null
done

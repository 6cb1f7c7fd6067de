#!/usr/bin/env bash
# The acceptance run on the device: the whole pipeline for one reference model at ~2 and ~1 bits.
#   bash experiments/gpu_pipeline.sh MODEL_DIR CORPUS_DIR OUT_DIR [STEPS]
# Environment: FORMATS (default "2x8g8 1x8g8"), STRATEGIES, NSAMPLES, ROUNDS, BLOCK_TUNE, LIMIT_S (per format),
# EXTRA (more CLI flags). Logs and summaries go to OUT_DIR.
set -uo pipefail
model=$1; corpus=$2; out=$3; steps=${4:-200}
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache
name=$(basename "$model")
for fmt in ${FORMATS:-2x8g8 1x8g8}; do
  timeout "${LIMIT_S:-590}" python3 -m llm.cli pipeline "$model" --train "$corpus/train.txt.xz" \
    --validation "$corpus/validation.txt.xz" --out "/tmp/runs/$name-$fmt" --format "$fmt" \
    --strategies "${STRATEGIES:-continuous,pv,ste,stochastic,linearized_pv}" --steps "$steps" \
    --nsamples "${NSAMPLES:-1024}" --rounds "${ROUNDS:-4}" --block-tune-steps "${BLOCK_TUNE:-100}" \
    --device cuda ${EXTRA:-} > "$out/log_${name}_$fmt.txt" 2>&1
  echo "$fmt exit $?"
  tr '\r' '\n' < "$out/log_${name}_$fmt.txt" | grep -v -E "Warning|warn|Loading weights" | grep -E "error|Error|ppl|100%|s/it|it/s" | awk 'NR%1==0' | tail -40
  cp "/tmp/runs/$name-$fmt/summary.json" "$out/summary_${name}_$fmt.json" 2>/dev/null
  cp "/tmp/runs/$name-$fmt/calibrated/meta.json" "$out/calibration_${name}_$fmt.json" 2>/dev/null
done

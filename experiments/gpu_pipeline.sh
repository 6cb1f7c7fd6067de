#!/usr/bin/env bash
# The acceptance run on the device: the whole pipeline for one reference model at ~2 and ~1 bits.
#   bash experiments/gpu_pipeline.sh MODEL_DIR CORPUS_DIR OUT_DIR [STEPS]
set -uo pipefail
model=$1; corpus=$2; out=$3; steps=${4:-200}
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache
for fmt in 2x8g8 1x8g8; do
  python3 -m llm.cli pipeline "$model" --train "$corpus/train.txt.xz" --validation "$corpus/validation.txt.xz" \
    --out "/tmp/runs/$fmt" --format "$fmt" --strategies continuous,pv,ste,stochastic,linearized_pv \
    --steps "$steps" --nsamples 1024 --rounds 4 --block-tune-steps 100 --ft-batch-size 16 --device cuda 2>&1 \
    | grep -v -E "Warning|warn|Loading weights|it/s\]$"
  cp "/tmp/runs/$fmt/summary.json" "$out/summary_$(basename "$model")_$fmt.json"
done

#!/usr/bin/env bash
# The README's main table for one reference model in one device call (session 7 recipe): the 2x8g8 and the
# 1x8g8 pipeline as two processes sharing the GPU, each calibrating once and then fine-tuning every strategy
# of STRATEGIES in turn at equal steps and data (2x8g8: 260 steps x 128 sequences, 1x8g8: 220 x 64; fresh
# sequences every step; V step LAMB at lr 1e-3; 2x8g8 PV with p_lr 3e-2). Each pipeline rewrites its
# summary after every strategy, so a call cut at LIMIT_S keeps the strategies that finished.
#   bash experiments/gpu_main_table.sh OUT_DIR MODEL_NAME     (carry .cache/pack/MODEL_NAME and the corpus)
#   env: STRATEGIES (pv,ste,continuous), FORMATS (2x8g8,1x8g8: either alone runs it alone), LIMIT_S (575)
# Writes OUT_DIR/summary_FORMAT.json, OUT_DIR/log_FORMAT.txt and OUT_DIR/commands.txt.
set -uo pipefail
out=$1; name=$2; mkdir -p "$out"
: "${LIMIT_S:=575}"
source "$(dirname "$0")/device_common.sh"
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache
bash experiments/unpack_cache.sh "$name"
model=.cache/models/$name; corpus=.cache/corpus
python3 -m experiments.warm_tokenizer "$model" "$corpus" > /dev/null 2>&1
common=(--train "$corpus/train.txt.xz" --validation "$corpus/validation.txt.xz" --strategies "${STRATEGIES:-pv,ste,continuous}"
        --micro-batch-size 64 --v-optimizer lamb --lr 1e-3 --device cuda)
two_bit=(python3 -m llm.cli pipeline "$model" --out "/tmp/$name-2x8g8" --format 2x8g8 "${common[@]}" --steps 260
         --ft-batch-size 128 --rounds 12 --tolerance 0.002 --block-tune-steps 500 --strategy-settings '{"pv":{"p_lr":0.03}}')
one_bit=(python3 -m llm.cli pipeline "$model" --out "/tmp/$name-1x8g8" --format 1x8g8 "${common[@]}" --steps 220 --ft-batch-size 64)
formats=${FORMATS:-2x8g8,1x8g8}
launch() {  # FORMAT COMMAND...: in the background, if FORMATS names FORMAT
  [[ ,$formats, == *,$1,* ]] || return 0
  echo "${*:2}" >> "$out/commands.txt"
  until_deadline "${@:2}" > "$out/log_$1.txt" 2>&1 &
}
: > "$out/commands.txt"
launch 2x8g8 "${two_bit[@]}"
launch 1x8g8 "${one_bit[@]}"
wait
for fmt in ${formats//,/ }; do
  cp "/tmp/$name-$fmt/summary.json" "$out/summary_$fmt.json" 2>/dev/null && grep -a -A8 "^model " "$out/log_$fmt.txt"
done

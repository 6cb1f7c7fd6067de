#!/usr/bin/env bash
# Sessions 3-6's acceptance runs (their results' commands call it; the current recipe, the README's main
# table, is experiments/gpu_main_table.sh): for each reference model and format, calibrate once, then fine-tune
# the calibrated model with every strategy at equal steps and data, each strategy in its own process
# (the reference models leave the GPU mostly idle, so everything shares it: reported times are upper
# bounds on each part alone). Merged summaries are copied to OUT_DIR every 20 s, so a call cut by its
# time limit keeps what finished; logs and exact commands are packed into OUT_DIR/logs.tgz at the end.
#   bash experiments/gpu_pipeline.sh OUT_DIR MODEL_DIR...      (corpus in .cache/corpus)
# Environment: FORMATS (default "2x8g8 1x8g8"), STRATEGIES, STEPS (200), LIMIT_S (560: every process ends by then,
# counted from this script's start, so the merge still runs), EXTRA (CLI flags),
# RUNS (working folder, default /tmp/runs; separate ones let several of these run at once).
set -uo pipefail
out=$1; shift
corpus=${CORPUS:-.cache/corpus}
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache OMP_NUM_THREADS=2
runs=${RUNS:-/tmp/runs}; mkdir -p "$runs" "$out"
source "$(dirname "$0")/device_common.sh"
strategies=${STRATEGIES:-continuous pv ste stochastic linearized_pv}
first=${strategies%% *}; rest=${strategies#"$first"}
pipeline() {  # MODEL FORMAT STRATEGY
  local name; name=$(basename "$1")
  local cmd=(python3 -m llm.cli pipeline "$1" --train "$corpus/train.txt.xz" --validation "$corpus/validation.txt.xz"
             --out "$runs/$name-$2-$3" --format "$2" --strategies "$3" --steps "${STEPS:-200}" --device cuda ${EXTRA:-})
  echo "${cmd[*]}" >> "$runs/commands.txt"
  until_deadline "${cmd[@]}" > "$runs/log_$name-$2-$3.txt" 2>&1
}
for model in "$@"; do
  python3 -m experiments.warm_tokenizer "$model" "$corpus"
  for fmt in ${FORMATS:-2x8g8 1x8g8}; do
    name=$(basename "$model")
    pipeline "$model" "$fmt" "$first" &
    (  # once calibrated, the other strategies start from a copy of that checkpoint
      wait_for_calibration "$runs/$name-$fmt-$first"
      for s in $rest; do
        start_from_calibration "$runs/$name-$fmt-$first" "$runs/$name-$fmt-$s"
        pipeline "$model" "$fmt" "$s" &
      done
      wait
    ) &
  done
done
merge() { for model in "$@"; do python3 -m experiments.merge_summaries "$runs" "$(basename "$model")" "$out/summary_$(basename "$model").json"; done; }
( while sleep 20; do merge "$@"; done ) &
copier=$!
wait $(jobs -p | grep -v "^$copier$") 2>/dev/null
kill $copier 2>/dev/null
merge "$@"
tar czf "$out/logs.tgz" -C "$runs" $(cd "$runs" && ls log_* commands.txt)
for model in "$@"; do python3 -m experiments.merge_summaries --table "$out/summary_$(basename "$model").json"; done

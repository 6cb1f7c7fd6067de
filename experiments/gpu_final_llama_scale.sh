#!/usr/bin/env bash
# One device call: the ref-llama 2x8g8 pipeline (all strategies) beside the Llama-2-7B-shaped scale benchmark.
#   bash experiments/gpu_final_llama_scale.sh OUT_DIR
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1
( LIMIT_S=${LIMIT_S:-520} FORMATS=2x8g8 bash experiments/gpu_pipeline.sh .cache/models/ref-llama .cache/corpus "$out" 200 ) &
( while sleep 15; do cp /tmp/runs/ref-llama-2x8g8/summary.json "$out/summary_ref-llama_2x8g8.json" 2>/dev/null; done ) &
copier=$!
timeout "${LIMIT_S:-520}" python3 -m experiments.bench_scale --out "$out/bench_scale_7b.json" --rounds 4 --block-tune-steps 50 \
  > "$out/log_bench_scale.txt" 2>&1
echo "bench_scale exit $?"; grep -v -i warn "$out/log_bench_scale.txt" | tail -8
wait %1
kill $copier

#!/usr/bin/env bash
# Fine-tuning runs from one calibration (issue 4): MODEL (ref-llama) calibrated once (CALIB flags, default the
# short calibration: 4 rounds, 300 block-tuning steps; they are passed to every run), then each run of SPECS (by default each strategy
# at 16 and at 64 sequences of 512 tokens per step) fine-tuned for STEPS steps, every run its own process
# from a copy of the calibrated checkpoint (all share the GPU). Writes OUT_DIR/large_batch.json
# ({run: summary}) and logs.tgz.
#   bash experiments/gpu_large_batch.sh OUT_DIR   (carry .cache/pack/MODEL and the corpus, see make_cache_pack.sh)
#   env: MODEL (ref-llama), FMT (1x8g8), STEPS (100), CALIB, SPECS, LIMIT_S (540: every run ends by then, so the merge still runs)
set -uo pipefail
out=$1; mkdir -p "$out"
: "${LIMIT_S:=540}"
source "$(dirname "$0")/device_common.sh"
export PYTHONUNBUFFERED=1 PVTUNING_CACHE=/tmp/pvtuning-cache OMP_NUM_THREADS=2
bash experiments/unpack_cache.sh "${MODEL:=ref-llama}"
model=.cache/models/$MODEL; corpus=.cache/corpus; runs=/tmp/large-batch-$MODEL-${FMT:-1x8g8}; mkdir -p "$runs"
run() {  # NAME STRATEGY BATCH MICRO_BATCH [STRATEGY_SETTINGS_JSON [MORE CLI FLAGS...]]
  local cmd=(python3 -m llm.cli pipeline "$model" --train "$corpus/train.txt.xz" --validation "$corpus/validation.txt.xz"
             --out "$runs/$1" --format "${FMT:-1x8g8}" --strategies "$2" --steps "${STEPS:-100}" --ft-batch-size "$3"
             --micro-batch-size "$4" ${CALIB:---rounds 4 --block-tune-steps 300} --device cuda)
  if [ -n "${5:-}" ]; then cmd+=(--strategy-settings "$5"); fi
  cmd+=("${@:6}")
  echo "${cmd[*]}" >> "$runs/commands.txt"
  until_deadline "${cmd[@]}" > "$runs/log_$1.txt" 2>&1
}
python3 -m experiments.warm_tokenizer "$model" "$corpus"
run b16-continuous continuous 16 16 &
wait_for_calibration "$runs/b16-continuous"
default_specs='b16-pv pv 16 16;b16-ste ste 16 16;b64-continuous continuous 64 32;b64-pv pv 64 32;b64-ste ste 64 32;b64-pv-tau1e-2 pv 64 32 {"pv":{"tau":0.01}}'
IFS=';' read -ra specs <<< "${SPECS:-$default_specs}"   # env SPECS: "NAME STRATEGY BATCH MICRO [JSON [FLAGS]];..."
for spec in "${specs[@]}"; do
  IFS=' ' read -ra parts <<< "$spec"
  set -- "${parts[@]}"
  start_from_calibration "$runs/b16-continuous" "$runs/$1"
  run "$@" &
done
wait
python3 - "$runs" "$out/large_batch.json" <<'PY'
import json, sys, pathlib
runs = pathlib.Path(sys.argv[1])
merged = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(runs.iterdir()) if (d / "summary.json").exists()}
pathlib.Path(sys.argv[2]).write_text(json.dumps(merged, indent=1))
for name, s in merged.items():
    for strat, r in s.get("runs", {}).items():
        print(f"{name:16s} calibrated {s['ppl_calibrated']:.3f} -> {r['ppl']:.3f}  ({r['steps']} steps, {r['seconds']} s, {r['codes_changed_total']} code changes)")
PY
tar czf "$out/logs.tgz" -C "$runs" $(cd "$runs" && ls log_* commands.txt)

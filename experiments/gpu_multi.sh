#!/usr/bin/env bash
# Multi-GPU run (device kind nvidia-h200-x2): PV-Tuning at world size 1 and 2 with the same global batch,
#  - ref-llama 2x8g8 (calibrated here with shorter settings: the comparison is of the fine-tuning), 100 steps
#    of 32 sequences x 512 tokens;
#  - a Llama-2-7B-shaped model with random weights and 2x8g8 codes, 4 steps of 2 sequences x 4096 tokens;
# then the loss curves compared. NVLink multicast stays off (the device README).
#   bash experiments/gpu_multi.sh OUT_DIR
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
       OMP_NUM_THREADS=4 PVTUNING_CACHE=/tmp/pvtuning-cache
model=.cache/models/ref-llama; corpus=.cache/corpus; logs=$(mktemp -d)
run() { echo "$*" >> "$logs/commands.txt"; timeout "${LIMIT_S:-240}" "$@"; echo "exit $? : $*"; }
run python3 -m llm.cli calibrate $model --train $corpus/train.txt.xz --out /tmp/ck-2x8g8 --format 2x8g8 \
  --rounds 4 --block-tune-steps 300 --device cuda > "$logs/log_calibrate.txt" 2>&1
for n in 1 2; do
  run python3 -m torch.distributed.run --nproc-per-node $n -m experiments.dist_finetune \
    --out "$out/ref-llama_2x8g8_world$n.json" --checkpoint /tmp/ck-2x8g8 --model $model --train $corpus/train.txt.xz \
    --steps 100 --batch-size 32 > "$logs/log_ref-llama_world$n.txt" 2>&1
done
for n in 1 2; do
  run python3 -m torch.distributed.run --nproc-per-node $n -m experiments.dist_finetune \
    --out "$out/llama2-7b-shape_world$n.json" --random 7b --steps 4 --batch-size 2 > "$logs/log_7b_world$n.txt" 2>&1
done
python3 - "$out" <<'PY'
import json, sys
from experiments.dist_finetune import compare
out = sys.argv[1]
res = {}
for name in ("ref-llama_2x8g8", "llama2-7b-shape"):
    try:
        res[name] = compare(f"{out}/{name}_world1.json", f"{out}/{name}_world2.json")
    except (OSError, KeyError, ValueError) as e:
        res[name] = {"error": str(e)}
json.dump(res, open(f"{out}/multi_gpu_compare.json", "w"), indent=1)
print(json.dumps(res, indent=1))
PY
tar czf "$out/logs_multi.tgz" -C "$logs" .
for f in "$logs"/log_*; do echo "== $f"; grep -v -i "warn\|Loading\|it/s" "$f" | tail -4 | cut -c1-400; done

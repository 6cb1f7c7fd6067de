#!/usr/bin/env bash
# The inference-kernel run on the device: CUDA tests, matrix-vector benchmark, end-to-end decoding.
#   bash experiments/gpu_kernels.sh OUT_DIR        (carry .cache/pack; see make_cache_pack.sh)
# Results: OUT_DIR/gpu_matvec.json, OUT_DIR/gpu_decode.json and OUT_DIR/logs.tgz. All three parts take
# longer than one 10-minute device call (Triton compiles every tile per layer shape): PARTS="tests matvec"
# in one call and PARTS=decode in the next.
set -uo pipefail
out=$1
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
logs=/tmp/kernel-logs; mkdir -p "$logs"
bash experiments/unpack_cache.sh ref-llama ref-mistral
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv > "$logs/nvidia-smi.txt"
parts=${PARTS:-tests matvec decode}
if [[ " $parts " == *" tests "* ]]; then
  python3 -m pytest -q tests/test_llm_cuda.py tests/test_llm_kernels.py 2>&1 | tee "$logs/tests.txt" | tail -5
fi
if [[ " $parts " == *" matvec "* ]]; then
  python3 -m experiments.bench_kernels --device cuda --out "$out/gpu_matvec.json" ${MATVEC_ARGS:-} 2>&1 | tee "$logs/matvec.txt"
fi
if [[ " $parts " == *" decode "* ]]; then
  python3 -m experiments.bench_decode --model .cache/models/ref-llama --model .cache/models/ref-mistral --seven-b \
    --device cuda --out "$out/gpu_decode.json" ${DECODE_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$logs/decode.txt"
fi
tar czf "$out/logs.tgz" -C "$logs" .

#!/usr/bin/env bash
# Here: pack ../shared's reference models and corpus into .cache/pack (ignored by git) for the device.
# One model and the corpus fit in a call's 64 MiB; carry .cache/pack/NAME, .cache/pack/train.txt.xz and
# .cache/pack/validation.txt.xz (both models and the corpus do not fit).
set -euo pipefail
shared=${1:-../shared}
mkdir -p .cache/pack
for name in ref-llama ref-mistral; do
  mkdir -p ".cache/pack/$name"
  cp "$shared/models/$name"/*.json ".cache/pack/$name/"
  xz -T2 -9 -c "$shared/models/$name/model.safetensors" > ".cache/pack/$name/model.safetensors.xz"
done
cp "$shared/corpus/train.txt.xz" "$shared/corpus/validation.txt.xz" .cache/pack/
du -sh .cache/pack

#!/usr/bin/env bash
# On the device: rebuild .cache/models/NAME and .cache/corpus from the carried .cache/pack (the reference
# models xz-compressed, the corpus as it is). Make the pack here with experiments/make_cache_pack.sh.
#   bash experiments/unpack_cache.sh ref-llama [ref-mistral]
set -euo pipefail
mkdir -p .cache/corpus
cp .cache/pack/train.txt.xz .cache/pack/validation.txt.xz .cache/corpus/
for name in "$@"; do
  mkdir -p ".cache/models/$name"
  cp .cache/pack/"$name"/*.json ".cache/models/$name/"
  xz -dc ".cache/pack/$name/model.safetensors.xz" > ".cache/models/$name/model.safetensors"
done

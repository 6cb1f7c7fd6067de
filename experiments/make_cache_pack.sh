#!/usr/bin/env bash
# Here: pack ../shared's reference models and corpus into .cache/pack (ignored by git) for the device.
set -euo pipefail
shared=${1:-../shared}
mkdir -p .cache/pack
for name in ref-llama ref-mistral; do
  mkdir -p ".cache/pack/$name"
  cp "$shared/models/$name"/*.json ".cache/pack/$name/"
  xz -T2 -9 -c "$shared/models/$name/model.safetensors" > ".cache/pack/$name/model.safetensors.xz"
done
python3 -c "
import lzma, sys
text = lzma.open('$shared/corpus/train.txt.xz', 'rt', encoding='utf-8').read(20_000_000)
with lzma.open('.cache/pack/train.txt.xz', 'wt', encoding='utf-8', preset=9) as f: f.write(text)"
cp "$shared/corpus/validation.txt.xz" .cache/pack/
du -sh .cache/pack

"""Does a model's Hugging Face AQLM export give our logits? Quantize every block linear with random codes
and codebooks (the export does not depend on their values), export, load the export with transformers
+ aqlm, and compare the logits of both on random tokens (CPU, float32).

    python -m experiments.export_roundtrip --model SmolLM2-135M-Instruct.Q4_1.gguf --format 2x8g8 \
        --out experiments/results/smollm2/export_roundtrip_2x8g8.json

aqlm 1.1.7's CPU kernel sums into shared outputs from parallel loop iterations (a race that gives
wrong sums with several threads), so the comparison runs numba on one thread.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from experiments.bench_scale import quantize_randomly
from llm.export import export_aqlm
from llm.formats import QuantFormat
from llm.model import load_model
from pvtheory.io import write_json


def roundtrip(model_path, fmt: str, tokens: int = 24, seed: int = 0) -> dict:
    """Max |logit difference| between our quantized model and its export loaded by transformers + aqlm."""
    import numba
    from transformers import AutoModelForCausalLM

    model = load_model(model_path)
    quantize_randomly(model, QuantFormat.parse(fmt))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "codebooks"):
                m.codebooks.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    numba.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        export_aqlm(model, model_path, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        with torch.no_grad():
            ours, theirs = model(ids).logits, hf(ids).logits
        return {"model": Path(model_path).name, "format": fmt, "tokens": tokens,
                "aqlm_layer_type": type(hf.model.layers[0].mlp.down_proj).__module__,
                "tie_word_embeddings": bool(hf.config.tie_word_embeddings),
                "head_tied_after_loading": hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(),
                "max_abs_logit_difference": float((ours - theirs).abs().max()),
                "max_abs_logit": float(ours.abs().max())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory or GGUF file")
    ap.add_argument("--format", default="2x8g8", help="an AQLM format")
    ap.add_argument("--out", required=True, help="JSON to write")
    a = ap.parse_args(argv)
    t0 = time.time()
    res = roundtrip(a.model, a.format)
    res["seconds"] = round(time.time() - t0, 1)
    write_json(a.out, res)
    print(res)


if __name__ == "__main__":
    main()

"""GPU probe: the perplexity protocol that matches the reference cards, and calibration quality/time.

    python -m experiments.gpu_probe MODEL_DIR TRAIN VALIDATION OUT_JSON [--formats 2x8g8,1x8g8]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.data import calibration_sequences, load_tokenizer, tokenize, windows
from llm.evaluate import perplexity
from llm.formats import model_bits
from llm.model import load_model
from pvtheory.io import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model"), ap.add_argument("train"), ap.add_argument("validation"), ap.add_argument("out")
    ap.add_argument("--formats", default="2x8g8,1x8g8")
    ap.add_argument("--nsamples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--v-steps", type=int, default=100)
    ap.add_argument("--block-tune-steps", type=int, default=0)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = "cuda"
    tok = load_tokenizer(args.model)
    t = time.time()
    val = tokenize(args.validation, tok)
    train = tokenize(args.train, tok, max_chars=4_000_000)
    res = {"tokenize_seconds": round(time.time() - t, 1), "validation_tokens": val.numel()}
    card = json.loads((Path(args.model) / "reference_card.json").read_text())
    res["card"] = card
    model = load_model(args.model, torch.bfloat16, dev)
    w = windows(val, 512)
    bos = torch.cat([torch.full((len(w), 1), tok.bos_token_id), windows(val, 511)[: len(w)]], 1)
    t = time.time()
    res["ppl_bf16_plain_windows"] = perplexity(model, w, batch_size=64, progress=False)
    res["ppl_bf16_eval_seconds"] = round(time.time() - t, 2)
    res["ppl_bf16_bos_windows"] = perplexity(model, bos, batch_size=64, progress=False)
    print({k: v for k, v in res.items() if k.startswith("ppl")}, "card", card["validation_ppl_bf16_seq512"], flush=True)
    base = load_model(args.model, torch.float32, "cpu")
    res["ppl_fp32_plain_windows"] = perplexity(base.to(dev), w, batch_size=64, progress=False)
    base.to("cpu")
    calib = calibration_sequences(train, 512, args.nsamples, seed=0)
    res["runs"] = []
    for fmt in args.formats.split(","):
        q = copy.deepcopy(base)
        cfg = CalibrationConfig(fmt=fmt, rounds=args.rounds, v_steps=args.v_steps, batch_size=32,
                                block_tune_steps=args.block_tune_steps)
        torch.cuda.synchronize()
        t = time.time()
        rep = calibrate(q, calib, cfg, device=dev, progress=False)
        torch.cuda.synchronize()
        secs = time.time() - t
        q.to(dev)
        ppl32 = perplexity(q, w, batch_size=64, progress=False)
        ppl16 = perplexity(q, w, batch_size=64, dtype=torch.bfloat16, progress=False)
        run = {"format": fmt, "calibration_seconds": round(secs, 1), "ppl_fp32": ppl32, "ppl_bf16_autocast": ppl16,
               "bits": model_bits(q), "config": rep["config"], "block_mse": [b["output_mse"] for b in rep["blocks"]],
               "layer_errors_first": rep["layers"][0]["relative_error"], "layer_errors_last": rep["layers"][-1]["relative_error"]}
        res["runs"].append(run)
        print(fmt, {k: run[k] for k in ("calibration_seconds", "ppl_fp32", "ppl_bf16_autocast")},
              round(run["bits"]["bits_per_quantized_weight"], 3), flush=True)
        q.to("cpu")
    write_json(args.out, res)


if __name__ == "__main__":
    main()

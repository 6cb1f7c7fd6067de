"""Is the per-layer calibration converged? Layers of a model's blocks (--blocks; the first by default), quantized alone
(real input Hessians from calibration sequences) with the default settings, with a much stronger
search, with longer k-means, and from other seeds. Relative errors tr(dW H dW') / tr(W H W').

    python -m experiments.layer_convergence --model ../shared/models/ref-llama --corpus ../shared/corpus \
        --format 1x8g8 --out experiments/results/ablations/layer_convergence_1x8g8.json
(--corpus holds train.txt.xz and validation.txt.xz; 64 sequences of 512 tokens, CPU, a few minutes.)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

import torch

from llm.calibrate import CalibrationConfig, capture_block_inputs, collect_hessians, quantize_linear, run_block
from llm.formats import QuantFormat
from llm.model import block_linears, decoder_layers, load_model
from llm.pipeline import load_data
from pvtheory.io import write_json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--format", default="1x8g8")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--layers", default="self_attn.q_proj,mlp.down_proj")
    ap.add_argument("--blocks", default="0", help="comma-separated decoder blocks whose layers are quantized")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    seqs, _ = load_data(args.model, f"{args.corpus}/train.txt.xz", f"{args.corpus}/validation.txt.xz", 512, args.nsamples)
    model = load_model(args.model)
    inputs, kwargs = capture_block_inputs(model, seqs, 16, torch.device("cpu"))
    names = args.layers.split(",")
    blocks = sorted(int(b) for b in args.blocks.split(","))
    fmt, base = QuantFormat.parse(args.format), CalibrationConfig(fmt=args.format)
    variants = {"default": base,
                "4 rounds": replace(base, rounds=4),
                "30 rounds, beam 8, no tolerance": replace(base, rounds=30, beam_width=8, tolerance=0.0),
                "4x k-means iterations": replace(base, kmeans_iters=4 * base.kmeans_iters),
                **{f"seed {s}": replace(base, seed=s) for s in (1, 2, 3)}}
    rows = []
    for i, block in enumerate(decoder_layers(model)):
        if i > blocks[-1]:
            break
        if i in blocks:
            H, _ = collect_hessians(block, inputs, kwargs, names)
            linears = block_linears(block, names)
            for label, cfg in variants.items():
                for name in names:
                    t0 = time.time()
                    _, errs = quantize_linear(linears[name], H[name], fmt, cfg)
                    rows.append({"variant": label, "layer": f"model.layers.{i}.{name}", "init_error": errs[0],
                                 "final_error": errs[-1], "rounds": len(errs) // 2,
                                 "seconds": round(time.time() - t0, 1), "config": asdict(cfg)})
                    print(f"{label:32s} {i:2d} {name:18s} {errs[0]:.4f} -> {errs[-1]:.4f}  ({rows[-1]['rounds']} rounds)",
                          flush=True)
        inputs = run_block(block, inputs, kwargs)  # the original model's activations into the next block
    write_json(args.out, {"model": args.model, "format": args.format, "nsamples": args.nsamples, "blocks": blocks,
                          "rows": rows})


if __name__ == "__main__":
    main()

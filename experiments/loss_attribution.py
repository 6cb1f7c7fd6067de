"""Which layers the perplexity lost to quantization comes from: every block linear of a model quantized on
its own (from the original model's inputs, no block tuning), then perplexity with subsets of the quantized
layers swapped in (one layer kind at a time, one third of the blocks at a time, everything).

    python -m experiments.loss_attribution MODEL --train train.txt.xz --validation validation.txt.xz \
        --format 2x8g8 --nsamples 64 --eval-windows 32 --out experiments/results/smollm2/loss_attribution_2x8g8.json

Every layer's Hessian comes from the original model's activations (not the sequential ones calibration
uses), so each subset's loss is what quantizing only those layers costs. Per layer: the relative output
error tr(dW H dW') / tr(W H W') after the layer's calibration, and diagnostics of its input Hessian
(largest over mean diagonal entry). The quantized weights are kept in a cache file (--cache), so a rerun
with other subsets quantizes nothing again.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llm.calibrate import CalibrationConfig, capture_block_inputs, collect_hessians, quantize_linear, run_block
from llm.layer_objective import relative_error
from llm.evaluate import perplexity
from llm.formats import QuantFormat
from llm.model import BLOCK_LINEARS, block_linears, decoder_layers, load_model
from llm.pipeline import train_sequences, validation_windows
from pvtheory.io import write_json

KINDS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
         "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


def quantize_every_layer(model, seqs, cfg: CalibrationConfig, device, batch_size: int = 8) -> tuple[dict, list]:
    """{"i.name": decoded quantized weight (CPU, float32)} and a report row per layer, each layer calibrated
    alone from the original model's inputs."""
    weights, rows = {}, []
    inputs, kwargs = capture_block_inputs(model, seqs, batch_size, device)
    for i, block in enumerate(tqdm(decoder_layers(model), desc="quantize every layer")):
        block.to(device)
        H, _ = collect_hessians(block, inputs, kwargs, BLOCK_LINEARS)
        for name, linear in block_linears(block).items():
            t = time.time()
            q, errs = quantize_linear(linear, H[name], QuantFormat.parse(cfg.fmt), cfg)
            W, Hn = linear.weight.detach().float(), H[name].float()
            d = Hn.diagonal()
            weights[f"{i}.{name}"] = q.weight().detach().float().cpu()
            rows.append({"block": i, "layer": name.split(".")[-1], "shape": list(W.shape),
                         "relative_error": float(relative_error(weights[f"{i}.{name}"].to(device), W, Hn)),
                         "hessian_diag_max_over_mean": float(d.max() / d.mean().clamp_min(1e-30)),
                         "rounds_run": (len(errs) - 1) // 2, "seconds": round(time.time() - t, 2)})
        inputs = run_block(block, inputs, kwargs)  # the original model's activations, never the quantized ones
        block.to("cpu")
    return weights, rows


def swapped(model, weights: dict, keep) -> list:
    """Swap in the quantized weights of the layers `keep(block, kind)` chooses; returns the originals to restore."""
    saved = []
    for key, W in weights.items():
        i, name = key.split(".", 1)
        if keep(int(i), name.split(".")[-1]):
            lin = block_linears(decoder_layers(model)[int(i)], [name])[name]
            saved.append((lin, lin.weight.data.clone()))
            lin.weight.data.copy_(W.to(lin.weight.device, lin.weight.dtype))
    return saved


def restore(saved: list) -> None:
    for lin, W in saved:
        lin.weight.data.copy_(W)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--train", required=True)
    ap.add_argument("--validation", required=True)
    ap.add_argument("--format", default="2x8g8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=64, help="calibration sequences for the Hessians")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--cache", default=None, help="file of the quantized weights (default: beside --out)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = CalibrationConfig(fmt=a.format, rounds=a.rounds, block_tune_steps=0).validate()
    model = load_model(a.model, torch.float32, "cpu")
    n_blocks = len(decoder_layers(model))
    cache = Path(a.cache or Path(a.out).with_suffix(".weights.pt"))
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        weights, rows = saved["weights"], saved["rows"]
    else:
        seqs = train_sequences(a.model, a.train, a.seq_len, a.nsamples, seed=0)
        for m in (model.get_input_embeddings(), getattr(model.model, "rotary_emb", None)):
            if m is not None:
                m.to(device)
        weights, rows = quantize_every_layer(model, seqs, cfg, device)
        model.to("cpu")
        torch.save({"weights": weights, "rows": rows}, cache)
    val = validation_windows(a.model, a.validation, a.seq_len, a.eval_windows)
    model.to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def ppl() -> float:
        return perplexity(model, val, batch_size=8, device=device, dtype=amp, progress=False)

    thirds = [(0, n_blocks // 3), (n_blocks // 3, 2 * n_blocks // 3), (2 * n_blocks // 3, n_blocks)]
    subsets = {"none": lambda i, k: False, "all": lambda i, k: True,
               "attention": lambda i, k: k in ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": lambda i, k: k in ("gate_proj", "up_proj", "down_proj")}
    subsets.update({f"only_{k}": (lambda i, kk, k=k: kk == k) for k in KINDS})
    subsets.update({f"blocks_{lo}-{hi - 1}": (lambda i, k, lo=lo, hi=hi: lo <= i < hi) for lo, hi in thirds})
    subsets.update({f"block_{b}": (lambda i, k, b=b: i == b) for b in (0, 1, n_blocks - 1)})
    result = {}
    for name, keep in subsets.items():
        saved = swapped(model, weights, keep)
        result[name] = ppl()
        restore(saved)
        print(f"{name:16s} ppl {result[name]:9.3f}", flush=True)
    base = result["none"]
    by_kind = {k: sum(r["relative_error"] for r in rows if r["layer"] == k) / n_blocks for k in KINDS}
    write_json(a.out, {
        "what": "perplexity with subsets of the layers quantized, each layer calibrated alone from the original "
                "model's activations (no block tuning), and each layer's relative output error",
        "model": str(a.model), "format": a.format, "rounds": a.rounds, "nsamples": a.nsamples, "seq_len": a.seq_len,
        "eval_windows": len(val), "device": str(device),
        "perplexity": result, "perplexity_increase": {k: v / base - 1 for k, v in result.items()},
        "mean_relative_error_by_kind": by_kind, "layers": rows})


if __name__ == "__main__":
    main()

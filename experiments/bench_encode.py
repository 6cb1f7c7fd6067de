"""Time and peak memory of a layer's P-step projections (encode; nearest_beyond, the other code of stochastic
rounding) for large codebooks, on the CPU or a GPU: one layer, random codes and codebooks, Adam-like weights.

    python -m experiments.bench_encode --formats vq12g8,1x8g8 --shape 1024 4096 --out encode.json
    python -m experiments.bench_encode --formats vq12g8,1x8g8 --shape 1024 4096 --kmeans --out kmeans.json

Each format runs in its own process, so the peak resident memory (CPU) or peak allocation (GPU) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from pvtheory.io import write_json


def measure_kmeans(fmt: str, out_features: int, in_features: int, device: str, iters: int = 5) -> dict:
    """Seconds and peak memory of calibration's initialization: residual k-means of the layer's groups."""
    from llm.formats import QuantFormat
    from pvtheory.init import residual_kmeans

    q = QuantFormat.parse(fmt)
    torch.manual_seed(0)
    W = torch.randn(out_features, in_features, device=device)
    t0 = time.perf_counter()
    residual_kmeans(W, W.shape, q.num_codebooks, 1 << q.bits, q.group_size, iters)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"format": fmt, "shape": [out_features, in_features], "kmeans_iters": iters,
            "kmeans_seconds": round(time.perf_counter() - t0, 2), "peak_gib": round(_peak(device), 2), "device": device}


def _peak(device: str) -> float:
    return (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def measure(fmt: str, out_features: int, in_features: int, device: str) -> dict:
    """Seconds of encode(all groups) and nearest_beyond (stochastic rounding's other code), and the peak memory of both."""
    from llm.formats import QuantFormat, make_quantized

    torch.manual_seed(0)
    layer = make_quantized(torch.nn.Linear(in_features, out_features, bias=False), QuantFormat.parse(fmt)).to(device)
    scalar = not hasattr(layer, "codebooks")
    K = 1 << layer.fmt.bits if scalar else layer.codebooks.shape[1]
    with torch.no_grad():
        (layer.scales if scalar else layer.codebooks).normal_()
        layer.set_codes(torch.randint(0, K, layer.codes_view().shape, device=device))
    target = torch.randn(out_features, in_features, device=device)
    weights = torch.rand(out_features, in_features, device=device) + 0.1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    layer.encode(target, weights=weights)
    sync()
    t1 = time.perf_counter()
    layer.as_param().nearest_beyond(target, layer.codes_view())
    sync()
    t2 = time.perf_counter()
    peak = _peak(device)
    return {"format": fmt, "shape": [out_features, in_features], "groups": layer.codes_view().shape[0],
            "codebook_entries": K, "encode_seconds": round(t1 - t0, 2), "nearest_beyond_seconds": round(t2 - t1, 2),
            "peak_gib": round(peak, 2), "device": device}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="vq12g8,1x8g8", help="comma-separated formats")
    ap.add_argument("--shape", type=int, nargs=2, default=[1024, 4096], metavar=("OUT", "IN"), help="layer shape")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help="JSON to write")
    ap.add_argument("--kmeans", action="store_true", help="measure calibration's residual k-means instead")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process measuring one format
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps((measure_kmeans if a.kmeans else measure)(a.one, *a.shape, a.device)))
        return
    rows = []
    for fmt in a.formats.split(","):
        child = subprocess.run([sys.executable, "-m", "experiments.bench_encode", "--one", fmt, "--shape",
                                *map(str, a.shape), "--device", a.device, *(["--kmeans"] if a.kmeans else [])],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if a.out:
        write_json(a.out, {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()

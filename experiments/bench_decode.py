"""End-to-end greedy decoding speed: quantized models against the same model in 16 bits.

    python -m experiments.bench_decode --model ../shared/models/ref-llama --seven-b --smollm2 --batch 1,8 \
        --device cuda --out experiments/results/kernels/gpu_decode.json
    python -m experiments.bench_decode --model ../shared/models/ref-llama --device cpu --dtype float32 \
        --out experiments/results/kernels/cpu_decode.json

For each model (a reference model directory; with --seven-b a Llama-2-7B-shaped model and with
--smollm2 a SmolLM2-135M-shaped one (its config: 30 blocks of 576, 3 key-value heads, 49,152-token
vocabulary), with random weights built on the device) and each format, the block linears are replaced by
AQLM layers with random codes (decoding speed does not depend on the code values) and the model is cast
to --dtype. Each variant decodes --new-tokens tokens after 16-token prompts, --batch prompts at a time
(tokens/s counts every prompt's tokens), with llm.generate.GreedyDecoder: with a CUDA graph (the
default on the GPU) and without; with --compile also through torch.compile; quantized models also
through the reference path (kernels off: decode W, then F.linear), which checks that the kernels give
the same tokens. With --fuse, quantized models are then also decoded with the layers that read one input
(q, k, v; gate, up, where one launch is faster on the GPU: llm.fuse.fuse_shared_inputs) multiplied in one
launch, in the first mode and, with --compile, compiled.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from experiments.bench_scale import LLAMA2_7B, SMOLLM2_135M, quantize_randomly, random_model
from llm import cuda_kernel, kernels
from llm.formats import QuantFormat, model_bits
from llm.fuse import fuse_shared_inputs
from llm.generate import GreedyDecoder, prepare_for_inference
from llm.model import load_model
from pvtheory.io import write_json


def weight_megabytes(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)


def decode_speed(model, prompt: torch.Tensor, new_tokens: int, cuda_graph: bool,
                 compile: bool = False) -> tuple[dict, torch.Tensor]:
    decoder = GreedyDecoder(model, prompt.shape[1] + new_tokens, cuda_graph=cuda_graph, batch_size=prompt.shape[0],
                            compile=compile)
    t0 = time.perf_counter()
    decoder.generate(prompt, min(new_tokens, 8))  # warm-up: compilation, autotuning, graph capture
    warm = time.perf_counter() - t0
    tokens = decoder.generate(prompt, new_tokens)
    s = decoder.last_seconds_per_token
    return {"cuda_graph": cuda_graph, "ms_per_token": round(s * 1e3, 3), "tokens_per_s": round(prompt.shape[0] / s, 1),
            "warmup_s": round(warm, 1)}, tokens.cpu()


def agreement(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> int:
    """How many generated tokens agree before the first difference (the fewest over the prompts)."""
    diff = (a[:, prompt_len:] != b[:, prompt_len:]).any(0).nonzero()
    return int(diff[0]) if len(diff) else a.shape[1] - prompt_len


def bench_model(name: str, build, formats: list, args, device, batch: int, on_row=lambda rows: None) -> list:
    """One row per variant ('none' first); on_row(rows so far) after each, e.g. to save them."""
    rows = []
    dtype = getattr(torch, args.dtype)
    prompt = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    graph_modes = [True, False] if device.type == "cuda" else [False]
    for fmt in ["none"] + formats:
        try:
            rows.append(bench_variant(name, build, fmt, prompt, graph_modes, args, dtype))
        except Exception as e:  # one variant that fails (e.g. a kernel that does not build) is reported, not fatal
            rows.append({"model": name, "format": fmt, "batch": batch,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            print(f"{name:10s} {fmt:7s} failed: {rows[-1]['error']}", flush=True)
        on_row(rows)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in rows if "error" not in r]
    if ok and ok[0]["format"] == "none":
        base = ok[0].get("graph", ok[0].get("eager"))["ms_per_token"]
        for r in ok:
            r["speedup_vs_16bit"] = round(base / r.get("graph", r.get("eager"))["ms_per_token"], 2)
    return rows


def bench_variant(name: str, build, fmt: str, prompt, graph_modes: list, args, dtype) -> dict:
    """Decode speed of one model variant (fmt 'none': the 16-bit model)."""
    model = build()
    if fmt != "none":
        quantize_randomly(model, QuantFormat.parse(fmt))
    prepare_for_inference(model, dtype)
    row = {"model": name, "format": fmt, "batch": prompt.shape[0], "dtype": args.dtype, "weights_mb": weight_megabytes(model),
           "bits_per_quantized_weight": None if fmt == "none" else round(model_bits(model)["bits_per_quantized_weight"], 3)}
    fast_tokens = None
    for graph in graph_modes:
        r, toks = decode_speed(model, prompt, args.new_tokens, graph)
        row["graph" if graph else "eager"] = r
        fast_tokens = toks if fast_tokens is None else fast_tokens
    if args.compile:  # torch.compile around the kernels, in the first mode (a CUDA graph on the GPU)
        torch._dynamo.reset()  # earlier variants' compiled steps must not count against the recompile limit
        r, toks = decode_speed(model, prompt, args.new_tokens, graph_modes[0], compile=True)
        row["compiled"] = {**r, "tokens_equal_to_uncompiled": agreement(toks, fast_tokens, prompt.shape[1])}
    if fmt != "none":
        kernels.set_enabled(False)
        try:
            r, ref_tokens = decode_speed(model, prompt, args.reference_tokens, graph_modes[0])
        finally:
            kernels.set_enabled(True)
        row["reference_path"] = r
        row["tokens_equal_to_reference_path"] = agreement(fast_tokens[:, :prompt.shape[1] + args.reference_tokens],
                                                          ref_tokens, prompt.shape[1])
        row["tokens_compared"] = args.reference_tokens
    if args.fuse and fmt != "none":  # last: fusing makes the layers' tensors views of the groups'
        groups = fuse_shared_inputs(model)
        r, toks = decode_speed(model, prompt, args.new_tokens, graph_modes[0])
        row["fused"] = {**r, "groups": groups, "tokens_equal_to_unfused": agreement(toks, fast_tokens, prompt.shape[1])}
        if args.compile:
            torch._dynamo.reset()
            r, toks = decode_speed(model, prompt, args.new_tokens, graph_modes[0], compile=True)
            row["fused_compiled"] = {**r, "tokens_equal_to_unfused": agreement(toks, fast_tokens, prompt.shape[1])}
    best = row.get("graph", row.get("eager"))
    print(f"{name:10s} {fmt:7s} batch {prompt.shape[0]:2d} {best['tokens_per_s']:8.1f} tok/s  ({best['ms_per_token']:.2f} ms/token)"
          + (f"  eager {row['eager']['tokens_per_s']:.1f}" if "graph" in row else "")
          + (f"  compiled {row['compiled']['tokens_per_s']:.1f}" if "compiled" in row else "")
          + (f"  reference path {row['reference_path']['tokens_per_s']:.1f}, same tokens "
             f"{row['tokens_equal_to_reference_path']}/{row['tokens_compared']}" if fmt != "none" else "")
          + (f"  fused {row['fused']['tokens_per_s']:.1f}" if "fused" in row else "")
          + (f"  fused compiled {row['fused_compiled']['tokens_per_s']:.1f}" if "fused_compiled" in row else ""), flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", action="append", default=[], help="a Hugging Face model directory (repeatable)")
    ap.add_argument("--seven-b", action="store_true", help="also a Llama-2-7B-shaped model with random weights")
    ap.add_argument("--smollm2", action="store_true", help="also a SmolLM2-135M-shaped model with random weights")
    ap.add_argument("--batch", default="1", help="prompts decoded together, comma-separated (e.g. 1,8)")
    ap.add_argument("--compile", action="store_true", help="also each variant through torch.compile")
    ap.add_argument("--fuse", action="store_true", help="also each quantized variant with one launch for the layers "
                                                        "that read one input (llm.fuse)")
    ap.add_argument("--formats", default="1x16g8,2x8g8,1x8g8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reference-tokens", type=int, default=32, help="tokens decoded through the reference path")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    formats = args.formats.split(",") if args.formats else []
    models = [(d.rstrip("/").split("/")[-1], lambda d=d: load_model(d, dtype=torch.float32, device=device))
              for d in args.model]
    if args.seven_b:
        models.append(("llama2-7b-shape", lambda: random_model(LLAMA2_7B, 32, torch.bfloat16, device)))
    if args.smollm2:
        models.append(("smollm2-135m-shape", lambda: random_model(SMOLLM2_135M, 30, torch.bfloat16, device)))
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "new_tokens": args.new_tokens, "prompt_tokens": 16,
            "programmatic_dependent_launch": device.type == "cuda" and cuda_kernel.programmatic_dependent_launch(device)}
    rows = []
    for name, build in models:
        for batch in map(int, args.batch.split(",")):
            # saved after every variant, so a run cut short keeps what it measured
            rows += bench_model(name, build, formats, args, device, batch,
                                lambda done: write_json(args.out, {"meta": {**meta, "partial": True}, "runs": rows + done}))
    write_json(args.out, {"meta": meta, "runs": rows})


if __name__ == "__main__":
    main()

"""Matrix-vector speed of the AQLM kernels against a dense layer of the same shape, in the same run.

    python -m experiments.bench_kernels --device cuda --out experiments/results/kernels/gpu_matvec.json
    python -m experiments.bench_kernels --device cpu --out experiments/results/kernels/cpu_matvec.json

GPU: the layer's kernel (CUDA or the autotuned Triton tile) against torch.nn.functional.linear with a
bf16 weight, against the reference path (decode W in bf16, then F.linear) and, where the `aqlm` package
is installed (1.1.7: its CUDA sources build on first use), against AQLM's own kernel on the same layers. Each timing replays a CUDA graph of
calls that rotate over enough distinct copies of the layer (> 4x the L2 cache) that every call reads
its weights from device memory, as in decoding; the time per call is the replay time over the
number of calls. Bandwidth counts the bytes a call must read and write (codes, codebooks, scales,
activations, output) and is reported as a fraction of a measured device-to-device copy.
CPU: the lookup-table kernel against F.linear with a float32 and a bf16 weight and against the
reference path (decode W in float32, then F.linear); median of repeated calls.
Codes, codebooks and activations are random: the kernels' cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

from llm.formats import AQLMLinear, QuantFormat
from pvtheory.io import write_json

LLAMA2_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): q/k/v/o, gate/up, down
REF_SHAPES = [(384, 384), (384, 1024), (1024, 384), (384, 128)]  # ref-llama / ref-mistral (k, v: 2 kv heads)
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # SmolLM2-135M: q/o, k/v, gate/up, down
FORMATS = ["1x16g8", "2x8g8", "1x8g8"]
TOKENS = [1, 2, 4, 8, 16]


def random_layer(fmt: QuantFormat, n_in: int, n_out: int, dtype: torch.dtype, device, gen: torch.Generator) -> AQLMLinear:
    """An inference-ready AQLM layer with random codes, codebooks and scales."""
    M, K, g = fmt.num_codebooks, 1 << fmt.bits, fmt.group_size
    layer = AQLMLinear(n_in, n_out, fmt, device=device, dtype=dtype).requires_grad_(False)
    layer.set_codes(torch.randint(0, K, (n_out, n_in // g, M), generator=gen, device=device))
    layer.codebooks.copy_((torch.randn(M, K, g, generator=gen, device=device) * 0.05).to(dtype))
    layer.scales.copy_((torch.rand(n_out, generator=gen, device=device) + 0.5).to(dtype))
    return layer


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- AQLM's own kernels (the `aqlm` package, CUDA sources built on first use) ------------------------
def aqlm_tensors(layer: AQLMLinear) -> tuple:
    """The layer in the `aqlm` package's layout: codes (out, in/g, M) as signed B-bit ints, codebooks
    (M, K, 1, g), scales (out, 1, 1, 1) (what llm.export writes)."""
    from llm.export import _hf_codes

    return (_hf_codes(layer.codes, layer.fmt.bits).contiguous(), layer.codebooks.unsqueeze(2).contiguous(),
            layer.scales.reshape(-1, 1, 1, 1).contiguous())


def aqlm_kernel(layer: AQLMLinear):
    """aqlm's forward kernel for this layer (the one its QuantizedLinear picks for inference), as a
    function x -> y, or None where the package or a kernel for this format is missing."""
    try:
        from aqlm.inference_kernels.kernel_selector import get_forward_pass_kernel
    except ImportError:
        return None
    codes, codebooks, scales = aqlm_tensors(layer)
    try:
        kernel = get_forward_pass_kernel(codebooks, False)
    except Exception:  # no kernel for this format, or the CUDA sources did not build
        return None
    if codes.device.type == "cpu":  # its CPU kernel reads codes as (in/g, out, M), as its layer prepares them
        codes = codes.permute(1, 0, 2).contiguous()
    bias = torch.zeros(layer.out_features, device=codes.device, dtype=codebooks.dtype)  # its ops take a bias tensor
    return lambda x: kernel(x, codes, codebooks, scales, bias)


def aqlm_version():
    try:
        from importlib.metadata import version
        return version("aqlm")
    except Exception:
        return None


# --- GPU --------------------------------------------------------------------------------------------
def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (the ceiling for streaming)."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() * 2 / statistics.median(times[2:]) / 1e9


def graph_time_per_call(calls: list, replays: int = 20) -> float:
    """Seconds per call: a CUDA graph of all the calls in sequence, replayed; median replay / count."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del graph
    return statistics.median(times[3:]) / len(calls)


def copies_for(bytes_per_copy: int, l2_bytes: int, cap: int = 256) -> int:
    return max(2, min(cap, math.ceil(4 * l2_bytes / max(bytes_per_copy, 1))))


def bench_gpu_case(fmt_s: str, n_in: int, n_out: int, T: int, peak_gbs: float, l2: int, gen,
                   blocks_per_sm: Optional[float] = None) -> dict:
    from llm import cuda_kernel, kernels, triton_kernel

    fmt, dev, bf16 = QuantFormat.parse(fmt_s), "cuda", torch.bfloat16
    x = torch.randn(T, n_in, generator=gen, device=dev).to(bf16)
    one = random_layer(fmt, n_in, n_out, bf16, dev, gen)
    q_bytes = nbytes(one.codes, one.codebooks, one.scales)
    layers = [one] + [random_layer(fmt, n_in, n_out, bf16, dev, gen) for _ in range(copies_for(q_bytes, l2) - 1)]
    ref = F.linear(x.float(), one.as_param().decode())  # dequantize-then-matmul in float32

    def timed(fn) -> tuple:
        """(us per call over all layer copies, relative error of fn(one) against the float32 reference)."""
        err = float((fn(one).float() - ref).norm() / ref.norm())
        t = graph_time_per_call([(lambda L=L: fn(L)) for L in layers])
        return round(t * 1e6, 2), err

    row = {"format": fmt_s, "in": n_in, "out": n_out, "tokens": T,
           "bits_per_weight": round(fmt.bits_per_weight(n_out, n_in), 4)}
    t_triton, e_triton = timed(lambda L: triton_kernel.aqlm_matmul(x, L.codes, L.codebooks, L.scales))
    row.update(triton_us=t_triton, triton_tile=triton_kernel.best_config(), kernel="triton", kernel_us=t_triton,
               relative_error_vs_float32=e_triton)
    if cuda_kernel.supports(x, one.codes, one.codebooks, one.scales) and cuda_kernel.load() is not None:
        t_cuda, e_cuda = timed(lambda L: cuda_kernel.aqlm_matmul(x, L.codes, L.codebooks, L.scales,
                                                                 blocks_per_sm=blocks_per_sm))
        target = cuda_kernel.split_target(fmt.num_codebooks, 2 ** fmt.bits, blocks_per_sm)
        splits, chunk = cuda_kernel.plan(n_out, n_in // 8, T, x.device, target)
        row.update(cuda_us=t_cuda, cuda_relative_error_vs_float32=e_cuda,
                   cuda_split={"splits": splits, "chunk_slabs": chunk, "blocks_per_sm": target})
    if kernels.kernel_for(one, x) == "cuda":  # the kernel an AQLMLinear's forward picks
        row.update(kernel="cuda", kernel_us=row["cuda_us"], relative_error_vs_float32=row["cuda_relative_error_vs_float32"])
    first = aqlm_kernel(one)
    if first is not None:  # AQLM's own kernel on the same layers, timed the same way
        theirs = {id(one): first, **{id(L): aqlm_kernel(L) for L in layers[1:]}}
        t_aqlm, e_aqlm = timed(lambda L: theirs[id(L)](x))
        row.update(aqlm_us=t_aqlm, aqlm_relative_error_vs_float32=e_aqlm, speedup_vs_aqlm=round(t_aqlm / row["kernel_us"], 2))
        del theirs
    W = one.weight()
    dense = [W] + [torch.randn(n_out, n_in, generator=gen, device=dev).to(bf16)
                   for _ in range(copies_for(nbytes(W), l2, cap=64) - 1)]
    t_dense = graph_time_per_call([(lambda w=w: F.linear(x, w)) for w in dense])
    del dense
    t_ref = graph_time_per_call([(lambda L=L: F.linear(x, L.weight())) for L in layers[:8]])
    t_kernel = row["kernel_us"] / 1e6
    io = nbytes(x) + T * n_out * 2
    kernel_bytes = q_bytes + io
    row.update({
        "dense_bf16_us": round(t_dense * 1e6, 2), "dequantize_then_matmul_us": round(t_ref * 1e6, 2),
        "speedup_vs_bf16": round(t_dense / t_kernel, 2),
        "kernel_bytes": kernel_bytes, "kernel_gbs": round(kernel_bytes / t_kernel / 1e9, 1),
        "kernel_bandwidth_fraction": round(kernel_bytes / t_kernel / 1e9 / peak_gbs, 3),
        "dense_gbs": round((nbytes(W) + io) / t_dense / 1e9, 1),
        "dense_bandwidth_fraction": round((nbytes(W) + io) / t_dense / 1e9 / peak_gbs, 3),
        "floor_us": round(kernel_bytes / (peak_gbs * 1e9) * 1e6, 2), "layer_copies": len(layers),
    })
    return row


GROUPS = {"7b": {"q,k,v": (4096, [4096, 4096, 4096]), "gate,up": (4096, [11008, 11008])},  # layers that read one input
          "smollm2": {"q,k,v": (576, [576, 192, 192]), "gate,up": (576, [1536, 1536])}}


def bench_grouped_case(fmt_s: str, name: str, n_in: int, rows: list, T: int, l2: int, gen) -> dict:
    """Layers that read the same input (llm.fuse): one launch for all of them against one launch each, each
    through the kernel the layers pick (llm.kernels), and bf16 as one F.linear over the concatenated weight
    against one per layer; same timing method."""
    from llm import kernels
    from llm.fuse import SharedInputGroup

    fmt, dev, bf16 = QuantFormat.parse(fmt_s), "cuda", torch.bfloat16
    x = torch.randn(T, n_in, generator=gen, device=dev).to(bf16)
    first = [random_layer(fmt, n_in, r, bf16, dev, gen) for r in rows]
    copies = copies_for(sum(nbytes(L.codes, L.codebooks, L.scales) for L in first), l2)
    sets = [first] + [[random_layer(fmt, n_in, r, bf16, dev, gen) for r in rows] for _ in range(copies - 1)]
    groups = [SharedInputGroup(layers) for layers in sets]  # the layers' tensors become views of the group's

    kind = [kernels.kernel_for_tensors(x, L.codes, L.codebooks, L.scales) for L in first]
    group_kind = kernels.kernel_for_tensors(x, groups[0].codes, groups[0].codebooks, groups[0].scales, rows)

    def separate(layers: list) -> list:
        return [kernels._run(k, x, L.codes, L.codebooks, L.scales, None) for k, L in zip(kind, layers)]

    def grouped(g) -> torch.Tensor:
        return kernels._run(group_kind, x, g.codes, g.codebooks, g.scales, None, g.rows)

    ref = torch.cat([F.linear(x.float(), L.as_param().decode()) for L in first], dim=-1)
    one, each = grouped(groups[0]).float(), torch.cat(separate(first), dim=-1).float()
    t_sep = graph_time_per_call([(lambda s=s: separate(s)) for s in sets])
    t_grp = graph_time_per_call([(lambda g=g: grouped(g)) for g in groups])
    W = torch.cat([L.weight() for L in first])
    dense = [W] + [torch.randn_like(W) for _ in range(copies_for(nbytes(W), l2, cap=16) - 1)]
    t_dense_one = graph_time_per_call([(lambda w=w: F.linear(x, w)) for w in dense])
    t_dense_sep = graph_time_per_call([(lambda w=w: [F.linear(x, p) for p in w.split(rows)]) for w in dense])
    return {"format": fmt_s, "layers": name, "in": n_in, "out": rows, "tokens": T, "kernels": kind,
            "one_launch_kernel": group_kind, "separate_launches_us": round(t_sep * 1e6, 2), "one_launch_us": round(t_grp * 1e6, 2),
            "one_launch_speedup": round(t_sep / t_grp, 3),
            "one_launch_relative_difference_vs_separate": float((one - each).norm() / ref.norm()),
            "one_launch_relative_error_vs_float32": float((one - ref).norm() / ref.norm()),
            "dense_bf16_separate_us": round(t_dense_sep * 1e6, 2), "dense_bf16_concatenated_us": round(t_dense_one * 1e6, 2),
            "one_launch_speedup_vs_dense_concatenated": round(t_dense_one / t_grp, 3), "layer_copies": copies}


def matvec_line(r: dict) -> str:
    return (f"{r['format']:7s} {r['in']:5d}->{r['out']:5d} T={r['tokens']:2d}  {r['kernel']} {r['kernel_us']:7.2f} us"
            f"  bf16 {r['dense_bf16_us']:7.2f} us  x{r['speedup_vs_bf16']:5.2f}  {r['kernel_bandwidth_fraction']:.0%} of copy bw"
            f"  aqlm {r.get('aqlm_us', float('nan')):7.2f} us (x{r.get('speedup_vs_aqlm', float('nan')):.2f})"
            f"  triton {r['triton_us']:7.2f} us  ref {r['dequantize_then_matmul_us']:7.1f} us")


def grouped_line(r: dict) -> str:
    return (f"{r['format']:7s} {r['layers']:8s} {r['in']:5d} T={r['tokens']:2d}  one {r['one_launch_kernel']} launch "
            f"{r['one_launch_us']:7.2f} us  separate "
            f"{r['separate_launches_us']:7.2f} us  x{r['one_launch_speedup']:.2f}  bf16 concatenated "
            f"{r['dense_bf16_concatenated_us']:7.2f} us  x{r['one_launch_speedup_vs_dense_concatenated']:.2f}"
            f"  vs separate {r['one_launch_relative_difference_vs_separate']:.1e}")


# --- CPU --------------------------------------------------------------------------------------------
def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cpu_case(fmt_s: str, n_in: int, n_out: int, T: int, gen, reps: int) -> dict:
    from llm.lut_kernel import aqlm_matmul_lut

    fmt = QuantFormat.parse(fmt_s)
    x = torch.randn(T, n_in, generator=gen)
    L = random_layer(fmt, n_in, n_out, torch.float32, "cpu", gen)
    W = L.weight()
    Wb = W.to(torch.bfloat16)
    got = aqlm_matmul_lut(x, L.codes, L.codebooks, L.scales)
    ref = F.linear(x.double(), W.double())
    t_lut = median_seconds(lambda: aqlm_matmul_lut(x, L.codes, L.codebooks, L.scales), reps)
    t_ref = median_seconds(lambda: F.linear(x, L.weight()), max(3, reps // 4))
    t_f32 = median_seconds(lambda: F.linear(x, W), reps)
    t_bf16 = median_seconds(lambda: F.linear(x.bfloat16(), Wb), max(3, reps // 4))
    return {"format": fmt_s, "in": n_in, "out": n_out, "tokens": T,
            "lut_ms": round(t_lut * 1e3, 3), "dequantize_then_matmul_ms": round(t_ref * 1e3, 3),
            "dense_float32_ms": round(t_f32 * 1e3, 3), "dense_bf16_ms": round(t_bf16 * 1e3, 3),
            "speedup_vs_dequantize": round(t_ref / t_lut, 1), "speedup_vs_float32": round(t_f32 / t_lut, 2),
            "speedup_vs_bf16": round(t_bf16 / t_lut, 1),
            "relative_error_vs_float64": float((got.double() - ref).norm() / ref.norm())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--shapes", choices=["all", "7b", "ref", "smollm2"], default="all")
    ap.add_argument("--reps", type=int, default=20, help="CPU: timed calls per measurement")
    ap.add_argument("--grouped", action="store_true",
                    help="GPU: only the layers that read one input (q,k,v; gate,up) at --shapes 7b or smollm2 (all: "
                         "both), one launch against one per layer (llm.fuse)")
    ap.add_argument("--blocks-per-sm", type=float, default=None,
                    help="GPU: the blocks per SM the CUDA kernel's split of the input groups aims for "
                         "(default: what each kernel is built for, llm.cuda_kernel.blocks_per_sm_for)")
    args = ap.parse_args(argv)
    shapes = {"all": LLAMA2_7B_SHAPES + REF_SHAPES + SMOLLM2_SHAPES, "7b": LLAMA2_7B_SHAPES, "ref": REF_SHAPES,
              "smollm2": SMOLLM2_SHAPES}[args.shapes]
    formats = args.formats.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows = []

    def save(meta: dict, partial: bool = False) -> None:  # after every case, so a run cut short keeps its cases
        write_json(args.out, {"meta": {**meta, "torch": torch.__version__, **({"partial": True} if partial else {})},
                              "cases": rows})

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        peak = copy_bandwidth_gbs()
        from llm import cuda_kernel

        cuda_kernel.load()
        blocks_per_sm = args.blocks_per_sm
        meta = {"device": props.name, "copy_bandwidth_gbs": round(peak, 1), "l2_bytes": props.L2_cache_size,
                "cuda_kernel_build_error": cuda_kernel.build_error(), "aqlm": aqlm_version(),
                "split_blocks_per_sm": blocks_per_sm, "built_blocks_per_sm": cuda_kernel.BLOCKS_PER_SM_OVERRIDE or "per kernel",
                "programmatic_dependent_launch": cuda_kernel.programmatic_dependent_launch(torch.device("cuda"))}
        if args.grouped:
            cases = [(lambda f=f, name=name, n_in=n_in, outs=outs, T=T: bench_grouped_case(
                f, name, n_in, outs, T, props.L2_cache_size, gen), grouped_line)
                for shape in (("7b", "smollm2") if args.shapes == "all" else (args.shapes,))
                for name, (n_in, outs) in GROUPS.get(shape, {}).items() for f in formats for T in tokens]
        else:
            cases = [(lambda f=f, n_in=n_in, n_out=n_out, T=T: bench_gpu_case(
                f, n_in, n_out, T, peak, props.L2_cache_size, gen, blocks_per_sm), matvec_line)
                for n_in, n_out in shapes for f in formats for T in tokens]
        for run_case, line in cases:
            rows.append(run_case())
            save(meta, partial=True)
            print(line(rows[-1]), flush=True)
    else:
        meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        for n_in, n_out in shapes:
            for f in formats:
                if QuantFormat.parse(f).bits > 8:
                    continue
                for T in tokens:
                    rows.append(bench_cpu_case(f, n_in, n_out, T, gen, args.reps))
                    save(meta, partial=True)
                    r = rows[-1]
                    print(f"{f:7s} {n_in:5d}->{n_out:5d} T={T:2d}  lut {r['lut_ms']:8.3f} ms  fp32 {r['dense_float32_ms']:8.3f}"
                          f"  bf16 {r['dense_bf16_ms']:8.3f}  dequant {r['dequantize_then_matmul_ms']:8.2f}", flush=True)
    save(meta)


if __name__ == "__main__":
    main()

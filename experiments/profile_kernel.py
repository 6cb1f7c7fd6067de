"""Three calls of the CUDA decoding kernel on one random layer, for a profiler to look at the third.

    ncu -k regex:aqlm_mma --launch-skip 2 --launch-count 1 python -m experiments.profile_kernel 2x8g8 4096 4096 --tokens 1
"""
from __future__ import annotations

import argparse

import torch

from experiments.bench_kernels import random_layer
from llm import cuda_kernel
from llm.formats import QuantFormat


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("format")
    ap.add_argument("n_in", type=int)
    ap.add_argument("n_out", type=int)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--blocks-per-sm", type=float, default=None,
                    help="the split's target (default: what the kernel is built for)")
    a = ap.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    fmt = QuantFormat.parse(a.format)
    layer = random_layer(fmt, a.n_in, a.n_out, torch.bfloat16, "cuda", gen)
    target = cuda_kernel.split_target(fmt.num_codebooks, 2 ** fmt.bits, a.blocks_per_sm)
    x = torch.randn(a.tokens, a.n_in, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        cuda_kernel.aqlm_matmul(x, layer.codes, layer.codebooks, layer.scales, blocks_per_sm=target)
    torch.cuda.synchronize()
    print("splits, super-slabs per chunk:", cuda_kernel.plan(a.n_out, a.n_in // 8, a.tokens, x.device, target))


if __name__ == "__main__":
    main()

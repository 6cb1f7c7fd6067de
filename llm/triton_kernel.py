"""GPU kernel: y = x W' + b for an AQLM layer, without materializing W (decoding: 1 to 16 tokens).

W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]]. Each program owns BLOCK_N output
rows and walks the input groups BLOCK_J at a time: it reads the codes of its tile (the only large
read: M*B bits per g weights), gathers the codebook vectors they name (small tables that stay in
L1/L2), sums them over m and multiplies by each token's activations in registers (the gathered tile
serves every token). The scale is applied once per row at the end. Several layers that read the same
x (llm.fuse) run as one launch: codes, scales and bias concatenated by rows, codebooks stacked, and each
row gathers from its own layer's codebooks.

`TRITON_INTERPRET=1` runs the same kernel on CPU tensors (the CPU tests do that).
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from llm.cuda_kernel import MAX_PARTS, layer_rows  # the kernel takes MAX_PARTS - 1 bounds

MAX_TOKENS = 16


@triton.jit
def _aqlm_matmul_kernel(x_ptr, codes_ptr, cb_ptr, scales_ptr, bias_ptr, y_ptr, T, N, E0, E1, E2, J: tl.constexpr,
                        M: tl.constexpr, K: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                        PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if PARTS > 1:  # several layers: rows from E0 (E1, E2) on belong to the second (third, fourth) layer
        layer = (rows >= E0).to(tl.int32) + (rows >= E1).to(tl.int32) + (rows >= E2).to(tl.int32)
        books = cb_ptr + (layer * (M * K * G))[:, None, None]
    else:
        books = cb_ptr
    gg = tl.arange(0, G)
    tt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)
    for j0 in range(0, J, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < J
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.zeros((BLOCK_N, BLOCK_J, G), tl.float32)  # the unscaled weight tile, group by group
        for m in tl.static_range(M):
            code = tl.load(codes_ptr + (rows[:, None] * J + cols[None, :]) * M + m, mask=ok, other=0)
            code = code.to(tl.int32) & (K - 1)  # 16-bit codes are stored wrapped in int16
            w += tl.load(books + (m * K + code[:, :, None]) * G + gg[None, None, :]).to(tl.float32)
        # every token reuses the gathered tile: the gathers, not the multiply-adds, are the cost
        for t in tl.static_range(BLOCK_T):
            xv = tl.load(x_ptr + t * (J * G) + cols[:, None] * G + gg[None, :], mask=col_ok[:, None] & (t < T),
                         other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(w * xv[None, :, :], axis=2), axis=1)
            if BLOCK_T == 1:
                acc += part[:, None]
            else:
                acc += tl.where(tt[None, :] == t, part[:, None], 0.0)
    y = acc * tl.load(scales_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + tt[None, :] * N + rows[:, None], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (tt < T)[None, :])


def _configs() -> list:
    """Tiles (BLOCK_N, BLOCK_J, warps, stages) for the autotuner: few, since each compiles per layer shape."""
    tiles = [(4, 64, 2, 2), (8, 32, 2, 2), (8, 64, 4, 2), (16, 32, 4, 2), (16, 64, 4, 3), (32, 32, 4, 2)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_J": j}, num_warps=w, num_stages=s) for n, j, w, s in tiles]


_tuned = triton.autotune(_configs(), key=["N", "J", "M", "K", "G", "PARTS", "BLOCK_T"])(_aqlm_matmul_kernel)


def aqlm_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                block_n: Optional[int] = None, block_j: Optional[int] = None,
                part_rows: Optional[Sequence[int]] = None) -> Tensor:
    """x (..., in) times the AQLM weight given by codes (out, in/g, M), codebooks (M, K, g) and
    scales (out,), plus bias; at most MAX_TOKENS rows of x. The output has x's dtype.
    block_n / block_j fix the tile (the interpreter and benchmarks); by default they are autotuned.
    part_rows: up to MAX_PARTS layers that read x in one launch (llm.fuse): codes, scales and bias
    concatenated by rows, codebooks (layers, M, K, g), part_rows their rows; their outputs side by side."""
    N, J, M = codes.shape
    K, G = codebooks.shape[-2:]
    ends = list(itertools.accumulate(layer_rows(N, codebooks, part_rows)))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    T = x2.shape[0]
    if x2.shape[1] != J * G or T > MAX_TOKENS:
        raise ValueError(f"aqlm_matmul: x {tuple(x.shape)} does not fit codes {tuple(codes.shape)} x g={G} "
                         f"or has more than {MAX_TOKENS} tokens")
    y = torch.empty(T, N, device=x.device, dtype=x.dtype)
    # the first rows of the second, third, fourth layer; past the last layer a bound no row reaches, so that
    # the rows of a tile beyond N (masked) still read the last layer's codebooks, not past them
    bounds = (ends[:-1] + [2**31 - 1] * MAX_PARTS)[:MAX_PARTS - 1]
    args = (x2, codes.contiguous(), codebooks.contiguous(), scales.contiguous(),
            scales if bias is None else bias.contiguous(), y, T, N, *bounds, J)
    meta = dict(M=M, K=K, G=G, HAS_BIAS=bias is not None, PARTS=len(ends), BLOCK_T=triton.next_power_of_2(T))
    if block_n is not None:
        _aqlm_matmul_kernel[(triton.cdiv(N, block_n),)](*args, **meta, BLOCK_N=block_n, BLOCK_J=block_j or 16)
    else:
        _tuned[lambda META: (triton.cdiv(N, META["BLOCK_N"]),)](*args, **meta)
    return y.reshape(*lead, N)


def best_config() -> Optional[dict]:
    """The tile the autotuner chose last (for benchmark reports)."""
    cfg = _tuned.best_config
    return None if cfg is None else {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

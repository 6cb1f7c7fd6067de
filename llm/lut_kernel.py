"""CPU kernel for codebooks of at most 256 entries: y = x W' + b through lookup tables.

For each token t, input group j and codebook m, the table LUT[j, m, k, t] = <x[t, group j], codebooks[m, k]>
holds every dot product a weight group can contribute (J*M*K*g multiply-adds, one matrix
product). Then y[t, o] = scales[o] * sum_{j, m} LUT[j, m, codes[o, j, m], t] + b[o]: one table read
per code instead of g multiply-adds on a decoded weight, and W is never formed. The lookups are a
numba loop, parallel over output rows.
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch
from torch import Tensor

MAX_CODEBOOK_SIZE = 256


@numba.njit(parallel=True, fastmath=True, cache=False)
def _lookup_sum_one_token(lut: np.ndarray, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out[o] = scales[o] * sum_i lut[i * K + codes[o, i]], i = j * M + m running over (group, codebook)."""
    N, JM = codes.shape
    K = lut.shape[0] // JM
    for o in numba.prange(N):
        acc = np.float32(0.0)
        for i in range(JM):
            acc += lut[i * K + codes[o, i]]
        out[o] = acc * scales[o]


@numba.njit(parallel=True, fastmath=True, cache=False)
def _lookup_sum(lut: np.ndarray, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out[t, o] = scales[o] * sum_i lut[i * K + codes[o, i], t]: the T values of an entry are adjacent."""
    N, JM = codes.shape
    K = lut.shape[0] // JM
    T = lut.shape[1]
    for o in numba.prange(N):
        acc = np.zeros(T, np.float32)
        for i in range(JM):
            row = i * K + codes[o, i]
            for t in range(T):
                acc[t] += lut[row, t]
        for t in range(T):
            out[t, o] = acc[t] * scales[o]


def aqlm_matmul_lut(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor,
                    bias: Optional[Tensor] = None) -> Tensor:
    """x (..., in) times the AQLM weight (codes (out, in/g, M) uint8, codebooks (M, K <= 256, g),
    scales (out,)) plus bias, on the CPU in float32; the output has x's dtype."""
    N, J, M = codes.shape
    _, K, G = codebooks.shape
    if K > MAX_CODEBOOK_SIZE or codes.dtype != torch.uint8:
        raise ValueError(f"lookup tables need uint8 codes into codebooks of <= {MAX_CODEBOOK_SIZE} entries")
    lead = x.shape[:-1]
    xg = x.reshape(-1, J, G).float()
    T = xg.shape[0]
    # one matrix product: (J*T, g) x (g, M*K) -> (J, T, M, K); the lookups want the T values of an entry adjacent
    lut = xg.transpose(0, 1).reshape(J * T, G) @ codebooks.detach().float().reshape(M * K, G).T
    c = codes.reshape(N, J * M).contiguous().numpy()
    s = scales.detach().float().contiguous().numpy()
    out = np.empty((T, N), np.float32)
    if T == 1:
        _lookup_sum_one_token(lut.reshape(-1).numpy(), c, s, out[0])
    else:
        lut = lut.reshape(J, T, M * K).transpose(1, 2).reshape(J * M * K, T).contiguous()
        _lookup_sum(lut.numpy(), c, s, out)
    y = torch.from_numpy(out)
    if bias is not None:
        y = y + bias.detach().float()
    return y.to(x.dtype).reshape(*lead, N)

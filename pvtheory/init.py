"""Initial points in R^d_c (and their vector / additive generalizations).

- kmeans_1d: optimal 1-D (weighted) k-means by dynamic programming where that is cheap
  (d <= EXACT_1D_LIMIT), Lloyd's algorithm from quantiles otherwise;
- uniform_grid: c evenly spaced values between min and max;
- kmeans / residual_kmeans: Lloyd's algorithm on groups of g coordinates, and its residual form
  for M additive codebooks (the AQLM initialization).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pvtheory.checks import as_tensor, check_finite, check_positive_int
from pvtheory.codes import Codebooks, decode, nearest_entry, nearest_entry_chunked, scalar

EXACT_1D_LIMIT = 2000


def _segment_costs(s: Tensor, w: Tensor) -> Tensor:
    """cost[j, i] = weighted squared error of s[j..i] around its weighted mean (inf for j > i)."""
    z = torch.zeros(1, dtype=s.dtype)
    W = torch.cat([z, torch.cumsum(w, 0)])
    S1 = torch.cat([z, torch.cumsum(w * s, 0)])
    S2 = torch.cat([z, torch.cumsum(w * s * s, 0)])
    n = s.numel()
    j = torch.arange(n).unsqueeze(1)
    i = torch.arange(n).unsqueeze(0)
    w_ji = W[i + 1] - W[j]
    s1 = S1[i + 1] - S1[j]
    cost = (S2[i + 1] - S2[j]) - s1 * s1 / torch.where(w_ji > 0, w_ji, torch.ones_like(w_ji))
    return torch.where(j <= i, cost.clamp_min(0.0), torch.full_like(cost, float("inf")))


def _kmeans_1d_exact(s: Tensor, w: Tensor, c: int) -> Tensor:
    """Optimal split of sorted s into at most c contiguous segments; each point's segment index.

    F_k[i] = min cost of s[0..i] in at most k+1 segments
           = min(F_{k-1}[i], min_{1 <= j <= i} F_{k-1}[j-1] + cost[j, i]).
    """
    n = s.numel()
    cost = _segment_costs(s, w)
    F = cost[0].clone()
    starts = []  # starts[k-1][i]: start j of the last segment, or 0 for "no new segment"
    for _ in range(1, c):
        cand = torch.cat([F.unsqueeze(0), F[:-1].unsqueeze(1) + cost[1:]])  # row j >= 1: new segment at j
        F, arg = torch.min(cand, dim=0)
        starts.append(arg)
    labels = torch.empty(n, dtype=torch.long)
    i, k = n - 1, c - 1
    while k > 0 and i >= 0:
        j = int(starts[k - 1][i])
        if j > 0:
            labels[j:i + 1] = k
            i = j - 1
        k -= 1
    labels[:i + 1] = 0
    return torch.unique(labels, return_inverse=True)[1]


def kmeans_1d(x, c: int, weights=None, exact: Optional[bool] = None, iters: int = 100) -> tuple[Tensor, Tensor]:
    """(codes, values) of a (weighted) c-means clustering of the coordinates of x.

    exact (default when d <= 2000): the optimal clustering, by dynamic programming over sorted x.
    Otherwise Lloyd's algorithm from quantiles (assignments by binary search, O(d log c) a pass).
    """
    c = check_positive_int("c", c)
    x = as_tensor("x", x).reshape(-1)
    w = torch.ones_like(x) if weights is None else as_tensor("weights", weights).reshape(-1)
    if w.shape != x.shape:
        raise ValueError(f"weights has {w.numel()} entries, x has {x.numel()}")
    if exact is None:
        exact = x.numel() <= EXACT_1D_LIMIT
    s, order = torch.sort(x)
    ws = w[order]
    k = min(c, int(torch.unique(s).numel()))
    if exact:
        seg = _kmeans_1d_exact(s, ws, k)
        k = int(seg.max()) + 1
        wsum = torch.zeros(k, dtype=x.dtype).index_add_(0, seg, ws)
        values = torch.zeros(k, dtype=x.dtype).index_add_(0, seg, ws * s) / wsum
    else:
        values = torch.quantile(s, (torch.arange(k, dtype=x.dtype) + 0.5) / k)
        values = torch.unique(values)
        for _ in range(iters):
            seg = nearest_entry(s.unsqueeze(1), values.unsqueeze(1))
            wsum = torch.zeros(len(values), dtype=x.dtype).index_add_(0, seg, ws)
            new = torch.zeros(len(values), dtype=x.dtype).index_add_(0, seg, ws * s) / wsum.clamp_min(1e-300)
            new = torch.where(wsum > 0, new, values)
            if torch.equal(new, values):
                break
            values = new
    values = _pad_values(values, c)
    codes = nearest_entry(x.unsqueeze(1), values.unsqueeze(1))
    return codes, values


def _pad_values(values: Tensor, c: int) -> Tensor:
    """Fill up to c values when x has fewer distinct coordinates (extra values go above the max)."""
    if len(values) >= c:
        return values
    step = float(values.abs().max()) + 1.0 if len(values) else 1.0
    extra = values.max() + step * torch.arange(1, c - len(values) + 1, dtype=values.dtype)
    return torch.cat([values, extra])


def uniform_grid(x, c: int) -> tuple[Tensor, Tensor]:
    """(codes, values): c evenly spaced values from min(x) to max(x), nearest assignment."""
    c = check_positive_int("c", c)
    x = as_tensor("x", x).reshape(-1)
    lo, hi = float(x.min()), float(x.max())
    values = torch.linspace(lo, hi, c, dtype=x.dtype) if c > 1 else torch.tensor([(lo + hi) / 2], dtype=x.dtype)
    return nearest_entry(x.unsqueeze(1), values.unsqueeze(1)), values


def init_scalar(x, c: int, method: str = "kmeans", weights=None) -> Codebooks:
    """A point of R^d_c near x: k-means on its coordinates, or a uniform grid."""
    if method == "kmeans":
        codes, values = kmeans_1d(x, c, weights)
    elif method == "grid":
        codes, values = uniform_grid(x, c)
    else:
        raise ValueError(f"unknown initialization {method!r}; choose 'kmeans' or 'grid'")
    return scalar(codes, values)


def kmeans(X: Tensor, K: int, iters: int = 25, seed: int = 0, weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(codes (n,), centers (K, g)): Lloyd's algorithm with k-means++ seeding on the rows of X.

    weights (n, g), optional: per-coordinate weights of the squared error.
    """
    K = check_positive_int("K", K)
    check_finite("X", X)
    n, g = X.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++ seeding (on a sample when n is large): each next center is drawn with probability
    # proportional to d2 by inverting the cumulative sum at a uniform draw made up front, so the loop
    # runs on X's device without a host round trip per center
    sample = X if n <= 50_000 else X[torch.randperm(n, generator=gen)[:50_000].to(X.device)]
    first, fallback = torch.randint(len(sample), (1,), generator=gen), torch.randint(len(sample), (K,), generator=gen)
    u = torch.rand(K, generator=gen, dtype=torch.float64).to(X.device)
    fallback = fallback.to(X.device)
    centers = torch.empty(K, g, dtype=X.dtype, device=X.device)
    centers[0] = sample[first.to(X.device)][0]
    d2 = ((sample - centers[0]) ** 2).sum(1)
    for k in range(1, K):
        cdf = torch.cumsum(d2.double(), 0)
        idx = torch.searchsorted(cdf, (u[k] * cdf[-1]).reshape(1), right=True).clamp_max(len(sample) - 1)
        idx = torch.where(cdf[-1] > 0, idx, fallback[k:k + 1])  # all points on the centers: any one
        centers[k] = sample[idx][0]
        d2 = torch.minimum(d2, ((sample - centers[k]) ** 2).sum(1))
    w = torch.ones_like(X) if weights is None else weights
    for _ in range(iters):
        codes = nearest_entry_chunked(X, centers, weights)
        num = torch.zeros_like(centers).index_add_(0, codes, w * X)
        den = torch.zeros_like(centers).index_add_(0, codes, w)
        centers = torch.where(den > 0, num / den.clamp_min(1e-30), centers)
    return nearest_entry_chunked(X, centers, weights), centers


def residual_kmeans(
    x: Tensor, shape: Sequence[int], M: int, K: int, g: int, iters: int = 25, seed: int = 0,
    scales: Optional[Tensor] = None, weights: Optional[Tensor] = None,
) -> Codebooks:
    """Additive codebooks by residual k-means: codebook m clusters what codebooks 0..m-1 left.

    x is laid out as `shape` with groups of g consecutive coordinates along its last dimension;
    with `scales` (per row), the codebooks are fitted to x / scale.
    """
    M, K, g = (check_positive_int(n, v) for n, v in (("M", M), ("K", K), ("g", g)))
    if shape[-1] % g:
        raise ValueError(f"group size g = {g} does not divide the last dimension {shape[-1]}")
    target = x.reshape(shape)
    if scales is not None:
        target = target / scales.reshape((-1,) + (1,) * (len(shape) - 1))
    groups = target.reshape(-1, g)
    w = None if weights is None else weights.reshape(-1, g)
    resid = groups.clone()
    codes, books = [], []
    for m in range(M):
        c, centers = kmeans(resid, K, iters, seed + m, w)
        codes.append(c)
        books.append(centers)
        resid = resid - centers[c]
    return Codebooks(torch.stack(codes, 1), torch.stack(books), tuple(shape), scales)


__all__ = ["kmeans_1d", "uniform_grid", "init_scalar", "kmeans", "residual_kmeans", "decode"]

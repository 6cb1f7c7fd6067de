"""The discrete-continuous parameter x = decode(P, V).

P (the discrete part) is an integer code per group of g coordinates and per codebook; V (the
continuous part) is the codebooks and, optionally, a scale per row. One class covers:

- scalar quantization to c values (the paper's R^d_c): M = 1 codebook of K = c values, g = 1;
- vector quantization: M = 1 codebook of K vectors of g coordinates;
- additive quantization (AQLM): the sum of M codebooks of K vectors of g coordinates, with an
  optional scale per output row (the LLM case).

decode is a pure function of (codes, codebooks, scales), differentiable in the continuous part, so
V steps can use autograd; encode is the projection the P steps need: the codes whose decoding is
nearest to a target, only for the groups that are allowed to change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from pvtheory.checks import check_finite, check_positive_int


def decode(codes: Tensor, codebooks: Tensor, shape: Sequence[int], scales: Optional[Tensor] = None) -> Tensor:
    """x = sum_m codebooks[m, codes[:, m]] laid out as `shape`, times a per-row scale if given.

    codes: (n_groups, M) integers; codebooks: (M, K, g); scales: (shape[0],) or None.
    Groups run along the last dimension of `shape` (g consecutive coordinates of a row).
    """
    M = codebooks.shape[0]
    groups = codebooks[0].index_select(0, codes[:, 0])
    for m in range(1, M):
        groups = groups + codebooks[m].index_select(0, codes[:, m])
    x = groups.reshape(shape)
    if scales is not None:
        x = x * scales.reshape((-1,) + (1,) * (len(shape) - 1))
    return x


@dataclass(frozen=True)
class Codebooks:
    """A discrete-continuous parameter: codes (P) and codebooks + optional row scales (V).

    Immutable: the P and V steps return new instances (`with_codes`, `with_values`).
    """

    codes: Tensor  # P: (n_groups, M), int64
    codebooks: Tensor  # V: (M, K, g)
    shape: tuple  # shape of the decoded tensor; its last dimension is a multiple of g
    scales: Optional[Tensor] = None  # V: (shape[0],) per-row scale, or None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codebooks.dim() != 3:
            raise ValueError(
                f"codes must be (n_groups, M) and codebooks (M, K, g); got {tuple(self.codes.shape)} "
                f"and {tuple(self.codebooks.shape)}"
            )
        M, K, g = self.codebooks.shape
        numel = 1
        for s in self.shape:
            numel *= int(s)
        if self.codes.shape[1] != M or self.codes.shape[0] * g != numel or self.shape[-1] % g:
            raise ValueError(
                f"codes {tuple(self.codes.shape)} and codebooks {tuple(self.codebooks.shape)} "
                f"do not describe a tensor of shape {tuple(self.shape)}"
            )
        if self.scales is not None and self.scales.shape != (self.shape[0],):
            raise ValueError(f"scales must have shape ({self.shape[0]},), got {tuple(self.scales.shape)}")

    # --- sizes ---------------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        """M, the number of additive codebooks."""
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        """K = 2^B, the entries per codebook (c, the number of values, in the scalar case)."""
        return self.codebooks.shape[1]

    @property
    def group_size(self) -> int:
        """g, the coordinates that share one code."""
        return self.codebooks.shape[2]

    @property
    def num_groups(self) -> int:
        return self.codes.shape[0]

    def group_coordinates(self, groups: Tensor) -> Tensor:
        """Flat coordinate indices of the given groups (what a subspace S of groups spans)."""
        g = self.group_size
        return (groups.reshape(-1, 1) * g + torch.arange(g, device=groups.device)).reshape(-1)

    # --- decode / update -----------------------------------------------------------------
    def decode(self, codebooks: Optional[Tensor] = None, scales: Optional[Tensor] = None) -> Tensor:
        """x = decode(P, V); pass codebooks/scales to decode with other (e.g. autograd) values."""
        cb = self.codebooks if codebooks is None else codebooks
        sc = self.scales if scales is None else scales
        return decode(self.codes, cb, self.shape, sc)

    def with_codes(self, codes: Tensor) -> "Codebooks":
        return replace(self, codes=codes)

    def with_values(self, codebooks: Tensor, scales: Optional[Tensor] = None) -> "Codebooks":
        return replace(self, codebooks=codebooks, scales=self.scales if scales is None else scales)

    @property
    def values(self) -> tuple:
        """V as a tuple of tensors: the codebooks, and the row scales if there are any."""
        return (self.codebooks,) if self.scales is None else (self.codebooks, self.scales)

    def with_value_tuple(self, values: Sequence[Tensor]) -> "Codebooks":
        """The parameter with V replaced by `values`, in the order of `values`."""
        return self.with_values(values[0], values[1] if len(values) > 1 else None)

    def distinct_values(self) -> int:
        """Number of distinct coordinate values of decode(P, V) (at most c in the scalar case)."""
        return int(torch.unique(self.decode()).numel())

    def used_entries(self) -> Tensor:
        """Boolean (M, K): which codebook entries some group uses."""
        M, K = self.num_codebooks, self.codebook_size
        used = torch.zeros(M, K, dtype=torch.bool, device=self.codes.device)
        for m in range(M):
            used[m, self.codes[:, m]] = True
        return used

    def value_jacobian(self) -> Tensor:
        """D (sparse, numel x M*K*g) with decode(P, V).flatten() = D @ codebooks.flatten() (+ scales).

        Decode is linear in the codebooks for fixed codes and scales; exact V steps solve in it.
        """
        M, K, g = self.codebooks.shape
        n = self.num_groups
        dev = self.codes.device
        rows = (torch.arange(n, device=dev).reshape(n, 1, 1) * g + torch.arange(g, device=dev)).expand(n, M, g)
        cols = (torch.arange(M, device=dev).reshape(1, M, 1) * K * g
                + self.codes.reshape(n, M, 1) * g + torch.arange(g, device=dev))
        vals = torch.ones(n, M, g, dtype=self.codebooks.dtype, device=dev)
        if self.scales is not None:
            row_of_group = torch.arange(n, device=dev) * g // self.shape[-1]
            vals = vals * self.scales[row_of_group].reshape(n, 1, 1).to(vals.dtype)
        idx = torch.stack([rows.reshape(-1), cols.reshape(-1)])
        numel = n * g
        return torch.sparse_coo_tensor(idx, vals.reshape(-1), (numel, M * K * g), check_invariants=False).coalesce()

    # --- encode: the projection used by every P step ---------------------------------------
    def encode(
        self,
        target: Tensor,
        groups: Optional[Tensor] = None,
        weights: Optional[Tensor] = None,
        beam_width: int = 4,
        chunk: Optional[int] = None,
        candidate_budget: Optional[int] = None,
    ) -> Tensor:
        """Codes whose decoding is nearest to `target` in the groups `groups` (all if None).

        Minimizes sum_i w_i (decode_i - target_i)^2 per group, w = `weights` (1 if None). Groups
        outside `groups` keep their codes. M = 1: exact nearest entry. M > 1: beam search over the
        codebooks started from the current codes, so a group's error never increases. Groups are
        processed `chunk` at a time, at most `candidate_budget` distances or beam candidates at once (memory;
        by default larger on a GPU, where fewer, bigger kernels pay and memory is there).
        """
        if target.shape != tuple(self.shape):
            raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(self.shape)}")
        check_finite("target", target)
        cb = self.codebooks
        chunk = chunk or (1 << 20 if target.is_cuda else 1 << 16)
        candidate_budget = candidate_budget or (1 << 25 if target.is_cuda else 1 << 22)
        t, w = self._unscaled(target, weights)
        codes = self.codes.clone()
        idx = torch.arange(self.num_groups, device=codes.device) if groups is None else groups.reshape(-1)
        # a chunk holds (chunk, K) distances (M = 1) or (chunk, beam, K) beam candidates (M > 1): bound both,
        # or a 4096-entry VQ codebook on a 7B layer would need a (1M, 4096) matrix per chunk
        per_group = self.codebook_size * (beam_width if self.num_codebooks > 1 else 1)
        chunk = max(1, min(chunk, candidate_budget // per_group))
        for start in range(0, idx.numel(), chunk):
            sel = idx[start:start + chunk]
            wsel = None if w is None else w[sel]
            if self.num_codebooks == 1:
                codes[sel, 0] = nearest_entry(t[sel], cb[0], wsel)
            else:
                codes[sel] = beam_search(t[sel], cb, codes[sel], wsel, beam_width)
        return codes

    def _unscaled(self, target: Tensor, weights: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Per-group targets (n, g) and weights with the row scales divided out:
        ||s c - t||_w^2 = s^2 ||c - t/s||_w^2, so encode against t/s with weights s^2 w."""
        g, cb = self.group_size, self.codebooks
        t = target.reshape(-1, g).to(cb.dtype)
        w = None if weights is None else weights.reshape(-1, g).to(cb.dtype)
        if self.scales is None:
            return t, w
        s = self.scales.to(cb.dtype)[torch.arange(self.num_groups, device=t.device) * g // self.shape[-1]]
        s = torch.where(s == 0, torch.ones_like(s), s).reshape(-1, 1)
        return t / s, (s * s).expand_as(t) if w is None else w * s * s

    @torch.no_grad()
    def nearest_beyond(self, target: Tensor, codes: Tensor, candidate_budget: int = 1 << 25) -> Tensor:
        """Per group, the code tuple nearest to the target among those that differ from `codes` in one
        codebook and lie on the target's side of q = decode(codes): (c - q) . (t - q) > 0. Groups with
        none (the target at q, or q at the edge of the codebooks) keep `codes`. With scalar codes and q
        the value nearest to t, this is the other end of the bracket of values around t (stochastic
        rounding rounds between the two).
        Groups go candidate_budget // K at a time, so the (groups, K) distances stay bounded."""
        t, _ = self._unscaled(target)
        chunk = max(1, candidate_budget // self.codebook_size)
        return torch.cat([_nearest_beyond(t[i: i + chunk], codes[i: i + chunk], self.codebooks)
                          for i in range(0, len(t), chunk)])


def _nearest_beyond(t: Tensor, codes: Tensor, cb: Tensor) -> Tensor:
    """Codebooks.nearest_beyond for unscaled group targets t (n, g), codes (n, M), codebooks cb (M, K, g)."""
    M = cb.shape[0]
    q = sum(cb[m][codes[:, m]] for m in range(M))  # (n, g)
    step = t - q
    best_d = torch.full((t.shape[0],), float("inf"), device=t.device, dtype=t.dtype)
    best = codes.clone()
    for m in range(M):
        own = cb[m][codes[:, m]]
        resid = t - (q - own)  # what codebook m alone should reproduce
        d = torch.addmm((cb[m] * cb[m]).sum(1).unsqueeze(0), resid, cb[m].T, alpha=-2.0)  # (n, K), less |resid|^2
        # candidate q - own + e lies on t's side of q iff (e - own) . (t - q) > 0
        d.masked_fill_(step @ cb[m].T <= (own * step).sum(1, keepdim=True), float("inf"))
        dm, km = d.min(1)
        if M > 1:
            dm = dm + (resid * resid).sum(1)  # comparable across codebooks
        better = dm < best_d
        best_d = torch.where(better, dm, best_d)
        best[:, m] = torch.where(better, km, best[:, m])
        if m > 0:  # a later codebook wins: the earlier codebooks keep their codes
            best[:, :m] = torch.where(better.unsqueeze(1), codes[:, :m], best[:, :m])
    return best


def expand_groups(t: Tensor, cols: int) -> Tensor:
    """A per-group tensor (rows, cols / G) repeated over its G consecutive coordinates: (rows, cols)."""
    return t.repeat_interleave(cols // t.shape[1], dim=1)


def decode_grid(codes: Tensor, scales: Tensor, zeros: Tensor, shape: Sequence[int]) -> Tensor:
    """x = scales * (codes - zeros) laid out as `shape` (rows, cols), scales and zeros (rows, cols / G)
    shared by G consecutive coordinates of a row; differentiable in scales and zeros."""
    return expand_groups(scales, shape[1]) * (codes.reshape(shape).to(scales.dtype) - expand_groups(zeros, shape[1]))


@dataclass(frozen=True)
class ScalarGrid:
    """A scalar grid with a scale and a zero per group of G coordinates of a row (GPTQ's format):
    x[o, i] = scales[o, i // G] * (codes[o, i] - zeros[o, i // G]), codes in [0, 2^bits).

    P = the integer codes, V = (scales, zeros). Every coordinate is its own code group for the P
    steps (group_size 1), with the same surface as Codebooks: decode, encode, nearest_beyond,
    with_codes, values.
    """

    codes: Tensor  # P: (rows * cols, 1), int64
    scales: Tensor  # V: (rows, cols / G)
    zeros: Tensor  # V: (rows, cols / G)
    bits: int
    shape: tuple  # (rows, cols)

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != rows or cols % self.scales.shape[1]:
            raise ValueError(f"scales {tuple(self.scales.shape)} do not tile a ({rows}, {cols}) grid")
        if self.zeros.shape != self.scales.shape or self.codes.shape != (rows * cols, 1):
            raise ValueError(f"zeros {tuple(self.zeros.shape)} and codes {tuple(self.codes.shape)} do not match "
                             f"scales {tuple(self.scales.shape)} and shape {tuple(self.shape)}")

    group_size = 1
    num_codebooks = 1

    @property
    def codebook_size(self) -> int:
        return 1 << self.bits

    @property
    def num_groups(self) -> int:
        return self.codes.shape[0]

    @property
    def values(self) -> tuple:
        return (self.scales, self.zeros)

    def group_coordinates(self, groups: Tensor) -> Tensor:
        return groups.reshape(-1)

    def decode(self, scales: Optional[Tensor] = None, zeros: Optional[Tensor] = None) -> Tensor:
        return decode_grid(self.codes, self.scales if scales is None else scales,
                           self.zeros if zeros is None else zeros, self.shape)

    def with_codes(self, codes: Tensor) -> "ScalarGrid":
        return replace(self, codes=codes)

    def with_value_tuple(self, values: Sequence[Tensor]) -> "ScalarGrid":
        return replace(self, scales=values[0], zeros=values[1])

    def _grid_position(self, target: Tensor) -> Tensor:
        s, z = expand_groups(self.scales, self.shape[1]), expand_groups(self.zeros, self.shape[1])
        s = torch.where(s == 0, torch.ones_like(s), s)
        return (target.reshape(self.shape).to(s.dtype) / s + z).reshape(-1, 1)

    def encode(self, target: Tensor, groups: Optional[Tensor] = None, weights: Optional[Tensor] = None,
               beam_width: int = 1, **_) -> Tensor:
        """Nearest grid point, clamp(round(t / s + z), 0, 2^bits - 1), in `groups` only. Groups are
        single coordinates, so a diagonal metric (`weights`) does not change the answer."""
        if target.numel() != self.num_groups:
            raise ValueError(f"target has shape {tuple(target.shape)}, expected {tuple(self.shape)}")
        check_finite("target", target)
        new = torch.clamp(torch.round(self._grid_position(target)), 0, self.codebook_size - 1).long()
        if groups is None:
            return new
        codes = self.codes.clone()
        codes[groups] = new[groups]
        return codes

    def nearest_beyond(self, target: Tensor, codes: Tensor) -> Tensor:
        """The neighbouring grid point (code +- 1) on the target's side of `codes` (kept at the edges)."""
        step = torch.sign(self._grid_position(target) - codes.to(self.scales.dtype)).long()
        return torch.clamp(codes + step, 0, self.codebook_size - 1)


def weighted_sq_distances(t: Tensor, entries: Tensor, w: Optional[Tensor] = None, metric: Optional[Tensor] = None) -> Tensor:
    """(n, K) squared distances from rows of t (n, g) to entries (K, g), without the term of t alone.

    w (n, g): per-coordinate weights, sum_j w_j (e_j - t_j)^2; metric (g, g): a positive
    semidefinite matrix A shared by all rows, (e - t)' A (e - t); neither: Euclidean.
    """
    if metric is not None:
        eA = entries @ metric
        return (eA * entries).sum(-1) - 2.0 * t @ eA.T
    if w is None:
        return (entries * entries).sum(-1) - 2.0 * t @ entries.T
    return w @ (entries * entries).T - 2.0 * (w * t) @ entries.T


def nearest_entry(t: Tensor, entries: Tensor, w: Optional[Tensor] = None, metric: Optional[Tensor] = None) -> Tensor:
    """Index of the nearest codebook entry (K, g) to each row of t (n, g); exact."""
    if entries.shape[1] == 1 and w is None and metric is None:
        # scalar case: bucketize against midpoints of the sorted values, O(n log K) memory-light
        vals, order = torch.sort(entries[:, 0])
        mids = (vals[1:] + vals[:-1]) / 2
        pos = torch.bucketize(t[:, 0].contiguous(), mids.contiguous())
        return order[pos]
    return weighted_sq_distances(t, entries, w, metric).argmin(dim=1)


def nearest_entry_chunked(t: Tensor, entries: Tensor, w: Optional[Tensor] = None, budget: int = 1 << 24) -> Tensor:
    """nearest_entry over rows of t taken budget // K at a time: the (rows, K) distances stay bounded
    (k-means of millions of groups against 4096 entries would otherwise need a (n, 4096) matrix)."""
    chunk = max(1, budget // max(1, entries.shape[0]))
    if len(t) <= chunk:
        return nearest_entry(t, entries, w)
    return torch.cat([nearest_entry(t[i: i + chunk], entries, None if w is None else w[i: i + chunk])
                      for i in range(0, len(t), chunk)])


def beam_search(
    t: Tensor, codebooks: Tensor, start: Tensor, w: Optional[Tensor], beam_width: int, metric: Optional[Tensor] = None
) -> Tensor:
    """Additive codes for targets t (n, g) over codebooks (M, K, g), started from `start` (n, M).

    Error: sum_j w_j (rec_j - t_j)^2 (w: (n, g) or None) or (rec - t)' A (rec - t) (metric A: (g, g)).
    One sweep over the codebooks: at codebook m every beam candidate tries all K entries for that
    codebook, and the best `beam_width` distinct candidates survive. The start is always in the
    beam, so the returned codes are never worse than `start`.
    """
    check_positive_int("beam_width", beam_width)
    M, K, g = codebooks.shape
    n = t.shape[0]
    ww = None if metric is not None else (torch.ones_like(t) if w is None else w)

    def apply(r: Tensor) -> Tensor:  # r (n, B, g) -> the metric applied to r
        return r @ metric if metric is not None else ww.unsqueeze(1) * r

    def error(codes: Tensor) -> Tensor:  # codes (n, B, M) -> (n, B)
        diff = sum(codebooks[m][codes[..., m]] for m in range(M)) - t.unsqueeze(1)
        return (apply(diff) * diff).sum(-1)

    # Before codebook m the beams differ only in codebooks < m (all come from the one start), so the
    # B * K candidates of a step are distinct tuples: no duplicate can crowd the beam.
    beam = start.unsqueeze(1)  # (n, B, M)
    for m in range(M):
        B = beam.shape[1]
        others = sum(codebooks[j][beam[..., j]] for j in range(M) if j != m) if M > 1 else 0.0
        resid = t.unsqueeze(1) - others  # (n, B, g): what codebook m should reproduce
        c = codebooks[m]  # (K, g); ||c - r||_A^2 = c'Ac - 2 (A r).c + r'Ar
        Ar = apply(resid)
        cc = (((c @ metric) * c).sum(-1).reshape(1, 1, K) if metric is not None else (ww @ (c * c).T).unsqueeze(1))
        d = (cc - 2.0 * Ar @ c.T + (Ar * resid).sum(-1, keepdim=True)).reshape(n, B * K)  # (n, B * K)
        keep = min(beam_width, B * K)
        top = torch.topk(d, keep, dim=1, largest=False).indices  # candidate b * K + k
        beam = torch.gather(beam, 1, (top // K).unsqueeze(-1).expand(n, keep, M))
        beam[..., m] = top % K
    best = beam[:, 0]
    better = error(best.unsqueeze(1))[:, 0] < error(start.unsqueeze(1))[:, 0]
    return torch.where(better.unsqueeze(1), best, start)


def scalar(codes: Tensor, values: Tensor) -> Codebooks:
    """The paper's R^d_c: x_i = values[codes[i]], c = len(values)."""
    if values.dim() != 1 or codes.dim() != 1:
        raise ValueError("scalar codes and values must be 1-D")
    return Codebooks(codes.reshape(-1, 1).long(), values.reshape(1, -1, 1), (codes.numel(),))

"""Random problem instances with controlled size and conditioning (tests and the toy study)."""
from __future__ import annotations

import torch

from pvtheory.checks import check_positive_int
from pvtheory.objectives import LeastSquares, Logistic, Objective, Quadratic, SeparableQuadratic

KINDS = ("least_squares", "quadratic", "quadratic_psd", "separable", "logistic")


def _spectrum_matrix(n: int, d: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """An (n, d) matrix with singular values spread log-uniformly over [1, sqrt(cond)]."""
    U, _ = torch.linalg.qr(torch.randn(n, max(n, d), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    k = min(n, d)
    s = torch.logspace(0, 0.5 * torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64)
    return (U[:, :k] * s) @ V[:, :k].T


def random_problem(kind: str, d: int, cond: float = 10.0, seed: int = 0) -> Objective:
    """A random phi on R^d of the given kind; `cond` is the condition number of its curvature.

    least_squares: ||Ax - b||^2 with A (2d, d); quadratic: positive definite Q; quadratic_psd:
    Q of rank d - d // 4 (singular); separable: 1/2 sum w (x - t)^2; logistic: 3d samples, reg 1e-2.
    """
    d = check_positive_int("d", d)
    if cond < 1:
        raise ValueError(f"cond must be >= 1, got {cond}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "least_squares":
        A = _spectrum_matrix(2 * d, d, cond, gen)
        x_true = torch.randn(d, generator=gen, dtype=torch.float64)
        b = A @ x_true + 0.1 * torch.randn(2 * d, generator=gen, dtype=torch.float64)
        return LeastSquares(A, b)
    if kind in ("quadratic", "quadratic_psd"):
        R = _spectrum_matrix(d, d, cond, gen)
        Q = R.T @ R
        if kind == "quadratic_psd":
            U, s, _ = torch.linalg.svd(Q)
            s[d - d // 4:] = 0.0
            Q = (U * s) @ U.T
            Q = 0.5 * (Q + Q.T)
            b = Q @ torch.randn(d, generator=gen, dtype=torch.float64)  # b in range(Q): bounded below
        else:
            b = torch.randn(d, generator=gen, dtype=torch.float64) * float(Q.diagonal().mean())
        return Quadratic(Q, b)
    if kind == "separable":
        w = torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), d, dtype=torch.float64)
        w = w[torch.randperm(d, generator=gen)]
        return SeparableQuadratic(w, torch.randn(d, generator=gen, dtype=torch.float64))
    if kind == "logistic":
        A = _spectrum_matrix(3 * d, d, cond, gen)
        x_true = torch.randn(d, generator=gen, dtype=torch.float64)
        noise = 0.5 * torch.randn(3 * d, generator=gen, dtype=torch.float64)
        y = torch.where(A @ x_true + noise >= 0, 1.0, -1.0).to(torch.float64)
        return Logistic(A, y, reg=1e-2)
    raise ValueError(f"unknown problem kind {kind!r}; choose one of {KINDS}")

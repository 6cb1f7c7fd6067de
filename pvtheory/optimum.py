"""Global optimum of min phi(x) over R^d_c for tiny instances.

- by enumeration: every partition of the d coordinates into at most c groups (restricted growth
  strings, so each partition is visited once), each with its exact V step (batched closed form
  for quadratic phi, L-BFGS for others);
- by a mixed-integer program through cvxpy: binary assignments z (d, c), values v, big-M links
  |x_i - v_k| <= 2 M (1 - z_ik) with a valid bound M on the optimum (positive definite problems).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from pvtheory.checks import check_positive_int
from pvtheory.codes import Codebooks, scalar
from pvtheory.objectives import LeastSquares, Objective, Quadratic
from pvtheory.v_steps import solve_values_exactly

ENUMERATION_LIMIT = 2_000_000


def restricted_growth_strings(d: int, c: int) -> Iterator[tuple[int, ...]]:
    """Every partition of range(d) into at most c blocks, as labels a with a_0 = 0, a_i <= 1 + max(a_<i)."""
    a = [0] * d

    def rec(i: int, m: int):
        if i == d:
            yield tuple(a)
            return
        for v in range(min(m + 2, c)):
            a[i] = v
            yield from rec(i + 1, max(m, v))

    if d:
        yield from rec(1, 0)


def count_partitions(d: int, c: int) -> int:
    """Sum over k <= c of Stirling numbers S(d, k): how many partitions the enumeration visits."""
    S = [[0] * (c + 1) for _ in range(d + 1)]
    S[0][0] = 1
    for n in range(1, d + 1):
        for k in range(1, c + 1):
            S[n][k] = k * S[n - 1][k] + S[n - 1][k - 1]
    return sum(S[d][1:])


@dataclass
class Optimum:
    param: Codebooks
    phi: float
    partitions: int  # how many partitions were solved


def global_optimum(objective: Objective, c: int, batch: int = 4096) -> Optimum:
    """The exact minimum of phi over R^d_c by enumerating partitions (tiny d only)."""
    c = check_positive_int("c", c)
    d = objective.d
    total = count_partitions(d, c)
    if total > ENUMERATION_LIMIT:
        raise ValueError(f"d = {d}, c = {c} has {total} partitions (limit {ENUMERATION_LIMIT})")
    form = objective.quadratic() if objective.is_quadratic else None
    best_phi, best = float("inf"), None
    labels_iter = restricted_growth_strings(d, c)
    while True:
        chunk = [lab for _, lab in zip(range(batch), labels_iter)]
        if not chunk:
            break
        labels = torch.tensor(chunk, dtype=torch.long)
        if form is not None:
            vals, phis = _solve_partitions_quadratic(objective, form, labels, c)
        else:
            vals, phis = _solve_partitions_general(objective, labels, c)
        i = int(torch.argmin(phis))
        if float(phis[i]) < best_phi:
            best_phi, best = float(phis[i]), (labels[i], vals[i])
    codes, values = best
    param = solve_values_exactly(scalar(codes, values), objective)  # polish in full precision
    return Optimum(param, float(objective.value(param.decode())), total)


def _solve_partitions_quadratic(objective: Objective, form, labels: Tensor, c: int):
    """Exact V step for a batch of partitions: min_v 1/2 v'(D'QD)v - (D'q)'v with D one-hot."""
    Q, q, const = form
    D = torch.nn.functional.one_hot(labels, c).to(Q.dtype)  # (N, d, c)
    H = D.transpose(1, 2) @ Q @ D
    r = D.transpose(1, 2) @ q
    # empty blocks (label not used) get an identity row so the system stays solvable
    empty = D.sum(1) == 0
    H = H + torch.diag_embed(empty.to(Q.dtype))
    v = (torch.linalg.pinv(H, hermitian=True) @ r.unsqueeze(-1))[..., 0]
    x = (D @ v.unsqueeze(-1))[..., 0]
    return v, objective.value(x)


def _solve_partitions_general(objective: Objective, labels: Tensor, c: int):
    vals, phis = [], []
    for lab in labels:
        D = torch.nn.functional.one_hot(lab, c).to(torch.float64)

        def fun(v: np.ndarray):
            x = D @ torch.as_tensor(v)
            return float(objective.value(x)), (D.T @ objective.grad(x)).numpy()

        res = scipy.optimize.minimize(fun, np.zeros(c), jac=True, method="L-BFGS-B", options={"gtol": 1e-12})
        vals.append(torch.as_tensor(res.x))
        phis.append(res.fun)
    return torch.stack(vals), torch.tensor(phis, dtype=torch.float64)


def optimum_bound(objective: Objective) -> float:
    """A bound B with ||x*|| <= B for any minimizer over R^d_c (x = 0 is feasible).

    Least squares with full column rank: ||A x|| <= 2 ||b||, so ||x|| <= 2 ||b|| / sigma_min(A).
    Positive definite quadratic: lambda_min/2 ||x||^2 <= ||b|| ||x||, so ||x|| <= 2 ||b|| / lambda_min.
    """
    if isinstance(objective, LeastSquares):
        smin = float(torch.linalg.svdvals(objective.A)[-1]) if objective.A.shape[0] >= objective.d else 0.0
        low = smin
    elif isinstance(objective, Quadratic):
        low = float(objective.eigenvalues[0])
    else:
        raise ValueError("the mixed-integer optimum needs a least-squares or quadratic phi")
    if low <= 1e-9:
        raise ValueError("the mixed-integer optimum needs a positive definite problem (a finite big-M)")
    return 2.0 * float(objective.b.norm()) / low


def global_optimum_miqp(objective: Objective, c: int, solver: str = "SCIP") -> Optimum:
    """The exact minimum of phi over R^d_c as a mixed-integer quadratic program (big-M form)."""
    import cvxpy as cp

    c = check_positive_int("c", c)
    d = objective.d
    B = optimum_bound(objective) * 1.01 + 1e-9
    x, v = cp.Variable(d), cp.Variable(c)
    z = cp.Variable((d, c), boolean=True)
    ones = np.ones((d, c))
    diff = cp.reshape(x, (d, 1), order="C") @ np.ones((1, c)) - ones @ cp.diag(v)
    constraints = [cp.sum(z, axis=1) == 1, cp.abs(v) <= B,
                   diff <= 2 * B * (1 - z), diff >= -2 * B * (1 - z)]
    constraints += [v[k] <= v[k + 1] for k in range(c - 1)]  # break the symmetry between labels
    problem = cp.Problem(cp.Minimize(objective.cvxpy(x)), constraints)
    problem.solve(solver=solver)
    if z.value is None:
        raise RuntimeError(f"mixed-integer solver failed: {problem.status}")
    codes = torch.as_tensor(z.value).argmax(1)
    param = solve_values_exactly(scalar(codes, torch.as_tensor(v.value, dtype=torch.float64)), objective)
    return Optimum(param, float(objective.value(param.decode())), 0)

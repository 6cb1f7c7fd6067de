"""The quantitative side of the paper's convergence statements: each bound, computed exactly, beside
the measured run.

Every bound here follows from phi's smoothness along the move a step makes (the descent lemma): if
phi is L-smooth on the coordinates where y differs from x,

    phi(y) <= phi(x) + <grad phi(x), y - x> + L/2 ||y - x||^2 =: descent_bound(x, y, L).

- Linearized P step (step 1/L): y rounds t = x - grad / L to the values of x, so ||y - t|| <= ||x - t||
  (x is itself a candidate) and the guaranteed decrease phi(x) - descent_bound = L/2 (||x - t||^2 -
  ||y - t||^2) is >= 0.
- Linearized subspace P step (S of s groups, step 1/L_S): the same with L_S, the smoothness on S; for S
  drawn at random every draw obeys it, so the mean over draws does too. L_s = max over |S| = s of L_S
  (uniform_subspace_smoothness) makes one step size valid for every S.
- Summed over K iterations whose V steps never increase phi, the guaranteed decreases delta_k add up
  to at most phi(x^0) - phi*_c (phi*_c = min over R^d_c), so min_k delta_k <= (phi(x^0) - phi*_c) / K:
  the O(1/K) rate of the linearized methods' stationarity measure.
- Linearized V step (a gradient step on the values with the codes fixed, step 1/L_V): phi falls by at
  least ||grad_V||^2 / (2 L_V); repeated on a quadratic whose restriction to V is mu_V-strongly convex,
  phi_V - phi_V* falls at least as fast as (1 - mu_V / L_V)^k.

With a step longer than 1/L (an L below the true constant) descent_bound is no bound at all; the tests
show that such a claim is broken, so they can fail.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Union

import torch
from torch import Tensor

from pvtheory.codes import Codebooks
from pvtheory.objectives import Objective
from pvtheory.optimum import ENUMERATION_LIMIT, count_partitions, global_optimum
from pvtheory.steps import Step, point

SUBSET_LIMIT = 1_000_000  # subspaces uniform_subspace_smoothness enumerates before it falls back to a bound


def descent_bound(objective: Objective, x: Tensor, y: Tensor, L: float) -> float:
    """phi(x) + <grad phi(x), y - x> + L/2 ||y - x||^2: an upper bound on phi(y) whenever phi is L-smooth
    on the coordinates where y and x differ (the descent lemma)."""
    x, y = x.reshape(-1), y.reshape(-1)
    d = y - x
    return float(objective.value(x) + objective.grad(x) @ d + 0.5 * L * (d @ d))


def guaranteed_decrease(objective: Objective, x: Tensor, y: Tensor, L: float) -> float:
    """phi(x) - descent_bound(x, y, L): how much phi must fall from x to y by smoothness alone."""
    return float(objective.value(x.reshape(-1))) - descent_bound(objective, x, y, L)


def hessian(objective: Objective) -> Tensor:
    """phi's (constant) Hessian; quadratic objectives only."""
    if not objective.is_quadratic:
        raise ValueError(f"{type(objective).__name__} is not quadratic: its smoothness over subspaces is not computed here")
    return objective.quadratic()[0]


def uniform_subspace_smoothness(objective: Objective, s: int, limit: int = SUBSET_LIMIT) -> tuple[float, bool]:
    """(L_s, exact): L_s = max over coordinate subsets S of size s of lambda_max(Q_SS), Q = phi's Hessian,
    so that phi is L_s-smooth on every subspace of s coordinates. Exact (by enumeration) when there are at
    most `limit` subsets; otherwise an upper bound (exact=False): the smaller of L and the largest row sum
    of |Q| over the row's own entry and its s - 1 largest others (Gershgorin on Q_SS)."""
    Q = hessian(objective)
    d = Q.shape[0]
    if not 1 <= s <= d:
        raise ValueError(f"a subspace size s must lie in [1, {d}], got {s}")
    if s == d:
        return float(torch.linalg.eigvalsh(Q)[-1]), True
    if s == 1:
        return float(Q.diagonal().max()), True
    if math.comb(d, s) <= limit:
        best = 0.0
        subsets = combinations(range(d), s)
        while True:
            chunk = [c for _, c in zip(range(65536), subsets)]
            if not chunk:
                break
            idx = torch.tensor(chunk)
            blocks = Q[idx.unsqueeze(2), idx.unsqueeze(1)]  # (n, s, s)
            best = max(best, float(torch.linalg.eigvalsh(blocks)[:, -1].max()))
        return best, True
    off = Q.abs() - torch.diag(Q.diagonal().abs())
    top = off.topk(s - 1, dim=1).values.sum(1) + Q.diagonal().abs()
    return min(float(top.max()), float(torch.linalg.eigvalsh(Q)[-1])), False


def value_curvature(param: Codebooks, objective: Objective) -> tuple[float, float]:
    """(L_V, mu_V): the largest and smallest eigenvalues of D'QD over the codebook entries some group uses
    (D the Jacobian of the decoding in the values): V -> phi(decode(P, V)) is L_V-smooth and, where
    mu_V > 0, mu_V-strongly convex. Quadratic phi only."""
    Q = hessian(objective)
    D = param.value_jacobian().to_dense()
    used = D.abs().sum(0) > 0
    Du = D[:, used]
    ev = torch.linalg.eigvalsh(Du.T @ Q @ Du)
    return float(ev[-1]), float(ev[0])


def linearized_v_step() -> Step:
    """A gradient step on the values with the codes fixed, of step 1/L_V (L_V = value_curvature's, computed at
    each call): the step the V-step guarantee ||grad_V||^2 / (2 L_V) is for. Quadratic phi, no scales."""
    from pvtheory.steps import stateless
    from pvtheory.v_steps import value_gradients

    def update(param: Codebooks, objective: Objective) -> Codebooks:
        L_V = value_curvature(param, objective)[0]
        g_cb, _ = value_gradients(param, objective)
        return param.with_values(param.codebooks - g_cb / L_V) if L_V > 0 else param

    return stateless("linearized V (step 1/L_V)", update)


def feasible_minimum(objective: Objective, c: int) -> tuple[float, bool]:
    """(phi*, exact): the minimum of phi over R^d_c where enumerating the partitions is possible (exact=True),
    else the continuous minimum, a lower bound on it (exact=False)."""
    if count_partitions(objective.d, c) <= ENUMERATION_LIMIT // 20:
        return global_optimum(objective, c).phi, True
    from pvtheory.baselines import continuous_optimum

    return float(objective.value(continuous_optimum(objective))), False


def support_smoothness(objective: Objective, x: Tensor, y: Tensor) -> float:
    """L_S for S = the coordinates where y differs from x: the tightest constant descent_bound(x, y, .)
    may use for this move (quadratic phi)."""
    S = torch.nonzero(y.reshape(-1) != x.reshape(-1)).reshape(-1)
    if S.numel() == 0:
        return 0.0
    Q = hessian(objective)
    return float(torch.linalg.eigvalsh(Q[S][:, S])[-1])


def certified_run(objective: Objective, param: Codebooks, p_step, v_step, iters: int,
                  L_p: Union[None, float, Callable[[Tensor, Tensor], float]] = None,
                  v_certificate: bool = False) -> dict:
    """Run `iters` PV iterations recording, per iteration k, phi before the P step, after it and after the V
    step. With L_p (the smoothness constant the P step's step size assumes, or a function (x, y) -> the
    constant for that move): the descent bound on phi after the P step and the guaranteed decrease
    delta_k = phi(x^k) - that bound. With v_certificate (quadratic phi): the V step's guaranteed decrease
    ||grad_V||^2 / (2 L_V) at the point after the P step (valid for linearized_v_step, of step 1/L_V, and for
    any V step that does at least as well, an exact one included; not for shorter steps)."""
    from pvtheory.pv import pv_iteration
    from pvtheory.v_steps import value_gradients

    p_state, v_state = p_step.init(param, objective), v_step.init(param, objective)
    rows = []
    for _ in range(iters):
        x = point(param)
        after_p, after_v, p_state, v_state, changed = pv_iteration(param, objective, p_step, v_step, p_state, v_state)
        y = point(after_p)
        row = {"phi": float(objective.value(x)), "phi_after_p": float(objective.value(y)),
               "phi_after_v": float(objective.value(point(after_v))), "changed": int(changed)}
        if L_p is not None:
            L = L_p(x, y) if callable(L_p) else L_p
            row["bound_after_p"] = descent_bound(objective, x, y, L)
            row["guaranteed_decrease"] = row["phi"] - row["bound_after_p"]
        if v_certificate:
            g = torch.cat([t.reshape(-1) for t in value_gradients(after_p, objective) if t is not None])
            L_V = value_curvature(after_p, objective)[0]
            row["v_guaranteed_decrease"] = float(g @ g) / (2 * L_V) if L_V > 0 else 0.0
            row["bound_after_v"] = row["phi_after_p"] - row["v_guaranteed_decrease"]
        rows.append(row)
        param = after_v
    return {"rows": rows, "final_phi": float(objective.value(point(param))), "param": param}

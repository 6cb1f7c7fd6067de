"""V steps: optimize the continuous part (codebooks, scales) with the codes P fixed.

- exact_v_step: argmin over V in closed form for quadratic phi (a small linear least-squares
  problem in the codebook entries that some group uses), cvxpy for any other convex phi;
- cvxpy_v_step: the same through cvxpy, with optional bounds on the values (constrained variant);
- gradient_v_step: one gradient step (default step 1 / (L ||D||^2), which never increases phi);
- adam_v_step: one Adam step;
- no_v_step: leave V alone (for P-only methods).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from pvtheory.codes import Codebooks
from pvtheory.objectives import LeastSquares, Objective, SeparableQuadratic
from pvtheory.steps import Step, point, stateless


def _used_columns(D: Tensor) -> Tensor:
    counts = torch.zeros(D.shape[1], dtype=torch.long)
    counts.index_add_(0, D.indices()[1], torch.ones_like(D.indices()[1]))
    return torch.nonzero(counts > 0).reshape(-1)


def _check_no_scales(param: Codebooks, what: str) -> None:
    if param.scales is not None:
        raise NotImplementedError(f"{what} optimizes codebooks with scales fixed; use gradient or Adam V steps")


def solve_values_exactly(param: Codebooks, objective: Objective) -> Codebooks:
    """argmin_V phi(decode(P, V)) with P fixed; entries no group uses keep their value.

    Quadratic phi: normal equations of the restricted problem (minimum-norm solution where the
    restriction is only positive semidefinite); other convex phi: cvxpy.
    """
    if not objective.is_quadratic:
        return solve_values_cvxpy(param, objective)
    if hasattr(objective, "separable_form") and param.num_codebooks == 1 and param.scales is None:
        return _weighted_means(param, *objective.separable_form())
    D = param.value_jacobian().coalesce()
    used = _used_columns(D)
    v = param.codebooks.reshape(-1).clone()
    Du = D.index_select(1, used).coalesce()
    if isinstance(objective, LeastSquares):
        AD = (Du.t() @ objective.A.T).T  # A D, dense (m, n_used)
        sol = torch.linalg.lstsq(AD, objective.b.unsqueeze(1), driver="gelsd").solution[:, 0]
    else:
        if isinstance(objective, SeparableQuadratic):
            idx = Du.indices()
            w, t = objective.separable_form()
            Dw = torch.sparse_coo_tensor(idx, Du.values() * w[idx[0]], Du.shape, check_invariants=False)
            H = torch.sparse.mm(Du.t().coalesce(), Dw.coalesce()).to_dense()
            r = Du.t() @ (w * t).unsqueeze(1)
        else:
            Q, q, _ = objective.quadratic()
            QD = (Du.t() @ Q).T  # Q symmetric: (D'Q)' = Q D
            H = Du.t() @ QD
            r = Du.t() @ q.unsqueeze(1)
        H = 0.5 * (H + H.T)
        sol = torch.linalg.lstsq(H, r, driver="gelsd").solution[:, 0]
    v[used] = sol.to(v.dtype)
    return param.with_values(v.reshape(param.codebooks.shape))


def _weighted_means(param: Codebooks, w: Tensor, t: Tensor) -> Codebooks:
    """Exact V step of phi = 1/2 sum w (x - t)^2 with one codebook: each entry becomes the
    w-weighted mean of the targets of the groups that use it (O(d), the Lloyd centroid update)."""
    K, g = param.codebook_size, param.group_size
    codes = param.codes[:, 0]
    w, t = w.reshape(-1, g).to(param.codebooks.dtype), t.reshape(-1, g).to(param.codebooks.dtype)
    num = torch.zeros(K, g, dtype=w.dtype).index_add_(0, codes, w * t)
    den = torch.zeros(K, g, dtype=w.dtype).index_add_(0, codes, w)
    values = torch.where(den > 0, num / den.clamp_min(1e-300), param.codebooks[0])
    return param.with_values(values.unsqueeze(0))


def solve_values_cvxpy(
    param: Codebooks, objective: Objective, bounds: Optional[tuple[float, float]] = None, solver: Optional[str] = None
) -> Codebooks:
    """argmin_V phi(decode(P, V)) through cvxpy, optionally with lo <= value <= hi."""
    import cvxpy as cp
    import scipy.sparse as sp

    _check_no_scales(param, "the cvxpy V step")
    D = param.value_jacobian().coalesce()
    used = _used_columns(D)
    idx = D.indices().numpy()
    Dsp = sp.csc_matrix((D.values().numpy(), (idx[0], idx[1])), shape=D.shape)
    used_np = used.numpy()
    free = cp.Variable(len(used_np))
    fixed_cols = np.setdiff1d(np.arange(D.shape[1]), used_np)
    v_old = param.codebooks.reshape(-1).detach().cpu().numpy()
    x = Dsp[:, used_np] @ free
    if len(fixed_cols):
        x = x + Dsp[:, fixed_cols] @ v_old[fixed_cols]
    constraints = []
    if bounds is not None:
        lo, hi = bounds
        constraints = [free >= lo, free <= hi]
    problem = cp.Problem(cp.Minimize(objective.cvxpy(x)), constraints)
    problem.solve(solver=solver)
    if free.value is None:
        raise RuntimeError(f"cvxpy V step failed: {problem.status}")
    v = param.codebooks.reshape(-1).clone()
    v[used] = torch.as_tensor(free.value, dtype=v.dtype)
    new = param.with_values(v.reshape(param.codebooks.shape))
    # the solver stops within its tolerance: where that lands above the start (a start already at
    # the optimum), keep the start, so the step never increases phi
    old_feasible = bounds is None or bool(((v_old >= bounds[0]) & (v_old <= bounds[1])).all())
    if old_feasible and float(objective.value(new.decode())) > float(objective.value(param.decode())):
        return param
    return new


def exact_v_step() -> Step:
    """The paper's exact V step: V = argmin phi(decode(P, V)) for the current codes P."""
    return stateless("exact V", solve_values_exactly)


def cvxpy_v_step(bounds: Optional[tuple[float, float]] = None, solver: Optional[str] = None) -> Step:
    """Exact V step through cvxpy (general convex phi); `bounds` constrains every value."""
    return stateless("cvxpy V", lambda p, f: solve_values_cvxpy(p, f, bounds, solver))


def value_gradients(param: Codebooks, objective: Objective) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of phi(decode(P, V)) in the codebooks and scales: D' grad phi(x), by autograd."""
    cb = param.codebooks.detach().clone().requires_grad_(True)
    sc = None if param.scales is None else param.scales.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        x = param.decode(cb, sc)
        g = objective.grad(x.detach().reshape(-1)).reshape(x.shape)
        x.backward(g)
    return cb.grad, (None if sc is None else sc.grad)


def values_smoothness(param: Codebooks, objective: Objective) -> float:
    """Smoothness of V -> phi(decode(P, V)) in the codebooks: L * lambda_max(D'D)."""
    D = param.value_jacobian()
    DtD = (D.t() @ D.to_dense())
    return objective.L * float(torch.linalg.eigvalsh(DtD)[-1])


def gradient_v_step(lr: Optional[float] = None) -> Step:
    """One gradient step on the codebooks (and scales); lr = 1/(L ||D||^2) by default (descent)."""

    def update(param: Codebooks, objective: Objective) -> Codebooks:
        g_cb, g_sc = value_gradients(param, objective)
        step = lr if lr is not None else 1.0 / max(values_smoothness(param, objective), 1e-300)
        scales = None if g_sc is None else param.scales - step * g_sc
        return param.with_values(param.codebooks - step * g_cb, scales)

    return stateless("gradient V", update)


def adam_v_step(lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Step:
    """One Adam step on the codebooks (and scales) per call; moments live in the step's state."""
    b1, b2 = betas

    def init(param: Codebooks, objective: Objective):
        zeros = [torch.zeros_like(param.codebooks)]
        if param.scales is not None:
            zeros.append(torch.zeros_like(param.scales))
        return {"t": 0, "m": [z.clone() for z in zeros], "v": [z.clone() for z in zeros]}

    def update(param: Codebooks, objective: Objective, state):
        grads = [g for g in value_gradients(param, objective) if g is not None]
        values = [param.codebooks] + ([param.scales] if param.scales is not None else [])
        t = state["t"] + 1
        new_values, ms, vs = [], [], []
        for p, g, m, v in zip(values, grads, state["m"], state["v"]):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            new_values.append(p - lr * mhat / (vhat.sqrt() + eps))
            ms.append(m)
            vs.append(v)
        scales = new_values[1] if len(new_values) > 1 else None
        return param.with_values(new_values[0], scales), {"t": t, "m": ms, "v": vs}

    return Step("Adam V", init, update, deterministic=False)


def no_v_step() -> Step:
    """Keep V as it is."""
    return stateless("no V", lambda p, f: p)


__all__ = [
    "exact_v_step", "cvxpy_v_step", "gradient_v_step", "adam_v_step", "no_v_step",
    "solve_values_exactly", "solve_values_cvxpy", "value_gradients", "point",
]

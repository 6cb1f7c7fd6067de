"""Baselines the paper compares PV against, written as P steps so the same PV loop runs them.

- ste_p_step: straight-through estimation. A continuous shadow u (the step's state) moves by
  the gradient taken at its quantized point, x = Q(u); x is re-quantized from u every step.
- stochastic_rounding_p_step: y = x - lr grad phi(x), each group rounded at random between its two
  nearest codes around y, unbiasedly (with scalar codes: the two values around each coordinate).
- relax_then_round: the continuous optimum, then the best c-value rounding of it (optimal 1-D
  k-means), then an exact V step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from pvtheory.codes import Codebooks
from pvtheory.init import init_scalar
from pvtheory.objectives import Objective
from pvtheory.p_steps import gradient_step, rounding_weights
from pvtheory.steps import Step, point
from pvtheory.v_steps import solve_values_exactly


def ste_p_step(lr: Optional[float] = None, metric: str = "euclidean", beam_width: int = 4) -> Step:
    """Straight-through estimation: u <- u - lr grad phi(Q(u)); codes = nearest to u (lr = 1/L, or the
    inverse of phi's diagonal curvature, by default)."""

    def init(param: Codebooks, objective: Objective) -> Tensor:
        return point(param).clone()

    def update(param: Codebooks, objective: Objective, u: Tensor):
        u = gradient_step(u, objective.grad(point(param)), objective, lr)
        weights = rounding_weights(param, objective, metric) if lr is None else None
        codes = param.encode(u.reshape(param.shape), weights=weights, beam_width=beam_width)
        return param.with_codes(codes), u

    return Step("STE", init, update, deterministic=False)


def stochastic_rounding_p_step(lr: Optional[float] = None, seed: int = 0, beam_width: int = 4,
                               start: str = "nearest") -> Step:
    """y = x - lr grad phi(x), rounded at random between codes q and the nearest codes q' on y's side
    of q, with the probability that makes the rounding unbiased along q -> q'.

    start="nearest": q = the nearest codes to y (with scalar codes: between the two values around
    each y_i, as in the paper); "current": q = the current codes, so a group moves by at most one
    code and nothing is re-encoded (the LLM setting, where a step's update is far smaller than the
    spacing of the codes and re-encoding every group would be a linearized P step in disguise).
    """
    if start not in ("nearest", "current"):
        raise ValueError(f"start must be 'nearest' or 'current', got {start!r}")

    def init(param: Codebooks, objective: Objective):
        return torch.Generator().manual_seed(seed)

    def update(param: Codebooks, objective: Objective, gen: torch.Generator):
        x = point(param)
        y = gradient_step(x, objective.grad(x), objective, lr).reshape(param.shape)
        q = param.encode(y, beam_width=beam_width) if start == "nearest" else param.codes
        q_far = param.nearest_beyond(y, q)
        g = param.group_size
        a = param.with_codes(q).decode().reshape(-1, g)
        delta = param.with_codes(q_far).decode().reshape(-1, g) - a
        lam = (((y.reshape(-1, g) - a) * delta).sum(1) / (delta * delta).sum(1).clamp_min(1e-30)).clamp(0, 1)
        r = torch.rand(lam.shape, generator=gen, dtype=lam.dtype).to(lam.device)
        # P(move) = lam either way; the orientation reproduces the classic "round up if r < p_up" draws
        move = torch.where(delta.sum(1) > 0, r < lam, r >= 1 - lam) & (delta != 0).any(1)
        return param.with_codes(torch.where(move.unsqueeze(1), q_far, q)), gen

    return Step("stochastic rounding", init, update, deterministic=False)


def continuous_optimum(objective: Objective) -> Tensor:
    """argmin_x phi(x) over R^d: least squares / linear solve for quadratics, L-BFGS otherwise."""
    if hasattr(objective, "separable_form"):
        return objective.separable_form()[1].clone()
    if objective.is_quadratic:
        Q, q, _ = objective.quadratic()
        return torch.linalg.lstsq(Q, q.unsqueeze(1), driver="gelsd").solution[:, 0]
    x0 = np.zeros(objective.d)

    def fun(x: np.ndarray):
        t = torch.as_tensor(x)
        return float(objective.value(t)), objective.grad(t).numpy()

    res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": 10_000, "gtol": 1e-10})
    return torch.as_tensor(res.x)


@dataclass
class RelaxThenRound:
    x_relaxed: Tensor  # the continuous optimum
    rounded: Codebooks  # its best c-value rounding
    refined: Codebooks  # after an exact V step
    phi_relaxed: float
    phi_rounded: float
    phi_refined: float


def relax_then_round(objective: Objective, c: int) -> RelaxThenRound:
    """The continuous optimum, its optimal c-value rounding (1-D k-means), then an exact V step."""
    x = continuous_optimum(objective)
    rounded = init_scalar(x, c, "kmeans")
    refined = solve_values_exactly(rounded, objective)
    val = lambda p: float(objective.value(point(p)))  # noqa: E731
    return RelaxThenRound(x, rounded, refined, float(objective.value(x)), val(rounded), val(refined))

"""Baselines the paper compares PV against, written as P steps so the same PV loop runs them.

- ste_p_step: straight-through estimation. A continuous shadow u (the step's state) moves by
  the gradient taken at its quantized point, x = Q(u); x is re-quantized from u every step.
- stochastic_rounding_p_step: y = x - lr grad phi(x), each coordinate rounded at random to one of
  its two neighbouring values, unbiasedly (scalar codes).
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
from pvtheory.steps import Step, point
from pvtheory.v_steps import solve_values_exactly


def _step_size(lr: Optional[float], objective: Objective) -> float:
    return lr if lr is not None else 1.0 / objective.L


def ste_p_step(lr: Optional[float] = None) -> Step:
    """Straight-through estimation: u <- u - lr grad phi(Q(u)); codes = nearest to u (lr = 1/L by default)."""

    def init(param: Codebooks, objective: Objective) -> Tensor:
        return point(param).clone()

    def update(param: Codebooks, objective: Objective, u: Tensor):
        u = u - _step_size(lr, objective) * objective.grad(point(param))
        codes = param.encode(u.reshape(param.shape), chunk=1 << 20)
        return param.with_codes(codes), u

    return Step("STE", init, update, deterministic=False)


def stochastic_round(y: Tensor, values: Tensor, gen: torch.Generator) -> Tensor:
    """Codes of an unbiased random rounding of each y_i to its neighbours among the sorted values."""
    sorted_vals, order = torch.sort(values)
    hi = torch.bucketize(y, sorted_vals).clamp(1, len(values) - 1) if len(values) > 1 else torch.zeros_like(y, dtype=torch.long)
    if len(values) == 1:
        return torch.zeros_like(y, dtype=torch.long)
    lo = hi - 1
    a, b = sorted_vals[lo], sorted_vals[hi]
    p_hi = ((y - a) / torch.where(b > a, b - a, torch.ones_like(b))).clamp(0.0, 1.0)
    up = torch.rand(y.shape, generator=gen, dtype=y.dtype) < p_hi
    return order[torch.where(up, hi, lo)]


def stochastic_rounding_p_step(lr: Optional[float] = None, seed: int = 0) -> Step:
    """y = x - lr grad phi(x), rounded stochastically to the values (scalar codes only)."""

    def init(param: Codebooks, objective: Objective):
        if param.group_size != 1 or param.num_codebooks != 1:
            raise ValueError("stochastic rounding is defined here for scalar codes (g = 1, M = 1)")
        return torch.Generator().manual_seed(seed)

    def update(param: Codebooks, objective: Objective, gen: torch.Generator):
        x = point(param)
        y = x - _step_size(lr, objective) * objective.grad(x)
        codes = stochastic_round(y, param.codebooks[0, :, 0], gen)
        return param.with_codes(codes.reshape(-1, 1)), gen

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

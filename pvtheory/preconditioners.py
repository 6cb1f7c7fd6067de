"""Preconditioned P steps: give any P step a curvature learned from the gradients it sees.

    p_step = adam_preconditioned(subspace_p_step(0.01, score="update"), lr=1e-2)

wraps a P step so that, at every call, it sees instead of phi the local model

    m(x) = <g_hat, x - x0> + 1/2 sum_i D_i (x_i - x0_i)^2,   D = (sqrt(v_hat) + eps) / lr,

with g_hat and v_hat Adam's bias-corrected moments of the gradients of phi at the decoded points
so far (pvtheory.objectives.LocalQuadraticModel). A linearized step on m targets x0 - g_hat / D,
Adam's update; its exact P step is the D-weighted nearest codes to that target. This is how PV-Tuning
proposes code changes for LLMs, where only a stochastic gradient of each layer's weights is known;
on toy problems the same wrapper runs with exact gradients.
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from pvtheory.codes import Codebooks
from pvtheory.objectives import LocalQuadraticModel, Objective
from pvtheory.steps import Step, point

Schedule = Union[float, Callable[[int], float]]


def adam_preconditioned(inner: Step, lr: Schedule, beta1: float = 0.0, beta2: float = 0.95, eps: float = 1e-8,
                        warmup: int = 0, state_dtype: torch.dtype = torch.float32) -> Step:
    """`inner` applied to Adam's local model of phi at the current point (see the module docstring).

    lr: the step size, or a function of the number of earlier calls (a schedule). beta1 = 0 uses the
    latest gradient as g_hat (the official PV-Tuning setting). For the first `warmup` calls the
    moments only accumulate and the codes stay (the inner step is not called). state_dtype stores the
    moments (bfloat16 halves their memory on 7B models; they are used in float32).
    """

    def init(param: Codebooks, objective: Objective) -> dict:
        return {"t": 0, "v": None, "m": None, "inner": inner.init(param, objective)}

    def update(param: Codebooks, objective: Objective, state: dict):
        x = point(param)
        g = objective.grad(x)
        t = state["t"] + 1
        v = (1 - beta2) * g * g if state["v"] is None else beta2 * state["v"].to(g.dtype) + (1 - beta2) * g * g
        m = state["m"]
        if beta1 > 0:
            m = (1 - beta1) * g if m is None else beta1 * m.to(g.dtype) + (1 - beta1) * g
            g = m / (1 - beta1 ** t)
            m = m.to(state_dtype)
        state = {"t": t, "v": v.to(state_dtype), "m": m, "inner": state["inner"]}
        if t <= warmup:
            return param, state
        step = lr(t - 1) if callable(lr) else lr
        D = ((v / (1 - beta2 ** t)).sqrt() + eps) / step
        new, state["inner"] = inner.update(param, LocalQuadraticModel(x, g, D), state["inner"])
        return new, state

    return Step(f"Adam-preconditioned {inner.name}", init, update, deterministic=False)

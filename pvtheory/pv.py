"""The PV method (the paper's Algorithm 1): alternate a P step and a V step, record everything."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from pvtheory.checks import check_finite
from pvtheory.codes import Codebooks
from pvtheory.objectives import Objective
from pvtheory.steps import Step, point

STOP_FIXED_POINT = "fixed_point"  # neither step changed anything (deterministic steps)
STOP_TOLERANCE = "tolerance"  # phi fell by less than tol for `patience` iterations
STOP_MAX_ITERS = "max_iters"


@dataclass
class PVResult:
    """The final parameter and the trace: phi after every half-step and the codes each P step changed."""

    param: Codebooks
    stop_reason: str
    iterations: int
    trace: list = field(default_factory=list)  # dicts: iteration, step ("init" | "P" | "V"), phi, changed

    @property
    def phi(self) -> float:
        return self.trace[-1]["phi"]

    def phis(self, step: Optional[str] = None) -> np.ndarray:
        """phi along the trace (all half-steps, or only those of `step`: "P" or "V")."""
        return np.array([r["phi"] for r in self.trace if step is None or r["step"] == step])

    def changed(self) -> np.ndarray:
        """Groups whose codes changed at each P step."""
        return np.array([r["changed"] for r in self.trace if r["step"] == "P"])

    def summary(self) -> dict:
        return {"phi": self.phi, "stop_reason": self.stop_reason, "iterations": self.iterations,
                "distinct_values": self.param.distinct_values()}

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "trace": self.trace})


def _values_moved(a: Codebooks, b: Codebooks) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a.values, b.values))


def pv_iteration(param: Codebooks, objective: Objective, p_step: Step, v_step: Step, p_state, v_state):
    """One iteration of the paper's Algorithm 1: the P step changes the codes with V fixed, then the V
    step changes V with the new codes fixed. Returns (P step's result, V step's result, both states,
    the number of groups whose codes changed, as a 0-dim tensor on the codes' device: reading it waits for
    the device, which an LLM's loop does once per step, not once per layer). The same function runs a toy
    problem and an LLM layer."""
    after_p, p_state = p_step.update(param, objective, p_state)
    changed = (after_p.codes != param.codes).any(dim=1).sum()
    after_v, v_state = v_step.update(after_p, objective, v_state)
    return after_p, after_v, p_state, v_state, changed


def pv(
    objective: Objective,
    param: Codebooks,
    p_step: Step,
    v_step: Step,
    max_iters: int = 1000,
    tol: Optional[float] = None,
    patience: int = 1,
    callback: Optional[Callable[[int, Codebooks], None]] = None,
) -> PVResult:
    """Run the PV method from `param`: P step, V step, repeat.

    Stops at a fixed point (both steps deterministic and neither changed anything), when phi fell
    by less than tol * max(1, |phi|) for `patience` consecutive iterations (if tol is given), or
    after max_iters iterations.
    """
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    x = point(param)
    if x.numel() != objective.d:
        raise ValueError(f"the parameter decodes to {x.numel()} coordinates, phi expects d = {objective.d}")
    check_finite("the initial point", x)

    def phi(p: Codebooks) -> float:
        return float(objective.value(point(p)))

    trace = [{"iteration": 0, "step": "init", "phi": phi(param), "changed": 0}]
    p_state = p_step.init(param, objective)
    v_state = v_step.init(param, objective)
    stalled, reason, k = 0, STOP_MAX_ITERS, 0
    for k in range(1, max_iters + 1):
        before = trace[-1]["phi"]
        after_p, after_v, p_state, v_state, changed = pv_iteration(param, objective, p_step, v_step, p_state, v_state)
        changed = int(changed)
        trace.append({"iteration": k, "step": "P", "phi": phi(after_p), "changed": changed})
        moved = _values_moved(after_p, after_v)
        trace.append({"iteration": k, "step": "V", "phi": phi(after_v), "changed": 0})
        if not np.isfinite(trace[-1]["phi"]):
            raise FloatingPointError(f"phi became {trace[-1]['phi']} at iteration {k}")
        param = after_v
        if callback is not None:
            callback(k, param)
        scale = 1e-12 * (1.0 + max(float(v.abs().max()) for v in param.values))
        if p_step.deterministic and v_step.deterministic and changed == 0 and moved <= scale:
            reason = STOP_FIXED_POINT
            break
        if tol is not None:
            stalled = stalled + 1 if before - trace[-1]["phi"] <= tol * max(1.0, abs(before)) else 0
            if stalled >= patience:
                reason = STOP_TOLERANCE
                break
    return PVResult(param=param, stop_reason=reason, iterations=k, trace=trace)


def is_pv_stationary(objective: Objective, param: Codebooks, p_step: Step, v_step: Step, rtol: float = 1e-9) -> bool:
    """True if neither the P step nor the V step improves phi at `param` (the paper's PV-stationarity)."""
    phi0 = float(objective.value(point(param)))
    tol = rtol * (1.0 + abs(phi0))
    after_p, _ = p_step.update(param, objective, p_step.init(param, objective))
    after_v, _ = v_step.update(param, objective, v_step.init(param, objective))
    return (float(objective.value(point(after_p))) >= phi0 - tol
            and float(objective.value(point(after_v))) >= phi0 - tol)



"""P steps: change the codes (which value / codebook entries each group uses) with V fixed.

- exact_p_step: P = argmin phi(decode(P, V)): coordinate-wise for separable phi, enumeration or a
  mixed-integer solver (cvxpy + SCIP) for small problems, block-coordinate descent otherwise;
- linearized_p_step: round x - grad phi(x) / L to the nearest codes (never increases phi);
- subspace_p_step: the same restricted to a subspace S of tau groups (or a fraction of them)
  (random, or greedy: the groups with the largest gradient), with the longer step 1 / L_S;
- accumulated: any of these aiming also at the part of earlier targets that rounding left out
  (memory 1 turns the linearized step into STE while the V step leaves the decoding alone; the
  official PV-Tuning runs its subspace step so).

Every solver keeps a group's current code unless another is strictly better, so "nothing changed"
is a well-defined fixed point.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import Tensor

from pvtheory.checks import check_positive_int
from pvtheory.codes import Codebooks
from pvtheory.objectives import LocalQuadraticModel, Objective
from pvtheory.steps import Step, point, stateless

ENUMERATION_LIMIT = 1 << 20  # assignments the exact P step may enumerate


# --- linearized steps -------------------------------------------------------------------------
# A linearized P step rounds x - grad phi(x) / D to the codes, D = objective.curvature(): phi's
# smoothness constant (L, L_S) on toy problems, a diagonal preconditioner (Adam's, see
# pvtheory.preconditioners) on LLMs. metric="curvature" rounds in the norm ||.||_D, which makes the
# new codes minimize the model <grad, y - x> + ||y - x||^2_D / 2 exactly (the same as Euclidean
# rounding when D is a scalar); "euclidean" rounds to the nearest codes.
METRICS = ("euclidean", "curvature")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def rounding_weights(param, objective: Objective, metric: str) -> Optional[Tensor]:
    """The per-coordinate weights of the rounding (None: Euclidean)."""
    D = objective.curvature() if metric == "curvature" else None
    return D.reshape(param.shape) if isinstance(D, Tensor) else None


def gradient_step(x: Tensor, grad: Tensor, objective: Objective, lr: Optional[float] = None) -> Tensor:
    """x - lr grad, or by default x - grad / D with D = objective.curvature() (1 / L on toy problems,
    a diagonal preconditioner on LLMs): the point a linearized P step rounds."""
    if lr is not None:
        return x - lr * grad
    D = objective.curvature()
    return x - grad / D if isinstance(D, Tensor) else x - (1.0 / D) * grad


def linearized_p_step(L: Optional[float] = None, metric: str = "euclidean", beam_width: int = 4) -> Step:
    """y = nearest codes to x - grad phi(x) / L (the paper's linearized P step; L = phi's curvature)."""
    _check_metric(metric)

    def update(param: Codebooks, objective: Objective) -> Codebooks:
        x = point(param)
        target = gradient_step(x, objective.grad(x), objective, None if L is None else 1.0 / L)
        weights = rounding_weights(param, objective, metric) if L is None else None
        return param.with_codes(param.encode(target.reshape(param.shape), weights=weights, beam_width=beam_width))

    return stateless("linearized P", update)


def group_curvature(param, objective: Objective) -> Tensor:
    """The curvature of each group, (n_groups, g) per coordinate or (n_groups, 1) per group (L_G)."""
    D = objective.curvature()
    if isinstance(D, Tensor) and D.numel() == objective.d:
        return D.reshape(-1, param.group_size)
    return objective.group_smoothness(param.group_size).unsqueeze(1)


SCORES = ("change", "gain", "update", "gradient")


def group_scores(param, objective: Objective, x: Tensor, grad: Tensor, score: str, metric: str = "euclidean",
                 beam_width: int = 4) -> Tensor:
    """Greedy selection score of each group, each group linearized with its own curvature D_G:

    "update": the size of the proposed move ||grad_G / D_G|| (no rounding: the cheapest);
    "gradient": the size of the gradient block ||grad_G||;
    "change": how far the group's decoded value moves if it alone is re-encoded towards x - grad_G / D_G
    (zero for groups whose rounding snaps back: they cannot gain);
    "gain": how much that re-encoding lowers the rounding's error ||y - target||^2 in the step's metric
    (in the curvature metric: twice the decrease of the linear model; <= 0 where nothing is gained).
    """
    g = param.group_size
    G = grad.reshape(-1, g)
    if score == "gradient":
        return G.norm(dim=1)
    D_G = group_curvature(param, objective).to(x.dtype).clamp_min(1e-300)
    move = G / D_G
    if score == "update":
        return move.norm(dim=1)
    xg = x.reshape(-1, g)
    target = xg - move
    weights = rounding_weights(param, objective, metric)
    codes = param.encode(target.reshape(param.shape), weights=weights, beam_width=beam_width)
    moved = param.with_codes(codes).decode().reshape(-1, g)
    if score == "change":
        return (moved - xg).norm(dim=1)
    w = 1.0 if weights is None else weights.reshape(-1, g)
    return (w * ((xg - target) ** 2 - (moved - target) ** 2)).sum(1)


def subspace_size(num_groups: int, tau: Optional[int] = None, fraction: Optional[float] = None) -> int:
    """|S|: tau groups (a count, at most all of them), or a fraction in (0, 1] of them (ceil(fraction * groups)),
    exactly one of the two."""
    if (tau is None) == (fraction is None):
        raise ValueError("give the subspace size as a count tau or as a fraction, exactly one of them")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"the subspace's fraction of the groups must lie in (0, 1], got {fraction}")
        return max(1, math.ceil(fraction * num_groups - 1e-9))
    return min(check_positive_int("tau", tau), num_groups)


def subspace_p_step(
    tau: Optional[int] = None, select: str = "greedy", seed: int = 0, L_S: Optional[float] = None, score: str = "change",
    metric: str = "euclidean", beam_width: int = 4, fraction: Optional[float] = None,
) -> Step:
    """Linearized P step on a subspace S of tau groups, step 1 / L_S (L_S = phi's curvature on S). The size is a
    count tau, or a fraction of the groups (how PV-Tuning's LLM setting gives it): exactly one of the two.

    select="greedy": the tau groups with the largest score (see group_scores; with score="gain"
    only those that gain); "random": uniform without replacement (the setting of the paper's
    convergence theorem). With L_S = phi's smoothness constant on S phi never increases.
    """
    subspace_size(1, tau, fraction)  # a bad size is an error now, not at the first update
    if select not in ("greedy", "random"):
        raise ValueError(f"select must be 'greedy' or 'random', got {select!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    _check_metric(metric)

    def init(param: Codebooks, objective: Objective):
        return torch.Generator().manual_seed(seed)

    def update(param: Codebooks, objective: Objective, gen):
        x = point(param)
        grad = objective.grad(x)
        k = subspace_size(param.num_groups, tau, fraction)
        if select == "greedy":
            scores = group_scores(param, objective, x, grad, score, metric, beam_width)
            S = torch.topk(scores, k).indices
            if score == "gain":
                S = S[scores[S] > 0]
        else:
            S = torch.randperm(param.num_groups, generator=gen)[:k].to(x.device)
        coords = param.group_coordinates(S)
        D = L_S if L_S is not None else objective.curvature(coords)
        if S.numel() == 0 or (not isinstance(D, Tensor) and D <= 0):  # phi is constant on S: nothing to gain
            return param, gen
        target = x.clone()
        target[coords] = x[coords] - grad[coords] / D
        weights = rounding_weights(param, objective, metric) if L_S is None else None
        codes = param.encode(target.reshape(param.shape), groups=S, weights=weights, beam_width=beam_width)
        return param.with_codes(codes), gen

    size = f"tau={tau}" if tau is not None else f"fraction={fraction}"
    return Step(f"subspace P ({select}, {size})", init, update, deterministic=(select == "greedy"))


def trust_region(inner: Step, ratio: float) -> Step:
    """`inner`, with every group's change undone where it moves the group's decoded value by more
    than ratio * its norm: ||y_G - x_G|| > ratio * ||x_G||."""
    if not ratio > 0:
        raise ValueError(f"the trust ratio must be > 0, got {ratio}")

    def update(param: Codebooks, objective: Objective, state):
        new, state = inner.update(param, objective, state)
        moved = (new.codes != param.codes).any(1)
        if not moved.any():
            return new, state
        g = param.group_size
        x, y = param.decode().reshape(-1, g), new.decode().reshape(-1, g)
        keep = moved & ((y - x).norm(dim=1) <= ratio * x.norm(dim=1).clamp_min(1e-12))
        return param.with_codes(torch.where(keep.unsqueeze(1), new.codes, param.codes)), state

    return Step(f"{inner.name}, trust ratio {ratio}", inner.init, update, inner.deterministic)


def accumulated(inner: Step, memory: float) -> Step:
    """`inner` on the local model of phi whose linearized step targets x + r - grad / D instead of
    x - grad / D (D = objective.curvature()): r is what rounding left out of the previous target,
    t - decode(new codes), times `memory`. memory 0 is `inner` on that model; memory 1 keeps every
    update until a code moves. With linearized_p_step that is exactly STE (ste_p_step) as long as the
    decoded weights change only through the codes: after a V step moves the codebooks, STE's shadow
    weights stay where they were, while this target moves with the decoding. With subspace_p_step it is
    the official PV-Tuning code's default (its delta_decay is 1 - memory)."""
    if not 0.0 <= memory <= 1.0:
        raise ValueError(f"memory must lie in [0, 1], got {memory}")

    def init(param: Codebooks, objective: Objective) -> dict:
        return {"r": None, "inner": inner.init(param, objective)}

    def update(param: Codebooks, objective: Objective, state: dict):
        x = point(param)
        D = objective.curvature()
        D = D.reshape(-1) if isinstance(D, Tensor) else torch.full_like(x, float(D))
        g = objective.grad(x)
        if state["r"] is not None:
            g = g - D * state["r"].to(g.dtype)  # so that x - g / D = x + r - grad / D
        new, inner_state = inner.update(param, LocalQuadraticModel(x, g, D), state["inner"])
        r = memory * (x - g / D - point(new)) if memory > 0 else None
        return new, {"r": r, "inner": inner_state}

    return Step(f"{inner.name}, memory {memory}", init, update, deterministic=inner.deterministic and memory == 0)


# --- exact steps --------------------------------------------------------------------------------
def group_candidates(param: Codebooks) -> tuple[Tensor, Tensor]:
    """All K^M code tuples (C, M) and their decoded group vectors (C, g)."""
    M, K, _ = param.codebooks.shape
    tuples = torch.tensor(list(itertools.product(range(K), repeat=M)), dtype=torch.long).reshape(-1, M)
    vectors = sum(param.codebooks[m][tuples[:, m]] for m in range(M))
    return tuples, vectors


def _current_choice(param: Codebooks, tuples: Tensor) -> Tensor:
    K = param.codebook_size
    radix = K ** torch.arange(param.num_codebooks - 1, -1, -1)
    return (param.codes * radix).sum(1)  # position of each group's tuple in itertools.product order


def exact_p_by_separable(param: Codebooks, objective: Objective) -> Codebooks:
    """Separable quadratic phi = 1/2 sum w (x - t)^2: the w-weighted nearest codes to t."""
    if not hasattr(objective, "separable_form"):
        raise ValueError("the separable exact P step needs a separable quadratic phi")
    w, t = objective.separable_form()
    return param.with_codes(param.encode(t.reshape(param.shape), weights=w.reshape(param.shape)))


def exact_p_by_enumeration(param: Codebooks, objective: Objective, chunk: int = 1 << 15) -> Codebooks:
    """Try every assignment of code tuples to groups ((K^M)^n_groups of them); keep the best."""
    tuples, vectors = group_candidates(param)
    C, n = tuples.shape[0], param.num_groups
    total = C ** n
    if total > ENUMERATION_LIMIT:
        raise ValueError(f"enumeration needs {total} assignments (limit {ENUMERATION_LIMIT})")
    radix = C ** torch.arange(n - 1, -1, -1)
    best_val = objective.value(point(param))
    best_choice = _current_choice(param, tuples)
    for start in range(0, total, chunk):
        ids = torch.arange(start, min(start + chunk, total))
        choice = (ids.unsqueeze(1) // radix) % C  # (N, n) digits in base C
        X = vectors[choice].reshape(len(ids), -1)
        vals = objective.value(X)
        i = int(torch.argmin(vals))
        if vals[i] < best_val:  # strict: ties keep the current codes
            best_val, best_choice = vals[i], choice[i]
    return param.with_codes(tuples[best_choice])


def exact_p_by_miqp(param: Codebooks, objective: Objective, solver: str = "SCIP") -> Codebooks:
    """The exact P step as a mixed-integer program: one-hot z (n_groups, K^M), x = z @ candidates."""
    import cvxpy as cp

    tuples, vectors = group_candidates(param)
    z = cp.Variable((param.num_groups, tuples.shape[0]), boolean=True)
    x = cp.vec(z @ vectors.numpy(), order="C")
    problem = cp.Problem(cp.Minimize(objective.cvxpy(x)), [cp.sum(z, axis=1) == 1])
    problem.solve(solver=solver)
    if z.value is None:
        raise RuntimeError(f"mixed-integer P step failed: {problem.status}")
    new = param.with_codes(tuples[torch.as_tensor(z.value).argmax(1)])
    # the solver's tolerance may return an assignment no better than the current one
    return new if objective.value(point(new)) < objective.value(point(param)) else param


def exact_p_by_coordinate_descent(param: Codebooks, objective: Objective, max_sweeps: int = 100) -> Codebooks:
    """Block-coordinate exact P step: each group in turn takes its best code tuple, others fixed.

    Sweeps until no group changes: the result is optimal in every single group (exact when phi
    is separable over groups). Quadratic phi updates its gradient incrementally.
    """
    tuples, vectors = group_candidates(param)
    g = param.group_size
    choice = _current_choice(param, tuples).clone()
    x = point(param).clone()
    form = objective.quadratic() if objective.is_quadratic else None
    grad = objective.grad(x) if form is not None else None
    for _ in range(max_sweeps):
        changed = 0
        for j in range(param.num_groups):
            sl = slice(j * g, (j + 1) * g)
            delta = vectors - x[sl]  # (C, g)
            if form is not None:
                Q = form[0]
                Qjj = Q[sl, sl]
                gain = delta @ grad[sl] + 0.5 * ((delta @ Qjj) * delta).sum(1)
            else:
                X = x.unsqueeze(0).repeat(len(vectors), 1)
                X[:, sl] = vectors
                gain = objective.value(X) - objective.value(x)
            k = int(torch.argmin(gain))
            if gain[k] < -1e-14 * (1.0 + abs(float(objective.value(x)))) and k != int(choice[j]):
                if form is not None:
                    grad = grad + form[0][:, sl] @ delta[k]
                x[sl] = vectors[k]
                choice[j] = k
                changed += 1
        if not changed:
            break
    return param.with_codes(tuples[choice])


def exact_p_step(method: str = "auto") -> Step:
    """The paper's exact P step. method: auto | separable | enumerate | miqp | coordinate.

    auto: separable when phi is separable, enumeration when it needs at most 2^16 assignments,
    block-coordinate descent otherwise.
    """
    methods = {
        "separable": exact_p_by_separable,
        "enumerate": exact_p_by_enumeration,
        "miqp": exact_p_by_miqp,
        "coordinate": exact_p_by_coordinate_descent,
    }
    if method != "auto" and method not in methods:
        raise ValueError(f"unknown exact P method {method!r}; choose auto or one of {sorted(methods)}")

    def update(param: Codebooks, objective: Objective) -> Codebooks:
        if param.scales is not None:
            raise NotImplementedError("the exact P step supports codebooks without row scales")
        name = method
        if name == "auto":
            C = param.codebook_size ** param.num_codebooks
            if hasattr(objective, "separable_form"):
                name = "separable"
            elif param.num_groups * torch.log2(torch.tensor(float(C))) <= 16:
                name = "enumerate"
            else:
                name = "coordinate"
        return methods[name](param, objective)

    return stateless(f"exact P ({method})", update)

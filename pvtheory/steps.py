"""The interface every P-step and V-step solver implements (a pair of pure functions, as in optax).

    state = step.init(param, objective)
    param, state = step.update(param, objective, state)

`deterministic` says whether a step that changed nothing at a point will change nothing there
again: then "nothing changed" means a fixed point. Random subspaces, stochastic rounding and
straight-through estimation (whose shadow vector keeps moving) are not deterministic in that sense.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from pvtheory.codes import Codebooks
from pvtheory.objectives import Objective

InitFn = Callable[[Codebooks, Objective], Any]
UpdateFn = Callable[[Codebooks, Objective, Any], "tuple[Codebooks, Any]"]


class Step(NamedTuple):
    """A P-step or V-step solver."""

    name: str
    init: InitFn
    update: UpdateFn
    deterministic: bool = True


def stateless(name: str, update: Callable[[Codebooks, Objective], Codebooks], deterministic: bool = True) -> Step:
    """A Step from a function param, objective -> param that keeps no state."""
    return Step(name, lambda p, f: None, lambda p, f, s: (update(p, f), None), deterministic)


def point(param: Codebooks):
    """The flat decoded point x of a parameter (phi's argument). Parameters are immutable, so the
    decoding is kept on the instance: the steps that read x one after the other decode it once."""
    x = getattr(param, "_point", None)
    if x is None:
        x = param.decode().reshape(-1)
        object.__setattr__(param, "_point", x)
    return x

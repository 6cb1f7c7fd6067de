"""Input validation shared by the package: one clear ValueError per kind of bad input."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def as_tensor(name: str, x: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    """x as a finite floating tensor of `dtype` (numpy arrays and lists accepted)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if not t.is_floating_point():
        t = t.to(dtype)
    t = t.to(dtype)
    check_finite(name, t)
    return t


def check_finite(name: str, t: Tensor) -> None:
    """Raise ValueError if t holds NaN or inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_positive_int(name: str, value: Any) -> int:
    """Raise ValueError unless value is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_shape(name: str, t: Tensor, shape: tuple) -> None:
    """Raise ValueError unless t.shape == shape (None in shape matches any size)."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")

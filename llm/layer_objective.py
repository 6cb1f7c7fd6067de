"""A linear layer's calibration objective: with weight W and input Hessian H = X'X / n (X: the layer's
calibration inputs), f(W^) = tr((W^ - W) H (W^ - W)'), i.e. ||X W^' - X W'||^2 / n. Shared by every format's
calibration (llm.aqlm, llm.scalar) and by the block-by-block driver (llm.calibrate)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn


@contextmanager
def timed(phases: Optional[dict], name: str):
    """Add the seconds spent in the block to phases[name] (GPU work finished first; None: no timing)."""
    if phases is None:
        yield
        return
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    try:
        yield
    finally:
        sync()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t


def relative_error(W_hat: Tensor, W: Tensor, H: Tensor) -> Tensor:
    """tr((W^ - W) H (W^ - W)') / tr(W H W'): the layer's relative output error."""
    D = W_hat - W
    return ((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-30)


def diagonal_blocks(H: Tensor, g: int) -> Tensor:
    """The g x g diagonal blocks H_jj of H, one per column group: (in / g, g, g)."""
    n_cols = H.shape[0] // g
    return H.reshape(n_cols, g, n_cols, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def damped(H: Tensor, damping: float) -> Tensor:
    """H + damping * mean(diag H) * I."""
    return H + damping * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)


def adam_v_steps(layer: nn.Module, W: Tensor, H: Tensor, steps: int, lr: float) -> None:
    """`steps` Adam steps on the layer's codebooks/scales (scales/zeros) minimizing f."""
    if steps <= 0:
        return
    params = [p for p in layer.continuous_parameters() if p is not getattr(layer, "bias", None)]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
    norm = ((W @ H) * W).sum().clamp_min(1e-30)
    with torch.enable_grad():
        for _ in range(steps):
            D = layer.weight().float() - W
            loss = ((D @ H) * D).sum() / norm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

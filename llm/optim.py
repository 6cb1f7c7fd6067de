"""The V step's optimizers and the learning-rate schedules of fine-tuning.

LAMB (You et al. 2019): Adam's update rescaled, tensor by tensor, to lr * ||p||.

The official PV-Tuning recipe runs its V step with it (`--lamb`): every continuous tensor (codebooks,
scales, norms, embeddings) then moves by the same fraction lr of its own norm per step, whatever its
magnitude, where plain Adam moves every entry by about lr.
"""
from __future__ import annotations

import math

import torch


class Lamb(torch.optim.Optimizer):
    """Adam moments (bias-corrected); the step of tensor p is lr * ||p|| / ||r|| * r with
    r = m / (sqrt(v) + eps), or lr * r where p or r is zero."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.95), eps: float = 1e-8) -> None:
        if lr <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb needs lr > 0 and betas in [0, 1), got lr={lr}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict = {}  # tensors updated together: one device, dtype and step count
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets.setdefault((p.device, p.dtype, float(state["step"])), []).append(p)
            for (_, _, t), params in buckets.items():
                self._update(params, t, group)
        return loss

    def _update(self, params: list, t: float, group: dict) -> None:
        """One LAMB step of `params` (step count t), as multi-tensor (foreach) operations: a few kernel launches for
        all tensors instead of several per tensor, the same arithmetic as tensor by tensor."""
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(v, 1 - beta2 ** t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        r = torch._foreach_div(m, 1 - beta1 ** t)
        torch._foreach_div_(r, denom)
        p_norm, r_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(r))
        trust = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm.clamp_min(1e-30), torch.ones_like(p_norm))
        torch._foreach_mul_(r, list((-group["lr"] * trust).unbind()))
        torch._foreach_add_(params, r)


SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiplier of a learning rate at `step` (0-based) of `steps`: 1 ("constant"), or a cosine from 1 at
    step 0 towards 0 ("cosine"). Fine-tuning applies it to the V step's lr and to the P step's p_lr alike."""
    if schedule == "cosine" and steps > 0:
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return 1.0

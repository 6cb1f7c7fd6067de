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
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                r = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])
                p_norm, r_norm = p.norm(), r.norm()
                trust = torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm.clamp_min(1e-30), torch.ones_like(p_norm))
                p.sub_(group["lr"] * trust * r)
        return loss


SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiplier of a learning rate at `step` (0-based) of `steps`: 1 ("constant"), or a cosine from 1 at
    step 0 towards 0 ("cosine"). Fine-tuning applies it to the V step's lr and to the P step's p_lr alike."""
    if schedule == "cosine" and steps > 0:
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return 1.0

"""Fine-tuning strategies by name: each names the P step (a pvtheory Step) that changes a layer's codes.

    continuous     no P step: the codes stay, only V is trained
    ste            pvtheory's straight-through estimation
    stochastic     pvtheory's stochastic rounding, one code at a time from the current codes
    linearized_pv  pvtheory's linearized P step (every group re-encoded)
    pv             pvtheory's greedy subspace P step: the fraction tau of groups with the largest
                   update ("update") or model decrease ("gain") re-encoded

With p_memory > 0, pv and linearized_pv also aim at that share of what rounding left out of their
previous target (pvtheory.accumulated; it keeps a float32 residual per quantized weight, as STE keeps
its shadow).

Each is wrapped in Adam's preconditioner (pvtheory.preconditioners.adam_preconditioned): at LLM scale
the P step sees a layer as its discrete-continuous parameter and the loss through the gradient
dL/dW of the batch, and rounds x - g_hat / D with D = (sqrt(v_hat) + eps) / p_lr. The same Step
objects run on toy problems through pvtheory.pv.

A new strategy is a function (settings, seed) -> Step (or None for no P step), registered by name:

    from llm.strategies import register_strategy, adam_preconditioner
    register_strategy("my_pv", lambda cfg, seed: adam_preconditioner(cfg, my_p_step(cfg.tau)))

after which `finetune`, `run_pipeline` and the CLI (`--import my_module`) accept it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from pvtheory.baselines import ste_p_step, stochastic_rounding_p_step
from pvtheory.p_steps import accumulated, linearized_p_step, subspace_p_step, trust_region
from pvtheory.preconditioners import adam_preconditioned
from pvtheory.steps import Step

Factory = Callable[[Any, int], Optional[Step]]  # (FinetuneConfig, seed) -> P step, None for none
_REGISTRY: dict[str, Factory] = {}
BUILTIN = ("continuous", "ste", "stochastic", "linearized_pv", "pv")


def register_strategy(name: str, factory: Factory, replace: bool = False) -> None:
    """Make `name` a strategy: factory(cfg, seed) builds its P step for one layer (None: codes stay).
    cfg is the run's FinetuneConfig; seed differs per layer."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a strategy name is letters, digits, '_' and '-', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"strategy {name!r} is already registered (replace=True to replace it)")
    _REGISTRY[name] = factory


def strategy_names() -> tuple:
    """The registered strategies: the built-in ones first."""
    return tuple(_REGISTRY)


def is_strategy(name: str) -> bool:
    return name in _REGISTRY


def p_step_for(cfg, seed: int) -> Optional[Step]:
    """The P step of cfg.strategy for one layer (None for continuous), with cfg's trust region."""
    if cfg.strategy not in _REGISTRY:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(_REGISTRY)}")
    step = _REGISTRY[cfg.strategy](cfg, seed)
    if step is not None and cfg.trust_ratio is not None:
        step = trust_region(step, cfg.trust_ratio)
    return step


def p_lr_schedule(cfg) -> Callable[[int], float]:
    """p_lr at the P step's k-th call (0-based): constant, or the run's cosine decay."""
    from llm.finetune import step_size_factor

    return lambda k: cfg.p_lr * step_size_factor(cfg, k)


def adam_preconditioner(cfg, inner: Step) -> Step:
    """`inner` on Adam's local model of the loss, with cfg's p_lr (and schedule), p_beta1, p_beta2,
    p_warmup and p_state_dtype."""
    return adam_preconditioned(inner, p_lr_schedule(cfg), beta1=cfg.p_beta1, beta2=cfg.p_beta2,
                               warmup=cfg.p_warmup, state_dtype=getattr(torch, cfg.p_state_dtype))


def _metric(cfg) -> str:
    return "curvature" if cfg.p_metric == "adam" else "euclidean"


def _with_memory(cfg, step: Step) -> Step:
    return accumulated(step, cfg.p_memory) if cfg.p_memory > 0 else step


register_strategy("continuous", lambda cfg, seed: None)
register_strategy("ste", lambda cfg, seed: adam_preconditioner(
    cfg, ste_p_step(metric=_metric(cfg), beam_width=cfg.beam_width)))
register_strategy("stochastic", lambda cfg, seed: adam_preconditioner(
    cfg, stochastic_rounding_p_step(seed=seed, beam_width=cfg.beam_width, start="current")))
register_strategy("linearized_pv", lambda cfg, seed: adam_preconditioner(
    cfg, _with_memory(cfg, linearized_p_step(metric=_metric(cfg), beam_width=cfg.beam_width))))
register_strategy("pv", lambda cfg, seed: adam_preconditioner(cfg, _with_memory(
    cfg, subspace_p_step(float(cfg.tau), "greedy", score=cfg.p_select, metric=_metric(cfg), beam_width=cfg.beam_width))))

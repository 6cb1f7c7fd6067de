"""Fine-tuning strategies by name: each is its settings (a small dataclass whose defaults are the tuned ones),
the format-specific tuning on top, and the P step (a pvtheory Step) it builds for a layer.

    continuous     no P step: the codes stay, only V is trained
    ste            pvtheory's straight-through estimation
    stochastic     pvtheory's stochastic rounding, one code at a time from the current codes
    linearized_pv  pvtheory's linearized P step (every group re-encoded)
    pv             pvtheory's greedy subspace P step: the fraction p_fraction of groups (the subspace size
                   tau as a share of the layer's groups) with the largest update ("update") or model
                   decrease ("gain") re-encoded

With p_memory > 0, pv and linearized_pv also aim at that share of what rounding left out of their previous
target (pvtheory.accumulated; it keeps a float32 residual per quantized weight, as STE keeps its shadow).

Each P step is wrapped in Adam's preconditioner (pvtheory.preconditioners.adam_preconditioned): at LLM scale the
P step sees a layer as its discrete-continuous parameter and the loss through the gradient dL/dW of the batch,
and rounds x - g_hat / D with D = (sqrt(v_hat) + eps) / p_lr. The same Step objects run on toy problems through
pvtheory.pv.

A new strategy is a settings dataclass and a function (settings, StepContext) -> Step (or None for no P step):

    from llm.strategies import PVSettings, adam_preconditioner, register_strategy
    register_strategy("my_pv", lambda s, ctx: adam_preconditioner(s, my_p_step(s.p_fraction), ctx), PVSettings)

after which `finetune`, `run_pipeline` and the CLI (`--import my_module`) accept it, and every field of its
settings is a command-line flag (`--field-name`) and a key of `--strategy-settings`. The measurements behind
the tuned values: docs/results.md ("Tuned P-step settings").
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, NamedTuple, Optional

import torch

from pvtheory.baselines import ste_p_step, stochastic_rounding_p_step
from pvtheory.p_steps import accumulated, linearized_p_step, subspace_p_step, trust_region
from pvtheory.preconditioners import adam_preconditioned
from pvtheory.steps import Step


class StrategyError(ValueError):
    """An unknown strategy, or settings it does not have or cannot take."""


HELP = {
    "p_lr": "the P step's learning rate: the Adam-normalized update of the dequantized weights",
    "p_beta1": "momentum of the P step's update (the official PV-Tuning setting: 0)",
    "p_metric": "re-encode nearest in the 'euclidean' or the 'adam' metric diag(sqrt v)",
    "p_warmup": "steps whose P step only gathers its Adam moments (no code changes)",
}
METRICS = ("euclidean", "adam")


def setting(default, help: str, choices: Optional[tuple] = None):
    """A settings field with its command-line help (and the values it may take)."""
    return field(default=default, metadata={"help": HELP.get(help, help), "choices": choices})


@dataclass
class NoSettings:
    """A strategy without settings (continuous: no P step)."""

    def validate(self) -> "NoSettings":
        return self


@dataclass
class PStepSettings:
    """What every P step here shares: the Adam-preconditioned weight update it rounds, and its re-encoding."""

    p_lr: float = setting(1e-2, "p_lr")
    p_beta1: float = setting(0.0, "p_beta1")
    p_beta2: float = setting(0.95, "decay of the P step's second moment")
    p_warmup: int = setting(0, "p_warmup")
    p_state_dtype: str = setting("float32", "dtype of the P step's per-weight moments (bfloat16 halves them)",
                                 ("float32", "bfloat16"))
    trust_ratio: Optional[float] = setting(None, "reject code changes with ||dw|| > trust_ratio * ||w|| per group")
    beam_width: int = setting(4, "beam of the code search when re-encoding (AQLM)")

    def validate(self):
        """StrategyError naming the first setting out of range."""
        checks = [("p_lr", self.p_lr > 0, "> 0"), ("p_beta1", 0 <= self.p_beta1 < 1, "in [0, 1)"),
                  ("p_beta2", 0 <= self.p_beta2 < 1, "in [0, 1)"), ("p_warmup", self.p_warmup >= 0, ">= 0"),
                  ("beam_width", self.beam_width >= 1, ">= 1"),
                  ("trust_ratio", self.trust_ratio is None or self.trust_ratio > 0, "> 0 (or null: none)")]
        checks += [(f.name, getattr(self, f.name) in f.metadata["choices"], f"one of {f.metadata['choices']}")
                   for f in fields(self) if f.metadata.get("choices")]
        checks += self.extra_checks()
        for name, ok, rule in checks:
            if not ok:
                raise StrategyError(f"setting {name} must be {rule}, got {getattr(self, name)!r}")
        return self

    def extra_checks(self) -> list:
        return []


@dataclass
class RoundingSettings(PStepSettings):
    """A P step that rounds its whole target (STE, linearized PV) in a metric."""

    p_metric: str = setting("euclidean", "p_metric", METRICS)


@dataclass
class SteSettings(RoundingSettings):
    p_lr: float = setting(3e-4, "p_lr")


@dataclass
class StochasticSettings(PStepSettings):
    p_lr: float = setting(1e-4, "p_lr")


@dataclass
class LinearizedPVSettings(RoundingSettings):
    p_beta1: float = setting(0.9, "p_beta1")
    p_metric: str = setting("adam", "p_metric", METRICS)
    p_memory: float = setting(0.0, "share of the rounding residual the next P step aims at (pvtheory.accumulated)")

    def extra_checks(self) -> list:
        return [("p_memory", 0 <= self.p_memory <= 1, "in [0, 1]"),
                ("p_memory", not (self.p_memory > 0 and self.trust_ratio is not None),
                 "0 with trust_ratio (the residual would count changes the trust region undoes)")]


@dataclass
class PVSettings(LinearizedPVSettings):
    p_fraction: float = setting(1e-3, "fraction of a layer's code groups PV-Tuning may change per step (the subspace)")
    p_warmup: int = setting(5, "p_warmup")
    p_select: str = setting("update", "the greedy subspace: the groups with the largest 'update' or model 'gain'",
                            ("update", "gain"))

    def extra_checks(self) -> list:
        return super().extra_checks() + [("p_fraction", 0 < self.p_fraction <= 1, "in (0, 1]")]


class StepContext(NamedTuple):
    """What a strategy's P step needs from the run besides its settings: a seed of its own (per layer), and the
    multiplier of p_lr at the P step's k-th call (the run's learning-rate schedule)."""

    seed: int
    lr_factor: Callable[[int], float] = lambda k: 1.0


@dataclass(frozen=True)
class Strategy:
    name: str
    settings: type  # a dataclass with a validate() method; its defaults are the tuned ones
    build: Callable[[Any, StepContext], Optional[Step]]  # (settings, context) -> the P step of one layer
    tuned: Callable[[Any], dict] = lambda fmt: {}  # QuantFormat -> the settings that differ for that format


_REGISTRY: dict[str, Strategy] = {}
BUILTIN = ("continuous", "ste", "stochastic", "linearized_pv", "pv")


def register_strategy(name: str, build: Callable[[Any, StepContext], Optional[Step]], settings: type = NoSettings,
                      tuned: Optional[Callable[[Any], dict]] = None, replace: bool = False) -> None:
    """Make `name` a strategy: build(settings, ctx) makes its P step for one layer (None: codes stay); `settings`
    is its settings dataclass (defaults: the tuned values); tuned(fmt) the values that differ for a format."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise StrategyError(f"a strategy name is letters, digits, '_' and '-', got {name!r}")
    if name in _REGISTRY and not replace:
        raise StrategyError(f"strategy {name!r} is already registered (replace=True to replace it)")
    if not hasattr(settings, "__dataclass_fields__"):
        raise StrategyError(f"strategy {name!r}: its settings must be a dataclass, got {settings!r}")
    _REGISTRY[name] = Strategy(name, settings, build, tuned or (lambda fmt: {}))


def strategy_names() -> tuple:
    """The registered strategies: the built-in ones first."""
    return tuple(_REGISTRY)


def is_strategy(name: str) -> bool:
    return name in _REGISTRY


def get_strategy(name: str) -> Strategy:
    if name not in _REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def setting_fields() -> dict:
    """Every setting of every registered strategy: name -> (dataclasses.Field, the strategies that have it)."""
    out: dict = {}
    for s in _REGISTRY.values():
        for f in fields(s.settings):
            out.setdefault(f.name, (f, []))[1].append(s.name)
    return out


def default_value(f):
    return f.default if f.default is not MISSING else f.default_factory()


def settings_for(name: str, fmt=None, *layers: Optional[dict]) -> Any:
    """The settings of strategy `name`: its defaults, its tuning for `fmt` (a QuantFormat; None: none), then each
    dict of `layers` in turn ({setting: value}; keys it does not have are left out, so one dict can serve every
    strategy of a run). Validated."""
    s = get_strategy(name)
    own = {f.name for f in fields(s.settings)}
    values = dict(s.tuned(fmt)) if fmt is not None else {}
    for layer in layers:
        values.update({k: v for k, v in (layer or {}).items() if k in own})
    try:
        return s.settings(**values).validate()
    except TypeError as e:  # a value of the wrong type meets a range check
        raise StrategyError(f"{name}: a setting has the wrong type ({e})") from None


def check_settings(name: str, values: dict) -> None:
    """StrategyError if `values` names a setting strategy `name` does not have (a misspelling is an error, never a
    silently ignored setting)."""
    s = get_strategy(name)
    if not isinstance(values, dict):
        raise StrategyError(f"strategy settings for {name} must be a JSON object of settings, got {values!r}")
    own = {f.name for f in fields(s.settings)}
    unknown = sorted(set(values) - own)
    if unknown:
        known = ", ".join(sorted(own)) or "none"
        raise StrategyError(f"strategy settings for {name}: unknown setting {unknown[0]!r} (its settings: {known})")


def with_settings(settings, **values):
    """A copy of `settings` with some fields changed, validated."""
    return replace(settings, **values).validate()


def build_p_step(name: str, settings, ctx: StepContext) -> Optional[Step]:
    """The P step of strategy `name` for one layer (None for continuous), in its trust region if it has one."""
    step = get_strategy(name).build(settings, ctx)
    if step is not None and getattr(settings, "trust_ratio", None) is not None:
        step = trust_region(step, settings.trust_ratio)
    return step


def adam_preconditioner(s: PStepSettings, inner: Step, ctx: StepContext) -> Step:
    """`inner` on Adam's local model of the loss, with s.p_lr (times the run's schedule), p_beta1, p_beta2, p_warmup
    and p_state_dtype."""
    return adam_preconditioned(inner, lambda k: s.p_lr * ctx.lr_factor(k), beta1=s.p_beta1, beta2=s.p_beta2,
                               warmup=s.p_warmup, state_dtype=getattr(torch, s.p_state_dtype))


def _metric(s: RoundingSettings) -> str:
    return "curvature" if s.p_metric == "adam" else "euclidean"


def _with_memory(s: LinearizedPVSettings, step: Step) -> Step:
    return accumulated(step, s.p_memory) if s.p_memory > 0 else step


LOW_BITS = 1.5  # code bits per weight at or below which a format is "low-bit" for the tuned settings


def _ste_tuned(fmt) -> dict:
    return {"p_lr": 1e-3} if fmt.code_bits <= LOW_BITS else {}


def _pv_tuned(fmt) -> dict:
    if fmt.kind == "scalar":  # the grid's code step is a whole spacing: carry the residual, rank by gain
        return {"p_memory": 1.0, "p_lr": 1e-3, "p_beta1": 0.9 if fmt.code_bits <= LOW_BITS else 0.0,
                "p_select": "gain", "p_warmup": 0}
    return {"p_lr": 0.1, "p_beta1": 0.95} if fmt.code_bits <= LOW_BITS else {}


register_strategy("continuous", lambda s, ctx: None)
register_strategy("ste", lambda s, ctx: adam_preconditioner(s, ste_p_step(metric=_metric(s), beam_width=s.beam_width),
                                                            ctx), SteSettings, _ste_tuned)
register_strategy("stochastic", lambda s, ctx: adam_preconditioner(
    s, stochastic_rounding_p_step(seed=ctx.seed, beam_width=s.beam_width, start="current"), ctx), StochasticSettings)
register_strategy("linearized_pv", lambda s, ctx: adam_preconditioner(
    s, _with_memory(s, linearized_p_step(metric=_metric(s), beam_width=s.beam_width)), ctx), LinearizedPVSettings)
register_strategy("pv", lambda s, ctx: adam_preconditioner(s, _with_memory(s, subspace_p_step(
    fraction=float(s.p_fraction), select="greedy", score=s.p_select, metric=_metric(s), beam_width=s.beam_width)), ctx),
    PVSettings, _pv_tuned)

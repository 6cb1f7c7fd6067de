"""Quantization formats by name: QuantFormat.parse("2x8g8") finds the format's handler (llm.aqlm, llm.scalar,
or one registered with register_format), which owns the format's layer, bits and calibration.

    AQLM / VQ   MxBgG (2x8g8, 1x16g8, 1x8g8), vqBgG (= 1xBgG)     llm.aqlm.AQLMLinear
    scalar      intBgG (int2g128)                                  llm.scalar.ScalarLinear

An unknown name or kind is an error, never another format's code. A format's canonical name (str(fmt):
"vq8g8" is "1x8g8") is what presets, checkpoints and reports use.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llm.aqlm import AQLM, AQLMLinear
from llm.quantized import BITS_PER_FLOAT, FormatHandler, QuantizedLinear
from llm.scalar import SCALAR, ScalarLinear

__all__ = ["QuantFormat", "register_format", "handler_for", "make_quantized", "quantized_layers", "model_bits",
           "QuantizedLinear", "AQLMLinear", "ScalarLinear", "FormatHandler", "BITS_PER_FLOAT"]

_HANDLERS: dict = {h.kind: h for h in (AQLM, SCALAR)}


def register_format(handler: FormatHandler, replace: bool = False) -> None:
    """Make a new kind of format parseable (its handler: names, layer, bits, calibration)."""
    if not handler.kind:
        raise ValueError("a format handler needs a kind")
    if handler.kind in _HANDLERS and not replace:
        raise ValueError(f"format kind {handler.kind!r} is already registered (replace=True to replace it)")
    _HANDLERS[handler.kind] = handler


def handler_for(kind: str) -> FormatHandler:
    """The handler of a format kind; ValueError for a kind no handler has."""
    try:
        return _HANDLERS[kind]
    except KeyError:
        raise ValueError(f"unknown format kind {kind!r}; known: {', '.join(_HANDLERS)}") from None


@dataclass(frozen=True)
class QuantFormat:
    """A quantization format: its kind (which handler) and numbers. aqlm: M x B bits in groups of g;
    scalar: b bits in groups of g."""

    kind: str
    bits: int  # B for aqlm (bits per codebook index), b for scalar
    group_size: int  # g
    num_codebooks: int = 1  # M (aqlm only)

    @staticmethod
    def parse(spec: str) -> "QuantFormat":
        """'2x8g8' / '1x16g8' (AQLM), 'vq8g4' (one codebook), 'int2g64' (scalar), or a registered format's name."""
        s = str(spec).strip().lower()
        for handler in _HANDLERS.values():
            numbers = handler.parse(s)
            if numbers is not None:
                bits, group_size, num_codebooks = numbers
                return QuantFormat(handler.kind, bits, group_size, num_codebooks).validated()
        raise ValueError(f"unknown quantization format {spec!r}: use MxBgG (e.g. 2x8g8), vqBgG or intBgG (e.g. int2g64)")

    @property
    def handler(self) -> FormatHandler:
        return handler_for(self.kind)

    def validated(self) -> "QuantFormat":
        self.handler.check(self)
        return self

    def __str__(self) -> str:
        return self.handler.name(self)

    def check_divides(self, in_features: int, name: str = "layer") -> None:
        if in_features % self.group_size:
            raise ValueError(f"format {self}: group size {self.group_size} does not divide {name}'s {in_features} inputs")

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Exact bits per parameter of a layer of this shape, everything stored counted."""
        return self.handler.bits_per_weight(self, out_features, in_features)

    @property
    def code_bits(self) -> float:
        """Bits per weight in the codes alone."""
        return self.handler.code_bits(self)


def make_quantized(linear: nn.Linear, fmt: QuantFormat, device=None) -> nn.Module:
    """An empty quantized layer of the same shape as `linear`, on `device` (default: the linear's)."""
    return fmt.handler.make(linear, fmt, device)


def quantized_layers(model: nn.Module) -> dict:
    """name -> quantized layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def model_bits(model: nn.Module) -> dict:
    """Bits per quantized weight (codes + codebooks + scales) and per parameter of the whole model."""
    layers = quantized_layers(model)
    q_params = sum(m.out_features * m.in_features for m in layers.values())
    q_bits = sum(m.bits_per_weight() * m.out_features * m.in_features for m in layers.values())
    other = sum(p.numel() for n, p in model.named_parameters()
                if not any(n.startswith(ln + ".") for ln in layers))
    return {
        "quantized_weights": q_params,
        "bits_per_quantized_weight": q_bits / max(q_params, 1),
        "other_parameters_16bit": other,
        "bits_per_parameter_total": (q_bits + 16 * other) / max(q_params + other, 1),
        "megabytes": (q_bits + 16 * other) / 8 / 2**20,
    }

"""What every quantized layer and every format handler share (the formats themselves live in llm.aqlm and
llm.scalar; llm.formats parses a format's name and finds its handler).

A quantized layer is a drop-in nn.Linear whose weight is a discrete-continuous parameter: codes (P) and
continuous values (V). Its surface, used by calibration and fine-tuning alike: weight() (decode, with autograd
into V), encode(target, groups) (the projection of the P step), as_param() (the pvtheory parameter), set_codes,
set_values, codes_view (n_groups, M), group_size, continuous_parameters(), value_parameters(), and bits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the class is llm.formats', which imports this module
    from llm.formats import QuantFormat

BITS_PER_FLOAT = 16  # codebooks, scales and zeros are stored in 16 bits


def code_dtype(bits: int) -> torch.dtype:
    """The narrowest storage: uint8 up to 8 bits, int16 up to 16 (16-bit codes wrap: read them & 0xFFFF)."""
    return torch.uint8 if bits <= 8 else torch.int16


class QuantizedLinear(nn.Module):
    """Forward through the decoded weight, the gradient of the loss with respect to that weight (captured for
    P steps when `capture_weight_grad` is set), and bits accounting. Subclasses (one per format) define
    weight(), encode(), codes_view(), set_codes(), as_param(), value_parameters(), continuous_parameters()."""

    fmt: "QuantFormat"
    in_features: int
    out_features: int
    bias: Optional[nn.Parameter]

    def __init__(self, in_features: int, out_features: int, fmt: "QuantFormat") -> None:
        super().__init__()
        fmt.check_divides(in_features)
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.capture_weight_grad = False
        self.weight_grad: Optional[Tensor] = None
        self.on_weight_grad = None  # called with the layer after each captured gradient (P-step bookkeeping)

    def _store_grad(self, grad: Tensor) -> None:
        g = grad.detach().float()
        self.weight_grad = g if self.weight_grad is None else self.weight_grad + g
        if self.on_weight_grad is not None:
            self.on_weight_grad(self)

    def forward(self, x: Tensor) -> Tensor:
        W = self.weight()
        if self.capture_weight_grad and W.requires_grad:
            W.register_hook(self._store_grad)
        return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def bits_per_weight(self) -> float:
        return self.fmt.bits_per_weight(self.out_features, self.in_features)

    @torch.no_grad()
    def set_values(self, values) -> None:
        """Write a V step's values (as_param().values) into the layer's parameters."""
        for p, v in zip(self.value_parameters(), values):
            p.copy_(v.reshape(p.shape).to(p.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt}, bits/w={self.bits_per_weight():.3f}"


class FormatHandler:
    """One quantization format (as gpt-fast keeps one handler per quantization mode): its names, its layer, its
    bits and its one-shot calibration. llm.formats keeps one instance per kind; a format's QuantFormat names it
    by `kind` and carries (bits, group_size, num_codebooks)."""

    kind: str = ""
    linear: type = QuantizedLinear  # the layer class

    def parse(self, spec: str) -> Optional[tuple[int, int, int]]:
        """(bits, group_size, num_codebooks) if `spec` (lower case, stripped) names a format of this kind, else None."""
        raise NotImplementedError

    def check(self, fmt: "QuantFormat") -> None:
        """ValueError if the numbers do not make a format of this kind."""
        raise NotImplementedError

    def name(self, fmt: "QuantFormat") -> str:
        """The canonical name (what presets, checkpoints and reports use)."""
        raise NotImplementedError

    def bits_per_weight(self, fmt: "QuantFormat", out_features: int, in_features: int) -> float:
        """Exact bits per weight of a layer of this shape, everything stored counted."""
        raise NotImplementedError

    def code_bits(self, fmt: "QuantFormat") -> float:
        """Bits per weight in the codes alone (what decides how coarse a code step is)."""
        raise NotImplementedError

    def calibrate(self, linear: nn.Linear, H: Tensor, fmt: "QuantFormat", cfg, phases: Optional[dict] = None):
        """A calibrated layer replacing `linear`, given its damped input Hessian H: (layer, relative errors after
        the initialization and after each half-step). cfg: llm.calibrate.CalibrationConfig."""
        raise NotImplementedError

    def make(self, linear: nn.Linear, fmt: "QuantFormat", device=None) -> QuantizedLinear:
        """An empty layer of this format with the shape (and bias) of `linear`."""
        return self.linear(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
                           device=device or linear.weight.device)

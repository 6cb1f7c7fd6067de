"""Quantized drop-in replacements for nn.Linear; each is a discrete-continuous parameter.

- AQLMLinear: M additive codebooks of K = 2^B vectors of g inputs, a scale per output channel
  (MxB gG, e.g. 2x8g8 or 1x16g8; M = 1 is single-codebook vector quantization, "VQ").
  Its P and V are exactly pvtheory's Codebooks: `as_param()` is that parameter, read from the layer's tensors.
- ScalarLinear: uniform b-bit codes with a scale and a zero per group of g inputs (GPTQ-like);
  P = the integer codes, V = scales and zeros; decode W = scale * (code - zero).

Both expose the same surface the calibration and fine-tuning code uses: weight() (decode, with
autograd into V), encode(target, groups) (the projection of the P step), set_codes, codes_view
(n_groups, M), group_size, continuous_parameters(), and bits accounting that counts everything
stored (codes, codebooks, scales, zeros).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm import kernels
from pvtheory.codes import Codebooks, ScalarGrid, decode, decode_grid

BITS_PER_FLOAT = 16  # codebooks, scales and zeros are stored in 16 bits


@dataclass(frozen=True)
class QuantFormat:
    """A quantization format. kind: "aqlm" (M x B bits, groups of g) or "scalar" (b bits, groups of g)."""

    kind: str
    bits: int  # B for aqlm (bits per codebook index), b for scalar
    group_size: int  # g
    num_codebooks: int = 1  # M (aqlm only)

    @staticmethod
    def parse(spec: str) -> "QuantFormat":
        """'2x8g8' / '1x16g8' (AQLM), 'vq8g4' (one codebook), 'int2g64' (scalar)."""
        s = spec.strip().lower()
        if m := re.fullmatch(r"(\d+)x(\d+)g(\d+)", s):
            return QuantFormat("aqlm", int(m[2]), int(m[3]), int(m[1])).validated()
        if m := re.fullmatch(r"vq(\d+)g(\d+)", s):
            return QuantFormat("aqlm", int(m[1]), int(m[2]), 1).validated()
        if m := re.fullmatch(r"int(\d+)g(\d+)", s):
            return QuantFormat("scalar", int(m[1]), int(m[2])).validated()
        raise ValueError(f"unknown quantization format {spec!r}: use MxBgG (e.g. 2x8g8), vqBgG or intBgG (e.g. int2g64)")

    def validated(self) -> "QuantFormat":
        if self.kind == "aqlm" and not (1 <= self.bits <= 16 and self.num_codebooks >= 1 and self.group_size >= 1):
            raise ValueError(f"AQLM format needs 1 <= B <= 16, M >= 1, g >= 1; got {self}")
        if self.kind == "scalar" and not (1 <= self.bits <= 8 and self.group_size >= 1):
            raise ValueError(f"scalar format needs 1 <= b <= 8 and g >= 1; got {self}")
        return self

    def __str__(self) -> str:
        if self.kind == "aqlm":
            return f"{self.num_codebooks}x{self.bits}g{self.group_size}"
        return f"int{self.bits}g{self.group_size}"

    def check_divides(self, in_features: int, name: str = "layer") -> None:
        if in_features % self.group_size:
            raise ValueError(f"format {self}: group size {self.group_size} does not divide {name}'s {in_features} inputs")

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Exact bits per parameter of a layer of this shape, everything stored counted."""
        n = out_features * in_features
        if self.kind == "aqlm":
            code_bits = n // self.group_size * self.num_codebooks * self.bits
            book_bits = self.num_codebooks * (1 << self.bits) * self.group_size * BITS_PER_FLOAT
            return (code_bits + book_bits + out_features * BITS_PER_FLOAT) / n
        groups = n // self.group_size
        return (n * self.bits + 2 * groups * BITS_PER_FLOAT) / n


def _code_dtype(bits: int) -> torch.dtype:
    """The narrowest storage: uint8 up to 8 bits, int16 up to 16 (16-bit codes wrap: read them & 0xFFFF)."""
    return torch.uint8 if bits <= 8 else torch.int16


class QuantizedLinearBase(nn.Module):
    """What every quantized layer shares: forward through the decoded weight, the gradient of the
    loss with respect to that weight (captured for P steps when `capture_weight_grad` is set),
    and bits accounting. Subclasses define weight(), encode(), codes_view(), set_codes()."""

    fmt: QuantFormat
    in_features: int
    out_features: int
    bias: Optional[nn.Parameter]

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat) -> None:
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


class AQLMLinear(QuantizedLinearBase):
    """y = x W' + b with W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]]."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, fmt)
        M, K, g = fmt.num_codebooks, 1 << fmt.bits, fmt.group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features // g, M, dtype=_code_dtype(fmt.bits), device=device))
        self.codebooks = nn.Parameter(torch.zeros(M, K, g, device=device, dtype=dtype))
        self.scales = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.shared_input = None  # llm.fuse.SharedInputGroup: one decoding launch with the layers that read x

    # the discrete-continuous parameter ---------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.fmt.group_size

    def code_indices(self) -> Tensor:
        """The codes as (out, in/g, M) int64 indices into the codebooks (16-bit codes unwrapped)."""
        c = self.codes.long()
        return c & 0xFFFF if self.fmt.bits == 16 else c

    def codes_view(self) -> Tensor:
        """P as (n_groups, M) int64: group (o, j) is row o * in/g + j."""
        return self.code_indices().reshape(-1, self.fmt.num_codebooks)

    def as_param(self) -> Codebooks:
        """The layer's discrete-continuous parameter for the P and V steps: its Codebooks in float32,
        detached (the steps return new values; set_values writes them back)."""
        return Codebooks(self.codes_view(), self.codebooks.detach().float(), (self.out_features, self.in_features),
                         self.scales.detach().float())

    def value_parameters(self) -> list:
        """The parameters that make V, in the order of as_param().values."""
        return [self.codebooks, self.scales]

    def set_codes(self, codes: Tensor) -> None:
        self.codes.copy_(codes.reshape(self.codes.shape).to(self.codes.dtype))

    def weight(self) -> Tensor:
        """The dequantized weight (out, in), differentiable in codebooks and scales."""
        return decode(self.codes_view(), self.codebooks, (self.out_features, self.in_features), self.scales)

    def encode(self, target: Tensor, groups: Optional[Tensor] = None, beam_width: int = 4,
               weights: Optional[Tensor] = None) -> Tensor:
        """Codes (n_groups, M) nearest to the target weight in the given groups (beam search for M > 1),
        in the metric sum_i weights_i (w_i - target_i)^2 (Euclidean if weights is None)."""
        with torch.no_grad():
            return self.as_param().encode(target.detach().float(), groups=groups, beam_width=beam_width,
                                          weights=None if weights is None else weights.detach().float())

    def continuous_parameters(self) -> list:
        return [p for p in (self.codebooks, self.scales, self.bias) if p is not None]

    def forward(self, x: Tensor) -> Tensor:
        """Decoding-sized inference goes through a kernel that never forms W (llm.kernels)."""
        y = kernels.aqlm_forward(self, x)
        return super().forward(x) if y is None else y



class ScalarLinear(QuantizedLinearBase):
    """y = x W' + b with W[o, i] = scale[o, i // g] * (codes[o, i] - zero[o, i // g]), codes in [0, 2^b)."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, fmt)
        ng = in_features // fmt.group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.scales = nn.Parameter(torch.ones(out_features, ng, device=device, dtype=dtype))
        self.zeros = nn.Parameter(torch.zeros(out_features, ng, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def group_size(self) -> int:
        return 1  # every weight is its own code group for the P step

    def codes_view(self) -> Tensor:
        return self.codes.reshape(-1, 1).long()

    def set_codes(self, codes: Tensor) -> None:
        self.codes.copy_(codes.reshape(self.codes.shape).to(self.codes.dtype))

    def weight(self) -> Tensor:
        """The dequantized weight (out, in), differentiable in scales and zeros."""
        return decode_grid(self.codes, self.scales, self.zeros, (self.out_features, self.in_features))

    def as_param(self) -> ScalarGrid:
        """The layer's discrete-continuous parameter for the P and V steps, in float32, detached."""
        return ScalarGrid(self.codes_view(), self.scales.detach().float(), self.zeros.detach().float(),
                          self.fmt.bits, (self.out_features, self.in_features))

    def value_parameters(self) -> list:
        """The parameters that make V, in the order of as_param().values."""
        return [self.scales, self.zeros]

    def encode(self, target: Tensor, groups: Optional[Tensor] = None, beam_width: int = 1,
               weights: Optional[Tensor] = None) -> Tensor:
        """Nearest grid point: clamp(round(target / scale + zero), 0, 2^b - 1), only in `groups`."""
        with torch.no_grad():
            return self.as_param().encode(target.detach().float(), groups=groups)

    def continuous_parameters(self) -> list:
        return [p for p in (self.scales, self.zeros, self.bias) if p is not None]



QuantizedLinear = QuantizedLinearBase


def make_quantized(linear: nn.Linear, fmt: QuantFormat, device=None) -> nn.Module:
    """An empty quantized layer of the same shape as `linear`, on `device` (default: the linear's)."""
    cls = AQLMLinear if fmt.kind == "aqlm" else ScalarLinear
    return cls(linear.in_features, linear.out_features, fmt, bias=linear.bias is not None,
               device=device or linear.weight.device)


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

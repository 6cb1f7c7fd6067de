"""Scalar (GPTQ-like) quantization: uniform b-bit codes with a scale and a zero per group of g inputs (intBgG,
e.g. int2g128). P = the integer codes, V = scales and zeros; W = scale * (code - zero). Everything this format
is: its name, its layer (ScalarLinear), its bits, and its one-shot calibration (GPTQ: column by column with
inverse-Hessian error feedback, then Adam on scales and zeros).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor, nn

from llm.layer_objective import adam_v_steps, relative_error, timed
from llm.quantized import BITS_PER_FLOAT, FormatHandler, QuantizedLinear
from pvtheory.codes import ScalarGrid, decode_grid


class ScalarLinear(QuantizedLinear):
    """y = x W' + b with W[o, i] = scale[o, i // g] * (codes[o, i] - zero[o, i // g]), codes in [0, 2^b)."""

    def __init__(self, in_features: int, out_features: int, fmt, bias: bool = False,
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


@torch.no_grad()
def quantize_gptq(linear: nn.Linear, H: Tensor, fmt, cfg,
                  phases: Optional[dict] = None) -> tuple[ScalarLinear, list]:
    """Scalar layer by GPTQ: columns in order, each group's scale/zero from its (updated) min/max,
    the rounding error spread over the later columns through the Cholesky factor of H^-1.
    phases (optional): seconds of the V step are added to it."""
    W0 = linear.weight.detach().float()
    W = W0.clone()
    layer = SCALAR.make(linear, fmt, W.device)
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach().float())
    out, n = W.shape
    g, qmax = fmt.group_size, (1 << fmt.bits) - 1
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W, dtype=torch.long)
    scales = torch.zeros(out, n // g, device=W.device)
    zeros = torch.zeros(out, n // g, device=W.device)
    for i in range(n):
        if i % g == 0:
            grp = W[:, i:i + g]
            lo, hi = grp.min(1).values.clamp(max=0), grp.max(1).values.clamp(min=0)
            sc = ((hi - lo) / qmax).clamp_min(1e-8)
            scales[:, i // g], zeros[:, i // g] = sc, torch.round(-lo / sc)
        sc, z = scales[:, i // g], zeros[:, i // g]
        q = torch.clamp(torch.round(W[:, i] / sc + z), 0, qmax)
        codes[:, i] = q.long()
        err = (W[:, i] - sc * (q - z)) / Hinv[i, i]
        W[:, i + 1:] -= err.unsqueeze(1) * Hinv[i, i + 1:].unsqueeze(0)
    layer.scales.data.copy_(scales)
    layer.zeros.data.copy_(zeros)
    layer.set_codes(codes)
    errs = [float(relative_error(layer.weight().detach(), W0, H))]
    with timed(phases, "v_step"):
        adam_v_steps(layer, W0, H, cfg.adam_v_iters, cfg.adam_v_lr)
    errs.append(float(relative_error(layer.weight().detach(), W0, H)))
    return layer, errs


class ScalarFormat(FormatHandler):
    """intBgG: B-bit codes, a scale and a zero per group of g inputs."""

    kind = "scalar"
    linear = ScalarLinear

    def parse(self, spec: str) -> Optional[tuple[int, int, int]]:
        if m := re.fullmatch(r"int(\d+)g(\d+)", spec):
            return int(m[1]), int(m[2]), 1
        return None

    def check(self, fmt) -> None:
        if not (1 <= fmt.bits <= 8 and fmt.group_size >= 1):
            raise ValueError(f"scalar format needs 1 <= b <= 8 and g >= 1; got int{fmt.bits}g{fmt.group_size}")

    def name(self, fmt) -> str:
        return f"int{fmt.bits}g{fmt.group_size}"

    def bits_per_weight(self, fmt, out_features: int, in_features: int) -> float:
        n = out_features * in_features
        return (n * fmt.bits + 2 * (n // fmt.group_size) * BITS_PER_FLOAT) / n

    def code_bits(self, fmt) -> float:
        return float(fmt.bits)

    def calibrate(self, linear: nn.Linear, H: Tensor, fmt, cfg, phases: Optional[dict] = None):
        return quantize_gptq(linear, H, fmt, cfg, phases)


SCALAR = ScalarFormat()

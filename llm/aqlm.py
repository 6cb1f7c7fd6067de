"""AQLM / VQ: M additive codebooks of K = 2^B vectors of g inputs, a scale per output channel (MxBgG, e.g. 2x8g8
or 1x16g8; M = 1 is single-codebook vector quantization, "VQ", also written vqBgG). Everything this format
is: its names, its layer (AQLMLinear), its bits, and its one-shot calibration.

The layer's P and V are exactly pvtheory's Codebooks: `as_param()` is that parameter, read from the layer's
tensors. Calibration is PV on the layer objective f (llm.layer_objective): weighted residual k-means
(weighted by diag H), then up to `rounds` alternations of a P step, an exact block-coordinate sweep over the
column groups (each group's codes by beam search under the metric H_jj, all rows at once, started from the
current codes so f never increases), and an exact V step: the codebooks solve their normal equations
(conjugate gradients, A applied without forming it), then the per-row scales in closed form (or Adam,
exact_v=False).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor, nn

from llm import kernels
from llm.layer_objective import adam_v_steps, diagonal_blocks, relative_error, timed
from llm.quantized import BITS_PER_FLOAT, FormatHandler, QuantizedLinear, code_dtype
from pvtheory.codes import Codebooks, beam_search, decode, nearest_entry
from pvtheory.init import residual_kmeans


class AQLMLinear(QuantizedLinear):
    """y = x W' + b with W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m]]."""

    def __init__(self, in_features: int, out_features: int, fmt, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, fmt)
        M, K, g = fmt.num_codebooks, 1 << fmt.bits, fmt.group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features // g, M, dtype=code_dtype(fmt.bits), device=device))
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


# --- P step: exact block-coordinate sweep under the Hessian metric --------------------------------
@torch.no_grad()
def hessian_code_sweep(layer: AQLMLinear, W: Tensor, H: Tensor, beam_width: int) -> int:
    """Each column group j in turn takes, in every row at once, the code tuple minimizing f with the
    other groups fixed: f changes by (c - t)' H_jj (c - t) - const with t = w^_j - H_jj^-1 g_j, where
    g = (W^ - W) H. Beam search starts from the current codes, so f never increases.
    Returns the number of groups whose codes changed."""
    g, M = layer.fmt.group_size, layer.fmt.num_codebooks
    n_cols = layer.in_features // g
    cb = layer.codebooks.detach().float()
    s = layer.scales.detach().float().unsqueeze(1)
    s = torch.where(s == 0, torch.ones_like(s), s)
    codes = layer.code_indices().clone()  # (out, n_cols, M)
    changed = torch.zeros((), dtype=torch.long, device=W.device)
    W_hat = layer.weight().detach().float()
    G = (W_hat - W) @ H
    blocks = diagonal_blocks(H, g)
    inv_blocks = torch.linalg.inv(blocks)
    for j in range(n_cols):
        sl = slice(j * g, (j + 1) * g)
        target = (W_hat[:, sl] - G[:, sl] @ inv_blocks[j]) / s  # per row, in codebook units
        if M == 1:
            new = nearest_entry(target, cb[0], metric=blocks[j]).unsqueeze(1)
            old_err = _metric_err(cb[0][codes[:, j, 0]] - target, blocks[j])
            new_err = _metric_err(cb[0][new[:, 0]] - target, blocks[j])
            new = torch.where((new_err < old_err).unsqueeze(1), new, codes[:, j])
        else:
            new = beam_search(target, cb, codes[:, j], None, beam_width, metric=blocks[j])
        changed += (new != codes[:, j]).any(1).sum()
        codes[:, j] = new
        block = s * sum(cb[m][new[:, m]] for m in range(M))
        G += (block - W_hat[:, sl]) @ H[sl, :]  # unconditionally: testing "did any move" would stall the GPU
        W_hat[:, sl] = block
    layer.set_codes(codes)
    return int(changed)


def _metric_err(diff: Tensor, A: Tensor) -> Tensor:
    return ((diff @ A) * diff).sum(-1)


# --- V step: exact codebooks (conjugate gradients on the normal equations) and scales --------------
def _scatter_to_entries(per_group: Tensor, s: Tensor, idx: Tensor, M: int, K: int) -> Tensor:
    """sum over (o, j) with code k in codebook m of s_o * per_group[o, j]: the adjoint of decoding."""
    g = per_group.shape[-1]
    out = torch.zeros(M * K, g, device=per_group.device, dtype=per_group.dtype)
    vals = (s.reshape(-1, 1, 1) * per_group).reshape(-1, g)
    for m in range(M):
        out.index_add_(0, idx[:, :, m].reshape(-1), vals)
    return out.reshape(M, K, g)


@torch.no_grad()
def exact_codebooks(layer: AQLMLinear, W: Tensor, H: Tensor, max_iters: int = 200, rtol: float = 1e-6) -> int:
    """Codebooks = argmin f with codes and scales fixed. f is a quadratic in the M*K*g codebook
    entries whose normal equations A c = b are solved by conjugate gradients, warm-started at the
    current codebooks and preconditioned by the g x g diagonal blocks of A. A is never formed: A c
    decodes the weight with codebooks c, multiplies by H, and sums back onto the entries.
    f never increases (the current codebooks are kept if rounding made the answer worse).
    Returns the number of iterations."""
    M, K, g = layer.codebooks.shape
    n_cols = layer.in_features // g
    s = layer.scales.detach().float()
    idx = layer.code_indices() + torch.arange(M, device=W.device) * K  # (out, n_cols, M): row of A per code
    cb = layer.as_param()  # decoded below with the codebooks and scales being solved for

    def weight_with(c: Tensor) -> Tensor:
        return cb.decode(c, s)

    def apply_A(c: Tensor) -> Tensor:
        return _scatter_to_entries((weight_with(c) @ H).reshape(-1, n_cols, g), s, idx, M, K)

    def f(c: Tensor) -> Tensor:
        D = weight_with(c) - W
        return ((D @ H) * D).sum()

    b = _scatter_to_entries((W @ H).reshape(-1, n_cols, g), s, idx, M, K)
    # diagonal blocks of A: sum over (o, j) with code k of s_o^2 H_jj
    s_Hjj = s.reshape(-1, 1, 1) * diagonal_blocks(H, g).reshape(1, n_cols, g * g)
    blocks = _scatter_to_entries(s_Hjj, s, idx, M, K).reshape(M * K, g, g)
    used = blocks.diagonal(dim1=1, dim2=2).sum(-1) > 0
    eye = torch.eye(g, device=W.device)
    inv = torch.linalg.inv(torch.where(used.reshape(-1, 1, 1), blocks, eye)).reshape(M, K, g, g)

    def precondition(r: Tensor) -> Tensor:
        return torch.einsum("mkab,mkb->mka", inv, r)

    x0 = layer.codebooks.detach().float()
    x = x0.clone()
    r = b - apply_A(x)
    z = precondition(r)
    p, rz = z, (r * z).sum()
    b_norm = b.norm().clamp_min(1e-30)
    it = 0
    for it in range(1, max_iters + 1):
        Ap = apply_A(p)
        pAp = (p * Ap).sum()
        if pAp <= 0:
            break
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        if r.norm() <= rtol * b_norm:
            break
        z = precondition(r)
        rz_new = (r * z).sum()
        p, rz = z + (rz_new / rz) * p, rz_new
    if f(x) <= f(x0):
        layer.codebooks.data.copy_(x)
    return it


@torch.no_grad()
def exact_scales(layer: AQLMLinear, W: Tensor, H: Tensor) -> None:
    """Scales = argmin f with codes and codebooks fixed: per row s_o = (c_o' H w_o) / (c_o' H c_o)."""
    C = decode_unscaled(layer)
    CH = C @ H
    num, den = (CH * W).sum(1), (CH * C).sum(1)
    layer.scales.data.copy_(torch.where(den > 0, num / den.clamp_min(1e-30), layer.scales.data))


def decode_unscaled(layer: AQLMLinear) -> Tensor:
    return decode(layer.codes_view(), layer.codebooks.detach().float(), (layer.out_features, layer.in_features))


def exact_layer_values(layer: AQLMLinear, W: Tensor, H: Tensor, sweeps: int = 2) -> int:
    """Alternate exact codebooks and exact scales (block-coordinate exact V step; f never increases).
    Returns the conjugate-gradient iterations used."""
    iters = 0
    for _ in range(sweeps):
        iters += exact_codebooks(layer, W, H)
        exact_scales(layer, W, H)
    return iters


def quantize_aqlm(linear: nn.Linear, H: Tensor, fmt, cfg,
                  phases: Optional[dict] = None) -> tuple[AQLMLinear, list]:
    """AQLM/VQ layer: weighted residual k-means, then up to `rounds` x (Hessian code sweep, V step),
    stopping early once a round improves the error by less than cfg.tolerance (relative).
    phases (optional): seconds of init / p_step / v_step and cg_iterations are added to it."""
    W = linear.weight.detach().float()
    layer = AQLM.make(linear, fmt, W.device)
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach().float())
    with timed(phases, "init"):
        scales = W.norm(dim=1) / W.shape[1] ** 0.5
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        importance = H.diagonal().clamp_min(1e-12).unsqueeze(0).expand_as(W)
        init = residual_kmeans(W, W.shape, fmt.num_codebooks, 1 << fmt.bits, fmt.group_size, cfg.kmeans_iters,
                               cfg.seed, scales=scales, weights=importance / importance.mean())
        with torch.no_grad():
            layer.codebooks.copy_(init.codebooks)
            layer.scales.copy_(scales)
            layer.set_codes(init.codes)
    errs = [float(relative_error(layer.weight().detach(), W, H))]
    for _ in range(cfg.rounds):
        with timed(phases, "p_step"):
            hessian_code_sweep(layer, W, H, cfg.beam_width)
        errs.append(float(relative_error(layer.weight().detach(), W, H)))
        with timed(phases, "v_step"):
            if cfg.exact_v:
                iters = exact_layer_values(layer, W, H)
                if phases is not None:
                    phases["cg_iterations"] = phases.get("cg_iterations", 0) + iters
            else:
                adam_v_steps(layer, W, H, cfg.adam_v_iters, cfg.adam_v_lr)
        errs.append(float(relative_error(layer.weight().detach(), W, H)))
        if len(errs) > 3 and errs[-3] - errs[-1] < cfg.tolerance * errs[-3]:
            break
    return layer, errs


class AQLMFormat(FormatHandler):
    """MxBgG (M codebooks of 2^B entries, groups of g inputs) and vqBgG (M = 1)."""

    kind = "aqlm"
    linear = AQLMLinear

    def parse(self, spec: str) -> Optional[tuple[int, int, int]]:
        if m := re.fullmatch(r"(\d+)x(\d+)g(\d+)", spec):
            return int(m[2]), int(m[3]), int(m[1])
        if m := re.fullmatch(r"vq(\d+)g(\d+)", spec):
            return int(m[1]), int(m[2]), 1
        return None

    def check(self, fmt) -> None:
        if not (1 <= fmt.bits <= 16 and fmt.num_codebooks >= 1 and fmt.group_size >= 1):
            raise ValueError(f"AQLM format needs 1 <= B <= 16, M >= 1, g >= 1; got {fmt.num_codebooks}x{fmt.bits}g{fmt.group_size}")

    def name(self, fmt) -> str:
        return f"{fmt.num_codebooks}x{fmt.bits}g{fmt.group_size}"

    def bits_per_weight(self, fmt, out_features: int, in_features: int) -> float:
        n = out_features * in_features
        code_bits = n // fmt.group_size * fmt.num_codebooks * fmt.bits
        book_bits = fmt.num_codebooks * (1 << fmt.bits) * fmt.group_size * BITS_PER_FLOAT
        return (code_bits + book_bits + out_features * BITS_PER_FLOAT) / n

    def code_bits(self, fmt) -> float:
        return fmt.bits * fmt.num_codebooks / fmt.group_size

    def calibrate(self, linear: nn.Linear, H: Tensor, fmt, cfg, phases: Optional[dict] = None):
        return quantize_aqlm(linear, H, fmt, cfg, phases)


AQLM = AQLMFormat()

"""One-shot calibration, block by block: each linear layer minimizes its output error on calibration data.

Per linear layer with weight W and input Hessian H = X'X / n (X: the layer's calibration inputs),
the objective is the quadratic f(W^) = tr((W^ - W) H (W^ - W)'), i.e. ||X W^' - X W'||^2 / n.
That is a pvtheory objective over a discrete-continuous parameter, and calibration is PV on it:

- AQLM / VQ: residual k-means initialization (weighted by diag H), then up to `rounds` alternations of
  a P step, an exact block-coordinate sweep over the column groups (each group's codes by beam
  search under the metric H_jj, all rows at once, started from the current codes so f never
  increases), and an exact V step: the codebooks solve their normal equations (conjugate gradients,
  A applied without forming it), then the per-row scales in closed form (or Adam, exact_v=False);
- scalar: GPTQ (column by column with inverse-Hessian error feedback), then the same Adam V step.

With true_sequential, a block's linears are quantized in the order they are read (q,k,v; o; gate,up;
down), each group's Hessian taken from the block with the earlier groups already quantized.
Optionally each block's continuous parameters are then tuned to reproduce the original block's
outputs (and, with block_tune_tau > 0, its codes by PV-Tuning's P step). Only the block being
calibrated sits on the device; the rest of the model stays where it is.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from llm import checkpoint as C
from llm import distributed as D
from llm.formats import AQLMLinear, QuantFormat, ScalarLinear, make_quantized
from llm.model import BLOCK_LINEARS, block_linears, decoder_layers, linear_shapes, set_module
from pvtheory.codes import beam_search, decode, nearest_entry
from pvtheory.init import residual_kmeans


@dataclass
class CalibrationConfig:
    fmt: str = "2x8g8"
    rounds: int = 12  # at most this many P/V alternations per layer
    tolerance: float = 0.002  # stop a layer's rounds once a round improves its error by less than this (relative)
    beam_width: int = 4
    exact_v: bool = True  # exact V step (codebooks by conjugate gradients, scales in closed form); False: Adam
    v_steps: int = 100  # Adam steps on codebooks and scales per round (when not exact)
    v_lr: float = 1e-3
    kmeans_iters: int = 20
    damping: float = 1e-2  # H + damping * mean(diag H) * I
    block_tune_steps: int = 1000  # Adam steps on each block's continuous parameters (0: off)
    block_tune_lr: float = 3e-4
    block_tune_tau: float = 0.0  # > 0: block tuning is PV (P steps on this fraction of code groups per step)
    block_tune_p_lr: float = 1e-3  # the P step's Adam-normalized weight update during block tuning
    batch_size: int = 16
    linears: tuple = BLOCK_LINEARS
    true_sequential: bool = False  # True: Hessians of o_proj / MLP from the block with its earlier linears quantized
    original_targets: bool = False  # True: tune each block toward the original model's outputs (undoing upstream error)
    seed: int = 0

    def validate(self) -> "CalibrationConfig":
        """Raise ValueError naming the first setting out of range."""
        QuantFormat.parse(self.fmt)
        checks = [("rounds", self.rounds >= 0, ">= 0"), ("tolerance", self.tolerance >= 0, ">= 0"),
                  ("beam_width", self.beam_width >= 1, ">= 1"), ("v_steps", self.v_steps >= 0, ">= 0"),
                  ("v_lr", self.v_lr > 0, "> 0"), ("kmeans_iters", self.kmeans_iters >= 1, ">= 1"),
                  ("damping", self.damping >= 0, ">= 0"), ("block_tune_steps", self.block_tune_steps >= 0, ">= 0"),
                  ("block_tune_lr", self.block_tune_lr > 0, "> 0"), ("block_tune_tau", 0 <= self.block_tune_tau <= 1, "in [0, 1]"),
                  ("batch_size", self.batch_size >= 1, ">= 1")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"calibration setting {name} must be {rule}, got {getattr(self, name)}")
        return self


def check_format_fits(model, cfg: CalibrationConfig) -> None:
    """Raise ValueError if cfg's format cannot quantize one of the linears it names in `model` (a built
    model, or a model directory or GGUF file, from its config alone): a run fails here, not after minutes
    of work."""
    fmt = QuantFormat.parse(cfg.fmt)
    for name, (_, n_in) in linear_shapes(model, cfg.linears).items():
        fmt.check_divides(n_in, name)


@dataclass
class LayerReport:
    name: str
    relative_error: list = field(default_factory=list)  # f / tr(W H W') after init and each half-step
    seconds: float = 0.0


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
    return H + damping * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)


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


def exact_v_step(layer: AQLMLinear, W: Tensor, H: Tensor, sweeps: int = 2) -> int:
    """Alternate exact codebooks and exact scales (block-coordinate exact V step; f never increases).
    Returns the conjugate-gradient iterations used."""
    iters = 0
    for _ in range(sweeps):
        iters += exact_codebooks(layer, W, H)
        exact_scales(layer, W, H)
    return iters


# --- V step: Adam on the continuous parameters ---------------------------------------------------
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


# --- layer quantizers -----------------------------------------------------------------------------
def quantize_aqlm(linear: nn.Linear, H: Tensor, fmt: QuantFormat, cfg: CalibrationConfig,
                  phases: Optional[dict] = None) -> tuple[AQLMLinear, list]:
    """AQLM/VQ layer: weighted residual k-means, then up to `rounds` x (Hessian code sweep, V step),
    stopping early once a round improves the error by less than cfg.tolerance (relative).
    phases (optional): seconds of init / p_step / v_step and cg_iterations are added to it."""
    W = linear.weight.detach().float()
    layer = make_quantized(linear, fmt).to(W.device)
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
                iters = exact_v_step(layer, W, H)
                if phases is not None:
                    phases["cg_iterations"] = phases.get("cg_iterations", 0) + iters
            else:
                adam_v_steps(layer, W, H, cfg.v_steps, cfg.v_lr)
        errs.append(float(relative_error(layer.weight().detach(), W, H)))
        if len(errs) > 3 and errs[-3] - errs[-1] < cfg.tolerance * errs[-3]:
            break
    return layer, errs


@torch.no_grad()
def quantize_gptq(linear: nn.Linear, H: Tensor, fmt: QuantFormat, cfg: CalibrationConfig,
                  phases: Optional[dict] = None) -> tuple[ScalarLinear, list]:
    """Scalar layer by GPTQ: columns in order, each group's scale/zero from its (updated) min/max,
    the rounding error spread over the later columns through the Cholesky factor of H^-1.
    phases (optional): seconds of the V step are added to it."""
    W0 = linear.weight.detach().float()
    W = W0.clone()
    layer = make_quantized(linear, fmt).to(W.device)
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
        adam_v_steps(layer, W0, H, cfg.v_steps, cfg.v_lr)
    errs.append(float(relative_error(layer.weight().detach(), W0, H)))
    return layer, errs


def quantize_linear(linear: nn.Linear, H: Tensor, fmt: QuantFormat, cfg: CalibrationConfig,
                    phases: Optional[dict] = None):
    """A calibrated quantized replacement of `linear` given its input Hessian H (damped here);
    (layer, relative errors after init and each half-step)."""
    Hd = damped(H.float(), cfg.damping)
    return (quantize_aqlm if fmt.kind == "aqlm" else quantize_gptq)(linear, Hd, fmt, cfg, phases)


# --- block-by-block driver ------------------------------------------------------------------------
class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, sequences: Tensor, batch_size: int, device) -> tuple[list, dict]:
    """Hidden states entering the first block for each batch, and the keyword arguments the model
    passes to its blocks (attention mask, rotary embeddings, ...), captured by a hook."""
    layers = decoder_layers(model)
    inputs, kwargs = [], {}

    def hook(module, args, kw):
        inputs.append(args[0].detach() if args else kw["hidden_states"].detach())
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(sequences), batch_size):
            try:
                model(input_ids=sequences[i:i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    return inputs, kwargs


def _block_kwargs(kwargs: dict, batch: int) -> dict:
    """The captured kwargs, with a batch-shaped attention mask cut to this batch's size."""
    out = dict(kwargs)
    mask = out.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() >= 1 and mask.shape[0] > batch:
        out["attention_mask"] = mask[:batch]
    return out


@torch.no_grad()
def run_block(block: nn.Module, inputs: list, kwargs: dict) -> list:
    """The block's outputs for each batch of inputs, with the captured keyword arguments."""
    return [block(x, **_block_kwargs(kwargs, x.shape[0])) for x in inputs]


@torch.no_grad()
def collect_hessians(block: nn.Module, inputs: list, kwargs: dict, names) -> tuple[dict, list]:
    """H = X'X / n for the input X of every named linear, and the block's outputs."""
    linears = block_linears(block, names)
    H = {n: None for n in names}
    counts = {n: 0 for n in names}
    handles = []
    for n, mod in linears.items():
        def hook(module, args, out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            H[n] = x.T @ x if H[n] is None else H[n] + x.T @ x
            counts[n] += x.shape[0]
        handles.append(mod.register_forward_hook(hook))
    try:
        outputs = run_block(block, inputs, kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: H[n] / counts[n] for n in names}, outputs


def tune_block(block: nn.Module, inputs: list, targets: list, kwargs: dict, steps: int, lr: float,
               tau: float = 0.0, p_lr: float = 1e-3, beam_width: int = 4, seed: int = 0) -> list:
    """Adam on the block's continuous parameters (codebooks, scales, norms) to match `targets`
    (the V step); with tau > 0 also a greedy-subspace P step on the codes after each backward pass,
    the same one PV-Tuning uses end to end. Returns the loss of every step.

    Under torch.distributed (without the P step) the steps are data parallel: each process runs the
    block on its share of every batch's rows and the gradients of the batch's mean are summed over
    processes, so every process takes the one-process step (up to the order of floating-point sums)."""
    from llm.finetune import CodeStep, FinetuneConfig  # fine-tuning's P step, reused at block level

    params = [p for n, p in block.named_parameters() if p.requires_grad and p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
    code_step = None
    if tau > 0:
        code_step = CodeStep(block, FinetuneConfig(strategy="pv", tau=tau, p_lr=p_lr, beam_width=beam_width, seed=seed),
                             distributed=False)  # every process tunes the whole block (the first one's is kept)
    data_parallel = code_step is None and D.world_size() > 1 and min(len(x) for x in inputs) >= D.world_size()
    losses = []
    with torch.enable_grad(), (code_step.capturing() if code_step else nullcontext()):
        for step in range(steps):
            i = step % len(inputs)
            x, t = inputs[i], targets[i]
            if data_parallel:
                x, t = D.rank_rows(x), D.rank_rows(t)
            out = block(x, **_block_kwargs(kwargs, x.shape[0]))
            if data_parallel:  # this process's part of the mean over the whole batch
                loss = F.mse_loss(out.float(), t.float(), reduction="sum") / targets[i].numel()
            else:
                loss = F.mse_loss(out.float(), t.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if data_parallel:
                loss = loss.detach().clone()
                D.all_reduce_sum_([p.grad for p in params] + [loss])
            if code_step is not None:
                code_step.step()
            opt.step()
            losses.append(loss.item())
    return losses


def sequential_groups(names, true_sequential: bool) -> list:
    """The order in which a block's linears are quantized: with true_sequential, groups that read the
    same input (q,k,v; o; gate,up; down), each group's Hessian taken after the earlier ones are quantized."""
    if not true_sequential:
        return [list(names)]
    stages = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    groups = [[n for n in names if n.split(".")[-1] in stage] for stage in stages]
    rest = [n for n in names if not any(n in g for g in groups)]
    return [g for g in groups if g] + ([rest] if rest else [])


def calibrate(model: nn.Module, sequences: Tensor, cfg: CalibrationConfig, device=None,
              progress: bool = True, on_block: Optional[Callable[[int, dict], None]] = None,
              start_block: int = 0, report: Optional[dict] = None) -> dict:
    """Quantize every listed linear of every block of `model` in place; returns a report.

    The model may live on the CPU: each block is moved to `device` while it is calibrated
    (embeddings too, for the first forward), then moved back. Under torch.distributed (every rank
    calling this with the same arguments) the layers of a block are dealt out to the ranks by size,
    each quantized by its owner and broadcast, and block tuning is data parallel over the ranks;
    every rank ends with the same model.

    on_block(i, report so far) runs after block i (e.g. to save a partial checkpoint). To resume an
    interrupted run: `model` with its first `start_block` blocks as that run left them and `report`
    its report so far; their outputs on `sequences` become the next block's inputs.
    """
    if start_block and cfg.original_targets:
        raise ValueError("a calibration with original_targets cannot resume (its targets need the original blocks)")
    fmt = QuantFormat.parse(cfg.fmt)
    home = next(model.parameters()).device
    device = torch.device(device or home)
    t0 = time.time()
    emb = model.get_input_embeddings()
    rotary = getattr(model.model, "rotary_emb", None)
    for m in (emb, rotary):
        if m is not None:
            m.to(device)
    layers = decoder_layers(model)
    layers[0].to(device)
    check_format_fits(model, cfg)  # before any work
    inputs, kwargs = capture_block_inputs(model, sequences, cfg.batch_size, device)
    layers[0].to(home)
    for m in (emb, rotary):
        if m is not None:
            m.to(home)
    prior_seconds = 0.0
    if start_block:
        done = [r for r in report["layers"] if int(r["name"].split(".")[2]) < start_block]  # model.layers.{i}.*
        report = {**report, "layers": done, "blocks": list(report["blocks"][:start_block])}
        phases, prior_seconds = dict(report.get("phase_seconds", {})), report.get("seconds", 0.0)
        for block in layers[:start_block]:  # the calibrated blocks' outputs: the inputs of the next one
            inputs = run_block(block.to(device), inputs, kwargs)
            block.to(home)
    else:
        report = {"config": asdict(cfg), "format": str(fmt), "layers": [], "blocks": []}
        phases = {}  # seconds per phase over the whole model (and the V step's conjugate-gradient iterations)
    original_inputs = list(inputs) if cfg.original_targets else None  # the unquantized model's activations
    for i in tqdm(range(start_block, len(layers)), desc=f"calibrate {fmt}", disable=not progress,
                  initial=start_block, total=len(layers)):
        block, tb = layers[i], time.time()
        block.to(device)
        targets = None
        if original_inputs is not None:
            original_inputs = targets = run_block(block, original_inputs, kwargs)
        for group in sequential_groups(cfg.linears, cfg.true_sequential):
            with timed(phases, "hessians"):
                H, outputs = collect_hessians(block, inputs, kwargs, group)
            targets = outputs if targets is None else targets  # the original block's outputs
            linears = block_linears(block, group)
            owner = D.layer_owners({n: m.out_features * m.in_features for n, m in linears.items()})
            for name, linear in linears.items():  # under torch.distributed, each on its owner rank
                tl = time.time()
                if owner[name] == D.rank():
                    qlayer, errs = quantize_linear(linear, H[name], fmt, cfg, phases)
                else:
                    qlayer, errs = make_quantized(linear, fmt), None
                qlayer = qlayer.to(device)
                D.broadcast_module_(qlayer, owner[name])
                errs = D.broadcast_object(errs, owner[name])
                set_module(block, name, qlayer)
                report["layers"].append(asdict(LayerReport(f"model.layers.{i}.{name}", errs, round(time.time() - tl, 3))))
            del H, outputs
        losses = []
        if cfg.block_tune_steps:
            with timed(phases, "block_tune"):
                losses = tune_block(block, inputs, targets, kwargs, cfg.block_tune_steps, cfg.block_tune_lr,
                                    cfg.block_tune_tau, cfg.block_tune_p_lr, cfg.beam_width, cfg.seed)
                D.broadcast_module_(block, 0)  # replicas that drifted apart by floating point agree again
        with timed(phases, "block_outputs"):
            outputs = run_block(block, inputs, kwargs)
        mse = sum(float(F.mse_loss(o.float(), t.float())) for o, t in zip(outputs, targets)) / len(inputs)
        report["blocks"].append({"block": i, "output_mse": mse, "tune_losses_first_last": losses[:1] + losses[-1:],
                                 "seconds": round(time.time() - tb, 2)})
        inputs = outputs
        block.to(home)
        report["phase_seconds"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in phases.items()}
        report["seconds"] = round(time.time() - t0 + prior_seconds, 2)
        if on_block is not None:
            on_block(i, report)
    return report


def calibrate_to(out, model: nn.Module, sequences: Tensor, cfg: CalibrationConfig, meta: dict, device=None,
                 progress: bool = True) -> dict:
    """calibrate(model, ...) and save it as the checkpoint `out` (meta + the report as "calibration"),
    resumable: after every block the calibrated blocks and the report go to the partial checkpoint
    `out.partial`, and a rerun with the same meta["run"] (model, data, settings) continues from the
    first block it lacks (not with cfg.original_targets: that run starts over); the partial is removed
    once `out` is written. Under torch.distributed the first process writes. Returns the report."""
    partial = C.partial_path(out)
    start, report = 0, None
    resumable = not cfg.original_targets  # its targets come from the original blocks, gone once calibrated
    if resumable and C.has_checkpoint(partial):
        C.check_same_run(partial, C.read_meta(partial).get("run"), meta.get("run"))
        start, report, _ = C.load_partial_calibration(partial, model)
        print(f"resuming the calibration at block {start} of {len(decoder_layers(model))} ({partial})", flush=True)

    def save_partial(i: int, rep: dict) -> None:
        if resumable and D.rank() == 0 and i + 1 < len(decoder_layers(model)):
            C.save_partial_calibration(partial, model, i + 1, rep, meta)

    report = calibrate(model, sequences, cfg, device=device, progress=progress, on_block=save_partial,
                       start_block=start, report=report)
    if D.rank() == 0:
        C.save_checkpoint(out, model, dict(meta, calibration=report, calibration_seconds=report["seconds"]))
        C.remove_out(partial)
    return report

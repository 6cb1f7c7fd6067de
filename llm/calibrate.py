"""One-shot calibration, block by block: each linear layer minimizes its output error on calibration data.

Per linear layer with weight W and input Hessian H = X'X / n (X: the layer's calibration inputs),
the objective is the quadratic f(W^) = tr((W^ - W) H (W^ - W)'), i.e. ||X W^' - X W'||^2 / n
(llm.layer_objective). That is a pvtheory objective over a discrete-continuous parameter, and each format
calibrates a layer by its own method (its handler): AQLM / VQ by PV on f (llm.aqlm), scalar grids by GPTQ
(llm.scalar).

With true_sequential, a block's linears are quantized in the order they are read (q,k,v; o; gate,up;
down), each group's Hessian taken from the block with the earlier groups already quantized.
Optionally each block's continuous parameters are then tuned to reproduce the original block's
outputs (and, with block_tune_p_fraction > 0, its codes by PV-Tuning's P step). Only the block being
calibrated sits on the device; the rest of the model stays where it is.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from llm import checkpoint as C
from llm import distributed as D
from llm.formats import QuantFormat, make_quantized, quantized_layers
from llm.layer_objective import damped, timed
from llm.layer_pv import LayerPV
from llm.strategies import PVSettings, StepContext, build_p_step
from llm.model import BLOCK_LINEARS, block_linears, decoder_layers, linear_shapes, set_module


@dataclass
class CalibrationConfig:
    fmt: str = "2x8g8"
    rounds: int = 12  # at most this many P/V alternations per layer
    tolerance: float = 0.002  # stop a layer's rounds once a round improves its error by less than this (relative)
    beam_width: int = 4
    exact_v: bool = True  # exact V step (codebooks by conjugate gradients, scales in closed form); False: Adam
    adam_v_iters: int = 100  # Adam iterations on codebooks and scales per round (when not exact_v; GPTQ's V)
    adam_v_lr: float = 1e-3
    kmeans_iters: int = 20
    damping: float = 1e-2  # H + damping * mean(diag H) * I
    block_tune_steps: int = 1000  # Adam steps on each block's continuous parameters (0: off)
    block_tune_lr: float = 3e-4
    block_tune_p_fraction: float = 0.0  # > 0: block tuning is PV (P steps on this fraction of code groups per step)
    block_tune_p_lr: float = 1e-3  # the P step's Adam-normalized weight update during block tuning
    forward_batch_size: int = 16  # sequences per forward pass through a block
    linears: tuple = BLOCK_LINEARS
    true_sequential: bool = False  # True: Hessians of o_proj / MLP from the block with its earlier linears quantized
    original_targets: bool = False  # True: tune each block toward the original model's outputs (undoing upstream error)
    seed: int = 0

    def validate(self) -> "CalibrationConfig":
        """Raise ValueError naming the first setting out of range."""
        QuantFormat.parse(self.fmt)
        checks = [("rounds", self.rounds >= 0, ">= 0"), ("tolerance", self.tolerance >= 0, ">= 0"),
                  ("beam_width", self.beam_width >= 1, ">= 1"), ("adam_v_iters", self.adam_v_iters >= 0, ">= 0"),
                  ("adam_v_lr", self.adam_v_lr > 0, "> 0"), ("kmeans_iters", self.kmeans_iters >= 1, ">= 1"),
                  ("damping", self.damping >= 0, ">= 0"), ("block_tune_steps", self.block_tune_steps >= 0, ">= 0"),
                  ("block_tune_lr", self.block_tune_lr > 0, "> 0"), ("block_tune_p_fraction", 0 <= self.block_tune_p_fraction <= 1, "in [0, 1]"),
                  ("forward_batch_size", self.forward_batch_size >= 1, ">= 1")]
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


def quantize_linear(linear: nn.Linear, H: Tensor, fmt: QuantFormat, cfg: CalibrationConfig,
                    phases: Optional[dict] = None):
    """A calibrated quantized replacement of `linear` given its input Hessian H (damped here), by the format's
    own calibration (its handler); (layer, relative errors after init and each half-step)."""
    return fmt.handler.calibrate(linear, damped(H.float(), cfg.damping), fmt, cfg, phases)


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


def block_p_steps(block: nn.Module, p_fraction: float, p_lr: float, beam_width: int, seed: int) -> LayerPV:
    """PV-Tuning's P step for every quantized layer of a block (llm.layer_pv), at block tuning's own setting: the
    fraction p_fraction of code groups with the largest Adam-normalized update (step p_lr, no momentum), nearest
    in the Euclidean metric, from the first step (no warm-up). One process steps every layer."""
    settings = PVSettings(p_fraction=p_fraction, p_lr=p_lr, beam_width=beam_width, p_beta1=0.0,
                          p_metric="euclidean", p_warmup=0).validate()
    layers = quantized_layers(block)
    return LayerPV(layers, {n: build_p_step("pv", settings, StepContext(seed * 100_003 + i))
                            for i, n in enumerate(layers)})


def tune_block(block: nn.Module, inputs: list, targets: list, kwargs: dict, steps: int, lr: float,
               p_fraction: float = 0.0, p_lr: float = 1e-3, beam_width: int = 4, seed: int = 0) -> list:
    """Adam on the block's continuous parameters (codebooks, scales, norms) to match `targets`
    (the V step); with p_fraction > 0 also a greedy-subspace P step on the codes after each backward pass,
    the same one PV-Tuning uses end to end (block_p_steps). Returns the loss of every step.

    Under torch.distributed (without the P step) the steps are data parallel: each process runs the
    block on its share of every batch's rows and the gradients of the batch's mean are summed over
    processes, so every process takes the one-process step (up to the order of floating-point sums)."""
    params = [p for n, p in block.named_parameters() if p.requires_grad and p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
    # every process tunes the whole block when it changes codes (the first one's is kept)
    code_step = block_p_steps(block, p_fraction, p_lr, beam_width, seed) if p_fraction > 0 else None
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
    inputs, kwargs = capture_block_inputs(model, sequences, cfg.forward_batch_size, device)
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
                                    cfg.block_tune_p_fraction, cfg.block_tune_p_lr, cfg.beam_width, cfg.seed)
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

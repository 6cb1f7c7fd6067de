"""End-to-end fine-tuning of a quantized model by KL divergence to the original model.

Loss: KL(teacher || student) of the next-token distributions, averaged over tokens. Every
strategy runs the same loop on the same batches (batch k depends only on the seed and k), so
strategies compare at equal steps and data, and a resumed run equals an uninterrupted one:

    continuous     V step only: Adam on codebooks, scales, norms (optionally embeddings and head)
    ste            straight-through: a shadow copy U of each weight moves by the update, codes = encode(U)
    stochastic     stochastic rounding of W - update between its nearest codes (unbiased)
    linearized_pv  naive linearized PV: every group re-encoded against W - update
    pv             PV-Tuning: only the fraction tau of groups with the largest update are re-encoded

(or any strategy registered in llm.strategies). Every P step is a pvtheory Step, the same object
that runs on toy problems: it sees each layer as a discrete-continuous parameter (layer.as_param())
and the loss through dL/dW of the batch, preconditioned by Adam (pvtheory.preconditioners): the
update of the dequantized weights W is u = p_lr * m / (sqrt(v) + eps), m and v EMAs of g and g^2
(bias-corrected; beta1 = 0 by default, the official PV-Tuning setting). With p_metric = "adam" the
new codes are the nearest to W - u in the metric diag(sqrt v), which makes them minimize the
preconditioned linear model <m, W' - W> + ||W' - W||^2_{sqrt v} / (2 p_lr). The V step is Adam (or
LAMB, `v_optimizer="lamb"`, as in the official recipe) on the continuous parameters, optionally
with a cosine decay of lr and p_lr, or a pvtheory V step on the layers' codebooks and scales.

A step's global batch (batch_size sequences) may be split over processes (llm.distributed: data
parallel, each layer's P step on one owner rank) and, within a process, into micro-batches whose
gradients accumulate: the step is the same at any split.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from llm import distributed as D
from llm.checkpoint import (check_same_run, flatten_state, has_checkpoint, read_meta, read_tensors, save_checkpoint,
                            unflatten_state)
from llm.formats import quantized_layers
from llm.optim import Lamb
from llm.strategies import is_strategy, p_step_for, strategy_names
from pvtheory.objectives import ObservedGradient
from pvtheory.pv import pv_iteration
from pvtheory.steps import Step, stateless
from pvtheory.v_steps import no_v_step


class FinetuneError(RuntimeError):
    """Fine-tuning stopped (non-finite loss, bad configuration); the message says what to do."""


@dataclass
class FinetuneConfig:
    strategy: str = "pv"
    steps: int = 200
    batch_size: int = 16  # the global batch of a step, over all processes
    micro_batch_size: Optional[int] = None  # per process and forward pass (gradients accumulate); None: all at once
    lr: float = 3e-4  # V step (Adam on continuous parameters)
    v_optimizer: str = "adam"  # or "lamb": each tensor's Adam step rescaled to lr * its norm (the official --lamb)
    lr_schedule: str = "constant"  # "cosine": the V step's lr and the P step's p_lr decay to 0 over the steps
    betas: tuple = (0.9, 0.95)
    p_lr: float = 1e-2  # the update of the dequantized weights proposed to the P step
    p_beta1: float = 0.0  # momentum of that update (official: 0; helps with small, noisy batches)
    p_beta2: float = 0.95
    p_metric: str = "euclidean"  # re-encode nearest in "euclidean" or the "adam" metric diag(sqrt v)
    p_state_dtype: str = "float32"  # the P step's per-weight moments; "bfloat16" halves their memory (7B scale)
    p_grad_dtype: str = "float32"  # dL/dW summed over processes in this precision ("bfloat16": half the bytes)
    tau: float = 0.01  # fraction of code groups the pv strategy may change per step
    p_warmup: int = 0  # steps whose P step only accumulates its moments (no code changes, no STE update)
    p_select: str = "update"  # pv's greedy subspace: the groups with the largest "update", or the largest model "gain"
    p_memory: float = 0.0  # pv, linearized_pv: share of the rounding residual the next P step aims at (pvtheory.accumulated)
    trust_ratio: Optional[float] = None  # reject code changes with ||dw|| > trust_ratio * ||w|| per group
    beam_width: int = 4
    train_norms: bool = True
    train_other: bool = True  # embeddings and head too (the official update_non_quantized_parameters)
    amp: bool = True  # bf16 autocast on CUDA
    grad_checkpointing: bool = False
    logit_chunk: Optional[int] = 4096  # tokens whose logits are formed at once for the KL loss (None: all)
    shard_teacher: bool = True  # under torch.distributed: the teacher's layers sharded over the processes (FSDP2)
    p_step_in_backward: bool = True  # each layer's P step as soon as its dL/dW is complete (memory: one layer's)
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        if not is_strategy(self.strategy):
            raise FinetuneError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(strategy_names())}")
        if self.p_state_dtype not in ("float32", "bfloat16") or self.p_grad_dtype not in ("float32", "bfloat16"):
            raise FinetuneError(f"p_state_dtype and p_grad_dtype must be 'float32' or 'bfloat16', got "
                                f"{self.p_state_dtype!r} and {self.p_grad_dtype!r}")
        if self.p_select not in ("update", "gain"):
            raise FinetuneError(f"p_select must be 'update' or 'gain', got {self.p_select!r}")
        if not 0 <= self.p_memory <= 1:
            raise FinetuneError(f"p_memory must lie in [0, 1], got {self.p_memory}")
        if self.p_memory > 0 and self.trust_ratio is not None:  # the residual would count changes the trust region undoes
            raise FinetuneError("p_memory and trust_ratio cannot be combined: choose one")
        if self.v_optimizer not in ("adam", "lamb"):
            raise FinetuneError(f"v_optimizer must be 'adam' or 'lamb', got {self.v_optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise FinetuneError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.p_metric not in ("euclidean", "adam"):
            raise FinetuneError(f"p_metric must be 'euclidean' or 'adam', got {self.p_metric!r}")
        if not 0 < self.tau <= 1:
            raise FinetuneError(f"tau must lie in (0, 1], got {self.tau}")
        if self.steps < 1 or self.batch_size < 1:
            raise FinetuneError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not (self.lr > 0 and self.p_lr > 0):
            raise FinetuneError(f"lr and p_lr must be > 0, got {self.lr} and {self.p_lr}")
        if self.trust_ratio is not None and not self.trust_ratio > 0:
            raise FinetuneError(f"trust_ratio must be > 0 (or None: no trust region), got {self.trust_ratio}")
        if not (0 <= self.p_beta1 < 1 and 0 <= self.p_beta2 < 1):
            raise FinetuneError(f"p_beta1 and p_beta2 must lie in [0, 1), got {self.p_beta1} and {self.p_beta2}")
        if self.p_warmup < 0:
            raise FinetuneError(f"p_warmup must be >= 0, got {self.p_warmup}")
        if self.beam_width < 1 or self.checkpoint_every < 1:
            raise FinetuneError("beam_width and checkpoint_every must be >= 1")
        if self.logit_chunk is not None and self.logit_chunk < 1:
            raise FinetuneError("logit_chunk must be >= 1 (or None for the whole micro-batch at once)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise FinetuneError("micro_batch_size must be >= 1")
        return self


def run_settings(cfg: FinetuneConfig) -> dict:
    """The settings that define a run's result: all but how often it is checkpointed, and, under a
    constant schedule, the number of steps (step k does not depend on it, so a longer run continues a
    shorter one exactly; the data drawn for it is part of the caller's run identity)."""
    d = asdict(cfg)
    d.pop("checkpoint_every")
    d.pop("shard_teacher")  # where the teacher's parameters live, not what it computes
    d.pop("p_step_in_backward")  # when, not what: the same codes either way
    if cfg.lr_schedule == "constant":
        d.pop("steps")
    return d


def check_resumable(ckpt, cfg: FinetuneConfig, run: dict) -> bool:
    """True if `ckpt` holds a checkpoint of this run (same strategy and settings, `run` = base model, data
    and starting point) to resume; False if it holds none; FinetuneError / CheckpointError for another run's."""
    ckpt = Path(ckpt)
    if not has_checkpoint(ckpt):
        return False
    m = read_meta(ckpt)
    if "finetune" not in m:
        raise FinetuneError(f"{ckpt} holds a calibrated checkpoint, not a fine-tuning run: give another --out "
                            "(the calibrated checkpoint is the input of finetune)")
    if m.get("finetune", {}).get("strategy") != cfg.strategy:
        raise FinetuneError(f"{ckpt} holds a {m.get('finetune', {}).get('strategy')!r} run, not {cfg.strategy!r}: "
                            "give another --out, or --overwrite to replace it")
    if m.get("step", 0) > cfg.steps:
        raise FinetuneError(f"{ckpt} holds {m['step']} steps, more than the {cfg.steps} asked for: "
                            "give another --out, or --overwrite to replace it")
    check_same_run(ckpt, m.get("run"), dict(run, finetune=run_settings(cfg)))
    return True


def kl_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher || student) = sum_v p_t (log p_t - log p_s)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _kl_sum(h_student: Tensor, h_teacher: Tensor, head_student: nn.Module, head_teacher: nn.Module) -> Tensor:
    """Sum over the tokens of one chunk of KL(teacher || student), from their last hidden states."""
    with torch.no_grad():
        teacher_logits = head_teacher(h_teacher)
    return kl_loss(head_student(h_student), teacher_logits) * len(h_student)


def chunked_kl_loss(student: nn.Module, teacher: nn.Module, ids: Tensor, chunk_tokens: int) -> Tensor:
    """kl_loss of the two models on ids (n, T), with the logits formed chunk_tokens rows at a time and
    recomputed in backward: at a 49k vocabulary the full logits of 64 x 512 tokens would take ~13 GB each
    in float32, a chunk of 4096 tokens 0.8 GB. The same value and gradients as the full computation."""
    with torch.no_grad():
        h_t = teacher.model(input_ids=ids).last_hidden_state
    h_s = student.model(input_ids=ids).last_hidden_state
    h_s, h_t = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    head_s, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
    total = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, len(h_s), chunk_tokens):
        total = total + checkpoint(_kl_sum, h_s[i: i + chunk_tokens], h_t[i: i + chunk_tokens], head_s, head_t,
                                   use_reentrant=False)
    return total / len(h_s)


def step_size_factor(cfg: FinetuneConfig, step: int) -> float:
    """The multiplier of lr and p_lr at `step` (0-based): 1, or a cosine from 1 at step 0 towards 0."""
    if cfg.lr_schedule == "cosine" and cfg.steps > 0:
        return 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
    return 1.0


def batch_for_step(sequences: Tensor, step: int, batch_size: int, seed: int) -> Tensor:
    """The batch of step `step`: a function of (seed, step) alone, so runs can be resumed exactly."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return sequences[torch.randint(len(sequences), (batch_size,), generator=gen)]


def trainable_parameters(model: nn.Module, cfg: FinetuneConfig) -> list:
    """Continuous parameters the V step optimizes; everything else is frozen."""
    layers = quantized_layers(model)
    chosen = {id(p) for m in layers.values() for p in m.continuous_parameters()}
    for name, p in model.named_parameters():
        if cfg.train_norms and "norm" in name.split(".")[-2]:
            chosen.add(id(p))
        if cfg.train_other and ("embed_tokens" in name or "lm_head" in name):
            chosen.add(id(p))
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
        if id(p) in chosen:
            params.append(p)
    return params


class CodeStep:
    """The PV half of a fine-tuning step that acts on the quantized layers: for each layer, one
    iteration of pvtheory's Algorithm 1 (pvtheory.pv.pv_iteration) on the layer as a discrete-
    continuous parameter (layer.as_param()) and the loss as the observed gradient dL/dW. The P step is
    the strategy's (llm.strategies); the V step is `v_step` if given (a pvtheory Step; the layer's V then
    leaves the model's optimizer), else nothing here (the model's optimizer takes it). Under
    torch.distributed each layer's steps run on its owner rank, which alone keeps their state."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, v_step: Optional[Step] = None,
                 distributed: bool = True) -> None:
        self.cfg = cfg
        self.layers = quantized_layers(model)
        self.distributed = distributed and D.is_distributed()  # False: this process steps every layer alone
        self.owner = (D.layer_owners({n: m.out_features * m.in_features for n, m in self.layers.items()})
                      if self.distributed else {n: D.rank() for n in self.layers})
        self.p_steps = {n: p_step_for(cfg, seed=cfg.seed * 100_003 + i) for i, n in enumerate(self.layers)}
        self.v_step = v_step
        self.changes_codes = any(s is not None for s in self.p_steps.values())  # a P step: not continuous-only
        self.active = v_step is not None or self.changes_codes
        self.states: dict = {}  # layer name -> (P step state, V step state)
        self.buckets: Optional[D.GradientBuckets] = None  # gradients on their way to their owners
        self.last_micro_batch = False
        self.changed_in_backward = 0  # groups changed by P steps taken during this step's backward

    def owns(self, name: str) -> bool:
        return self.owner[name] == D.rank()

    def state_dict(self) -> dict:
        """This rank's step states (under torch.distributed, those of the layers it owns), as tensors."""
        out = {}
        for name, (p_state, v_state) in self.states.items():
            out.update(flatten_state(p_state, f"p/{name}"))
            out.update(flatten_state(v_state, f"v/{name}"))
        return out

    def load_state_dict(self, state: dict, device) -> None:
        """Restore from a (whole-model) state; each rank keeps the layers it owns."""
        if any(k.startswith("p.") for k in state):
            raise FinetuneError("this checkpoint stores the P step's state in an older layout that cannot be "
                                "resumed: fine-tune into another --out, or --overwrite to restart this one")

        def stored(prefix: str) -> bool:  # a state tree stored under exactly this name
            return any(k == prefix or k.startswith((prefix + "#", prefix + "/")) for k in state)

        self.states = {n: (unflatten_state(state, f"p/{n}", device), unflatten_state(state, f"v/{n}", device))
                       for n in self.layers if self.owns(n) and stored(f"p/{n}")}

    @contextmanager
    def capturing(self, enabled: bool = True) -> Iterator["CodeStep"]:
        """Inside, every layer captures dL/dW in backward (what step() reads); on exit, even by an
        error, capture is off and nothing captured is left behind. Under torch.distributed the
        gradients of the last micro-batch's backward travel to their owners while it runs
        (llm.distributed.GradientBuckets)."""
        names = {id(layer): name for name, layer in self.layers.items()}

        def complete(layer) -> None:  # a layer's dL/dW of the whole step is ready
            if not self.last_micro_batch:
                return
            name = names[id(layer)]
            if self.buckets is not None:  # on its way to the owner
                self.buckets.add(name, layer.weight_grad)
            else:  # its P step now: only one layer's dL/dW is alive at a time
                with torch.no_grad():
                    self.changed_in_backward += self._update_layer(name, layer, layer.weight_grad)
            layer.weight_grad = None

        # Changing a layer's codes while backward goes on is safe: its own gradients are done, and the
        # decoded weights and code indices autograd saved are copies. A pvtheory V step waits for the
        # end (autograd still needs the scales it would change).
        in_backward = self.distributed or (self.cfg.p_step_in_backward and self.v_step is None)
        for layer in self.layers.values():
            layer.capture_weight_grad = enabled
            layer.on_weight_grad = complete if in_backward else None
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.capture_weight_grad = False
                layer.weight_grad = None
                layer.on_weight_grad = None
            self.buckets = None

    @contextmanager
    def last_backward(self, finite: bool = True) -> Iterator[None]:
        """Around the step's last backward pass: each layer's gradient is then complete as soon as its
        hook fires, and under torch.distributed starts for its owner at once, or in one process takes
        its P step at once. With a non-finite loss nothing happens early (the step will be refused)."""
        if not finite:
            yield
            return
        if self.distributed and self.active:
            self.buckets = D.GradientBuckets(self.owner, getattr(torch, self.cfg.p_grad_dtype))
        self.last_micro_batch = True
        try:
            yield
        finally:
            self.last_micro_batch = False

    @torch.no_grad()
    def step(self) -> int:
        """Run every layer's P (and V) step from its captured weight gradient (summed over processes
        onto the layer's owner, in buckets, in cfg.p_grad_dtype; every rank then receives the owners'
        new codes and values). Returns the number of code groups changed."""
        grads = {}
        for name, layer in self.layers.items():
            if layer.weight_grad is not None:
                grads[name] = layer.weight_grad
            layer.weight_grad = None
        if self.distributed:  # onto their owners, with any not sent during backward
            buckets = self.buckets or D.GradientBuckets(self.owner, getattr(torch, self.cfg.p_grad_dtype))
            for name, g in grads.items():
                buckets.add(name, g)
            grads, self.buckets = buckets.finish(), None
        changed = sum(self._update_layer(n, self.layers[n], g) for n, g in grads.items())  # this rank's layers
        changed, self.changed_in_backward = changed + self.changed_in_backward, 0
        if self.distributed:  # every rank receives the owners' codes (and values) and the total count
            D.broadcast_from_owners_({n: layer.codes for n, layer in self.layers.items()}, self.owner)
            if self.v_step is not None:
                values = {(n, i): v.data for n, layer in self.layers.items()
                          for i, v in enumerate(layer.value_parameters())}
                D.broadcast_from_owners_(values, {key: self.owner[key[0]] for key in values})
            total = torch.tensor(float(changed), device=next(iter(self.layers.values())).codes.device)
            D.all_reduce_sum_([total])
            changed = int(total.item())
        return changed

    def _update_layer(self, name: str, layer: nn.Module, g: Tensor) -> int:
        """One layer's PV iteration from its weight gradient g; returns the number of groups changed."""
        param, objective = layer.as_param(), ObservedGradient(g)
        p_step = self.p_steps[name] or KEEP_CODES
        v_step = self.v_step or no_v_step()
        if name not in self.states:
            self.states[name] = (p_step.init(param, objective), v_step.init(param, objective))
        after_p, after_v, p_state, v_state, changed = pv_iteration(param, objective, p_step, v_step, *self.states[name])
        self.states[name] = (p_state, v_state)
        if changed:
            layer.set_codes(after_p.codes)
        if self.v_step is not None:
            layer.set_values(after_v.values)
        return changed


KEEP_CODES = stateless("keep codes", lambda param, objective: param)


def _optimizer_state(opt: torch.optim.Optimizer, index: Sequence[int]) -> dict:
    """The optimizer's state as flat tensors "opt.{i}.{name}", i the parameter's place among all the V
    parameters (index[j] for the optimizer's j-th): the one-process layout, whichever rank holds it."""
    out = {}
    for j, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{index[j]}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    return out


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict, index: Sequence[int], device) -> None:
    """Inverse of _optimizer_state: the entries of the parameters this optimizer holds (index)."""
    local = {i: j for j, i in enumerate(index)}
    sd = opt.state_dict()
    new_state: dict = {}
    for key, v in state.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            if int(i) in local:
                new_state.setdefault(local[int(i)], {})[k] = v.to(device) if k != "step" else v
    sd["state"] = new_state
    opt.load_state_dict(sd)


def sharded_v_optimizer(params: list, cfg: FinetuneConfig) -> tuple:
    """(optimizer, owner, index): the V step's optimizer state sharded over processes (ZeRO-1). Each
    parameter has one owner rank (dealt out by size), which alone keeps its moments and steps it; `owner`
    maps a parameter's place in `params` to its rank, `index` lists the places this rank's optimizer
    holds. One process: every parameter, as a plain optimizer."""
    owner = D.layer_owners({i: p.numel() for i, p in enumerate(params)})
    index = [i for i in range(len(params)) if owner[i] == D.rank()]
    mine = [params[i] for i in index] or [torch.zeros(0, requires_grad=True)]  # torch refuses an empty list
    opt = (Lamb if cfg.v_optimizer == "lamb" else torch.optim.Adam)(mine, lr=cfg.lr, betas=tuple(cfg.betas))
    return opt, owner, index


def reduce_v_gradients(params: list, owner: dict) -> None:
    """Sum each V parameter's gradient over processes onto its owner; the other ranks drop theirs."""
    if not D.is_distributed():
        return
    buckets = D.GradientBuckets(owner)
    for i, p in enumerate(params):
        if p.grad is not None:
            buckets.add(i, p.grad)
    buckets.finish()
    for i, p in enumerate(params):
        if owner[i] != D.rank():
            p.grad = None


def finetune(student: nn.Module, teacher: nn.Module, sequences: Tensor, cfg: FinetuneConfig, device=None,
             checkpoint_dir=None, resume: bool = True, meta: Optional[dict] = None, progress: bool = True,
             on_step: Optional[Callable[[int, float], None]] = None, v_step: Optional[Step] = None) -> dict:
    """Fine-tune `student` (quantized) towards `teacher` on `sequences` (n, T); returns a report.

    Each step: the batch's gradient, then for every quantized layer the strategy's P step and, if
    `v_step` (a pvtheory Step) is given, that V step on the layer's codebooks and scales (see
    CodeStep); then cfg's optimizer (Adam or LAMB) on every other trainable parameter.

    With checkpoint_dir, writes a checkpoint every cfg.checkpoint_every steps and at the end, and
    (resume=True) continues from the checkpoint found there. A non-finite loss stops the run with
    FinetuneError, leaving the last good checkpoint in place. on_step(step, loss) is called after
    every step (timing, logging). The report's seconds count every step, the calls before a resume
    included (recorded in the checkpoint; None if it did not record them); seconds_this_call, this call's.
    Under torch.distributed (see
    llm.distributed) every rank calls this with the same arguments; rank 0 writes the checkpoints.
    """
    cfg.validate()
    device = torch.device(device or next(student.parameters()).device)
    student.to(device).train()
    if cfg.shard_teacher:
        D.shard_for_inference(teacher, device)
    teacher.to(device).eval()
    if cfg.grad_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = trainable_parameters(student, cfg)
    stepped_by_v = set()  # the layers' V, when the given V step and not the optimizer takes it
    if v_step is not None:
        stepped_by_v = {id(p) for m in quantized_layers(student).values() for p in m.value_parameters()}
        params = [p for p in params if id(p) not in stepped_by_v]
    opt, v_owner, v_index = sharded_v_optimizer(params, cfg)
    code_step = CodeStep(student, cfg, v_step)
    capture = code_step.active
    if code_step.changes_codes and cfg.p_warmup >= cfg.steps:
        warnings.warn(f"{cfg.strategy}: {cfg.steps} steps and a P warm-up of {cfg.p_warmup}: no code will change "
                      f"(p_warmup, --p-warmup on the command line, of {max(cfg.steps - 1, 0)} or less lets the P step run)",
                      stacklevel=2)
    losses, changed, start = [], [], 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    run = dict((meta or {}).get("run", {}), finetune=run_settings(cfg))  # what makes a checkpoint this run's
    if ckpt is not None and resume and check_resumable(ckpt, cfg, (meta or {}).get("run", {})):
        m = read_meta(ckpt)
        sd = read_tensors(ckpt / "model.safetensors")
        for k, src in m.get("tied", {}).items():
            sd[k] = sd[src]
        student.load_state_dict(sd, strict=False)
        state = read_tensors(ckpt / "state.safetensors")
        _load_optimizer_state(opt, state, v_index, device)
        code_step.load_state_dict(state, device)
        start, losses, changed = m["step"], m["losses"], m["codes_changed"]
        prior_seconds = m.get("seconds")  # None: a checkpoint that did not record its steps' time
    else:
        prior_seconds = 0.0
    amp = cfg.amp and device.type == "cuda"
    t0 = time.time()

    def all_seconds() -> Optional[float]:
        """Wall seconds of every step so far, the calls before a resume included (None if one is unknown)."""
        return None if prior_seconds is None else round(prior_seconds + time.time() - t0, 2)

    def save(step: int) -> None:
        if ckpt is None:
            return
        state = D.gather_to_first({**_optimizer_state(opt, v_index), **code_step.state_dict()})  # every rank
        if D.rank() == 0:
            info = dict(meta or {}, step=step, losses=losses, codes_changed=changed, finetune=asdict(cfg), run=run,
                        seconds=all_seconds())
            save_checkpoint(ckpt, student, info, state)
        D.barrier()

    with code_step.capturing(capture):
        for step in tqdm(range(start, cfg.steps), desc=f"finetune ({cfg.strategy})",
                         disable=not progress or D.rank() > 0, initial=start, total=cfg.steps):
            loss = accumulate_gradients(student, teacher, opt,
                                        D.local_slice(batch_for_step(sequences, step, cfg.batch_size, cfg.seed)),
                                        cfg, device, amp, code_step.last_backward)
            if not math.isfinite(loss):  # before any step: the model is still the last good one
                if ckpt is not None and has_checkpoint(ckpt):
                    where = f"; the last good checkpoint (step {read_meta(ckpt)['step']}) is kept in {ckpt}"
                else:
                    where = "; no checkpoint had been written yet" if ckpt else ""
                raise FinetuneError(f"loss became {loss} at step {step}: stopped{where} (try a smaller --lr / --p-lr)")
            reduce_v_gradients(params, v_owner)
            changed.append(code_step.step() if capture else 0)  # P (and V) steps from the gradient at W
            if stepped_by_v:  # the given V step took these; the optimizer leaves them
                for p in student.parameters():
                    if id(p) in stepped_by_v:
                        p.grad = None
            for group in opt.param_groups:
                group["lr"] = cfg.lr * step_size_factor(cfg, step)
            opt.step()  # V step, each rank on the parameters it owns
            D.broadcast_from_owners_({i: p.data for i, p in enumerate(params)}, v_owner)
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    seconds, this_call = all_seconds(), round(time.time() - t0, 2)
    save(cfg.steps)
    student.eval()
    return {"strategy": cfg.strategy, "steps": cfg.steps, "losses": losses, "codes_changed": changed,
            "seconds": seconds, "seconds_this_call": this_call, "resumed_at": start, "world_size": D.world_size(),
            "v_parameters_held": sum(params[i].numel() for i in v_index), "config": asdict(cfg)}


def describe_seconds(rep: dict) -> str:
    """A fine-tuning report's time, to print: every step's, or this call's where a resumed checkpoint did not
    record the earlier steps' time."""
    if rep.get("seconds") is not None:
        return f"{rep['seconds']} s"
    if rep.get("seconds_this_call") is not None:
        return f"{rep['seconds_this_call']} s for steps {rep['resumed_at'] + 1}-{rep['steps']}"
    return "time not recorded"


def _finite_everywhere(loss: Tensor) -> bool:
    """True if `loss` is finite on every process (one decision for all, or their collectives would part)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    D.all_reduce_sum_([bad])
    return bool(bad.item() == 0)


def accumulate_gradients(student: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, batch: Tensor,
                         cfg: FinetuneConfig, device: torch.device, amp: bool,
                         last_backward: Callable[[bool], Iterator[None]] = lambda finite: nullcontext()) -> float:
    """Gradients of this process's share of the step's loss on `batch` (its rows of the global
    batch), micro-batch by micro-batch; returns the global batch's loss (summed over processes).
    Each micro-batch's mean-token KL is weighted by its share of the global batch, so the sum over
    micro-batches and processes is the global batch's mean."""
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    micros = batch.split(cfg.micro_batch_size or len(batch))
    for i, micro in enumerate(micros):
        micro = micro.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if cfg.logit_chunk:
                loss = chunked_kl_loss(student, teacher, micro, cfg.logit_chunk)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=micro).logits
                loss = kl_loss(student(input_ids=micro).logits, teacher_logits)
            loss = loss * (len(micro) / cfg.batch_size)
        last = i == len(micros) - 1
        with last_backward(_finite_everywhere(total + loss)) if last else nullcontext():
            loss.backward()
        total += loss.detach()
    D.all_reduce_sum_([total])
    return total.item()

"""End-to-end fine-tuning of a quantized model by KL divergence to the original model.

Loss: KL(teacher || student) of the next-token distributions, averaged over tokens. Every strategy runs the
same loop on the same batches (batch k depends only on the seed and k), so strategies compare at equal steps
and data, and a resumed run equals an uninterrupted one. One step (`finetune`'s loop):

    forward and backward   the KL of the batch, micro-batch by micro-batch; every quantized layer keeps dL/dW
    P step                 each layer's codes by its strategy's P step from dL/dW (llm.layer_pv, llm.strategies)
    V step                 Adam or LAMB on the continuous parameters (codebooks, scales, norms, optionally the
                           embeddings and head), or a pvtheory V step on the layers' codebooks and scales

Strategies (llm.strategies, each with its settings): continuous (no P step), ste, stochastic, linearized_pv,
pv (PV-Tuning: only a small greedy subspace of code groups is re-encoded per step), or any registered one.
Every P step is a pvtheory Step, the same object that runs on toy problems: it sees each layer as a discrete-
continuous parameter (layer.as_param()) and the loss through dL/dW of the batch, preconditioned by Adam.

A step's global batch (batch_size sequences) may be split over processes (llm.distributed: data parallel, each
layer's P step on one owner rank) and, within a process, into micro-batches whose gradients accumulate: the step
is the same at any split.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from llm import distributed as D
from llm.checkpoint import check_same_run, has_checkpoint, read_meta, read_model_state, read_tensors, save_checkpoint
from llm.formats import quantized_layers
from llm.layer_pv import LayerPV
from llm.optim import Lamb, lr_factor
from llm.strategies import StepContext, StrategyError, build_p_step, get_strategy, settings_for
from pvtheory.steps import Step


class FinetuneError(RuntimeError):
    """Fine-tuning stopped (non-finite loss, bad configuration); the message says what to do."""


@dataclass
class FinetuneConfig:
    """The fine-tuning loop's settings; the strategy's own (its P step) are `settings`, an instance of the
    strategy's settings class (llm.strategies; None: its defaults, the tuned values for 2-bit codebooks)."""

    strategy: str = "pv"
    settings: Any = None
    steps: int = 200
    batch_size: int = 16  # sequences per step, over all processes
    micro_batch_size: Optional[int] = None  # per process and forward pass (gradients accumulate); None: all at once
    lr: float = 3e-4  # V step
    v_optimizer: str = "adam"  # or "lamb": each tensor's Adam step rescaled to lr * its norm (the official --lamb)
    lr_schedule: str = "constant"  # "cosine": the V step's lr and the P step's p_lr decay to 0 over the steps
    betas: tuple = (0.9, 0.95)
    p_grad_dtype: str = "float32"  # dL/dW summed onto its layer's owner process in this precision ("bfloat16": half)
    train_norms: bool = True
    train_other: bool = True  # embeddings and head too (the official update_non_quantized_parameters)
    amp: bool = True  # bf16 autocast on CUDA
    grad_checkpointing: bool = False
    logit_chunk: Optional[int] = 4096  # tokens whose logits are formed at once for the KL loss (None: all)
    shard_teacher: bool = True  # under torch.distributed: the teacher's layers sharded over the processes (FSDP2)
    p_step_in_backward: bool = True  # each layer's P step as soon as its dL/dW is complete (llm.layer_pv)
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        """FinetuneError naming the first setting out of range; fills in the strategy's default settings."""
        try:
            strategy = get_strategy(self.strategy)
            if self.settings is None:
                self.settings = settings_for(self.strategy)
            elif not isinstance(self.settings, strategy.settings):
                raise StrategyError(f"the settings of {self.strategy} are a {strategy.settings.__name__}, "
                                    f"got {type(self.settings).__name__}")
            self.settings.validate()
        except StrategyError as e:
            raise FinetuneError(str(e)) from None
        if self.p_grad_dtype not in ("float32", "bfloat16"):
            raise FinetuneError(f"p_grad_dtype must be 'float32' or 'bfloat16', got {self.p_grad_dtype!r}")
        if self.v_optimizer not in ("adam", "lamb"):
            raise FinetuneError(f"v_optimizer must be 'adam' or 'lamb', got {self.v_optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise FinetuneError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise FinetuneError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise FinetuneError(f"lr must be > 0, got {self.lr}")
        if self.checkpoint_every < 1:
            raise FinetuneError("checkpoint_every must be >= 1")
        if self.logit_chunk is not None and self.logit_chunk < 1:
            raise FinetuneError("logit_chunk must be >= 1 (or None for the whole micro-batch at once)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise FinetuneError("micro_batch_size must be >= 1")
        return self


def run_settings(cfg: FinetuneConfig) -> dict:
    """The settings that define a run's result: all but how often it is checkpointed and how the work is spread,
    and, under a constant schedule, the number of steps (step k does not depend on it, so a longer run continues a
    shorter one exactly; the data drawn for it is part of the caller's run identity)."""
    d = asdict(cfg)
    for k in ("checkpoint_every", "shard_teacher", "p_step_in_backward"):  # when and where, not what
        d.pop(k)
    if cfg.lr_schedule == "constant":
        d.pop("steps")
    return d


def check_resumable(ckpt, cfg: FinetuneConfig, run: dict) -> bool:
    """True if `ckpt` holds a checkpoint of this run (same strategy and settings, `run` = base model, data and
    starting point) to resume; False if it holds none; FinetuneError / CheckpointError for another run's."""
    ckpt = Path(ckpt)
    if not has_checkpoint(ckpt):
        return False
    m = read_meta(ckpt)
    if "finetune" not in m:
        raise FinetuneError(f"{ckpt} holds a calibrated checkpoint, not a fine-tuning run: give another --out "
                            "(the calibrated checkpoint is the input of finetune)")
    stored = m.get("finetune", {})
    if "settings" not in stored:
        raise FinetuneError(f"{ckpt} was written by an older pvtuning (its P-step settings are not stored per "
                            "strategy) and cannot be resumed: fine-tune into another --out, or --overwrite to restart it")
    if stored.get("strategy") != cfg.strategy:
        raise FinetuneError(f"{ckpt} holds a {stored.get('strategy')!r} run, not {cfg.strategy!r}: "
                            "give another --out, or --overwrite to replace it")
    if not isinstance(m.get("step"), int) or len(m.get("losses", ())) != m["step"] \
            or len(m.get("codes_changed", ())) != m["step"]:
        raise FinetuneError(f"{ckpt}/meta.json does not describe the steps it claims ({m.get('step')!r} steps, "
                            f"{len(m.get('losses', ()))} losses): fine-tune into another --out, or --overwrite")
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


def layer_pv_for(model: nn.Module, cfg: FinetuneConfig, v_step: Optional[Step] = None,
                 distributed: bool = True) -> LayerPV:
    """The per-layer PV step of cfg's strategy for every quantized layer of `model` (llm.layer_pv): the strategy's P
    step with its settings, a seed per layer and the run's schedule; `v_step` (a pvtheory V step) on every layer if
    given. Under torch.distributed (and `distributed`) each layer's steps run on an owner rank."""
    layers = quantized_layers(model)
    schedule = lambda k: lr_factor(cfg.lr_schedule, k, cfg.steps)  # noqa: E731
    p_steps = {n: build_p_step(cfg.strategy, cfg.settings, StepContext(cfg.seed * 100_003 + i, schedule))
               for i, n in enumerate(layers)}
    owner = (D.layer_owners({n: m.out_features * m.in_features for n, m in layers.items()})
             if distributed and D.is_distributed() else None)
    return LayerPV(layers, p_steps, {n: v_step for n in layers} if v_step is not None else None, owner,
                   getattr(torch, cfg.p_grad_dtype))


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

    Each step: the batch's KL and its gradients, then every quantized layer's P step (cfg.strategy) and, if
    `v_step` (a pvtheory Step) is given, that V step on the layer's codebooks and scales; then cfg's optimizer
    (Adam or LAMB) on every other trainable parameter.

    With checkpoint_dir, writes a checkpoint every cfg.checkpoint_every steps and at the end, and (resume=True)
    continues from the checkpoint found there. A non-finite loss stops the run with FinetuneError, leaving the last
    good checkpoint in place. on_step(step, loss) is called after every step (timing, logging). The report's seconds
    count every step, the calls before a resume included (recorded in the checkpoint; None if it did not record
    them); seconds_this_call, this call's. Under torch.distributed (see llm.distributed) every rank calls this with
    the same arguments; rank 0 writes the checkpoints.
    """
    cfg.validate()
    device = torch.device(device or next(student.parameters()).device)
    student.to(device).train()
    if cfg.shard_teacher:
        D.shard_for_inference(teacher, device)
    teacher.to(device).eval()
    if cfg.grad_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer_pv = layer_pv_for(student, cfg, v_step)
    params = trainable_parameters(student, cfg)
    if v_step is not None:  # the layers' V, stepped by the given V step, leaves the optimizer
        stepped_by_v = {id(p) for m in quantized_layers(student).values() for p in m.value_parameters()}
        params = [p for p in params if id(p) not in stepped_by_v]
    opt, v_owner, v_index = sharded_v_optimizer(params, cfg)
    if layer_pv.changes_codes and getattr(cfg.settings, "p_warmup", 0) >= cfg.steps:
        warnings.warn(f"{cfg.strategy}: {cfg.steps} steps and a P warm-up of {cfg.settings.p_warmup}: no code will "
                      f"change (p_warmup, --p-warmup on the command line, of {max(cfg.steps - 1, 0)} or less lets "
                      "the P step run)", stacklevel=2)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    run = dict((meta or {}).get("run", {}), finetune=run_settings(cfg))  # what makes a checkpoint this run's
    losses, changed, start, prior_seconds = [], [], 0, 0.0
    if ckpt is not None and resume and check_resumable(ckpt, cfg, (meta or {}).get("run", {})):
        m = read_meta(ckpt)
        student.load_state_dict(read_model_state(ckpt, m), strict=False)
        state = read_tensors(ckpt / "state.safetensors", m)
        _load_optimizer_state(opt, state, v_index, device)
        layer_pv.load_state_dict(state, device)
        start, losses, changed = m["step"], m["losses"], m["codes_changed"]
        prior_seconds = m.get("seconds")  # None: a checkpoint that did not record its steps' time
    amp = cfg.amp and device.type == "cuda"
    t0 = time.time()

    def all_seconds() -> Optional[float]:
        """Wall seconds of every step so far, the calls before a resume included (None if one is unknown)."""
        return None if prior_seconds is None else round(prior_seconds + time.time() - t0, 2)

    def save(step: int) -> None:
        if ckpt is None:
            return
        state = D.gather_to_first({**_optimizer_state(opt, v_index), **layer_pv.state_dict()})  # every rank
        if D.rank() == 0:
            info = dict(meta or {}, step=step, losses=losses, codes_changed=changed, finetune=asdict(cfg), run=run,
                        seconds=all_seconds())
            save_checkpoint(ckpt, student, info, state)
        D.barrier()

    with layer_pv.capturing(layer_pv.active):  # every quantized layer keeps its dL/dW for the P step
        for step in tqdm(range(start, cfg.steps), desc=f"finetune ({cfg.strategy})",
                         disable=not progress or D.rank() > 0, initial=start, total=cfg.steps):
            batch = D.local_slice(batch_for_step(sequences, step, cfg.batch_size, cfg.seed))
            # forward and backward (each layer's P step may already run in the last backward: llm.layer_pv)
            loss = forward_backward(student, teacher, batch, cfg, device, amp, layer_pv)
            if not math.isfinite(loss):  # before any step: the model is still the last good one
                raise FinetuneError(f"loss became {loss} at step {step}: stopped{_where_kept(ckpt)} "
                                    "(try a smaller --lr / --p-lr)")
            changed.append(layer_pv.step() if layer_pv.active else 0)  # P step (and the layers' V step, if given)
            v_optimizer_step(opt, params, v_owner, cfg, step)  # V step
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


def forward_backward(student: nn.Module, teacher: nn.Module, batch: Tensor, cfg: FinetuneConfig,
                     device: torch.device, amp: bool, layer_pv: LayerPV) -> float:
    """The gradients of this process's share of the step's KL on `batch` (its rows of the global batch),
    micro-batch by micro-batch; returns the global batch's loss (summed over processes). Each micro-batch's
    mean-token KL is weighted by its share of the global batch, so the sum over micro-batches and processes is the
    global batch's mean. Around the last backward pass, layer_pv.during_backward (cfg.p_step_in_backward) lets each
    layer's P step run as soon as its dL/dW is complete: the same codes, one layer's gradient alive at a time."""
    student.zero_grad(set_to_none=True)
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
        if i < len(micros) - 1:
            loss.backward()
        else:  # a non-finite loss takes no P step early (the step will be refused)
            early = _finite_everywhere(total + loss) and (cfg.p_step_in_backward or layer_pv.distributed)
            with layer_pv.during_backward(early):
                loss.backward()
        total += loss.detach()
    D.all_reduce_sum_([total])
    return total.item()


def v_optimizer_step(opt: torch.optim.Optimizer, params: list, owner: dict, cfg: FinetuneConfig, step: int) -> None:
    """The V step: each parameter's gradient summed onto its owner process, the owner's optimizer step at the
    schedule's lr, and every process receiving the new values."""
    reduce_v_gradients(params, owner)
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.steps)
    opt.step()  # each rank on the parameters it owns
    D.broadcast_from_owners_({i: p.data for i, p in enumerate(params)}, owner)


def _where_kept(ckpt: Optional[Path]) -> str:
    """Where the last good state is, for the message of a stopped run."""
    if ckpt is None:
        return ""
    if has_checkpoint(ckpt):
        return f"; the last good checkpoint (step {read_meta(ckpt)['step']}) is kept in {ckpt}"
    return "; no checkpoint had been written yet"


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

"""Fine-tuning on several processes (GPUs) with torch.distributed: data parallel, P step sharded.

Every rank holds the quantized student (2 bits a weight: small) and computes the loss on its own
slice of the global batch. The teacher only runs forward: its decoder layers are sharded over the ranks
with PyTorch's FSDP2 (`shard_for_inference`), each rank keeping 1/world of their parameters and
gathering one layer's at a time, so its memory per process falls with the number of processes. Then:

- V step: each continuous parameter has one owner rank; its gradient is summed onto the owner
  (reduce), which alone keeps its optimizer moments (ZeRO-1), steps it and broadcasts it, so the
  replicas stay identical;
- P step: each quantized layer has one owner rank (layers are dealt out by size). The weight
  gradients dL/dW are summed onto the owner (reduce), only the owner keeps that layer's P-step
  state (the per-weight moments, the largest state of PV-Tuning: ZeRO-style sharding) and
  computes its new codes, and the owner broadcasts the codes.

With equal slices the summed gradients are those of the global batch, so W ranks give the loss
curve of one process at the same global batch (up to the order of floating-point sums).
Without an initialized process group every function here is the identity of one process.
Launch with torchrun (`torchrun --nproc-per-node 2 -m llm.cli finetune ...`); gloo runs on CPUs.
"""
from __future__ import annotations

import gc
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: Optional[str] = None) -> torch.device:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...);
    NCCL and one GPU per process where CUDA is available, else gloo on the CPU. Returns the device."""
    if not launched_by_torchrun():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available() and backend != "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                **({"device_id": device} if cuda else {}))
    return device


def shard_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard the parameters of `model`'s decoder layers over the ranks with FSDP2 (fully_shard), in place:
    each rank keeps 1/world of every layer and all-gathers one layer's parameters for its forward, then
    frees them. For a model that only runs forward (the teacher); the same outputs as the whole model.
    Sharding moves the shards to `device`, so a model loaded on the CPU never needs a whole copy there.
    Without torch.distributed, or if already sharded, the model is returned as it is."""
    if not is_distributed() or getattr(model, "sharded_for_inference", False):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from llm.model import decoder_layers

    mesh = init_device_mesh(device.type, (world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)  # explicit: each layer is a root here
    model.sharded_for_inference = True
    return model


def local_numel(model: nn.Module) -> int:
    """Parameters this process holds of `model` (a sharded parameter counts its local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def local_slice(batch: Tensor) -> Tensor:
    """This rank's rows of the global batch (contiguous, equal shares)."""
    w, r = world_size(), rank()
    if len(batch) % w:
        raise ValueError(f"global batch of {len(batch)} does not split over {w} processes")
    n = len(batch) // w
    return batch[r * n:(r + 1) * n]


def rank_rows(batch: Tensor) -> Tensor:
    """This rank's rows of a batch that need not divide: contiguous shares, the first ones one row
    larger (a batch of at least world_size rows gives every rank some)."""
    return torch.tensor_split(batch, world_size())[rank()]


def all_reduce_sum_(tensors: Iterable[Optional[Tensor]], bucket_numel: int = 1 << 26) -> None:
    """Sum each tensor over ranks, in place, in flat buckets (few collective calls)."""
    if not is_distributed():
        return
    buckets: list = []
    for t in tensors:
        if t is None:
            continue
        last = buckets[-1] if buckets else None
        if last and last[0].dtype == t.dtype and sum(x.numel() for x in last) + t.numel() <= bucket_numel:
            last.append(t)
        else:
            buckets.append([t])
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def layer_owners(sizes: dict) -> dict:
    """name -> owning rank, greedy by size (largest first to the least loaded rank): balanced P-step
    work and state. Deterministic, so every rank computes the same map."""
    load = [0] * world_size()
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(len(load)), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += sizes[name]
    return owners


def _owner_buckets(tensors: dict, owner: dict, bucket_numel: int) -> list:
    """[(rank, [names])]: each rank's tensors in flat buckets of at most bucket_numel elements (one
    broadcast per bucket instead of one per tensor), in the same order on every rank."""
    buckets = []
    for r in range(world_size()):
        current, size = [], 0
        for name, t in tensors.items():
            if owner[name] != r:
                continue
            if current and size + t.numel() > bucket_numel:
                buckets.append((r, current))
                current, size = [], 0
            current.append(name)
            size += t.numel()
        if current:
            buckets.append((r, current))
    return buckets


def broadcast_from_owners_(tensors: dict, owner: dict, bucket_numel: int = 1 << 28) -> None:
    """Overwrite each tensor (name -> tensor) on every rank with its owner's, in flat byte buckets per owner."""
    if not is_distributed():
        return
    raw = {n: t.view(-1).view(torch.uint8) for n, t in tensors.items()}
    for r, names in _owner_buckets(raw, owner, bucket_numel):
        flat = torch.cat([raw[n] for n in names])
        dist.broadcast(flat, src=r)
        for n, part in zip(names, flat.split([raw[n].numel() for n in names])):
            raw[n].copy_(part)


class GradientBuckets:
    """dL/dW of each layer summed onto its owner rank while backward still runs. `add` is called as each
    layer's gradient is complete (backward hooks fire in the same order on every rank); a layer joins
    its owner's open bucket, and a full bucket is reduced at once, asynchronously, in `dtype` (float32
    or bfloat16). A rank that does not own a layer lets go of its gradient as soon as its bucket is
    sent, and of the bucket once the reduction is done. `finish` sends the last buckets, waits, and
    returns the summed gradients of the layers this rank owns."""

    def __init__(self, owner: dict, dtype: Optional[torch.dtype] = None, bucket_numel: int = 1 << 25) -> None:
        self.owner, self.dtype, self.limit = owner, dtype, bucket_numel
        self.open: dict = {r: [] for r in range(world_size())}  # owner -> [(name, gradient)] not yet sent
        self.inflight: list = []  # (work, flat, [(name, gradient or None)], owner)

    def add(self, name: str, grad: Tensor) -> None:
        r = self.owner[name]
        self.open[r].append((name, grad))
        if sum(g.numel() for _, g in self.open[r]) >= self.limit:
            self._send(r)
        # buckets whose reduction is done: a non-owner no longer needs them
        self.inflight = [e for e in self.inflight if e[3] == rank() or not e[0].is_completed()]

    def _send(self, r: int) -> None:
        entries, self.open[r] = self.open[r], []
        flat = torch.cat([g.reshape(-1).to(self.dtype or g.dtype) for _, g in entries])
        work = dist.reduce(flat, dst=r, async_op=True)
        keep = entries if rank() == r else [(n, None) for n, _ in entries]
        self.inflight.append((work, flat, keep, r))

    def finish(self) -> dict:
        for r in range(world_size()):
            if self.open[r]:
                self._send(r)
        owned = {}
        for work, flat, entries, r in self.inflight:
            work.wait()
            if r == rank():
                for (name, g), part in zip(entries, flat.split([g.numel() for _, g in entries])):
                    g.copy_(part.view_as(g))
                    owned[name] = g
        self.inflight = []
        return owned


def broadcast_from(t: Tensor, owner: int) -> None:
    """Overwrite `t` on every rank with rank `owner`'s (any dtype: 16-bit codes travel as bytes, which
    NCCL and gloo both carry)."""
    if is_distributed():
        dist.broadcast(t.view(torch.uint8) if t.dtype in (torch.int16, torch.bool) else t, src=owner)


def broadcast_module_(module: nn.Module, owner: int) -> None:
    """Overwrite every parameter and buffer of `module` on every rank with rank `owner`'s."""
    if is_distributed():
        for t in module.state_dict().values():
            broadcast_from(t.data, owner)


def broadcast_object(obj, owner: int):
    """Rank `owner`'s `obj` (any picklable value) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=owner)
    return box[0]


def gather_to_first(state: dict) -> dict:
    """Rank 0 gets the union of every rank's dict of tensors (moved to the CPU); others get {}."""
    if not is_distributed():
        return state
    parts = [None] * world_size() if rank() == 0 else None
    dist.gather_object({k: v.detach().cpu() for k, v in state.items()}, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if rank() == 0 else {}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def leave() -> None:
    """Leave the process group at the end of a run that went well on every rank: wait for all of them,
    collect what still refers to the group (a sharded model's device mesh, finished work), then destroy it
    while the interpreter is fully alive (gloo's worker threads torn down during its finalization can abort
    the process). Nothing to do without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()

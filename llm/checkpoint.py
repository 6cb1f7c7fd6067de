"""The project's checkpoint format: a folder with tensors in safetensors and metadata in JSON.

    CKPT/model.safetensors   the quantized model's state (codes, codebooks, scales, other weights)
    CKPT/state.safetensors   training state (optimizer moments, P-step state), optional
    CKPT/meta.json           formats of the quantized layers, base model, step, config, RNG, ...

Written so that a kill at any instant leaves a loadable checkpoint: everything goes to a temporary
folder `.CKPT.XXXX` beside CKPT (each file fsynced), the previous CKPT is renamed to `.CKPT.old`, the
new folder to CKPT, and `.CKPT.old` is removed. `recover` (called before every read and write) puts
`.CKPT.old` back if the kill fell between the two renames and removes stale temporaries of our own.
`check_out` refuses an output path holding anything this package did not write.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm.data import fingerprint
from llm.formats import QuantFormat, make_quantized, quantized_layers
from llm.model import decoder_layers, load_model, set_module


class CheckpointError(ValueError):
    """A checkpoint folder that is missing or malformed."""


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


CHECKPOINT_FILES = {"meta.json", "model.safetensors", "state.safetensors"}


def is_checkpoint(path) -> bool:
    """A folder holding a checkpoint of ours and nothing else."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return False
    names = {f.name for f in p.iterdir()}
    return {"meta.json", "model.safetensors"} <= names <= CHECKPOINT_FILES


PARTIAL_MARK = ".pvtuning-partial"  # in a folder being written (an export) until it is complete


def _ours_or_empty(p: Path, allow=is_checkpoint) -> bool:
    if not p.is_dir() or p.is_symlink():
        return False
    names = {f.name for f in p.iterdir()}
    return names <= CHECKPOINT_FILES or PARTIAL_MARK in names or allow(p)


def recover(path, allow=is_checkpoint) -> None:
    """Finish or undo an interrupted write of the folder `path` (a checkpoint, or what `allow` recognizes):
    restore `.NAME.old` when NAME is missing (a kill between the two renames), drop it when NAME is complete,
    remove stale `.NAME.XXXX` temporaries that hold nothing but what this package writes."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists() and allow(old):
        os.replace(old, path)
    elif old.exists() and allow(path) and _ours_or_empty(old, allow):
        shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if tmp != old and _ours_or_empty(tmp, allow):
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, model: nn.Module, meta: dict, state: Optional[dict] = None) -> Path:
    """Write model state (+ training state) and metadata to the folder `path`; a kill at any instant
    leaves either the previous or the new checkpoint (see recover)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = new_temporary(path)
    try:
        layers = quantized_layers(model)
        meta = dict(meta, quantized_layers={n: str(m.fmt) for n, m in layers.items()})
        sd = model.state_dict()
        # tied weights (embeddings = head) appear twice; safetensors stores each storage once
        seen, unique = {}, {}
        for k, v in sd.items():
            key = (v.data_ptr(), v.shape, v.dtype)
            if key in seen:
                meta.setdefault("tied", {})[k] = seen[key]
            else:
                seen[key] = k
                unique[k] = v
        save_file(_contiguous(unique), tmp / "model.safetensors")
        if state:
            save_file(_contiguous(state), tmp / "state.safetensors")
        meta = with_checksums(meta, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def new_temporary(path) -> Path:
    """An empty folder `.NAME.XXXX` beside `path` for a folder to be written and then swapped in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path` (fsynced, then renamed; what was at `path` goes to `.NAME.old`
    and is removed): a kill at any instant leaves the previous or the new folder (see recover)."""
    (tmp / PARTIAL_MARK).unlink(missing_ok=True)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists() or old.is_symlink():
        old.unlink()


def check_out(path, overwrite: bool = False, allow=is_checkpoint, what: str = "--out") -> None:
    """Refuse an output path that holds something this package did not write (a file, or a non-empty
    folder that `allow` does not recognize), unless overwrite; and one that cannot be written."""
    p = Path(path)
    recover(p, allow)
    if not overwrite:
        if p.is_file() or p.is_symlink():
            raise CheckpointError(f"{what} {p} is an existing file: give a new folder, or --overwrite to replace it")
        if p.is_dir() and any(p.iterdir()) and not allow(p):
            raise CheckpointError(f"{what} {p} is a folder holding other files: give a new or empty folder, "
                                  "or --overwrite to replace it")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (p.is_dir() and not os.access(p, os.W_OK)):
        raise CheckpointError(f"{what} {p} cannot be written (permission denied): give a writable location")


def remove_out(path) -> None:
    """Delete what --overwrite replaces (a file or a folder)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def check_same_run(path, stored: Optional[dict], requested: dict) -> None:
    """Refuse to resume a checkpoint made by another run (other base model, data, format or settings)."""
    if stored is None:
        return
    stored, requested = (json.loads(json.dumps(d, default=str)) for d in (stored, requested))  # tuples -> lists
    if isinstance(stored.get("base_model"), dict):  # identified by file sizes and times, before model fingerprints
        raise CheckpointError(f"{path} was written by an older pvtuning (another run identity) and cannot be resumed: "
                              "give another --out, or --overwrite to replace it")
    diff = _first_difference(stored, requested)
    if diff:
        k, there, now = diff
        raise CheckpointError(f"{path} holds another run ({k}: {_short(there)} there, {_short(now)} now): "
                              "give another --out, or --overwrite to replace it")


def _first_difference(a, b, prefix: str = ""):
    """(dotted key, a's value, b's value) of the first entry where two nested dicts differ, or None."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            return _first_difference(x, y, f"{prefix}{k}.")
        return f"{prefix}{k}", x, y
    return None


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def has_checkpoint(path) -> bool:
    """True if `path` holds a checkpoint's meta.json, after recovering an interrupted write."""
    path = Path(path)
    recover(path)
    return (path / "meta.json").is_file()


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksums"}
    body["checksums"] = {k: v for k, v in meta.get("checksums", {}).items() if k != "meta.json"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def with_checksums(meta: dict, folder: Path) -> dict:
    """meta with "checksums": the sha1 of each tensor file in `folder` (llm.data.fingerprint) and of meta's own
    content, so that a flipped bit, a truncated file or an edited meta.json is detected when the checkpoint is read."""
    sums = {f.name: fingerprint(f) for f in sorted(folder.glob("*.safetensors"))}
    meta = dict(meta, checksums=sums)
    meta["checksums"] = dict(sums, **{"meta.json": _meta_digest(meta)})
    return meta


def weights_fingerprint(path) -> str:
    """fingerprint of a checkpoint's model.safetensors: the one its meta.json records (checked whenever the tensors
    are read), else hashed now (a checkpoint written before checksums)."""
    path = Path(path)
    return read_meta(path).get("checksums", {}).get("model.safetensors") or fingerprint(path / "model.safetensors")


def read_meta(path) -> dict:
    """meta.json of a checkpoint folder (after recovering an interrupted write), its checksum verified
    (checkpoints written before checksums have none to verify)."""
    path = Path(path)
    recover(path)
    if not (path / "meta.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not a checkpoint (needs meta.json and model.safetensors)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'} is not valid JSON ({getattr(e, 'msg', e)}): "
                              "rerun the command that wrote it, with --overwrite") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / 'meta.json'} is not a checkpoint's metadata: rerun the command that wrote it")
    stored = meta.get("checksums", {}).get("meta.json")
    if stored is not None and stored != _meta_digest(meta):
        raise CheckpointError(f"{path / 'meta.json'} does not match its checksum (changed after it was written): "
                              "rerun the command that wrote it, with --overwrite")
    return meta


def quantize_structure(model: nn.Module, formats: dict) -> nn.Module:
    """Replace the named nn.Linear layers by empty quantized layers of the given formats."""
    for name, spec in formats.items():
        linear = model.get_submodule(name)
        set_module(model, name, make_quantized(linear, QuantFormat.parse(spec)))
    return model


def load_checkpoint(path, base_model_dir=None, device="cpu", dtype=torch.float32) -> tuple[nn.Module, dict, dict]:
    """(model, meta, training state) from a checkpoint folder; the architecture comes from the base
    model directory recorded in meta.json (or `base_model_dir`)."""
    path = Path(path)
    meta = read_meta(path)
    base = base_model_dir or meta.get("base_model")
    if base is None:
        raise CheckpointError(f"{path}: meta.json names no base_model; pass the base model directory")
    model = load_model(base, dtype=dtype, device="cpu")
    quantize_structure(model, meta["quantized_layers"])
    _load_matching(model, read_model_state(path, meta), f"{path} does not match {base}")
    state = read_tensors(path / "state.safetensors", meta) if (path / "state.safetensors").exists() else {}
    return model.to(device), meta, state


def read_model_state(path, meta: Optional[dict] = None) -> dict:
    """The model state a checkpoint holds, its tied weights (stored once) under each of their names."""
    path = Path(path)
    meta = read_meta(path) if meta is None else meta
    sd = read_tensors(path / "model.safetensors", meta)
    for k, src in meta.get("tied", {}).items():
        sd[k] = sd[src]
    return sd


def _load_matching(module: nn.Module, sd: dict, mismatch: str) -> None:
    """module.load_state_dict(sd), every tensor accounted for but the rotary tables the model recomputes;
    CheckpointError(mismatch + the keys) otherwise."""
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not m.endswith("rotary_emb.inv_freq")]:
        raise CheckpointError(f"{mismatch}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _first_blocks(model: nn.Module, n: int) -> nn.ModuleDict:
    """The model's first n decoder blocks, keyed "0".."n-1" (what a partial calibration stores)."""
    layers = decoder_layers(model)
    return nn.ModuleDict({str(j): layers[j] for j in range(n)})


def partial_path(path) -> Path:
    """Where an unfinished calibration of the checkpoint `path` keeps its calibrated blocks: PATH.partial."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def save_partial_calibration(path, model: nn.Module, next_block: int, report: dict, meta: dict) -> Path:
    """The state of `model`'s first `next_block` decoder blocks (the calibrated ones) and the report so far."""
    return save_checkpoint(path, _first_blocks(model, next_block), dict(meta, next_block=next_block,
                                                                        calibration_so_far=report))


def load_partial_calibration(path, model: nn.Module) -> tuple[int, dict, dict]:
    """Put the calibrated blocks of a partial checkpoint into `model` (loaded from its base model);
    returns (the first block still to calibrate, the report so far, meta)."""
    path = Path(path)
    meta = read_meta(path)
    if "next_block" not in meta:
        raise CheckpointError(f"{path} is not a partial calibration")
    blocks = _first_blocks(model, meta["next_block"])
    quantize_structure(blocks, meta["quantized_layers"])
    _load_matching(blocks, read_tensors(path / "model.safetensors", meta), f"{path} does not match the model")
    return meta["next_block"], meta["calibration_so_far"], meta


def read_tensors(file, meta: Optional[dict] = None) -> dict:
    """The tensors of a safetensors file, checked against the checksum its checkpoint's `meta` records; a damaged
    or truncated file is one CheckpointError."""
    file = Path(file)
    expected = (meta or {}).get("checksums", {}).get(file.name)
    if expected is not None and (not file.is_file() or fingerprint(file) != expected):
        raise CheckpointError(f"{file} does not match the checksum in its meta.json (damaged or truncated): "
                              "rerun the command that wrote it, with --overwrite")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error type on a damaged header or a short file
        raise CheckpointError(f"{file} is damaged or truncated ({str(e).splitlines()[0][:80]}): "
                              "rerun the command that wrote it, with --overwrite") from None


# --- step states as flat tensors ------------------------------------------------------------------
# A P or V step's state is any tree of dicts, lists, tensors, torch.Generators, numbers and None
# (pvtheory.steps.Step). It is stored as safetensors entries named by their path, the leaf's kind
# after '#': "p/<layer>/inner/v", "p/<layer>/t#int", "p/<layer>/inner#generator".
def flatten_state(state, prefix: str) -> dict:
    """The tensors that store `state` under names starting with `prefix`."""
    if isinstance(state, dict):
        out = {f"{prefix}#dict": torch.zeros(0)}
        for k, v in state.items():
            if "/" in str(k) or "#" in str(k):
                raise ValueError(f"a state key may not contain '/' or '#', got {k!r}")
            out.update(flatten_state(v, f"{prefix}/{k}"))
        return out
    if isinstance(state, (list, tuple)):
        out = {f"{prefix}#list": torch.tensor(len(state))}
        for i, v in enumerate(state):
            out.update(flatten_state(v, f"{prefix}/{i}"))
        return out
    if isinstance(state, torch.Tensor):
        return {prefix: state.detach()}
    if isinstance(state, torch.Generator):
        return {f"{prefix}#generator": state.get_state()}
    if isinstance(state, bool) or isinstance(state, int):
        return {f"{prefix}#int": torch.tensor(int(state))}
    if isinstance(state, float):
        return {f"{prefix}#float": torch.tensor(state, dtype=torch.float64)}
    if state is None:
        return {f"{prefix}#none": torch.zeros(0)}
    raise TypeError(f"a step state may hold dicts, lists, tensors, generators, numbers and None; got {type(state).__name__}")


def unflatten_state(flat: dict, prefix: str, device=None):
    """The state that flatten_state(state, prefix) stored; tensors moved to `device`."""
    for kind in ("", "#dict", "#list", "#generator", "#int", "#float", "#none"):
        if prefix + kind in flat:
            break
    else:
        raise KeyError(f"no stored state named {prefix!r}")
    t = flat[prefix + kind]
    if kind == "":
        return t.to(device) if device is not None else t
    if kind == "#generator":
        gen = torch.Generator()
        gen.set_state(t.cpu())
        return gen
    if kind == "#int":
        return int(t)
    if kind == "#float":
        return float(t)
    if kind == "#none":
        return None
    if kind == "#list":
        return [unflatten_state(flat, f"{prefix}/{i}", device) for i in range(int(t))]
    keys = {k[len(prefix) + 1:].split("/")[0].split("#")[0] for k in flat if k.startswith(prefix + "/")}
    return {k: unflatten_state(flat, f"{prefix}/{k}", device) for k in sorted(keys)}

"""The project's checkpoint format: a folder with tensors in safetensors and metadata in JSON.

    CKPT/model.safetensors   the quantized model's state (codes, codebooks, scales, other weights)
    CKPT/state.safetensors   training state (optimizer moments, P-step state), optional
    CKPT/meta.json           formats of the quantized layers, base model, step, config, RNG, ...

Written atomically: everything goes to a temporary folder beside CKPT, which then replaces CKPT,
so an interrupted write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm.formats import QuantFormat, make_quantized, quantized_layers
from llm.model import load_model, set_module


class CheckpointError(ValueError):
    """A checkpoint folder that is missing or malformed."""


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_checkpoint(path, model: nn.Module, meta: dict, state: Optional[dict] = None) -> Path:
    """Write model state (+ training state) and metadata to the folder `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
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
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_meta(path) -> dict:
    path = Path(path)
    if not (path / "meta.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not a checkpoint (needs meta.json and model.safetensors)")
    try:
        return json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'meta.json'} is not valid JSON: {e.msg}") from None


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
    sd = load_file(path / "model.safetensors")
    for k, src in meta.get("tied", {}).items():
        sd[k] = sd[src]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not m.endswith("rotary_emb.inv_freq")]:
        raise CheckpointError(f"{path} does not match {base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    state = load_file(path / "state.safetensors") if (path / "state.safetensors").exists() else {}
    return model.to(device), meta, state

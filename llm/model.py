"""Loading Hugging Face causal LMs, and where their quantizable linear layers are."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

SUPPORTED = ("llama", "mistral")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class ModelError(ValueError):
    """A model directory that cannot be used (missing, malformed, unsupported)."""


def read_config(model_dir) -> dict:
    """config.json of a Hugging Face model directory, checked for a supported architecture."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"model directory not found: {d}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{d} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    arch = cfg.get("model_type")
    if arch not in SUPPORTED:
        raise ModelError(f"unsupported architecture {arch!r} in {cfg_path}; supported: {', '.join(SUPPORTED)}")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise ModelError(f"{d} has no weights (*.safetensors or *.bin)")
    return cfg


def load_model(model_dir, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """The causal LM from a local directory (no downloads), in eval mode."""
    from transformers import AutoModelForCausalLM

    read_config(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load {model_dir}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (model.model.layers for Llama and Mistral)."""
    return model.model.layers


def block_linears(block: nn.Module, names=BLOCK_LINEARS) -> dict:
    """name -> nn.Linear (or quantized layer) inside one decoder block."""
    mods = dict(block.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ModelError(f"decoder block lacks {missing}: not a Llama/Mistral block")
    return {n: mods[n] for n in names}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def tiny_config(arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: Optional[int] = None,
                intermediate: int = 128, vocab: int = 256):
    """A small random-weight Llama or Mistral config for tests and scale benchmarks."""
    from transformers import LlamaConfig, MistralConfig

    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[arch]
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads or heads, intermediate_size=intermediate, vocab_size=vocab,
              max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if arch == "mistral":
        kw["sliding_window"] = 32
    return cls(**kw)

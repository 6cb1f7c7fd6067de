"""Loading Hugging Face causal LMs, and where their quantizable linear layers are."""
from __future__ import annotations

import importlib.util
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


def model_source(path) -> tuple[Path, Optional[str]]:
    """(folder, GGUF file name or None) of a model given as a Hugging Face directory, a .gguf file, or a
    folder holding one .gguf file (and no config.json)."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"{p} is a file but not a .gguf model: give a Hugging Face model directory or a GGUF file")
        return p.parent, p.name
    if not p.is_dir():
        raise ModelError(f"model not found: {p}")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if len(ggufs) > 1:
        raise ModelError(f"{p} holds {len(ggufs)} GGUF files ({', '.join(ggufs[:3])}...): give the file itself")
    raise ModelError(f"{p} has no config.json and no .gguf file: not a Hugging Face model directory or GGUF model")


def pretrained_kwargs(path) -> dict:
    """Keyword arguments of transformers' from_pretrained for a model (local files only; GGUF files through
    transformers' own GGUF loader, which dequantizes the weights to float)."""
    folder, gguf_file = model_source(path)
    kw = {"pretrained_model_name_or_path": str(folder), "local_files_only": True}
    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelError(f"reading GGUF models needs the package(s) {', '.join(missing)}: "
                             "pip install 'pvtuning[gguf]'")
        kw["gguf_file"] = gguf_file
    return kw


def read_config(model) -> dict:
    """The model's config (config.json, or a GGUF file's metadata), checked for a supported architecture."""
    folder, gguf_file = model_source(model)
    if gguf_file is not None:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(**pretrained_kwargs(model)).to_dict()
        except Exception as e:  # the GGUF reader raises many kinds on a damaged file
            raise ModelError(f"could not read the GGUF model {folder / gguf_file}: {_first_line(e)}") from None
        source = folder / gguf_file
    else:
        source = folder / "config.json"
        try:
            cfg = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{source} is not valid JSON: {e.msg} (line {e.lineno})") from None
    arch = cfg.get("model_type")
    if arch not in SUPPORTED:
        raise ModelError(f"unsupported architecture {arch!r} in {source}; supported: {', '.join(SUPPORTED)}")
    if gguf_file is None and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder} has no weights (*.safetensors or *.bin)")
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(model, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """The causal LM from a local Hugging Face directory or GGUF file (no downloads), in eval mode.
    A GGUF model is dequantized to `dtype` and its GGUF quantization note dropped from the config:
    the loaded weights are the original for every measurement."""
    from transformers import AutoModelForCausalLM

    read_config(model)
    try:
        m = AutoModelForCausalLM.from_pretrained(**pretrained_kwargs(model), dtype=dtype)
    except ModelError:
        raise
    except Exception as e:
        if "weights_only" in str(e):
            raise ModelError(f"could not load {model}: its .bin weights are a pickle holding more than tensors, "
                             "which is not loaded for safety; convert the model to safetensors") from None
        raise ModelError(f"could not load {model}: {_first_line(e)}") from None
    qc = getattr(m.config, "quantization_config", None)
    if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
        del m.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):  # a plain float model from here on
            if attr in vars(m):
                setattr(m, attr, None)
    return m.to(device).eval()


def load_tokenizer(model):
    """The model's tokenizer (transformers AutoTokenizer, local files only; a GGUF file's own vocabulary)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(**pretrained_kwargs(model))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of {model}: {_first_line(e)}") from None


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

"""Export to the Hugging Face AQLM format (transformers + the `aqlm` package load it).

config.json gains quantization_config = {quant_method: "aqlm", in_group_size: g, out_group_size: 1,
num_codebooks: M, nbits_per_codebook: B, linear_weights_not_to_quantize: [module names]}; for each
quantized layer P the safetensors hold P.codes (int8 for B = 8, int16 for B = 16, shape
(out, in/g, M)), P.codebooks (M, 2^B, 1, g) and P.scales (out, 1, 1, 1).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llm.checkpoint import PARTIAL_MARK, new_temporary, swap_in
from llm.formats import AQLMLinear, quantized_layers
from llm.model import load_tokenizer, model_source


class ExportError(ValueError):
    """A model that the Hugging Face AQLM format cannot hold."""


def _hf_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """AQLM stores codes as signed ints of B bits (value mod 2^B read as unsigned)."""
    c = codes.long()
    if bits <= 8:
        return ((c + 128) % 256 - 128).to(torch.int8)
    if bits <= 16:
        return ((c + 32768) % 65536 - 32768).to(torch.int16)
    raise ExportError(f"AQLM codes of {bits} bits are not supported")


def is_export(path) -> bool:
    """A folder this exporter wrote: an AQLM config.json, model.safetensors and tokenizer files only."""
    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    names = {f.name for f in p.iterdir() if not f.name.startswith(".")}
    known = {"config.json", "model.safetensors", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"}
    return (config.get("quantization_config", {}).get("quant_method") == "aqlm"
            and all(n in known or n.startswith("tokenizer") for n in names))


def export_aqlm(model: nn.Module, base_model_dir, out_dir) -> Path:
    """Write an AQLM-format Hugging Face directory for a model whose quantized layers are all
    AQLMLinear of one format, with the tokenizer of the base model (a directory or a GGUF file)."""
    layers = quantized_layers(model)
    if not layers:
        raise ExportError("the model has no quantized layers")
    if any(not isinstance(m, AQLMLinear) for m in layers.values()):
        raise ExportError("only AQLM/VQ layers can be exported to the AQLM format (scalar layers cannot)")
    fmts = {str(m.fmt) for m in layers.values()}
    if len(fmts) != 1:
        raise ExportError(f"the AQLM format needs one format for all layers, found {sorted(fmts)}")
    fmt = next(iter(layers.values())).fmt
    base, out = Path(base_model_dir), Path(out_dir)
    tensors = {}
    quantized_params = set()
    for name, m in layers.items():
        tensors[f"{name}.codes"] = _hf_codes(m.codes, fmt.bits).contiguous()
        tensors[f"{name}.codebooks"] = m.codebooks.detach().float().unsqueeze(2).contiguous()
        tensors[f"{name}.scales"] = m.scales.detach().float().reshape(-1, 1, 1, 1).contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().float().contiguous()
        quantized_params.update(f"{name}.{p}" for p in ("codes", "codebooks", "scales", "bias"))
    seen = set()
    for k, v in model.state_dict().items():
        if k in quantized_params or k in tensors or "rotary_emb" in k:
            continue
        ptr = (v.data_ptr(), tuple(v.shape))
        if ptr in seen:  # tied weights: the config's tie_word_embeddings restores them
            continue
        seen.add(ptr)
        tensors[k] = v.detach().contiguous()
    folder, gguf_file = model_source(base)
    if gguf_file is None:
        config = json.loads((folder / "config.json").read_text())
    else:  # the config transformers read from the GGUF metadata (tie_word_embeddings included)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
    skip = [n for n, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, nn.Embedding)) and n not in layers]
    config["quantization_config"] = {
        "quant_method": "aqlm", "in_group_size": fmt.group_size, "out_group_size": 1,
        "num_codebooks": fmt.num_codebooks, "nbits_per_codebook": fmt.bits,
        "linear_weights_not_to_quantize": skip,
    }
    # written whole into a temporary folder, then swapped in: a kill leaves the previous export or none
    tmp = new_temporary(out)
    try:
        (tmp / PARTIAL_MARK).touch()
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if gguf_file is None:
            for f in folder.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "generation_config")) and f.is_file():
                    shutil.copy(f, tmp / f.name)
        else:
            load_tokenizer(base).save_pretrained(str(tmp))
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

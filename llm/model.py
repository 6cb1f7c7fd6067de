"""Loading Hugging Face causal LMs, and where their quantizable linear layers are."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pvtheory.io import exclusive_lock

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
    if gguf_file is not None:  # the float32 copy's config was checked before it was written
        cfg = _from_float32_copy(model, lambda copy: json.loads((copy / "config.json").read_text()), (OSError, ValueError))
        return cfg if cfg is not None else _gguf_config(model)
    source = folder / "config.json"
    try:
        cfg = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{source} is not valid JSON: {e.msg} (line {e.lineno})") from None
    _check_architecture(cfg, source)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder} has no weights (*.safetensors or *.bin)")
    return cfg


def _gguf_config(model) -> dict:
    """A GGUF file's config from its metadata, checked for a supported architecture."""
    from transformers import AutoConfig

    folder, gguf_file = model_source(model)
    try:
        cfg = AutoConfig.from_pretrained(**pretrained_kwargs(model)).to_dict()
    except ModelError:
        raise
    except Exception as e:  # the GGUF reader raises many kinds on a damaged file
        raise ModelError(f"could not read the GGUF model {folder / gguf_file}: {first_line(e)}") from None
    _check_architecture(cfg, folder / gguf_file)
    return cfg


def _check_architecture(cfg: dict, source: Path) -> None:
    arch = cfg.get("model_type")
    if arch not in SUPPORTED:
        raise ModelError(f"unsupported architecture {arch!r} in {source}; supported: {', '.join(SUPPORTED)}")


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(model, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """The causal LM from a local Hugging Face directory or GGUF file (no downloads), in eval mode.
    A GGUF model is dequantized to `dtype` and its GGUF quantization note dropped from the config:
    the loaded weights are the original for every measurement."""
    read_config(model)
    m = _from_float32_copy(model, lambda copy: _from_pretrained(copy, dtype))
    m = m if m is not None else _from_pretrained(model, dtype)
    check_weights(m, model)
    return m.to(device).eval()


def check_weights(m: nn.Module, source) -> None:
    """ModelError naming the first tensor that holds NaN or inf, or a weight matrix that is all zeros: a
    model no measurement or compression of which would mean anything."""
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"{source}: tensor {name} holds {bad} non-finite values (NaN or inf): "
                             "the model's weights are damaged")
        if t.ndim >= 2 and not bool(t.any()):
            raise ModelError(f"{source}: weight {name} is all zeros: the model's weights are damaged or missing")


def _from_pretrained(model, dtype: torch.dtype) -> nn.Module:
    """transformers' AutoModelForCausalLM.from_pretrained, local files only, errors as ModelError, a GGUF
    model's quantization note dropped (a plain float model)."""
    from transformers import AutoModelForCausalLM

    kw = pretrained_kwargs(model)
    if "gguf_file" in kw:
        try:  # transformers versions that can keep GGUF weights packed: a plain dense model here, always
            from transformers.utils.quantization_config import GgufConfig

            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
    try:
        m = AutoModelForCausalLM.from_pretrained(**kw, dtype=dtype)
    except ModelError:
        raise
    except Exception as e:
        if "weights_only" in str(e):
            raise ModelError(f"could not load {model}: its .bin weights are a pickle holding more than tensors, "
                             "which is not loaded for safety; convert the model to safetensors") from None
        raise ModelError(f"could not load {model}: {first_line(e)}") from None
    qc = getattr(m.config, "quantization_config", None)
    if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "gguf":
        del m.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):  # a plain float model from here on
            if attr in vars(m):
                setattr(m, attr, None)
    return m


def load_tokenizer(model):
    """The model's tokenizer (transformers AutoTokenizer, local files only; a GGUF file's own vocabulary)."""
    from transformers import AutoTokenizer

    tok = _from_float32_copy(model, lambda copy: AutoTokenizer.from_pretrained(str(copy), local_files_only=True))
    return tok if tok is not None else _tokenizer_from(model)


def gguf_as_folder(model) -> Optional[Path]:
    """For a GGUF model, a Hugging Face folder holding the same model (config.json, float32 weights,
    tokenizer) under the cache (PVTUNING_CACHE), keyed by the file's bytes and written once, so that
    every later load skips the GGUF parse (about 30 s a load for SmolLM2-135M on 2 cores, and a pipeline
    loads its model three times). None for a Hugging Face folder, and where the cache cannot hold it
    (no room for the float32 weights twice over, a read-only cache): then each load reads the GGUF.
    ModelError for a damaged GGUF file or an unsupported architecture."""
    folder, gguf_file = model_source(model)
    if gguf_file is None:
        return None
    from llm import data

    out = Path(data.CACHE) / f"gguf-{Path(gguf_file).stem}-{model_fingerprint(model)}"
    if out.is_dir():
        return out
    if out in _NO_COPY:
        return None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(out.with_name(out.name + ".lock")):  # processes started together convert it once
            if out.is_dir():
                return out
            cfg = _gguf_config(model)  # a clear error before the weights are read
            if shutil.disk_usage(out.parent).free < 2 * 4 * _parameter_count(cfg):
                _NO_COPY.add(out)
                return None
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _from_pretrained(model, torch.float32).save_pretrained(str(tmp))
                _tokenizer_from(model).save_pretrained(str(tmp))
                os.rename(tmp, out)  # whole or absent
                size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
                print(f"{folder / gguf_file}: its float32 copy ({size:.0f} MB) is now {out}; later loads read it",
                      file=sys.stderr)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        _NO_COPY.add(out)
        return None
    return out


# the float32 copies this process found no room or no write access for: it reads those GGUF files directly
_NO_COPY: set = set()


def _meta_model(cfg: dict) -> nn.Module:
    """A model of this config built on the meta device: its shapes, no memory taken, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _parameter_count(cfg: dict) -> int:
    """The number of parameters of a model of this config."""
    return sum(p.numel() for p in _meta_model(cfg).parameters())


def _tokenizer_from(model):
    """transformers' AutoTokenizer of a model folder or GGUF file (its own vocabulary), errors as ModelError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(**pretrained_kwargs(model))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of {model}: {first_line(e)}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def model_fingerprint(model) -> str:
    """sha1 (20 hex digits) of what a model is read from: a GGUF file's bytes, or a folder's config.json, weight
    files and tokenizer files; each file hashed once per process while it is unchanged. The one identity of a
    model: caches of its perplexities and the runs that resume from its checkpoints are keyed by it."""
    folder, gguf_file = model_source(model)
    files = [folder / gguf_file] if gguf_file else sorted(
        f for f in folder.iterdir()
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin") or f.name in TOKENIZER_FILES)
    if len(files) == 1:
        return _file_sha1(str(files[0].resolve()), files[0].stat().st_size, files[0].stat().st_mtime_ns)
    import hashlib

    parts = [f"{f.name}:{_file_sha1(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)}" for f in files]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=64)
def _file_sha1(path: str, size: int, mtime_ns: int) -> str:
    """sha1 of the file's bytes (20 hex digits), once per process while the file is unchanged."""
    from llm.data import fingerprint

    return fingerprint(path)[:20]


def _from_float32_copy(model, read, errors: tuple = (Exception,)):
    """read(folder) of a GGUF model's float32 copy (gguf_as_folder); None for a Hugging Face folder, where
    there is no copy, or where reading it raised one of `errors`: a damaged copy is removed (the next load
    writes it again), never trusted."""
    copy = gguf_as_folder(model)
    if copy is None:
        return None
    try:
        return read(copy)
    except errors:
        shutil.rmtree(copy, ignore_errors=True)
        return None


def linear_shapes(model, names=BLOCK_LINEARS) -> dict:
    """{"model.layers.i.name": (out, in)} of the linears calibration quantizes, of a built model or of a
    model directory or GGUF file from its config alone (built on the meta device: no weights read)."""
    if not isinstance(model, nn.Module):
        model = _meta_model(read_config(model))  # the config is read first: a GGUF file is loaded to read it
    return {f"model.layers.{i}.{n}": (l.out_features, l.in_features)
            for i, b in enumerate(decoder_layers(model)) for n, l in block_linears(b, names).items()}


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

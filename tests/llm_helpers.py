"""Tiny random Llama/Mistral models and corpora for the LLM tests (CPU, float32)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_TOKENIZER = SHARED / "models" / "ref-llama"


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 256, peaky: bool = True, layers: int = 2):
    """A random model of `layers` blocks; `peaky` scales the head so the teacher's distributions are not uniform."""
    from transformers import AutoModelForCausalLM

    from llm.model import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab=vocab, layers=layers)).eval()
    if peaky:
        with torch.no_grad():
            model.lm_head.weight.mul_(25.0)
    return model


def tiny_model_dir(tmp_path: Path, arch: str = "llama") -> Path:
    """A tiny model saved as a Hugging Face directory with the reference tokenizer (8192 tokens)."""
    if not (REF_TOKENIZER / "tokenizer.json").exists():
        import pytest

        pytest.skip(f"needs the reference tokenizer at {REF_TOKENIZER} (../shared is absent)")
    d = tmp_path / f"tiny-{arch}"
    tiny_model(arch, vocab=8192).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF_TOKENIZER / f, d / f)
    return d


def tiny_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """Small train/validation text files (from the shared corpus when present)."""
    import lzma

    src = SHARED / "corpus"
    text = lzma.open(src / "validation.txt.xz", "rt").read(60_000) if (src / "validation.txt.xz").exists() else (
        "PV-Tuning alternates a P step and a V step. " * 2000)
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(text[:40_000])
    val.write_text(text[40_000:])
    return train, val

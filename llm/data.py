"""The corpus: read (xz or plain text), tokenize once (cached), cut into sequences."""
from __future__ import annotations

import hashlib
import lzma
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from pvtheory.io import atomic_path

CACHE = Path(os.environ.get("PVTUNING_CACHE", Path.home() / ".cache" / "pvtuning"))


def read_text(path, max_chars: Optional[int] = None) -> str:
    """The text of a .txt or .txt.xz file (the first max_chars characters if given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read() if max_chars is None else f.read(max_chars)


def tokenize(path, tokenizer, max_chars: Optional[int] = None, cache: Optional[Path] = CACHE) -> Tensor:
    """Token ids (int32, 1-D) of a corpus file: one stream, no special tokens; cached on disk."""
    path = Path(path)
    vocab = hashlib.sha1(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    key = hashlib.sha1(f"{path.name}|{path.stat().st_size}|{max_chars}|{vocab}".encode()).hexdigest()[:16]
    cached = None if cache is None else Path(cache) / f"tokens-{path.name}-{key}.pt"
    if cached is not None and cached.exists():
        return torch.load(cached)
    text = read_text(path, max_chars)
    chunk = 1 << 20  # tokenize in pieces cut at line ends so no token straddles a cut
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(text[start:end])
        start = end
    ids = []
    for i in range(0, len(pieces), 64):  # a fast tokenizer encodes a batch of pieces on all cores
        for piece_ids in tokenizer(pieces[i:i + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(piece_ids)
    tokens = torch.tensor(ids, dtype=torch.int32)
    if cached is not None:
        with atomic_path(cached) as tmp:
            torch.save(tokens, tmp)
    return tokens


def windows(tokens: Tensor, seq_len: int, max_windows: Optional[int] = None) -> Tensor:
    """Non-overlapping windows (n, seq_len) from the start of the stream (the remainder is dropped)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seq_len].reshape(n, seq_len).long()


def calibration_sequences(tokens: Tensor, seq_len: int, n: int, seed: int = 0) -> Tensor:
    """n random windows of seq_len tokens (int64, (n, seq_len)) from a token stream."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, need more than seq_len = {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=gen)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()]).long()

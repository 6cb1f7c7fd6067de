"""The corpus: read (plain or xz text, JSON lines, parquet, a datasets folder), tokenize once (cached by\ncontent), cut into sequences."""
from __future__ import annotations

import hashlib
import importlib
import json
import lzma
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from pvtheory.io import atomic_path

CACHE = Path(os.environ.get("PVTUNING_CACHE", Path.home() / ".cache" / "pvtuning"))


def read_text(path, max_chars: Optional[int] = None) -> str:
    """The text of a corpus (the first max_chars characters if given): a .txt or .txt.xz file, a .jsonl file
    (the "text" field of each line), a .parquet file (its "text" column) or a folder written by
    datasets' save_to_disk (its "text" column); documents are joined by blank lines."""
    path = Path(path)
    check_corpus(path)
    try:
        if path.is_dir():
            text = "\n\n".join(_datasets_texts(path))
        elif path.suffix == ".parquet":
            text = "\n\n".join(_parquet_texts(path))
        elif path.suffix == ".jsonl" or path.name.endswith(".jsonl.xz"):
            text = "\n\n".join(_jsonl_texts(path))
        else:
            with _open_text(path) as f:
                return f.read() if max_chars is None else f.read(max_chars)
    except lzma.LZMAError as e:
        raise ValueError(f"corpus file {path} is not valid xz ({e}): give a .txt or an intact .txt.xz") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None
    return text if max_chars is None else text[:max_chars]


def _open_text(path: Path):
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, "rt", encoding="utf-8")


def _jsonl_texts(path: Path) -> list:
    texts = []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path} line {number} has no string field \"text\"")
            texts.append(row["text"])
    return texts


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"reading {what} needs the package {module.split('.')[0]}: pip install 'pvtuning[data]'") from None


def _text_column(table, path: Path) -> list:
    if "text" not in table.column_names:
        raise ValueError(f"{path} has no \"text\" column (columns: {', '.join(table.column_names[:6])})")
    return [t for t in table.column("text").to_pylist() if t]


def _parquet_texts(path: Path) -> list:
    pq = _require("pyarrow.parquet", "a .parquet corpus")
    try:
        table = pq.read_table(path, columns=None)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:80]})") from None
    return _text_column(table, path)


def _datasets_texts(path: Path) -> list:
    datasets = _require("datasets", "a datasets folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a folder written by datasets' save_to_disk ({str(e).splitlines()[0][:80]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path} holds the splits {', '.join(ds)}: give the folder of one split ({path}/NAME)")
        ds = next(iter(ds.values()))
    return _text_column(ds.data, path)


def check_corpus(path, what: str = "corpus") -> None:
    """Cheap checks before any work: the corpus exists, can be read, and looks like what its name says."""
    path = Path(path)
    if path.is_dir():
        if not any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise ValueError(f"{what} {path} is a folder but not one written by datasets' save_to_disk")
        return
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} file {path} cannot be read (permission denied)")
    with open(path, "rb") as f:
        head = f.read(6)
    if path.suffix == ".xz" and head != b"\xfd7zXZ\x00":
        raise ValueError(f"{what} file {path} is not valid xz (no xz header): give a .txt or an intact .txt.xz")
    if path.suffix == ".parquet" and head[:4] != b"PAR1":
        raise ValueError(f"{what} file {path} is not a parquet file (no PAR1 header)")


def fingerprint(path, chunk: int = 1 << 22) -> str:
    """sha1 of a file's bytes (of a folder: of its files' names and bytes): what caches and resumed runs
    are keyed by, never a name or size alone."""
    path = Path(path)
    h = hashlib.sha1()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    return h.hexdigest()


def tokenize(path, tokenizer, max_chars: Optional[int] = None, cache: Optional[Path] = CACHE) -> Tensor:
    """Token ids (int32, 1-D) of a corpus file: one stream, no special tokens; cached on disk under the
    hash of the file's bytes, the tokenizer's vocabulary and max_chars."""
    path = Path(path)
    check_corpus(path)
    vocab = hashlib.sha1(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    key = hashlib.sha1(f"{fingerprint(path)}|{max_chars}|{vocab}".encode()).hexdigest()[:20]
    cached = None if cache is None else Path(cache) / f"tokens-{path.name}-{key}.pt"
    if cached is not None and cached.exists():
        try:
            return torch.load(cached, weights_only=True)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            cached.unlink(missing_ok=True)
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
    """Non-overlapping windows (n, seq_len) from the start of the stream (the remainder is dropped): all of them,
    or the first max_windows (ValueError if there are fewer)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
    if max_windows is not None:
        if max_windows > n:  # fewer windows than asked would change the measurement without a word
            raise ValueError(f"{max_windows} windows of {seq_len} tokens were asked for, and the corpus has {n}: "
                             f"ask for at most {n} (--eval-windows), or leave it out for all")
        n = max_windows
    return tokens[: n * seq_len].reshape(n, seq_len).long()


def calibration_sequences(tokens: Tensor, seq_len: int, n: int, seed: int = 0) -> Tensor:
    """n random windows of seq_len tokens (int64, (n, seq_len)) from a token stream."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, need more than seq_len = {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=gen)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()]).long()

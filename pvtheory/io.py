"""Atomic file output (write to a temporary file in the same folder, then rename over the target), and a lock
that processes sharing a cache take so that one of them writes what the others then read."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: PathLike, obj: Any) -> None:
    """json.dump(obj) to `path` atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def save_figure(fig, path: PathLike, **kwargs) -> None:
    """fig.savefig to `path` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


@contextmanager
def exclusive_lock(lock: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created) while the block runs; other processes asking
    for it wait. Without fcntl, or where the lock file cannot be created, the block runs unlocked."""
    try:
        import fcntl

        f = open(lock, "w")
    except (ImportError, OSError):
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""One process at a time per output: a command that writes --out holds an exclusive lock for as long as it
runs, and a second process on the same --out is refused with one line. The lock is the kernel's (flock) on
a file under the cache (PVTUNING_CACHE/locks, named by the hash of the output's real path, so that nothing
is written beside --out before the inputs are checked): it dies with its process, so a run killed by any
signal leaves nothing that blocks the rerun. Processes with different caches do not see each other's locks."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llm import data


class OutInUse(ValueError):
    """Another live process is writing the same --out."""


def lock_path(out) -> Path:
    """The lock file of the output path `out`."""
    import hashlib

    key = hashlib.sha1(os.path.realpath(out).encode()).hexdigest()[:20]
    return Path(data.CACHE) / "locks" / f"{key}.lock"


@contextmanager
def holding_out(out, what: str = "--out") -> Iterator[None]:
    """Run the block holding `out`'s lock; OutInUse at once if another process holds it. Where the file system
    has no flock (or the lock file cannot be made) the block runs unlocked: the lock guards, it never blocks work."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = lock_path(out)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise OutInUse(f"{what} {out} is being written by another pvtuning process{pid}: wait for it to "
                           f"finish, or give another {what}") from None
        except OSError:  # no flock here (some network file systems)
            os.close(fd)
            yield
            return
        try:  # the file we locked must still be the one at `path` (a holder may have removed it meanwhile)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:  # removed while still locked: a process that opened it meanwhile sees another inode and retries
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
        except OSError:
            pass
        os.close(fd)

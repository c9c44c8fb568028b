"""Crash-safe file writing: write to a temporary name in the same folder, fsync, rename.

Used by everything that must never leave half a file behind: checkpoints, the `latest` pointer,
run summaries, annotation indexes, feature caches.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make renames inside `path` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file below `root`, then `root` itself (before renaming a finished folder into place)."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def atomic_write(target: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `target` with what `write(fp)` writes; readers and crashes see the old file or the new."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    atomic_write(target, lambda fp: fp.write(data))


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an advisory lock on the file `path` (created if missing) for the duration of the block.

    Processes building the same cached artefact take turns: the second waits, then finds the first's
    result instead of building it again (or deleting the first's work in progress as if it were stale).
    Where `fcntl` is unavailable (Windows) this is a no-op.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

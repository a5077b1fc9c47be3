"""Atomic file writes: a file or directory under its final name is always complete. Imports nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file directly in a directory, then the directory itself."""
    for child in path.iterdir():
        fsync_path(child)
    fsync_path(path)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of the new: temp, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)

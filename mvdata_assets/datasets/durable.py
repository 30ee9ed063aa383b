"""Bytes and names made durable: what a file's `downloaded` (or a shard's `finished`) relies on after a crash.

The order is what matters: a file's bytes reach the disk before the name that points at them, and the name before
anything is reported. On ext4 without a journal (these machines) nothing else orders the two. Plain Python.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(folder: str | Path) -> None:
    """Flushes the whole filesystem holding `folder` in one call (Linux syncfs(2); Python's os module lacks it)."""
    if not hasattr(_libc, "syncfs"):
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(folder))
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """Makes the names in `directory` (renames into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(part: Path, final: Path) -> None:
    """`part` renamed to `final` once its bytes are on disk; returns once the new name is on disk too."""
    with part.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, final)
    fsync_dir(final.parent)

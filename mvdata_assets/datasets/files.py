"""The files a download is asked for and what became of them, and the test every body must pass.

A `FileTask` is one catalog file: where it comes from, where it goes, and the size and checksums it must have. A
`FileResult` is its outcome in one run (`downloaded`, `skipped` or `failed`, with the reason). `Known` is what an
earlier run recorded, enough to skip a file without reading it again. Plain Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mvdata_assets.datasets.digests import Digests

Progress = Callable[[str, int, int | None], None]  # (url, bytes so far, total or None)


class InsufficientSpace(RuntimeError):
    """The plan needs more free disk than there is; raised before anything is downloaded."""


@dataclass(frozen=True)
class FileTask:
    """One file to have on disk, and what it must match."""

    url: str
    dest: Path
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Known:
    """What an earlier run recorded of a file on disk: enough to skip it without reading it again."""

    bytes: int
    mtime_ns: int
    sha256: str

    def unchanged(self, st: os.stat_result) -> bool:
        """The file on disk (its `stat`) still has the size and mtime recorded: its checksum stands."""
        return (st.st_size, st.st_mtime_ns) == (self.bytes, self.mtime_ns)


@dataclass
class FileResult:
    url: str
    path: str
    status: str  # downloaded | skipped | failed
    bytes: int = 0
    expected_bytes: int | None = None
    sha256: str | None = None
    error: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    bytes_transferred: int = 0  # body bytes that crossed the network in this run
    mtime_ns: int | None = None


def mismatch(task: FileTask, size: int, digests: Digests) -> str | None:
    """Why a body is not the file the catalog describes (None: it is)."""
    if task.size is not None and size != task.size:
        return f"size {size} but the catalog says {task.size}"
    if task.sha256 and digests.sha256 != task.sha256.lower():
        return f"sha256 {digests.sha256} but the catalog says {task.sha256}"
    if task.md5 and digests.md5 != task.md5.lower():
        return f"md5 {digests.md5} but the catalog says {task.md5}"
    return None


def present(task: FileTask, known: Known | None) -> bool:
    """On disk as recorded (size and mtime unchanged) and matching the catalog: no need to read it again."""
    if known is None:
        return False
    try:
        st = task.dest.stat()
    except OSError:
        return False
    if not known.unchanged(st):
        return False
    if task.size is not None and known.bytes != task.size:
        return False
    return not (task.sha256 and known.sha256 != task.sha256.lower())


class Listing:
    """The names in the destination folders, listed once per run: on a busy disk a stat per file costs more."""

    def __init__(self) -> None:
        self._names: dict[str, set[str]] = {}  # by folder, as a string (hashing a Path costs far more than a str)

    def has(self, path: Path, suffix: str = "") -> bool:
        """Whether `path` (with `suffix` added to its name) was there when its folder was first looked at."""
        folder, _, name = os.fspath(path).rpartition(os.sep)
        names = self._names.get(folder)
        if names is None:
            try:
                names = set(os.listdir(folder or "."))
            except (FileNotFoundError, NotADirectoryError):
                names = set()
            self._names[folder] = names
        return name + suffix in names

"""Where a file becomes durable: what a file's `downloaded` (or a shard's `finished`) relies on after a crash.

One rule, in this order: a file's bytes reach the disk, then the name that points at them (a rename from its
`.part`), then that name (its folder is synced), and only then is the file reported. Nothing else orders them on a
file system without a journal. `replace` does it for one file; `Committer` for many, one syncfs per batch instead of
an fsync per file (an fsync per file plus one per folder cost more than a small file's whole transfer). Plain Python.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mvdata_assets.datasets.files import FileResult

# a batch is committed once it holds this many files or its first file has waited this long (or at the end): each
# syncfs also commits the filesystem's journal, which slows the file creations going on meanwhile
BATCH_FILES = 500
BATCH_WAIT_S = 0.25
HELD_BYTES = 64 * 1024 * 1024  # bodies held in memory for the committer to write before the downloads wait

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


@dataclass
class Verified:
    """A file whose bytes matched the catalog in its `.part`, waiting to be put in place."""

    result: FileResult
    part: str
    dest: str
    companions: set[str] = field(default_factory=set)  # deleted once it is in place (validator, segment state)
    content: list[bytes] | None = None  # a small body still in memory: written to `part` here

    @property
    def held(self) -> int:
        return sum(map(len, self.content)) if self.content is not None else 0


class Committer:
    """Verified files made durable and renamed into place in batches, by a thread of its own.

    `add` returns at once (the downloads go on); `close` returns once every file added is `downloaded`, or failed
    with the reason.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Verified | None] = queue.SimpleQueue()
        self._held = 0  # bytes of bodies in memory, not written yet
        self._room = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mvdata-commit", daemon=True)
        self._thread.start()

    def add(self, verified: Verified) -> None:
        """Queues a verified file; waits while the bodies held in memory exceed HELD_BYTES."""
        if verified.content is not None:
            with self._room:
                while self._held > HELD_BYTES and self._thread.is_alive():
                    self._room.wait(1.0)
                self._held += verified.held
        self._queue.put(verified)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        """Creates each body's file as it arrives, so that committing a batch is only its syncfs and renames."""
        batch: list[Verified] = []
        deadline = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()) if batch else None)
            except queue.Empty:  # the batch's first file has waited BATCH_WAIT_S
                commit(batch)
                batch = []
                continue
            if item is None:
                break
            if item.content is not None:
                self._create(item)
            if not batch:
                deadline = time.monotonic() + BATCH_WAIT_S
            batch.append(item)
            if len(batch) >= BATCH_FILES:
                commit(batch)
                batch = []
        if batch:
            commit(batch)

    def _create(self, item: Verified) -> None:
        """Creates a held body's `.part` and gives its room back to the downloads."""
        held = item.held
        _write(item)
        item.content = None
        with self._room:
            self._held -= held
            self._room.notify_all()


def _write(item: Verified) -> None:
    """Creates a body's `.part`; a failure fails that file alone, with the reason."""
    assert item.content is not None
    try:
        fd = os.open(item.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if os.writev(fd, item.content) != item.held:
                raise OSError(f"short write to {item.part} (disk full?)")
        finally:
            os.close(fd)
    except OSError as exc:
        item.result.error = f"writing {os.path.basename(item.part)}: {type(exc).__name__}: {exc}"


def commit(batch: list[Verified]) -> None:
    """One syncfs per file system for the batch, the renames, one fsync per folder, then the report."""
    for item in batch:  # a rename keeps the mtime: read now, it is what `Known` recalls next time
        if item.result.error is not None:  # its .part could not be written
            continue
        try:
            item.result.mtime_ns = os.stat(item.part).st_mtime_ns
        except OSError as exc:
            item.result.error = f"{os.path.basename(item.part)} is gone: {type(exc).__name__}: {exc}"
    batch = [item for item in batch if item.result.error is None]
    try:
        folders = {os.path.dirname(item.dest) for item in batch}
        for folder in {os.stat(folder).st_dev: folder for folder in folders}.values():
            syncfs(folder)
    except OSError as exc:
        for item in batch:
            item.result.error = f"making the download durable: {type(exc).__name__}: {exc}"
            item.result.mtime_ns = None
        return
    renamed: dict[str, list[FileResult]] = {}
    for item in batch:
        try:
            os.replace(item.part, item.dest)
        except OSError as exc:
            item.result.error = f"renaming {os.path.basename(item.part)} into place: {type(exc).__name__}: {exc}"
            item.result.mtime_ns = None
            continue
        for path in item.companions:
            Path(path).unlink(missing_ok=True)
        renamed.setdefault(os.path.dirname(item.dest), []).append(item.result)
    for folder, results in renamed.items():
        try:
            fsync_dir(folder)
        except OSError as exc:
            for result in results:
                result.error = f"fsync of {folder}: {exc}"
            continue
        for result in results:
            result.status = "downloaded"

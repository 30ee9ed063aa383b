"""Checksums computed as the bytes pass: sha256 always (it is recorded), md5 only when a catalog gives one."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

READ_BYTES = 4 * 1024 * 1024


class Digests:
    def __init__(self, md5: bool = False) -> None:
        self._sha256 = hashlib.sha256()
        # md5 has no CPU instruction to speed it up as sha256 has: computed only when a catalog gives one to check
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        # sha256's own method when it is alone: no Python call per block (blocks come 16 KiB at a time)
        self.update: Callable[[bytes | memoryview], None] = self._both if md5 else self._sha256.update

    def _both(self, block: bytes | memoryview) -> None:
        self._sha256.update(block)
        if self._md5 is not None:
            self._md5.update(block)

    def update_from(self, path: Path) -> int:
        """Feeds a file's bytes (kept from an earlier attempt); returns how many."""
        total = 0
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                self.update(block)
                total += len(block)
        return total

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def md5(self) -> str | None:
        return self._md5.hexdigest() if self._md5 is not None else None


def sha256_of(path: Path) -> str:
    """A whole file's sha256, read in large blocks."""
    digests = Digests()
    digests.update_from(path)
    return digests.sha256

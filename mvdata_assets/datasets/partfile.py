"""Where a `.part` is resumed: a download's bytes on their way, and the rules that say when they can be trusted.

A killed or broken download leaves `<file>.part`. Its bytes are resumed (`Range` + `If-Range`) only under a
validator recorded when they started to arrive: the answer's strong ETag, or else its Last-Modified date, kept in
`<file>.part.validator`. The server then answers 206 only if the file is unchanged, and 200 (start over) otherwise,
so a resumed file is never spliced from two versions. A `.part` without a validator, or already as big as the file
(nothing left to ask for; a 416 proves nothing), starts again from byte 0. A segmented download's `.part` (full
size, with holes) is resumed only by its own segment state (see segments.py). Plain Python.
"""

from __future__ import annotations

import os
from pathlib import Path

from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.files import FileResult, FileTask, Progress
from mvdata_assets.datasets.segments import STATE_SUFFIX
from mvdata_assets.datasets.transport import WRITE_BLOCKS, WRITE_BYTES, Request, Writer

# Bodies from this size on record their validator as they start, so that a killed process can resume them; smaller
# ones only when an attempt breaks (a file created per download would cost as much as a small file's transfer).
SIDECAR_BYTES = 1024 * 1024
VALIDATOR_SUFFIX = ".validator"  # added to the .part's name: where the validator of its bytes is kept


def validator_of(headers: dict[str, str]) -> str | None:
    """What `If-Range` may carry for this answer: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):  # a weak ETag is not allowed in If-Range
        return etag
    return headers.get("last-modified")


class PartFile:
    """A file's `.part`, its validator sidecar and other companions deleted with it."""

    def __init__(self, dest: Path, listed: bool) -> None:
        self.path = f"{dest}.part"  # a string: a Path per file costs more than the loop can spare for small files
        self.validator: str | None = None  # of the bytes in the .part
        self.companions: set[str] = set()  # files to delete with the .part (the sidecar once written)
        self.content: list[bytes] | None = None  # a whole body held in memory instead (see Body.close)
        self._listed = listed  # the .part was in its folder's listing: worth a stat
        self._read = False

    @property
    def validator_path(self) -> str:
        return self.path + VALIDATOR_SUFFIX

    @property
    def segments_path(self) -> str:
        """Where a segmented download keeps its state (see segments.py): a .part with one has holes."""
        return self.path + STATE_SUFFIX

    def resumable(self, size: int | None) -> int:
        """Bytes of the .part to resume from; one that cannot be trusted is deleted (0)."""
        if not self._listed:  # not there when the run started; an attempt of this run may leave one
            self._listed = True
            return 0
        try:
            have = os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
        if os.path.exists(self.segments_path):  # full size with holes: only its segments can resume it
            self.companions.add(self.segments_path)
            self.discard()
            return 0
        if not self._read:  # a .part from an earlier run: its sidecar, if any
            self._read = True
            try:
                self.validator = Path(self.validator_path).read_text() or None
                self.companions.add(self.validator_path)
            except FileNotFoundError:
                pass
        if self.validator is None or (size is not None and have >= size):
            self.discard()
            return 0
        return have

    def restart(self, validator: str | None, total: int | None) -> None:
        """A 200 answer: the .part starts over, and big files record their validator at once."""
        self.validator = validator
        if total is None or total >= SIDECAR_BYTES:
            self.keep_validator()

    def keep_validator(self) -> None:
        """The bytes in the .part may be resumed under its validator (without one, the sidecar goes)."""
        if self.validator:
            Path(self.validator_path).write_text(self.validator)
            self.companions.add(self.validator_path)
        elif self.validator_path in self.companions:  # an older validator would claim these bytes
            Path(self.validator_path).unlink(missing_ok=True)
            self.companions.discard(self.validator_path)

    def discard(self) -> None:
        for path in (self.path, *self.companions):
            Path(path).unlink(missing_ok=True)
        self.companions.clear()
        self.validator = None
        self.content = None


class Body:
    """Takes one answer's body into the .part: appended after a matching 206, from byte 0 after a 200."""

    def __init__(
        self, task: FileTask, part: PartFile, have: int, result: FileResult, progress: Progress | None
    ) -> None:
        self.task, self.part, self.have, self.result, self.progress = task, part, have, result, progress
        self.digests = Digests(md5=bool(task.md5))
        self.written = 0
        self.total: int | None = None
        self.fd: int | None = None
        self.blocks: list[bytes] = []  # received, hashed, not yet written
        self.buffered = 0
        self.taken = False
        self.resumed = False

    def begin(self, request: Request) -> Writer | None:
        headers = request.response_headers
        if request.status == 206 and self.have and headers.get("content-range", "").startswith(f"bytes {self.have}-"):
            self.resumed = True
            self.digests.update_from(Path(self.part.path))  # the kept bytes are part of the file's checksum
        elif request.status == 200:
            self.have = 0
        else:
            return None
        self.taken = True
        self.written = self.have
        length = headers.get("content-length")
        self.total = self.have + int(length) if length and length.isdigit() else self.task.size
        if request.status == 200:
            self.part.restart(validator_of(headers), self.total)
        return self.write

    def write(self, block: bytes) -> None:
        self.digests.update(block)
        self.blocks.append(block)
        self.buffered += len(block)
        if self.buffered >= WRITE_BYTES or len(self.blocks) >= WRITE_BLOCKS:
            self._flush()
        self.written += len(block)
        self.result.bytes_transferred += len(block)
        if self.progress:
            self.progress(self.task.url, self.written, self.total)

    def _flush(self) -> None:
        if self.fd is None:
            flags = os.O_APPEND if self.resumed else os.O_CREAT | os.O_TRUNC
            self.fd = os.open(self.part.path, os.O_WRONLY | flags, 0o644)
        if self.blocks and os.writev(self.fd, self.blocks) != self.buffered:
            raise OSError(f"short write to {self.part.path} (disk full?)")
        self.blocks, self.buffered = [], 0

    def close(self, complete: bool) -> None:
        """Writes what is left, also the bytes received before a break (kept for a resume). A body that arrived
        whole without touching the disk stays in memory as the part's `content`: the committer's thread creates its
        file, off the loop (creating a file costs about what receiving a small body does)."""
        if not self.taken:
            return
        if complete and self.fd is None and not self.resumed:
            self.part.content = self.blocks
            return
        try:
            self._flush()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

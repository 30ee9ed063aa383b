"""A big file fetched as several Range requests at once, hashed in order while the segments arrive.

Each segment writes its bytes at their offset in the `.part` file; the caller's thread follows the segments
in file order, reading back (from the page cache) what has arrived and feeding the sha256/md5, so the digest
is ready when the last byte lands. Progress per segment is kept in `<part>.segments.json`, written only after
the data it vouches for is on disk, so a killed download resumes every segment where it stood.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import urllib3

from mvdata_assets.datasets.digests import Digests

READ_BYTES = 1024 * 1024
SAVE_EVERY_BYTES = 64 * 1024 * 1024  # progress is made durable this often, or every SAVE_EVERY_S
SAVE_EVERY_S = 5.0


class RangesRefused(Exception):
    """The server answered a segment's Range request with something else than that range."""


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes of this segment on disk

    @property
    def finished(self) -> bool:
        return self.start + self.done >= self.end


class SegmentedTransfer:
    def __init__(self, http: urllib3.PoolManager, url: str, headers: dict[str, str], part: Path, size: int,
                 etag: str | None, segments: int) -> None:  # fmt: skip
        self.http, self.url, self.headers, self.part, self.size, self.etag = http, url, headers, part, size, etag
        self.state_path = part.with_name(part.name + ".segments.json")
        self.segments = self._resume_or_split(segments)
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.transferred = 0

    def _resume_or_split(self, count: int) -> list[Segment]:
        try:
            state = json.loads(self.state_path.read_text())
            if state["size"] == self.size and state["etag"] == self.etag and self.part.exists():
                return [Segment(*s) for s in state["segments"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        step = -(-self.size // count)
        with open(self.part, "wb") as f:
            f.truncate(self.size)
        return [Segment(start, min(start + step, self.size)) for start in range(0, self.size, step)]

    def _save(self) -> None:
        state = {"size": self.size, "etag": self.etag, "segments": [[s.start, s.end, s.done] for s in self.segments]}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def _fetch_segment(self, fd: int, segment: Segment) -> None:
        try:
            headers = dict(self.headers)
            headers["Range"] = f"bytes={segment.start + segment.done}-{segment.end - 1}"
            if self.etag:
                headers["If-Range"] = self.etag
            response = self.http.request("GET", self.url, headers=headers, preload_content=False)
            try:
                expected = f"bytes {segment.start + segment.done}-{segment.end - 1}/"
                if response.status != 206 or not response.headers.get("Content-Range", "").startswith(expected):
                    response.drain_conn()
                    raise RangesRefused(f"HTTP {response.status} to a segment's Range request")
                unsaved, saved_at = 0, time.monotonic()
                # a segment keeps going when another one breaks: the retry then fetches only the broken one's rest
                while block := response.read1(READ_BYTES, decode_content=False):
                    block = block[: segment.end - segment.start - segment.done]
                    os.pwrite(fd, block, segment.start + segment.done)
                    unsaved += len(block)
                    with self.changed:
                        segment.done += len(block)
                        self.transferred += len(block)
                        self.changed.notify_all()
                    if unsaved >= SAVE_EVERY_BYTES or time.monotonic() - saved_at >= SAVE_EVERY_S:
                        os.fdatasync(fd)  # the state file never vouches for bytes that are not on disk
                        with self.changed:
                            self._save()
                        unsaved, saved_at = 0, time.monotonic()
                if not segment.finished:
                    raise urllib3.exceptions.ProtocolError("segment body ended early")
            finally:
                response.release_conn()
        except BaseException as exc:  # handed to the hashing thread, which raises it
            with self.changed:
                self.error = self.error or exc
                self.changed.notify_all()

    def run(self, digests: Digests, progress: Callable[[int], None] | None = None) -> Digests:
        """Fetches the missing parts of every segment, feeding the whole file to `digests` in order."""
        fd = os.open(self.part, os.O_RDWR)
        workers = [
            threading.Thread(target=self._fetch_segment, args=(fd, s), daemon=True)
            for s in self.segments
            if not s.finished
        ]
        try:
            for worker in workers:
                worker.start()
            position = 0
            for segment in self.segments:
                while position < segment.end:
                    with self.changed:
                        while position >= segment.start + segment.done and not self.error:
                            self.changed.wait(1.0)
                        if self.error:
                            raise self.error
                        available = segment.start + segment.done
                    while position < available:
                        block = os.pread(fd, min(READ_BYTES * 4, available - position), position)
                        digests.update(block)
                        position += len(block)
                    if progress:
                        progress(position)
            os.fsync(fd)
        finally:
            for worker in workers:
                worker.join()
            os.fdatasync(fd)
            os.close(fd)
            self._save()
        self.state_path.unlink(missing_ok=True)
        return digests

"""A big file fetched as several Range requests at once, hashed in order while the segments arrive.

The segments are requests on the downloader's `CurlLoop`: each writes its bytes at their offset in the `.part`. A
helper thread follows the segments in file order, reading back (from the page cache) what has arrived and feeding
the sha256/md5, so the digest is ready when the last byte lands; hashing there keeps the second core busy and the
loop free for the sockets. The same thread keeps the progress per segment in `<part>.segments.json`, written only
after an fdatasync of the data it vouches for, so a killed download resumes every segment where it stood.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.transport import Request, TransientError, Writer, refusal

READ_BYTES = 4 * 1024 * 1024
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


class _SegmentBody:
    """Takes one segment's answer: only a 206 for exactly its range, written at its offset."""

    def __init__(self, transfer: SegmentedTransfer, fd: int, segment: Segment) -> None:
        self.transfer, self.fd, self.segment = transfer, fd, segment

    def begin(self, request: Request) -> Writer | None:
        segment = self.segment
        expected = f"bytes {segment.start + segment.done}-{segment.end - 1}/"
        if request.status == 206 and request.response_headers.get("content-range", "").startswith(expected):
            return self.write
        if request.status in (200, 206, 416):  # the whole file or another range: abort rather than read it all
            raise RangesRefused(f"HTTP {request.status} to a segment's Range request")
        return None  # an error answer: the job decides from its status

    def write(self, block: bytes) -> None:
        segment, transfer = self.segment, self.transfer
        block = block[: segment.end - segment.start - segment.done]
        os.pwrite(self.fd, block, segment.start + segment.done)
        with transfer.changed:
            segment.done += len(block)
            transfer.transferred += len(block)
            transfer.changed.notify_all()


class SegmentedTransfer:
    def __init__(self, url: str, headers: list[str], part: Path, size: int, etag: str | None, segments: int) -> None:
        self.url, self.headers, self.part, self.size, self.etag = url, headers, part, size, etag
        self.state_path = part.with_name(part.name + ".segments.json")
        self.segments = self._resume_or_split(segments)
        self.changed = threading.Condition()
        self.stopped = False
        self.error: BaseException | None = None  # the hashing thread's, raised by `run`
        self.transferred = 0
        self._saved_at, self._saved_bytes = time.monotonic(), 0

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

    def _save(self, done: list[int]) -> None:
        segments = [[s.start, s.end, d] for s, d in zip(self.segments, done, strict=True)]
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps({"size": self.size, "etag": self.etag, "segments": segments}))
        os.replace(tmp, self.state_path)

    def _checkpoint(self, fd: int) -> None:
        """Progress saved for a resume; the fdatasync first, so the state never vouches for bytes not on disk."""
        with self.changed:
            done, transferred = [s.done for s in self.segments], self.transferred
        os.fdatasync(fd)
        self._save(done)
        self._saved_at, self._saved_bytes = time.monotonic(), transferred

    def _checkpoint_due(self) -> bool:
        unsaved = self.transferred - self._saved_bytes
        return unsaved >= SAVE_EVERY_BYTES or (unsaved > 0 and time.monotonic() - self._saved_at >= SAVE_EVERY_S)

    def _follow(self, fd: int, digests: Digests, progress: Callable[[int], None] | None) -> None:
        """Hashes the file in order as the segments fill it, saving progress on the way (its own thread)."""
        try:
            position = 0
            for segment in self.segments:
                while position < segment.end:
                    with self.changed:
                        while not (self.stopped or position < segment.start + segment.done or self._checkpoint_due()):
                            self.changed.wait(SAVE_EVERY_S)
                        if self.stopped:
                            return
                        available = segment.start + segment.done
                    if self._checkpoint_due():
                        self._checkpoint(fd)
                    if position < available:
                        while position < available:
                            block = os.pread(fd, min(READ_BYTES, available - position), position)
                            digests.update(block)
                            position += len(block)
                        if progress:
                            progress(position)
        except BaseException as exc:  # raised by `run` once the requests are finished
            self.error = exc

    def run(
        self, digests: Digests, progress: Callable[[int], None] | None = None
    ) -> Generator[list[Request], list[Request], Digests]:
        """Fetches the missing parts of every segment (a job step on the loop), feeding the whole file to `digests`."""
        fd = os.open(self.part, os.O_RDWR)
        follower = threading.Thread(target=self._follow, args=(fd, digests, progress), daemon=True)
        follower.start()
        finished = False
        try:
            requests = yield [
                Request(self.url, [*self.headers, *self._range(s)], _SegmentBody(self, fd, s))
                for s in self.segments
                if not s.finished
            ]
            for request in requests:  # a segment kept going when another broke: the retry fetches the rest only
                if request.failure is not None:
                    raise request.failure
                if not request.taken:
                    raise refusal(request, self.url)
                if request.error:
                    raise TransientError(f"a segment broke: {request.error}")
            if not all(s.finished for s in self.segments):
                raise TransientError("a segment's body ended early")
            follower.join()
            if self.error is not None:
                raise self.error
            finished = True
        finally:
            with self.changed:
                self.stopped = True
                self.changed.notify_all()
            follower.join()
            if not finished:
                self._checkpoint(fd)
            os.close(fd)
        return digests

    def _range(self, segment: Segment) -> list[str]:
        headers = [f"Range: bytes={segment.start + segment.done}-{segment.end - 1}"]
        return [*headers, f"If-Range: {self.etag}"] if self.etag else headers

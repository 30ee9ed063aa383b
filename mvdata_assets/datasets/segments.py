"""A big file fetched as several Range requests at once, hashed in order while the segments arrive.

The file is cut into segments of `segment_bytes` (8 MiB by default), fetched in file order by `connections` threads
at once, each on a keep-alive `http.client` connection of its own, each writing its bytes at their offset in the
`.part` with O_DIRECT where the file system allows it. The file's job on the downloader's loop follows the segments
in file order and feeds each buffer to the digest, so the checksum is ready when the last byte lands and no byte is
read twice. Why segments in file order, why not libcurl here, and what it costs: docs/architecture.md.

Progress per segment is kept in `<part>.segments.json`: written before the `.part` exists, then only after an
fdatasync of the bytes it vouches for, and trusted only under the file's validator (If-Range), so a killed download
resumes each segment where it stood and a changed file starts over.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path

from mvdata_assets.datasets import durable
from mvdata_assets.datasets.addresses import CATALOG, AddressPolicy
from mvdata_assets.datasets.connections import Connections
from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.transport import USER_AGENT, TransientError, status_error

# A receive buffer is written to the .part, then hashed, each time it is full; a connection may run this many buffers
# ahead of the digest before it waits (fewer, bigger buffers cost less CPU: bench/README.md)
RECEIVE_BYTES = 4 * 1024 * 1024
BUFFERS_PER_CONNECTION = 4
FILL_S = 1.0  # a buffer filling longer than this is written (and its bytes can be saved) before it is full
ALIGN = 4096  # O_DIRECT writes start, end and sit in memory on such boundaries
# Writes that go through the page cache (heads and tails off those boundaries, or all of them where O_DIRECT is
# refused) are cut into pieces of this size: a 1 MiB write makes the page cache take 1 MiB folios, which a machine
# that hands free memory back (a VM) must fault in again on first touch
WRITE_PIECE_BYTES = 64 * 1024
READ_BYTES = 4 * 1024 * 1024  # what a resumed download re-reads (and hashes) per step of the job
POLL_S = 0.005  # how often the job looks for new bytes when it has hashed all there was
SAVE_EVERY_BYTES = 64 * 1024 * 1024  # progress is made durable this often, or every SAVE_EVERY_S
SAVE_EVERY_S = 5.0
STALE_TARGET_STATUSES = {401, 403, 404, 410}  # from a redirect's target: asked again through the first URL
MAX_SEGMENTS = 1024  # bigger files get bigger segments: fewer requests, and a state file that stays small


class RangesRefused(Exception):
    """The server answered a segment's Range request with something else than that range."""


class Stopped(Exception):
    """The download was abandoned (the loop stopped): a segment's transfer ends here."""


# a received buffer waiting for the digest: the buffer, how much of it was filled, whose it is
_Block = tuple[memoryview, int, "_Buffers"]


@dataclass
class Segment:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes of this segment on disk
    received: int = 0  # body bytes that crossed the network in this attempt
    earlier: int = 0  # bytes on disk before this attempt: the digest reads them back
    blocks: deque[_Block] = field(default_factory=deque)  # appended by its connection's thread, taken by the digest

    @property
    def finished(self) -> bool:
        return self.start + self.done >= self.end


class _Buffers:
    """One connection's receive buffers, page-aligned for O_DIRECT. A buffer comes back once the digest has read it,
    so a connection runs at most BUFFERS_PER_CONNECTION buffers ahead of the digest. This cannot deadlock: the
    connection holding the segment the digest waits for has no older bytes left unread, so its buffers keep
    coming back; once a segment has failed the digest stops, and a connection waiting for a buffer gives up."""

    def __init__(self, count: int, size: int) -> None:
        memory = memoryview(mmap.mmap(-1, count * size))  # anonymous maps start on a page
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for at in range(0, count * size, size):
            self._free.put(memory[at : at + size])

    def take(self, stopped: Callable[[], bool]) -> memoryview:
        while True:
            try:
                return self._free.get(timeout=POLL_S * 10)
            except queue.Empty:
                if stopped():
                    raise Stopped from None

    def give_back(self, buffer: memoryview) -> None:
        self._free.put(buffer)


STATE_SUFFIX = ".segments.json"  # added to the .part's name: where a segmented download keeps its progress


class SegmentedTransfer:
    def __init__(
        self,
        url: str,
        headers: list[str],
        part: Path,
        size: int,
        validator: str | None,
        *,
        connections: int,
        segment_bytes: int,
        timeout_s: float,
        addresses: AddressPolicy = CATALOG,
    ) -> None:
        self.url, self.headers, self.part, self.size, self.validator = url, headers, part, size, validator
        self.connections, self.timeout_s, self.addresses = connections, timeout_s, addresses
        self.state_path = part.with_name(part.name + STATE_SUFFIX)
        self.segments = self._resume_or_split(segment_bytes)
        self.stopped = False
        self.errors: list[BaseException] = []
        self._redirected_to: str | None = None  # where the redirects of a segment's request led
        self._fd = -1
        self._direct_fd = -1  # the .part opened with O_DIRECT, where the file system allows it
        self._direct = False  # whether writes still go through it
        self._saving = threading.Lock()
        self._saved_at, self._saved_bytes = time.monotonic(), 0

    @property
    def transferred(self) -> int:
        return sum(s.received for s in self.segments)

    def _resume_or_split(self, segment_bytes: int) -> list[Segment]:
        """The segments an earlier attempt left, if they are this file's version; else fresh ones.

        A fresh split's state is on disk before its .part exists: a full-size .part (holes and all) is never left
        without the state that says which of its bytes are real.
        """
        if self.validator:  # without one, the bytes kept may be another version's
            try:
                state = json.loads(self.state_path.read_text())
                if (state["size"], state["validator"]) == (self.size, self.validator) and self.part.exists():
                    return [Segment(*s) for s in state["segments"]]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        step = max(1, segment_bytes, -(-self.size // MAX_SEGMENTS))
        segments = [Segment(start, min(start + step, self.size)) for start in range(0, self.size, step)]
        self.part.unlink(missing_ok=True)
        self._save(segments)
        durable.fsync_dir(self.part.parent)
        with open(self.part, "wb") as f:
            f.truncate(self.size)
        return segments

    def checkpoint_due(self) -> bool:
        unsaved = self.transferred - self._saved_bytes
        return unsaved >= SAVE_EVERY_BYTES or (unsaved > 0 and time.monotonic() - self._saved_at >= SAVE_EVERY_S)

    def checkpoint(self, wait: bool = False) -> None:
        """Progress saved for a resume: the state never vouches for bytes an fdatasync has not put on disk."""
        if not self._saving.acquire(blocking=wait):
            return  # another segment is saving it
        try:
            transferred = self.transferred
            done = [Segment(s.start, s.end, s.done) for s in self.segments]
            os.fdatasync(self._fd)
            self._save(done)
            self._saved_at, self._saved_bytes = time.monotonic(), transferred
        finally:
            self._saving.release()

    def _save(self, segments: list[Segment]) -> None:
        state = {
            "size": self.size,
            "validator": self.validator,
            "segments": [[s.start, s.end, s.done] for s in segments],
        }
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(state))
            os.fdatasync(f.fileno())
        os.replace(tmp, self.state_path)

    def _work(self, todo: deque[Segment]) -> None:
        """One connection's thread: the next segment in file order until none is left, or one has failed (the others
        then finish the segments they hold, and the retry fetches only what is missing)."""
        connections = Connections(self.timeout_s, self.addresses)
        buffers = _Buffers(BUFFERS_PER_CONNECTION, RECEIVE_BYTES)  # per thread, not per segment: fresh memory is dear
        try:
            while not self.errors and not self.stopped:
                try:
                    segment = todo.popleft()
                except IndexError:
                    return
                self._fetch(segment, connections, buffers)
        finally:
            connections.close()

    def _fetch(self, segment: Segment, connections: Connections, buffers: _Buffers) -> None:
        """One segment's request; what went wrong is left in `errors`."""
        lines = [*self.headers, *self._range(segment)]
        headers = {"User-Agent": USER_AGENT, **dict(line.split(": ", 1) for line in lines)}
        try:
            connection, response = self._get(connections, headers)
            try:
                expected = f"bytes {segment.start + segment.done}-{segment.end - 1}/"
                if response.status == 206 and (response.getheader("content-range") or "").startswith(expected):
                    self._receive(segment, response, buffers)
                elif response.status in (200, 206, 416):  # the whole file or another range: not read at all
                    raise RangesRefused(f"HTTP {response.status} to a segment's Range request")
                else:
                    error = status_error(response.status, self.url, response.getheader("retry-after"))
                    raise error or TransientError(f"unexpected HTTP {response.status}")
                if not segment.finished:
                    raise TransientError("a segment's body ended early")
                response.close()  # read to its end (through its buffer, bypassing its count): the connection is free
            finally:
                connections.put_back(connection, response)  # closed unless its answer was read whole
        except (OSError, HTTPException) as exc:
            self.errors.append(TransientError(f"a segment broke: {type(exc).__name__}: {exc}"))
        except BaseException as exc:
            self.errors.append(exc)

    def _get(self, connections: Connections, headers: dict[str, str]) -> tuple[HTTPConnection, HTTPResponse]:
        """A segment's GET, straight to where the first one's redirects led (a signed CDN address, say): a GiB in
        segments would otherwise ask the first host (Hugging Face's resolver, with its rate limits) 128 times."""
        direct = self._redirected_to
        if direct is not None:
            connection, response, _ = connections.get(direct, headers, first=self.url)
            if response.status not in STALE_TARGET_STATUSES:
                return connection, response
            connections.discard(connection)  # a signed address may have expired: the first URL is asked again
            self._redirected_to = None
        connection, response, answered = connections.get(self.url, headers)
        if answered != self.url:
            self._redirected_to = answered
        return connection, response

    def _receive(self, segment: Segment, response: HTTPResponse, buffers: _Buffers) -> None:
        """The body, a buffer at a time, each written at its offset and handed to the digest; what came before a break
        is kept too."""
        # one socket read per call, into the buffer (response.readinto would lose a partly filled buffer on a reset)
        read = response.readinto if response.chunked else response.fp.readinto1
        left = segment.end - segment.start - segment.done
        while left:
            offset = segment.start + segment.done
            # the digest stops taking buffers once a segment has failed: this one then ends here, its bytes so far kept
            buffer = buffers.take(lambda: self.stopped or bool(self.errors))
            # a resumed segment may start off an O_DIRECT boundary: a short first fill reaches the next one
            want, filled = min(RECEIVE_BYTES, left, -offset % ALIGN or RECEIVE_BYTES), 0
            began = time.monotonic()
            try:
                while filled < want:
                    if self.stopped:
                        raise Stopped
                    got = read(buffer[filled:want])
                    if not got:
                        return
                    filled += got
                    if time.monotonic() - began > FILL_S:  # a slow link: the buffer goes at the next page boundary
                        want = min(want, -(-filled // ALIGN) * ALIGN)
            finally:
                if filled:
                    self._write(buffer[:filled], offset)
                    segment.blocks.append((buffer, filled, buffers))
                    segment.done += filled
                    segment.received += filled
                else:
                    buffers.give_back(buffer)
            left -= filled
            if self.checkpoint_due():
                self.checkpoint()

    def _write(self, data: memoryview, offset: int) -> None:
        """Whole pages at a page boundary go with O_DIRECT: no copy into the page cache, and the final sync finds
        them on disk already (docs/architecture.md); what is left over goes through the cache."""
        direct = len(data) - len(data) % ALIGN if self._direct and offset % ALIGN == 0 else 0
        if direct:
            try:
                self._pwrite(self._direct_fd, data[:direct], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # opened, yet refused (a file system's limits): the cache from here on
                direct = 0
        for at in range(direct, len(data), WRITE_PIECE_BYTES):
            self._pwrite(self._fd, data[at : at + WRITE_PIECE_BYTES], offset + at)

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(f"short write to {self.part} (disk full?)")

    def run(self, digests: Digests, progress: Callable[[int], None] | None = None) -> Generator[float, None, Digests]:
        """Fetches the missing parts of every segment, feeding the whole file to `digests` (a job on the loop)."""
        self._fd = os.open(self.part, os.O_RDWR)
        self._direct_fd = _open_direct(self.part)
        self._direct = self._direct_fd >= 0
        for segment in self.segments:
            segment.earlier = segment.done
        todo = deque(s for s in self.segments if not s.finished)  # popleft is atomic: no lock among the threads
        workers = [
            threading.Thread(target=self._work, args=(todo,), name="mvdata-segment", daemon=True)
            for _ in range(min(self.connections, len(todo)))
        ]
        for worker in workers:
            worker.start()
        finished = False
        read_buffer = memoryview(bytearray(READ_BYTES)) if any(s.earlier for s in self.segments) else None
        try:
            position = 0
            for segment in self.segments:
                if self.errors:
                    break
                if segment.earlier:
                    assert read_buffer is not None
                    position = yield from self._hash_earlier(segment, read_buffer, digests, progress)
                while position < segment.end and not self.errors:
                    if segment.blocks:
                        buffer, filled, owner = segment.blocks.popleft()
                        digests.update(buffer[:filled])
                        owner.give_back(buffer)
                        position += filled
                        if progress:
                            progress(position)
                        yield 0  # the other files' turn
                    elif any(worker.is_alive() for worker in workers):
                        yield POLL_S
                    else:
                        break
            # when a segment broke, the others go on until they need a buffer back: the retry fetches what is missing
            while any(worker.is_alive() for worker in workers):
                yield POLL_S
            if self.errors:
                raise next((e for e in self.errors if isinstance(e, RangesRefused)), self.errors[0])
            if position < self.size:
                raise TransientError("a segment's body ended early")
            finished = True
        finally:
            self.stopped = True  # ends the transfers early when the job is abandoned
            for worker in workers:
                worker.join()
            if not finished:
                self.checkpoint(wait=True)
            os.close(self._fd)
            if self._direct_fd >= 0:
                os.close(self._direct_fd)
        return digests

    def _hash_earlier(
        self, segment: Segment, buffer: memoryview, digests: Digests, progress: Callable[[int], None] | None
    ) -> Generator[float, None, int]:
        """The bytes an earlier attempt left of a segment, read back from the .part."""
        position, end = segment.start, segment.start + segment.earlier
        while position < end:
            block = buffer[: min(len(buffer), end - position)]
            if os.preadv(self._fd, [block], position) != len(block):
                raise OSError(f"{self.part} is shorter than its segments say")
            digests.update(block)
            position += len(block)
            if progress:
                progress(position)
            yield 0
        return position

    def _range(self, segment: Segment) -> list[str]:
        headers = [f"Range: bytes={segment.start + segment.done}-{segment.end - 1}"]
        return [*headers, f"If-Range: {self.validator}"] if self.validator else headers


def _open_direct(path: Path) -> int:
    """`path` opened for O_DIRECT writes, or -1 where the file system (tmpfs, some FUSE) or the platform has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return -1

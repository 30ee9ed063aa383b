"""HTTP for the downloader: one thread drives every transfer through libcurl's multi interface (pycurl).

Why not a thread per transfer (urllib3, requests): each request costs hundreds of microseconds of Python,
serialised by the GIL, so threads fetch a small fraction of the files per second that `curl -Z` does. Here libcurl
parses HTTP, pools connections and follows redirects (dropping a custom Authorization header when a redirect leaves
the host); what is left in Python per transfer is a few calls to start and finish it and one per body block of up to
16 KiB (none for a body gathered whole).

The downloader keeps its per-file logic (resume, retry, verify) as plain sequential code: each file is a generator
that yields what it waits for - a `Request`, or a pause in seconds - and `CurlLoop.run` resumes it with the finished
request, or after the pause. A request may ask for its body whole (`whole_up_to`): libcurl then appends its blocks
to a list itself (no Python call per block) and the sink gets it as one block when the transfer ends. Nothing here
imports Dagster.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import pycurl

from mvdata_assets.datasets.addresses import CATALOG, AddressPolicy

USER_AGENT = "mvdata-assets/0.1"
MAX_REDIRECTS = 10
BUFFER_BYTES = 256 * 1024  # libcurl's receive buffer (its default is 16 KiB)
# libcurl hands a body over 16 KiB at a time at most: sinks write it to disk a MiB at a time, or after this many blocks
# (writev's IOV_MAX), whichever comes first
WRITE_BYTES = 1024 * 1024
WRITE_BLOCKS = 1024
PERMANENT_STATUSES = {400, 401, 403, 404, 405, 410, 451}
PERMANENT_CURL_ERRORS = {pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT, pycurl.E_TOO_MANY_REDIRECTS}
BODY_TOO_BIG = pycurl.E_FILESIZE_EXCEEDED  # the error code of a gathered body that grew past `whole_up_to`
WEB = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS

Writer = Callable[[bytes], None]
Job = Generator[Any, Any, None]  # yields a Request (and is sent it back, finished) or a pause in seconds


class PermanentError(Exception):
    """Retrying will not help (404, 403, 410, a checksum that keeps mismatching)."""


class TransientError(Exception):
    """Worth another attempt (timeouts, resets, 5xx, 429); `retry_after` is the server's wish in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Sink(Protocol):
    def begin(self, request: Request) -> Writer | None:
        """Called once the final answer's headers are in: the function taking the body, or None to drop it."""


@dataclass(eq=False)
class Request:
    """One GET (HEAD without a sink), and once finished what came back."""

    url: str
    headers: list[str]
    sink: Sink | None = None
    # > 0: the body is gathered in memory by libcurl and handed to the sink whole when the transfer ends (also when it
    # broke: the bytes received); a body growing past this many bytes ends the transfer (E_FILESIZE_EXCEEDED)
    whole_up_to: int = 0
    status: int = 0  # of the final answer, after redirects; 0 when none came
    error: str | None = None  # why libcurl ended the transfer early (reset, timeout, ...); None if it completed
    error_code: int = 0
    failure: BaseException | None = None  # what the sink raised; the transfer was aborted there
    blocked: str | None = None  # why the address connected to was refused (see addresses.py); the transfer ended
    last_seen: float = 0.0  # time.monotonic() of the last body block received (or of the start)
    _begun: bool = False
    _writer: Writer | None = None
    # the header lines received, appended by libcurl itself (list.append: no Python call per line)
    _lines: list[bytes] = field(default_factory=list)
    _head: bytes = b""  # the final answer's header lines, without its status line, once the answer began
    _headers: dict[str, str] | None = None  # those parsed, when first asked for
    _gathered: list[bytes] | None = None  # the body so far, with `whole_up_to`
    _gathered_seen: int = 0  # its block count when the stall timer last looked

    @property
    def taken(self) -> bool:
        """The sink accepted this answer's body."""
        return self._writer is not None

    @property
    def response_headers(self) -> dict[str, str]:
        """The final answer's headers, names in lower case."""
        if self._headers is None:
            self._headers = {}
            for line in self._head.decode("latin-1").splitlines():
                name, colon, value = line.partition(":")
                if colon:
                    self._headers[name.strip().lower()] = value.strip()
        return self._headers

    def _begin(self, take: bool = True) -> None:
        """The final answer's headers are in: its status, and (when `take`) whether the sink takes its body."""
        self._begun = True
        try:
            block = b"".join(self._lines)
            at = block.rfind(b"\nHTTP/") + 1  # after redirects the last answer counts: the last status line
            if block.startswith(b"HTTP/", at):
                status_line, _, self._head = block[at:].partition(b"\n")
                self.status = int(status_line.split(None, 2)[1])
            if take and self.sink is not None and self.status:
                self._writer = self.sink.begin(self)
        except BaseException as exc:  # pycurl would only print it: kept to be raised in the job
            self.failure = exc

    def _on_body(self, data: bytes) -> int | None:
        self.last_seen = time.monotonic()
        if not self._begun:
            self._begin()
        if self._writer is None:
            return 0 if self.failure else None  # an error answer's body is read and dropped: the connection stays
        try:
            self._writer(data)
        except BaseException as exc:
            self.failure = exc
            return 0
        return None

    def _hand_over(self, code: int) -> None:
        """The transfer ended: the sink learns about the answer, and gets a gathered body in one block."""
        body, self._gathered = self._gathered, None
        if body:
            self._on_body(b"".join(body))
        elif not self._begun:  # no body: the sink still learns about an answer that came whole
            self._begin(take=not code)


def retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def status_error(status: int, url: str, retry_after_header: str | None) -> PermanentError | TransientError | None:
    """What an error status means for its file (None: not one of those)."""
    if status in PERMANENT_STATUSES:
        return PermanentError(f"HTTP {status} for {url}")
    if status == 429 or status >= 500:
        return TransientError(f"HTTP {status}", retry_after(retry_after_header))
    return None


def refusal(request: Request, url: str) -> PermanentError | TransientError:
    """What a finished request that delivered no body means for its file: its status first, then how libcurl ended
    it."""
    if request.blocked:
        return PermanentError(f"refused to connect for {url}: {request.blocked}")
    status_problem = status_error(request.status, url, request.response_headers.get("retry-after"))
    if status_problem is not None:
        return status_problem
    if request.error_code in PERMANENT_CURL_ERRORS:
        return PermanentError(f"{request.error} for {url}")
    if request.error:
        return TransientError(request.error)
    return TransientError(f"unexpected HTTP {request.status}")


class CurlLoop:
    """Runs download jobs over one libcurl multi handle: pooled keep-alive connections, one thread."""

    def __init__(
        self, *, timeout_s: float, max_host_connections: int | None = None, addresses: AddressPolicy = CATALOG
    ) -> None:
        self.timeout_s = timeout_s
        self.addresses = addresses
        self._multi = pycurl.CurlMulti()  # no connection limit of its own: the jobs running at once bound them
        # many hosts at once (image lists): spare each one. Transfers over the limit wait here, not in libcurl, so
        # that their stall timer starts when they do; libcurl keeps the same limit for hosts reached by redirects
        self._per_host = max_host_connections or 0
        if self._per_host:
            self._multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, self._per_host)
        self._host_running: dict[str, int] = {}
        self._host_waiting: dict[str, deque[tuple[Request, Job]]] = {}
        self._idle: list[pycurl.Curl] = []  # easy handles are reused: their set-up is not repeated per file
        self._running: dict[pycurl.Curl, tuple[Request, Job]] = {}

    def __enter__(self) -> CurlLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._idle:
            handle.close()
        self._multi.close()

    def _handle(self) -> pycurl.Curl:
        if self._idle:
            return self._idle.pop()
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.USERAGENT, USER_AGENT)
        handle.setopt(pycurl.FOLLOWLOCATION, 1)
        handle.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
        handle.setopt(pycurl.PROTOCOLS, WEB)
        handle.setopt(pycurl.REDIR_PROTOCOLS, WEB)
        # a transfer per connection (HTTP/2 would multiplex a host's transfers over one TCP connection)
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.BUFFERSIZE, BUFFER_BYTES)
        # called once connected (or reusing a connection), before each request of a transfer, redirects included:
        # the address checked is the one DNS gave and the socket reached
        handle.setopt(pycurl.PREREQFUNCTION, lambda ip, *_: self._admit(handle, ip))
        return handle

    def _admit(self, handle: pycurl.Curl, ip: str) -> int:
        reason = self.addresses.refusal(ip)
        if reason is None:
            return pycurl.PREREQFUNC_OK
        self._running[handle][0].blocked = reason
        return pycurl.PREREQFUNC_ABORT

    def _start(self, request: Request, job: Job) -> None:
        if self._per_host:
            host = _host(request.url)
            running = self._host_running.get(host, 0)
            if running >= self._per_host:
                self._host_waiting.setdefault(host, deque()).append((request, job))
                return
            self._host_running[host] = running + 1
        handle = self._handle()
        handle.setopt(pycurl.URL, request.url)
        handle.setopt(pycurl.HTTPHEADER, request.headers)
        if request.sink is None:
            handle.setopt(pycurl.NOBODY, 1)
        else:
            handle.setopt(pycurl.HTTPGET, 1)
        handle.setopt(pycurl.HEADERFUNCTION, request._lines.append)
        if request.whole_up_to:
            request._gathered = []
            handle.setopt(pycurl.WRITEFUNCTION, request._gathered.append)
        else:
            handle.setopt(pycurl.WRITEFUNCTION, request._on_body)
        handle.setopt(pycurl.MAXFILESIZE_LARGE, request.whole_up_to)  # 0: no limit (handles are reused)
        request.last_seen = time.monotonic()
        self._multi.add_handle(handle)
        self._running[handle] = (request, job)

    def _finish(self, handle: pycurl.Curl, code: int = 0, message: str = "") -> tuple[Job, Request]:
        """Hands a finished transfer to its request: the job to resume with it."""
        self._multi.remove_handle(handle)
        request, job = self._running.pop(handle)
        self._idle.append(handle)
        if self._per_host:  # its host's next waiting transfer takes the freed place
            host = _host(request.url)
            self._host_running[host] -= 1
            waiting = self._host_waiting.get(host)
            if waiting:
                self._start(*waiting.popleft())
        if code and request.failure is None:
            request.error_code = code
            request.error = f"timed out ({message})" if code == pycurl.E_OPERATION_TIMEDOUT else message
        request._hand_over(code)
        return job, request

    def _expire(self) -> list[tuple[Job, Request]]:
        """Ends the transfers that received nothing for `timeout_s`.

        By hand, because libcurl's nearest option (LOW_SPEED_TIME) counts whole seconds and averages the speed over
        the last ~5 s, so a body that stops dead is noticed seconds late. A gathered body (no Python call per block)
        counts as moving if it grew since the last look, so it is timed out up to one look (`scan_every`) late.
        """
        now = time.monotonic()
        for request, _ in self._running.values():
            gathered = request._gathered
            if gathered is not None and len(gathered) != request._gathered_seen:
                request._gathered_seen, request.last_seen = len(gathered), now
        deadline = now - self.timeout_s
        stalled = [handle for handle, (request, _) in self._running.items() if request.last_seen < deadline]
        message = f"no data for {self.timeout_s:g} s"
        return [self._finish(handle, pycurl.E_OPERATION_TIMEDOUT, message) for handle in stalled]

    def run(self, jobs: Iterable[Job], at_once: int) -> None:
        """Runs the jobs, at most `at_once` of them transferring, until every one has finished."""
        queue = iter(jobs)
        queued = True  # jobs may be left in `queue`
        active: set[Job] = set()
        timers: list[tuple[float, int, Job]] = []
        order = itertools.count()
        scan_every = min(1.0, self.timeout_s / 5)
        next_scan = time.monotonic() + scan_every

        def advance(job: Job, value: Request | None) -> None:
            try:
                op = job.send(value)
            except StopIteration:
                active.discard(job)
                return
            if isinstance(op, Request):
                self._start(op, job)
            else:
                heapq.heappush(timers, (time.monotonic() + op, next(order), job))

        try:
            while True:
                while queued and len(active) - len(timers) < at_once:  # a paused job holds no slot
                    job = next(queue, None)
                    if job is None:
                        queued = False
                        break
                    active.add(job)
                    advance(job, None)
                if not active:
                    return
                self._multi.perform()
                left = 1
                while left:
                    left, done, failed = self._multi.info_read()
                    finished = [self._finish(handle) for handle in done]
                    finished += [self._finish(handle, code, message) for handle, code, message in failed]
                    if time.monotonic() >= next_scan:
                        finished += self._expire()
                        next_scan = time.monotonic() + scan_every
                    for job, request in finished:
                        advance(job, request)
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    advance(heapq.heappop(timers)[2], None)
                pause = self._multi.timeout() / 1000  # libcurl's next deadline; -1 ms when it has none
                pause = min(1.0 if pause < 0 else pause, next_scan - now)
                if timers:
                    pause = min(pause, timers[0][0] - now)
                if pause > 0 and not (queued and len(active) - len(timers) < at_once):
                    self._multi.select(pause)
        finally:
            for handle in list(self._running):
                self._multi.remove_handle(handle)
                self._idle.append(handle)
            self._running.clear()
            self._host_running.clear()
            self._host_waiting.clear()
            for job in active:
                job.close()  # their `finally` blocks close files and save segment state


def _host(url: str) -> str:
    """The host and port a URL connects to, as libcurl counts its per-host limit."""
    return urlsplit(url).netloc.rpartition("@")[2].lower()

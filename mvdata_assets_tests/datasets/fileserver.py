"""A real HTTP/1.1 file server on 127.0.0.1 that behaves like dataset hosts and injects faults on demand.

Download code is tested against it over real sockets, so retries, resumption, timeouts and checksum handling meet the
same failures they meet on S3, images.cocodataset.org or Hugging Face: 5xx/429 answers, connections reset mid-body,
short bodies, hosts that ignore ``Range``, lying ``Content-Length``, slow and stalled transfers, corrupted bytes.

Usage::

    with FileServer() as server:
        url = server.add("coco/val2017.zip", data)
        server.fault("coco/val2017.zip", "reset", after=1000)   # the next GET is cut after 1000 body bytes
        ...                                                      # run the code under test against `url`
        assert server.bytes_sent("coco/val2017.zip") == ...

or, in pytest, the ``file_server`` fixture below (import it into the test module or a conftest).

Only the standard library is used (``ThreadingHTTPServer``, one thread per connection, keep-alive). Bodies are written
from memory in large slices, or with ``socket.sendfile`` for files on disk, so the server is not the bottleneck.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import select
import socket
import socketserver
import struct
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.client import responses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import pytest

__all__ = ["FAULT_KINDS", "FileServer", "Headers", "Request", "file_server"]

_CHUNK = 1 << 20  # body bytes per write()/sendfile() call: large enough to keep loopback transfers fast
_SMALL = 64 << 10  # bodies up to this size go out in the same write as the headers
_SENDFILE_CHUNK = 8 << 20

# kind -> (required params, optional params with defaults)
_FAULT_PARAMS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "status": (("status",), {"retry_after": None, "headers": None, "body": None}),
    "reset": ((), {"after": 0}),
    "truncate": ((), {"after": 0}),
    "ignore_range": ((), {}),
    "wrong_length": (("length",), {"send": "body"}),
    "no_length": ((), {}),
    "drip": (("rate",), {"chunk": None}),
    "delay": (("seconds",), {}),
    "stall": (("seconds",), {"after": 0}),
    "corrupt": ((), {"offset": None, "count": 1}),
    "disconnect": ((), {}),
}
FAULT_KINDS: frozenset[str] = frozenset(_FAULT_PARAMS)


class Headers(dict[str, str]):
    """A ``dict`` of HTTP headers, case-insensitive (keys stored lower-cased); repeated headers joined by ", "."""

    def __init__(self, items: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        super().__init__()
        self.update(items)

    def update(self, items: Iterable[tuple[str, str]] | Mapping[str, str] = (), /, **kwargs: str) -> None:  # type: ignore[override]
        pairs = items.items() if isinstance(items, Mapping) else items
        for key, value in itertools.chain(pairs, kwargs.items()):
            lower = key.lower()
            super().__setitem__(lower, f"{super().__getitem__(lower)}, {value}" if lower in self else value)

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key.lower(), value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


@dataclass(eq=False)
class Request:
    """One GET/HEAD the server received, and what it answered (filled in while the answer is written)."""

    method: str
    path: str  # request path as sent (percent-encoded), without the query string
    query: str
    name: str  # decoded path without the leading "/": the name given to add()/fault()/redirect()
    headers: Headers
    time: float  # time.monotonic() when the request arrived (compare with time.monotonic() in tests)
    connection: int  # id of the TCP connection (1, 2, ... in accept order): shows keep-alive reuse
    status: int | None = None  # status line sent; None if nothing was sent (delay aborted, "disconnect")
    response_headers: Headers = field(default_factory=Headers)
    bytes_sent: int = 0  # body bytes written to the socket
    fault: str | None = None  # fault kind applied to this request
    error: str | None = None  # the exception that ended the connection, if any (client gone, server stopping)
    duration: float | None = None  # seconds from arrival to the end of the answer
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _Entry:
    size: int
    etag: str
    last_modified: str
    range_support: bool
    content_type: str
    headers: dict[str, str]
    require_auth: str | None
    data: bytes | None = None
    path: Path | None = None


@dataclass
class _Redirect:
    location: str
    status: int


@dataclass
class _Fault:
    kind: str
    params: dict[str, Any]
    remaining: int
    methods: frozenset[str]


@dataclass
class _Plan:
    status: int
    headers: list[tuple[str, str]]
    src: bytes | Path = b""
    start: int = 0
    end: int = 0
    content_length: bool = True  # False for 304


class _Abort(Exception):
    """Stop answering and close the connection (server stopping, or the client went away during a delay)."""


def _quote_etag(etag: str) -> str:
    return etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'


def _parse_range(value: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """``Range`` header -> (start, end) half-open, "unsatisfiable", or None to ignore it (bad syntax, several ranges).

    Several ranges are answered with the whole file (200), as S3 does: a server may always ignore Range.
    """
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return None
    if not first:  # bytes=-n: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, size if not last else min(int(last) + 1, size)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # many clients connecting at once must not hit SYN retransmits
    allow_reuse_address = True

    def __init__(self, owner: FileServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which may query DNS: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        text = traceback.format_exc()
        if _client_closed_idle_connection(text):
            return  # legal TCP, not a server bug: a client closing a keep-alive connection it no longer needs
        self.owner.errors.append(text)
        super().handle_error(request, client_address)


def _client_closed_idle_connection(traceback_text: str) -> bool:
    """A reset while waiting for the next request line of a keep-alive connection."""
    return (
        "handle_one_request" in traceback_text
        and "self.rfile.readline" in traceback_text
        and traceback_text.rstrip().endswith("ConnectionResetError: [Errno 104] Connection reset by peer")
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mvdata-test-fileserver/1.0"
    timeout = 60.0  # idle keep-alive connections are closed after this
    server: _Server

    # -- connection lifecycle -------------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn_id = self.server.owner._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.owner._unregister(self.conn_id)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    # -- request handling -----------------------------------------------------------------------------------------
    def _serve(self, method: str) -> None:
        owner = self.server.owner
        now = time.monotonic()
        target = urlsplit(self.path)
        path = target.path or "/"
        rec = Request(
            method=method,
            path=path,
            query=target.query,
            name=unquote(path[1:] if path.startswith("/") else path),
            headers=Headers(self.headers.items()),
            time=now,
            connection=self.conn_id,
        )
        owner._log(rec)
        try:
            fault = owner._take_fault(rec.name, method)
            rec.fault = fault.kind if fault else None
            self._respond(rec, fault)
        except (_Abort, OSError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            self.close_connection = True
        finally:
            rec.duration = time.monotonic() - now
            rec.done.set()

    def _respond(self, rec: Request, fault: _Fault | None) -> None:
        kind = fault.kind if fault else None
        params = fault.params if fault else {}
        if kind == "delay" and not self._wait(params["seconds"], watch_client=True):
            raise _Abort("client gone or server stopping during delay")
        if kind == "disconnect":
            self.close_connection = True
            return
        if kind == "status":
            plan = self._status_fault_plan(params)
        else:
            plan = self._plan(rec, ignore_range=kind == "ignore_range")
        self._send(rec, plan, kind, params)

    def _status_fault_plan(self, params: dict[str, Any]) -> _Plan:
        status = int(params["status"])
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if params["retry_after"] is not None:
            headers.append(("Retry-After", str(params["retry_after"])))
        headers.extend((params["headers"] or {}).items())
        body = params["body"] if params["body"] is not None else f"{status} {responses.get(status, '')}\n".encode()
        return _Plan(status, headers, body, 0, len(body))

    def _plan(self, rec: Request, *, ignore_range: bool) -> _Plan:
        route = self.server.owner._lookup(rec.name)
        if route is None:
            body = b"Not Found\n"
            return _Plan(404, [("Content-Type", "text/plain; charset=utf-8")], body, 0, len(body))
        if isinstance(route, _Redirect):
            return _Plan(route.status, [("Location", route.location)])
        entry = route
        if entry.require_auth is not None and rec.headers.get("authorization") != entry.require_auth:
            body = b"Unauthorized\n"
            return _Plan(401, [("Content-Type", "text/plain; charset=utf-8")], body, 0, len(body))
        headers = [("Content-Type", entry.content_type), ("ETag", entry.etag), ("Last-Modified", entry.last_modified)]
        if entry.range_support:
            headers.append(("Accept-Ranges", "bytes"))
        headers.extend(entry.headers.items())
        src: bytes | Path = entry.data if entry.data is not None else entry.path  # type: ignore[assignment]

        if_none_match = rec.headers.get("if-none-match")
        if if_none_match is not None:
            tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
            if "*" in tags or entry.etag.removeprefix("W/") in tags:
                return _Plan(304, headers, content_length=False)

        range_value = rec.headers.get("range")
        if range_value is not None and entry.range_support and not ignore_range:
            if_range = rec.headers.get("if-range")
            if if_range is None or self._if_range_matches(if_range.strip(), entry):
                parsed = _parse_range(range_value, entry.size)
                if parsed == "unsatisfiable":
                    return _Plan(416, [*headers, ("Content-Range", f"bytes */{entry.size}")])
                if parsed is not None:
                    start, end = parsed
                    headers.append(("Content-Range", f"bytes {start}-{end - 1}/{entry.size}"))
                    return _Plan(206, headers, src, start, end)
        return _Plan(200, headers, src, 0, entry.size)

    @staticmethod
    def _if_range_matches(value: str, entry: _Entry) -> bool:
        if value.startswith(('"', "W/")):  # an entity tag: strong comparison, weak tags never match
            return not value.startswith("W/") and not entry.etag.startswith("W/") and value == entry.etag
        return value == entry.last_modified  # an HTTP date: must be exactly the Last-Modified we send

    # -- writing --------------------------------------------------------------------------------------------------
    def _send(self, rec: Request, plan: _Plan, kind: str | None, params: dict[str, Any]) -> None:
        length = plan.end - plan.start
        content_length: int | None = length if plan.content_length else None
        limit, pad, rate, chunk, stall, flips = length, 0, None, _CHUNK, None, None
        close, rst = False, False
        if kind == "reset":
            limit, rst = min(int(params["after"]), length), True
        elif kind == "truncate":
            limit, close = min(int(params["after"]), length), True
        elif kind == "wrong_length":
            content_length, close = int(params["length"]), True
            if params["send"] == "length":
                limit, pad = min(content_length, length), max(0, content_length - length)
        elif kind == "no_length":
            content_length, close = None, True
        elif kind == "drip":
            rate = float(params["rate"])
            chunk = int(params["chunk"] or max(1, min(_CHUNK, int(rate / 20))))  # ~20 writes per second
        elif kind == "stall":
            stall = (int(params["after"]), float(params["seconds"]))
        elif kind == "corrupt" and length:
            offset = length // 2 if params["offset"] is None else int(params["offset"])
            if not 0 <= offset < length:
                raise ValueError(f"corrupt offset={offset} outside the body of {length} bytes")
            flips = (offset, min(length, offset + max(1, int(params["count"]))))

        head = self._head(plan.status, plan.headers, content_length)
        rec.status = plan.status
        rec.response_headers = Headers(plan.headers)
        if content_length is not None:
            rec.response_headers["content-length"] = str(content_length)
        if self.command == "HEAD" or limit == 0:
            self.wfile.write(head)
        elif isinstance(plan.src, bytes) and kind is None and length <= _SMALL:
            self.wfile.write(head + plan.src[plan.start : plan.end])  # one segment for small answers
            rec.bytes_sent += length
        else:
            self.wfile.write(head)
            self._write_body(rec, plan.src, plan.start, limit, chunk=chunk, rate=rate, stall=stall, flips=flips)
        if pad and self.command != "HEAD":
            zeros = bytes(min(pad, _CHUNK))
            while pad:
                n = min(pad, len(zeros))
                self.wfile.write(zeros[:n])
                rec.bytes_sent += n
                pad -= n
        if rst:
            self._reset_connection()
        elif close:
            self.close_connection = True  # socketserver then shuts the socket down cleanly (FIN)

    def _head(self, status: int, headers: list[tuple[str, str]], content_length: int | None) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {responses.get(status, 'Unknown')}",
            f"Server: {self.server_version}",
            f"Date: {formatdate(usegmt=True)}",
        ]
        lines.extend(f"{key}: {value}" for key, value in headers)
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _write_body(
        self,
        rec: Request,
        src: bytes | Path,
        start: int,
        n: int,
        *,
        chunk: int,
        rate: float | None,
        stall: tuple[int, float] | None,
        flips: tuple[int, int] | None,
    ) -> None:
        """Write bytes [start, start+n) of src: paced at `rate` bytes/s, pausing once at stall[0], flipping flips."""
        if isinstance(src, Path) and rate is None and stall is None and flips is None:
            with src.open("rb") as f:
                offset, remaining = start, n
                while remaining:
                    sent = self.connection.sendfile(f, offset, min(remaining, _SENDFILE_CHUNK))
                    if not sent:
                        raise _Abort(f"{src} is shorter than expected")
                    offset, remaining = offset + sent, remaining - sent
                    rec.bytes_sent += sent
            return
        view = memoryview(src) if isinstance(src, bytes) else None
        with src.open("rb") if isinstance(src, Path) else contextlib.nullcontext() as f:
            t0, pos, stalled = time.monotonic(), 0, stall is None
            while pos < n:
                size = min(chunk, n - pos)
                if stall is not None and not stalled:
                    if pos >= stall[0]:
                        if not self._wait(stall[1], watch_client=True):
                            raise _Abort("client gone or server stopping during stall")
                        stalled = True
                    else:
                        size = min(size, stall[0] - pos)
                if view is not None:
                    data: bytes | bytearray | memoryview = view[start + pos : start + pos + size]
                else:
                    f.seek(start + pos)
                    data = f.read(size)
                if flips is not None and pos < flips[1] and flips[0] < pos + size:
                    data = bytearray(data)
                    for i in range(max(flips[0], pos), min(flips[1], pos + size)):
                        data[i - pos] ^= 0xFF
                if rate is not None and not self._wait(t0 + (pos + size) / rate - time.monotonic()):
                    raise _Abort("server stopping")
                self.wfile.write(data)
                pos += size
                rec.bytes_sent += size

    def _reset_connection(self) -> None:
        """Abort the TCP connection: with SO_LINGER 0, close() sends RST instead of FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the socket closes for real once no file object refers to it
        self.connection.close()

    def _wait(self, seconds: float, *, watch_client: bool = False) -> bool:
        """Sleep; False if the server is stopping or (with watch_client) the client closed the connection."""
        deadline = time.monotonic() + seconds
        stopping = self.server.owner._stopping
        while (remaining := deadline - time.monotonic()) > 0:
            if stopping.wait(min(remaining, 0.05) if watch_client else remaining):
                return False
            if watch_client and self._client_gone():
                return False
        return not stopping.is_set()

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class FileServer:
    """HTTP/1.1 server on 127.0.0.1 (random port) serving registered files, with fault injection.

    ``root``: optional directory whose files are also served, by their path relative to it (``socket.sendfile``);
    their ETag is ``"<size hex>-<mtime_ns hex>"`` (like nginx) so large files are not hashed.
    The socket is bound in ``__init__`` (so ``url`` and ``add()`` work before ``start()``); requests are answered once
    started. A stopped server cannot be started again.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.requests: list[Request] = []
        self.errors: list[str] = []  # tracebacks of unexpected exceptions in the server (bugs): should stay empty
        self._lock = threading.Lock()
        self._routes: dict[str, _Entry | _Redirect] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._conns: dict[int, socket.socket] = {}
        self._conn_ids = itertools.count(1)
        self._connections_opened = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._server = _Server(self)
        self.port: int = self._server.server_port
        self.url: str = f"http://127.0.0.1:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> FileServer:
        if self._stopping.is_set():
            raise RuntimeError("a stopped FileServer cannot be restarted; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="FileServer", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end delays/drips, close every connection (idle keep-alive ones too)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        while self._conns and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FileServer({self.url}, {len(self._routes)} routes, {len(self.requests)} requests)"

    # -- content ------------------------------------------------------------------------------------------------------
    def url_for(self, name: str) -> str:
        return f"{self.url}/{quote(self._name(name), safe='/')}"

    def add(
        self,
        name: str,
        data: bytes,
        *,
        etag: str | None = None,
        range_support: bool = True,
        last_modified: float | None = None,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
        require_auth: str | None = None,
    ) -> str:
        """Serve `data` at /<name> from memory (replacing what was there); return its URL.

        ``etag`` defaults to a quoted sha256 prefix and is quoted if given bare. ``last_modified`` is a timestamp
        (default: now). ``headers`` are extra response headers (e.g. ``X-Linked-Etag``). ``require_auth``: answer 401
        unless the request's Authorization header is exactly this (e.g. ``"Bearer hf_xxx"``, a gated HF repo).
        """
        data = bytes(data)
        entry = _Entry(
            size=len(data),
            etag=_quote_etag(etag) if etag is not None else f'"{hashlib.sha256(data).hexdigest()[:32]}"',
            last_modified=formatdate(last_modified if last_modified is not None else time.time(), usegmt=True),
            range_support=range_support,
            content_type=content_type,
            headers=dict(headers or {}),
            require_auth=require_auth,
            data=data,
        )
        return self._set_route(name, entry)

    def add_file(
        self,
        name: str,
        path: Path,
        *,
        etag: str | None = None,
        range_support: bool = True,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
        require_auth: str | None = None,
    ) -> str:
        """Serve the file at `path` (sent with ``socket.sendfile``; it must not change while served) at /<name>."""
        entry = self._file_entry(Path(path), etag=etag, range_support=range_support, content_type=content_type)
        entry.headers, entry.require_auth = dict(headers or {}), require_auth
        return self._set_route(name, entry)

    def redirect(self, name: str, to_url: str, status: int = 302) -> str:
        """Answer /<name> with `status` and ``Location: to_url`` (like HF ``resolve`` URLs -> CDN); return its URL."""
        return self._set_route(name, _Redirect(to_url, status))

    def remove(self, name: str) -> None:
        with self._lock:
            self._routes.pop(self._name(name), None)

    def etag(self, name: str) -> str:
        route = self._lookup(self._name(name))
        if not isinstance(route, _Entry):
            raise KeyError(name)
        return route.etag

    # -- faults -------------------------------------------------------------------------------------------------------
    def fault(self, name: str, kind: str, *, times: int = 1, methods: Iterable[str] = ("GET",), **params: Any) -> None:
        """The next `times` requests for /<name> (GET only unless `methods` says otherwise) get this fault.

        Faults queue up in order: ``fault(n, "status", status=503); fault(n, "reset", after=10)`` answers the next
        GET with 503, the one after with a reset, then normally. Kinds and parameters:

        - ``status``: ``status=`` code, optional ``retry_after=`` (Retry-After header), ``headers=``, ``body=``.
        - ``reset``: ``after=N``: headers and N body bytes, then the connection is aborted (RST).
        - ``truncate``: ``after=N``: headers with the full Content-Length, N body bytes, then a clean close (FIN).
        - ``ignore_range``: a Range request gets 200 and the whole body.
        - ``wrong_length``: ``length=L``: ``Content-Length: L`` then the real body, then close;
          with ``send="length"`` exactly L bytes (body cut or padded with zeros).
        - ``no_length``: no Content-Length: the body, then a clean close (FIN) ends it (HTTP/1.0 style).
        - ``drip``: ``rate=`` bytes per second (optional ``chunk=`` bytes per write); the last byte is sent no sooner
          than size/rate seconds after the headers.
        - ``delay``: ``seconds=S`` before answering normally (given up if the client closes meanwhile).
        - ``stall``: ``seconds=S``, ``after=N``: N body bytes, a pause of S seconds, then the rest.
        - ``corrupt``: same length, ``count`` bytes (default 1) from ``offset`` (default: middle of the body) XOR 0xFF.
        - ``disconnect``: close the connection without answering (a stale keep-alive connection).

        Faults apply on top of the normal answer: a faulted Range request still gets its 206 headers.
        """
        if kind not in _FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        required, optional = _FAULT_PARAMS[kind]
        if missing := [p for p in required if p not in params]:
            raise ValueError(f"fault {kind!r} needs {missing}")
        if unknown := set(params) - set(required) - set(optional):
            raise ValueError(f"fault {kind!r} does not take {sorted(unknown)}")
        if times < 1:
            raise ValueError("times must be >= 1")
        if kind == "wrong_length" and params.get("send", "body") not in ("body", "length"):
            raise ValueError("wrong_length send= must be 'body' or 'length'")
        methods = frozenset(m.upper() for m in methods)
        with self._lock:
            self._faults.setdefault(self._name(name), []).append(_Fault(kind, {**optional, **params}, times, methods))

    def pending_faults(self, name: str) -> list[tuple[str, int]]:
        """(kind, remaining) of the faults still queued for /<name>."""
        with self._lock:
            return [(f.kind, f.remaining) for f in self._faults.get(self._name(name), [])]

    def clear_faults(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._faults.clear()
            else:
                self._faults.pop(self._name(name), None)

    # -- request log --------------------------------------------------------------------------------------------------
    def requests_for(self, name: str, *, wait: float = 5.0) -> list[Request]:
        """Requests for /<name>, in arrival order, after waiting (up to `wait` s) until their answers are finished."""
        name = self._name(name)
        with self._lock:
            found = [r for r in self.requests if r.name == name]
        deadline = time.monotonic() + wait
        for r in found:
            r.done.wait(max(0.0, deadline - time.monotonic()))
        return found

    def bytes_sent(self, name: str, *, wait: float = 5.0) -> int:
        """Body bytes written for /<name> across all requests (waits for answers in progress, like requests_for)."""
        return sum(r.bytes_sent for r in self.requests_for(name, wait=wait))

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until every logged request has been answered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self.requests)
        return all(r.done.wait(max(0.0, deadline - time.monotonic())) for r in pending)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted so far."""
        return self._connections_opened

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- internals ----------------------------------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        if name.startswith(self.url + "/"):
            name = unquote(urlsplit(name).path)
        return name[1:] if name.startswith("/") else name

    def _set_route(self, name: str, route: _Entry | _Redirect) -> str:
        name = self._name(name)
        if not name:
            raise ValueError("empty file name")
        with self._lock:
            self._routes[name] = route
        return self.url_for(name)

    def _file_entry(
        self,
        path: Path,
        *,
        etag: str | None,
        range_support: bool = True,
        content_type: str = "application/octet-stream",
    ) -> _Entry:
        st = path.stat()
        return _Entry(
            size=st.st_size,
            etag=_quote_etag(etag) if etag is not None else f'"{st.st_size:x}-{st.st_mtime_ns:x}"',
            last_modified=formatdate(st.st_mtime, usegmt=True),
            range_support=range_support,
            content_type=content_type,
            headers={},
            require_auth=None,
            path=path,
        )

    def _lookup(self, name: str) -> _Entry | _Redirect | None:
        with self._lock:
            route = self._routes.get(name)
        if route is not None or self.root is None or not name:
            return route
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        try:
            return self._file_entry(path, etag=None)
        except OSError:
            return None

    def _take_fault(self, name: str, method: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(name)
            for fault in queue or ():
                if method in fault.methods:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        queue.remove(fault)  # type: ignore[union-attr]
                    return fault
        return None

    def _log(self, rec: Request) -> None:
        with self._lock:
            self.requests.append(rec)

    def _register(self, conn: socket.socket) -> int:
        with self._lock:
            conn_id = next(self._conn_ids)
            self._conns[conn_id] = conn
            self._connections_opened += 1
        return conn_id

    def _unregister(self, conn_id: int) -> None:
        with self._lock:
            self._conns.pop(conn_id, None)


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """A started FileServer, stopped after the test; fails the test if the server itself raised unexpectedly."""
    with FileServer() as server:
        yield server
    if server.errors:
        pytest.fail("FileServer raised:\n" + "\n".join(server.errors))


if __name__ == "__main__":  # manual poking: python -m mvdata_assets_tests.datasets.fileserver
    with FileServer() as _server:
        print(_server.add("hello.txt", b"hello world\n"), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass

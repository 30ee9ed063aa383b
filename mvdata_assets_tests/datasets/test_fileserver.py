"""The fault-injecting test file server answers like a real dataset host, and each fault does exactly what it says.

Clients are the standard library's ``http.client``/``urllib`` or raw sockets, never the package under test.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from mvdata_assets_tests.datasets.fileserver import FileServer, Headers

DATA = os.urandom(200_000)
NAME = "coco/val2017/annotations.zip"


@dataclass
class Resp:
    status: int
    headers: Message
    body: bytes


def fetch(
    file_server: FileServer,
    name: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Resp:
    """One request on a fresh connection; the whole body is read."""
    conn = http.client.HTTPConnection("127.0.0.1", file_server.port, timeout=timeout)
    try:
        conn.request(method, name if name.startswith("/") else f"/{name}", headers=headers or {})
        resp = conn.getresponse()
        return Resp(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_get(file_server: FileServer, path: str, extra: str = "") -> tuple[bytes, bytes, str]:
    """GET over a bare socket, reading until the server ends the connection: (head, body bytes, "eof" | "reset")."""
    with socket.create_connection(("127.0.0.1", file_server.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        buf, how = b"", "eof"
        try:
            while chunk := sock.recv(65536):
                buf += chunk
        except ConnectionResetError:
            how = "reset"
    head, _, body = buf.partition(b"\r\n\r\n")
    return head, body, how


@pytest.fixture
def file_server(file_server: FileServer) -> FileServer:
    """The datasets' file server (conftest.py), serving NAME."""
    file_server.add(NAME, DATA)
    return file_server


# -- normal behaviour ------------------------------------------------------------------------------------------------


def test_full_get_sends_body_and_validators(file_server: FileServer) -> None:
    r = fetch(file_server, NAME)
    assert r.status == 200
    assert r.body == DATA
    assert r.headers["Content-Length"] == str(len(DATA))
    assert r.headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()[:32]}"' == file_server.etag(NAME)
    assert r.headers["Accept-Ranges"] == "bytes"
    assert abs(parsedate_to_datetime(r.headers["Last-Modified"]).timestamp() - time.time()) < 60
    (rec,) = file_server.requests_for(NAME)
    assert (rec.method, rec.status, rec.bytes_sent, rec.fault) == ("GET", 200, len(DATA), None)
    assert file_server.bytes_sent(NAME) == len(DATA)


def test_add_returns_url_and_names_may_need_quoting(file_server: FileServer) -> None:
    url = file_server.add("dir/with space/ü.txt", b"x")
    assert url == f"{file_server.url}/dir/with%20space/%C3%BC.txt"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.read() == b"x"
    assert file_server.requests_for("dir/with space/ü.txt")[0].path == "/dir/with%20space/%C3%BC.txt"


def test_head_sends_headers_only(file_server: FileServer) -> None:
    r = fetch(file_server, NAME, method="HEAD")
    assert r.status == 200
    assert r.body == b""
    assert r.headers["Content-Length"] == str(len(DATA))
    assert r.headers["ETag"] == file_server.etag(NAME)
    (rec,) = file_server.requests_for(NAME)
    assert (rec.method, rec.status, rec.bytes_sent) == ("HEAD", 200, 0)


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=100-199", 100, 200),
        ("bytes=0-0", 0, 1),
        ("bytes=199000-", 199_000, 200_000),
        ("bytes=-500", 199_500, 200_000),
        ("bytes=150000-999999999", 150_000, 200_000),  # end past the file: clamped
        ("bytes=-999999999", 0, 200_000),  # suffix longer than the file: all of it
    ],
)
def test_range_forms_get_206_with_exact_bytes(file_server: FileServer, header: str, start: int, end: int) -> None:
    r = fetch(file_server, NAME, headers={"Range": header})
    assert r.status == 206
    assert r.body == DATA[start:end]
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert r.headers["Content-Length"] == str(end - start)
    (rec,) = file_server.requests_for(NAME)
    assert (rec.status, rec.bytes_sent, rec.range) == (206, end - start, header)


@pytest.mark.parametrize("header", ["bytes=200000-", "bytes=300000-300010", "bytes=-0"])
def test_unsatisfiable_range_gets_416(file_server: FileServer, header: str) -> None:
    r = fetch(file_server, NAME, headers={"Range": header})
    assert r.status == 416
    assert r.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert r.body == b""
    assert file_server.requests_for(NAME)[0].status == 416


@pytest.mark.parametrize("header", ["bytes=5-1", "bytes=0-1,5-9", "items=0-9", "bytes=x-"])
def test_invalid_or_multiple_ranges_are_ignored(file_server: FileServer, header: str) -> None:
    r = fetch(file_server, NAME, headers={"Range": header})
    assert (r.status, len(r.body)) == (200, len(DATA))


def test_if_range(file_server: FileServer) -> None:
    etag = file_server.etag(NAME)
    last_modified = fetch(file_server, NAME, method="HEAD").headers["Last-Modified"]
    for validator, status in [
        (etag, 206),
        (last_modified, 206),
        ('"someone-else"', 200),  # the file changed since the partial download: start over
        (f"W/{etag}", 200),  # weak validators never match
        ("Mon, 01 Jan 2001 00:00:00 GMT", 200),
    ]:
        r = fetch(file_server, NAME, headers={"Range": "bytes=10-", "If-Range": validator})
        assert r.status == status, validator
        assert r.body == (DATA[10:] if status == 206 else DATA)


def test_readding_a_file_changes_its_etag(file_server: FileServer) -> None:
    old = file_server.etag(NAME)
    file_server.add(NAME, DATA[::-1])
    assert file_server.etag(NAME) != old
    r = fetch(file_server, NAME, headers={"Range": "bytes=10-", "If-Range": old})
    assert (r.status, r.body) == (200, DATA[::-1])


def test_explicit_etag_is_quoted(file_server: FileServer) -> None:
    file_server.add("a", b"abc", etag="d41d8cd9-2")
    file_server.add("b", b"abc", etag='"already"')
    assert fetch(file_server, "a").headers["ETag"] == '"d41d8cd9-2"'
    assert fetch(file_server, "b").headers["ETag"] == '"already"'


def test_if_none_match_gets_304(file_server: FileServer) -> None:
    r = fetch(file_server, NAME, headers={"If-None-Match": file_server.etag(NAME)})
    assert (r.status, r.body) == (304, b"")
    assert fetch(file_server, NAME, headers={"If-None-Match": '"other"'}).status == 200


def test_without_range_support_range_is_ignored(file_server: FileServer) -> None:
    file_server.add("plain.tar", DATA, range_support=False)
    r = fetch(file_server, "plain.tar", headers={"Range": "bytes=100-199"})
    assert r.status == 200
    assert r.body == DATA
    assert "Accept-Ranges" not in r.headers
    assert "Content-Range" not in r.headers
    assert file_server.bytes_sent("plain.tar") == len(DATA)


def test_redirect_like_hf_resolve_to_cdn(file_server: FileServer) -> None:
    with FileServer() as cdn:
        target = cdn.add("blobs/abc123", DATA)
        resolve = file_server.redirect("org/repo/resolve/main/data.parquet", target)
        r = fetch(file_server, "org/repo/resolve/main/data.parquet")
        assert (r.status, r.headers["Location"], r.body) == (302, target, b"")
        with urllib.request.urlopen(resolve, timeout=5) as resp:
            assert resp.read() == DATA
            assert resp.url == target
        assert [q.status for q in file_server.requests_for("org/repo/resolve/main/data.parquet")] == [302, 302]
        assert [q.status for q in cdn.requests_for("blobs/abc123")] == [200]
    assert (
        fetch(file_server, file_server.redirect("moved", "/elsewhere", status=301)[len(file_server.url) :]).status
        == 301
    )


def test_unknown_path_is_404(file_server: FileServer) -> None:
    r = fetch(file_server, "nope/missing.zip")
    assert r.status == 404
    assert file_server.requests_for("nope/missing.zip")[0].status == 404
    file_server.remove(NAME)
    assert fetch(file_server, NAME).status == 404


def test_authorization_is_recorded_case_insensitively(file_server: FileServer) -> None:
    fetch(file_server, NAME + "?download=true", headers={"Authorization": "Bearer hf_secret"})
    (rec,) = file_server.requests_for(NAME)
    assert rec.query == "download=true"
    assert rec.headers["authorization"] == rec.headers["AUTHORIZATION"] == "Bearer hf_secret"
    assert "Authorization" in rec.headers
    assert rec.headers.get("X-Missing") is None


def test_headers_mapping() -> None:
    h = Headers([("Accept", "a"), ("ACCEPT", "b"), ("Range", "bytes=0-")])
    assert h == {"accept": "a, b", "range": "bytes=0-"}
    h["X-Y"] = "1"
    assert h["x-y"] == "1"
    del h["RANGE"]
    assert "range" not in h


def test_require_auth_answers_401_without_token(file_server: FileServer) -> None:
    file_server.add("gated.bin", b"secret", require_auth="Bearer hf_ok")
    assert fetch(file_server, "gated.bin").status == 401
    assert fetch(file_server, "gated.bin", headers={"Authorization": "Bearer hf_bad"}).status == 401
    r = fetch(file_server, "gated.bin", headers={"Authorization": "Bearer hf_ok"})
    assert (r.status, r.body) == (200, b"secret")


def test_keep_alive_reuses_one_connection(file_server: FileServer) -> None:
    file_server.add("small", b"s" * 10)
    conn = http.client.HTTPConnection("127.0.0.1", file_server.port, timeout=5)
    try:
        for name in [NAME, "small", "missing", NAME]:
            conn.request("GET", f"/{name}")
            conn.getresponse().read()
    finally:
        conn.close()
    assert file_server.connections_opened == 1
    assert {r.connection for r in file_server.requests} == {1}
    assert [r.status for r in file_server.requests] == [200, 200, 404, 200]


def test_serves_files_on_disk(tmp_path: Path) -> None:
    blob = os.urandom(3_000_000)
    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    (root / "train" / "shard-0.tar").write_bytes(blob)
    (tmp_path / "secret.bin").write_bytes(b"secret")
    with FileServer(root=root) as srv:
        r = fetch(srv, "train/shard-0.tar")
        assert (r.status, r.body) == (200, blob)
        assert r.headers["ETag"].startswith('"2dc6c0-')
        r = fetch(srv, "train/shard-0.tar", headers={"Range": "bytes=1000-1999"})
        assert (r.status, r.body) == (206, blob[1000:2000])
        url = srv.add_file("alias.tar", root / "train" / "shard-0.tar")
        srv.fault("alias.tar", "corrupt", offset=5)
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read()
        assert len(body) == len(blob) and body[5] == blob[5] ^ 0xFF and body[6:] == blob[6:]
        assert fetch(srv, "/train/../../secret.bin").status == 404  # no escaping the root
        assert fetch(srv, "/train/../train/shard-0.tar", headers={"Range": "bytes=-3"}).body == blob[-3:]
        assert srv.bytes_sent("train/shard-0.tar") == len(blob) + 1000


# -- faults ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 404, 403, 410])
def test_status_fault(file_server: FileServer, status: int) -> None:
    file_server.fault(NAME, "status", status=status)
    r = fetch(file_server, NAME)
    assert r.status == status
    assert r.body != DATA
    assert "Retry-After" not in r.headers
    assert fetch(file_server, NAME).status == 200  # times=1: normal again
    assert [(q.status, q.fault) for q in file_server.requests_for(NAME)] == [(status, "status"), (200, None)]


def test_429_with_retry_after(file_server: FileServer) -> None:
    file_server.fault(NAME, "status", status=429, retry_after=1)
    r = fetch(file_server, NAME)
    assert (r.status, r.headers["Retry-After"]) == (429, "1")


def test_times_then_normal_and_faults_queue_in_order(file_server: FileServer) -> None:
    file_server.fault(NAME, "status", status=503, times=2)
    file_server.fault(NAME, "status", status=500)
    assert file_server.pending_faults(NAME) == [("status", 2), ("status", 1)]
    assert [fetch(file_server, NAME).status for _ in range(5)] == [503, 503, 500, 200, 200]
    assert file_server.pending_faults(NAME) == []


def test_faults_hit_get_only_unless_asked(file_server: FileServer) -> None:
    file_server.fault(NAME, "status", status=503)
    assert fetch(file_server, NAME, method="HEAD").status == 200
    assert fetch(file_server, NAME).status == 503
    file_server.fault(NAME, "status", status=403, methods=["HEAD"])
    assert fetch(file_server, NAME).status == 200
    assert fetch(file_server, NAME, method="HEAD").status == 403


def test_fault_arguments_are_checked(file_server: FileServer) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        file_server.fault(NAME, "explode")
    with pytest.raises(ValueError, match="needs"):
        file_server.fault(NAME, "status")
    with pytest.raises(ValueError, match="does not take"):
        file_server.fault(NAME, "reset", aftr=10)
    with pytest.raises(ValueError, match="times"):
        file_server.fault(NAME, "reset", times=0)
    assert file_server.pending_faults(NAME) == []


def test_reset_aborts_connection_after_n_bytes(file_server: FileServer) -> None:
    file_server.fault(NAME, "reset", after=1234)
    head, body, how = raw_get(file_server, f"/{NAME}")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(DATA)}".encode() in head
    assert how == "reset"
    assert body == DATA[:1234]
    (rec,) = file_server.requests_for(NAME)
    assert (rec.status, rec.bytes_sent, rec.fault) == (200, 1234, "reset")


def test_reset_seen_by_http_client_then_resume_with_range(file_server: FileServer) -> None:
    file_server.fault(NAME, "reset", after=50_000)
    conn = http.client.HTTPConnection("127.0.0.1", file_server.port, timeout=5)
    conn.request("GET", f"/{NAME}")
    resp = conn.getresponse()
    got = b""
    with pytest.raises((ConnectionError, http.client.IncompleteRead)):
        while chunk := resp.read(4096):
            got += chunk
    conn.close()
    assert 0 < len(got) <= 50_000 and DATA.startswith(got)
    r = fetch(file_server, NAME, headers={"Range": "bytes=50000-", "If-Range": file_server.etag(NAME)})
    assert r.status == 206
    assert DATA[:50_000] + r.body == DATA
    assert file_server.bytes_sent(NAME) == len(DATA)


def test_reset_after_zero_bytes_on_a_range_request(file_server: FileServer) -> None:
    file_server.fault(NAME, "reset")
    head, body, how = raw_get(file_server, f"/{NAME}", "Range: bytes=10-19\r\n")
    assert head.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes 10-19/" in head
    assert (body, how) == (b"", "reset")


def test_truncate_closes_cleanly_with_short_body(file_server: FileServer) -> None:
    file_server.fault(NAME, "truncate", after=777)
    head, body, how = raw_get(file_server, f"/{NAME}")
    assert f"Content-Length: {len(DATA)}".encode() in head
    assert (body, how) == (DATA[:777], "eof")
    file_server.fault(NAME, "truncate", after=1000)
    with pytest.raises(http.client.IncompleteRead) as exc:
        fetch(file_server, NAME)
    assert exc.value.partial == DATA[:1000]
    assert [r.bytes_sent for r in file_server.requests_for(NAME)] == [777, 1000]


def test_ignore_range_answers_200_with_everything(file_server: FileServer) -> None:
    file_server.fault(NAME, "ignore_range")
    r = fetch(file_server, NAME, headers={"Range": "bytes=100-"})
    assert (r.status, r.body) == (200, DATA)
    assert "Content-Range" not in r.headers
    assert fetch(file_server, NAME, headers={"Range": "bytes=100-"}).status == 206


def test_wrong_length_longer_than_body(file_server: FileServer) -> None:
    file_server.fault(NAME, "wrong_length", length=len(DATA) + 100)
    with pytest.raises(http.client.IncompleteRead) as exc:
        fetch(file_server, NAME)
    assert exc.value.partial == DATA
    (rec,) = file_server.requests_for(NAME)
    assert (rec.response_headers["Content-Length"], rec.bytes_sent) == (str(len(DATA) + 100), len(DATA))


def test_wrong_length_shorter_than_body_looks_complete(file_server: FileServer) -> None:
    file_server.fault(NAME, "wrong_length", length=1000)
    r = fetch(file_server, NAME)
    assert (r.status, r.headers["Content-Length"], r.body) == (200, "1000", DATA[:1000])
    file_server.fault(NAME, "wrong_length", length=len(DATA) + 10, send="length")
    head, body, how = raw_get(file_server, f"/{NAME}")
    assert (body, how) == (DATA + bytes(10), "eof")


def test_no_length_ends_the_body_with_the_connection(file_server: FileServer) -> None:
    file_server.fault(NAME, "no_length")
    head, body, how = raw_get(file_server, f"/{NAME}")
    assert b"content-length" not in head.lower()
    assert (body, how) == (DATA, "eof")


def test_drip_sends_slowly(file_server: FileServer) -> None:
    file_server.fault(NAME, "drip", rate=6000)
    t0 = time.monotonic()
    r = fetch(file_server, NAME, headers={"Range": "bytes=0-2999"})
    elapsed = time.monotonic() - t0
    assert r.body == DATA[:3000]
    assert elapsed >= 0.5  # 3000 bytes at 6000 B/s
    assert elapsed < 3
    (rec,) = file_server.requests_for(NAME)
    assert rec.fault == "drip" and rec.duration is not None and rec.duration >= 0.5


def test_delay_before_answering(file_server: FileServer) -> None:
    file_server.fault(NAME, "delay", seconds=0.6)
    t0 = time.monotonic()
    r = fetch(file_server, NAME)
    assert time.monotonic() - t0 >= 0.6
    assert (r.status, r.body) == (200, DATA)


def test_delay_makes_a_short_timeout_fire_and_is_given_up(file_server: FileServer) -> None:
    file_server.fault(NAME, "delay", seconds=30)
    with pytest.raises(TimeoutError):
        fetch(file_server, NAME, timeout=0.3)
    (rec,) = file_server.requests_for(NAME, wait=5)  # the server notices the client left: no 30 s wait
    assert rec.done.is_set() and rec.status is None and rec.error is not None
    assert fetch(file_server, NAME).status == 200


def test_stall_mid_body(file_server: FileServer) -> None:
    file_server.fault(NAME, "stall", after=1000, seconds=30)
    conn = http.client.HTTPConnection("127.0.0.1", file_server.port, timeout=0.3)
    conn.request("GET", f"/{NAME}")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(1000) == DATA[:1000]
    with pytest.raises(TimeoutError):
        resp.read(1)
    conn.close()
    assert file_server.bytes_sent(NAME) == 1000
    file_server.fault(NAME, "stall", after=10, seconds=0.3)
    t0 = time.monotonic()
    assert fetch(file_server, NAME).body == DATA
    assert time.monotonic() - t0 >= 0.3


def test_corrupt_keeps_length_and_flips_bytes(file_server: FileServer) -> None:
    file_server.fault(NAME, "corrupt")
    r = fetch(file_server, NAME)
    assert len(r.body) == len(DATA) and r.body != DATA
    assert [i for i in range(len(DATA)) if r.body[i] != DATA[i]] == [len(DATA) // 2]
    assert r.headers["ETag"] == file_server.etag(NAME)  # same validators: only a checksum catches it
    file_server.fault(NAME, "corrupt", offset=0, count=4)
    r = fetch(file_server, NAME, headers={"Range": "bytes=100-199"})
    assert r.body[:4] == bytes(b ^ 0xFF for b in DATA[100:104]) and r.body[4:] == DATA[104:200]
    assert fetch(file_server, NAME).body == DATA


def test_disconnect_without_answer(file_server: FileServer) -> None:
    file_server.fault(NAME, "disconnect")
    with pytest.raises(http.client.RemoteDisconnected):
        fetch(file_server, NAME)
    assert fetch(file_server, NAME).status == 200
    assert [(r.status, r.fault) for r in file_server.requests_for(NAME)] == [(None, "disconnect"), (200, None)]


def test_fault_on_a_redirect(file_server: FileServer) -> None:
    file_server.redirect("resolve/x", file_server.url_for(NAME))
    file_server.fault("resolve/x", "status", status=503)
    assert fetch(file_server, "resolve/x").status == 503
    assert fetch(file_server, "resolve/x").status == 302


# -- scale and lifecycle ---------------------------------------------------------------------------------------------


def test_2000_small_files_over_keep_alive_concurrently(file_server: FileServer) -> None:  # noqa: F811
    files = {f"shard/{i:05d}.jpg": os.urandom(100 + i % 900) for i in range(2000)}
    for name, data in files.items():
        file_server.add(name, data)
    names = list(files)
    workers = 16
    failures: list[str] = []

    def work(part: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", file_server.port, timeout=10)
        try:
            for name in part:
                conn.request("GET", f"/{name}")
                if conn.getresponse().read() != files[name]:
                    failures.append(name)
        finally:
            conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(names[i::workers],)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert failures == []
    assert len(file_server.requests) == 2000
    assert file_server.connections_opened == workers  # every request after the first reused its connection
    assert elapsed < 10
    assert sum(file_server.bytes_sent(n, wait=0) for n in names[:50]) == sum(len(files[n]) for n in names[:50])


def test_large_body_is_fast(file_server: FileServer) -> None:  # noqa: F811
    big = os.urandom(64 << 20)
    file_server.add("big.bin", big)
    t0 = time.monotonic()
    with urllib.request.urlopen(file_server.url_for("big.bin"), timeout=10) as resp:
        n = 0
        while chunk := resp.read(1 << 20):
            n += len(chunk)
    assert n == len(big)
    assert time.monotonic() - t0 < 5
    assert file_server.bytes_sent("big.bin") == len(big)


def test_stop_closes_idle_keep_alive_connections_promptly() -> None:
    srv = FileServer().start()
    srv.add("x", b"x")
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    assert sock.recv(4096).endswith(b"\r\n\r\nx")
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2
    assert sock.recv(4096) == b""  # the server closed the idle connection
    sock.close()
    assert srv.open_connections == 0
    with pytest.raises(RuntimeError):
        srv.start()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()

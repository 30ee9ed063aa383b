"""CurlLoop against a real HTTP server on 127.0.0.1: the per-host queue, the stall timer, bodies gathered whole."""

from __future__ import annotations

import pycurl

from mvdata_assets.datasets.transport import BODY_TOO_BIG, CurlLoop, Job, Request, Writer
from mvdata_assets_tests.datasets.fileserver import FileServer


class Collect:
    """A sink keeping the body in memory."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def begin(self, request: Request) -> Writer | None:
        return self.parts.append

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


def fetch(url: str, sink: Collect, done: list[Request], whole_up_to: int = 0) -> Job:
    done.append((yield Request(url, [], sink, whole_up_to)))


def test_a_transfer_queued_behind_the_per_host_limit_is_not_timed_out_while_it_waits(file_server: FileServer) -> None:
    # the first file drips for ~1.5 s (a block every 0.1 s: never stalled), holding the host's only connection
    slow_url = file_server.add("slow.bin", b"s" * 3000)
    file_server.fault("slow.bin", "drip", rate=2000, chunk=200)
    fast_url = file_server.add("fast.bin", b"f" * 1000)
    slow, fast = Collect(), Collect()
    done: list[Request] = []
    with CurlLoop(timeout_s=0.5, max_host_connections=1) as loop:
        loop.run([fetch(slow_url, slow, done), fetch(fast_url, fast, done)], at_once=2)
    assert [(r.url, r.status, r.error) for r in done] == [(slow_url, 200, None), (fast_url, 200, None)]
    assert (slow.body, fast.body) == (b"s" * 3000, b"f" * 1000)
    assert file_server.connections_opened == 1  # the limit held: the second transfer waited for the first's connection


def test_a_transfer_that_stalls_after_it_started_is_still_timed_out(file_server: FileServer) -> None:
    url = file_server.add("stuck.bin", b"x" * 5000)
    file_server.fault("stuck.bin", "stall", seconds=3, after=100)
    done: list[Request] = []
    with CurlLoop(timeout_s=0.3, max_host_connections=1) as loop:
        loop.run([fetch(url, Collect(), done)], at_once=1)
    assert done[0].error_code == pycurl.E_OPERATION_TIMEDOUT
    assert done[0].error is not None and "no data for 0.3 s" in done[0].error


def gather(url: str, whole_up_to: int, timeout_s: float = 5) -> tuple[Request, Collect]:
    """One transfer whose body is gathered whole: the finished request and what its sink got."""
    sink = Collect()
    done: list[Request] = []
    with CurlLoop(timeout_s=timeout_s) as loop:
        loop.run([fetch(url, sink, done, whole_up_to)], at_once=1)
    return done[0], sink


def test_a_body_asked_for_whole_reaches_the_sink_in_one_block(file_server: FileServer) -> None:
    data = bytes(range(256)) * 800  # 200 kB: libcurl hands it over in blocks of up to 16 KiB
    url = file_server.add("whole.bin", data)
    gathered, streamed = Collect(), Collect()
    done: list[Request] = []
    with CurlLoop(timeout_s=5) as loop:
        loop.run([fetch(url, gathered, done, whole_up_to=len(data)), fetch(url, streamed, done)], at_once=2)
    assert [(r.status, r.error) for r in done] == [(200, None), (200, None)]
    assert gathered.parts == [data]
    assert len(streamed.parts) > 1 and streamed.body == data


def test_a_gathered_body_that_stalls_is_timed_out_with_the_bytes_received(file_server: FileServer) -> None:
    url = file_server.add("stuck.bin", b"x" * 5000)
    file_server.fault("stuck.bin", "stall", seconds=3, after=100)
    request, sink = gather(url, 10_000, timeout_s=0.3)
    assert request.error_code == pycurl.E_OPERATION_TIMEDOUT
    assert sink.parts == [b"x" * 100]  # handed over, so that a resume can start after them


def test_a_gathered_body_that_keeps_coming_slowly_is_not_timed_out(file_server: FileServer) -> None:
    # ~1.5 s of body, a block every 0.1 s, against a 0.5 s stall timer that only sees the body's length grow
    url = file_server.add("slow.bin", b"s" * 3000)
    file_server.fault("slow.bin", "drip", rate=2000, chunk=200)
    request, sink = gather(url, 10_000, timeout_s=0.5)
    assert (request.status, request.error, sink.parts) == (200, None, [b"s" * 3000])


def test_a_gathered_body_growing_past_its_limit_ends_the_transfer(file_server: FileServer) -> None:
    url = file_server.add("big.bin", b"b" * 100_000)
    file_server.fault("big.bin", "no_length")  # no Content-Length to refuse it by: it has to be counted as it comes
    request, sink = gather(url, 20_000)
    assert request.error_code == BODY_TOO_BIG
    assert len(sink.body) <= 20_000


def test_after_a_redirect_the_final_answer_gives_the_status_and_headers(file_server: FileServer) -> None:
    target = file_server.add("target.bin", b"t" * 1000, headers={"X-Served-By": "target"})
    url = file_server.redirect("moved.bin", target)
    sink = Collect()
    done: list[Request] = []
    with CurlLoop(timeout_s=5) as loop:
        loop.run([fetch(url, sink, done)], at_once=1)
    (request,) = done
    assert (request.status, sink.body) == (200, b"t" * 1000)
    headers = request.response_headers
    assert (headers["x-served-by"], headers["content-length"]) == ("target", "1000")
    assert "location" not in headers  # the redirect's own headers are not the file's

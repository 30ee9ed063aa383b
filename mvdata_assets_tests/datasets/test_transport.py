"""CurlLoop against a real HTTP server on 127.0.0.1: the per-host queue and the stall timer."""

from __future__ import annotations

from collections.abc import Iterator

import pycurl
import pytest

from mvdata_assets.datasets.transport import CurlLoop, Job, Request, Writer
from mvdata_assets_tests.datasets.fileserver import FileServer, file_server  # noqa: F401 - fixture


class Collect:
    """A sink keeping the body in memory."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def begin(self, request: Request) -> Writer | None:
        return self.parts.append

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


@pytest.fixture
def server(file_server: FileServer) -> Iterator[FileServer]:  # noqa: F811 - the imported fixture
    yield file_server


def fetch(url: str, sink: Collect, done: list[Request]) -> Job:
    done.append((yield Request(url, [], sink)))


def test_a_transfer_queued_behind_the_per_host_limit_is_not_timed_out_while_it_waits(server: FileServer) -> None:
    # the first file drips for ~1.5 s (a block every 0.1 s: never stalled), holding the host's only connection
    slow_url = server.add("slow.bin", b"s" * 3000)
    server.fault("slow.bin", "drip", rate=2000, chunk=200)
    fast_url = server.add("fast.bin", b"f" * 1000)
    slow, fast = Collect(), Collect()
    done: list[Request] = []
    with CurlLoop(timeout_s=0.5, max_host_connections=1) as loop:
        loop.run([fetch(slow_url, slow, done), fetch(fast_url, fast, done)], at_once=2)
    assert [(r.url, r.status, r.error) for r in done] == [(slow_url, 200, None), (fast_url, 200, None)]
    assert (slow.body, fast.body) == (b"s" * 3000, b"f" * 1000)
    assert server.connections_opened == 1  # the limit held: the second transfer waited for the first's connection


def test_a_transfer_that_stalls_after_it_started_is_still_timed_out(server: FileServer) -> None:
    url = server.add("stuck.bin", b"x" * 5000)
    server.fault("stuck.bin", "stall", seconds=3, after=100)
    done: list[Request] = []
    with CurlLoop(timeout_s=0.3, max_host_connections=1) as loop:
        loop.run([fetch(url, Collect(), done)], at_once=1)
    assert done[0].error_code == pycurl.E_OPERATION_TIMEDOUT
    assert done[0].error is not None and "no data for 0.3 s" in done[0].error

"""Big files as parallel Range requests, hashed in order as the segments arrive; resumable per segment."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from mvdata_assets.datasets import segments
from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.fetch import Downloader, FileTask
from mvdata_assets.datasets.segments import MAX_SEGMENTS, SegmentedTransfer
from mvdata_assets.datasets.transport import TransientError
from mvdata_assets_tests.datasets.fileserver import FileServer

SIZE = 6 * 1024 * 1024
DATA = random.Random(5).randbytes(SIZE)
SHA256 = hashlib.sha256(DATA).hexdigest()


def segmented(**kwargs: object) -> Downloader:
    options: dict = {
        "segment_connections": 4,
        "segment_bytes": SIZE // 4,
        "segment_min_bytes": 1024 * 1024,
        "backoff_s": 0.01,
        "timeout_s": 5.0,
    }
    return Downloader(**(options | kwargs))


def test_big_file_goes_as_parallel_ranges_and_verifies(file_server: FileServer, tmp_path: Path) -> None:
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "drip", rate=4_000_000, times=4)  # each 1.5 MiB segment takes ~0.4 s
    [result] = segmented().fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    assert task.dest.read_bytes() == DATA
    gets = [r for r in file_server.requests_for("big.bin") if r.method == "GET"]
    assert sorted(r.range for r in gets) == sorted(
        f"bytes={start}-{min(start + SIZE // 4, SIZE) - 1}" for start in range(0, SIZE, SIZE // 4)
    )
    # each segment drips for ~0.4 s: every one started before any ended, so they ran together
    assert max(r.time for r in gets) < min(r.time + r.duration for r in gets)
    assert file_server.bytes_sent("big.bin") == SIZE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]  # no .part, no .segments.json


def test_segments_go_in_file_order_over_kept_connections_and_the_digest_keeps_up(
    file_server: FileServer, tmp_path: Path
) -> None:
    """12 segments, 4 connections: each takes the next segment in file order on its keep-alive connection, so the
    digest follows the transfers instead of starting on most of the file after the last byte."""
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "drip", rate=6_000_000, times=12)  # each 512 KiB segment takes ~90 ms
    hashed: list[tuple[float, int]] = []
    downloader = segmented(
        segment_bytes=SIZE // 12, progress=lambda _, done, __: hashed.append((time.monotonic(), done))
    )
    [result] = downloader.fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    gets = sorted((r for r in file_server.requests_for("big.bin") if r.method == "GET"), key=lambda r: r.time)
    step = SIZE // 12
    starts = [int(r.range.removeprefix("bytes=").split("-")[0]) // step for r in gets if r.range]
    assert sorted(starts) == list(range(12)) and len(gets) == 12
    assert all(index < arrival + 4 for arrival, index in enumerate(starts))  # never more than 4 ahead of file order
    for r in gets:  # never more than 4 at once
        assert sum(o.time <= r.time < o.time + (o.duration or 0) for o in gets) <= 4
    assert len({r.connection for r in gets}) == 4  # 12 requests over 4 kept connections
    last_request = gets[-1].time
    # the digest took at least two segments before the last was even asked for (one per connection: none)
    assert any(done >= 2 * step for at, done in hashed if at < last_request)


def test_a_kept_connection_the_server_closed_is_replaced_without_a_retry(
    file_server: FileServer, tmp_path: Path
) -> None:
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "drip", rate=6_000_000, times=4)  # the first four, each on a new connection
    file_server.fault("big.bin", "disconnect")  # the fifth comes on a kept connection: closed without an answer
    [result] = segmented(segment_bytes=SIZE // 12).fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    gets = [r for r in file_server.requests_for("big.bin") if r.method == "GET"]
    assert [r.fault for r in gets].count("disconnect") == 1
    assert len(gets) == 13 and file_server.bytes_sent("big.bin") == SIZE


def test_a_broken_segment_resumes_only_its_missing_bytes(file_server: FileServer, tmp_path: Path) -> None:
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "reset", after=300_000)
    [result] = segmented().fetch_all([task])
    assert (result.status, result.attempts) == ("downloaded", 2)
    assert task.dest.read_bytes() == DATA
    # what the reset cut off travels again, nothing else (the client may have kept a little less than was sent)
    assert SIZE <= file_server.bytes_sent("big.bin") < SIZE + 300_000


def test_server_refusing_ranges_falls_back_to_one_stream(file_server: FileServer, tmp_path: Path) -> None:
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "ignore_range", times=100)
    [result] = segmented().fetch_all([task])
    assert result.status == "downloaded" and result.error is None
    assert task.dest.read_bytes() == DATA  # restarted cleanly, never appended
    last = [r for r in file_server.requests_for("big.bin") if r.method == "GET"][-1]
    assert last.range is None and last.status == 200


def start_child_download(url: str, dest: Path, sha256: str | None) -> subprocess.Popen:
    """A process downloading `url` in 4 segments, to be killed."""
    return subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from pathlib import Path\n"
            "from mvdata_assets.datasets.fetch import Downloader, FileTask\n"
            "Downloader(segment_connections=4, segment_bytes=int(sys.argv[3]) // 4, segment_min_bytes=1 << 20)"
            ".fetch_all("
            "[FileTask(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] or None)])\n"
        ), url, str(dest), str(SIZE), sha256 or ""],
    )  # fmt: skip


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_killed_segmented_download_resumes_every_segment(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("big.bin", DATA)
    dest = tmp_path / "big.bin"
    file_server.fault("big.bin", "drip", rate=150_000, times=4)  # ~10 s a segment; progress is saved at 5 s
    child = start_child_download(url, dest, SHA256)
    state = dest.with_name("big.bin.part.segments.json")
    wait_for(lambda: state.exists() and sum(s[2] for s in json.loads(state.read_text())["segments"]) > 0,
             "the child never recorded segment progress")  # fmt: skip
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = json.loads(state.read_text())["segments"]
    kept = sum(done for _, _, done in saved)
    assert 0 < kept < SIZE
    file_server.clear_faults("big.bin")
    [result] = segmented().fetch_all([FileTask(url, dest, SIZE, SHA256)])
    assert result.status == "downloaded" and dest.read_bytes() == DATA
    resumed = [r for r in file_server.requests_for("big.bin") if r.method == "GET"][-4:]
    assert sorted(r.range for r in resumed if r.range) == sorted(
        f"bytes={start + done}-{end - 1}" for start, end, done in saved if start + done < end
    )
    assert sum(r.bytes_sent for r in resumed) == SIZE - kept  # only the missing bytes travelled


def test_a_segmented_download_killed_at_once_leaves_no_part_that_passes_for_the_file(
    file_server: FileServer, tmp_path: Path
) -> None:
    """Killed as the first segment bytes arrive: the full-size .part is all holes, and the catalog has a size but no
    checksum, so nothing but the segment state tells its zeros from the file."""
    url = file_server.add("big.bin", DATA)
    dest, part = tmp_path / "big.bin", tmp_path / "big.bin.part"
    file_server.fault("big.bin", "drip", rate=50_000, times=4)
    child = start_child_download(url, dest, None)
    wait_for(lambda: part.exists() and part.stat().st_size == SIZE, "the child never created its .part")
    child.send_signal(signal.SIGKILL)
    child.wait()
    state = json.loads(dest.with_name("big.bin.part.segments.json").read_text())  # there before the .part was
    assert state["size"] == SIZE and sum(done for _, _, done in state["segments"]) < SIZE
    file_server.clear_faults("big.bin")
    [result] = segmented().fetch_all([FileTask(url, dest, SIZE)])
    assert (result.status, result.sha256) == ("downloaded", SHA256)
    assert dest.read_bytes() == DATA


def test_small_files_go_on_while_a_big_file_arrives_in_segments(file_server: FileServer, tmp_path: Path) -> None:
    """The big file's job hashes between the small files' transfers: it never holds the loop while it waits."""
    big = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "drip", rate=1_000_000, times=4)  # each segment ~1.5 s
    smalls = []
    for i in range(30):
        data = random.Random(i).randbytes(10_000)
        url = file_server.add(f"s/{i}.bin", data)
        smalls.append(FileTask(url, tmp_path / "s" / f"{i}.bin", len(data), hashlib.sha256(data).hexdigest()))
    results = segmented(concurrency=2).fetch_all([big, *smalls])
    assert [r.status for r in results] == ["downloaded"] * 31
    big_gets = [r for r in file_server.requests_for("big.bin") if r.method == "GET"]
    big_end = max(r.time + (r.duration or 0) for r in big_gets)
    small_gets = [r for i in range(30) for r in file_server.requests_for(f"s/{i}.bin")]
    assert len(small_gets) == 30
    # with one slot for the small files, they went one after the other, all while the segments were dripping
    assert max(r.time + (r.duration or 0) for r in small_gets) < big_end


def test_segments_follow_a_redirect_and_keep_the_token_to_the_first_host(
    file_server: FileServer, tmp_path: Path
) -> None:
    file_server.add("cdn/blob-9", DATA)
    file_server.redirect("datasets/x/resolve/main/big.bin", f"http://localhost:{file_server.port}/cdn/blob-9")
    task = FileTask("https://huggingface.co/datasets/x/resolve/main/big.bin", tmp_path / "big.bin", SIZE, SHA256)
    [result] = segmented(hf_token="hf_secret", hf_endpoint=file_server.url).fetch_all([task])
    assert (result.status, result.sha256) == ("downloaded", SHA256)
    resolve = [r for r in file_server.requests_for("datasets/x/resolve/main/big.bin") if r.method == "GET"]
    cdn = [r for r in file_server.requests_for("cdn/blob-9") if r.method == "GET"]
    assert len(resolve) == len(cdn) == 4 and all(r.status == 206 and r.range for r in cdn)
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in resolve)
    assert all("authorization" not in r.headers and r.headers.get("host", "").startswith("localhost") for r in cdn)


def test_later_segments_go_straight_to_where_the_redirect_led(file_server: FileServer, tmp_path: Path) -> None:
    """A GiB in 8 MiB segments would ask Hugging Face's resolver 128 times: only the first request of each connection
    goes there."""
    file_server.add("cdn/blob-9", DATA)
    file_server.redirect("datasets/x/resolve/main/big.bin", f"http://localhost:{file_server.port}/cdn/blob-9")
    task = FileTask("https://huggingface.co/datasets/x/resolve/main/big.bin", tmp_path / "big.bin", SIZE, SHA256)
    downloader = segmented(hf_token="hf_secret", hf_endpoint=file_server.url, segment_bytes=SIZE // 12)
    [result] = downloader.fetch_all([task])
    assert (result.status, result.sha256) == ("downloaded", SHA256)
    resolve = [r for r in file_server.requests_for("datasets/x/resolve/main/big.bin") if r.method == "GET"]
    cdn = [r for r in file_server.requests_for("cdn/blob-9") if r.method == "GET"]
    assert 1 <= len(resolve) <= 4 and len(cdn) == 12
    assert all("authorization" not in r.headers for r in cdn)


def test_a_redirect_target_that_stops_answering_is_reached_through_the_first_url_again(
    file_server: FileServer, tmp_path: Path
) -> None:
    """A signed CDN address expires: its 403 sends the segment back through the resolver, with no retry counted."""
    file_server.add("cdn/blob-9", DATA)
    file_server.redirect("datasets/x/resolve/main/big.bin", f"http://localhost:{file_server.port}/cdn/blob-9")
    file_server.fault("cdn/blob-9", "drip", rate=6_000_000, times=4)  # the first four, each reached by the redirect
    file_server.fault("cdn/blob-9", "status", status=403)  # the fifth, asked for directly
    task = FileTask("https://huggingface.co/datasets/x/resolve/main/big.bin", tmp_path / "big.bin", SIZE, SHA256)
    downloader = segmented(hf_token="hf_secret", hf_endpoint=file_server.url, segment_bytes=SIZE // 12)
    [result] = downloader.fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    resolve = [r for r in file_server.requests_for("datasets/x/resolve/main/big.bin") if r.method == "GET"]
    cdn = [r for r in file_server.requests_for("cdn/blob-9") if r.method == "GET"]
    assert [r.status for r in cdn].count(403) == 1 and len(cdn) == 13
    # the first request (and those the other connections sent before it answered), the one sent back, and those of
    # the other connections until it answered again
    assert 2 <= len(resolve) <= 8
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in resolve)
    assert all("authorization" not in r.headers for r in cdn)


def test_a_huge_file_is_cut_into_at_most_max_segments(tmp_path: Path) -> None:
    transfer = SegmentedTransfer(
        "http://127.0.0.1:9/x", [], tmp_path / "x.part", 10_000, None, connections=4, segment_bytes=1, timeout_s=1.0
    )
    assert len(transfer.segments) == 1000 and all(s.end - s.start == 10 for s in transfer.segments)
    assert len(transfer.segments) <= MAX_SEGMENTS


def test_a_stalled_segment_times_out_and_resumes(file_server: FileServer, tmp_path: Path) -> None:
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    file_server.fault("big.bin", "stall", seconds=5.0, after=200_000)
    started = time.monotonic()
    [result] = segmented(timeout_s=0.5).fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 2, SHA256)
    assert time.monotonic() - started < 4.0  # noticed after ~0.5 s of silence, not when the server went on
    assert SIZE <= file_server.bytes_sent("big.bin") < SIZE + 200_000


class _Forward(BaseHTTPRequestHandler):
    """A plain forward proxy for http:// URLs: the absolute URL of each request is logged and fetched."""

    protocol_version = "HTTP/1.1"
    server: _Proxy

    def do_GET(self) -> None:
        self._forward("GET")

    def do_HEAD(self) -> None:
        self._forward("HEAD")

    def _forward(self, method: str) -> None:
        self.server.seen.append((method, self.path))
        target = urlsplit(self.path)
        upstream = HTTPConnection(target.hostname or "", target.port, timeout=10)
        skip = {"connection", "proxy-connection", "keep-alive", "transfer-encoding"}
        upstream.request(method, target.path, headers={k: v for k, v in self.headers.items() if k.lower() not in skip})
        response = upstream.getresponse()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in skip:
                self.send_header(name, value)
        self.end_headers()
        while method == "GET" and (block := response.read(1 << 16)):
            self.wfile.write(block)
        upstream.close()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.seen: list[tuple[str, str]] = []


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Proxy]:
    """A loopback proxy named by http_proxy, with no other proxy variable set."""
    server = _Proxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


def test_a_big_file_behind_a_proxy_goes_through_it_as_one_stream(
    file_server: FileServer, proxy: _Proxy, tmp_path: Path
) -> None:
    url = file_server.add("big.bin", DATA)
    task = FileTask(url, tmp_path / "big.bin", SIZE, SHA256)
    [result] = segmented().fetch_all([task])
    assert (result.status, result.sha256) == ("downloaded", SHA256)
    assert task.dest.read_bytes() == DATA
    assert ("GET", url) in proxy.seen  # libcurl honoured http_proxy; segments would have gone direct
    assert [r.range for r in file_server.requests_for("big.bin") if r.method == "GET"] == [None]


def test_no_proxy_lets_the_segments_go_direct(
    file_server: FileServer, proxy: _Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("no_proxy", "example.org, 127.0.0.1")
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    [result] = segmented().fetch_all([task])
    assert result.status == "downloaded" and task.dest.read_bytes() == DATA
    assert proxy.seen == []
    assert len([r for r in file_server.requests_for("big.bin") if r.method == "GET" and r.range]) == 4


def test_a_segmented_part_is_never_resumed_as_one_stream(file_server: FileServer, tmp_path: Path) -> None:
    # a killed segmented download leaves a full-size .part with holes; this run goes as one stream (one segment)
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    part.write_bytes(DATA[: SIZE // 2] + bytes(SIZE - SIZE // 2))
    state = {"size": SIZE, "validator": None, "segments": [[0, SIZE // 2, SIZE // 2], [SIZE // 2, SIZE, 0]]}
    (tmp_path / "big.bin.part.segments.json").write_text(json.dumps(state))
    task = FileTask(file_server.add("big.bin", DATA), dest, SIZE)  # a size but no checksum: holes would pass
    [result] = segmented(segment_connections=1).fetch_all([task])
    assert result.status == "downloaded" and dest.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_a_resume_off_page_boundaries_completes_the_file(file_server: FileServer, tmp_path: Path) -> None:
    # O_DIRECT writes need page boundaries: a segment resumed mid-page writes up to the next one through the cache
    dest, part = tmp_path / "big.bin", tmp_path / "big.bin.part"
    half, kept = SIZE // 2, (12_345, 7)
    part.write_bytes(DATA[: kept[0]] + bytes(half - kept[0]) + DATA[half : half + kept[1]] + bytes(half - kept[1]))
    state = {"size": SIZE, "validator": '"v1"', "segments": [[0, half, kept[0]], [half, SIZE, kept[1]]]}
    (tmp_path / "big.bin.part.segments.json").write_text(json.dumps(state))
    task = FileTask(file_server.add("big.bin", DATA, etag="v1"), dest, SIZE, SHA256)
    [result] = segmented(segment_bytes=half).fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    assert dest.read_bytes() == DATA
    gets = [r for r in file_server.requests_for("big.bin") if r.method == "GET"]
    assert sorted(r.range for r in gets) == [f"bytes={kept[0]}-{half - 1}", f"bytes={half + kept[1]}-{SIZE - 1}"]
    assert file_server.bytes_sent("big.bin") == SIZE - sum(kept)


def test_without_o_direct_the_segments_go_through_the_page_cache(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments, "_open_direct", lambda path: -1)  # as on tmpfs, which refuses O_DIRECT
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    [result] = segmented(segment_bytes=SIZE // 12).fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    assert task.dest.read_bytes() == DATA


def test_an_o_direct_write_refused_midway_goes_through_the_page_cache(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused: list[int] = []
    real_pwrite = SegmentedTransfer._pwrite

    def pwrite(self: SegmentedTransfer, fd: int, data: memoryview, offset: int) -> None:
        if fd == self._direct_fd and offset >= SIZE // 2:  # the file system takes some direct writes, not these
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real_pwrite(self, fd, data, offset)

    monkeypatch.setattr(SegmentedTransfer, "_pwrite", pwrite)
    # a descriptor of its own, so that this holds where tmp_path's file system refuses O_DIRECT (tmpfs before 6.6)
    monkeypatch.setattr(segments, "_open_direct", lambda path: os.open(path, os.O_WRONLY))
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    [result] = segmented().fetch_all([task])
    assert (result.status, result.attempts, result.sha256) == ("downloaded", 1, SHA256)
    assert task.dest.read_bytes() == DATA
    assert refused  # the direct path was taken, then left, with no retry


def test_an_o_direct_write_failing_otherwise_fails_the_attempt(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pwrite(self: SegmentedTransfer, fd: int, data: memoryview, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SegmentedTransfer, "_pwrite", pwrite)
    task = FileTask(file_server.add("big.bin", DATA), tmp_path / "big.bin", SIZE, SHA256)
    [result] = segmented(retries=1).fetch_all([task])
    assert result.status == "failed" and "No space left on device" in (result.error or "")
    assert not task.dest.exists()


@pytest.fixture
def one_small_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection gets one buffer of 64 KiB: it soon waits for the digest to give it back."""
    monkeypatch.setattr(segments, "BUFFERS_PER_CONNECTION", 1)
    monkeypatch.setattr(segments, "RECEIVE_BYTES", 64 * 1024)


def run_to_end(transfer: SegmentedTransfer, progress: Callable[[int], None]) -> Digests:
    """Drives the transfer's job as the downloader's loop would, failing if it never ends."""
    steps, deadline = transfer.run(Digests(), progress), time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            time.sleep(next(steps))
        raise AssertionError("the transfer did not end within 30 s: a connection waits for a buffer forever")
    except StopIteration as stop:
        return stop.value


@pytest.mark.usefixtures("one_small_buffer")
def test_connections_wait_for_the_digest_and_run_only_their_buffers_ahead(
    file_server: FileServer, tmp_path: Path
) -> None:
    """A slow digest holds the transfers back, and with one buffer per connection nothing deadlocks: the connection
    the digest waits for always gets its buffer back."""
    url = file_server.add("big.bin", DATA)
    transfer = SegmentedTransfer(
        url, [], tmp_path / "big.bin.part", SIZE, None, connections=4, segment_bytes=SIZE // 12, timeout_s=5.0
    )
    ahead: list[int] = []

    def progress(hashed: int) -> None:
        ahead.append(transfer.transferred - hashed)
        time.sleep(0.002)  # a digest slower than loopback

    digests = run_to_end(transfer, progress)
    assert digests.sha256 == SHA256 and (tmp_path / "big.bin.part").read_bytes() == DATA
    assert len(ahead) == SIZE // (64 * 1024)  # one step per buffer
    assert max(ahead) <= 4 * 64 * 1024  # never more than a buffer per connection past the digest
    assert max(ahead) > 64 * 1024  # and the connections did run ahead of it


@pytest.mark.usefixtures("one_small_buffer")
def test_connections_waiting_for_the_digest_give_up_when_a_segment_breaks(
    file_server: FileServer, tmp_path: Path
) -> None:
    """The digest stops at the first broken segment; connections waiting for a buffer it would have given back end
    too (they would otherwise wait forever), their bytes kept for the retry."""
    url = file_server.add("big.bin", DATA, etag="v1")
    file_server.fault("big.bin", "reset", after=300_000)
    part = tmp_path / "big.bin.part"

    def transfer() -> SegmentedTransfer:
        return SegmentedTransfer(url, [], part, SIZE, '"v1"', connections=4, segment_bytes=SIZE // 12, timeout_s=5.0)

    first = transfer()
    with pytest.raises(TransientError, match="a segment broke"):
        run_to_end(first, lambda _: time.sleep(0.05))  # a slow digest: the connections soon wait for their one buffer
    assert any(isinstance(e, segments.Stopped) for e in first.errors)  # at least one gave up waiting
    kept = sum(s.done for s in first.segments)
    assert 0 < kept < SIZE
    again = transfer()  # resumes from the state the failed attempt saved
    assert sum(s.done for s in again.segments) == kept
    asked_before = len(file_server.requests_for("big.bin"))
    assert run_to_end(again, lambda _: None).sha256 == SHA256 and part.read_bytes() == DATA
    resumed = file_server.requests_for("big.bin")[asked_before:]
    assert sum(r.bytes_sent for r in resumed) == SIZE - kept  # what was kept did not travel again

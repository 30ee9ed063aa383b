"""The download engine against a real fault-injecting HTTP server on 127.0.0.1.

Every test drives `Downloader` over real sockets (`FileServer`), so resumption, retries, timeouts, checksums,
skips, Hugging Face auth and the disk-space check meet the same failures they meet on real dataset hosts.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mvdata_assets.datasets import durable
from mvdata_assets.datasets import fetch as fetch_module
from mvdata_assets.datasets.fetch import Downloader, FileResult, FileTask, InsufficientSpace, Known
from mvdata_assets_tests.datasets.fileserver import FileServer, Request, file_server  # noqa: F401 - fixture

REPO_ROOT = Path(__file__).resolve().parents[2]
HF_FILE = "https://huggingface.co/datasets/x/resolve/main/f.json"
HF_NAME = "datasets/x/resolve/main/f.json"


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloader(**kwargs: object) -> Downloader:
    """A Downloader with short back-offs and timeouts, so fault tests stay fast."""
    options: dict[str, object] = {"retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0}
    options.update(kwargs)
    return Downloader(**options)  # type: ignore[arg-type]


def gets(server: FileServer, name: str) -> list[Request]:
    return [r for r in server.requests_for(name) if r.method == "GET"]


def leftovers(dest: Path) -> list[str]:
    """The engine's temporary files next to `dest` (should be gone once a file is downloaded or failed for good)."""
    return sorted(p.name for p in dest.parent.glob(dest.name + ".*"))


@pytest.fixture
def server(file_server: FileServer) -> Iterator[FileServer]:  # noqa: F811 - the imported fixture
    yield file_server


@pytest.fixture
def serve(server: FileServer, tmp_path: Path) -> Callable[..., FileTask]:
    """Add `data` under `name` and return the task that fetches it into tmp_path (with size and sha256 by default)."""

    def add(name: str, data: bytes, *, size: bool = True, checksum: bool = True, **kwargs: object) -> FileTask:
        url = server.add(name, data, **kwargs)  # type: ignore[arg-type]
        return FileTask(url, tmp_path / "data" / name, len(data) if size else None, sha256(data) if checksum else None)

    return add


def assert_downloaded(result: FileResult, task: FileTask, data: bytes, *, clean: bool = True) -> None:
    """Downloaded with exactly `data` at dest, the result says so, and (with clean) no .part/.etag is left."""
    assert (result.status, result.error) == ("downloaded", None), result
    assert task.dest.read_bytes() == data
    assert result.path == str(task.dest)
    assert result.bytes == len(data)
    assert result.sha256 == sha256(data)
    assert result.mtime_ns == task.dest.stat().st_mtime_ns
    if clean:
        assert leftovers(task.dest) == []


def range_start(request: Request) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", request.range or "")
    assert match, f"expected an open Range request, got {request.range!r}"
    return int(match.group(1))


# -- the happy path --------------------------------------------------------------------------------------------------


def test_file_with_size_and_sha256_downloads(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(300_000)
    task = serve("coco/ann.zip", data)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.expected_bytes == len(data)
    assert result.attempts == 1
    assert result.bytes_transferred == len(data)
    assert result.seconds > 0
    (get,) = gets(server, "coco/ann.zip")
    assert get.range is None and get.status == 200
    assert server.bytes_sent("coco/ann.zip") == len(data)


def test_empty_file_downloads(serve: Callable[..., FileTask]) -> None:
    task = serve("empty.txt", b"")
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, b"")


def test_md5_is_checked_too(serve: Callable[..., FileTask]) -> None:
    data = blob(50_000, 1)
    plain = serve("md5/ok.bin", data, checksum=False)
    good = FileTask(plain.url, plain.dest, len(data), md5=hashlib.md5(data).hexdigest().upper())
    (result,) = downloader().fetch_all([good])
    assert_downloaded(result, good, data)
    bad_dest = plain.dest.with_name("bad.bin")
    bad = FileTask(plain.url, bad_dest, len(data), md5="0" * 32)
    (result,) = downloader().fetch_all([bad])
    assert result.status == "failed"
    assert "md5" in (result.error or "") and "also after a fresh download" in (result.error or "")
    assert not bad_dest.exists()


# -- transient errors retry ------------------------------------------------------------------------------------------


def test_429_waits_for_retry_after(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(10_000, 2)
    task = serve("busy.bin", data)
    server.fault("busy.bin", "status", status=429, retry_after=1)
    (result,) = downloader(max_backoff_s=30).fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, second = gets(server, "busy.bin")
    assert (first.status, second.status) == (429, 200)
    assert second.time - first.time >= 0.95  # the server asked for 1 s; backoff_s alone would be ~0.01 s


def test_500_twice_then_success(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 3)
    task = serve("flaky.bin", data)
    server.fault("flaky.bin", "status", status=500, times=2)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 3
    assert [r.status for r in gets(server, "flaky.bin")] == [500, 500, 200]


def test_503_forever_fails_after_all_retries(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 4)
    task = serve("down.bin", data)
    server.fault("down.bin", "status", status=503, times=100)
    (result,) = downloader(retries=3).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 4
    assert "503" in (result.error or "")
    assert len(gets(server, "down.bin")) == 4
    assert not task.dest.exists()
    assert result.sha256 is None


@pytest.mark.parametrize("kind", ["reset", "stall"])
def test_interrupted_body_resumes_from_the_bytes_received(
    server: FileServer, serve: Callable[..., FileTask], kind: str
) -> None:
    """A connection reset (or a read timeout) 100 kB into a 500 kB body: only the missing bytes travel again.

    100 kB are reliably in the client's socket before the reset arrives (a raw socket reads all of them), so a
    correct client keeps them and resumes with ``Range: bytes=100000-``.
    """
    size, cut = 500_000, 100_000
    data = blob(size, 5)
    task = serve("cut.bin", data)
    if kind == "reset":
        server.fault("cut.bin", "reset", after=cut)
        engine = downloader()
    else:
        server.fault("cut.bin", "stall", after=cut, seconds=5)
        engine = downloader(timeout_s=0.5)
    (result,) = engine.fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, retry = gets(server, "cut.bin")
    assert first.fault == kind
    assert retry.range is not None, (
        f"after a {kind} at byte {cut} the retry asked for the whole file again: the received bytes were dropped"
    )
    kept = range_start(retry)
    assert 0 < kept <= cut
    assert retry.status == 206 and retry.bytes_sent == size - kept
    assert server.bytes_sent("cut.bin") < size + 16_384


def test_truncated_body_resumes_exactly(server: FileServer, serve: Callable[..., FileTask]) -> None:
    size, cut = 3_000_000, 1_234_567
    data = blob(size, 6)
    task = serve("short.bin", data)
    server.fault("short.bin", "truncate", after=cut)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, retry = gets(server, "short.bin")
    assert first.bytes_sent == cut
    assert retry.range == f"bytes={cut}-"
    assert retry.headers.get("if-range") == server.etag("short.bin")
    assert (retry.status, retry.bytes_sent) == (206, size - cut)
    assert server.bytes_sent("short.bin") == size
    assert result.bytes_transferred == size


def test_200_answer_to_a_range_request_restarts_the_file(server: FileServer, serve: Callable[..., FileTask]) -> None:
    size = 3_000_000
    data = blob(size, 7)
    task = serve("norange.bin", data)
    server.fault("norange.bin", "truncate", after=2_000_000)  # leaves a .part behind
    server.fault("norange.bin", "ignore_range")  # the resume gets 200 and the whole body
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)  # exact: not appended to the .part, not doubled
    assert result.attempts == 2
    first, retry = gets(server, "norange.bin")
    assert range_start(retry) > 0
    assert (retry.status, retry.bytes_sent) == (200, size)


def test_file_changed_on_the_server_between_attempts_restarts(
    server: FileServer, serve: Callable[..., FileTask]
) -> None:
    old, new = blob(2_500_000, 8), blob(2_500_000, 9)
    task = serve("moving.bin", old)
    server.fault("moving.bin", "truncate", after=1_500_000)
    (failed,) = downloader(retries=0).fetch_all([task])
    assert failed.status == "failed"
    part = task.dest.with_name("moving.bin.part")
    assert part.stat().st_size > 0
    old_etag = server.etag("moving.bin")
    server.add("moving.bin", new)
    new_task = FileTask(task.url, task.dest, len(new), sha256(new))
    (result,) = downloader().fetch_all([new_task])
    assert_downloaded(result, new_task, new)
    retry = gets(server, "moving.bin")[-1]
    assert retry.headers.get("if-range") == old_etag  # the validator of the bytes in the .part
    assert retry.status == 200


@pytest.mark.parametrize(
    ("length_delta", "send", "checks"),
    [
        (+1000, "body", "size+sha256"),  # promises more than it sends
        (+1000, "body", "sha256"),
        (-1000, "body", "size+sha256"),  # promises less: the rest of the body is ignored
        (-1000, "body", "sha256"),
        (+10, "length", "size+sha256"),  # padded with zeros to the promised length
        (+10, "length", "sha256"),
    ],
)
def test_wrong_content_length_never_passes_as_downloaded(
    server: FileServer, serve: Callable[..., FileTask], length_delta: int, send: str, checks: str
) -> None:
    size = 200_000
    data = blob(size, 10)
    task = serve("liar.bin", data, size=checks == "size+sha256")
    server.fault("liar.bin", "wrong_length", length=size + length_delta, send=send)
    (result,) = downloader().fetch_all([task])
    if result.status == "downloaded":
        assert_downloaded(result, task, data, clean=False)  # leftovers: see test_complete_part_answered_416
        assert result.attempts >= 2
    else:
        assert result.status == "failed" and result.error, result
        assert not task.dest.exists()
    assert result.status == "downloaded"  # retrying is enough here: one lie, then the server is honest


def test_a_part_as_big_as_the_file_is_fetched_again(server: FileServer, serve: Callable[..., FileTask]) -> None:
    """The whole body arrived but the connection broke (Content-Length promised more): a 416 would prove nothing, so
    the retry asks for the whole file, not for the bytes after it."""
    size = 200_000
    data = blob(size, 20)
    task = serve("whole.bin", data)
    server.fault("whole.bin", "wrong_length", length=size + 1000)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    first, retry = gets(server, "whole.bin")
    assert (first.bytes_sent, retry.range, retry.status, retry.bytes_sent) == (size, None, 200, size)


def test_slow_drip_completes(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 11)
    task = serve("slow.bin", data)
    server.fault("slow.bin", "drip", rate=40_000)
    t0 = time.monotonic()
    (result,) = downloader(timeout_s=0.5).fetch_all([task])
    assert time.monotonic() - t0 >= 0.45
    assert_downloaded(result, task, data)
    assert result.attempts == 1  # a slow but steady body is no timeout


def test_delay_longer_than_the_timeout_is_retried(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 12)
    task = serve("late.bin", data)
    server.fault("late.bin", "delay", seconds=3)
    t0 = time.monotonic()
    (result,) = downloader(timeout_s=0.3).fetch_all([task])
    assert time.monotonic() - t0 < 2.5  # gave up on the silent attempt instead of waiting the 3 s out
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    assert [r.fault for r in gets(server, "late.bin")] == ["delay", None]


def test_delay_every_time_fails_with_a_timeout_reason(server: FileServer, serve: Callable[..., FileTask]) -> None:
    task = serve("silent.bin", blob(1000, 13))
    server.fault("silent.bin", "delay", seconds=3, times=10)
    (result,) = downloader(timeout_s=0.2, retries=1).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 2
    assert "timed out" in (result.error or "").lower() or "timeout" in (result.error or "").lower()
    assert not task.dest.exists()


# -- permanent errors fail at once --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 403, 410])
def test_permanent_status_fails_at_once(server: FileServer, tmp_path: Path, status: int) -> None:
    name = f"gone/{status}.zip"
    if status == 404:
        url = server.url_for(name)  # nothing served there
    else:
        url = server.add(name, blob(1000, status))
        server.fault(name, "status", status=status, times=100)
    task = FileTask(url, tmp_path / "gone.zip", 1000)
    (result,) = downloader(retries=5).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 1
    assert str(status) in (result.error or "")
    assert len(gets(server, name)) == 1
    assert not task.dest.exists()
    assert leftovers(task.dest) == []


# -- checksums ----------------------------------------------------------------------------------------------------


def test_corrupt_once_then_a_fresh_download_succeeds(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(400_000, 14)
    task = serve("flip.bin", data)
    server.fault("flip.bin", "corrupt")
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, fresh = gets(server, "flip.bin")
    assert first.fault == "corrupt"
    assert fresh.range is None and fresh.status == 200  # the bad bytes were not resumed from


def test_corrupt_every_time_fails_and_keeps_nothing(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(400_000, 15)
    task = serve("rotten.bin", data)
    server.fault("rotten.bin", "corrupt", times=10)
    (result,) = downloader(retries=5).fetch_all([task])
    assert result.status == "failed"
    assert "also after a fresh download" in (result.error or "")
    assert "sha256" in (result.error or "")
    assert result.attempts == 2
    assert len(gets(server, "rotten.bin")) == 2
    assert not task.dest.exists()
    assert leftovers(task.dest) == []


@pytest.mark.parametrize("announced", [True, False])
def test_a_body_far_bigger_than_the_catalog_says_fails_at_once_and_keeps_nothing(
    server: FileServer, tmp_path: Path, announced: bool
) -> None:
    """A small file is gathered in memory: a body over its size by more than WRITE_BYTES ends the transfer.

    Announced by Content-Length, it ends before the body; without one, once the body has grown that far.
    """
    size = 10_000
    data = blob(8 * 1024 * 1024, 21)
    url = server.add("huge.bin", data)
    if not announced:
        server.fault("huge.bin", "no_length")
    task = FileTask(url, tmp_path / "huge.bin", size, sha256(data[:size]))
    (result,) = downloader(retries=3).fetch_all([task])
    assert result.status == "failed"
    assert result.error == f"the server sends more than {size + 1024 * 1024} bytes; the catalog says {size}"
    assert result.attempts == 1 and len(gets(server, "huge.bin")) == 1  # no retry: it would be sent again
    assert result.bytes_transferred <= size + 1024 * 1024  # no more was held in memory
    assert not task.dest.exists() and leftovers(task.dest) == []


def test_an_error_page_bigger_than_the_file_fails_with_its_status(server: FileServer, tmp_path: Path) -> None:
    url = server.add("gone.bin", blob(10_000, 22))
    server.fault("gone.bin", "status", status=404, body=b"<html>" * 400_000)  # 2.4 MB of error page
    task = FileTask(url, tmp_path / "gone.bin", 10_000, sha256(blob(10_000, 22)))
    (result,) = downloader().fetch_all([task])
    assert result.status == "failed"
    assert result.error == f"HTTP 404 for {url}"
    assert not task.dest.exists() and leftovers(task.dest) == []


# -- a killed download resumes -------------------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from mvdata_assets.datasets.fetch import Downloader, FileTask
url, dest, size, digest = sys.argv[1:5]
print(Downloader(retries=0, timeout_s=30).fetch(FileTask(url, Path(dest), int(size), digest)), flush=True)
"""


def test_sigkilled_download_resumes_from_its_part(server: FileServer, serve: Callable[..., FileTask]) -> None:
    size = 8 * 1024 * 1024
    data = blob(size, 16)
    task = serve("big/shard.tar", data)
    server.fault("big/shard.tar", "drip", rate=2_000_000)  # ~4 s for the whole file
    part = task.dest.with_name(task.dest.name + ".part")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, task.url, str(task.dest), str(size), task.sha256 or ""],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while not (part.exists() and part.stat().st_size > 0):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never wrote to its .part"
            time.sleep(0.02)
        time.sleep(0.3)
        assert child.poll() is None, "the child finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert not task.dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < size

    result = downloader().fetch(task)
    assert_downloaded(result, task, data)
    assert result.attempts == 1
    assert result.bytes_transferred == size - kept
    killed, resumed = gets(server, "big/shard.tar")
    assert killed.fault == "drip"
    assert resumed.range == f"bytes={kept}-"
    assert resumed.headers.get("if-range") == server.etag("big/shard.tar")
    assert (resumed.status, resumed.bytes_sent) == (206, size - kept)


# -- skips ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def downloaded(server: FileServer, serve: Callable[..., FileTask]) -> tuple[list[FileTask], dict[Path, Known]]:
    """Three files fetched once, the Known records built from the results, and the request log cleared."""
    tasks = [serve(f"skip/{i}.bin", blob(30_000 + i, 100 + i)) for i in range(3)]
    results = downloader().fetch_all(tasks)
    assert [r.status for r in results] == ["downloaded"] * 3
    known = {Path(r.path): Known(r.bytes, r.mtime_ns or 0, r.sha256 or "") for r in results}
    server.wait_idle()
    server.clear_requests()
    return tasks, known


def test_recorded_files_are_skipped_without_network(
    server: FileServer, downloaded: tuple[list[FileTask], dict[Path, Known]]
) -> None:
    tasks, known = downloaded
    results = downloader().fetch_all(tasks, known)
    assert [r.status for r in results] == ["skipped"] * 3
    for task, result in zip(tasks, results, strict=True):
        assert (result.bytes, result.sha256, result.mtime_ns) == (
            known[task.dest].bytes,
            known[task.dest].sha256,
            known[task.dest].mtime_ns,
        )
        assert result.attempts == 0 and result.bytes_transferred == 0
    assert server.requests == []


def test_verify_rehashes_locally_and_redownloads_a_corrupted_file(
    server: FileServer, downloaded: tuple[list[FileTask], dict[Path, Known]]
) -> None:
    tasks, known = downloaded
    results = downloader().fetch_all(tasks, known, verify=True, check_space=False)
    assert [r.status for r in results] == ["skipped"] * 3
    assert server.requests == []

    # Same size, same mtime, different bytes: only re-hashing can tell.
    victim = tasks[1].dest
    good = victim.read_bytes()
    st = victim.stat()
    victim.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    trusted = downloader().fetch_all(tasks, known, check_space=False)
    assert [r.status for r in trusted] == ["skipped"] * 3  # the record is trusted when verify is off
    assert server.requests == []

    results = downloader().fetch_all(tasks, known, verify=True, check_space=False)
    assert [r.status for r in results] == ["skipped", "downloaded", "skipped"]
    assert victim.read_bytes() == good
    assert [r.name for r in server.requests] == ["skip/1.bin"]


def test_verify_with_the_space_check_needs_no_network_either(
    server: FileServer, downloaded: tuple[list[FileTask], dict[Path, Known]]
) -> None:
    tasks, known = downloaded
    results = downloader().fetch_all(tasks, known, verify=True)
    assert [r.status for r in results] == ["skipped"] * 3
    assert [(r.method, r.name) for r in server.requests] == [], "verify=True probed files that were all on disk"


def test_existing_file_without_record(server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(40_000, 17)
    task = serve("byhand/a.bin", data)
    task.dest.parent.mkdir(parents=True)
    task.dest.write_bytes(data)
    (result,) = downloader().fetch_all([task])
    assert (result.status, result.bytes, result.sha256) == ("skipped", len(data), sha256(data))
    assert result.mtime_ns == task.dest.stat().st_mtime_ns
    assert gets(server, "byhand/a.bin") == []
    server.clear_requests()
    (result,) = downloader().fetch_all([task], check_space=False)
    assert result.status == "skipped"
    assert server.requests == []  # hashed locally: no request at all

    for i, wrong in enumerate([bytes(len(data)), data[:1000], data + b"x"]):  # same size, shorter, longer
        task.dest.write_bytes(wrong)
        server.clear_requests()
        (result,) = downloader().fetch_all([task])
        assert_downloaded(result, task, data)
        assert len(gets(server, "byhand/a.bin")) == 1, i


# -- Hugging Face -------------------------------------------------------------------------------------------------


def test_hf_url_goes_to_the_endpoint_with_the_token(server: FileServer, tmp_path: Path) -> None:
    data = b'{"split": "train"}\n' * 100
    server.add(HF_NAME, data, require_auth="Bearer hf_secret")
    task = FileTask(HF_FILE, tmp_path / "f.json", None, sha256(data))  # no size: the plan asks with a HEAD
    (result,) = downloader(hf_token="hf_secret", hf_endpoint=server.url + "/").fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.url == HF_FILE
    requests = server.requests_for(HF_NAME)
    assert {r.method for r in requests} == {"HEAD", "GET"}
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in requests)


def test_hf_token_is_not_sent_along_a_redirect_to_another_host(server: FileServer, tmp_path: Path) -> None:
    data = blob(100_000, 18)
    cdn_url = f"http://localhost:{server.port}/cdn/blob-123"
    server.add("cdn/blob-123", data)
    server.redirect(HF_NAME, cdn_url)
    task = FileTask(HF_FILE, tmp_path / "f.json", len(data), sha256(data))
    (result,) = downloader(hf_token="hf_secret", hf_endpoint=server.url).fetch_all([task])
    assert_downloaded(result, task, data)
    resolve, cdn = server.requests_for(HF_NAME), server.requests_for("cdn/blob-123")
    assert [r.status for r in resolve if r.method == "GET"] == [302]
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in resolve)
    assert [r.status for r in cdn if r.method == "GET"] == [200]
    assert cdn[0].headers.get("host", "").startswith("localhost")
    assert all("authorization" not in r.headers for r in cdn)


def test_hf_token_never_appears_in_errors(server: FileServer, tmp_path: Path) -> None:
    server.add(HF_NAME, b"gated", require_auth="Bearer hf_other")
    server.add("datasets/x/resolve/main/down.bin", b"down")
    server.fault("datasets/x/resolve/main/down.bin", "status", status=503, times=100)
    tasks = [
        FileTask(HF_FILE, tmp_path / "f.json", 5),
        FileTask("https://huggingface.co/datasets/x/resolve/main/down.bin", tmp_path / "down.bin", 4),
        FileTask("https://huggingface.co/datasets/x/resolve/main/missing.bin", tmp_path / "missing.bin"),
    ]
    results = downloader(hf_token="hf_secret", hf_endpoint=server.url, retries=1).fetch_all(tasks)
    assert [r.status for r in results] == ["failed"] * 3
    assert "401" in (results[0].error or "") and results[0].attempts == 1
    assert "503" in (results[1].error or "")
    assert "404" in (results[2].error or "")
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in server.requests)
    for result in results:
        assert "hf_secret" not in repr(result)


def test_hf_token_is_not_sent_to_a_host_that_merely_shares_the_endpoint_prefix(
    server: FileServer, tmp_path: Path
) -> None:
    """HF_ENDPOINT http://127.0.0.1:4512 must not authorise http://127.0.0.1:45123 (another origin)."""
    endpoint = f"http://127.0.0.1:{str(server.port)[:-1]}"
    data = b"public"
    url = server.add("public/readme.txt", data)
    assert url.startswith(endpoint)
    task = FileTask(url, tmp_path / "readme.txt", len(data), sha256(data))
    (result,) = downloader(hf_token="hf_secret", hf_endpoint=endpoint).fetch_all([task])
    assert_downloaded(result, task, data)
    leaked = [(r.method, r.path) for r in server.requests if "authorization" in r.headers]
    assert leaked == [], f"HF_TOKEN sent to {server.url}, which is not HF_ENDPOINT {endpoint}"


# -- disk space ----------------------------------------------------------------------------------------------------


def test_insufficient_space_raises_before_any_get(server: FileServer, tmp_path: Path) -> None:
    huge = 10**16
    url = server.add("huge.bin", b"not really huge")
    task = FileTask(url, tmp_path / "huge.bin", huge)
    small = FileTask(server.add("small.bin", b"small"), tmp_path / "small.bin", 5)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InsufficientSpace) as excinfo:
        downloader().fetch_all([small, task])
    message = str(excinfo.value)
    match = re.search(r"([\d.]+) GiB missing", message)
    assert match, message
    assert abs(float(match.group(1)) - (huge + 5 - free) / 2**30) < 1.0
    assert [r for r in server.requests if r.method == "GET"] == []
    assert not task.dest.exists() and not small.dest.exists()
    assert leftovers(task.dest) == []


def test_space_check_counts_only_the_missing_part_of_a_resumed_file(
    server: FileServer, serve: Callable[..., FileTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(2_000_000, 19)
    task = serve("resume-space.bin", data)
    task.dest.parent.mkdir(parents=True)
    task.dest.with_name(task.dest.name + ".part").write_bytes(data[:1_500_000])
    task.dest.with_name(task.dest.name + ".part.validator").write_text(server.etag("resume-space.bin"))
    real = shutil.disk_usage

    def tight(path: os.PathLike[str] | str) -> object:
        usage = real(path)
        return type(usage)(usage.total, usage.used, 600_000)

    monkeypatch.setattr("mvdata_assets.datasets.fetch.shutil.disk_usage", tight)
    (result,) = downloader().fetch_all([task])  # needs 500 kB of the 600 kB "free"
    assert_downloaded(result, task, data)
    assert result.bytes_transferred == 500_000


# -- many files at once -------------------------------------------------------------------------------------------


def test_many_files_with_some_faulted(server: FileServer, tmp_path: Path) -> None:
    faults = {7: "503", 13: "reset", 21: "corrupt-always", 33: "truncate", 40: "404", 45: "corrupt-once"}
    tasks: list[FileTask] = []
    expected: dict[str, tuple[str, bytes]] = {}
    for i in range(300):
        name = f"shards/{i:04d}.jpg"
        data = blob(16 * 1024, 1000 + i)
        kind = faults.get(i % 50)
        url = server.url_for(name) if kind == "404" else server.add(name, data)
        if kind == "503":
            server.fault(name, "status", status=503)
        elif kind == "reset":
            server.fault(name, "reset", after=4000)
        elif kind == "truncate":
            server.fault(name, "truncate", after=5000)
        elif kind == "corrupt-always":
            server.fault(name, "corrupt", times=10)
        elif kind == "corrupt-once":
            server.fault(name, "corrupt")
        tasks.append(FileTask(url, tmp_path / "shards" / f"{i:04d}.jpg", len(data), sha256(data)))
        expected[url] = (kind or "ok", data)

    results = downloader(concurrency=16, retries=3).fetch_all(tasks)

    assert [r.url for r in results] == [t.url for t in tasks]  # task order
    for task, result in zip(tasks, results, strict=True):
        kind, data = expected[task.url]
        if kind in ("404", "corrupt-always"):
            assert result.status == "failed", (kind, result)
            assert ("404" if kind == "404" else "also after a fresh download") in (result.error or "")
            assert not task.dest.exists()
        else:
            assert_downloaded(result, task, data)
            assert result.attempts == (1 if kind == "ok" else 2), (kind, result)
    assert sum(r.status == "downloaded" for r in results) == 300 - 2 * 6
    get_connections = {r.connection for r in server.requests if r.method == "GET"}
    assert len(get_connections) > 1
    assert len(get_connections) <= 16 + 6 * 2 * 2  # pooled keep-alive, not one connection per file

    # overlapping transfers: at some point several GETs were in flight together
    spans = sorted((r.time, r.time + (r.duration or 0)) for r in server.requests if r.method == "GET")
    in_flight = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert in_flight > 1


def test_connection_left_by_a_503_does_not_fail_another_file(server: FileServer, tmp_path: Path) -> None:
    """A 503 (empty body, Retry-After: 1) for file A, and file B fetched on the same Downloader during A's wait.

    B must take 1 attempt. The engine raises on the 503 without reading or closing the response and releases the
    connection to the pool while the exception (holding the response) lives on through the back-off sleep; the next
    request on that connection fails in http.client with ResponseNotReady('Request-sent'), a spurious retry.
    """
    data = blob(16_384, 21)
    task_a = FileTask(server.add("a.bin", data), tmp_path / "a.bin", len(data), sha256(data))
    task_b = FileTask(server.add("b.bin", data), tmp_path / "b.bin", len(data), sha256(data))
    server.fault("a.bin", "status", status=503, retry_after=1, body=b"")
    engine = downloader(max_backoff_s=30, concurrency=2)
    results: list[FileResult] = []
    worker = threading.Thread(target=lambda: results.append(engine.fetch(task_a)))
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while not [r for r in server.requests_for("a.bin", wait=0) if r.done.is_set()]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # A is now sleeping out its Retry-After
        result_b = engine.fetch(task_b)
    finally:
        worker.join(10)
    assert_downloaded(results[0], task_a, data)
    assert results[0].attempts == 2
    assert_downloaded(result_b, task_b, data)
    assert result_b.attempts == 1, "B's first attempt reused the connection A's 503 response still occupied"
    assert len(gets(server, "b.bin")) == 1


# -- progress ------------------------------------------------------------------------------------------------------


def test_progress_reports_increasing_bytes_up_to_the_total(server: FileServer, serve: Callable[..., FileTask]) -> None:
    sizes = {"p/a.bin": 3_500_000, "p/b.bin": 1_000, "p/c.bin": 2_200_000}
    datas = {name: blob(size, size) for name, size in sizes.items()}
    tasks = [serve(name, data) for name, data in datas.items()]
    server.fault("p/c.bin", "truncate", after=1_300_000)  # resumed: counting continues from the kept bytes
    seen: dict[str, list[tuple[int, int | None]]] = {}
    lock = threading.Lock()

    def progress(url: str, done: int, total: int | None) -> None:
        with lock:
            seen.setdefault(url, []).append((done, total))

    results = downloader(progress=progress).fetch_all(tasks)
    assert [r.status for r in results] == ["downloaded"] * 3
    for task in tasks:
        size = task.size or 0
        calls = seen[task.url]
        counts = [done for done, _ in calls]
        assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
        assert counts[-1] == size
        assert {total for _, total in calls} == {size}
        assert 0 < counts[0] <= size
    assert len(seen[tasks[0].url]) >= 3  # a 3.5 MB file is reported as it arrives, not once at the end


def test_known_small_sizes_need_no_head_request(server: FileServer, serve: Callable[..., FileTask]) -> None:
    """The plan asks the server only what the catalog does not say: small files with a size go straight to GET."""
    tasks = [serve(f"small/{i}.bin", blob(1000, i)) for i in range(5)] + [serve("nosize.bin", blob(1000), size=False)]
    results = downloader().fetch_all(tasks)
    assert [r.status for r in results] == ["downloaded"] * 6
    assert [r.method for r in server.requests if r.method == "HEAD"] == ["HEAD"]
    assert [r.name for r in server.requests if r.method == "HEAD"] == ["nosize.bin"]


# -- durability in batches -----------------------------------------------------------------------------------------


def test_files_are_synced_before_their_rename_and_reported_after_it(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per batch: one syncfs while every file is a whole .part, then the renames, one folder fsync, then the report."""
    datas = {f"{i:03d}.bin": blob(20_000, 300 + i) for i in range(40)}
    tasks = [FileTask(server.add(n, d), tmp_path / n, len(d), sha256(d)) for n, d in datas.items()]
    batches: list[list[str]] = []
    problems: list[str] = []  # seen in the committer's thread, asserted here
    real_commit, real_syncfs, real_fsync_dir = durable.commit, durable.syncfs, durable.fsync_dir

    def commit(batch: list[durable.Verified]) -> None:
        batches.append([Path(item.dest).name for item in batch])
        real_commit(batch)

    def syncfs(folder: Path) -> None:
        for result, part, dest in _batch_of(batches[-1]):
            if dest.exists() or part.read_bytes() != datas[dest.name] or result.status == "downloaded":
                problems.append(f"{dest.name}: in place or reported before the sync, or its .part is not whole")
        real_syncfs(folder)

    def fsync_dir(folder: Path) -> None:
        for result, part, dest in _batch_of(batches[-1]):
            if part.exists() or not dest.exists() or result.status == "downloaded":
                problems.append(f"{dest.name}: not renamed before the folder's fsync, or reported before it")
        real_fsync_dir(folder)

    def _batch_of(names: list[str]) -> list[tuple[FileResult, Path, Path]]:
        return [(by_name[n], tmp_path / f"{n}.part", tmp_path / n) for n in names]

    monkeypatch.setattr(durable, "commit", commit)
    monkeypatch.setattr(durable, "syncfs", syncfs)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    by_name: dict[str, FileResult] = {}
    real_result = fetch_module.FileResult

    def result(*args: object, **kwargs: object) -> FileResult:
        made = real_result(*args, **kwargs)  # type: ignore[arg-type]
        by_name[Path(made.path).name] = made
        return made

    monkeypatch.setattr(fetch_module, "FileResult", result)
    results = downloader(concurrency=8).fetch_all(tasks)
    for task, outcome in zip(tasks, results, strict=True):
        assert_downloaded(outcome, task, datas[task.dest.name])
    assert problems == []
    assert sorted(n for batch in batches for n in batch) == sorted(datas)  # each file in exactly one batch


def test_a_file_whose_rename_fails_is_not_downloaded(server: FileServer, tmp_path: Path) -> None:
    datas = [blob(10_000, 400 + i) for i in range(5)]
    tasks = [
        FileTask(server.add(f"r/{i}.bin", data), tmp_path / f"{i}.bin", len(data), sha256(data))
        for i, data in enumerate(datas)
    ]

    def progress(url: str, done: int, total: int | None) -> None:  # a folder takes the place while 2.bin arrives
        if url == tasks[2].url and not (tmp_path / "2.bin").exists():
            (tmp_path / "2.bin").mkdir()
            (tmp_path / "2.bin" / "in-the-way").write_text("a folder where the file should go")

    results = downloader(progress=progress).fetch_all(tasks, check_space=False)
    assert [r.status for r in results] == ["downloaded", "downloaded", "failed", "downloaded", "downloaded"]
    assert "renaming 2.bin.part into place" in (results[2].error or "")
    assert results[2].mtime_ns is None
    assert (tmp_path / "2.bin").is_dir()
    for i in (0, 1, 3, 4):
        assert_downloaded(results[i], tasks[i], datas[i])


@pytest.mark.parametrize("step", ["syncfs", "fsync_dir"])
def test_a_failed_sync_fails_its_files_with_the_reason(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    datas = [blob(10_000, 500 + i) for i in range(3)]
    tasks = [
        FileTask(server.add(f"s/{i}.bin", data), tmp_path / f"{i}.bin", len(data), sha256(data))
        for i, data in enumerate(datas)
    ]

    def broken(folder: Path) -> None:
        raise OSError(5, "Input/output error", str(folder))

    monkeypatch.setattr(durable, step, broken)
    results = downloader().fetch_all(tasks)
    assert [r.status for r in results] == ["failed"] * 3
    for result in results:
        assert "Input/output error" in (result.error or "")
        assert ("durable" if step == "syncfs" else "fsync of") in (result.error or "")
    if step == "syncfs":  # nothing was renamed over bytes that may not be on disk
        assert not any(t.dest.exists() for t in tasks)
        assert all(t.dest.with_name(t.dest.name + ".part").read_bytes() == d for t, d in zip(tasks, datas, strict=True))


# -- resuming what an earlier run left ---------------------------------------------------------------------------


def test_a_part_without_its_validator_starts_over(server: FileServer, serve: Callable[..., FileTask]) -> None:
    """A .part whose validator was never recorded (a process killed early) may hold another version's bytes."""
    data = blob(3_000_000, 22)
    task = serve("no-validator.bin", data)
    task.dest.parent.mkdir(parents=True)
    task.dest.with_name("no-validator.bin.part").write_bytes(b"stale bytes of another version" * 50_000)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    (get,) = gets(server, "no-validator.bin")
    assert get.range is None and get.status == 200


def test_with_only_a_weak_etag_a_resume_is_validated_by_last_modified(
    server: FileServer, serve: Callable[..., FileTask]
) -> None:
    size, cut = 3_000_000, 1_234_567
    data = blob(size, 23)
    task = serve("no-etag.bin", data)
    server.add("no-etag.bin", data, etag='W/"v1"')  # not allowed in If-Range
    server.fault("no-etag.bin", "truncate", after=cut)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    first, retry = gets(server, "no-etag.bin")
    assert (retry.range, retry.status) == (f"bytes={cut}-", 206)
    assert retry.headers.get("if-range") == first.response_headers["Last-Modified"]


@pytest.mark.parametrize("catalog", ["size only", "size and sha256"])
def test_a_full_size_part_of_zeros_is_never_taken_for_the_file(
    server: FileServer, serve: Callable[..., FileTask], catalog: str
) -> None:
    """What a kill in a segmented download's first moments leaves: the .part at full size, holes only, and neither
    segment state nor validator. Its zeros must not pass as the file (a 416 to `Range: bytes=<size>-` proves
    nothing)."""
    data = blob(1_500_000, 24)
    task = serve("sparse.bin", data, checksum=catalog == "size and sha256")
    task.dest.parent.mkdir(parents=True)
    with open(task.dest.with_name("sparse.bin.part"), "wb") as part:
        part.truncate(len(data))
    task.dest.with_name("sparse.bin.part.validator").write_text(server.etag("sparse.bin"))
    (result,) = downloader().fetch_all([task])
    assert (result.status, result.sha256) == ("downloaded", sha256(data))
    assert task.dest.read_bytes() == data
    assert [(g.range, g.status) for g in gets(server, "sparse.bin")] == [(None, 200)]


# -- redirects -----------------------------------------------------------------------------------------------------


def test_redirect_to_another_protocol_is_refused(server: FileServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("local file")
    server.redirect("escape.bin", f"file://{secret}")
    task = FileTask(server.url_for("escape.bin"), tmp_path / "out" / "escape.bin", None)
    (result,) = downloader(retries=3).fetch_all([task], check_space=False)
    assert result.status == "failed"
    assert result.attempts == 1  # permanent: no retry can make it allowed
    assert "protocol" in (result.error or "").lower()
    assert not task.dest.exists()


# -- many small files with faults among them ------------------------------------------------------------------------


def test_many_small_files_with_slow_and_refused_ones_among_them(server: FileServer, tmp_path: Path) -> None:
    """Stalls, 429s and resets at once, on one loop: each faulted file gets what it needs, the healthy ones go on."""
    faults = {3: "stall", 11: "429", 17: "reset", 29: "410", 31: "delay"}
    tasks, datas = [], []
    for i in range(1000):
        name = f"many/{i:04d}.bin"
        data = blob(4096 + i, 2000 + i)
        kind = faults.get(i % 40)
        server.add(name, data)
        if kind == "stall":
            server.fault(name, "stall", after=1000, seconds=5)
        elif kind == "429":
            server.fault(name, "status", status=429, retry_after=1)
        elif kind == "reset":
            server.fault(name, "reset", after=2000)
        elif kind == "410":
            server.fault(name, "status", status=410, times=10)
        elif kind == "delay":
            server.fault(name, "delay", seconds=5)
        tasks.append(FileTask(server.url_for(name), tmp_path / "many" / f"{i:04d}.bin", len(data), sha256(data)))
        datas.append((kind, data))

    started = time.monotonic()
    results = downloader(concurrency=16, timeout_s=0.5, max_backoff_s=5).fetch_all(tasks)
    elapsed = time.monotonic() - started

    for task, result, (kind, data) in zip(tasks, results, datas, strict=True):
        if kind == "410":
            assert (result.status, result.attempts) == ("failed", 1), result
            assert "410" in (result.error or "")
            assert leftovers(task.dest) == []
        else:
            assert_downloaded(result, task, data)
            assert result.attempts == (1 if kind is None else 2), (kind, result)
    assert sum(r.status == "downloaded" for r in results) == 1000 - 25
    # the 125 faulted files' waits (0.5 s stalls, 1 s Retry-After) overlapped instead of adding up
    assert elapsed < 25

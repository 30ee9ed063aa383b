"""Where a `.part` is resumed (partfile.py), through the download engine and the fault-injecting server: after a break
or a kill only the missing bytes travel again, and only under the validator of the bytes kept; a `.part` that cannot
be trusted starts over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mvdata_assets.datasets.fetch import FileTask
from mvdata_assets_tests.datasets.downloading import assert_downloaded, blob, downloader, gets, range_start, sha256
from mvdata_assets_tests.datasets.fileserver import FileServer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["reset", "stall"])
def test_interrupted_body_resumes_from_the_bytes_received(
    file_server: FileServer, serve: Callable[..., FileTask], kind: str
) -> None:
    """A connection reset (or a read timeout) 100 kB into a 500 kB body: only the missing bytes travel again.

    100 kB are reliably in the client's socket before the reset arrives (a raw socket reads all of them), so a
    correct client keeps them and resumes with ``Range: bytes=100000-``.
    """
    size, cut = 500_000, 100_000
    data = blob(size, 5)
    task = serve("cut.bin", data)
    if kind == "reset":
        file_server.fault("cut.bin", "reset", after=cut)
        engine = downloader()
    else:
        file_server.fault("cut.bin", "stall", after=cut, seconds=5)
        engine = downloader(timeout_s=0.5)
    (result,) = engine.fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, retry = gets(file_server, "cut.bin")
    assert first.fault == kind
    assert retry.range is not None, (
        f"after a {kind} at byte {cut} the retry asked for the whole file again: the received bytes were dropped"
    )
    kept = range_start(retry)
    assert 0 < kept <= cut
    assert retry.status == 206 and retry.bytes_sent == size - kept
    assert file_server.bytes_sent("cut.bin") < size + 16_384


def test_truncated_body_resumes_exactly(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    size, cut = 3_000_000, 1_234_567
    data = blob(size, 6)
    task = serve("short.bin", data)
    file_server.fault("short.bin", "truncate", after=cut)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, retry = gets(file_server, "short.bin")
    assert first.bytes_sent == cut
    assert retry.range == f"bytes={cut}-"
    assert retry.headers.get("if-range") == file_server.etag("short.bin")
    assert (retry.status, retry.bytes_sent) == (206, size - cut)
    assert file_server.bytes_sent("short.bin") == size
    assert result.bytes_transferred == size


def test_200_answer_to_a_range_request_restarts_the_file(
    file_server: FileServer, serve: Callable[..., FileTask]
) -> None:
    size = 3_000_000
    data = blob(size, 7)
    task = serve("norange.bin", data)
    file_server.fault("norange.bin", "truncate", after=2_000_000)  # leaves a .part behind
    file_server.fault("norange.bin", "ignore_range")  # the resume gets 200 and the whole body
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)  # exact: not appended to the .part, not doubled
    assert result.attempts == 2
    first, retry = gets(file_server, "norange.bin")
    assert range_start(retry) > 0
    assert (retry.status, retry.bytes_sent) == (200, size)


def test_file_changed_on_the_server_between_attempts_restarts(
    file_server: FileServer, serve: Callable[..., FileTask]
) -> None:
    old, new = blob(2_500_000, 8), blob(2_500_000, 9)
    task = serve("moving.bin", old)
    file_server.fault("moving.bin", "truncate", after=1_500_000)
    (failed,) = downloader(retries=0).fetch_all([task])
    assert failed.status == "failed"
    part = task.dest.with_name("moving.bin.part")
    assert part.stat().st_size > 0
    old_etag = file_server.etag("moving.bin")
    file_server.add("moving.bin", new)
    new_task = FileTask(task.url, task.dest, len(new), sha256(new))
    (result,) = downloader().fetch_all([new_task])
    assert_downloaded(result, new_task, new)
    retry = gets(file_server, "moving.bin")[-1]
    assert retry.headers.get("if-range") == old_etag  # the validator of the bytes in the .part
    assert retry.status == 200


def test_a_part_as_big_as_the_file_is_fetched_again(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    """The whole body arrived but the connection broke (Content-Length promised more): a 416 would prove nothing, so
    the retry asks for the whole file, not for the bytes after it."""
    size = 200_000
    data = blob(size, 20)
    task = serve("whole.bin", data)
    file_server.fault("whole.bin", "wrong_length", length=size + 1000)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    first, retry = gets(file_server, "whole.bin")
    assert (first.bytes_sent, retry.range, retry.status, retry.bytes_sent) == (size, None, 200, size)


CHILD = """
import sys
from pathlib import Path
from mvdata_assets.datasets.fetch import Downloader, FileTask
url, dest, size, digest = sys.argv[1:5]
print(Downloader(retries=0, timeout_s=30).fetch_all([FileTask(url, Path(dest), int(size), digest)])[0], flush=True)
"""


def test_sigkilled_download_resumes_from_its_part(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    size = 8 * 1024 * 1024
    data = blob(size, 16)
    task = serve("big/shard.tar", data)
    file_server.fault("big/shard.tar", "drip", rate=2_000_000)  # ~4 s for the whole file
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

    result = downloader().fetch_all([task])[0]
    assert_downloaded(result, task, data)
    assert result.attempts == 1
    assert result.bytes_transferred == size - kept
    killed, resumed = gets(file_server, "big/shard.tar")
    assert killed.fault == "drip"
    assert resumed.range == f"bytes={kept}-"
    assert resumed.headers.get("if-range") == file_server.etag("big/shard.tar")
    assert (resumed.status, resumed.bytes_sent) == (206, size - kept)


def test_a_part_without_its_validator_starts_over(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    """A .part whose validator was never recorded (a process killed early) may hold another version's bytes."""
    data = blob(3_000_000, 22)
    task = serve("no-validator.bin", data)
    task.dest.parent.mkdir(parents=True)
    task.dest.with_name("no-validator.bin.part").write_bytes(b"stale bytes of another version" * 50_000)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    (get,) = gets(file_server, "no-validator.bin")
    assert get.range is None and get.status == 200


def test_with_only_a_weak_etag_a_resume_is_validated_by_last_modified(
    file_server: FileServer, serve: Callable[..., FileTask]
) -> None:
    size, cut = 3_000_000, 1_234_567
    data = blob(size, 23)
    task = serve("no-etag.bin", data)
    file_server.add("no-etag.bin", data, etag='W/"v1"')  # not allowed in If-Range
    file_server.fault("no-etag.bin", "truncate", after=cut)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    first, retry = gets(file_server, "no-etag.bin")
    assert (retry.range, retry.status) == (f"bytes={cut}-", 206)
    assert retry.headers.get("if-range") == first.response_headers["Last-Modified"]


@pytest.mark.parametrize("catalog", ["size only", "size and sha256"])
def test_a_full_size_part_of_zeros_is_never_taken_for_the_file(
    file_server: FileServer, serve: Callable[..., FileTask], catalog: str
) -> None:
    """What a kill in a segmented download's first moments leaves: the .part at full size, holes only, and neither
    segment state nor validator. Its zeros must not pass as the file (a 416 to `Range: bytes=<size>-` proves
    nothing)."""
    data = blob(1_500_000, 24)
    task = serve("sparse.bin", data, checksum=catalog == "size and sha256")
    task.dest.parent.mkdir(parents=True)
    with open(task.dest.with_name("sparse.bin.part"), "wb") as part:
        part.truncate(len(data))
    task.dest.with_name("sparse.bin.part.validator").write_text(file_server.etag("sparse.bin"))
    (result,) = downloader().fetch_all([task])
    assert (result.status, result.sha256) == ("downloaded", sha256(data))
    assert task.dest.read_bytes() == data
    assert [(g.range, g.status) for g in gets(file_server, "sparse.bin")] == [(None, 200)]

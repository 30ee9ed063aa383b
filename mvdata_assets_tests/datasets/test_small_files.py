"""The C fast path (`_small_files`): first attempts at small files of known size, in threads without the GIL.

How its outcomes continue in the Python engine (retries, resumes, mismatches, error statuses, redirects and the HF
token) is covered by the tests of test_fetch.py, whose small files of known size all start here; these tests cover
what is its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mvdata_assets.datasets import _small_files
from mvdata_assets.datasets.fetch import Downloader
from mvdata_assets_tests.datasets.fileserver import FileServer, file_server  # noqa: F401 - fixture
from mvdata_assets_tests.datasets.test_fetch import (
    assert_downloaded,
    blob,
    downloader,
    gets_all,
    leftovers,
    many_files,
    sha256,
)


@pytest.fixture
def server(file_server: FileServer) -> FileServer:  # noqa: F811 - the imported fixture
    return file_server


def test_many_small_files_go_through_c_in_threads_and_never_through_the_python_loop(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks, datas = many_files(server, tmp_path, 300)
    calls: list[tuple[int, int, int]] = []  # (thread, files, transfers) of each C call
    ended: list[tuple[int, int]] = []  # (thread, task index) of each file reported
    original = _small_files.fetch

    def counting(tasks: list, on_done: Any, **options: Any) -> None:
        calls.append((threading.get_ident(), len(tasks), options["transfers"]))

        def done(index: int, outcome: tuple) -> None:
            ended.append((threading.get_ident(), index))
            on_done(index, outcome)

        original(tasks, done, **options)

    monkeypatch.setattr(_small_files, "fetch", counting)
    monkeypatch.setattr(Downloader, "_run", lambda *args: pytest.fail("a file went through the Python loop"))
    progress: dict[str, tuple[int, int | None]] = {}

    def report(url: str, done: int, total: int | None) -> None:
        progress[url] = (done, total)

    results = downloader(concurrency=16, processes=2, progress=report).fetch_all(tasks)

    for task, result, data in zip(tasks, results, datas, strict=True):
        assert_downloaded(result, task, data)
        assert (result.attempts, result.bytes_transferred) == (1, len(data))
        assert result.mtime_ns == task.dest.stat().st_mtime_ns  # what the warehouse records to skip it next time
    # both threads see every task and claim them one at a time from a shared counter: each file goes once
    assert sorted((files, transfers) for _, files, transfers in calls) == [(300, 8), (300, 8)]
    assert len({thread for thread, _, _ in calls} | {threading.get_ident()}) == 3  # two threads besides this one
    assert sorted(index for _, index in ended) == list(range(300))
    assert all(any(thread == t for t, _ in ended) for thread, _, _ in calls)  # and both took a share
    assert progress == {task.url: (len(data), len(data)) for task, data in zip(tasks, datas, strict=True)}
    assert len(gets_all(server)) == len(tasks)  # one GET each, no HEAD: the catalog's sizes suffice


def test_an_interrupt_stops_the_transfers_soon_and_leaves_nothing_half_written(
    server: FileServer, tmp_path: Path
) -> None:
    tasks, _ = many_files(server, tmp_path, 40)
    for task in tasks:
        server.fault(Path(task.dest).relative_to(tmp_path).as_posix(), "stall", seconds=20, after=500)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # as Ctrl+C does
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        downloader(concurrency=8, processes=2, timeout_s=30).fetch_all(tasks)
    timer.join()
    assert time.monotonic() - started < 3, "the C threads went on after the interrupt"
    for task in tasks:
        assert not task.dest.exists() and leftovers(task.dest) == []


def test_a_write_that_fails_fails_its_file_with_the_reason_and_removes_the_part(
    server: FileServer, tmp_path: Path
) -> None:
    """Files over 4 KiB cannot be written under RLIMIT_FSIZE = 4 KiB (EFBIG): those fail, the others land."""
    big, small = blob(10_000, 1), blob(3_000, 2)
    urls = [server.add("big.bin", big), server.add("small.bin", small)]
    script = f"""
import resource, signal, sys
from pathlib import Path
from mvdata_assets.datasets.fetch import Downloader, FileTask
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
tasks = [FileTask({urls[0]!r}, Path({str(tmp_path / "big.bin")!r}), {len(big)}, {sha256(big)!r}),
         FileTask({urls[1]!r}, Path({str(tmp_path / "small.bin")!r}), {len(small)}, {sha256(small)!r})]
for r in Downloader(retries=2, backoff_s=0.01).fetch_all(tasks):
    print(r.status, r.attempts, r.error, sep="|")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    big_line, small_line = done.stdout.splitlines()
    status, attempts, error = big_line.split("|")
    assert (status, attempts) == ("failed", "1")  # a disk error is not retried
    assert error.startswith("OSError: [Errno 27] File too large") and "big.bin.part" in error, error
    assert small_line.startswith("downloaded|1|")
    assert not (tmp_path / "big.bin").exists() and leftovers(tmp_path / "big.bin") == []
    assert (tmp_path / "small.bin").read_bytes() == small


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (("http://127.0.0.1:1/x", "/tmp/x.part", -1, 10, (), False), "task 0: size -1 and limit 10"),
        (("http://127.0.0.1:1/x", "/tmp/x.part", 10, 5, (), False), "task 0: size 10 and limit 5"),
        (("http://127.0.0.1:1/x", "/tmp/x.part", 10), "a task is (url, part_path, size, limit, headers, md5)"),
        ((b"http://127.0.0.1:1/x", "/tmp/x.part", 10, 10, (), False), "a task is (url, part_path, size, limit"),
        (("http://127.0.0.1:1/x", "/tmp/x.part", 10, 10, ("A: b", 1), False), "task 0: header 1 is int, not a string"),
    ],
)
def test_bad_tasks_are_refused_naming_what_is_wrong(task: tuple, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=None) as raised:
        _small_files.fetch([task], lambda *_: None, transfers=1, timeout_s=1, user_agent="t", cancel=bytearray(1))
    assert message in str(raised.value)


def test_no_transfer_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transfers >= 1 and timeout_s > 0"):
        _small_files.fetch([], lambda *_: None, transfers=0, timeout_s=1, user_agent="t", cancel=bytearray(1))
    with pytest.raises(TypeError):  # the cancel flag must be writable
        _small_files.fetch([], lambda *_: None, transfers=1, timeout_s=1, user_agent="t", cancel=b"\0")
    with pytest.raises(ValueError, match="claim must be a buffer of at least 8 bytes"):
        _small_files.fetch(
            [], lambda *_: None, transfers=1, timeout_s=1, user_agent="t", cancel=bytearray(1), claim=bytearray(4)
        )
    assert os.listdir(tmp_path) == []

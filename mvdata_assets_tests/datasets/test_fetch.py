"""The download engine against a real fault-injecting HTTP server on 127.0.0.1.

Every test drives `Downloader` over real sockets (`FileServer`), so retries, timeouts, checksums, skips, Hugging Face
auth and the disk-space check meet the same failures they meet on real dataset hosts. Resuming a `.part` is tested in
test_partfile.py, making files durable in test_durable.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from mvdata_assets.datasets.fetch import FileResult, FileTask, InsufficientSpace, Known
from mvdata_assets_tests.datasets.downloading import assert_downloaded, blob, downloader, gets, leftovers, sha256
from mvdata_assets_tests.datasets.fileserver import FileServer

HF_FILE = "https://huggingface.co/datasets/x/resolve/main/f.json"
HF_NAME = "datasets/x/resolve/main/f.json"


# -- the happy path --------------------------------------------------------------------------------------------------


def test_file_with_size_and_sha256_downloads(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(300_000)
    task = serve("coco/ann.zip", data)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.expected_bytes == len(data)
    assert result.attempts == 1
    assert result.bytes_transferred == len(data)
    assert result.seconds > 0
    (get,) = gets(file_server, "coco/ann.zip")
    assert get.range is None and get.status == 200
    assert file_server.bytes_sent("coco/ann.zip") == len(data)


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


def test_429_waits_for_retry_after(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(10_000, 2)
    task = serve("busy.bin", data)
    file_server.fault("busy.bin", "status", status=429, retry_after=1)
    (result,) = downloader(max_backoff_s=30).fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, second = gets(file_server, "busy.bin")
    assert (first.status, second.status) == (429, 200)
    assert second.time - first.time >= 0.95  # the server asked for 1 s; backoff_s alone would be ~0.01 s


def test_500_twice_then_success(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 3)
    task = serve("flaky.bin", data)
    file_server.fault("flaky.bin", "status", status=500, times=2)
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 3
    assert [r.status for r in gets(file_server, "flaky.bin")] == [500, 500, 200]


def test_503_forever_fails_after_all_retries(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 4)
    task = serve("down.bin", data)
    file_server.fault("down.bin", "status", status=503, times=100)
    (result,) = downloader(retries=3).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 4
    assert "503" in (result.error or "")
    assert len(gets(file_server, "down.bin")) == 4
    assert not task.dest.exists()
    assert result.sha256 is None


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
    file_server: FileServer, serve: Callable[..., FileTask], length_delta: int, send: str, checks: str
) -> None:
    size = 200_000
    data = blob(size, 10)
    task = serve("liar.bin", data, size=checks == "size+sha256")
    file_server.fault("liar.bin", "wrong_length", length=size + length_delta, send=send)
    (result,) = downloader().fetch_all([task])
    if result.status == "downloaded":
        assert_downloaded(result, task, data, clean=False)  # leftovers: see test_complete_part_answered_416
        assert result.attempts >= 2
    else:
        assert result.status == "failed" and result.error, result
        assert not task.dest.exists()
    assert result.status == "downloaded"  # retrying is enough here: one lie, then the server is honest


def test_slow_drip_completes(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 11)
    task = serve("slow.bin", data)
    file_server.fault("slow.bin", "drip", rate=40_000)
    t0 = time.monotonic()
    (result,) = downloader(timeout_s=0.5).fetch_all([task])
    assert time.monotonic() - t0 >= 0.45
    assert_downloaded(result, task, data)
    assert result.attempts == 1  # a slow but steady body is no timeout


def test_delay_longer_than_the_timeout_is_retried(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(20_000, 12)
    task = serve("late.bin", data)
    file_server.fault("late.bin", "delay", seconds=3)
    t0 = time.monotonic()
    (result,) = downloader(timeout_s=0.3).fetch_all([task])
    assert time.monotonic() - t0 < 2.5  # gave up on the silent attempt instead of waiting the 3 s out
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    assert [r.fault for r in gets(file_server, "late.bin")] == ["delay", None]


def test_delay_every_time_fails_with_a_timeout_reason(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    task = serve("silent.bin", blob(1000, 13))
    file_server.fault("silent.bin", "delay", seconds=3, times=10)
    (result,) = downloader(timeout_s=0.2, retries=1).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 2
    assert "timed out" in (result.error or "").lower() or "timeout" in (result.error or "").lower()
    assert not task.dest.exists()


# -- permanent errors fail at once --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 403, 410])
def test_permanent_status_fails_at_once(file_server: FileServer, tmp_path: Path, status: int) -> None:
    name = f"gone/{status}.zip"
    if status == 404:
        url = file_server.url_for(name)  # nothing served there
    else:
        url = file_server.add(name, blob(1000, status))
        file_server.fault(name, "status", status=status, times=100)
    task = FileTask(url, tmp_path / "gone.zip", 1000)
    (result,) = downloader(retries=5).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 1
    assert str(status) in (result.error or "")
    assert len(gets(file_server, name)) == 1
    assert not task.dest.exists()
    assert leftovers(task.dest) == []


# -- checksums ----------------------------------------------------------------------------------------------------


def test_corrupt_once_then_a_fresh_download_succeeds(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(400_000, 14)
    task = serve("flip.bin", data)
    file_server.fault("flip.bin", "corrupt")
    (result,) = downloader().fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.attempts == 2
    first, fresh = gets(file_server, "flip.bin")
    assert first.fault == "corrupt"
    assert fresh.range is None and fresh.status == 200  # the bad bytes were not resumed from


def test_corrupt_every_time_fails_and_keeps_nothing(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(400_000, 15)
    task = serve("rotten.bin", data)
    file_server.fault("rotten.bin", "corrupt", times=10)
    (result,) = downloader(retries=5).fetch_all([task])
    assert result.status == "failed"
    assert "also after a fresh download" in (result.error or "")
    assert "sha256" in (result.error or "")
    assert result.attempts == 2
    assert len(gets(file_server, "rotten.bin")) == 2
    assert not task.dest.exists()
    assert leftovers(task.dest) == []


@pytest.mark.parametrize("announced", [True, False])
def test_a_body_far_bigger_than_the_catalog_says_fails_at_once_and_keeps_nothing(
    file_server: FileServer, tmp_path: Path, announced: bool
) -> None:
    """A small file is gathered in memory: a body over its size by more than WRITE_BYTES ends the transfer.

    Announced by Content-Length, it ends before the body; without one, once the body has grown that far.
    """
    size = 10_000
    data = blob(8 * 1024 * 1024, 21)
    url = file_server.add("huge.bin", data)
    if not announced:
        file_server.fault("huge.bin", "no_length")
    task = FileTask(url, tmp_path / "huge.bin", size, sha256(data[:size]))
    (result,) = downloader(retries=3).fetch_all([task])
    assert result.status == "failed"
    assert result.error == f"the server sends more than {size + 1024 * 1024} bytes; the catalog says {size}"
    assert result.attempts == 1 and len(gets(file_server, "huge.bin")) == 1  # no retry: it would be sent again
    assert result.bytes_transferred <= size + 1024 * 1024  # no more was held in memory
    assert not task.dest.exists() and leftovers(task.dest) == []


def test_an_error_page_bigger_than_the_file_fails_with_its_status(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("gone.bin", blob(10_000, 22))
    file_server.fault("gone.bin", "status", status=404, body=b"<html>" * 400_000)  # 2.4 MB of error page
    task = FileTask(url, tmp_path / "gone.bin", 10_000, sha256(blob(10_000, 22)))
    (result,) = downloader().fetch_all([task])
    assert result.status == "failed"
    assert result.error == f"HTTP 404 for {url}"
    assert not task.dest.exists() and leftovers(task.dest) == []


# -- skips ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def downloaded(file_server: FileServer, serve: Callable[..., FileTask]) -> tuple[list[FileTask], dict[Path, Known]]:
    """Three files fetched once, the Known records built from the results, and the request log cleared."""
    tasks = [serve(f"skip/{i}.bin", blob(30_000 + i, 100 + i)) for i in range(3)]
    results = downloader().fetch_all(tasks)
    assert [r.status for r in results] == ["downloaded"] * 3
    known = {Path(r.path): Known(r.bytes, r.mtime_ns or 0, r.sha256 or "") for r in results}
    file_server.wait_idle()
    file_server.clear_requests()
    return tasks, known


def test_recorded_files_are_skipped_without_network(
    file_server: FileServer, downloaded: tuple[list[FileTask], dict[Path, Known]]
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
    assert file_server.requests == []


def test_verify_rehashes_locally_and_redownloads_a_corrupted_file(
    file_server: FileServer, downloaded: tuple[list[FileTask], dict[Path, Known]]
) -> None:
    tasks, known = downloaded
    results = downloader().fetch_all(tasks, known, verify=True)
    assert [r.status for r in results] == ["skipped"] * 3
    assert file_server.requests == []

    # Same size, same mtime, different bytes: only re-hashing can tell.
    victim = tasks[1].dest
    good = victim.read_bytes()
    st = victim.stat()
    victim.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    trusted = downloader().fetch_all(tasks, known)
    assert [r.status for r in trusted] == ["skipped"] * 3  # the record is trusted when verify is off
    assert file_server.requests == []

    results = downloader().fetch_all(tasks, known, verify=True)
    assert [r.status for r in results] == ["skipped", "downloaded", "skipped"]
    assert victim.read_bytes() == good
    assert [r.name for r in file_server.requests] == ["skip/1.bin"]


def test_verify_of_files_all_on_disk_needs_no_network_and_no_free_space(
    file_server: FileServer, downloaded: tuple[list[FileTask], dict[Path, Known]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks, known = downloaded
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=1 << 40, used=1 << 40, free=0))
    results = downloader().fetch_all(tasks, known, verify=True)
    assert [r.status for r in results] == ["skipped"] * 3
    assert [(r.method, r.name) for r in file_server.requests] == [], "verify=True probed files that were all on disk"

    tasks[1].dest.unlink()  # now one file must travel, and the full disk cannot hold it
    with pytest.raises(InsufficientSpace, match="GiB missing"):
        downloader().fetch_all(tasks, known, verify=True)
    assert file_server.requests == [], "a run refused for space fetched something first"


def test_existing_file_without_record(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    data = blob(40_000, 17)
    task = serve("byhand/a.bin", data)
    task.dest.parent.mkdir(parents=True)
    task.dest.write_bytes(data)
    (result,) = downloader().fetch_all([task])
    assert (result.status, result.bytes, result.sha256) == ("skipped", len(data), sha256(data))
    assert result.mtime_ns == task.dest.stat().st_mtime_ns
    assert gets(file_server, "byhand/a.bin") == []
    file_server.clear_requests()
    (result,) = downloader().fetch_all([task])
    assert result.status == "skipped"
    assert file_server.requests == []  # hashed locally: no request at all

    for i, wrong in enumerate([bytes(len(data)), data[:1000], data + b"x"]):  # same size, shorter, longer
        task.dest.write_bytes(wrong)
        file_server.clear_requests()
        (result,) = downloader().fetch_all([task])
        assert_downloaded(result, task, data)
        assert len(gets(file_server, "byhand/a.bin")) == 1, i


# -- Hugging Face -------------------------------------------------------------------------------------------------


def test_hf_url_goes_to_the_endpoint_with_the_token(file_server: FileServer, tmp_path: Path) -> None:
    data = b'{"split": "train"}\n' * 100
    file_server.add(HF_NAME, data, require_auth="Bearer hf_secret")
    task = FileTask(HF_FILE, tmp_path / "f.json", None, sha256(data))  # no size: the plan asks with a HEAD
    (result,) = downloader(hf_token="hf_secret", hf_endpoint=file_server.url + "/").fetch_all([task])
    assert_downloaded(result, task, data)
    assert result.url == HF_FILE
    requests = file_server.requests_for(HF_NAME)
    assert {r.method for r in requests} == {"HEAD", "GET"}
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in requests)


def test_hf_token_is_not_sent_along_a_redirect_to_another_host(file_server: FileServer, tmp_path: Path) -> None:
    data = blob(100_000, 18)
    cdn_url = f"http://localhost:{file_server.port}/cdn/blob-123"
    file_server.add("cdn/blob-123", data)
    file_server.redirect(HF_NAME, cdn_url)
    task = FileTask(HF_FILE, tmp_path / "f.json", len(data), sha256(data))
    (result,) = downloader(hf_token="hf_secret", hf_endpoint=file_server.url).fetch_all([task])
    assert_downloaded(result, task, data)
    resolve, cdn = file_server.requests_for(HF_NAME), file_server.requests_for("cdn/blob-123")
    assert [r.status for r in resolve if r.method == "GET"] == [302]
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in resolve)
    assert [r.status for r in cdn if r.method == "GET"] == [200]
    assert cdn[0].headers.get("host", "").startswith("localhost")
    assert all("authorization" not in r.headers for r in cdn)


def test_hf_token_never_appears_in_errors(file_server: FileServer, tmp_path: Path) -> None:
    file_server.add(HF_NAME, b"gated", require_auth="Bearer hf_other")
    file_server.add("datasets/x/resolve/main/down.bin", b"down")
    file_server.fault("datasets/x/resolve/main/down.bin", "status", status=503, times=100)
    tasks = [
        FileTask(HF_FILE, tmp_path / "f.json", 5),
        FileTask("https://huggingface.co/datasets/x/resolve/main/down.bin", tmp_path / "down.bin", 4),
        FileTask("https://huggingface.co/datasets/x/resolve/main/missing.bin", tmp_path / "missing.bin"),
    ]
    results = downloader(hf_token="hf_secret", hf_endpoint=file_server.url, retries=1).fetch_all(tasks)
    assert [r.status for r in results] == ["failed"] * 3
    assert "401" in (results[0].error or "") and results[0].attempts == 1
    assert "503" in (results[1].error or "")
    assert "404" in (results[2].error or "")
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in file_server.requests)
    for result in results:
        assert "hf_secret" not in repr(result)


def test_hf_token_is_not_sent_to_a_host_that_merely_shares_the_endpoint_prefix(
    file_server: FileServer, tmp_path: Path
) -> None:
    """HF_ENDPOINT http://127.0.0.1:4512 must not authorise http://127.0.0.1:45123 (another origin)."""
    endpoint = f"http://127.0.0.1:{str(file_server.port)[:-1]}"
    data = b"public"
    url = file_server.add("public/readme.txt", data)
    assert url.startswith(endpoint)
    task = FileTask(url, tmp_path / "readme.txt", len(data), sha256(data))
    (result,) = downloader(hf_token="hf_secret", hf_endpoint=endpoint).fetch_all([task])
    assert_downloaded(result, task, data)
    leaked = [(r.method, r.path) for r in file_server.requests if "authorization" in r.headers]
    assert leaked == [], f"HF_TOKEN sent to {file_server.url}, which is not HF_ENDPOINT {endpoint}"


# -- disk space ----------------------------------------------------------------------------------------------------


def test_insufficient_space_raises_before_any_get(file_server: FileServer, tmp_path: Path) -> None:
    huge = 10**16
    url = file_server.add("huge.bin", b"not really huge")
    task = FileTask(url, tmp_path / "huge.bin", huge)
    small = FileTask(file_server.add("small.bin", b"small"), tmp_path / "small.bin", 5)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InsufficientSpace) as excinfo:
        downloader().fetch_all([small, task])
    message = str(excinfo.value)
    match = re.search(r"([\d.]+) GiB missing", message)
    assert match, message
    assert abs(float(match.group(1)) - (huge + 5 - free) / 2**30) < 1.0
    assert [r for r in file_server.requests if r.method == "GET"] == []
    assert not task.dest.exists() and not small.dest.exists()
    assert leftovers(task.dest) == []


def test_space_check_counts_only_the_missing_part_of_a_resumed_file(
    file_server: FileServer, serve: Callable[..., FileTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob(2_000_000, 19)
    task = serve("resume-space.bin", data)
    task.dest.parent.mkdir(parents=True)
    task.dest.with_name(task.dest.name + ".part").write_bytes(data[:1_500_000])
    task.dest.with_name(task.dest.name + ".part.validator").write_text(file_server.etag("resume-space.bin"))
    real = shutil.disk_usage

    def tight(path: os.PathLike[str] | str) -> object:
        usage = real(path)
        return type(usage)(usage.total, usage.used, 600_000)

    monkeypatch.setattr("mvdata_assets.datasets.fetch.shutil.disk_usage", tight)
    (result,) = downloader().fetch_all([task])  # needs 500 kB of the 600 kB "free"
    assert_downloaded(result, task, data)
    assert result.bytes_transferred == 500_000


# -- many files at once -------------------------------------------------------------------------------------------


def test_many_files_with_some_faulted(file_server: FileServer, tmp_path: Path) -> None:
    faults = {7: "503", 13: "reset", 21: "corrupt-always", 33: "truncate", 40: "404", 45: "corrupt-once"}
    tasks: list[FileTask] = []
    expected: dict[str, tuple[str, bytes]] = {}
    for i in range(300):
        name = f"shards/{i:04d}.jpg"
        data = blob(16 * 1024, 1000 + i)
        kind = faults.get(i % 50)
        url = file_server.url_for(name) if kind == "404" else file_server.add(name, data)
        if kind == "503":
            file_server.fault(name, "status", status=503)
        elif kind == "reset":
            file_server.fault(name, "reset", after=4000)
        elif kind == "truncate":
            file_server.fault(name, "truncate", after=5000)
        elif kind == "corrupt-always":
            file_server.fault(name, "corrupt", times=10)
        elif kind == "corrupt-once":
            file_server.fault(name, "corrupt")
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
    get_connections = {r.connection for r in file_server.requests if r.method == "GET"}
    assert len(get_connections) > 1
    assert len(get_connections) <= 16 + 6 * 2 * 2  # pooled keep-alive, not one connection per file

    # overlapping transfers: at some point several GETs were in flight together
    spans = sorted((r.time, r.time + (r.duration or 0)) for r in file_server.requests if r.method == "GET")
    in_flight = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert in_flight > 1


def test_connection_left_by_a_503_does_not_fail_another_file(file_server: FileServer, tmp_path: Path) -> None:
    """A 503 (empty body, Retry-After: 1) for file A, and file B fetched on the same Downloader during A's wait.

    B must take 1 attempt. The engine raises on the 503 without reading or closing the response and releases the
    connection to the pool while the exception (holding the response) lives on through the back-off sleep; the next
    request on that connection fails in http.client with ResponseNotReady('Request-sent'), a spurious retry.
    """
    data = blob(16_384, 21)
    task_a = FileTask(file_server.add("a.bin", data), tmp_path / "a.bin", len(data), sha256(data))
    task_b = FileTask(file_server.add("b.bin", data), tmp_path / "b.bin", len(data), sha256(data))
    file_server.fault("a.bin", "status", status=503, retry_after=1, body=b"")
    engine = downloader(max_backoff_s=30, concurrency=2)
    results: list[FileResult] = []
    worker = threading.Thread(target=lambda: results.append(engine.fetch_all([task_a])[0]))
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while not [r for r in file_server.requests_for("a.bin", wait=0) if r.done.is_set()]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # A is now sleeping out its Retry-After
        result_b = engine.fetch_all([task_b])[0]
    finally:
        worker.join(10)
    assert_downloaded(results[0], task_a, data)
    assert results[0].attempts == 2
    assert_downloaded(result_b, task_b, data)
    assert result_b.attempts == 1, "B's first attempt reused the connection A's 503 response still occupied"
    assert len(gets(file_server, "b.bin")) == 1


# -- progress ------------------------------------------------------------------------------------------------------


def test_progress_reports_increasing_bytes_up_to_the_total(
    file_server: FileServer, serve: Callable[..., FileTask]
) -> None:
    sizes = {"p/a.bin": 3_500_000, "p/b.bin": 1_000, "p/c.bin": 2_200_000}
    datas = {name: blob(size, size) for name, size in sizes.items()}
    tasks = [serve(name, data) for name, data in datas.items()]
    file_server.fault("p/c.bin", "truncate", after=1_300_000)  # resumed: counting continues from the kept bytes
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


def test_known_small_sizes_need_no_head_request(file_server: FileServer, serve: Callable[..., FileTask]) -> None:
    """The plan asks the server only what the catalog does not say: small files with a size go straight to GET."""
    tasks = [serve(f"small/{i}.bin", blob(1000, i)) for i in range(5)] + [serve("nosize.bin", blob(1000), size=False)]
    results = downloader().fetch_all(tasks)
    assert [r.status for r in results] == ["downloaded"] * 6
    assert [r.method for r in file_server.requests if r.method == "HEAD"] == ["HEAD"]
    assert [r.name for r in file_server.requests if r.method == "HEAD"] == ["nosize.bin"]


# -- redirects -----------------------------------------------------------------------------------------------------


def test_redirect_to_another_protocol_is_refused(file_server: FileServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("local file")
    file_server.redirect("escape.bin", f"file://{secret}")
    task = FileTask(file_server.url_for("escape.bin"), tmp_path / "out" / "escape.bin", None)
    (result,) = downloader(retries=3).fetch_all([task])
    assert result.status == "failed"
    assert result.attempts == 1  # permanent: no retry can make it allowed
    assert "protocol" in (result.error or "").lower()
    assert not task.dest.exists()


# -- many small files with faults among them ------------------------------------------------------------------------


def test_many_small_files_with_slow_and_refused_ones_among_them(file_server: FileServer, tmp_path: Path) -> None:
    """Stalls, 429s and resets at once, on one loop: each faulted file gets what it needs, the healthy ones go on."""
    faults = {3: "stall", 11: "429", 17: "reset", 29: "410", 31: "delay"}
    tasks, datas = [], []
    for i in range(1000):
        name = f"many/{i:04d}.bin"
        data = blob(4096 + i, 2000 + i)
        kind = faults.get(i % 40)
        file_server.add(name, data)
        if kind == "stall":
            file_server.fault(name, "stall", after=1000, seconds=5)
        elif kind == "429":
            file_server.fault(name, "status", status=429, retry_after=1)
        elif kind == "reset":
            file_server.fault(name, "reset", after=2000)
        elif kind == "410":
            file_server.fault(name, "status", status=410, times=10)
        elif kind == "delay":
            file_server.fault(name, "delay", seconds=5)
        tasks.append(FileTask(file_server.url_for(name), tmp_path / "many" / f"{i:04d}.bin", len(data), sha256(data)))
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

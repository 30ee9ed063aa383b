"""Downloads dataset files completely and verifiably: plan first, resume, retry, checksum while the bytes arrive.

A file is `downloaded` only once its size and checksum matched and it was fsynced and renamed from its `.part`
into place. A killed download resumes from the bytes of its `.part` (Range + If-Range; a 200 answer to a
Range request restarts the file, never appends). Transient errors (timeouts, resets, 5xx, 429 with
Retry-After) retry with backoff; permanent ones (404, 410, 403, a checksum mismatch after a fresh retry) fail
the file with the reason and leave the other files going. Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import urllib3

from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.segments import RangesRefused, SegmentedTransfer

CHUNK_BYTES = 1024 * 1024
PERMANENT_STATUSES = {400, 401, 403, 404, 405, 410, 451}
HF_HOST = "https://huggingface.co"

Progress = Callable[[str, int, int | None], None]  # (url, bytes so far, total or None)


class InsufficientSpace(RuntimeError):
    """The plan needs more free disk than there is; raised before anything is downloaded."""


class PermanentError(Exception):
    """Retrying will not help (404, 403, 410, a checksum that keeps mismatching)."""


class TransientError(Exception):
    """Worth another attempt (timeouts, resets, 5xx, 429); `retry_after` is the server's wish in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class FileTask:
    """One file to have on disk, and what it must match."""

    url: str
    dest: Path
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Known:
    """What an earlier run recorded of a file on disk: enough to skip it without reading it again."""

    bytes: int
    mtime_ns: int
    sha256: str


@dataclass
class FileResult:
    url: str
    path: str
    status: str  # downloaded | skipped | failed
    bytes: int = 0
    expected_bytes: int | None = None
    sha256: str | None = None
    error: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    bytes_transferred: int = 0  # body bytes that crossed the network in this run
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Probe:
    """What a HEAD request told about a file before downloading it."""

    size: int | None
    etag: str | None
    ranges: bool


@dataclass
class Plan:
    tasks: list[FileTask]
    probes: dict[str, Probe | str]  # url -> probe, or the error the HEAD gave
    bytes_needed: int
    bytes_free: int


def _hex(digest: str | None) -> str | None:
    return digest.lower() if digest else None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Downloader:
    """Fetches many files concurrently over pooled keep-alive connections."""

    def __init__(
        self,
        *,
        concurrency: int = 16,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 30.0,
        hf_token: str | None = None,
        hf_endpoint: str | None = None,
        progress: Progress | None = None,
        segments: int = 8,
        segment_min_bytes: int = 64 * 1024 * 1024,  # smaller files gain nothing from several connections
    ) -> None:
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.hf_token = hf_token
        self.hf_endpoint = hf_endpoint.rstrip("/") if hf_endpoint else None
        self.progress = progress
        self.segments = segments
        self.segment_min_bytes = segment_min_bytes
        self._single_stream: set[str] = set()  # urls whose server refused segment ranges
        # urllib3 does the connection pooling and redirects (dropping Authorization when a redirect leaves the
        # host, so HF_TOKEN never reaches a CDN); retries are ours, because a retry must resume from the bytes on
        # disk and be counted per file.
        self._http = urllib3.PoolManager(
            num_pools=64,
            maxsize=concurrency + segments,  # a big file takes `segments` connections at once
            block=False,
            timeout=urllib3.Timeout(connect=min(10.0, timeout_s), read=timeout_s),
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, redirect=10, other=0),
        )

    # ---- addresses and headers ----

    def resolve(self, url: str) -> str:
        """Hugging Face URLs go to HF_ENDPOINT (a mirror) when it is set."""
        if self.hf_endpoint and url.startswith(HF_HOST + "/"):
            return self.hf_endpoint + url[len(HF_HOST) :]
        return url

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"User-Agent": "mvdata-assets/0.1", "Accept-Encoding": "identity"}
        if self.hf_token and any(url.startswith(base + "/") for base in (HF_HOST, self.hf_endpoint) if base):
            headers["Authorization"] = f"Bearer {self.hf_token}"
        return headers

    # ---- plan ----

    def probe(self, url: str) -> Probe:
        resolved = self.resolve(url)
        try:
            response = self._http.request("HEAD", resolved, headers=self._headers(resolved), preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientError(f"HEAD {url}: {type(exc).__name__}: {exc}") from exc
        if response.status >= 400:
            raise (PermanentError if response.status in PERMANENT_STATUSES else TransientError)(
                f"HEAD {url}: HTTP {response.status}"
            )
        length = response.headers.get("Content-Length")
        return Probe(
            size=int(length) if length and length.isdigit() else None,
            etag=response.headers.get("ETag"),
            ranges=response.headers.get("Accept-Ranges", "").lower() == "bytes",
        )

    def plan(self, tasks: list[FileTask], known: dict[Path, Known] | None = None, verify: bool = False) -> Plan:
        """Sizes, ETags and Range support of what must be fetched, and whether it fits on the disk."""
        # what must travel: with `verify`, files on disk are re-hashed locally, not asked for
        to_fetch = [t for t in tasks if not (t.dest.exists() if verify else _present(t, (known or {}).get(t.dest)))]
        # a HEAD only where it tells something: an unknown size, or a file big enough to go in segments
        to_probe = [t for t in to_fetch if t.size is None or t.size >= self.segment_min_bytes]
        probes: dict[str, Probe | str] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for task, outcome in zip(to_probe, pool.map(self._probe_or_error, to_probe), strict=True):
                probes[task.url] = outcome
        needed = 0
        for task in to_fetch:
            probe = probes.get(task.url)
            size = task.size or (probe.size if isinstance(probe, Probe) else None) or 0
            part = task.dest.with_name(task.dest.name + ".part")
            needed += max(0, size - (part.stat().st_size if part.exists() else 0))
        root = tasks[0].dest.parent if tasks else Path(".")
        root.mkdir(parents=True, exist_ok=True)
        return Plan(to_fetch, probes, needed, shutil.disk_usage(root).free)

    def _probe_or_error(self, task: FileTask) -> Probe | str:
        try:
            return self.probe(task.url)
        except (PermanentError, TransientError) as exc:
            return str(exc)

    # ---- fetch ----

    def fetch_all(
        self,
        tasks: list[FileTask],
        known: dict[Path, Known] | None = None,
        *,
        verify: bool = False,
        check_space: bool = True,
    ) -> list[FileResult]:
        """Every task's outcome, in task order; a failed file never stops the others."""
        known = known or {}
        if check_space:
            plan = self.plan(tasks, known, verify)
            if plan.bytes_needed > plan.bytes_free:
                missing = plan.bytes_needed - plan.bytes_free
                raise InsufficientSpace(
                    f"the downloads need {plan.bytes_needed / 2**30:.2f} GiB but {plan.bytes_free / 2**30:.2f} GiB "
                    f"is free under {tasks[0].dest.parent}: {missing / 2**30:.2f} GiB missing"
                )
        probes: dict[str, Probe | str] = plan.probes if check_space else {}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(
                pool.map(
                    lambda t: self.fetch(t, known.get(t.dest), verify=verify, probe=probes.get(t.url), sync_dir=False),
                    tasks,
                )
            )
        # the renames made durable once per folder (0.4 ms a fsync) before anyone records them as downloaded
        for folder in {Path(r.path).parent for r in results if r.status == "downloaded"}:
            try:
                _fsync_dir(folder)
            except OSError as exc:
                for result in results:
                    if result.status == "downloaded" and Path(result.path).parent == folder:
                        result.status, result.error = "failed", f"fsync of {folder}: {exc}"
        return results

    def fetch(
        self,
        task: FileTask,
        known: Known | None = None,
        *,
        verify: bool = False,
        probe: Probe | str | None = None,
        sync_dir: bool = True,
    ) -> FileResult:
        started = time.monotonic()
        result = FileResult(task.url, str(task.dest), "failed", expected_bytes=task.size)
        try:
            if not verify and _present(task, known):
                assert known is not None
                result.status, result.bytes, result.sha256 = "skipped", known.bytes, known.sha256
                result.mtime_ns = known.mtime_ns
            elif task.dest.exists() and self._verify_existing(task, result):
                result.status = "skipped"
            else:
                self._download(task, result, probe if isinstance(probe, Probe) else None)
                if sync_dir:
                    _fsync_dir(task.dest.parent)
                result.status = "downloaded"
        except PermanentError as exc:
            result.error = str(exc)
        except TransientError as exc:
            result.error = f"gave up after {result.attempts} attempts: {exc}"
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return result

    def _verify_existing(self, task: FileTask, result: FileResult) -> bool:
        """A file already in place (from an earlier run, or put there by hand) counts if it matches."""
        digests = Digests(md5=bool(task.md5))
        size = digests.update_from(task.dest)
        if _mismatch(task, size, digests):
            return False
        result.bytes, result.sha256, result.mtime_ns = size, digests.sha256, task.dest.stat().st_mtime_ns
        return True

    def _download(self, task: FileTask, result: FileResult, probe: Probe | None = None) -> None:
        part = task.dest.with_name(task.dest.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        fresh_retry_done = False
        delay = self.backoff_s
        while True:
            result.attempts += 1
            try:
                if self._segmentable(task, part, probe):
                    assert probe is not None and probe.size is not None
                    size, digests = self._transfer_segmented(task, part, result, probe)
                else:
                    size, digests = self._transfer(task, part, result)
            except TransientError as exc:
                if result.attempts > self.retries:
                    raise
                wait = exc.retry_after if exc.retry_after is not None else delay * (0.5 + random.random())
                time.sleep(min(wait, self.max_backoff_s))
                delay = min(delay * 2, self.max_backoff_s)
                continue
            problem = _mismatch(task, size, digests)
            if problem is None:
                break
            part.unlink(missing_ok=True)  # never keep bytes that failed their check
            if fresh_retry_done:
                raise PermanentError(f"{problem} (also after a fresh download)")
            fresh_retry_done = True
        os.replace(part, task.dest)
        result.bytes, result.sha256, result.mtime_ns = size, digests.sha256, task.dest.stat().st_mtime_ns

    def _segmentable(self, task: FileTask, part: Path, probe: Probe | None) -> bool:
        """Big files go as parallel Range requests where the server allows (a single-stream .part stays single)."""
        if self.segments < 2 or probe is None or not probe.ranges or probe.size is None:
            return False
        if probe.size < self.segment_min_bytes or (task.size is not None and task.size != probe.size):
            return False
        if task.url in self._single_stream:
            return False
        return not part.exists() or part.with_name(part.name + ".segments.json").exists()

    def _transfer_segmented(self, task: FileTask, part: Path, result: FileResult, probe: Probe) -> tuple[int, Digests]:
        url = self.resolve(task.url)
        size = probe.size or 0
        transfer = SegmentedTransfer(self._http, url, self._headers(url), part, size, probe.etag, self.segments)
        report = (lambda done: self.progress(task.url, done, size)) if self.progress else None
        try:
            digests = transfer.run(Digests(md5=bool(task.md5)), report)
        except RangesRefused:  # the server would not serve the ranges after all: one stream from the start
            self._single_stream.add(task.url)
            part.unlink(missing_ok=True)
            transfer.state_path.unlink(missing_ok=True)
            raise TransientError("segments refused; fetching as one stream") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(f"a segment broke: {type(exc).__name__}: {exc}") from exc
        finally:
            result.bytes_transferred += transfer.transferred
        return size, digests

    def _transfer(self, task: FileTask, part: Path, result: FileResult) -> tuple[int, Digests]:
        """One attempt: resume the .part if the server honours Range, hash everything, fsync."""
        url = self.resolve(task.url)
        have = part.stat().st_size if part.exists() else 0
        if task.size is not None and have > task.size:
            part.unlink()
            have = 0
        headers = self._headers(url)
        etag_file = part.with_name(part.name + ".etag")
        if have:
            headers["Range"] = f"bytes={have}-"
            if etag_file.exists():
                headers["If-Range"] = etag_file.read_text()
        try:
            response = self._http.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        try:
            status = response.status
            if status == 416 and have and task.size == have:  # the .part was already whole
                response.drain_conn()
                etag_file.unlink(missing_ok=True)
                digests = Digests(md5=bool(task.md5))
                return digests.update_from(part), digests
            if status not in (200, 206):
                response.drain_conn()  # read the error body: the pooled connection stays usable for others
            if status in PERMANENT_STATUSES:
                raise PermanentError(f"HTTP {status} for {task.url}")
            if status == 416:
                part.unlink(missing_ok=True)
                raise TransientError("HTTP 416 for a partial file: restarting it")
            if status == 429 or status >= 500:
                raise TransientError(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
            if status not in (200, 206):
                raise TransientError(f"unexpected HTTP {status}")
            if status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                raise TransientError(f"Content-Range {response.headers.get('Content-Range')!r} for bytes={have}-")
            resume = status == 206
            etag = response.headers.get("ETag")
            if etag:
                etag_file.write_text(etag)  # a later attempt resumes the .part only if the file is unchanged
            digests = Digests(md5=bool(task.md5))
            if resume:
                digests.update_from(part)  # the kept bytes must be part of the file's checksum
            else:
                have = 0
            total = _expected_total(response, have, task.size)
            with open(part, "ab" if resume else "wb") as out:
                written = have
                try:
                    # read1: whatever has arrived, up to a chunk; a full-chunk read would drop a partial
                    # chunk's bytes when the connection breaks, and a resume would fetch them again
                    while block := response.read1(CHUNK_BYTES, decode_content=False):
                        digests.update(block)
                        out.write(block)
                        written += len(block)
                        result.bytes_transferred += len(block)
                        if self.progress:
                            self.progress(task.url, written, total)
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    out.flush()
                    raise TransientError(f"connection broke after {written} of {total or '?'} bytes: {exc}") from exc
                out.flush()
                os.fsync(out.fileno())
            if total is not None and written != total:
                raise TransientError(f"body ended after {written} of {total} bytes")
            etag_file.unlink(missing_ok=True)
            return written, digests
        finally:
            response.release_conn()


def _expected_total(response: urllib3.BaseHTTPResponse, have: int, catalog_size: int | None) -> int | None:
    length = response.headers.get("Content-Length")
    if length and length.isdigit():
        return have + int(length)
    return catalog_size


def _mismatch(task: FileTask, size: int, digests: Digests) -> str | None:
    if task.size is not None and size != task.size:
        return f"size {size} but the catalog says {task.size}"
    if task.sha256 and digests.sha256 != _hex(task.sha256):
        return f"sha256 {digests.sha256} but the catalog says {task.sha256}"
    if task.md5 and digests.md5 != _hex(task.md5):
        return f"md5 {digests.md5} but the catalog says {task.md5}"
    return None


def _present(task: FileTask, known: Known | None) -> bool:
    """On disk as recorded (size and mtime unchanged) and matching the catalog: no need to read it again."""
    if known is None:
        return False
    try:
        st = task.dest.stat()
    except OSError:
        return False
    if (st.st_size, st.st_mtime_ns) != (known.bytes, known.mtime_ns):
        return False
    if task.size is not None and known.bytes != task.size:
        return False
    return not (task.sha256 and known.sha256 != _hex(task.sha256))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

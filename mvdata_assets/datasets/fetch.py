"""Downloads dataset files completely and verifiably: plan first, resume, retry, checksum while the bytes arrive.

A file is `downloaded` only once its size and checksum matched and it was made durable and renamed from its `.part`
into place. A killed download resumes from the bytes of its `.part` (Range + If-Range; a 200 answer to a Range
request restarts the file, never appends). Transient errors (timeouts, resets, 5xx, 429 with Retry-After) retry
with backoff; permanent ones (404, 410, 403, a checksum mismatch after a fresh retry) fail the file with the reason
and leave the other files going. First attempts at small files of known size are made in C (_small_files.c says
why), in threads; a file that did not arrive whole and matching there goes on here, that attempt counted as its
first. The other transfers run on one `CurlLoop` (see transport.py for why); each file is a generator job on it. A
run with many such files shares them out among forked worker processes, each with a loop of its own (see forked.py
for why). Plain Python (but for that C module): nothing here imports Dagster.
"""

from __future__ import annotations

import array
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mvdata_assets.datasets import _small_files, durable, forked
from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.segments import STATE_SUFFIX, RangesRefused, SegmentedTransfer, proxied
from mvdata_assets.datasets.transport import (
    BODY_TOO_BIG,
    USER_AGENT,
    WRITE_BLOCKS,
    WRITE_BYTES,
    CurlLoop,
    Job,
    PermanentError,
    Request,
    TransientError,
    Writer,
    answer_error,
    refusal,
)

HF_HOST = "https://huggingface.co"
# Bodies from this size on record their ETag as they start, so that a killed process can resume them safely; smaller
# ones only when an attempt breaks (a file created per download would cost as much as a small file's transfer),
# and a smaller .part left without its ETag is fetched again from byte 0.
SIDECAR_BYTES = 1024 * 1024
BACKLOG_BYTES = 64 * 1024 * 1024  # verified bodies held in memory for the committer before the loop waits for it
# a batch is committed once it holds this many files or its first file has waited this long (or at the end): each
# syncfs also commits the filesystem's journal, which slows the file creations going on meanwhile
BATCH_FILES = 500
BATCH_WAIT_S = 0.25
# files to fetch per worker process before another is worth its fork (~5-20 ms; a small file costs ~0.3 ms)
FILES_PER_PROCESS = 64
# files per thread of the C fast path (first attempts at small files) before another thread is worth starting
FILES_PER_THREAD = 16
PROGRESS_EVERY_S = 0.1  # a worker process sends its files' progress at most this often
WRITERS = 2  # threads creating the `.part` files of a run, shared out among its worker processes (see _Committer)

Progress = Callable[[str, int, int | None], None]  # (url, bytes so far, total or None)


class InsufficientSpace(RuntimeError):
    """The plan needs more free disk than there is; raised before anything is downloaded."""


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

    def unchanged(self, st: os.stat_result) -> bool:
        """The file on disk (its `stat`) still has the size and mtime recorded: its checksum stands."""
        return (st.st_size, st.st_mtime_ns) == (self.bytes, self.mtime_ns)


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


@dataclass(frozen=True)
class _Checked:
    """The checksums of a body the C fast path received (what `Digests` tells once done)."""

    sha256: str
    md5: str | None


# how a file's first attempt, made by the C fast path, ended: the body's size and checksums, or the error it raised
Attempt = tuple[int, Digests | _Checked] | Exception


class _Outcome(NamedTuple):
    """What the C fast path reports of a file (see _small_files.c)."""

    kind: int  # _small_files.COMPLETE, REFUSED, BROKEN, TOO_BIG, WRITE_FAILED or CANCELLED
    status: int  # of the final answer; 0 when none came
    code: int  # libcurl's error code; with WRITE_FAILED, the errno
    message: str | None  # libcurl's error message; with WRITE_FAILED, the errno's
    retry_after: str | None  # the answer's Retry-After header
    received: int  # body bytes
    sha256: str | None  # of a complete body
    md5: str | None  # of a complete body, when the task asked for it
    mtime_ns: int | None  # of the .part written
    seconds: float
    partial: bytes | None  # the bytes a 200 brought before it broke
    etag: str | None  # that answer's ETag


@dataclass
class Plan:
    tasks: list[FileTask]
    probes: dict[str, Probe | str]  # url -> probe, or the error the HEAD gave
    bytes_needed: int
    bytes_free: int


def _hex(digest: str | None) -> str | None:
    return digest.lower() if digest else None


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
        # Range requests at once for one big file (see segments.py): on loopback, 2 cores, 4 took 1.03 s per GiB
        # against 1.11 s for 8 (medians of 6); with O_DIRECT writes 2, 3, 4 and 6 differ by less than the noise
        # (0.87-0.97 s medians of 7). Several big files at once each open this many to their server.
        segment_connections: int = 4,
        segment_bytes: int = 8 * 1024 * 1024,  # what each of them asks for
        segment_min_bytes: int = 64 * 1024 * 1024,  # smaller files gain nothing from several connections
        processes: int = 1,  # worker processes for many files (see forked.py); 1: all in this process
    ) -> None:
        self.concurrency = concurrency
        self.processes = processes
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.hf_token = hf_token
        self.hf_endpoint = hf_endpoint.rstrip("/") if hf_endpoint else None
        self.progress = progress
        self.segment_connections = segment_connections
        self.segment_bytes = segment_bytes
        self.segment_min_bytes = segment_min_bytes
        self._single_stream: set[str] = set()  # urls whose server refused segment ranges

    def _loop(self) -> CurlLoop:
        # retries are ours, not libcurl's: a retry must resume from the bytes on disk and be counted per file
        return CurlLoop(timeout_s=self.timeout_s)

    # ---- addresses and headers ----

    def resolve(self, url: str) -> str:
        """Hugging Face URLs go to HF_ENDPOINT (a mirror) when it is set."""
        if self.hf_endpoint and url.startswith(HF_HOST + "/"):
            return self.hf_endpoint + url[len(HF_HOST) :]
        return url

    def _headers(self, url: str) -> list[str]:
        """libcurl sends a custom Authorization only to the first host: a redirect to a CDN drops it."""
        headers = ["Accept-Encoding: identity"]
        if self.hf_token and any(url.startswith(base + "/") for base in (HF_HOST, self.hf_endpoint) if base):
            headers.append(f"Authorization: Bearer {self.hf_token}")
        return headers

    # ---- plan ----

    def _probe(self, url: str, probes: dict[str, Probe | str]) -> Job:
        resolved = self.resolve(url)
        request = yield Request(resolved, self._headers(resolved))  # no sink: HEAD
        if request.status and request.status < 400 and not request.error:
            headers = request.response_headers
            length = headers.get("content-length")
            probes[url] = Probe(
                size=int(length) if length and length.isdigit() else None,
                etag=headers.get("etag"),
                ranges=headers.get("accept-ranges", "").lower() == "bytes",
            )
        else:
            probes[url] = f"HEAD: {refusal(request, url)}"

    def _plan(
        self, loop: CurlLoop, listing: _Listing, tasks: list[FileTask], known: dict[Path, Known], verify: bool
    ) -> Plan:
        """Sizes, ETags and Range support of what must be fetched, and whether it fits on the disk."""
        # what must travel: with `verify`, files on disk are re-hashed locally, not asked for
        if verify:
            to_fetch = [t for t in tasks if not listing.has(t.dest)]
        else:
            to_fetch = [t for t in tasks if not (known and _present(t, known.get(t.dest)))]
        # a HEAD only where it tells something: an unknown size, or a file big enough to go in segments
        to_probe = [t for t in to_fetch if t.size is None or t.size >= self.segment_min_bytes]
        probes: dict[str, Probe | str] = {}
        loop.run((self._probe(t.url, probes) for t in to_probe), self.concurrency)
        needed = 0
        for task in to_fetch:
            probe = probes.get(task.url)
            size = task.size or (probe.size if isinstance(probe, Probe) else None) or 0
            have = os.stat(f"{task.dest}.part").st_size if listing.has(task.dest, ".part") else 0
            needed += max(0, size - have)
        root = tasks[0].dest.parent if tasks else Path(".")
        root.mkdir(parents=True, exist_ok=True)
        return Plan(to_fetch, probes, needed, shutil.disk_usage(root).free)

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
        listing = _Listing()
        with self._loop() as loop:
            probes: dict[str, Probe | str] = {}
            if check_space:
                plan = self._plan(loop, listing, tasks, known, verify)
                if plan.bytes_needed > plan.bytes_free:
                    missing = plan.bytes_needed - plan.bytes_free
                    raise InsufficientSpace(
                        f"the downloads need {plan.bytes_needed / 2**30:.2f} GiB but {plan.bytes_free / 2**30:.2f} "
                        f"GiB is free under {tasks[0].dest.parent}: {missing / 2**30:.2f} GiB missing"
                    )
                probes = plan.probes
            return self._fetch(loop, listing, tasks, known, verify, probes)

    def fetch(self, task: FileTask, known: Known | None = None, *, verify: bool = False) -> FileResult:
        """One file, without the plan's HEAD and disk check."""
        with self._loop() as loop:
            return self._fetch(loop, _Listing(), [task], {task.dest: known} if known else {}, verify, {})[0]

    def _fetch(
        self,
        loop: CurlLoop,
        listing: _Listing,
        tasks: list[FileTask],
        known: dict[Path, Known],
        verify: bool,
        probes: dict[str, Probe | str],
    ) -> list[FileResult]:
        results = [FileResult(t.url, str(t.dest), "failed", expected_bytes=t.size) for t in tasks]
        todo: list[tuple[FileTask, FileResult]] = []
        on_disk: list[tuple[FileTask, FileResult]] = []
        for task, result in zip(tasks, results, strict=True):
            record = known.get(task.dest) if known else None
            if not verify and _present(task, record):
                assert record is not None
                result.status, result.bytes, result.sha256 = "skipped", record.bytes, record.sha256
                result.mtime_ns = record.mtime_ns
            else:
                (on_disk if listing.has(task.dest) else todo).append((task, result))
        if on_disk:  # re-hashed in threads, off the loop: hashlib and file reads let go of the GIL
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                kept = list(pool.map(lambda pair: self._keep_existing(*pair), on_disk))
            todo += [pair for pair, keep in zip(on_disk, kept, strict=True) if not keep]
        for folder in {os.path.dirname(task.dest) for task, _ in todo}:  # strings: a Path's hash is dear
            os.makedirs(folder, exist_ok=True)
        firsts: dict[str, Attempt] = {}  # by destination, of the files whose first attempt was made in C
        small: list[tuple[FileTask, FileResult]] = []
        rest: list[tuple[FileTask, FileResult]] = []
        for pair in todo:
            (small if self._small(pair[0], listing) else rest).append(pair)
        todo = rest + self._run_small(small, firsts) if small else rest
        workers = min(self.processes, len(todo) // FILES_PER_PROCESS) if forked.available() else 1
        if workers > 1:
            self._run_forked(todo, probes, listing, firsts, workers)
        elif todo:
            self._run(loop, todo, probes, listing, firsts, self.concurrency, WRITERS)
        return results

    def _small(self, task: FileTask, listing: _Listing) -> bool:
        """A file the C fast path can try first: small, of known size, with no .part to resume, over HTTP(S)."""
        return (
            task.size is not None
            and task.size < WRITE_BYTES
            and self.resolve(task.url).startswith(("http://", "https://"))
            and not listing.has(task.dest, ".part")
        )

    def _run_small(
        self, todo: list[tuple[FileTask, FileResult]], firsts: dict[str, Attempt]
    ) -> list[tuple[FileTask, FileResult]]:
        """First attempts in C (see _small_files.c), `processes` threads of it without the GIL.

        Files that arrived whole and matched go to a committer; the others are returned, each with its first
        attempt's outcome in `firsts`, for the Python engine to go on from (a retry after a pause, a fresh download
        after a mismatch, a failure that needs no second request).
        """
        workers = max(1, min(self.processes, len(todo) // FILES_PER_THREAD))
        again: list[tuple[FileTask, FileResult]] = []
        cancel = bytearray(1)
        claim = array.array("q", [0])  # the next task to start, shared by the threads (C takes it atomically)
        headers_seen: dict[tuple[str, ...], tuple[str, ...]] = {}  # one object per distinct header set: C shares it
        tasks = []
        for task, _ in todo:
            url = self.resolve(task.url)
            headers = tuple(self._headers(url))
            size = task.size or 0
            tasks.append(
                (
                    url,
                    f"{task.dest}.part",
                    size,
                    size + WRITE_BYTES,
                    headers_seen.setdefault(headers, headers),
                    bool(task.md5),
                )
            )

        def on_done(index: int, reported: tuple) -> None:
            task, result = todo[index]
            outcome = _Outcome(*reported)
            if outcome.kind == _small_files.CANCELLED:
                return
            result.bytes_transferred += outcome.received
            result.seconds = outcome.seconds
            first: Attempt
            if outcome.kind == _small_files.COMPLETE:
                checked = _Checked(outcome.sha256, outcome.md5)
                if _mismatch(task, outcome.received, checked) is None:
                    result.attempts, result.bytes, result.sha256 = 1, outcome.received, outcome.sha256
                    result.mtime_ns = outcome.mtime_ns
                    committer.add_written(result, _Part(task.dest, listed=False), task.dest)
                    if self.progress:
                        self.progress(task.url, outcome.received, task.size)
                    return
                first = (outcome.received, checked)
            else:
                first = _failed_attempt(task, outcome)
            firsts[os.fspath(task.dest)] = first
            again.append((task, result))

        committer = _Committer(writers=0)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [
                    pool.submit(
                        _small_files.fetch,
                        tasks,
                        on_done,
                        transfers=-(-self.concurrency // workers),
                        timeout_s=self.timeout_s,
                        user_agent=USER_AGENT,
                        cancel=cancel,
                        claim=claim,
                    )
                    for _ in range(workers)
                ]
                try:
                    for future in futures:
                        future.result()
                except BaseException:  # interrupted, or a bug: the other threads stop soon, dropping what they hold
                    cancel[0] = 1
                    raise
        finally:
            committer.close()
        return again

    def _run(
        self,
        loop: CurlLoop,
        todo: list[tuple[FileTask, FileResult]],
        probes: dict[str, Probe | str],
        listing: _Listing,
        firsts: dict[str, Attempt],
        at_once: int,
        writers: int,
    ) -> None:
        committer = _Committer(writers)
        try:
            jobs = (
                self._job(
                    task,
                    result,
                    probes.get(task.url),
                    listing.has(task.dest, ".part"),
                    committer,
                    firsts.get(os.fspath(task.dest)) if firsts else None,
                )
                for task, result in todo
            )
            loop.run(jobs, at_once)
        finally:
            committer.close()

    def _run_forked(
        self,
        todo: list[tuple[FileTask, FileResult]],
        probes: dict[str, Probe | str],
        listing: _Listing,
        firsts: dict[str, Attempt],
        workers: int,
    ) -> None:
        """The files in `workers` child processes, `concurrency` transfers in all; their outcomes copied back here.

        Shares are dealt biggest file first, so that each holds about as many bytes as files. A share whose process
        ended without reporting fails as a whole (its files are never `downloaded` here, whatever reached the disk:
        the next run finds those in place and checks them).
        """
        ordered = sorted(todo, key=lambda pair: pair[0].size or 0, reverse=True)
        shares = [ordered[i::workers] for i in range(workers)]
        at_once = -(-self.concurrency // workers)
        writers = max(1, WRITERS // workers)

        def work(share: list[tuple[FileTask, FileResult]], send: forked.Send) -> list[dict[str, Any]]:
            batched = _BatchedProgress(send) if self.progress else None
            self.progress = batched
            with self._loop() as loop:
                self._run(loop, share, probes, listing, firsts, at_once, writers)
            if batched:
                batched.flush()
            return [vars(result) for _, result in share]  # plain dicts: several times quicker to unpickle

        def report(batch: list[tuple[str, int, int | None]]) -> None:
            assert self.progress is not None
            for url, done, total in batch:
                self.progress(url, done, total)

        for share, outcome in zip(shares, forked.run_forked(shares, work, report), strict=True):
            if isinstance(outcome, forked.WorkerLost):
                for _, result in share:
                    result.error = f"{outcome} before reporting this file"
            else:
                for (_, result), reported in zip(share, outcome, strict=True):
                    vars(result).update(reported)

    def _keep_existing(self, task: FileTask, result: FileResult) -> bool:
        """A file already in place (from an earlier run, or put there by hand) is kept if it matches.

        True when it needs no download: it matched (skipped), or reading it failed (the result says why).
        """
        started = time.monotonic()
        try:
            digests = Digests(md5=bool(task.md5))
            size = digests.update_from(task.dest)
            if _mismatch(task, size, digests):
                return False
            result.status, result.bytes, result.sha256 = "skipped", size, digests.sha256
            result.mtime_ns = task.dest.stat().st_mtime_ns
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return True

    def _job(
        self,
        task: FileTask,
        result: FileResult,
        probe: Probe | str | None,
        part_listed: bool,
        committer: _Committer,
        first: Attempt | None,
    ) -> Job:
        """One file's download on the loop, until it is verified and handed to the committer, or failed for good."""
        started = time.monotonic() - result.seconds  # the first attempt's time, when it was made in C
        part = None
        try:
            probe_or_none = probe if isinstance(probe, Probe) else None
            part = yield from self._download(task, result, probe_or_none, part_listed, first)
        except PermanentError as exc:
            result.error = str(exc)
        except TransientError as exc:
            result.error = f"gave up after {result.attempts} attempts: {exc}"
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        if part is not None:
            committer.add(result, part, task.dest)

    def _download(
        self, task: FileTask, result: FileResult, probe: Probe | None, part_listed: bool, first: Attempt | None
    ) -> Generator[Any, Any, _Part]:
        """Attempts until the file is verified in its .part; `first`: how an attempt made before (in C) ended."""
        part = _Part(task.dest, part_listed or first is not None)  # that attempt may have left a .part to resume
        fresh_retry_done = False
        delay = self.backoff_s
        while True:
            result.attempts += 1
            try:
                if first is not None:
                    attempt, first = first, None
                    if isinstance(attempt, Exception):
                        raise attempt
                    size, digests = attempt
                elif self._segmentable(task, part, probe):
                    assert probe is not None and probe.size is not None
                    size, digests = yield from self._transfer_segmented(task, part, result, probe)
                else:
                    size, digests = yield from self._transfer(task, part, result)
            except TransientError as exc:
                if result.attempts > self.retries:
                    raise
                wait = exc.retry_after if exc.retry_after is not None else delay * (0.5 + random.random())
                yield min(wait, self.max_backoff_s)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            problem = _mismatch(task, size, digests)
            if problem is None:
                result.bytes, result.sha256 = size, digests.sha256
                return part
            part.discard()  # never keep bytes that failed their check
            if fresh_retry_done:
                raise PermanentError(f"{problem} (also after a fresh download)")
            fresh_retry_done = True

    def _segmentable(self, task: FileTask, part: _Part, probe: Probe | None) -> bool:
        """Big files go as parallel Range requests where the server allows (a single-stream .part stays single)."""
        if self.segment_connections < 2 or probe is None or not probe.ranges or probe.size is None:
            return False
        if probe.size < self.segment_min_bytes or (task.size is not None and task.size != probe.size):
            return False
        if task.url in self._single_stream or proxied(self.resolve(task.url)):
            return False
        return not os.path.exists(part.path) or os.path.exists(part.segments_path)

    def _transfer_segmented(
        self, task: FileTask, part: _Part, result: FileResult, probe: Probe
    ) -> Generator[Any, Any, tuple[int, Digests]]:
        url = self.resolve(task.url)
        size = probe.size or 0
        transfer = SegmentedTransfer(
            url,
            self._headers(url),
            Path(part.path),
            size,
            probe.etag,
            connections=self.segment_connections,
            segment_bytes=self.segment_bytes,
            timeout_s=self.timeout_s,
        )
        part.companions.add(str(transfer.state_path))
        report = (lambda done: self.progress(task.url, done, size)) if self.progress else None
        try:
            digests = yield from transfer.run(Digests(md5=bool(task.md5)), report)
        except RangesRefused:  # the server would not serve the ranges after all: one stream from the start
            self._single_stream.add(task.url)
            part.discard()
            raise TransientError("segments refused; fetching as one stream") from None
        except OSError as exc:
            raise TransientError(f"a segment broke: {type(exc).__name__}: {exc}") from exc
        finally:
            result.bytes_transferred += transfer.transferred
        return size, digests

    def _transfer(self, task: FileTask, part: _Part, result: FileResult) -> Generator[Any, Any, tuple[int, Digests]]:
        """One attempt: resume the .part if the server honours Range, hash everything as it arrives."""
        url = self.resolve(task.url)
        have = part.resumable(task.size)
        headers = self._headers(url)
        if have:
            headers.append(f"Range: bytes={have}-")
            if part.etag:
                headers.append(f"If-Range: {part.etag}")
        body = _Body(task, part, have, result, self.progress)
        # a small body of known size, from byte 0, is gathered by libcurl and handed over whole: a Python call per
        # 16 KiB block cost ~40% of the CPU on 768 KiB files. A body far bigger than the catalog's size ends early.
        whole_up_to = task.size + WRITE_BYTES if task.size is not None and task.size < WRITE_BYTES and not have else 0
        try:
            request = yield Request(url, headers, body, whole_up_to)
        except BaseException:  # the loop stopped: the bytes received are kept for a resume
            body.close(complete=False)
            raise
        body.close(complete=not (request.failure or request.error) and body.total in (None, body.written))
        if request.failure is not None:
            raise request.failure
        if request.error_code == BODY_TOO_BIG and request.status == 200:  # an error page is refused by its status
            part.discard()
            raise PermanentError(f"the server sends more than {whole_up_to} bytes; the catalog says {task.size}")
        status = request.status
        if not request.taken:
            if status == 416 and have and task.size == have:  # the .part was already whole
                digests = Digests(md5=bool(task.md5))
                return digests.update_from(part.path), digests
            if status == 416:
                part.discard()
                raise TransientError("HTTP 416 for a partial file: restarting it")
            if status == 206:
                raise TransientError(f"Content-Range {request.response_headers.get('content-range')!r} for {have}-")
            raise refusal(request, task.url)
        if request.error:
            part.keep_etag()  # the next attempt resumes these bytes only if the file is unchanged
            raise TransientError(f"connection broke after {body.written} of {body.total or '?'} bytes: {request.error}")
        if body.total is not None and body.written != body.total:
            part.keep_etag()
            raise TransientError(f"body ended after {body.written} of {body.total} bytes")
        return body.written, body.digests


class _Part:
    """A file's `.part`, its ETag sidecar (the validator a resume sends as If-Range) and other companions."""

    def __init__(self, dest: Path, listed: bool) -> None:
        self.path = f"{dest}.part"  # a string: a Path per file costs more than this loop can spare for small files
        self.etag: str | None = None  # the validator of the bytes in the .part
        self.companions: set[str] = set()  # files to delete with the .part (the sidecar once written)
        self.content: list[bytes] | None = None  # a verified body the committer writes (None: it is on disk)
        self._listed = listed  # the .part was in its folder's listing: worth a stat
        self._read = False

    @property
    def etag_path(self) -> str:
        return f"{self.path}.etag"

    @property
    def segments_path(self) -> str:
        """Where a segmented download keeps its state (see segments.py): a .part with one has holes."""
        return self.path + STATE_SUFFIX

    def resumable(self, size: int | None) -> int:
        """Bytes of the .part to resume from; one that cannot be trusted is deleted (0)."""
        if not self._listed:  # not there when the run started; an attempt of this run may leave one
            self._listed = True
            return 0
        try:
            have = os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
        if os.path.exists(self.segments_path):  # a segmented .part has its full size, with holes: only its segments
            self.companions.add(self.segments_path)  # resume it
            self.discard()
            return 0
        if not self._read:  # a .part from an earlier run: its sidecar, if any
            self._read = True
            try:
                self.etag = Path(self.etag_path).read_text()
                self.companions.add(self.etag_path)
            except FileNotFoundError:
                pass
        if (size is not None and have > size) or (self.etag is None and have < SIDECAR_BYTES):
            self.discard()
            return 0
        return have

    def restart(self, etag: str | None, total: int | None) -> None:
        """A 200 answer: the .part starts over, and big files record their validator at once."""
        self.etag = etag
        if total is None or total >= SIDECAR_BYTES:
            self.keep_etag()

    def keep_etag(self) -> None:
        if self.etag:
            Path(self.etag_path).write_text(self.etag)
            self.companions.add(self.etag_path)
        elif self.etag_path in self.companions:  # an older validator would claim these bytes
            Path(self.etag_path).unlink(missing_ok=True)
            self.companions.discard(self.etag_path)

    def discard(self) -> None:
        for path in (self.path, *self.companions):
            Path(path).unlink(missing_ok=True)
        self.companions.clear()
        self.etag = None
        self.content = None


class _Body:
    """Takes one answer's body into the .part: appended after a matching 206, from byte 0 after a 200.

    A body that arrives whole within WRITE_BYTES never touches the disk here: it goes to the committer in memory,
    whose thread writes it (creating a file costs more than receiving 64 KiB, and this loop is the bottleneck).
    """

    def __init__(self, task: FileTask, part: _Part, have: int, result: FileResult, progress: Progress | None) -> None:
        self.task, self.part, self.have, self.result, self.progress = task, part, have, result, progress
        self.digests = Digests(md5=bool(task.md5))
        self.written = 0
        self.total: int | None = None
        self.fd: int | None = None
        self.blocks: list[bytes] = []  # received, hashed, not yet written
        self.buffered = 0
        self.taken = False
        self.resumed = False

    def begin(self, request: Request) -> Writer | None:
        headers = request.response_headers
        if request.status == 206 and self.have and headers.get("content-range", "").startswith(f"bytes {self.have}-"):
            self.resumed = True
            self.digests.update_from(self.part.path)  # the kept bytes are part of the file's checksum
        elif request.status == 200:
            self.have = 0
        else:
            return None
        self.taken = True
        self.written = self.have
        length = headers.get("content-length")
        self.total = self.have + int(length) if length and length.isdigit() else self.task.size
        if request.status == 200:
            self.part.restart(headers.get("etag"), self.total)
        return self.write

    def write(self, block: bytes) -> None:
        self.digests.update(block)
        self.blocks.append(block)
        self.buffered += len(block)
        if self.buffered >= WRITE_BYTES or len(self.blocks) >= WRITE_BLOCKS:
            self._flush()
        self.written += len(block)
        self.result.bytes_transferred += len(block)
        if self.progress:
            self.progress(self.task.url, self.written, self.total)

    def _flush(self) -> None:
        if self.fd is None:
            flags = os.O_APPEND if self.resumed else os.O_CREAT | os.O_TRUNC
            self.fd = os.open(self.part.path, os.O_WRONLY | flags, 0o644)
        if self.blocks and os.writev(self.fd, self.blocks) != self.buffered:
            raise OSError(f"short write to {self.part.path} (disk full?)")
        self.blocks, self.buffered = [], 0

    def close(self, complete: bool) -> None:
        """Writes what is left (also the bytes received before a break), or hands a whole small body on in memory."""
        if not self.taken:
            return
        try:
            if complete and self.fd is None and not self.resumed:
                self.part.content = self.blocks
            else:
                self._flush()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class _BatchedProgress:
    """A worker process's progress, the latest figures per file, sent to the parent every PROGRESS_EVERY_S."""

    def __init__(self, send: forked.Send) -> None:
        self._send = send
        self._latest: dict[str, tuple[str, int, int | None]] = {}
        self._sent = time.monotonic()

    def __call__(self, url: str, done: int, total: int | None) -> None:
        self._latest[url] = (url, done, total)
        if time.monotonic() - self._sent >= PROGRESS_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._latest:
            self._send(list(self._latest.values()))
            self._latest.clear()
        self._sent = time.monotonic()


class _Committer:
    """Verified files written, made durable and renamed into place in batches, by threads of their own.

    Why: an fsync per file plus one per folder cost more than a small file's whole transfer. One syncfs per batch,
    then the renames, then one fsync per folder keep the order that matters (the bytes on disk before the name
    points at them, the names on disk before a file is reported `downloaded`). Writers create the `.part` files of
    bodies held in memory (creating a file is the dearest step on a busy disk), while one syncer commits what they
    finished, each batch holding what was written while the one before was being committed. Two writers in all, per
    run: the kernel creates one file at a time per folder (a third writer, or two per worker process, only spins on
    the folder's lock).
    """

    def __init__(self, writers: int) -> None:
        self._to_write: queue.SimpleQueue[tuple[FileResult, _Part, Path] | None] = queue.SimpleQueue()
        self._to_sync: list[tuple[FileResult, _Part, Path]] = []
        self._backlog = 0  # bytes of bodies held in memory, not yet written
        self._changed = threading.Condition()
        self._held_up = False  # the loop waits for the backlog to shrink
        self._written = False  # every writer has stopped
        self._writers = [threading.Thread(target=self._write, daemon=True) for _ in range(writers)]
        self._syncer = threading.Thread(target=self._sync, daemon=True)
        for thread in [*self._writers, self._syncer]:
            thread.start()

    def add(self, result: FileResult, part: _Part, dest: Path) -> None:
        """Queues a verified file; waits while the bodies held in memory exceed BACKLOG_BYTES."""
        if part.content is not None:
            with self._changed:
                while self._backlog > BACKLOG_BYTES and any(w.is_alive() for w in self._writers):
                    self._held_up = True
                    self._changed.wait(1.0)
                self._held_up = False
                self._backlog += result.bytes
        self._to_write.put((result, part, dest))

    def add_written(self, result: FileResult, part: _Part, dest: Path) -> None:
        """Queues a verified file already in its .part, its mtime in `result`: straight to the next batch."""
        self._written_one((result, part, dest))

    def close(self) -> None:
        """Returns once every file added has been committed (or failed with the reason)."""
        for _ in self._writers:
            self._to_write.put(None)
        for writer in self._writers:
            writer.join()
        with self._changed:
            self._written = True
            self._changed.notify_all()
        self._syncer.join()

    def _write(self) -> None:
        while (item := self._to_write.get()) is not None:
            result, part, dest = item
            held = result.bytes if part.content is not None else 0
            try:
                if part.content is not None:
                    result.mtime_ns = _write(part.path, part.content)
                    part.content = None
                else:  # already on disk; a rename keeps the mtime
                    result.mtime_ns = os.stat(part.path).st_mtime_ns
            except OSError as exc:
                result.error = f"writing {os.path.basename(part.path)}: {type(exc).__name__}: {exc}"
                result.mtime_ns = None
            self._written_one(item, held)

    def _written_one(self, item: tuple[FileResult, _Part, Path], held: int = 0) -> None:
        with self._changed:
            self._backlog -= held
            if item[0].error is None:
                self._to_sync.append(item)
            # a wake-up per file kept the loop thread waiting for the GIL: only when a waiter would act on it
            if len(self._to_sync) in (1, BATCH_FILES) or self._held_up:
                self._changed.notify_all()

    def _sync(self) -> None:
        while True:
            with self._changed:
                while not self._to_sync and not self._written:
                    self._changed.wait()
                deadline = time.monotonic() + BATCH_WAIT_S
                while len(self._to_sync) < BATCH_FILES and not self._written and time.monotonic() < deadline:
                    self._changed.wait(deadline - time.monotonic())
                batch, self._to_sync = self._to_sync, []
            if not batch:
                return
            _commit(batch)


def _commit(batch: list[tuple[FileResult, _Part, Path]]) -> None:
    """One syncfs per filesystem for the batch, the renames, one fsync per folder, then the report."""
    try:
        for folder in {os.stat(folder).st_dev: folder for folder in {os.path.dirname(d) for _, _, d in batch}}.values():
            durable.syncfs(folder)
    except OSError as exc:
        for result, _, _ in batch:
            result.error = f"making the download durable: {type(exc).__name__}: {exc}"
            result.mtime_ns = None
        return
    renamed: dict[str, list[FileResult]] = {}
    for result, part, dest in batch:
        try:
            os.replace(part.path, dest)
        except OSError as exc:
            result.error = f"renaming {os.path.basename(part.path)} into place: {type(exc).__name__}: {exc}"
            result.mtime_ns = None
            continue
        for path in part.companions:
            Path(path).unlink(missing_ok=True)
        renamed.setdefault(os.path.dirname(dest), []).append(result)
    for folder, results in renamed.items():
        try:
            durable.fsync_dir(folder)
        except OSError as exc:
            for result in results:
                result.error = f"fsync of {folder}: {exc}"
            continue
        for result in results:
            result.status = "downloaded"


class _Listing:
    """The names in the destination folders, listed once per run: on a busy disk a stat per file costs more."""

    def __init__(self) -> None:
        self._names: dict[str, set[str]] = {}  # by folder, as a string (hashing a Path costs ~10 times more)

    def has(self, path: Path, suffix: str = "") -> bool:
        """Whether `path` (with `suffix` added to its name) was there when its folder was first looked at."""
        folder, _, name = os.fspath(path).rpartition(os.sep)
        names = self._names.get(folder)
        if names is None:
            try:
                names = set(os.listdir(folder or "."))
            except (FileNotFoundError, NotADirectoryError):
                names = set()
            self._names[folder] = names
        return name + suffix in names


def _failed_attempt(task: FileTask, outcome: _Outcome) -> Exception:
    """The error a first attempt in C ended with, as the Python engine's own attempt would have raised it."""
    if outcome.kind == _small_files.WRITE_FAILED:
        return OSError(outcome.code, outcome.message, f"{task.dest}.part")
    if outcome.kind == _small_files.TOO_BIG:
        limit = (task.size or 0) + WRITE_BYTES
        return PermanentError(f"the server sends more than {limit} bytes; the catalog says {task.size}")
    message = outcome.message
    if (
        outcome.partial is not None
    ):  # a 200 that broke: its bytes are kept for a resume, as the Python engine keeps them
        message = f"connection broke after {outcome.received} of {task.size} bytes: {message}"
        part = _Part(task.dest, listed=False)
        with suppress(OSError):  # the retry then starts from byte 0
            _write(part.path, [outcome.partial])
            part.etag = outcome.etag
            part.keep_etag()
    return answer_error(outcome.status, task.url, outcome.retry_after, outcome.code, message)


def _mismatch(task: FileTask, size: int, digests: Digests | _Checked) -> str | None:
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
    if not known.unchanged(st):
        return False
    if task.size is not None and known.bytes != task.size:
        return False
    return not (task.sha256 and known.sha256 != _hex(task.sha256))


def _write(path: str, blocks: list[bytes]) -> int:
    """Creates `path` holding `blocks`; returns its mtime (ns)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if os.writev(fd, blocks) != sum(map(len, blocks)):
            raise OSError(f"short write to {path} (disk full?)")
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)

"""Where downloads are planned and retried: many catalog files fetched completely and verifiably.

`Downloader.fetch_all` takes a run's files through these steps:

1. skip what an earlier run recorded and is unchanged on disk (`files.present`), re-hash files found in place;
2. plan: a HEAD where it tells something (an unknown size, a file big enough for segments), and refuse the run
   before any transfer if the disk cannot hold what is missing (`InsufficientSpace`);
3. each file is a job on one `CurlLoop` (transport.py), attempts until its body matches the catalog in its `.part`
   (`_download`): transient errors (timeouts, resets, 5xx, 429 with Retry-After) retry with backoff, permanent
   ones (404, 403, 410, a checksum that mismatches again after a fresh download) fail the file with the reason and
   leave the others going. A big file goes as parallel Range requests (segments.py) behind one `if`; the rest as
   one stream that resumes its `.part` under a validator (partfile.py);
4. a verified `.part` goes to the `Committer`, which makes it durable and renames it into place (durable.py): only
   then is the file `downloaded`.

Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvdata_assets import defaults
from mvdata_assets.datasets.addresses import CATALOG, AddressPolicy
from mvdata_assets.datasets.connections import proxied
from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.durable import Committer, Verified
from mvdata_assets.datasets.files import (
    FileResult,
    FileTask,
    InsufficientSpace,
    Known,
    Listing,
    Progress,
    mismatch,
    present,
)
from mvdata_assets.datasets.partfile import VALIDATOR_SUFFIX, Body, PartFile, validator_of
from mvdata_assets.datasets.segments import RangesRefused, SegmentedTransfer
from mvdata_assets.datasets.transport import (
    BODY_TOO_BIG,
    CurlLoop,
    Job,
    PermanentError,
    Request,
    TransientError,
    refusal,
)

HF_BASE_URL = "https://huggingface.co"
# a body of known size below this is gathered whole by libcurl and written at once, saving a Python call per 16 KiB
# block (docs/architecture.md, the download path)
GATHER_BELOW = 1024 * 1024


@dataclass(frozen=True)
class Probe:
    """What a HEAD request told about a file before downloading it."""

    size: int | None
    validator: str | None  # what If-Range may carry: a strong ETag or Last-Modified
    ranges: bool


@dataclass
class Plan:
    probes: dict[str, Probe | str]  # url -> probe, or the error the HEAD gave
    bytes_needed: int
    bytes_free: int


class Downloader:
    """Fetches many files concurrently over pooled keep-alive connections."""

    def __init__(
        self,
        *,
        concurrency: int = defaults.DOWNLOAD_CONCURRENCY,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 30.0,
        hf_token: str | None = None,
        hf_endpoint: str | None = None,
        progress: Progress | None = None,
        # Range requests at once for one big file (see segments.py); several big files at once each open this many
        segment_connections: int = 4,
        segment_bytes: int = 8 * 1024 * 1024,  # what each of them asks for
        segment_min_bytes: int = 64 * 1024 * 1024,  # smaller files gain nothing from several connections
        addresses: AddressPolicy = CATALOG,  # where requests may go (see addresses.py)
    ) -> None:
        self.addresses = addresses
        self.concurrency = concurrency
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
        return CurlLoop(timeout_s=self.timeout_s, addresses=self.addresses)

    # ---- addresses and headers ----

    def resolve(self, url: str) -> str:
        """Hugging Face URLs go to HF_ENDPOINT (a mirror) when it is set."""
        if self.hf_endpoint and url.startswith(HF_BASE_URL + "/"):
            return self.hf_endpoint + url[len(HF_BASE_URL) :]
        return url

    def _headers(self, url: str) -> list[str]:
        """libcurl sends a custom Authorization only to the first host: a redirect to a CDN drops it."""
        headers = ["Accept-Encoding: identity"]
        if self.hf_token and any(url.startswith(base + "/") for base in (HF_BASE_URL, self.hf_endpoint) if base):
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
                validator=validator_of(headers),
                ranges=headers.get("accept-ranges", "").lower() == "bytes",
            )
        else:
            probes[url] = f"HEAD: {refusal(request, url)}"

    def _plan(
        self, loop: CurlLoop, listing: Listing, tasks: list[FileTask], known: dict[Path, Known], verify: bool
    ) -> Plan:
        """Sizes, ETags and Range support of what must be fetched, and whether it fits on the disk."""
        # what must travel: with `verify`, files on disk are re-hashed locally, not asked for
        if verify:
            to_fetch = [t for t in tasks if not listing.has(t.dest)]
        else:
            to_fetch = [t for t in tasks if not (known and present(t, known.get(t.dest)))]
        # a HEAD only where it tells something: an unknown size, or a file big enough to go in segments
        to_probe = [t for t in to_fetch if t.size is None or t.size >= self.segment_min_bytes]
        probes: dict[str, Probe | str] = {}
        loop.run((self._probe(t.url, probes) for t in to_probe), self.concurrency)
        needed = 0
        for task in to_fetch:
            probe = probes.get(task.url)
            size = task.size or (probe.size if isinstance(probe, Probe) else None) or 0
            # only a .part with its validator is resumed (partfile.py): any other starts again from byte 0
            resumable = listing.has(task.dest, ".part") and listing.has(task.dest, ".part" + VALIDATOR_SUFFIX)
            have = os.stat(f"{task.dest}.part").st_size if resumable else 0
            needed += max(0, size - have)
        root = tasks[0].dest.parent if tasks else Path(".")
        root.mkdir(parents=True, exist_ok=True)
        return Plan(probes, needed, shutil.disk_usage(root).free)

    # ---- fetch ----

    def fetch_all(
        self,
        tasks: list[FileTask],
        known: dict[Path, Known] | None = None,
        *,
        verify: bool = False,
    ) -> list[FileResult]:
        """Every task's outcome, in task order; a failed file never stops the others."""
        known = known or {}
        listing = Listing()
        with self._loop() as loop:
            plan = self._plan(loop, listing, tasks, known, verify)
            if plan.bytes_needed > plan.bytes_free:
                missing = plan.bytes_needed - plan.bytes_free
                raise InsufficientSpace(
                    f"the downloads need {plan.bytes_needed / 2**30:.2f} GiB but {plan.bytes_free / 2**30:.2f} "
                    f"GiB is free under {tasks[0].dest.parent}: {missing / 2**30:.2f} GiB missing"
                )
            return self._fetch(loop, listing, tasks, known, verify, plan.probes)

    def _fetch(
        self,
        loop: CurlLoop,
        listing: Listing,
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
            if not verify and present(task, record):
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
        if todo:
            committer = Committer()
            try:
                jobs = (self._job(task, result, probes.get(task.url), listing, committer) for task, result in todo)
                loop.run(jobs, self.concurrency)
            finally:
                committer.close()
        return results

    def _keep_existing(self, task: FileTask, result: FileResult) -> bool:
        """A file already in place (from an earlier run, or put there by hand) is kept if it matches.

        True when it needs no download: it matched (skipped), or reading it failed (the result says why).
        """
        started = time.monotonic()
        try:
            digests = Digests(md5=bool(task.md5))
            size = digests.update_from(task.dest)
            if mismatch(task, size, digests):
                return False
            result.status, result.bytes, result.sha256 = "skipped", size, digests.sha256
            result.mtime_ns = task.dest.stat().st_mtime_ns
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return True

    def _job(
        self, task: FileTask, result: FileResult, probe: Probe | str | None, listing: Listing, committer: Committer
    ) -> Job:
        """One file's download on the loop, until it is verified and handed to the committer, or failed for good."""
        started = time.monotonic()
        part = PartFile(task.dest, listing.has(task.dest, ".part"))
        try:
            yield from self._download(task, result, probe if isinstance(probe, Probe) else None, part)
        except PermanentError as exc:
            result.error = str(exc)
        except TransientError as exc:
            result.error = f"gave up after {result.attempts} attempts: {exc}"
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        else:
            result.seconds = time.monotonic() - started
            committer.add(Verified(result, part.path, os.fspath(task.dest), part.companions, part.content))
            return
        result.seconds = time.monotonic() - started

    def _download(self, task: FileTask, result: FileResult, probe: Probe | None, part: PartFile) -> Generator[Any]:
        """Attempts until the file is verified in its .part: the retries, and one fresh download after a mismatch."""
        fresh_retry_done = False
        delay = self.backoff_s
        while True:
            result.attempts += 1
            try:
                if self._segmentable(task, part, probe):
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
            problem = mismatch(task, size, digests)
            if problem is None:
                result.bytes, result.sha256 = size, digests.sha256
                return
            part.discard()  # never keep bytes that failed their check
            if fresh_retry_done:
                raise PermanentError(f"{problem} (also after a fresh download)")
            fresh_retry_done = True

    def _segmentable(self, task: FileTask, part: PartFile, probe: Probe | None) -> bool:
        """Big files go as parallel Range requests where the server allows (a single-stream .part stays single)."""
        if self.segment_connections < 2 or probe is None or not probe.ranges or probe.size is None:
            return False
        if probe.size < self.segment_min_bytes or (task.size is not None and task.size != probe.size):
            return False
        if task.url in self._single_stream or proxied(self.resolve(task.url)):
            return False
        return not os.path.exists(part.path) or os.path.exists(part.segments_path)

    def _transfer_segmented(
        self, task: FileTask, part: PartFile, result: FileResult, probe: Probe
    ) -> Generator[Any, Any, tuple[int, Digests]]:
        url = self.resolve(task.url)
        size = probe.size or 0
        transfer = SegmentedTransfer(
            url,
            self._headers(url),
            Path(part.path),
            size,
            probe.validator,
            connections=self.segment_connections,
            segment_bytes=self.segment_bytes,
            timeout_s=self.timeout_s,
            addresses=self.addresses,
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

    def _transfer(self, task: FileTask, part: PartFile, result: FileResult) -> Generator[Any, Any, tuple[int, Digests]]:
        """One attempt: resume the .part if the server honours Range, hash everything as it arrives."""
        url = self.resolve(task.url)
        have = part.resumable(task.size)
        headers = self._headers(url)
        if have:  # `resumable` vouches for a validator: a changed file comes back whole (200), never spliced
            headers += [f"Range: bytes={have}-", f"If-Range: {part.validator}"]
        body = Body(task, part, have, result, self.progress)
        # a small body of known size comes whole; one far bigger than the catalog says ends early (BODY_TOO_BIG)
        small = task.size is not None and task.size < GATHER_BELOW and not have
        whole_up_to = task.size + GATHER_BELOW if small and task.size is not None else 0
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
            if status == 416:  # a range the server does not have proves nothing: the file starts over
                part.discard()
                raise TransientError("HTTP 416 for a partial file: restarting it")
            if status == 206:
                raise TransientError(f"Content-Range {request.response_headers.get('content-range')!r} for {have}-")
            raise refusal(request, task.url)
        if request.error:
            part.keep_validator()  # the next attempt resumes these bytes only if the file is unchanged
            raise TransientError(f"connection broke after {body.written} of {body.total or '?'} bytes: {request.error}")
        if body.total is not None and body.written != body.total:
            part.keep_validator()
            raise TransientError(f"body ended after {body.written} of {body.total} bytes")
        return body.written, body.digests

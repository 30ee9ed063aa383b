"""Image URL lists (CC3M, CC12M, SBU, LAION-style parquet) into WebDataset tar shards, every URL's outcome recorded.

The list is read as a stream (list_files.py) and cut into shards of `shard_size` rows. Every image of every shard is
fetched on one `CurlLoop` (libcurl's multi interface: pooled keep-alive connections, a per-host connection limit,
libcurl's DNS cache, a stall timeout), and the next shard's transfers start while the last ones of the previous
shard are still running, so a slow host holds up one transfer, not a shard. Each answer is an image or fails with an
error kind (images.py says which). A 5xx, a 429 or a refused connection is tried again
(`retries` times, after a growing pause or the server's Retry-After) before it counts as failed; a timeout is not,
since at list scale most timeouts are dead hosts.

Per shard `i`: `{i:05d}.tar` (`{key}.jpg|png|gif|webp`, `{key}.txt` caption, `{key}.json` url and status) and
`{i:05d}.parquet` with one row per URL, both written as `.part`, fsynced and renamed, each rename made durable (the
folder fsynced) before the next step, the parquet last: a shard with both is finished and skipped by the next run;
`retry_failed` fetches its failed URLs again and rewrites it. A shard's key numbering follows the list's rows, so
`_list.json` records which list (its sha256) and which reading of it (format, columns, shard size) the shards come
from: when either changes, the old shards are stale and are removed first.
Each tar's sha256 is computed as it is written, so the warehouse can record and later verify it. Plain Python:
nothing here imports Dagster.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from mvdata_assets.datasets import durable
from mvdata_assets.datasets.addresses import AddressPolicy
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.digests import Digests, sha256_of
from mvdata_assets.datasets.images import ERROR_KINDS, classify, decode, describe_error_kind, is_transient
from mvdata_assets.datasets.list_files import Row, UrlListError, is_url, read_list
from mvdata_assets.datasets.transport import (
    CurlLoop,
    Job,
    Request,
    Writer,
    retry_after,
)

__all__ = [
    "ERROR_KINDS",
    "OUTCOME_SCHEMA",
    "ListPlan",
    "count_list",
    "ShardResult",
    "UrlListError",
    "UrlListRun",
    "describe_error_kind",
    "fetch_url_list",
    "finished_shards",
    "plan_url_list",
    "read_list",
]

MAX_IMAGE_BYTES = 32 * 1024 * 1024
TAR_SHA256, TAR_BYTES = "tar_sha256", "tar_bytes"  # in a shard parquet's metadata: the tar it was finished with
CLAIM_SUFFIX = ".lock"  # `<shard>.lock`: held by the process writing a shard of a part
LIST_RECORD = "_list.json"  # which list, and which reading of it, the shards of a folder come from
NO_RETRY_KINDS = {"invalid_url"}  # fetching again can't help
MAX_RETRY_PAUSE_S = 30.0  # a longer Retry-After is not waited for: the URL fails as http_429 / http_503

OUTCOME_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),  # downloaded | failed
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("content_type", pa.string()),
        ("bytes", pa.int64()),
        ("attempts", pa.int32()),
        ("width", pa.int32()),  # decoded images only (url_list `decode: true`)
        ("height", pa.int32()),
    ]
)


# what each error kind usually means, for the reports; "link rot" are the kinds saying the image is gone for good
@dataclass
class ShardResult:
    """One shard's counts for this run: `skipped` are the images already in place from an earlier run."""

    index: int
    state: str  # fetched | retried | skipped
    tar_path: Path
    total: int = 0
    downloaded: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0  # of the images fetched by this run
    error_kinds: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    sha256: str | None = None  # of the tar: written now, or recorded in its parquet
    tar_bytes: int = 0
    image_bytes: int = 0  # of every image in the shard, fetched now or before

    @property
    def in_place(self) -> int:
        return self.downloaded + self.skipped


@dataclass
class UrlListRun:
    """What one run did with one list."""

    shards: list[ShardResult]
    seconds: float
    stale_removed: int = 0  # shards of an earlier list (or reading of it) removed before this run
    busy: list[int] = field(default_factory=list)  # shards of a part that another process was writing, left to it

    def _sum(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.shards)

    @property
    def downloaded(self) -> int:
        return self._sum("downloaded")

    @property
    def failed(self) -> int:
        return self._sum("failed")

    @property
    def skipped(self) -> int:
        return self._sum("skipped")

    @property
    def total(self) -> int:
        return self._sum("total")

    @property
    def bytes(self) -> int:
        return self._sum("bytes")

    @property
    def error_kinds(self) -> Counter[str]:
        return sum((s.error_kinds for s in self.shards), Counter())

    @property
    def images_per_second(self) -> float:
        return self.downloaded / self.seconds if self.seconds else 0.0


class _Body:
    """Takes a 200 answer's body, gathered whole by libcurl up to the size limit (images are small)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def begin(self, request: Request) -> Writer | None:
        return self.parts.append if request.status == 200 else None


# --- shards ----------------------------------------------------------------------------------------------------------


class _HashedFile:
    """The file object tarfile writes a shard through: the shard's sha256 is known when it is closed, unread."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.digests = Digests()

    def write(self, data: bytes) -> int:
        self.digests.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class _Fetching:
    """How each image is fetched: the body limit, and the retries of transient failures."""

    max_bytes: int
    retries: int
    backoff_s: float
    decode: bool = False


class _Shard:
    """One shard being written: its tar grows as images arrive; the parquet is written when the last URL is done."""

    def __init__(
        self,
        out_dir: Path,
        index: int,
        rows: list[Row],
        width: int,
        previous: pa.Table | None,
        on_finished: Callable[[ShardResult], None],
    ) -> None:
        self.on_finished = on_finished
        self.tar_path = out_dir / f"{index:05d}.tar"
        self.parquet_path = out_dir / f"{index:05d}.parquet"
        self.started = time.monotonic()
        self.mtime = int(time.time())
        state = "retried" if previous is not None else "fetched"
        self.result = ShardResult(index, state, self.tar_path, total=len(rows))
        if previous is None:
            keys = [f"{index:05d}{i:0{width}d}" for i in range(len(rows))]
            self.outcomes: list[dict] = [
                {"key": k, "url": u, "caption": c, "status": "failed", "error_kind": None, "error": None,
                 "http_status": None, "content_type": None, "bytes": 0, "attempts": 0}
                for k, (u, c) in zip(keys, rows, strict=True)
            ]  # fmt: skip
            self.todo = list(range(len(rows)))
        else:
            self.outcomes = previous.to_pylist()
            self.todo = [
                i
                for i, o in enumerate(self.outcomes)
                if o["status"] == "failed" and o["error_kind"] not in NO_RETRY_KINDS
            ]
        self.tar_part = self.tar_path.with_name(self.tar_path.name + ".part")
        self.tar_file = _HashedFile(self.tar_part)
        self.tar = tarfile.open(fileobj=self.tar_file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - finish()
        if previous is not None:  # keep the images already there, except those about to be fetched again
            again = {self.outcomes[i]["key"] for i in self.todo}
            with tarfile.open(self.tar_path) as old:
                for member in old:
                    if member.name.split(".", 1)[0] not in again:
                        self.tar.addfile(member, old.extractfile(member))
        self.pending = 0
        self.sealed = False  # every job is handed out: the last one to finish finishes the shard

    def jobs(self, fetching: _Fetching) -> Iterator[Job]:
        for i in self.todo:
            outcome = self.outcomes[i]
            if is_url(outcome["url"]):
                self.pending += 1
                yield self._fetch(i, fetching)
            else:
                outcome.update(error_kind="invalid_url", error=f"not an http(s) URL: {outcome['url'][:80]!r}")
        self.sealed = True
        if not self.pending:
            self.on_finished(self.finish())

    def _fetch(self, i: int, fetching: _Fetching) -> Job:
        for attempt in range(1, fetching.retries + 2):
            body = _Body()
            request = yield Request(self.outcomes[i]["url"], [], body, fetching.max_bytes)
            data = b"".join(body.parts)
            kind, error, ext = classify(request, data)
            if kind is None and fetching.decode:
                error, size = decode(data)
                kind = "undecodable" if error else None
                self.outcomes[i]["width"], self.outcomes[i]["height"] = size or (None, None)
            if kind is None or attempt > fetching.retries or not is_transient(request, kind):
                break
            asked = retry_after(request.response_headers.get("retry-after"))
            if asked is not None and asked > MAX_RETRY_PAUSE_S:
                break
            yield asked if asked is not None else fetching.backoff_s * 2 ** (attempt - 1)
        self._record(i, request, data, (kind, error, ext), attempt)

    def _record(self, i: int, request: Request, body: bytes, verdict: tuple, attempts: int) -> None:
        outcome = self.outcomes[i]
        kind, error, ext = verdict
        content_type = request.response_headers.get("content-type")
        outcome.update(error_kind=kind, error=error, http_status=request.status or None, content_type=content_type,
                       attempts=attempts)  # fmt: skip
        if kind is None:
            key = outcome["key"]
            outcome.update(status="downloaded", bytes=len(body))
            meta = {"key": key, "url": outcome["url"], "caption": outcome["caption"], "status": request.status,
                    "bytes": len(body), "content_type": content_type}  # fmt: skip
            if outcome.get("width") is not None:
                meta |= {"width": outcome["width"], "height": outcome["height"]}
            _add(self.tar, f"{key}.{ext}", body, self.mtime)
            if outcome["caption"] is not None:
                _add(self.tar, f"{key}.txt", outcome["caption"].encode("utf-8"), self.mtime)
            _add(self.tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"), self.mtime)
        self.pending -= 1
        if self.sealed and not self.pending:
            self.on_finished(self.finish())

    def finish(self) -> ShardResult:
        """Tar first, parquet last: the parquet's presence is what marks the shard finished."""
        self.tar.close()
        self.tar_file.close()
        durable.replace(self.tar_part, self.tar_path)  # on disk, name and all, before the parquet saying it is finished
        result = self.result
        result.sha256, result.tar_bytes = self.tar_file.digests.sha256, self.tar_path.stat().st_size
        parquet_part = self.parquet_path.with_name(self.parquet_path.name + ".part")
        table = pa.Table.from_pylist(self.outcomes, schema=OUTCOME_SCHEMA)
        tar = {TAR_SHA256: result.sha256, TAR_BYTES: str(result.tar_bytes)}  # so whoever records it need not hash it
        pq.write_table(table.replace_schema_metadata(tar), parquet_part)
        durable.replace(parquet_part, self.parquet_path)
        again = set(self.todo)
        for i, o in enumerate(self.outcomes):
            result.image_bytes += o["bytes"] or 0
            if o["status"] == "failed":
                result.failed += 1
                result.error_kinds[o["error_kind"]] += 1
            elif i in again:
                result.downloaded += 1
                result.bytes += o["bytes"]
            else:
                result.skipped += 1
        result.seconds = time.monotonic() - self.started
        return result


def _finished(index: int, tar_path: Path, table: pa.Table) -> ShardResult:
    """Counts of a shard an earlier run finished: its images are skipped, its failures still count as failed. The
    tar's sha256 is the one its parquet records, while the tar still has the size recorded with it."""
    result = ShardResult(index, "skipped", tar_path, total=table.num_rows, tar_bytes=tar_path.stat().st_size)
    written = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    if written.get(TAR_BYTES) == str(result.tar_bytes):
        result.sha256 = written.get(TAR_SHA256)
    columns = (table.column(name).to_pylist() for name in ("status", "error_kind", "bytes"))
    for status, kind, size in zip(*columns, strict=True):
        result.image_bytes += size or 0
        if status == "failed":
            result.failed += 1
            result.error_kinds[kind] += 1
        else:
            result.skipped += 1
    return result


def _batches(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while batch := list(itertools.islice(rows, size)):
        yield batch


def _fingerprint(list_path: Path, captions: Path | None, spec: UrlList, list_sha256: str | None) -> dict:
    """What the shards' keys depend on: the list's bytes and how it is read."""
    return {
        "list_sha256": list_sha256 or sha256_of(list_path),
        "captions_sha256": sha256_of(captions) if captions is not None else None,
        "format": spec.format,
        "url_column": spec.url_column,
        "caption_column": spec.caption_column,
        "header": spec.header,
        "shard_size": spec.shard_size,
    }


def _recorded(out_dir: Path) -> dict | None:
    """The fingerprint of the list the shards in `out_dir` come from (None: no shards were planned there)."""
    record = out_dir / LIST_RECORD
    return json.loads(record.read_text()) if record.exists() else None


def _remove_stale(out_dir: Path, fingerprint: dict) -> int:
    """Removes shards written from another list or another reading of it; returns how many."""
    record = out_dir / LIST_RECORD
    if _recorded(out_dir) == fingerprint:
        return 0
    stale = [p for pattern in ("*.tar", "*.parquet", "*.part", f"*{CLAIM_SUFFIX}") for p in out_dir.glob(pattern)]
    for path in stale:
        path.unlink()
    part = record.with_name(record.name + ".part")
    part.write_text(json.dumps(fingerprint, sort_keys=True))
    durable.replace(part, record)
    return sum(p.suffix == ".parquet" for p in stale)


def fetch_url_list(
    list_path: Path,
    out_dir: Path,
    spec: UrlList,
    *,
    captions: Path | None = None,
    list_sha256: str | None = None,
    concurrency: int = 64,
    max_host_connections: int = 16,
    timeout_s: float = 10.0,
    max_bytes: int = MAX_IMAGE_BYTES,
    retries: int = 2,
    retry_backoff_s: float = 1.0,
    retry_failed: bool = False,
    on_shard: Callable[[ShardResult], None] | None = None,
    allowed_networks: Sequence[str] = (),
    shards: range | None = None,
) -> UrlListRun:
    """Fetch the images of one URL list into `out_dir` as WebDataset shards; finished shards are skipped.

    `captions` is the paired captions file of a `lines` list; `list_sha256` saves hashing a list whose sha256 is
    known. `timeout_s` ends a transfer that received nothing for that long. `retry_failed` fetches the failed URLs
    of finished shards again and rewrites them. `on_shard` hears of each shard as it is finished or found finished.
    Images reach public addresses only, and the `allowed_networks` (see addresses.py).

    `shards` fetches only those shard indexes: one part of a list that several processes or machines fetch at once,
    after `plan_url_list` has removed stale shards for all of them (a part never removes anything).
    """
    started = time.monotonic()
    fingerprint = _fingerprint(list_path, captions, spec, list_sha256)
    if shards is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = _remove_stale(out_dir, fingerprint)
    elif _recorded(out_dir) == fingerprint:
        stale = 0
    else:
        raise UrlListError(
            f"{out_dir} holds no shards planned from this version of {list_path.name} (or its reading): "
            "plan the list again (materialise its dataset asset) before fetching parts of it"
        )
    width = len(str(spec.shard_size - 1))
    fetching = _Fetching(max_bytes, retries, retry_backoff_s, spec.decode)
    results: list[ShardResult] = []
    busy: list[int] = []  # shards another process was writing: left to it

    def finished(result: ShardResult) -> None:
        results.append(result)
        if on_shard is not None:
            on_shard(result)

    def jobs() -> Iterator[Job]:
        for index, rows in enumerate(_batches(read_list(list_path, spec, captions), spec.shard_size)):
            if shards is not None and index not in shards:
                if index >= shards.stop:
                    return
                continue
            done = finished
            if shards is not None:  # a part may run twice at once (a step started again elsewhere): one writer a shard
                claim = FileLock(out_dir / f"{index:05d}{CLAIM_SUFFIX}")
                try:
                    claim.acquire(timeout=0)
                except Timeout:
                    busy.append(index)
                    continue
                done = functools.partial(_release_then, claim, finished)
            tar_path, parquet_path = out_dir / f"{index:05d}.tar", out_dir / f"{index:05d}.parquet"
            previous = None
            if tar_path.exists() and parquet_path.exists():
                table = pq.read_table(parquet_path)
                if not (retry_failed and "failed" in table.column("status").to_pylist()):
                    done(_finished(index, tar_path, table))
                    continue
                previous = table
            yield from _Shard(out_dir, index, rows, width, previous, done).jobs(fetching)

    addresses = AddressPolicy.third_party(allowed_networks)
    with CurlLoop(timeout_s=timeout_s, max_host_connections=max_host_connections, addresses=addresses) as loop:
        loop.run(jobs(), at_once=concurrency)
    results.sort(key=lambda r: r.index)
    return UrlListRun(results, time.monotonic() - started, stale, busy)


def _release_then(claim: FileLock, finished: Callable[[ShardResult], None], result: ShardResult) -> None:
    claim.release()
    finished(result)


@dataclass(frozen=True)
class ListPlan:
    """A list made ready to be fetched in parts: how many shards it makes."""

    rows: int
    shards: int
    stale_removed: int  # shards of an earlier list (or reading of it) removed


def plan_url_list(
    list_path: Path, out_dir: Path, spec: UrlList, *, captions: Path | None = None, list_sha256: str | None = None
) -> ListPlan:
    """Once, before a list's shards are fetched in parts (`fetch_url_list(shards=...)`, perhaps on other machines):
    removes the shards of an earlier list or reading of it and records which list the shards come from, so no part
    removes another's work; counts the list's rows (one streaming read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale(out_dir, _fingerprint(list_path, captions, spec, list_sha256))
    return dataclasses.replace(count_list(list_path, spec, captions), stale_removed=stale)


def count_list(list_path: Path, spec: UrlList, captions: Path | None = None) -> ListPlan:
    """How many rows and shards a list makes (one streaming read); nothing is removed."""
    rows = sum(1 for _ in read_list(list_path, spec, captions))
    return ListPlan(rows, -(-rows // spec.shard_size), 0)


def finished_shards(out_dir: Path) -> list[ShardResult]:
    """The counts of every finished shard in `out_dir` (a tar and its parquet), in index order: what the parts of a
    list left, for the one step that records them in the warehouse."""
    results = []
    for parquet in sorted(out_dir.glob("[0-9]*.parquet")):
        tar = parquet.with_suffix(".tar")
        if tar.exists():
            results.append(_finished(int(parquet.stem), tar, pq.read_table(parquet)))
    return results

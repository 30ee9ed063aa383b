"""One shard of a URL list: its WebDataset tar grows as images arrive, its parquet records every URL's outcome.

Per shard `i`: `{i:05d}.tar` (`{key}.jpg|png|gif|webp`, `{key}.txt` caption, `{key}.json` url and status) and
`{i:05d}.parquet` with one row per URL, both written as `.part`, fsynced and renamed, each rename made durable (the
folder fsynced) before the next step, the parquet last: a shard with both is finished. Each image is an answer that
passes images.py's checks, or fails with an error kind; a 5xx, a 429 or a refused connection is tried again
(`retries` times, after a growing pause or the server's Retry-After) before it counts as failed; a timeout is not,
since at list scale most timeouts are dead hosts. Each tar's sha256 is computed as it is written, so the warehouse
can record and later verify it. Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mvdata_assets.datasets import durable
from mvdata_assets.datasets.digests import Digests
from mvdata_assets.datasets.images import classify, decode, is_transient
from mvdata_assets.datasets.list_files import Row, is_url
from mvdata_assets.datasets.transport import Job, Request, Writer, retry_after

TAR_SHA256, TAR_BYTES = "tar_sha256", "tar_bytes"  # in a shard parquet's metadata: the tar it was finished with
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


class _Body:
    """Takes a 200 answer's body, gathered whole by libcurl up to the size limit (images are small)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def begin(self, request: Request) -> Writer | None:
        return self.parts.append if request.status == 200 else None


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
class Fetching:
    """How each image is fetched: the body limit, and the retries of transient failures."""

    max_bytes: int
    retries: int
    backoff_s: float
    decode: bool = False


class Shard:
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

    def jobs(self, fetching: Fetching) -> Iterator[Job]:
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

    def _fetch(self, i: int, fetching: Fetching) -> Job:
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
        _count(result, ((o["status"], o["error_kind"], o["bytes"]) for o in self.outcomes), set(self.todo))
        result.seconds = time.monotonic() - self.started
        return result


def finished_shard(index: int, tar_path: Path, table: pa.Table) -> ShardResult:
    """Counts of a shard an earlier run finished: its images are skipped, its failures still count as failed. The
    tar's sha256 is the one its parquet records, while the tar still has the size recorded with it."""
    result = ShardResult(index, "skipped", tar_path, total=table.num_rows, tar_bytes=tar_path.stat().st_size)
    written = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    if written.get(TAR_BYTES) == str(result.tar_bytes):
        result.sha256 = written.get(TAR_SHA256)
    columns = (table.column(name).to_pylist() for name in ("status", "error_kind", "bytes"))
    _count(result, zip(*columns, strict=True))
    return result


def _count(
    result: ShardResult, outcomes: Iterable[tuple[str, str | None, int | None]], fetched: Collection[int] = ()
) -> None:
    """Adds a shard's outcomes (status, error kind, bytes) to its counts: the failures by kind, and the images in
    place, `fetched` by this run (by index) or skipped."""
    for i, (status, kind, size) in enumerate(outcomes):
        result.image_bytes += size or 0
        if status == "failed":
            result.failed += 1
            result.error_kinds[kind] += 1
        elif i in fetched:
            result.downloaded += 1
            result.bytes += size or 0
        else:
            result.skipped += 1

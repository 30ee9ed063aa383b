"""Image URL lists (CC3M, CC12M, SBU, LAION-style parquet) into WebDataset tar shards, every URL's outcome recorded.

The list is read as a stream and cut into shards of `shard_size` rows. Every image of every shard is fetched on one
`CurlLoop` (libcurl's multi interface: pooled keep-alive connections, a per-host connection limit, libcurl's DNS
cache, a stall timeout), and the next shard's transfers start while the last ones of the previous shard are still
running, so a slow host holds up one transfer, not a shard. An answer counts as an image only if it is a 200 with an
image (or unlabelled) content type whose bytes start with JPEG/PNG/GIF/WebP magic and end as that format ends
(and, when the list asks to `decode`, that Pillow decodes in full); otherwise its URL fails with an error kind
(`http_404`, `timeout`, `not_an_image`, `truncated`, ...), so link rot is reported as link rot and a parsing mistake
can't pass for it. A 5xx, a 429 or a refused connection is tried again
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

import csv
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
import pycurl

from mvdata_assets.datasets import durable
from mvdata_assets.datasets.addresses import AddressPolicy
from mvdata_assets.datasets.catalog import Column, UrlList
from mvdata_assets.datasets.digests import Digests, sha256_of
from mvdata_assets.datasets.transport import (
    BODY_TOO_BIG,
    CurlLoop,
    Job,
    Request,
    TransientError,
    Writer,
    retry_after,
    status_error,
)

__all__ = [
    "ERROR_KINDS",
    "OUTCOME_SCHEMA",
    "ShardResult",
    "UrlListError",
    "UrlListRun",
    "describe_error_kind",
    "fetch_url_list",
    "read_list",
]

CHECK_ROWS = 100  # rows whose URL column is checked before anything is fetched
MAX_IMAGE_BYTES = 32 * 1024 * 1024
# labels that don't say what the bytes are: the magic bytes decide
UNLABELLED_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}
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

Row = tuple[str, str | None]  # (url, caption)

# what each error kind usually means, for the reports; "link rot" are the kinds saying the image is gone for good
ERROR_KINDS = {
    "http_404": "link rot: the image is gone",
    "http_410": "link rot: the image was removed",
    "http_403": "refused: a removed photo or hot-link protection",
    "dns": "link rot: the host name no longer resolves",
    "connection": "host down or refusing connections (after retries)",
    "blocked_address": "the name or a redirect led to a private, loopback or link-local address (never fetched)",
    "timeout": "no data within the timeout (a dead or overloaded host)",
    "not_an_image": "a page or placeholder instead of an image (often a removed photo)",
    "truncated": "the image was cut off",
    "too_large": "larger than the size limit",
    "undecodable": "image bytes that do not decode (corrupt inside)",
    "invalid_url": "not an http(s) URL in the list",
}


def describe_error_kind(kind: str) -> str:
    if kind in ERROR_KINDS:
        return ERROR_KINDS[kind]
    if kind.startswith("http_5") or kind == "http_429":
        return "server error or rate limit (after retries)"
    return "HTTP error" if kind.startswith("http_") else "other"


class UrlListError(ValueError):
    """A list that can't be read as its catalog entry says (a missing column, a URL column holding no URLs)."""


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
    sha256: str | None = None  # of the tar, when this run wrote it
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


# --- reading the list ------------------------------------------------------------------------------------------------


def _is_url(value: str | None) -> bool:
    return bool(value) and value.startswith(("http://", "https://")) and " " not in value.strip()


def _describe(column: Column) -> str:
    return f"column {column}" if isinstance(column, int) else f"column {column!r}"


def _tsv_rows(path: Path, spec: UrlList) -> Iterator[Row]:
    csv.field_size_limit(1 << 24)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        url_at, caption_at = spec.url_column, spec.caption_column
        if spec.header:
            names = next(reader, [])
            for column in (url_at, caption_at):
                if isinstance(column, str) and column not in names:
                    raise UrlListError(f"{path}: no column {column!r} in the header ({', '.join(names)})")
            url_at = names.index(url_at) if isinstance(url_at, str) else url_at
            caption_at = names.index(caption_at) if isinstance(caption_at, str) else caption_at
        for fields in reader:
            url = fields[url_at].strip() if url_at < len(fields) else ""
            caption = fields[caption_at] if caption_at is not None and caption_at < len(fields) else None
            yield url, caption


def _parquet_rows(path: Path, spec: UrlList) -> Iterator[Row]:
    parquet = pq.ParquetFile(path)
    columns = [c for c in (spec.url_column, spec.caption_column) if c is not None]
    for column in columns:
        if column not in parquet.schema_arrow.names:
            raise UrlListError(f"{path}: no column {column!r} (it has {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=columns):
        urls = batch.column(str(spec.url_column)).to_pylist()
        captions = batch.column(str(spec.caption_column)).to_pylist() if spec.caption_column is not None else None
        for i, url in enumerate(urls):
            yield (url or "").strip(), captions[i] if captions is not None else None


def _json_rows(path: Path, spec: UrlList) -> Iterator[Row]:
    """A JSON object of parallel arrays (SBU: `{"image_urls": [...], "captions": [...]}`) or an array of records.

    Read whole (the stdlib has no streaming JSON reader, and a JSON list is one value): fine for SBU's 1 M pairs; a
    list of hundreds of millions belongs in parquet or TSV, which are streamed.
    """
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as exc:
        raise UrlListError(f"{path}: not JSON: {exc}") from None
    names = [c for c in (spec.url_column, spec.caption_column) if c is not None]
    if isinstance(doc, list):  # records
        first = doc[0] if doc and isinstance(doc[0], dict) else {}
        for name in names:
            if doc and name not in first:
                raise UrlListError(f"{path}: no key {name!r} in its records (the first has {', '.join(first)})")
        for record in doc:
            url = record.get(spec.url_column) if isinstance(record, dict) else None
            caption = record.get(spec.caption_column) if isinstance(record, dict) and spec.caption_column else None
            yield _json_url(url), caption
        return
    if not isinstance(doc, dict):
        raise UrlListError(f"{path}: expected an object of arrays or an array of records, not {type(doc).__name__}")
    for name in names:
        if not isinstance(doc.get(name), list):
            raise UrlListError(f"{path}: no array {name!r} (it has {', '.join(doc)})")
    urls = doc[spec.url_column]
    captions = doc[spec.caption_column] if spec.caption_column is not None else None
    if captions is not None and len(captions) != len(urls):
        raise UrlListError(f"{path}: {len(urls)} {spec.url_column!r} but {len(captions)} {spec.caption_column!r}")
    for i, url in enumerate(urls):
        yield _json_url(url), captions[i] if captions is not None else None


def _json_url(value: object) -> str:
    """A JSON value where a URL should be: anything but a string (null, a number) counts as no URL."""
    return value.strip() if isinstance(value, str) else ""


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # a last line without its newline


def _line_rows(path: Path, captions: Path | None) -> Iterator[Row]:
    """SBU's layout: a URL per line, and line i of the captions file is the caption of URL i."""
    if captions is not None and (urls := _count_lines(path)) != (texts := _count_lines(captions)):
        raise UrlListError(
            f"{path} has {urls} lines but its captions file {captions} has {texts}: they can't be paired"
        )
    with path.open(encoding="utf-8") as url_lines:
        if captions is None:
            for line in url_lines:
                yield line.strip(), None
            return
        with captions.open(encoding="utf-8") as caption_lines:
            for line, caption in zip(url_lines, caption_lines, strict=True):
                yield line.strip(), caption.rstrip("\r\n")


def read_list(path: Path, spec: UrlList, captions: Path | None = None) -> Iterator[Row]:
    """(url, caption) per row, after checking that the URL column of the first rows holds http(s) URLs.

    The check is what stops a swapped-column mistake (CC3M read as url<TAB>caption) before millions of "URLs" are
    requested and their failures reported as link rot. `captions` is the paired captions file of a `lines` list.
    """
    if spec.format == "lines":
        rows = _line_rows(path, captions)
    elif spec.format == "json":
        rows = _json_rows(path, spec)
    else:
        rows = _tsv_rows(path, spec) if spec.format == "tsv" else _parquet_rows(path, spec)
    head = list(itertools.islice(rows, CHECK_ROWS))
    if head and sum(_is_url(url) for url, _ in head) * 2 < len(head):
        row, bad = next((i, url) for i, (url, _) in enumerate(head, 1) if not _is_url(url))
        holds_urls = sum(_is_url(caption) for _, caption in head) * 2 >= len(head)
        if spec.format == "lines":
            where = "the lines"
            hint = f"; the captions file {captions} holds the URLs: are the two swapped?" if holds_urls else ""
        else:
            where = f"url_column ({_describe(spec.url_column)})"
            hint = ""
            if holds_urls:
                hint = f"; {_describe(spec.caption_column)} (caption_column) holds the URLs: are the two swapped?"
        raise UrlListError(f"{path}: {where} does not hold http(s) URLs (row {row}: {bad[:80]!r}){hint}")
    return itertools.chain(head, rows)


# --- checking an answer ----------------------------------------------------------------------------------------------


def sniff(body: bytes) -> str | None:
    """The image format the bytes start as (its file extension), or None."""
    if body.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if body.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    return None


def complete(ext: str, body: bytes) -> bool:
    """Whether the bytes end as their format ends: a cut-off body is caught without decoding it."""
    if ext == "jpg":
        return body.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if ext == "png":
        return body.endswith(b"IEND\xaeB`\x82")
    if ext == "gif":
        return body.rstrip(b"\x00").endswith(b";")
    return len(body) >= 8 + int.from_bytes(body[4:8], "little")  # webp: the RIFF size


class _Body:
    """Takes a 200 answer's body, gathered whole by libcurl up to the size limit (images are small)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def begin(self, request: Request) -> Writer | None:
        return self.parts.append if request.status == 200 else None


def classify(request: Request, body: bytes) -> tuple[str | None, str | None, str | None]:
    """(error kind, error, extension) of a finished transfer; the kind is None for an image."""
    if request.error_code == BODY_TOO_BIG:  # libcurl stopped the body at the limit
        if request.status != 200:
            return f"http_{request.status}", f"HTTP {request.status}", None
        return "too_large", f"larger than {request.whole_up_to} bytes", None
    if request.failure is not None:
        raise request.failure
    if request.blocked:
        return "blocked_address", f"refused to connect: {request.blocked}", None
    if request.error_code == pycurl.E_OPERATION_TIMEDOUT:
        return "timeout", request.error, None
    if request.error_code == pycurl.E_PARTIAL_FILE:
        return "truncated", request.error, None
    if request.error_code == pycurl.E_COULDNT_RESOLVE_HOST:
        return "dns", request.error, None
    if request.error_code:
        return "connection", request.error, None
    if request.status != 200:
        return f"http_{request.status}", f"HTTP {request.status}", None
    content_type = request.response_headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type.startswith("image/") and content_type not in UNLABELLED_TYPES:
        return "not_an_image", f"content type {content_type}", None
    ext = sniff(body)
    if ext is None:
        return "not_an_image", f"not JPEG/PNG/GIF/WebP (starts {body[:8]!r})", None
    if not complete(ext, body):
        return "truncated", f"{ext} cut off after {len(body)} bytes", None
    return None, None, ext


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


def decode(body: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """(error, (width, height)) of decoding the image fully with Pillow: corruption inside the file shows here."""
    from PIL import Image  # only when a list asks for decoding

    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()
            return None, image.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file; each is this URL's outcome
        return f"does not decode: {exc}", None


def _transient(request: Request, kind: str | None) -> bool:
    """A failure worth another attempt: the server was busy or refused the connection, not gone or wrong."""
    if kind == "connection":  # not timeouts: at list scale those are mostly dead hosts
        return request.error_code in (pycurl.E_COULDNT_CONNECT, pycurl.E_RECV_ERROR, pycurl.E_GOT_NOTHING)
    return isinstance(status_error(request.status, request.url, None), TransientError)  # the downloader's rule


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
            if _is_url(outcome["url"]):
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
            if kind is None or attempt > fetching.retries or not _transient(request, kind):
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
        parquet_part = self.parquet_path.with_name(self.parquet_path.name + ".part")
        pq.write_table(pa.Table.from_pylist(self.outcomes, schema=OUTCOME_SCHEMA), parquet_part)
        durable.replace(parquet_part, self.parquet_path)
        again = set(self.todo)
        result = self.result
        result.sha256, result.tar_bytes = self.tar_file.digests.sha256, self.tar_path.stat().st_size
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
    """Counts of a shard an earlier run finished: its images are skipped, its failures still count as failed."""
    result = ShardResult(index, "skipped", tar_path, total=table.num_rows, tar_bytes=tar_path.stat().st_size)
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


def _remove_stale(out_dir: Path, fingerprint: dict) -> int:
    """Removes shards written from another list or another reading of it; returns how many."""
    record = out_dir / "_list.json"
    if record.exists() and json.loads(record.read_text()) == fingerprint:
        return 0
    stale = [p for pattern in ("*.tar", "*.parquet", "*.part") for p in out_dir.glob(pattern)]
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
) -> UrlListRun:
    """Fetch the images of one URL list into `out_dir` as WebDataset shards; finished shards are skipped.

    `captions` is the paired captions file of a `lines` list; `list_sha256` saves hashing a list whose sha256 is
    known. `timeout_s` ends a transfer that received nothing for that long. `retry_failed` fetches the failed URLs
    of finished shards again and rewrites them. `on_shard` hears of each shard as it is finished or found finished.
    Images reach public addresses only, and the `allowed_networks` (see addresses.py).
    """
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale(out_dir, _fingerprint(list_path, captions, spec, list_sha256))
    width = len(str(spec.shard_size - 1))
    fetching = _Fetching(max_bytes, retries, retry_backoff_s, spec.decode)
    results: list[ShardResult] = []

    def finished(result: ShardResult) -> None:
        results.append(result)
        if on_shard is not None:
            on_shard(result)

    def jobs() -> Iterator[Job]:
        for index, rows in enumerate(_batches(read_list(list_path, spec, captions), spec.shard_size)):
            tar_path, parquet_path = out_dir / f"{index:05d}.tar", out_dir / f"{index:05d}.parquet"
            previous = None
            if tar_path.exists() and parquet_path.exists():
                table = pq.read_table(parquet_path)
                if not (retry_failed and "failed" in table.column("status").to_pylist()):
                    finished(_finished(index, tar_path, table))
                    continue
                previous = table
            yield from _Shard(out_dir, index, rows, width, previous, finished).jobs(fetching)

    addresses = AddressPolicy.third_party(allowed_networks)
    with CurlLoop(timeout_s=timeout_s, max_host_connections=max_host_connections, addresses=addresses) as loop:
        loop.run(jobs(), at_once=concurrency)
    results.sort(key=lambda r: r.index)
    return UrlListRun(results, time.monotonic() - started, stale)

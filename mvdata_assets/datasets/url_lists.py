"""Image URL lists (CC3M, CC12M, SBU, LAION-style parquet) into WebDataset tar shards, every URL's outcome recorded.

The list is read as a stream (list_files.py) and cut into shards of `shard_size` rows (shards.py writes each one).
Every image of every shard is fetched on one `CurlLoop` (libcurl's multi interface: pooled keep-alive connections, a
per-host connection limit, libcurl's DNS cache, a stall timeout), and the next shard's transfers start while the
last ones of the previous shard are still running, so a slow host holds up one transfer, not a shard.

A finished shard is skipped by the next run; `retry_failed` fetches its failed URLs again and rewrites it. A shard's
key numbering follows the list's rows, so `_list.json` records which list (its sha256) and which reading of it
(format, columns, shard size) the shards come from: when either changes, the old shards are stale and are removed
first. A list may also be fetched in parts, by several processes or machines (`plan_url_list`, then
`fetch_url_list(shards=...)`): a lock file per shard keeps one writer a shard. Plain Python: nothing here imports
Dagster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from mvdata_assets import defaults
from mvdata_assets.datasets import durable
from mvdata_assets.datasets.addresses import AddressPolicy
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.digests import sha256_of
from mvdata_assets.datasets.list_files import Row, UrlListError, read_list
from mvdata_assets.datasets.shards import Fetching, Shard, ShardResult, finished_shard
from mvdata_assets.datasets.transport import CurlLoop, Job

__all__ = [
    "ListPlan",
    "UrlListError",
    "UrlListRun",
    "count_list",
    "fetch_url_list",
    "finished_shards",
    "plan_url_list",
]

MAX_IMAGE_BYTES = 32 * 1024 * 1024
CLAIMS = ".claims"  # `<shards folder>/.claims/<shard>.lock`: held by the process writing that shard
LIST_RECORD = "_list.json"  # which list, and which reading of it, the shards of a folder come from


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


# --- shards ----------------------------------------------------------------------------------------------------------


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


def _plan_version(fingerprint: dict) -> str:
    """A short name for one list and one reading of it: what a part's partition key carries."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]


def _remove_stale(out_dir: Path, fingerprint: dict) -> int:
    """Removes shards written from another list or another reading of it; returns how many. Refuses (UrlListError)
    while a shard is being written: a part of the earlier plan still running would finish it under the new one."""
    record = out_dir / LIST_RECORD
    if _recorded(out_dir) == fingerprint:
        return 0
    with contextlib.ExitStack() as held:
        claims = sorted((out_dir / CLAIMS).glob("*.lock"))
        for claim in claims:
            try:
                held.enter_context(FileLock(claim, timeout=0))
            except Timeout:
                raise UrlListError(
                    f"{out_dir}: shard {claim.stem} of an earlier version of the list is being written (a part still "
                    "running): let its run end or cancel it, then plan the list again"
                ) from None
        stale = [p for pattern in ("*.tar", "*.parquet", "*.part") for p in out_dir.glob(pattern)]
        for path in [*stale, *claims]:
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
    concurrency: int = defaults.IMAGE_CONCURRENCY,
    max_host_connections: int = defaults.IMAGE_HOST_CONNECTIONS,
    timeout_s: float = defaults.IMAGE_TIMEOUT_S,
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
    after `plan_url_list` has removed stale shards for all of them (a part never removes anything). Every shard is
    written under a claim (`.claims/<shard>.lock`): a shard another process is writing is left to it (`busy`).
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
    (out_dir / CLAIMS).mkdir(exist_ok=True)
    width = len(str(spec.shard_size - 1))
    fetching = Fetching(max_bytes, retries, retry_backoff_s, spec.decode)
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
            # one writer a shard, whoever runs it: parts side by side, a part started again elsewhere, a whole list
            claim = FileLock(out_dir / CLAIMS / f"{index:05d}.lock")
            try:
                claim.acquire(timeout=0)
            except Timeout:
                busy.append(index)
                continue
            if _recorded(out_dir) != fingerprint:  # planned again since this run began: its shards are the new plan's
                claim.release()
                raise UrlListError(f"{list_path.name} was planned again while its shards were fetched: {out_dir} now "
                                   "holds another version's shards, fetched by that plan's partitions")  # fmt: skip
            done = functools.partial(_release_then, claim, finished)
            tar_path, parquet_path = out_dir / f"{index:05d}.tar", out_dir / f"{index:05d}.parquet"
            previous = None
            if tar_path.exists() and parquet_path.exists():
                table = pq.read_table(parquet_path)
                if not (retry_failed and "failed" in table.column("status").to_pylist()):
                    done(finished_shard(index, tar_path, table))
                    continue
                previous = table
            yield from Shard(out_dir, index, rows, width, previous, done).jobs(fetching)

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
    """A list made ready to be fetched in parts: how many shards it makes, and from which version of it."""

    rows: int
    shards: int
    stale_removed: int  # shards of an earlier list (or reading of it) removed
    version: str = ""  # a short name of the list and its reading, from `_list.json` ("" when only counted)


def plan_url_list(
    list_path: Path, out_dir: Path, spec: UrlList, *, captions: Path | None = None, list_sha256: str | None = None
) -> ListPlan:
    """Once, before a list's shards are fetched in parts (`fetch_url_list(shards=...)`, perhaps on other machines):
    removes the shards of an earlier list or reading of it and records which list the shards come from, so no part
    removes another's work; counts the list's rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(list_path, captions, spec, list_sha256)
    stale = _remove_stale(out_dir, fingerprint)
    return dataclasses.replace(count_list(list_path, spec, captions), stale_removed=stale,
                               version=_plan_version(fingerprint))  # fmt: skip


def planned_version(out_dir: Path) -> str | None:
    """The version (as `ListPlan.version`) of the list whose shards `out_dir` holds (None: none planned there)."""
    recorded = _recorded(out_dir)
    return _plan_version(recorded) if recorded is not None else None


def count_list(list_path: Path, spec: UrlList, captions: Path | None = None) -> ListPlan:
    """How many rows and shards a list makes; nothing is removed."""
    rows = sum(1 for _ in read_list(list_path, spec, captions))
    return ListPlan(rows, -(-rows // spec.shard_size), 0)


def finished_shards(out_dir: Path) -> list[ShardResult]:
    """The counts of every finished shard in `out_dir` (a tar and its parquet), in index order: what the parts of a
    list left, for the one step that records them in the warehouse."""
    results = []
    for parquet in sorted(out_dir.glob("[0-9]*.parquet")):
        tar = parquet.with_suffix(".tar")
        if tar.exists():
            results.append(finished_shard(int(parquet.stem), tar, pq.read_table(parquet)))
    return results

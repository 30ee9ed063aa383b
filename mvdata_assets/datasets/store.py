"""The `datasets` schema of the warehouse: one row per file, one per image shard, one summary row per dataset.

A URL-list dataset's shards are files too: each tar has its `datasets.files` row (size, sha256, mtime), so it is
verified and skipped like any download; `datasets.shards` adds what is in it (images in place, failed, by kind).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from mvdata_assets.datasets.files import FileResult, Known

SCHEMA = "datasets"

DDL = [
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.files (
        dataset VARCHAR NOT NULL, url VARCHAR, path VARCHAR NOT NULL, bytes BIGINT, expected_bytes BIGINT,
        sha256 VARCHAR, status VARCHAR NOT NULL, error VARCHAR, attempts INTEGER, seconds DOUBLE,
        bytes_transferred BIGINT, mtime_ns BIGINT, updated_at TIMESTAMPTZ DEFAULT now(),
        PRIMARY KEY (dataset, path)
    )""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.shards (
        dataset VARCHAR NOT NULL, list VARCHAR NOT NULL, shard INTEGER NOT NULL, path VARCHAR NOT NULL,
        images INTEGER, in_place INTEGER, failed INTEGER, error_kinds VARCHAR, image_bytes BIGINT, tar_bytes BIGINT,
        sha256 VARCHAR, seconds DOUBLE, updated_at TIMESTAMPTZ DEFAULT now(),
        PRIMARY KEY (dataset, list, shard)
    )""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.download_summary (
        dataset VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, downloaded INTEGER, failed INTEGER, skipped INTEGER,
        total INTEGER, success_rate DOUBLE, est_size_bytes BIGINT, bytes_on_disk BIGINT, seconds DOUBLE,
        updated_at TIMESTAMPTZ DEFAULT now()
    )""",
]

FILE_COLUMNS = pa.schema(
    [("dataset", pa.string()), ("url", pa.string()), ("path", pa.string()), ("status", pa.string()),
     ("bytes", pa.int64()), ("expected_bytes", pa.int64()), ("sha256", pa.string()), ("error", pa.string()),
     ("attempts", pa.int32()), ("seconds", pa.float64()), ("bytes_transferred", pa.int64()), ("mtime_ns", pa.int64())]
)  # fmt: skip
SHARD_COLUMNS = pa.schema(
    [("dataset", pa.string()), ("list", pa.string()), ("shard", pa.int32()), ("path", pa.string()),
     ("images", pa.int32()), ("in_place", pa.int32()), ("failed", pa.int32()), ("error_kinds", pa.string()),
     ("image_bytes", pa.int64()), ("tar_bytes", pa.int64()), ("sha256", pa.string()), ("seconds", pa.float64())]
)  # fmt: skip

# The download report's columns, as shown in the UI and logged to W&B (the team's download log has these).
REPORT_COLUMNS = ("Dataset", "Status", "Downloaded", "Failed", "Skipped", "Total", "Success Rate", "Est. Size")


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    for statement in DDL:
        conn.execute(statement)


def known_files(conn: duckdb.DuckDBPyConnection, dataset: str) -> dict[Path, Known]:
    """Files an earlier run verified: size, mtime and sha256 let the next run skip them without reading."""
    rows = conn.execute(
        f"""SELECT path, bytes, mtime_ns, sha256 FROM {SCHEMA}.files
            WHERE dataset = ? AND status IN ('downloaded', 'skipped')
              AND sha256 IS NOT NULL AND mtime_ns IS NOT NULL""",
        [dataset],
    ).fetchall()
    return {Path(path): Known(size, mtime_ns, sha256) for path, size, mtime_ns, sha256 in rows}


def record_files(conn: duckdb.DuckDBPyConnection, dataset: str, results: Iterable[FileResult]) -> None:
    rows = [{"dataset": dataset, **vars(r)} for r in results]
    _write(conn, f"""INSERT OR REPLACE INTO {SCHEMA}.files
                     (dataset, url, path, bytes, expected_bytes, sha256, status, error, attempts, seconds,
                      bytes_transferred, mtime_ns, updated_at)
                     SELECT dataset, url, path, bytes, expected_bytes, sha256, status, error, attempts, seconds,
                            bytes_transferred, mtime_ns, now() FROM incoming""", rows, FILE_COLUMNS)  # fmt: skip


def _write(conn: duckdb.DuckDBPyConnection, statement: str, rows: list[dict], schema: pa.Schema) -> None:
    """One statement over the rows as an Arrow table `incoming`: DuckDB's executemany runs the statement once per
    row, slow for the thousands of files or shards of one dataset."""
    conn.register("incoming", pa.Table.from_pylist(rows, schema))
    try:
        conn.execute(statement)
    finally:
        conn.unregister("incoming")


@dataclass(frozen=True)
class Shard:
    """One shard tar of a URL list, as the warehouse keeps it."""

    list: str  # the list's path in the dataset folder
    index: int
    path: str
    images: int
    in_place: int
    failed: int
    error_kinds: Counter[str]
    image_bytes: int
    tar_bytes: int
    sha256: str | None
    seconds: float | None  # None: finished by an earlier run


def record_shards(conn: duckdb.DuckDBPyConnection, dataset: str, list_path: str, shards: list[Shard]) -> None:
    """The list's shards as they are now: a shard found finished keeps the time and seconds of the run that wrote
    it, and rows of shards that no longer exist (a changed list) are dropped."""
    conn.execute(
        f"DELETE FROM {SCHEMA}.shards WHERE dataset = ? AND list = ? AND NOT list_contains(?, shard)",
        [dataset, list_path, [s.index for s in shards]],
    )
    rows = [
        {"dataset": dataset, "list": list_path, "shard": s.index, "path": s.path, "images": s.images,
         "in_place": s.in_place, "failed": s.failed, "error_kinds": json.dumps(dict(sorted(s.error_kinds.items()))),
         "image_bytes": s.image_bytes, "tar_bytes": s.tar_bytes, "sha256": s.sha256, "seconds": s.seconds}
        for s in shards
    ]  # fmt: skip
    _write(
        conn,
        f"""INSERT INTO {SCHEMA}.shards AS old (dataset, list, shard, path, images, in_place, failed, error_kinds,
                                                image_bytes, tar_bytes, sha256, seconds, updated_at)
            SELECT *, now() FROM incoming
            ON CONFLICT (dataset, list, shard) DO UPDATE SET
                path = excluded.path, images = excluded.images, in_place = excluded.in_place,
                failed = excluded.failed, error_kinds = excluded.error_kinds, image_bytes = excluded.image_bytes,
                tar_bytes = excluded.tar_bytes, sha256 = excluded.sha256,
                seconds = coalesce(excluded.seconds, old.seconds),
                updated_at = CASE WHEN excluded.seconds IS NULL THEN old.updated_at ELSE now() END""",
        rows,
        SHARD_COLUMNS,
    )


def forget_files_under(conn: duckdb.DuckDBPyConnection, dataset: str, folder: Path, keep: Iterable[str]) -> None:
    """Drops the rows of the files directly in `folder` that are not in `keep` (shards removed as stale); a list's
    shards folder may hold another list's (`shards/train/` and `shards/train/extra/`), whose rows stay."""
    conn.execute(
        f"""DELETE FROM {SCHEMA}.files WHERE dataset = ? AND starts_with(path, ?) AND NOT contains(path[?:], '/')
              AND NOT list_contains(?, path)""",
        [dataset, f"{folder}/", len(f"{folder}/") + 1, list(keep)],
    )


@dataclass(frozen=True)
class Summary:
    dataset: str
    status: str  # complete | partial | failed | manual | missing
    downloaded: int
    failed: int
    skipped: int
    total: int
    est_size_bytes: int | None
    bytes_on_disk: int
    seconds: float

    @property
    def success_rate(self) -> float:
        """Share of the files that are in place, downloaded now or verified before (skipped ones count)."""
        return (self.downloaded + self.skipped) / self.total if self.total else 0.0

    def report_row(self) -> tuple:
        size = f"{self.est_size_bytes / 1e9:.2f} GB" if self.est_size_bytes else "-"
        return (self.dataset, self.status, self.downloaded, self.failed, self.skipped, self.total,
                f"{self.success_rate:.1%}", size)  # fmt: skip


def summarize(
    dataset: str,
    results: list[FileResult],
    est_size_bytes: int | None,
    seconds: float,
    manual: bool = False,
    images: Counter[str] | None = None,
) -> Summary:
    """Counts of the dataset's files; a URL-list dataset adds its images (`images`: downloaded, failed, skipped,
    bytes of the shards on disk), so its success rate is the share of images in place. A URL-list dataset none of
    whose listed images is in place has failed, whatever its list file did: it holds nothing to train on."""
    counts = Counter(r.status for r in results)
    on_disk = sum(r.bytes for r in results if r.status != "failed")
    if images:
        counts.update({k: images[k] for k in ("downloaded", "failed", "skipped")})
        on_disk += images["bytes"]
    total = counts["downloaded"] + counts["failed"] + counts["skipped"]
    no_image = images is not None and images["failed"] > 0 and images["downloaded"] + images["skipped"] == 0
    if manual:
        status = "manual"
    elif no_image:
        status = "failed"
    elif counts["failed"] == 0:
        status = "complete"
    elif counts["failed"] == total:
        status = "failed"
    else:
        status = "partial"
    return Summary(dataset, status, counts["downloaded"], counts["failed"], counts["skipped"], total,
                   est_size_bytes, on_disk, seconds)  # fmt: skip


def record_summary(conn: duckdb.DuckDBPyConnection, summary: Summary) -> None:
    conn.execute(
        f"""INSERT OR REPLACE INTO {SCHEMA}.download_summary
            (dataset, status, downloaded, failed, skipped, total, success_rate, est_size_bytes, bytes_on_disk, seconds,
             updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())""",
        [summary.dataset, summary.status, summary.downloaded, summary.failed, summary.skipped, summary.total,
         summary.success_rate, summary.est_size_bytes, summary.bytes_on_disk, summary.seconds],
    )  # fmt: skip


def files_digest(conn: duckdb.DuckDBPyConnection, dataset: str) -> str:
    """A dataset's data version: a digest of its files' paths, outcomes and checksums (and its shards'). A download
    that changed nothing gives the same digest, so nothing downstream turns stale."""
    rows = conn.execute(
        f"""SELECT 'file', path, CASE WHEN status IN ('downloaded', 'skipped') THEN sha256 ELSE status END
            FROM {SCHEMA}.files WHERE dataset = ?
            UNION ALL SELECT 'shard', path, in_place || ' ' || sha256 FROM {SCHEMA}.shards WHERE dataset = ?
            ORDER BY 1, 2""",
        [dataset, dataset],
    ).fetchall()  # a file verified again ('skipped') is the same data as the one downloaded
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]


def summary_digest(conn: duckdb.DuckDBPyConnection) -> str:
    """The download summary's data version: each dataset's status and counts (not its timings)."""
    rows = conn.execute(
        f"SELECT dataset, status, downloaded, failed, skipped, total FROM {SCHEMA}.download_summary ORDER BY dataset"
    ).fetchall()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]

"""The `datasets` schema of the warehouse: one row per file, one summary row per dataset."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from mvdata_assets.datasets.fetch import FileResult, Known

SCHEMA = "datasets"

DDL = [
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.files (
        dataset VARCHAR NOT NULL, url VARCHAR, path VARCHAR NOT NULL, bytes BIGINT, expected_bytes BIGINT,
        sha256 VARCHAR, status VARCHAR NOT NULL, error VARCHAR, attempts INTEGER, seconds DOUBLE,
        bytes_transferred BIGINT, mtime_ns BIGINT, updated_at TIMESTAMPTZ DEFAULT now(),
        PRIMARY KEY (dataset, path)
    )""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.download_summary (
        dataset VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, downloaded INTEGER, failed INTEGER, skipped INTEGER,
        total INTEGER, success_rate DOUBLE, est_size_bytes BIGINT, bytes_on_disk BIGINT, seconds DOUBLE,
        updated_at TIMESTAMPTZ DEFAULT now()
    )""",
]

# The old report's table, as shown in the UI and logged to W&B.
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
    conn.executemany(
        f"""INSERT OR REPLACE INTO {SCHEMA}.files
            (dataset, url, path, bytes, expected_bytes, sha256, status, error, attempts, seconds, bytes_transferred,
             mtime_ns, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())""",
        [
            [dataset, r.url, r.path, r.bytes, r.expected_bytes, r.sha256, r.status, r.error, r.attempts, r.seconds,
             r.bytes_transferred, r.mtime_ns]
            for r in results
        ],
    )  # fmt: skip


@dataclass(frozen=True)
class Summary:
    dataset: str
    status: str  # complete | partial | failed | manual
    downloaded: int
    failed: int
    skipped: int
    total: int
    est_size_bytes: int | None
    bytes_on_disk: int
    seconds: float

    @property
    def success_rate(self) -> float:
        """Share of the files that are in place, downloaded now or verified before (the old report lied here)."""
        return (self.downloaded + self.skipped) / self.total if self.total else 0.0

    def report_row(self) -> tuple:
        size = f"{self.est_size_bytes / 1e9:.2f} GB" if self.est_size_bytes else "-"
        return (self.dataset, self.status, self.downloaded, self.failed, self.skipped, self.total,
                f"{self.success_rate:.1%}", size)  # fmt: skip


def summarize(
    dataset: str, results: list[FileResult], est_size_bytes: int | None, seconds: float, manual: bool = False
) -> Summary:
    counts = {s: sum(1 for r in results if r.status == s) for s in ("downloaded", "failed", "skipped")}
    if manual:
        status = "manual"
    elif counts["failed"] == 0:
        status = "complete"
    elif counts["failed"] == len(results):
        status = "failed"
    else:
        status = "partial"
    on_disk = sum(r.bytes for r in results if r.status != "failed")
    return Summary(dataset, status, counts["downloaded"], counts["failed"], counts["skipped"], len(results),
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

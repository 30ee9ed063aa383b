"""What a dataset's materialisation shows in the UI: its files, its images and shards, and its W&B log.

Tables are capped at MAX_TABLE_ROWS rows, failed files first: a metadata entry is one event-log write, and the
warehouse's tables hold every row.
"""

import os
from collections.abc import Callable
from typing import TypeVar

from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue

from mvdata_assets import charts
from mvdata_assets.datasets.download import DatasetRun
from mvdata_assets.datasets.images import describe_error_kind
from mvdata_assets.datasets.shards import ShardResult
from mvdata_assets.tracking import DownloadTracker, TrackedRun


def tracking_metadata(tracked: TrackedRun | None, tracker: DownloadTracker | None) -> dict:
    if tracker is None:
        return {"wandb_tracking": "off"}
    if tracked is None:
        return {"wandb_tracking": "skipped (see the run's warnings)"}
    where = (
        {"wandb_run_url": MetadataValue.url(tracked.url)}
        if tracked.url
        else {"wandb_offline_dir": MetadataValue.path(str(tracked.offline_dir))}
    )
    return {"wandb_run_number": tracked.number, "wandb_run_name": tracked.name, **where}


T = TypeVar("T")
MAX_TABLE_ROWS = 200  # rows of a file or shard table in the UI; the warehouse's table holds them all


def _capped_table(header: tuple[str, ...], items: list[T], as_row: Callable[[T], tuple], table: str) -> MetadataValue:
    """A Markdown table of the first MAX_TABLE_ROWS items, saying how many more `table` holds: a dataset's files
    may number in the thousands, and the whole metadata entry is one event-log write. Only the items shown become
    rows."""
    more = f"\n\n... and {len(items) - MAX_TABLE_ROWS} more ({table})" if len(items) > MAX_TABLE_ROWS else ""
    return MetadataValue.md(charts.markdown_table(header, [as_row(item) for item in items[:MAX_TABLE_ROWS]]) + more)


def _shard_row(listed_shard: tuple[str, ShardResult]) -> tuple:
    listed, s = listed_shard
    return listed, f"{s.index:05d}", s.state, s.total, s.in_place, s.failed, f"{s.tar_bytes / 1e6:.1f} MB"


def images_metadata(run: DatasetRun) -> dict:
    """A URL-list dataset's images: counts, speed, and what the failures were, per error kind."""
    images, kinds = run.images, run.error_kinds
    listed = sum(images[k] for k in ("downloaded", "failed", "skipped"))
    seconds = sum(listed_run.run.seconds for listed_run in run.lists)
    shards = [(lr.list, s) for lr in run.lists for s in lr.run.shards]
    return {
        "images_downloaded": images["downloaded"],
        "images_failed": images["failed"],
        "images_skipped": images["skipped"],
        "images_total": listed,
        "images_per_second": MetadataValue.float(round(images["downloaded"] / seconds, 1) if seconds else 0.0),
        "image_bytes_fetched": MetadataValue.int(images["fetched"]),
        "shards_written": sum(s.state != "skipped" for _, s in shards),
        "shards_skipped": sum(s.state == "skipped" for _, s in shards),
        "shards_refetched_after_check": MetadataValue.json(run.redone),
        "stale_shards_removed": sum(lr.run.stale_removed for lr in run.lists),
        "shard_folders": MetadataValue.json([str(lr.shards_dir) for lr in run.lists]),
        "image_errors": MetadataValue.md(
            charts.markdown_table(
                ("error kind", "images", "share of the list", "usually means"),
                [(k, n, f"{n / listed:.1%}", describe_error_kind(k)) for k, n in kinds.most_common()],
            )
            if kinds
            else "no image failed"
        ),
        "shards": _capped_table(
            ("list", "shard", "state", "images", "in place", "failed", "tar"),
            shards,
            _shard_row,
            "datasets.shards",
        ),
    }


def dataset_metadata(run: DatasetRun) -> dict:
    summary, seconds = run.summary, run.summary.seconds
    return {
        "status": summary.status,
        "downloaded": summary.downloaded,
        "failed": summary.failed,
        "skipped": summary.skipped,
        "total": summary.total,
        "success_rate": MetadataValue.float(round(summary.success_rate, 4)),
        "bytes_on_disk": MetadataValue.int(summary.bytes_on_disk),
        "bytes_transferred": MetadataValue.int(run.bytes_transferred),
        "throughput_mb_s": MetadataValue.float(round(run.bytes_transferred / 1e6 / seconds, 2) if seconds else 0.0),
        "seconds": MetadataValue.float(round(seconds, 3)),
        "extracted": MetadataValue.json(run.extracted),
        "files": _capped_table(
            ("path", "status", "bytes", "attempts", "error"),
            sorted(run.results, key=lambda r: r.status != "failed"),  # the failed files first
            lambda r: (os.path.relpath(r.path, run.folder), r.status, r.bytes, r.attempts, r.error or ""),
            "datasets.files",
        ),
    }


def images_fetched_check(run: DatasetRun) -> AssetCheckResult:
    """Link rot is expected at list scale: failed images are a warning, counted per error kind."""
    kinds = run.error_kinds
    return AssetCheckResult(
        check_name="images_fetched",
        passed=not kinds,
        severity=AssetCheckSeverity.WARN,
        metadata={"failed_by_kind": MetadataValue.json(dict(kinds.most_common()))},
    )


def file_checks(run: DatasetRun) -> list[AssetCheckResult]:
    """Whether the dataset's files can be trusted: none failed, and every one in place has a recorded sha256."""
    files = run.results + run.shards
    failed = [r for r in files if r.status == "failed"]
    unverified = [r for r in files if r.status != "failed" and not r.sha256]
    return [
        AssetCheckResult(
            check_name="no_failed_files",
            passed=not failed,
            severity=AssetCheckSeverity.ERROR,
            metadata={"failed": MetadataValue.json([f"{r.path}: {r.error}" for r in failed])},
        ),
        AssetCheckResult(
            check_name="checksums_recorded",
            passed=not unverified,
            severity=AssetCheckSeverity.ERROR,
            metadata={"without_sha256": MetadataValue.json([r.path for r in unverified])},
        ),
    ]

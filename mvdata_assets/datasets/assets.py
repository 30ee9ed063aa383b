"""Dagster wiring for the datasets half: one asset per catalog dataset, and the download summary."""

import os
import time

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    Config,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    asset,
)

from mvdata_assets import charts
from mvdata_assets.datasets import store
from mvdata_assets.datasets.catalog import Dataset, load_catalog
from mvdata_assets.datasets.download import DatasetRun, download_dataset
from mvdata_assets.settings import load_settings
from mvdata_assets.tracking import PROJECT, DownloadTracker, TrackedRun
from mvdata_assets.warehouse import WarehouseResource

GROUP = "datasets"


class DownloadConfig(Config):
    verify: bool = False
    """Re-hash files already on disk instead of trusting their recorded size and checksum."""


class DownloadTrackingResource(ConfigurableResource):
    """Logs each Dagster run that downloads datasets as one W&B run; WANDB_MODE picks online or offline."""

    enabled: bool = True
    project: str = PROJECT
    entity: str | None = None
    init_timeout_s: float = 30.0

    def tracker(self, context: AssetExecutionContext, catalog_names: list[str]) -> DownloadTracker | None:
        if not self.enabled:
            return None  # no W&B run, and the run counter stays as it is
        settings = load_settings()
        selection = context.run.asset_selection or set()
        selected = [key.path[-1] for key in selection if key.path[:1] == [GROUP] and key.path[-1] in catalog_names]
        return DownloadTracker(
            settings.home,
            sorted(selected) or catalog_names,
            settings.data_root,
            warn=context.log.warning,
            dagster_run_id=context.run_id,
            project=self.project,
            entity=self.entity,
            init_timeout_s=self.init_timeout_s,
        )


def _tracking_metadata(tracked: TrackedRun | None, tracker: DownloadTracker | None) -> dict:
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


def dataset_key(name: str) -> AssetKey:
    return AssetKey([GROUP, name])


def _progress_logger(context: AssetExecutionContext, every_s: float = 5.0):
    """Download progress as log lines in the run's logs (a terminal gets bars from the CLI instead)."""
    last: dict[str, float] = {}

    def report(url: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last.get(url, 0.0) >= every_s or (total is not None and done == total):
            last[url] = now
            share = f" ({done / total:.0%})" if total else ""
            context.log.info(f"{url.rsplit('/', 1)[-1]}: {done / 2**20:.1f} MiB{share}")

    return report


def _dataset_metadata(run: DatasetRun) -> dict:
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
        "files": MetadataValue.md(
            charts.markdown_table(
                ("path", "status", "bytes", "attempts", "error"),
                [
                    (os.path.relpath(r.path, run.folder), r.status, r.bytes, r.attempts, r.error or "")
                    for r in run.results
                ],
            )
        ),
    }


def build_dataset_asset(dataset: Dataset, catalog_names: list[str]) -> AssetsDefinition:
    key = dataset_key(dataset.name)

    @asset(
        key=key,
        group_name=GROUP,
        kinds={"download"},
        description=dataset.description,
        check_specs=[
            AssetCheckSpec("no_failed_files", asset=key, description="Every file of the dataset is in place."),
            AssetCheckSpec("checksums_recorded", asset=key, description="Every file in place has a recorded sha256."),
        ],
        metadata={
            "access": dataset.access,
            "homepage": MetadataValue.url(dataset.homepage) if dataset.homepage else "",
            "license": dataset.license or "",
            "files_in_catalog": len(dataset.files),
        },
    )
    def _dataset(
        context: AssetExecutionContext,
        config: DownloadConfig,
        warehouse: WarehouseResource,
        tracking: DownloadTrackingResource,
    ):
        settings = load_settings()
        tracker = tracking.tracker(context, catalog_names)
        if tracker:
            tracker.start()
        started = time.monotonic()
        try:
            run = download_dataset(
                dataset,
                settings.data_root,
                warehouse.get_connection,
                verify=config.verify,
                concurrency=settings.download_concurrency,
                progress=_progress_logger(context),
            )
        except Exception:
            if tracker:  # the download run's W&B log still counts this dataset, as failed
                files = len(dataset.files)
                seconds = time.monotonic() - started
                size = dataset.est_size_bytes
                tracker.record(store.Summary(dataset.name, "failed", 0, files, 0, files, size, 0, seconds), 0)
            raise
        tracked = tracker.record(run.summary, run.bytes_transferred) if tracker else None
        if dataset.access == "manual":
            context.log.info(f"{dataset.name} is a manual download: {dataset.instructions}")
        failed = [r for r in run.results if r.status == "failed"]
        for result in failed:
            context.log.warning(f"{dataset.name}: {result.path}: {result.error}")
        unverified = [r for r in run.results if r.status != "failed" and not r.sha256]
        metadata = _dataset_metadata(run) | _tracking_metadata(tracked, tracker)
        if dataset.instructions:
            metadata["instructions"] = MetadataValue.md(dataset.instructions)
        yield MaterializeResult(metadata=metadata)
        yield AssetCheckResult(
            check_name="no_failed_files",
            passed=not failed,
            severity=AssetCheckSeverity.ERROR,
            metadata={"failed": MetadataValue.json([f"{r.path}: {r.error}" for r in failed])},
        )
        yield AssetCheckResult(
            check_name="checksums_recorded",
            passed=not unverified,
            severity=AssetCheckSeverity.ERROR,
            metadata={"without_sha256": MetadataValue.json([r.path for r in unverified])},
        )

    return _dataset


def build_summary_asset(datasets: dict[str, Dataset]) -> AssetsDefinition:
    @asset(
        key=dataset_key("download_summary"),
        group_name=GROUP,
        kinds={"duckdb"},
        deps=[dataset_key(name) for name in datasets],
        description="datasets.download_summary: per dataset status and counts, as the old report showed them.",
        # follows any dataset's materialisation by itself, even while other datasets were never downloaded
        automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
    )
    def download_summary(warehouse: WarehouseResource) -> MaterializeResult:
        with warehouse.get_connection() as conn:
            store.ensure_schema(conn)
            rows = {
                row[0]: row
                for row in conn.execute(
                    f"""SELECT dataset, status, downloaded, failed, skipped, total, success_rate, est_size_bytes,
                               bytes_on_disk, seconds FROM {store.SCHEMA}.download_summary"""
                ).fetchall()
            }
        summaries = [
            store.Summary(*rows[name][:6], *rows[name][7:]) if name in rows
            else store.Summary(name, "missing", 0, 0, 0, len(d.files), d.est_size_bytes, 0, 0.0)
            for name, d in datasets.items()
        ]  # fmt: skip
        return MaterializeResult(
            metadata={
                "report": MetadataValue.md(
                    charts.markdown_table(store.REPORT_COLUMNS, [s.report_row() for s in summaries])
                ),
                "status_chart": MetadataValue.md(
                    charts.markdown_image(charts.dataset_status(summaries), "files per dataset")
                ),
                "complete": sum(s.status == "complete" for s in summaries),
                "partial": sum(s.status == "partial" for s in summaries),
                "failed": sum(s.status == "failed" for s in summaries),
                "manual": sum(s.status == "manual" for s in summaries),
                "missing": sum(s.status == "missing" for s in summaries),
                "dagster/row_count": len(rows),
            }
        )

    return download_summary


def dataset_assets() -> list[AssetsDefinition]:
    """One asset per dataset of the catalog in MVDATA_CATALOG (or the bundled one), plus the summary."""
    datasets = load_catalog(load_settings().catalog)
    names = list(datasets)
    return [*(build_dataset_asset(d, names) for d in datasets.values()), build_summary_asset(datasets)]

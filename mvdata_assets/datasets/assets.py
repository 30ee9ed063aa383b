"""Dagster wiring for the datasets half: one asset per catalog dataset, and the download summary."""

import re
import time
from collections.abc import Sequence
from pathlib import Path

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AutomationCondition,
    Config,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from mvdata_assets import charts
from mvdata_assets.datasets import store
from mvdata_assets.datasets.catalog import Dataset
from mvdata_assets.datasets.download import DatasetRun, download_dataset
from mvdata_assets.datasets.metadata import (
    dataset_metadata,
    file_checks,
    images_fetched_check,
    images_metadata,
    tracking_metadata,
)
from mvdata_assets.datasets.parts import build_images_asset, build_shards_asset, register_parts, shards_key
from mvdata_assets.datasets.shards import ShardResult
from mvdata_assets.resources import DatasetsResource, DownloadTrackingResource, WandbResource
from mvdata_assets.runs.offline import sync_offline
from mvdata_assets.warehouse import DATASETS_GROUP as GROUP
from mvdata_assets.warehouse import WarehouseResource, declared_table

# The job `dagster asset materialize` launches. Given a `--select` that names no asset (a misspelt group, tag or
# pattern), the CLI launches it with no asset selection at all, which runs every asset.
IMPLICIT_ASSET_JOB = "__ASSET_JOB"


class DownloadConfig(Config):
    verify: bool = False
    """Re-hash files already on disk (and image shards) instead of trusting their recorded size and checksum."""
    retry_failed: bool = False
    """URL-list datasets: fetch the images that failed in finished shards again, and rewrite those shards."""


def dataset_key(name: str) -> AssetKey:
    return AssetKey([GROUP, name])


def _progress_logger(context: AssetExecutionContext, name: str, every_s: float = 5.0):
    """A dataset's download progress as one log line per `every_s` at most, whatever its number of files: each line
    is an event-log write, which costs more than fetching a small file (a terminal gets bars from the CLI)."""
    files: dict[str, tuple[int, int | None]] = {}
    last = [time.monotonic()]

    def report(url: str, done: int, total: int | None) -> None:
        files[url] = (done, total)
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            finished = sum(1 for d, t in files.values() if t is not None and d >= t)
            got = sum(d for d, _ in files.values())
            context.log.info(f"{name}: {finished}/{len(files)} files started are whole, {got / 2**20:.1f} MiB")

    return report


def _shard_logger(context: AssetExecutionContext, name: str, every_s: float = 5.0):
    """One log line per `every_s` while a URL list's shards finish: how far, and how fast."""
    started, last = time.monotonic(), [0.0]
    done: dict[str, int] = {}

    def report(listed: str, shard: ShardResult) -> None:
        done[listed] = done.get(listed, 0) + 1
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            context.log.info(f"{name}: {listed}: {done[listed]} shards finished ({now - started:.0f} s)")

    return report


def _refuse_a_run_naming_no_asset(context: AssetExecutionContext) -> None:
    """Such a run would download every dataset of the catalog (hundreds of GB for the bundled one): it is refused
    before any request, saying why. The UI, `--select '*'`, sensors and the project's jobs name what they run."""
    if context.run.job_name == IMPLICIT_ASSET_JOB and context.run.asset_selection is None:
        raise Failure(
            description="this run names no asset, so it would download every dataset of the catalog: a --select that "
            "matches nothing (a misspelt group, tag or pattern) makes `dagster asset materialize` run every asset. "
            "See what a selection names with `dagster asset list --select ...`; `--select '*'` runs everything."
        )


def _datasets_in_run(context: AssetExecutionContext, catalog_names: list[str]) -> list[str]:
    """The datasets whose steps this run executes, so that its W&B log knows which dataset is its last: those its
    asset selection (or its job) names, narrowed to the steps it runs (a re-execution from failure: the failed ones)."""
    selection, steps = context.run.asset_selection, context.run.step_keys_to_execute
    names = catalog_names if selection is None else [key.path[-1] for key in selection if key.path[:1] == [GROUP]]
    return sorted(
        name for name in names
        if name in catalog_names and (steps is None or dataset_key(name).to_python_identifier() in steps)
    ) or catalog_names  # fmt: skip


def as_markdown_text(text: str | None) -> str | None:
    """The UI renders descriptions as Markdown: `caption<TAB>url` would lose `<TAB>` as an HTML tag."""
    return re.sub(r"([<>])", r"\\\1", text) if text else text


def build_dataset_asset(dataset: Dataset, catalog_names: list[str], part_shards: int = 0) -> AssetsDefinition:
    """`part_shards` > 0: a URL-list dataset's images are planned here and fetched by partitions (parts.py)."""
    key = dataset_key(dataset.name)
    in_parts = bool(dataset.url_list and part_shards)
    image_checks = (
        [AssetCheckSpec("images_fetched", asset=key, description="Every image of the URL lists is in a shard.")]
        if dataset.url_list and not in_parts
        else []
    )

    @asset(
        key=key,
        group_name=GROUP,
        kinds={"download"},
        description=as_markdown_text(dataset.description),
        check_specs=[
            AssetCheckSpec("no_failed_files", asset=key, description="Every file of the dataset is in place."),
            AssetCheckSpec("checksums_recorded", asset=key, description="Every file in place has a recorded sha256."),
            *image_checks,
        ],
        metadata={
            "access": dataset.access,
            "homepage": MetadataValue.url(dataset.homepage) if dataset.homepage else "",
            "license": dataset.license or "",
            "files_in_catalog": len(dataset.files),
            **({"url_list_format": dataset.url_list.format} if dataset.url_list else {}),
        },
    )
    def _dataset(
        context: AssetExecutionContext,
        config: DownloadConfig,
        warehouse: WarehouseResource,
        datasets: DatasetsResource,
        tracking: DownloadTrackingResource,
    ):
        _refuse_a_run_naming_no_asset(context)
        tracker = tracking.tracker(context.run_id, _datasets_in_run(context, catalog_names), datasets.data_root,
                                   context.log.warning)  # fmt: skip
        if tracker:
            tracker.start()
        started = time.monotonic()
        try:
            run = download_dataset(
                dataset,
                Path(datasets.data_root),
                warehouse.get_connection,
                verify=config.verify,
                concurrency=datasets.download_concurrency,
                progress=_progress_logger(context, dataset.name),
                images=datasets.image_options(config.retry_failed),
                shard_progress=_shard_logger(context, dataset.name),
                lock_timeout_s=warehouse.lock_timeout_s,
                extract_max_ratio=datasets.extract_max_ratio,
                say=context.log.info,
                images_in_parts=in_parts,
            )
        except Exception:
            if tracker:  # the download run's W&B log still counts this dataset, as failed
                tracker.record_failure(
                    dataset.name, len(dataset.files), dataset.est_size_bytes, time.monotonic() - started
                )
            raise
        tracked = tracker.record(run.summary, run.bytes_transferred) if tracker else None
        _log_outcome(context, dataset, run)
        metadata = dataset_metadata(run) | tracking_metadata(tracked, tracker)
        if in_parts:
            metadata |= register_parts(context, dataset.name, run.plans, part_shards)
        elif dataset.url_list:
            metadata |= images_metadata(run)
            kinds = run.failures_by_kind() or "none failed"
            context.log.info(
                f"{dataset.name}: {metadata['images_downloaded']} images downloaded "
                f"({metadata['images_per_second'].value} /s), {metadata['images_skipped']} already in shards, "
                f"{metadata['images_failed']} failed ({kinds})"
            )
        if dataset.instructions:
            metadata["instructions"] = MetadataValue.md(dataset.instructions)
        with warehouse.get_connection() as conn:
            version = DataVersion(store.files_digest(conn, dataset.name))
        yield MaterializeResult(metadata=metadata, data_version=version)
        yield from file_checks(run)
        if image_checks:
            yield images_fetched_check(run)

    return _dataset


def _log_outcome(context: AssetExecutionContext, dataset: Dataset, run: DatasetRun) -> None:
    """What the run's log says besides the metadata: a manual dataset's instructions, each failed file with its
    reason, and a changed list's shards removed."""
    if dataset.access == "manual":
        context.log.info(f"{dataset.name} is a manual download: {dataset.instructions}")
    for result in run.results + run.shards:
        if result.status == "failed":
            context.log.warning(f"{dataset.name}: {result.path}: {result.error}")
    for listed in run.lists:
        if listed.run.stale_removed:
            context.log.info(f"{listed.list} changed: removed {listed.run.stale_removed} shards made from its earlier "
                             "version")  # fmt: skip


def build_summary_asset(datasets: dict[str, Dataset], recorded_apart: Sequence[AssetKey] = ()) -> AssetsDefinition:
    """`recorded_apart`: the writers of datasets whose images are fetched in parts, which complete their summaries."""

    @asset(
        key=dataset_key("download_summary"),
        group_name=GROUP,
        kinds={"duckdb"},
        deps=[*(dataset_key(name) for name in datasets), *recorded_apart],
        description="datasets.download_summary: per dataset status and counts, the download report's columns; "
        "brings the download runs' own W&B logs (offline, under $MVDATA_HOME/tracking) into the wandb tables.",
        metadata=declared_table(store.SCHEMA, "download_summary"),
        # follows any dataset's materialisation by itself, even while other datasets were never downloaded
        automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
    )
    def download_summary(
        context: AssetExecutionContext,
        warehouse: WarehouseResource,
        tracking: DownloadTrackingResource,
        wandb: WandbResource,
    ) -> MaterializeResult:
        with warehouse.get_connection() as conn:
            store.ensure_schema(conn)
            # after every dataset step, so the W&B log of this download run is whole, whatever the executor
            logs = sync_offline(conn, [tracking.logs_dir], running_window_s=wandb.running_window_s)
            for problem in logs.problems:
                context.log.warning(problem)
            rows = {
                row[0]: row
                for row in conn.execute(
                    f"""SELECT dataset, status, downloaded, failed, skipped, total, success_rate, est_size_bytes,
                               bytes_on_disk, seconds FROM {store.SCHEMA}.download_summary"""
                ).fetchall()
            }
            version = DataVersion(store.summary_digest(conn))
        summaries = [
            store.Summary(*rows[name][:6], *rows[name][7:]) if name in rows
            else store.Summary(name, "manual" if d.access == "manual" else "missing", 0, 0, 0, len(d.files),
                               d.est_size_bytes, 0, 0.0)
            for name, d in datasets.items()
        ]  # fmt: skip
        return MaterializeResult(
            data_version=version,
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
                "download_logs_stored": logs.count("new", "grown", "replaced", "refreshed"),
            },
        )

    return download_summary


def dataset_assets(datasets: dict[str, Dataset], part_shards: int = 0) -> list[AssetsDefinition]:
    """One asset per dataset of a loaded catalog, plus the summary; `part_shards` > 0: URL-list images are fetched
    in partitions of that many shards (MVDATA_IMAGE_PART_SHARDS)."""
    names = list(datasets)
    in_parts = [d for d in datasets.values() if d.url_list and part_shards]
    return [
        *(build_dataset_asset(d, names, part_shards) for d in datasets.values()),
        *(build(d) for d in in_parts for build in (build_images_asset, build_shards_asset)),
        build_summary_asset(datasets, [shards_key(d.name) for d in in_parts]),
    ]

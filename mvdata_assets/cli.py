"""The `mvdata` command: the demo, what the warehouse holds, dataset status and downloads from a terminal."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mvdata_assets.db import connect
from mvdata_assets.runs import store
from mvdata_assets.settings import load_settings

if TYPE_CHECKING:  # the download engine is imported by `download` alone: the other commands start faster without it
    from mvdata_assets.datasets.download import DatasetRun


def report() -> int:
    settings = load_settings()
    if not settings.warehouse.exists():
        print(f"no warehouse yet at {settings.warehouse}: materialise the assets first (make demo)")
        return 1
    with connect(settings.warehouse, settings.lock_timeout_s) as conn:
        store.ensure_schema(conn)
        runs = conn.execute(
            """SELECT project, run_id, coalesce(display_name, ''), state, last_step, history_rows
               FROM wandb.runs ORDER BY project, created_at"""
        ).fetchall()
        counts = {t: conn.execute(f"SELECT count(*) FROM wandb.{t}").fetchone()[0] for t in store.RUN_TABLES}
    print(f"\nW&B runs in the warehouse ({len(runs)}):")
    wide = max([len("project"), *(len(r[0]) for r in runs)]), max([len("name"), *(len(r[2]) for r in runs)])
    print(
        f"  {'project':<{wide[0]}} {'run':<10} {'name':<{wide[1]}} {'state':<9} {'last step':>9} {'history rows':>12}"
    )
    for project, run_id, name, state, last_step, rows in runs:
        step = "-" if last_step is None else last_step
        print(f"  {project:<{wide[0]}} {run_id:<10} {name:<{wide[1]}} {state:<9} {step:>9} {rows:>12}")
    print("\nRows per table: " + ", ".join(f"wandb.{t} {n:,}" for t, n in counts.items()))
    print(f"Warehouse: {settings.warehouse}")
    exports = sorted(settings.exports.glob("*.parquet"))
    print(f"Exports ({len(exports)} parquet files): {settings.exports}")
    query = "SELECT key, count(*) FROM wandb.history GROUP BY key"
    print(f"Query: .venv/bin/python -c \"import duckdb; duckdb.connect('{settings.warehouse}').sql('{query}').show()\"")
    env = f"MVDATA_WANDB_OFFLINE_DIRS={':'.join(str(d) for d in settings.wandb_offline_dirs)}"
    if os.environ.get("DAGSTER_HOME"):  # the UI then shows the runs and materialisations already made
        env = f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} {env}"
    if settings.catalog:
        env += f" MVDATA_CATALOG={settings.catalog}"
    if os.environ.get("WANDB_MODE"):  # so download runs started from the UI are logged the same way
        env += f" WANDB_MODE={os.environ['WANDB_MODE']}"
    if settings.image_allowed_networks:  # so list images are fetched from the UI as here
        env += f" MVDATA_IMAGE_ALLOWED_NETWORKS={','.join(settings.image_allowed_networks)}"
    print(f"Open the UI: {env} .venv/bin/dagster dev -w workspace.yaml")
    return 0


def _size(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} {units[i]}" if i == 0 else f"{n:.1f} {units[i]}"


def status() -> int:
    """Each dataset's state from the warehouse and the disk, with no network: a folder that merely exists
    is not "complete"; every catalog file (and image shard) must be on disk as its verified download left it, and
    match the catalog as it is now. A URL-list dataset also shows its images in place out of those listed: link rot
    leaves it partial, and it is complete only when its last download was (every shard of its lists made). A
    dataset whose last download failed (a list that can't be read, no image in place) shows as failed."""
    from mvdata_assets.datasets import store as dataset_store
    from mvdata_assets.datasets.catalog import load_catalog
    from mvdata_assets.datasets.files import FileTask, Known, present

    settings = load_settings()
    catalog = load_catalog(settings.catalog)
    known: dict[tuple[str, str], Known] = {}  # (dataset, path) -> what its verified download recorded
    last_run: dict[str, datetime] = {}
    summaries: dict[str, str] = {}  # dataset -> the status of its last download
    shards: dict[str, list[tuple[str, int, int]]] = {}  # dataset -> (tar path, images, in place)
    if settings.warehouse.exists():
        with connect(settings.warehouse, settings.lock_timeout_s) as conn:
            dataset_store.ensure_schema(conn)
            for dataset, path, size, mtime_ns, sha256, file_status, updated in conn.execute(
                "SELECT dataset, path, bytes, mtime_ns, sha256, status, updated_at FROM datasets.files"
            ).fetchall():
                if file_status in ("downloaded", "skipped") and sha256 and mtime_ns is not None:
                    known[(dataset, path)] = Known(size, mtime_ns, sha256)
                last_run[dataset] = max(last_run.get(dataset, updated), updated)
            summaries = dict(conn.execute("SELECT dataset, status FROM datasets.download_summary").fetchall())
            for dataset, path, images, in_place in conn.execute(
                "SELECT dataset, path, images, in_place FROM datasets.shards ORDER BY dataset, list, shard"
            ).fetchall():
                shards.setdefault(dataset, []).append((path, images, in_place))
    print(f"{'dataset':<16} {'state':<9} {'files':>9} {'on disk':>12}  {'images':>15}  last run")
    for name, dataset in catalog.items():
        if dataset.access == "manual":
            print(f"{name:<16} {'manual':<9} {'-':>9} {'-':>12}  {'-':>15}  {dataset.instructions}")
            continue
        tasks = [FileTask(f.url, settings.data_root / name / f.path, f.size, f.sha256) for f in dataset.files]
        tasks += [FileTask(path, Path(path)) for path, _, _ in shards.get(name, [])]  # checked against their record
        in_place = [record for t in tasks if present(t, record := known.get((name, str(t.dest))))]
        verified, total = len(in_place), len(tasks)
        on_disk = sum(record.bytes for record in in_place)
        listed = sum(images for _, images, _ in shards.get(name, []))
        images_in_place = sum(n for _, _, n in shards.get(name, []))
        last = summaries.get(name)
        if last == "failed":
            state = "failed"
        elif verified == total and images_in_place == listed and (dataset.url_list is None or last == "complete"):
            state = "complete"
        else:
            state = "partial" if verified else "missing"
        images = f"{images_in_place}/{listed}" if dataset.url_list else "-"
        when = last_run[name].strftime("%Y-%m-%d %H:%M") if name in last_run else "never"
        print(f"{name:<16} {state:<9} {f'{verified}/{total}':>9} {_size(on_disk):>12}  {images:>15}  {when}")
    return 0


def download(names: list[str], verify: bool, retry_failed: bool = False) -> int:
    """Downloads datasets from a terminal with progress bars (the same engine the assets use)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from mvdata_assets.datasets.catalog import load_catalog
    from mvdata_assets.datasets.download import ImageOptions, download_dataset
    from mvdata_assets.datasets.shards import ShardResult
    from mvdata_assets.tracking import DownloadTracker

    settings = load_settings()
    catalog = load_catalog(settings.catalog)
    unknown = [n for n in names if n not in catalog]
    if unknown:
        print(f"not in the catalog: {', '.join(unknown)} (known: {', '.join(catalog)})")
        return 2
    failed = 0
    selected = names or list(catalog)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns) as bars:
        tasks: dict[str, int] = {}
        tracker = (
            DownloadTracker(settings.home, selected, settings.data_root, warn=lambda m: bars.console.print(m))
            if settings.tracking_enabled
            else None
        )

        def progress(url: str, done: int, total: int | None) -> None:
            if url not in tasks:
                tasks[url] = bars.add_task(url.rsplit("/", 1)[-1], total=total)
            bars.update(tasks[url], completed=done, total=total)

        def shard_progress(listed: str, shard: ShardResult) -> None:
            bars.console.print(
                f"  {listed} shard {shard.index:05d}: {shard.state}, {shard.in_place}/{shard.total} images in place"
            )

        images = ImageOptions.from_settings(settings, retry_failed)

        def say(line: str) -> None:  # one line, however narrow the terminal and whatever brackets it holds
            bars.console.print(line, markup=False, highlight=False, soft_wrap=True)

        def warehouse() -> AbstractContextManager:
            return connect(settings.warehouse, settings.lock_timeout_s, on_busy=say)

        for name in selected:
            if tracker:
                tracker.start()
            started = time.monotonic()
            try:
                run = download_dataset(
                    catalog[name],
                    settings.data_root,
                    warehouse,
                    verify=verify,
                    concurrency=settings.download_concurrency,
                    progress=progress,
                    images=images,
                    shard_progress=shard_progress,
                    lock_timeout_s=settings.lock_timeout_s,
                    extract_max_ratio=settings.extract_max_ratio,
                    say=say,
                )
            except Exception as exc:  # noqa: BLE001 - one line for the user, and the next dataset goes on
                say(f"{name}: failed: {type(exc).__name__}: {exc}")
                if tracker:
                    dataset = catalog[name]
                    tracker.record_failure(name, len(dataset.files), dataset.est_size_bytes, time.monotonic() - started)
                failed += 1
                continue
            tracked = tracker.record(run.summary, run.bytes_transferred) if tracker else None
            if tracked:
                bars.console.print(f"W&B: {tracked.name}: {tracked.url or tracked.offline_dir}")
            _print_outcome(bars.console.print, name, run, catalog[name].instructions)
            # a failed file, or a dataset that failed (no image of its lists in place); link rot alone is reported
            failed += run.summary.status == "failed" or any(r.status == "failed" for r in run.results + run.shards)
    return 1 if failed else 0


def _print_outcome(say: Callable[[str], None], name: str, run: DatasetRun, instructions: str | None) -> None:
    """A dataset's download in a few lines: its counts, each failed file with its reason, and its images; a manual
    dataset's instructions."""
    s = run.summary
    say(f"{name}: {s.status} ({s.downloaded} downloaded, {s.skipped} skipped, {s.failed} failed)")
    if s.status == "manual":
        say(f"  a manual download: {instructions}")
    for result in run.results:
        if result.status == "failed":
            say(f"  {result.path}: {result.error}")
    if run.lists:
        kinds = run.failures_by_kind() or "none"
        say(f"  images: {run.images['downloaded']} downloaded, {run.images['skipped']} already in shards, "
            f"{run.images['failed']} failed (by kind: {kinds})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mvdata", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="what the warehouse holds and where the exports are")
    commands.add_parser("status", help="each dataset's state from the warehouse and the disk (no network)")
    fetch = commands.add_parser("download", help="download datasets from a terminal, with progress bars")
    fetch.add_argument("names", nargs="*", help="datasets of the catalog (all when none is given)")
    fetch.add_argument("--verify", action="store_true", help="re-hash files already on disk")
    fetch.add_argument(
        "--retry-failed", action="store_true", help="URL lists: fetch the failed images of finished shards again"
    )
    commands.add_parser("demo", help="write demo runs and files, serve them on loopback, materialise every asset")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except Exception as exc:  # noqa: BLE001 - a bad setting, a busy warehouse, a bad catalog: one line, no traceback
        print(f"mvdata {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from mvdata_assets.demo import run_demo

        code = run_demo(load_settings().home)
        return code or (report() or status())
    if args.command == "status":
        return status()
    if args.command == "download":
        return download(args.names, args.verify, args.retry_failed)
    return report()


if __name__ == "__main__":
    sys.exit(main())

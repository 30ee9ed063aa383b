"""One dataset from catalog entry to verified files on disk and rows in the warehouse.

Shared by the Dagster asset and `mvdata download`; plain Python (no Dagster import). The warehouse is
opened only before and after the transfers, never held across them. A URL-list dataset then fetches the images
its lists point to into `<dataset>/shards/<list path without suffix>/`, one WebDataset tar per `shard_size` rows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from mvdata_assets import defaults
from mvdata_assets.datasets import store
from mvdata_assets.datasets.catalog import Dataset, UrlList, shards_folder
from mvdata_assets.datasets.digests import sha256_of
from mvdata_assets.datasets.extract import extract
from mvdata_assets.datasets.fetch import Downloader
from mvdata_assets.datasets.files import FileResult, FileTask, Known, Progress
from mvdata_assets.datasets.shards import ShardResult
from mvdata_assets.datasets.url_lists import (
    ListPlan,
    UrlListError,
    UrlListRun,
    count_list,
    fetch_url_list,
    finished_shards,
    plan_url_list,
    planned_version,
)
from mvdata_assets.db import exclusive
from mvdata_assets.settings import Settings

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
ShardProgress = Callable[[str, ShardResult], None]  # (list path, shard): each shard as it is finished
LOCKS = ".locks"  # under the data root: one lock file per dataset, held while it downloads


@dataclass(frozen=True)
class ImageOptions:
    """How URL-list images are fetched (see `fetch_url_list`)."""

    concurrency: int = defaults.IMAGE_CONCURRENCY
    max_host_connections: int = defaults.IMAGE_HOST_CONNECTIONS
    timeout_s: float = defaults.IMAGE_TIMEOUT_S
    retry_failed: bool = False  # fetch the failed URLs of finished shards again
    allowed_networks: tuple[str, ...] = ()  # reachable besides public addresses (see addresses.py)

    @classmethod
    def from_settings(cls, settings: Settings, retry_failed: bool = False) -> ImageOptions:
        return cls(settings.image_concurrency, settings.image_host_connections, settings.image_timeout_s, retry_failed,
                   settings.image_allowed_networks)  # fmt: skip


@dataclass
class ListRun:
    """One URL list's images in this run."""

    list: str
    shards_dir: Path
    run: UrlListRun


@dataclass
class DatasetRun:
    summary: store.Summary
    folder: Path
    results: list[FileResult] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    lists: list[ListRun] = field(default_factory=list)
    shards: list[FileResult] = field(default_factory=list)  # the shard tars, as `datasets.files` rows
    redone: list[str] = field(default_factory=list)  # shards whose tar no longer matched its record: fetched again
    plans: dict[str, ListPlan] = field(default_factory=dict)  # per list, when its images are fetched in parts

    @property
    def bytes_transferred(self) -> int:
        return sum(r.bytes_transferred for r in self.results) + sum(r.bytes_transferred for r in self.shards)

    @property
    def images(self) -> Counter[str]:
        """downloaded / failed / skipped images, the image bytes fetched, and `bytes`: the shards on disk."""
        counts: Counter[str] = Counter()
        for listed in self.lists:
            run = listed.run
            counts.update(downloaded=run.downloaded, failed=run.failed, skipped=run.skipped, fetched=run.bytes)
            counts["bytes"] += sum(s.tar_bytes for s in run.shards)
        return counts

    @property
    def error_kinds(self) -> Counter[str]:
        return sum((listed.run.error_kinds for listed in self.lists), Counter())

    def failures_by_kind(self) -> str:
        """'http_404 2, not_an_image 1': the images' failures, most common first ('' when none failed)."""
        return ", ".join(f"{kind} {n}" for kind, n in self.error_kinds.most_common())


def download_dataset(
    dataset: Dataset,
    data_root: Path,
    connect: Connect,
    *,
    verify: bool = False,
    concurrency: int = defaults.DOWNLOAD_CONCURRENCY,
    progress: Progress | None = None,
    images: ImageOptions | None = None,
    shard_progress: ShardProgress | None = None,
    lock_timeout_s: float = defaults.LOCK_TIMEOUT_S,
    say: Callable[[str], None] | None = None,
    extract_max_ratio: int = defaults.EXTRACT_MAX_RATIO,
    images_in_parts: bool = False,
) -> DatasetRun:
    """One download of a dataset at a time, whoever runs it (a Dagster step, `mvdata download`): a second one waits
    for the first (`say` hears of the wait when it starts and how long it took), then finds its files in place.

    `images_in_parts`: a URL-list dataset's lists are planned (`run.plans`) instead of fetched; their shards are
    then fetched by `fetch_image_part`, part by part, and recorded by `record_image_parts`.

    Raises Busy when the other download outlasts `lock_timeout_s`, and UrlListError (after recording the files) when
    a list can't be read as its catalog entry says.
    """
    waited = (lambda s: say(f"waited {s:.1f} s for another download of dataset {dataset.name}")) if say else None
    with exclusive(data_root / LOCKS / f"{dataset.name}.lock", f"dataset {dataset.name}", lock_timeout_s, waited, say):
        return _download(dataset, data_root, connect, verify, concurrency, progress, images, shard_progress,
                         extract_max_ratio, images_in_parts)  # fmt: skip


def _download(
    dataset: Dataset,
    data_root: Path,
    connect: Connect,
    verify: bool,
    concurrency: int,
    progress: Progress | None,
    images: ImageOptions | None,
    shard_progress: ShardProgress | None,
    extract_max_ratio: int,
    images_in_parts: bool,
) -> DatasetRun:
    started = time.monotonic()
    folder = data_root / dataset.name
    if dataset.access == "manual":
        run = DatasetRun(store.summarize(dataset.name, [], dataset.est_size_bytes, 0.0, manual=True), folder)
        with connect() as conn:
            store.ensure_schema(conn)
            store.record_summary(conn, run.summary)
        return run
    tasks = [FileTask(f.url, folder / f.path, f.size, f.sha256, f.md5) for f in dataset.files]
    with connect() as conn:
        store.ensure_schema(conn)
        known = store.known_files(conn, dataset.name)
    downloader = Downloader(
        concurrency=concurrency,
        hf_token=os.environ.get("HF_TOKEN"),
        hf_endpoint=os.environ.get("HF_ENDPOINT"),
        progress=progress,
    )
    results = downloader.fetch_all(tasks, known, verify=verify)
    extracted = []
    catalog_files = [task.dest for task in tasks]  # no archive member may replace one of them
    for file, result in zip(dataset.files, results, strict=True):
        if file.extract and result.status != "failed":
            try:
                done = extract(folder / file.path, folder, sha256=result.sha256, protected=catalog_files,
                               max_ratio=extract_max_ratio)  # fmt: skip
                extracted.append(f"{file.path}: {done.members} members" + (" (already)" if done.skipped else ""))
            except (ValueError, OSError) as exc:  # an unsafe or broken archive fails that file, not the run
                result.status, result.error = "failed", f"extracting: {exc}"
    run = DatasetRun(store.Summary(dataset.name, "failed", 0, 0, 0, 0, None, 0, 0.0), folder, results, extracted)
    if dataset.url_list is not None:
        with connect() as conn:  # before the images: a list that can't be read, or a full disk, keeps these records
            store.record_files(conn, dataset.name, results)
        try:
            if images_in_parts:
                for listed, where in _lists(dataset, run):
                    run.plans[listed] = plan_url_list(
                        where.list_path,
                        where.shards_dir,
                        dataset.url_list,
                        captions=where.captions,
                        list_sha256=where.list_sha256,
                    )
                    _record_finished_parts(dataset.name, run, listed, where, known, connect)
            else:
                _fetch_images(dataset, run, known, verify, images or ImageOptions(), shard_progress, connect)
        except UrlListError:
            summary = store.summarize(dataset.name, results, dataset.est_size_bytes, time.monotonic() - started)
            run.summary = dataclasses.replace(summary, status="failed")
            with connect() as conn:
                store.record_summary(conn, run.summary)
            raise
    run.summary = _summary(dataset, run, time.monotonic() - started)
    with connect() as conn:
        store.record_files(conn, dataset.name, results)
        store.record_summary(conn, run.summary)
    return run


def _summary(dataset: Dataset, run: DatasetRun, seconds: float) -> store.Summary:
    """The dataset's counts, its images included; partial while a shard planned for its parts is not finished, or a
    shard was left to another process writing it."""
    summary = store.summarize(dataset.name, run.results, dataset.est_size_bytes, seconds, images=run.images)
    unfinished = sum(len(listed.run.shards) for listed in run.lists) < sum(p.shards for p in run.plans.values())
    if summary.status == "complete" and (unfinished or any(listed.run.busy for listed in run.lists)):
        summary = dataclasses.replace(summary, status="partial")
    return summary


def _record_finished_parts(
    name: str, run: DatasetRun, listed: str, where: ListPlace, known: dict[Path, Known], connect: Connect
) -> None:
    """The shards of a planned list (`run.plans`) that are finished now, into the run and the warehouse."""
    shards = finished_shards(where.shards_dir) if where.shards_dir.is_dir() else []
    stale_removed = run.plans[listed].stale_removed
    _record_list(name, run, listed, where, UrlListRun(shards, 0.0, stale_removed), known, connect)


def _recheck_shards(shards_dir: Path, known: dict[Path, Known], verify: bool) -> list[str]:
    """Finished shards whose tar no longer matches its record lose their parquet, so this run fetches them again.

    A tar whose size and mtime match its record is trusted, as any verified file is; `verify` re-hashes every one.
    """
    redone = []
    for tar in sorted(shards_dir.glob("*.tar")):
        record, parquet = known.get(tar), tar.with_suffix(".parquet")
        if record is None or not parquet.exists():
            continue
        if (verify or not record.unchanged(tar.stat())) and sha256_of(tar) != record.sha256:
            parquet.unlink()
            redone.append(str(tar))
    return redone


def _shard_row(url: str, shard: ShardResult, known: dict[Path, Known]) -> FileResult:
    """The shard tar as a file of the dataset: its sha256 from this run, from its record, or read now."""
    st = shard.tar_path.stat()
    sha256 = shard.sha256
    if sha256 is None:
        record = known.get(shard.tar_path)
        sha256 = record.sha256 if record is not None and record.unchanged(st) else sha256_of(shard.tar_path)
    status = "skipped" if shard.state == "skipped" else "downloaded"
    return FileResult(url, str(shard.tar_path), status, bytes=st.st_size, sha256=sha256, seconds=shard.seconds,
                      bytes_transferred=shard.bytes, mtime_ns=st.st_mtime_ns)  # fmt: skip


@dataclass(frozen=True)
class ListPlace:
    """Where one URL list of a dataset is, and where its shards go."""

    list_path: Path
    shards_dir: Path
    captions: Path | None
    list_sha256: str | None  # when known already: saves hashing the list
    url: str  # of the catalog file it comes from (itself, or the archive holding it): the shard tars' url


def _place(dataset: Dataset, folder: Path, listed: str, list_sha256: str | None) -> ListPlace:
    spec = dataset.url_list
    assert spec is not None
    own = next((f for f in dataset.files if f.path == listed), None)
    source = own or next(f for f in dataset.files if f.extract)  # the catalog checks one of them exists
    captions = folder / spec.captions[spec.lists.index(listed)] if spec.captions else None
    return ListPlace(folder / listed, folder / shards_folder(listed), captions, list_sha256, source.url)


def _lists(dataset: Dataset, run: DatasetRun) -> Iterator[tuple[str, ListPlace]]:
    """Each list of a URL-list dataset whose file (or archive) is in place; one whose file failed is left for next
    time (its failure is already counted, as a failed file)."""
    spec = dataset.url_list
    assert spec is not None
    by_path = {r.path: r for r in run.results}
    archives = [r for f, r in zip(dataset.files, run.results, strict=True) if f.extract]
    for i, listed in enumerate(spec.lists):
        list_path = run.folder / listed
        own = by_path.get(str(list_path))
        source = own if own is not None else (archives[0] if archives else None)
        if source is None or source.status == "failed":
            continue
        if not list_path.is_file():
            raise UrlListError(
                f"{dataset.name}: url_list.lists[{i}] {listed!r} is not in {run.folder} after extraction"
            )
        yield listed, _place(dataset, run.folder, listed, own.sha256 if own is not None else None)


def _fetch_images(
    dataset: Dataset,
    run: DatasetRun,
    known: dict[Path, Known],
    verify: bool,
    options: ImageOptions,
    shard_progress: ShardProgress | None,
    connect: Connect,
) -> None:
    """Each list of a URL-list dataset into its shards, recorded list by list."""
    spec = dataset.url_list
    assert spec is not None
    for listed, where in _lists(dataset, run):
        run.redone += _recheck_shards(where.shards_dir, known, verify) if where.shards_dir.is_dir() else []

        def finished(shard: ShardResult, listed: str = listed) -> None:
            if shard_progress is not None:
                shard_progress(listed, shard)

        images = _fetch_list(spec, where, options, on_shard=finished)
        _record_list(dataset.name, run, listed, where, images, known, connect)


def _record_list(
    name: str,
    run: DatasetRun,
    listed: str,
    where: ListPlace,
    images: UrlListRun,
    known: dict[Path, Known],
    connect: Connect,
) -> None:
    """A list's shards into the run and the warehouse: per list, so a later list's failure keeps this one's."""
    run.lists.append(ListRun(listed, where.shards_dir, images))
    rows = [_shard_row(where.url, shard, known) for shard in images.shards]
    run.shards += rows
    with connect() as conn:
        store.record_files(conn, name, rows)
        store.forget_files_under(conn, name, where.shards_dir, [r.path for r in rows])
        store.record_shards(
            conn,
            name,
            listed,
            [
                store.Shard(listed, s.index, str(s.tar_path), s.total, s.in_place, s.failed, s.error_kinds,
                            s.image_bytes, s.tar_bytes, row.sha256, None if s.state == "skipped" else s.seconds)
                for s, row in zip(images.shards, rows, strict=True)
            ],
        )  # fmt: skip


def fetch_image_part(
    dataset: Dataset, data_root: Path, listed: str, version: str, shards: range, options: ImageOptions
) -> UrlListRun:
    """One part of a list's shards, as a partition fetches it (perhaps on another machine): shards and their
    parquet only, never the warehouse, and no dataset lock, so parts run side by side. Raises UrlListError when
    the list on disk is not the one of plan `version` (see `plan_url_list`, run by
    `download_dataset(images_in_parts=True)`)."""
    spec = dataset.url_list
    if spec is None:
        raise UrlListError(f"{dataset.name} is not a URL-list dataset (its catalog entry has no url_list)")
    if listed not in spec.lists:
        raise UrlListError(f"{dataset.name} has no URL list {listed!r} (its lists: {', '.join(spec.lists)})")
    own = next((f for f in dataset.files if f.path == listed), None)
    where = _place(dataset, data_root / dataset.name, listed, own.sha256 if own is not None else None)
    if not where.list_path.is_file():
        raise UrlListError(f"{where.list_path} is missing: materialise datasets/{dataset.name} first")
    if planned_version(where.shards_dir) != version:
        raise UrlListError(f"{listed} is planned as another version than this part's ({version}): the list changed "
                           "since, and its parts have new partition keys")  # fmt: skip
    return _fetch_list(spec, where, options, shards=shards)


def _fetch_list(spec: UrlList, where: ListPlace, options: ImageOptions, **extra: Any) -> UrlListRun:
    """`fetch_url_list` of one list of a dataset, as `options` say; `extra`: its per-call arguments."""
    return fetch_url_list(
        where.list_path,
        where.shards_dir,
        spec,
        captions=where.captions,
        list_sha256=where.list_sha256,
        concurrency=options.concurrency,
        max_host_connections=options.max_host_connections,
        timeout_s=options.timeout_s,
        retry_failed=options.retry_failed,
        allowed_networks=options.allowed_networks,
        **extra,
    )


def record_image_parts(
    dataset: Dataset, data_root: Path, connect: Connect, lock_timeout_s: float = defaults.LOCK_TIMEOUT_S
) -> DatasetRun:
    """The one warehouse writer of a dataset fetched in parts: every finished shard into datasets.files and
    datasets.shards, and the dataset's summary with its images. Holds the dataset's lock, as a download does.
    `run.plans` says how many shards each list makes, so a part not finished yet shows as missing shards."""
    started = time.monotonic()
    folder = data_root / dataset.name
    spec = dataset.url_list
    assert spec is not None
    with exclusive(data_root / LOCKS / f"{dataset.name}.lock", f"dataset {dataset.name}", lock_timeout_s):
        with connect() as conn:
            store.ensure_schema(conn)
            known = store.known_files(conn, dataset.name)
        results = [_recorded_file(f.url, folder / f.path, known) for f in dataset.files]
        run = DatasetRun(store.Summary(dataset.name, "failed", 0, 0, 0, 0, None, 0, 0.0), folder, results)
        for listed, where in _lists(dataset, run):
            run.plans[listed] = count_list(where.list_path, spec, where.captions)
            _record_finished_parts(dataset.name, run, listed, where, known, connect)
        run.summary = _summary(dataset, run, time.monotonic() - started)
        with connect() as conn:
            store.record_summary(conn, run.summary)
    return run


def _recorded_file(url: str, path: Path, known: dict[Path, Known]) -> FileResult:
    """A catalog file as its dataset's download recorded it: in place, or failed (the download says why)."""
    record = known.get(path)
    if record is None:
        return FileResult(url, str(path), "failed", error="not downloaded (see its dataset's materialisation)")
    return FileResult(url, str(path), "skipped", bytes=record.bytes, sha256=record.sha256, mtime_ns=record.mtime_ns)

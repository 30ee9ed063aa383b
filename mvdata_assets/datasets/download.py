"""One dataset from catalog entry to verified files on disk and rows in the warehouse.

Shared by the Dagster asset and `mvdata download`; plain Python (no Dagster import). The warehouse is
opened only before and after the transfers, never held across them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from mvdata_assets.datasets import store
from mvdata_assets.datasets.catalog import Dataset
from mvdata_assets.datasets.extract import extract
from mvdata_assets.datasets.fetch import Downloader, FileResult, FileTask, Progress

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]


@dataclass
class DatasetRun:
    summary: store.Summary
    folder: Path
    results: list[FileResult] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)

    @property
    def bytes_transferred(self) -> int:
        return sum(r.bytes_transferred for r in self.results)


def download_dataset(
    dataset: Dataset,
    data_root: Path,
    connect: Connect,
    *,
    verify: bool = False,
    concurrency: int = 16,
    progress: Progress | None = None,
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
    for file, result in zip(dataset.files, results, strict=True):
        if file.extract and result.status != "failed":
            try:
                done = extract(folder / file.path, folder, sha256=result.sha256)
                extracted.append(f"{file.path}: {done.members} members" + (" (already)" if done.skipped else ""))
            except (ValueError, OSError) as exc:  # an unsafe or broken archive fails that file, not the run
                result.status, result.error = "failed", f"extracting: {exc}"
    summary = store.summarize(dataset.name, results, dataset.est_size_bytes, time.monotonic() - started)
    with connect() as conn:
        store.record_files(conn, dataset.name, results)
        store.record_summary(conn, summary)
    return DatasetRun(summary, folder, results, extracted)

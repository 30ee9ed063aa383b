"""Where a file becomes durable (durable.py), through the download engine: per batch, the bytes on disk before the
rename, the rename before the folder's fsync, the report last; a step that fails fails its files with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvdata_assets.datasets import durable
from mvdata_assets.datasets import fetch as fetch_module
from mvdata_assets.datasets.fetch import FileResult, FileTask
from mvdata_assets_tests.datasets.downloading import assert_downloaded, blob, downloader, sha256
from mvdata_assets_tests.datasets.fileserver import FileServer


def test_files_are_synced_before_their_rename_and_reported_after_it(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per batch: one syncfs while every file is a whole .part, then the renames, one folder fsync, then the report."""
    datas = {f"{i:03d}.bin": blob(20_000, 300 + i) for i in range(40)}
    tasks = [FileTask(file_server.add(n, d), tmp_path / n, len(d), sha256(d)) for n, d in datas.items()]
    batches: list[list[str]] = []
    problems: list[str] = []  # seen in the committer's thread, asserted here
    real_commit, real_syncfs, real_fsync_dir = durable.commit, durable.syncfs, durable.fsync_dir

    def commit(batch: list[durable.Verified]) -> None:
        batches.append([Path(item.dest).name for item in batch])
        real_commit(batch)

    def syncfs(folder: Path) -> None:
        for result, part, dest in _batch_of(batches[-1]):
            if dest.exists() or part.read_bytes() != datas[dest.name] or result.status == "downloaded":
                problems.append(f"{dest.name}: in place or reported before the sync, or its .part is not whole")
        real_syncfs(folder)

    def fsync_dir(folder: Path) -> None:
        for result, part, dest in _batch_of(batches[-1]):
            if part.exists() or not dest.exists() or result.status == "downloaded":
                problems.append(f"{dest.name}: not renamed before the folder's fsync, or reported before it")
        real_fsync_dir(folder)

    def _batch_of(names: list[str]) -> list[tuple[FileResult, Path, Path]]:
        return [(by_name[n], tmp_path / f"{n}.part", tmp_path / n) for n in names]

    monkeypatch.setattr(durable, "commit", commit)
    monkeypatch.setattr(durable, "syncfs", syncfs)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    by_name: dict[str, FileResult] = {}
    real_result = fetch_module.FileResult

    def result(*args: object, **kwargs: object) -> FileResult:
        made = real_result(*args, **kwargs)  # type: ignore[arg-type]
        by_name[Path(made.path).name] = made
        return made

    monkeypatch.setattr(fetch_module, "FileResult", result)
    results = downloader(concurrency=8).fetch_all(tasks)
    for task, outcome in zip(tasks, results, strict=True):
        assert_downloaded(outcome, task, datas[task.dest.name])
    assert problems == []
    assert sorted(n for batch in batches for n in batch) == sorted(datas)  # each file in exactly one batch


def test_a_file_whose_rename_fails_is_not_downloaded(file_server: FileServer, tmp_path: Path) -> None:
    datas = [blob(10_000, 400 + i) for i in range(5)]
    tasks = [
        FileTask(file_server.add(f"r/{i}.bin", data), tmp_path / f"{i}.bin", len(data), sha256(data))
        for i, data in enumerate(datas)
    ]

    def progress(url: str, done: int, total: int | None) -> None:  # a folder takes the place while 2.bin arrives
        if url == tasks[2].url and not (tmp_path / "2.bin").exists():
            (tmp_path / "2.bin").mkdir()
            (tmp_path / "2.bin" / "in-the-way").write_text("a folder where the file should go")

    results = downloader(progress=progress).fetch_all(tasks)
    assert [r.status for r in results] == ["downloaded", "downloaded", "failed", "downloaded", "downloaded"]
    assert "renaming 2.bin.part into place" in (results[2].error or "")
    assert results[2].mtime_ns is None
    assert (tmp_path / "2.bin").is_dir()
    for i in (0, 1, 3, 4):
        assert_downloaded(results[i], tasks[i], datas[i])


@pytest.mark.parametrize("step", ["syncfs", "fsync_dir"])
def test_a_failed_sync_fails_its_files_with_the_reason(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    datas = [blob(10_000, 500 + i) for i in range(3)]
    tasks = [
        FileTask(file_server.add(f"s/{i}.bin", data), tmp_path / f"{i}.bin", len(data), sha256(data))
        for i, data in enumerate(datas)
    ]

    def broken(folder: Path) -> None:
        raise OSError(5, "Input/output error", str(folder))

    monkeypatch.setattr(durable, step, broken)
    results = downloader().fetch_all(tasks)
    assert [r.status for r in results] == ["failed"] * 3
    for result in results:
        assert "Input/output error" in (result.error or "")
        assert ("durable" if step == "syncfs" else "fsync of") in (result.error or "")
    if step == "syncfs":  # nothing was renamed over bytes that may not be on disk
        assert not any(t.dest.exists() for t in tasks)
        assert all(t.dest.with_name(t.dest.name + ".part").read_bytes() == d for t, d in zip(tasks, datas, strict=True))

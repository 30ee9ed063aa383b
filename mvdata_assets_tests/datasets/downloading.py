"""What the download tests share: test data, a Downloader that gives up fast, the checks of a result, and the dataset
assets built from the environment's settings."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from dagster import AssetsDefinition

from mvdata_assets.datasets.assets import dataset_assets
from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets.datasets.fetch import Downloader, FileResult, FileTask
from mvdata_assets.settings import load_settings
from mvdata_assets_tests.datasets.fileserver import FileServer, Request


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def downloader(**kwargs: object) -> Downloader:
    """A Downloader with short back-offs and timeouts, so fault tests stay fast."""
    options: dict[str, object] = {"retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0}
    options.update(kwargs)
    return Downloader(**options)  # type: ignore[arg-type]


def catalog_assets() -> list[AssetsDefinition]:
    """The dataset assets as mvdata_assets/definitions.py builds them, from the settings in the environment now."""
    settings = load_settings()
    return dataset_assets(load_catalog(settings.catalog), settings.image_part_shards)


def gets(file_server: FileServer, name: str) -> list[Request]:
    return [r for r in file_server.requests_for(name) if r.method == "GET"]


def leftovers(dest: Path) -> list[str]:
    """The engine's temporary files next to `dest` (should be gone once a file is downloaded or failed for good)."""
    return sorted(p.name for p in dest.parent.glob(dest.name + ".*"))


def assert_downloaded(result: FileResult, task: FileTask, data: bytes, *, clean: bool = True) -> None:
    """Downloaded with exactly `data` at dest, the result says so, and (with clean) no .part/.etag is left."""
    assert (result.status, result.error) == ("downloaded", None), result
    assert task.dest.read_bytes() == data
    assert result.path == str(task.dest)
    assert result.bytes == len(data)
    assert result.sha256 == sha256(data)
    assert result.mtime_ns == task.dest.stat().st_mtime_ns
    if clean:
        assert leftovers(task.dest) == []


def range_start(request: Request) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", request.range or "")
    assert match, f"expected an open Range request, got {request.range!r}"
    return int(match.group(1))

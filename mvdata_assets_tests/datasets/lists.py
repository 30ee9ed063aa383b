"""URL lists for the tests of the URL-list engine: a CC3M-style list of loopback images, and what a run wrote."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from mvdata_assets.datasets import url_lists
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.url_lists import UrlListRun

CC3M = UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0, header=False, shard_size=4)
LOOPBACK = ("127.0.0.0/8",)  # where the test server is; third-party URLs may not reach it by default


def fetch_url_list(*args: Any, **kwargs: Any) -> UrlListRun:
    return url_lists.fetch_url_list(*args, **{"allowed_networks": LOOPBACK, **kwargs})


def image(fmt: str, shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(out, fmt)
    return out.getvalue()


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Rows as CC3M has them: caption<TAB>url, no header."""
    path.write_text("".join(f"{caption}\t{url}\n" for caption, url in rows), encoding="utf-8")
    return path


def outcomes(out_dir: Path) -> dict[str, dict]:
    rows = [r for p in sorted(out_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["caption"]: r for r in rows}


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}

"""One download of a dataset at a time: a second process waits for the first, says so, and fetches nothing again."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import duckdb
import pytest
import yaml
from filelock import FileLock

from mvdata_assets.cli import main
from mvdata_assets.datasets.catalog import CatalogFile, Dataset, UrlList, load_catalog
from mvdata_assets.datasets.download import ImageOptions, download_dataset, fetch_image_part
from mvdata_assets.datasets.url_lists import CLAIMS, UrlListError
from mvdata_assets.db import connect
from mvdata_assets_tests.datasets.fileserver import FileServer
from mvdata_assets_tests.datasets.lists import image

DATA = bytes(range(256)) * 800  # 200 KiB


def held(lock: Path) -> bool:
    """Another process holds `lock` (filelock's flock), seen without waiting for it."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the lock if it was free
    return False


def test_a_second_download_of_a_dataset_waits_for_the_first_and_fetches_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with FileServer() as server:
        url = server.add("slow/big.bin", DATA)
        server.fault("slow/big.bin", "drip", rate=50_000)  # ~4 s
        entry = {"url": url, "size": len(DATA)}  # a size but no checksum: the transfer alone proves the bytes
        catalog = {"datasets": {"slow": {"description": "one slow file", "access": "public", "files": [entry]}}}
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(tmp_path / "catalog.yaml"))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        first = subprocess.Popen([sys.executable, "-m", "mvdata_assets.cli", "download", "slow"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not held(tmp_path / "home" / "datasets" / ".locks" / "slow.lock"):
                assert time.monotonic() < deadline and first.poll() is None, "the first download never started"
                time.sleep(0.02)
            assert main(["download", "slow"]) == 0
            second = capsys.readouterr().out
        finally:
            first_out = first.communicate(timeout=60)[0]
    assert first.returncode == 0, first_out
    assert "slow: complete (1 downloaded, 0 skipped, 0 failed)" in first_out
    assert "waiting up to 600 s for another writer of dataset slow" in second  # said as the wait starts
    assert "slow: complete (0 downloaded, 1 skipped, 0 failed)" in second
    assert [r.method for r in server.requests_for("slow/big.bin")] == ["GET"]  # fetched once, by the first
    dest = tmp_path / "home" / "datasets" / "slow" / "big.bin"
    assert dest.read_bytes() == DATA
    with duckdb.connect(str(tmp_path / "home" / "warehouse.duckdb"), read_only=True) as conn:
        rows = conn.sql("SELECT status, sha256 FROM datasets.files WHERE dataset = 'slow'").fetchall()
    assert rows == [("skipped", hashlib.sha256(DATA).hexdigest())]


def test_an_archive_member_never_replaces_a_verified_file_of_the_dataset(tmp_path: Path) -> None:
    questions = b'{"questions": [1, 2, 3]}'
    shadow = io.BytesIO()
    with zipfile.ZipFile(shadow, "w") as archive:
        archive.writestr("questions.json", b"not the questions")
    with FileServer() as server:
        files = [
            {"url": server.add("q/questions.json", questions), "sha256": hashlib.sha256(questions).hexdigest()},
            {"url": server.add("q/extra.zip", shadow.getvalue()), "extract": True},
        ]
        raw = {"datasets": {"qa": {"description": "questions, and an archive", "access": "public", "files": files}}}
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
        dataset = load_catalog(tmp_path / "catalog.yaml")["qa"]
        run = download_dataset(dataset, tmp_path / "data", lambda: connect(tmp_path / "warehouse.duckdb"))
    assert [r.status for r in run.results] == ["downloaded", "failed"]
    assert "would overwrite 'questions.json', a file of the dataset's catalog" in (run.results[1].error or "")
    assert (tmp_path / "data" / "qa" / "questions.json").read_bytes() == questions
    assert run.summary.status == "partial"


# A URL-list dataset as the catalog gives it; nothing here is fetched, so its URL is never requested.
CC3M = Dataset(
    "cc3m",
    "image URLs and their captions",
    "public",
    files=(CatalogFile("http://127.0.0.1:9/list.tsv", "list.tsv"),),
    url_list=UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0),
)


def test_an_image_part_of_a_list_not_downloaded_yet_says_to_materialise_the_dataset_first(tmp_path: Path) -> None:
    missing = tmp_path / "data" / "cc3m" / "list.tsv"
    with pytest.raises(UrlListError, match=f"^{re.escape(str(missing))} is missing: materialise datasets/cc3m first$"):
        fetch_image_part(CC3M, tmp_path / "data", "list.tsv", "v", range(0, 1), ImageOptions())
    assert not (tmp_path / "data").exists()  # no shard folder made for a list that isn't there


def test_an_image_part_of_a_list_the_dataset_does_not_have_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "data" / "cc3m" / "other.tsv"  # on disk, but not a list of the catalog entry
    other.parent.mkdir(parents=True)
    other.write_text("a cat\thttp://127.0.0.1:9/a.jpg\n", encoding="utf-8")
    with pytest.raises(UrlListError, match=r"^cc3m has no URL list 'other\.tsv' \(its lists: list\.tsv\)$"):
        fetch_image_part(CC3M, tmp_path / "data", "other.tsv", "v", range(0, 1), ImageOptions())
    assert not (other.parent / "shards").exists()


def test_an_image_part_of_a_dataset_without_url_lists_is_refused(tmp_path: Path) -> None:
    coco = Dataset("coco", "images", "public", files=(CatalogFile("http://127.0.0.1:9/val.zip", "val.zip"),))
    with pytest.raises(UrlListError, match=r"^coco is not a URL-list dataset \(its catalog entry has no url_list\)$"):
        fetch_image_part(coco, tmp_path / "data", "val.zip", "v", range(0, 1), ImageOptions())


def test_a_url_list_whose_shard_another_process_writes_is_partial(tmp_path: Path) -> None:
    """A shard left to the process that holds its claim (a part, another download) is not counted as done."""
    png = image("PNG", 3)
    with FileServer() as server:
        rows = "".join(f"caption {i}\t{server.add(f'img/{i}.png', png)}\n" for i in range(4)).encode()
        listed = server.add("list.tsv", rows)
        spec = UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0, shard_size=2)
        dataset = Dataset("cc", "two shards of two images", "public", files=(CatalogFile(listed, "list.tsv"),),
                          url_list=spec)  # fmt: skip
        warehouse = lambda: connect(tmp_path / "w.duckdb")  # noqa: E731
        download_dataset(dataset, tmp_path / "data", warehouse, images_in_parts=True)  # planned for parts
        claims = tmp_path / "data" / "cc" / "shards" / "list" / CLAIMS
        claims.mkdir()
        with FileLock(claims / "00001.lock"):  # a part writes shard 1 while the whole list is downloaded
            run = download_dataset(dataset, tmp_path / "data", warehouse,
                                   images=ImageOptions(allowed_networks=("127.0.0.0/8",)))  # fmt: skip
    assert [s.index for s in run.lists[0].run.shards] == [0] and run.lists[0].run.busy == [1]
    # shard 0's two images, the list found in place; shard 1 left to its writer
    assert (run.summary.status, run.summary.downloaded, run.summary.skipped) == ("partial", 2, 1)

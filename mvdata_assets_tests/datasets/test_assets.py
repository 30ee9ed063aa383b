"""Dataset assets end to end: a catalog served from loopback, materialised with Dagster, checked in the warehouse."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import duckdb
import pytest
import yaml
from dagster import DagsterInstance, materialize
from PIL import Image

from mvdata_assets.cli import main, status
from mvdata_assets.datasets.metadata import MAX_TABLE_ROWS
from mvdata_assets.resources import DownloadTrackingResource, project_resources
from mvdata_assets.settings import load_settings
from mvdata_assets_tests import dagster_cli
from mvdata_assets_tests.datasets.downloading import catalog_assets
from mvdata_assets_tests.datasets.fileserver import FileServer


def untracked_resources() -> dict:
    settings = load_settings()
    return {**project_resources(settings), "tracking": DownloadTrackingResource(enabled=False, home=str(settings.home))}


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


IMAGES = {f"val/{i:04d}.jpg": bytes([i]) * (1000 + i) for i in range(12)}
GOOD_ZIP = _zip({**IMAGES, "annotations/captions.json": b'{"captions": []}'})
EVIL_ZIP = _zip({"../escaped.txt": b"should never be written"})
QUESTIONS = b'{"questions": [1, 2, 3]}'


def _entry(file_server: FileServer, name: str, data: bytes, **extra: object) -> dict:
    url = file_server.add(name, data)
    return {"url": url, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FileServer() as file_server:
        catalog = {
            "datasets": {
                "mini_coco": {
                    "description": "images and captions",
                    "access": "public",
                    "files": [_entry(file_server, "coco/val.zip", GOOD_ZIP, extract=True)],
                },
                "mini_vqa": {
                    "description": "questions, and a file that is gone from its host",
                    "access": "public",
                    "files": [
                        _entry(file_server, "vqa/questions.json", QUESTIONS),
                        {"url": f"{file_server.url}/vqa/moved.zip", "size": 10},
                    ],
                },
                "evil": {
                    "description": "an archive whose member escapes the dataset folder",
                    "access": "public",
                    "files": [_entry(file_server, "evil/evil.zip", EVIL_ZIP, extract=True)],
                },
                "flickr": {"description": "manual", "access": "manual", "instructions": "fill in the form"},
            }
        }
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(path))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        yield file_server, tmp_path / "home"


def _run(home: Path, instance: DagsterInstance, run_config: dict | None = None, selection: list[str] | None = None):
    result = materialize(
        catalog_assets(),
        selection=selection,
        resources=untracked_resources(),
        instance=instance,
        run_config=run_config,
    )
    assert result.success
    materializations = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    metadata = {m.asset_key.to_user_string(): m.metadata for m in materializations}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in result.get_asset_check_evaluations()}
    return metadata, checks


def test_catalog_datasets_materialise_with_true_counts(setup) -> None:
    file_server, home = setup
    metadata, checks = _run(home, DagsterInstance.ephemeral())
    data = home / "datasets"
    # downloaded, verified, extracted inside the dataset folder
    assert (data / "mini_coco" / "val.zip").read_bytes() == GOOD_ZIP
    for name, content in IMAGES.items():
        assert (data / "mini_coco" / name).read_bytes() == content
    assert metadata["datasets/mini_coco"]["status"].value == "complete"
    assert metadata["datasets/mini_coco"]["downloaded"].value == 1
    assert checks[("datasets/mini_coco", "no_failed_files")] is True
    assert checks[("datasets/mini_coco", "checksums_recorded")] is True
    # one file of two missing upstream: partial, the 404 named, the other file still there
    assert metadata["datasets/mini_vqa"]["status"].value == "partial"
    assert (metadata["datasets/mini_vqa"]["downloaded"].value, metadata["datasets/mini_vqa"]["failed"].value) == (1, 1)
    assert checks[("datasets/mini_vqa", "no_failed_files")] is False
    assert (data / "mini_vqa" / "questions.json").read_bytes() == QUESTIONS
    # the escaping archive: refused, nothing written outside, the file counted as failed with the reason
    assert not (data / "escaped.txt").exists() and not (home / "escaped.txt").exists()
    assert metadata["datasets/evil"]["status"].value == "failed"
    assert metadata["datasets/flickr"]["status"].value == "manual"
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        files = {
            (d, Path(p).name): (s, e, h)
            for d, p, s, e, h in conn.execute(
                "SELECT dataset, path, status, error, sha256 FROM datasets.files"
            ).fetchall()
        }
        summary = dict(conn.execute("SELECT dataset, status FROM datasets.download_summary").fetchall())
    assert files[("mini_coco", "val.zip")] == ("downloaded", None, hashlib.sha256(GOOD_ZIP).hexdigest())
    status_, error, digest = files[("mini_vqa", "moved.zip")]
    assert status_ == "failed" and "404" in error and digest is None
    assert files[("evil", "evil.zip")][0] == "failed" and "../escaped.txt" in files[("evil", "evil.zip")][1]
    assert summary == {"mini_coco": "complete", "mini_vqa": "partial", "evil": "failed", "flickr": "manual"}
    report = metadata["datasets/download_summary"]["report"].value
    assert "| Dataset | Status | Downloaded | Failed | Skipped | Total | Success Rate | Est. Size |" in report
    assert "| mini_coco | complete | 1 | 0 | 0 | 1 | 100.0% |" in report
    assert "| mini_vqa | partial | 1 | 1 | 0 | 2 | 50.0% |" in report
    chart = metadata["datasets/download_summary"]["status_chart"].value
    assert chart.startswith("![files per dataset](data:image/png;base64,")
    pixels = set(Image.open(io.BytesIO(base64.b64decode(chart.split(",", 1)[1].rstrip(")")))).convert("RGB").getdata())
    assert {(0x2E, 0x7D, 0x32), (0xC6, 0x28, 0x28)} <= pixels  # bars of downloaded and of failed files are drawn


def test_the_report_before_any_download_tells_manual_datasets_from_missing_ones(setup) -> None:
    file_server, home = setup
    metadata, _ = _run(home, DagsterInstance.ephemeral(), selection=["datasets/download_summary"])
    report = metadata["datasets/download_summary"]["report"].value
    assert "| mini_coco | missing |" in report and "| flickr | manual |" in report
    assert metadata["datasets/download_summary"]["missing"].value == 3  # mini_coco, mini_vqa, evil


def test_second_run_skips_verified_files_without_network(setup) -> None:
    file_server, home = setup
    instance = DagsterInstance.ephemeral()
    _run(home, instance)
    before = len(file_server.requests_for("coco/val.zip"))
    metadata, checks = _run(home, instance)
    assert len(file_server.requests_for("coco/val.zip")) == before  # not even a HEAD
    assert (metadata["datasets/mini_coco"]["skipped"].value, metadata["datasets/mini_coco"]["downloaded"].value) == (
        1,
        0,
    )
    assert metadata["datasets/mini_coco"]["status"].value == "complete"
    assert checks[("datasets/mini_coco", "no_failed_files")] is True
    # verify: re-hash what is on disk; a file damaged on disk is fetched again
    target = home / "datasets" / "mini_vqa" / "questions.json"
    target.write_bytes(b"X" * len(QUESTIONS))
    config = {"ops": {name: {"config": {"verify": True}} for name in ("datasets__mini_vqa",)}}
    _run(home, instance, config, selection=["datasets/mini_vqa"])
    assert target.read_bytes() == QUESTIONS


def test_a_selection_naming_no_asset_downloads_nothing(setup, tmp_path: Path) -> None:
    """`--select group:dataset` (the group is `datasets`) names nothing, and the dagster CLI then runs every asset:
    the datasets refuse that run, saying why, before any request; a selection naming them still downloads."""
    file_server, home = setup
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "MVDATA_WANDB_TRACKING": "off"}

    refused = dagster_cli.materialize("mvdata_assets.definitions", "group:dataset", env)

    assert refused.returncode != 0
    assert "this run names no asset, so it would download every dataset of the catalog" in refused.stderr
    assert file_server.requests == []
    assert not (home / "datasets").exists() or not any(p.is_file() for p in (home / "datasets").rglob("*"))

    named = dagster_cli.materialize("mvdata_assets.definitions", "group:datasets", env)
    assert named.returncode == 0, named.stderr[-3000:]
    assert (home / "datasets" / "mini_vqa" / "questions.json").read_bytes() == QUESTIONS


def test_status_is_true_to_the_disk(setup, capsys: pytest.CaptureFixture[str]) -> None:
    file_server, home = setup
    status()
    before = capsys.readouterr().out
    assert "mini_coco        missing" in before  # nothing downloaded yet
    _run(home, DagsterInstance.ephemeral())
    status()
    after = capsys.readouterr().out
    assert "mini_coco        complete        1/1" in after
    assert "mini_vqa         partial         1/2" in after
    assert "flickr           manual" in after and "fill in the form" in after
    # a file changed on disk after its verified download is no longer counted; a non-empty folder is not "present"
    (home / "datasets" / "mini_coco" / "val.zip").write_bytes(b"changed")
    status()
    assert "mini_coco        missing         0/1" in capsys.readouterr().out
    # a catalog that now asks for another file: the one on disk, as recorded, is not it
    catalog_path = Path(os.environ["MVDATA_CATALOG"])
    catalog = yaml.safe_load(catalog_path.read_text())
    catalog["datasets"]["mini_vqa"]["files"][0]["sha256"] = "0" * 64
    catalog_path.write_text(yaml.safe_dump(catalog))
    status()
    assert "mini_vqa         missing         0/2" in capsys.readouterr().out


def test_download_from_a_terminal(setup, capsys: pytest.CaptureFixture[str]) -> None:
    file_server, home = setup
    assert main(["download", "mini_coco"]) == 0
    assert (home / "datasets" / "mini_coco" / "val.zip").read_bytes() == GOOD_ZIP
    assert "mini_coco: complete (1 downloaded, 0 skipped, 0 failed)" in capsys.readouterr().out
    assert main(["download", "mini_vqa"]) == 1  # a file failed: the exit code says so
    out = capsys.readouterr().out
    assert "mini_vqa: partial (1 downloaded, 0 skipped, 1 failed)" in out and "404" in out
    assert main(["download", "no_such_dataset"]) == 2
    assert "not in the catalog: no_such_dataset" in capsys.readouterr().out
    assert main(["download", "mini_coco"]) == 0
    assert "mini_coco: complete (0 downloaded, 1 skipped, 0 failed)" in capsys.readouterr().out
    assert main(["download", "flickr"]) == 0  # nothing to fetch: it says what to do instead
    assert "flickr: manual (0 downloaded, 0 skipped, 0 failed)\n  a manual download: fill in the form" in (
        capsys.readouterr().out
    )


def test_a_terminal_download_trusts_its_records_until_asked_to_verify(
    setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file damaged on disk with its size and mtime kept looks as recorded: `--verify` re-hashes and fetches it."""
    file_server, home = setup
    assert main(["download", "mini_coco"]) == 0
    target = home / "datasets" / "mini_coco" / "val.zip"
    recorded = target.stat()
    target.write_bytes(b"X" * recorded.st_size)
    os.utime(target, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    fetched = len(file_server.requests_for("coco/val.zip"))
    capsys.readouterr()

    assert main(["download", "mini_coco"]) == 0
    assert "mini_coco: complete (0 downloaded, 1 skipped, 0 failed)" in capsys.readouterr().out
    assert main(["download", "flickr"]) == 0  # nothing to fetch: it says what to do instead
    assert "flickr: manual (0 downloaded, 0 skipped, 0 failed)\n  a manual download: fill in the form" in (
        capsys.readouterr().out
    )
    assert len(file_server.requests_for("coco/val.zip")) == fetched and target.read_bytes() != GOOD_ZIP

    assert main(["download", "mini_coco", "--verify"]) == 0
    assert "mini_coco: complete (1 downloaded, 0 skipped, 0 failed)" in capsys.readouterr().out
    assert target.read_bytes() == GOOD_ZIP


def test_the_terminal_says_what_failed_in_one_line_and_goes_on(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, home = setup
    catalog_path = Path(os.environ["MVDATA_CATALOG"])
    catalog = yaml.safe_load(catalog_path.read_text())
    catalog["datasets"]["huge"] = {"description": "more than any disk", "access": "public",
                                   "files": [{"url": "http://127.0.0.1:9/huge.bin", "size": 10**18}]}  # fmt: skip
    catalog_path.write_text(yaml.safe_dump(catalog))
    assert main(["download", "huge", "mini_coco"]) == 1
    out, err = capsys.readouterr()
    [refused] = [line for line in out.splitlines() if line.startswith("huge:")]
    assert "failed: InsufficientSpace" in refused and "GiB missing" in refused
    assert "mini_coco: complete (1 downloaded" in out and "Traceback" not in out + err

    holder = subprocess.Popen(  # another writer holds the warehouse
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; held = FileLock(sys.argv[1]); "
         "held.acquire(); print('held', flush=True); time.sleep(60)", f"{home / 'warehouse.duckdb'}.lock"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MVDATA_WAREHOUSE_LOCK_TIMEOUT_S", "1")
        assert main(["download", "mini_coco", "flickr"]) == 1
        out, err = capsys.readouterr()
    finally:
        holder.kill()
        holder.wait()
    assert "waiting up to 1 s for another writer of" in out  # said before the wait, not after
    busy = [line for line in out.splitlines() if ": failed: WarehouseBusy:" in line]
    assert [line.split(":")[0] for line in busy] == ["mini_coco", "flickr"] and "Traceback" not in out + err

    monkeypatch.setenv("MVDATA_DOWNLOAD_CONCURRENCY", "99999999999")
    assert main(["download", "mini_coco"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "mvdata download: ValueError: MVDATA_DOWNLOAD_CONCURRENCY must be a whole number from 1 to 4096, "
        "got '99999999999'"
    ]
    assert main(["download", "mini_coco"]) == 2  # and what was stored is still there once the setting is right
    monkeypatch.delenv("MVDATA_DOWNLOAD_CONCURRENCY")
    assert main(["download", "mini_coco"]) == 0
    assert "mini_coco: complete (0 downloaded, 1 skipped, 0 failed)" in capsys.readouterr().out
    assert main(["download", "flickr"]) == 0  # nothing to fetch: it says what to do instead
    assert "flickr: manual (0 downloaded, 0 skipped, 0 failed)\n  a manual download: fill in the form" in (
        capsys.readouterr().out
    )


def _jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 40, 90)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture
def url_list_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """7 images of which 2 are gone (404) and 1 is an HTML page, in shards of 4, from a caption<TAB>url list."""
    with FileServer() as file_server:
        images = {f"img{i}": _jpeg(i * 20) for i in range(7)}
        urls = {
            name: file_server.add(f"img/{name}.jpg", data, content_type="image/jpeg") for name, data in images.items()
        }
        urls["gone0"], urls["gone1"] = file_server.url_for("img/gone0.jpg"), file_server.url_for("img/gone1.jpg")
        urls["page"] = file_server.add("img/page.jpg", b"<html>removed</html>", content_type="text/html")
        tsv = "".join(f"caption of {name}\t{url}\n" for name, url in urls.items()).encode()
        entry = _entry(file_server, "cc/GCC-mini.tsv", tsv)
        url_list = {"format": "tsv", "url_column": 1, "caption_column": 0, "shard_size": 4}
        catalog = {"datasets": {"mini_cc": {"description": "d", "access": "public", "files": [entry],
                                            "url_list": url_list}}}  # fmt: skip
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(path))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        yield file_server, tmp_path / "home", images, path


def _image_requests(file_server: FileServer) -> list[str]:
    return sorted(r.name for r in file_server.requests if r.name.startswith("img/"))


def test_url_list_dataset_materialises_shards_with_true_counts(url_list_setup) -> None:
    file_server, home, images, _ = url_list_setup
    instance = DagsterInstance.ephemeral()
    metadata, checks = _run(home, instance)
    meta = metadata["datasets/mini_cc"]
    shards_dir = home / "datasets" / "mini_cc" / "shards" / "GCC-mini"
    # the list file and 7 of 10 images; the 3 failures are link rot, reported per kind
    assert (meta["downloaded"].value, meta["failed"].value, meta["skipped"].value, meta["total"].value) == (8, 3, 0, 11)
    assert meta["status"].value == "partial"
    assert (meta["images_downloaded"].value, meta["images_failed"].value, meta["images_total"].value) == (7, 3, 10)
    assert meta["images_per_second"].value > 0 and meta["shards_written"].value == 3
    assert meta["image_bytes_fetched"].value == sum(len(d) for d in images.values())
    errors = meta["image_errors"].value
    assert "| http_404 | 2 | 20.0% | link rot: the image is gone |" in errors
    assert "| not_an_image | 1 | 10.0% |" in errors
    assert checks[("datasets/mini_cc", "images_fetched")] is False  # a warning: link rot, not a broken download
    assert checks[("datasets/mini_cc", "no_failed_files")] is True
    assert checks[("datasets/mini_cc", "checksums_recorded")] is True
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        files = conn.execute(
            "SELECT path, status, sha256, bytes FROM datasets.files WHERE path LIKE '%.tar' ORDER BY path"
        ).fetchall()
        shards = conn.execute(
            "SELECT shard, images, in_place, failed, error_kinds FROM datasets.shards ORDER BY shard"
        ).fetchall()
        summary = conn.execute("SELECT status, downloaded, failed, total FROM datasets.download_summary").fetchone()
    assert [(Path(p).name, s) for p, s, _, _ in files] == [(f"0000{i}.tar", "downloaded") for i in range(3)]
    for path, _, sha256, size in files:  # each shard's checksum is the tar's own, computed as it was written
        assert (hashlib.sha256(Path(path).read_bytes()).hexdigest(), Path(path).stat().st_size) == (sha256, size)
    assert shards == [(0, 4, 4, 0, "{}"), (1, 4, 3, 1, '{"http_404": 1}'),
                      (2, 2, 0, 2, '{"http_404": 1, "not_an_image": 1}')]  # fmt: skip
    assert summary == ("partial", 8, 3, 11)
    with tarfile.open(shards_dir / "00000.tar") as tar:
        assert tar.extractfile("000000.jpg").read() == images["img0"]
        assert tar.extractfile("000000.txt").read() == b"caption of img0"

    # again: nothing is fetched, the shards are skipped and their images still count
    file_server.clear_requests()
    metadata, _ = _run(home, instance)
    assert _image_requests(file_server) == [] and not any(r.name == "cc/GCC-mini.tsv" for r in file_server.requests)
    meta = metadata["datasets/mini_cc"]
    assert (meta["images_skipped"].value, meta["images_failed"].value, meta["shards_skipped"].value) == (7, 3, 3)

    # retry_failed: the images came back upstream; only the failed URLs are requested again
    file_server.add("img/gone0.jpg", _jpeg(250), content_type="image/jpeg")
    file_server.clear_requests()
    config = {"ops": {"datasets__mini_cc": {"config": {"retry_failed": True}}}}
    metadata, _ = _run(home, instance, config)
    assert _image_requests(file_server) == ["img/gone0.jpg", "img/gone1.jpg", "img/page.jpg"]
    meta = metadata["datasets/mini_cc"]
    assert (meta["images_downloaded"].value, meta["images_skipped"].value, meta["images_failed"].value) == (1, 7, 2)
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        tar1 = conn.execute("SELECT sha256 FROM datasets.files WHERE path LIKE '%00001.tar'").fetchone()[0]
    assert tar1 == hashlib.sha256((shards_dir / "00001.tar").read_bytes()).hexdigest()  # the rewritten tar's


def test_url_list_verify_refetches_a_damaged_shard_only(url_list_setup) -> None:
    file_server, home, images, _ = url_list_setup
    instance = DagsterInstance.ephemeral()
    _run(home, instance)
    tar0 = home / "datasets" / "mini_cc" / "shards" / "GCC-mini" / "00000.tar"
    stat = tar0.stat()
    damaged = bytearray(tar0.read_bytes())
    damaged[600] ^= 0xFF  # inside the first image; size and mtime kept, so only a re-hash can tell
    tar0.write_bytes(bytes(damaged))
    os.utime(tar0, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    file_server.clear_requests()
    _run(home, instance)  # trusted by size and mtime, as any verified file
    assert _image_requests(file_server) == []
    metadata, _ = _run(home, instance, {"ops": {"datasets__mini_cc": {"config": {"verify": True}}}})
    assert _image_requests(file_server) == [f"img/img{i}.jpg" for i in range(4)]  # shard 0's images, nothing else
    assert metadata["datasets/mini_cc"]["shards_refetched_after_check"].value == [str(tar0)]
    with tarfile.open(tar0) as tar:
        assert tar.extractfile("000000.jpg").read() == images["img0"]


def test_url_list_status_and_terminal_download(url_list_setup, capsys: pytest.CaptureFixture[str]) -> None:
    file_server, home, _, _ = url_list_setup
    assert main(["download", "mini_cc"]) == 0  # link rot is reported, not an error of the download
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal's width
    assert "mini_cc: partial (8 downloaded, 0 skipped, 3 failed)" in out
    assert "images: 7 downloaded, 0 already in shards, 3 failed (by kind: http_404 2, not_an_image 1)" in out
    status()
    assert "mini_cc          partial         4/4" in capsys.readouterr().out  # the list + 3 shards; 7/10 images
    (home / "datasets" / "mini_cc" / "shards" / "GCC-mini" / "00002.tar").write_bytes(b"changed")
    status()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mini_cc"))
    assert "partial         3/4" in line and "7/10" in line


def test_a_terminal_download_of_a_list_whose_images_all_failed_fails(
    url_list_setup, capsys: pytest.CaptureFixture[str]
) -> None:
    file_server, home, _, _ = url_list_setup
    for name in ("img0", "img1", "img2", "img3", "img4", "img5", "img6", "page"):
        file_server.fault(f"img/{name}.jpg", "status", status=404, times=5)
    assert main(["download", "mini_cc"]) == 1  # the list arrived, but the dataset holds no image
    out = " ".join(capsys.readouterr().out.split())
    assert "mini_cc: failed (1 downloaded, 0 skipped, 10 failed)" in out
    status()
    assert "mini_cc          failed" in capsys.readouterr().out


def test_a_terminal_download_fetches_failed_images_again_when_asked(
    url_list_setup, capsys: pytest.CaptureFixture[str]
) -> None:
    file_server, home, _, _ = url_list_setup
    assert main(["download", "mini_cc"]) == 0
    back = _jpeg(250)
    file_server.add("img/gone0.jpg", back, content_type="image/jpeg")  # a lost image is back at its address (row 7)
    capsys.readouterr()

    assert main(["download", "mini_cc"]) == 0  # finished shards keep their failures
    assert "mini_cc: partial (0 downloaded, 8 skipped, 3 failed)" in " ".join(capsys.readouterr().out.split())
    assert main(["download", "mini_cc", "--retry-failed"]) == 0
    assert "mini_cc: partial (1 downloaded, 8 skipped, 2 failed)" in " ".join(capsys.readouterr().out.split())
    with tarfile.open(home / "datasets" / "mini_cc" / "shards" / "GCC-mini" / "00001.tar") as tar:  # rows 4 to 7
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(jpegs) == 4 and back in jpegs


def test_url_list_with_swapped_columns_fails_the_step_and_keeps_the_list(url_list_setup) -> None:
    file_server, home, _, catalog_path = url_list_setup
    catalog = yaml.safe_load(catalog_path.read_text())
    catalog["datasets"]["mini_cc"]["url_list"] |= {
        "url_column": 0,
        "caption_column": 1,
    }  # swapped: the mistake CC3M vs CC12M invites
    catalog_path.write_text(yaml.safe_dump(catalog))
    result = materialize(
        catalog_assets(),
        resources=untracked_resources(),
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.cause.message
    assert "url_column (column 0) does not hold http(s) URLs" in message and "are the two swapped?" in message
    assert _image_requests(file_server) == []  # nothing fetched on a misread list
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT status FROM datasets.files").fetchall() == [("downloaded",)]
        assert conn.execute("SELECT status FROM datasets.download_summary").fetchall() == [("failed",)]


def test_sbu_json_list_inside_an_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SBU as the bundled catalog has it: sbu-captions-all.json (parallel arrays) inside a tar.gz."""
    with FileServer() as file_server:
        photos = [_jpeg(i * 30) for i in range(5)]
        urls = [file_server.add(f"photo/{i}.jpg", photo, content_type="image/jpeg") for i, photo in enumerate(photos)]
        archive = io.BytesIO()
        doc = json.dumps({"image_urls": urls, "captions": [f"photo {i}" for i in range(5)], "user_ids": ["u"] * 5})
        with tarfile.open(fileobj=archive, mode="w:gz") as tar:
            info = tarfile.TarInfo("sbu-captions-all.json")
            info.size = len(doc.encode())
            tar.addfile(info, io.BytesIO(doc.encode()))
        url_list = {"format": "json", "lists": ["sbu-captions-all.json"], "url_column": "image_urls",
                    "caption_column": "captions", "shard_size": 2}  # fmt: skip
        entry = _entry(file_server, "sbu/sbu-captions-all.tar.gz", archive.getvalue(), extract=True)
        catalog = {"datasets": {"mini_sbu": {"description": "d", "access": "public", "files": [entry],
                                             "url_list": url_list}}}  # fmt: skip
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(path))
        home = tmp_path / "home"
        monkeypatch.setenv("MVDATA_HOME", str(home))
        metadata, checks = _run(home, DagsterInstance.ephemeral())
        meta = metadata["datasets/mini_sbu"]
        assert (meta["status"].value, meta["images_downloaded"].value, meta["shards_written"].value) == (
            "complete",
            5,
            3,
        )
        assert checks[("datasets/mini_sbu", "images_fetched")] is True
        shards = home / "datasets" / "mini_sbu" / "shards" / "sbu-captions-all"
        with tarfile.open(shards / "00002.tar") as tar:
            assert tar.extractfile("000020.txt").read() == b"photo 4"
            assert tar.extractfile("000020.jpg").read() == photos[4]

        url_list["lists"] = ["dataset/elsewhere.json"]  # inside the archive, so only known after extraction
        path.write_text(yaml.safe_dump(catalog))
        result = materialize(
            catalog_assets(),
            resources=untracked_resources(),
            instance=DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert "url_list.lists[0] 'dataset/elsewhere.json' is not in" in failure.step_failure_data.error.cause.message


def test_many_files_make_few_log_lines_and_a_capped_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each log line or metadata entry is an event-log write: a dataset's progress is at most one line every few
    seconds, and its files table shows the failed files first and at most MAX_TABLE_ROWS rows."""
    with FileServer() as file_server:
        datas = {f"parts/{i:03d}.bin": bytes([i % 256]) * (100 + i) for i in range(MAX_TABLE_ROWS + 40)}
        files = [{**_entry(file_server, name, data), "size": None} for name, data in datas.items()]
        files[-1]["url"] += ".gone"  # the last file listed fails (404)
        catalog = {"datasets": {"parts": {"description": "many small files", "access": "public", "files": files}}}
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(tmp_path / "catalog.yaml"))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        instance = DagsterInstance.ephemeral()
        started = time.monotonic()
        result = materialize(catalog_assets(), selection=["datasets/parts"],
                             resources=untracked_resources(), instance=instance)  # fmt: skip
        seconds = time.monotonic() - started
    assert result.success
    lines = [e.user_message for e in instance.all_logs(result.run_id) if "MiB" in (e.user_message or "")]
    assert len(lines) <= 1 + seconds / 5, lines
    assert len(instance.all_logs(result.run_id)) < len(datas)  # the whole run logs fewer events than it has files
    (event,) = result.get_asset_materialization_events()
    table = event.event_specific_data.materialization.metadata["files"].value
    rows = [line for line in table.splitlines() if ".bin" in line]
    assert len(rows) == MAX_TABLE_ROWS and "| failed |" in rows[0] and "404" in rows[0], rows[:2]
    assert table.endswith("... and 40 more (datasets.files)")

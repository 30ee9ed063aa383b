"""Dataset assets end to end: a catalog served from loopback, materialised with Dagster, checked in the warehouse."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

import duckdb
import pytest
import yaml
from dagster import DagsterInstance, materialize
from PIL import Image

from mvdata_assets.cli import main, status
from mvdata_assets.datasets.assets import DownloadTrackingResource, dataset_assets
from mvdata_assets.warehouse import WarehouseResource
from mvdata_assets_tests.datasets.fileserver import FileServer


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


def _entry(server: FileServer, name: str, data: bytes, **extra: object) -> dict:
    url = server.add(name, data)
    return {"url": url, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FileServer() as server:
        catalog = {
            "datasets": {
                "mini_coco": {
                    "description": "images and captions",
                    "access": "public",
                    "files": [_entry(server, "coco/val.zip", GOOD_ZIP, extract=True)],
                },
                "mini_vqa": {
                    "description": "questions, and a file that is gone from its host",
                    "access": "public",
                    "files": [
                        _entry(server, "vqa/questions.json", QUESTIONS),
                        {"url": f"{server.url}/vqa/moved.zip", "size": 10},
                    ],
                },
                "evil": {
                    "description": "an archive whose member escapes the dataset folder",
                    "access": "public",
                    "files": [_entry(server, "evil/evil.zip", EVIL_ZIP, extract=True)],
                },
                "flickr": {"description": "manual", "access": "manual", "instructions": "fill in the form"},
            }
        }
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(catalog))
        monkeypatch.setenv("MVDATA_CATALOG", str(path))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        yield server, tmp_path / "home"


def _run(home: Path, instance: DagsterInstance, run_config: dict | None = None, selection: list[str] | None = None):
    result = materialize(
        dataset_assets(),
        selection=selection,
        resources={
            "warehouse": WarehouseResource(database=str(home / "warehouse.duckdb")),
            "tracking": DownloadTrackingResource(enabled=False),
        },
        instance=instance,
        run_config=run_config,
    )
    assert result.success
    materializations = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
    metadata = {m.asset_key.to_user_string(): m.metadata for m in materializations}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in result.get_asset_check_evaluations()}
    return metadata, checks


def test_catalog_datasets_materialise_with_true_counts(setup) -> None:
    server, home = setup
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


def test_second_run_skips_verified_files_without_network(setup) -> None:
    server, home = setup
    instance = DagsterInstance.ephemeral()
    _run(home, instance)
    before = len(server.requests_for("coco/val.zip"))
    metadata, checks = _run(home, instance)
    assert len(server.requests_for("coco/val.zip")) == before  # not even a HEAD
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


def test_status_is_true_to_the_disk(setup, capsys: pytest.CaptureFixture[str]) -> None:
    server, home = setup
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


def test_download_from_a_terminal(setup, capsys: pytest.CaptureFixture[str]) -> None:
    server, home = setup
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

"""URL-list images in parts (MVDATA_IMAGE_PART_SHARDS): the plan adds partitions, partitions write shards only, one
writer records them; materialised with Dagster in this process against a loopback image server."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import duckdb
import pytest
import yaml
from dagster import DagsterInstance, materialize
from filelock import FileLock
from PIL import Image

from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets.datasets.download import ImageOptions, fetch_image_part
from mvdata_assets.datasets.parts import part_keys, shards_of
from mvdata_assets.datasets.url_lists import CLAIMS, ListPlan, UrlListError
from mvdata_assets.resources import DownloadTrackingResource, project_resources
from mvdata_assets.settings import load_settings
from mvdata_assets_tests.datasets.downloading import catalog_assets
from mvdata_assets_tests.datasets.fileserver import FileServer

IMAGES = 20  # in shards of 2: 10 shards, in parts of 3 shards: 4 partitions


def _jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 10, 10)).save(out, "JPEG")
    return out.getvalue()


def _resources() -> dict:
    settings = load_settings()
    return {**project_resources(settings), "tracking": DownloadTrackingResource(enabled=False, home=str(settings.home))}


def _write_list(file_server: FileServer, catalog: Path, names: list[str]) -> None:
    rows = "".join(f"caption {name}\t{file_server.url_for(f'img/{name}.jpg')}\n" for name in names).encode()
    url = file_server.add("lists/big.tsv", rows)  # a changed list comes with its new sha256 in the catalog
    url_list = {"format": "tsv", "url_column": 1, "caption_column": 0, "shard_size": 2}
    entry = {"url": url, "sha256": hashlib.sha256(rows).hexdigest()}
    dataset = {"description": "a list fetched in parts", "access": "public", "files": [entry], "url_list": url_list}
    catalog.write_text(yaml.safe_dump({"datasets": {"big_cc": dataset}}))


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FileServer() as file_server:
        for i in range(IMAGES - 1):  # the last one is gone (404)
            file_server.add(f"img/i{i:02d}.jpg", _jpeg(i * 10), content_type="image/jpeg")
        catalog = tmp_path / "catalog.yaml"
        _write_list(file_server, catalog, [f"i{i:02d}" for i in range(IMAGES)])
        monkeypatch.setenv("MVDATA_CATALOG", str(catalog))
        monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("MVDATA_IMAGE_PART_SHARDS", "3")
        yield file_server, catalog, tmp_path / "home"


def _run(instance: DagsterInstance, selection: list[str], partition: str | None = None) -> None:
    result = materialize(catalog_assets(), selection=selection, partition_key=partition,
                         resources=_resources(), instance=instance)  # fmt: skip
    assert result.success


def test_partition_keys_cover_every_shard_once() -> None:
    plans = {
        "a/list.tsv": ListPlan(rows=21, shards=11, stale_removed=0, version="1a2b3c4d"),
        "b.tsv": ListPlan(2, 1, 0, "9f"),
    }
    keys = part_keys(plans, 4)
    assert keys == ["a/list.tsv@1a2b3c4d@00000-00003", "a/list.tsv@1a2b3c4d@00004-00007",
                    "a/list.tsv@1a2b3c4d@00008-00010", "b.tsv@9f@00000-00000"]  # fmt: skip
    covered = [(listed, version, i) for key in keys for listed, version, shards in [shards_of(key)] for i in shards]
    assert covered == [("a/list.tsv", "1a2b3c4d", i) for i in range(11)] + [("b.tsv", "9f", 0)]


def _summary(home: Path) -> tuple:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        return conn.execute(
            "SELECT status, downloaded, failed, skipped, total FROM datasets.download_summary"
        ).fetchone()


def test_parts_fetch_shards_and_one_writer_records_them(parts) -> None:
    file_server, catalog, home = parts
    instance = DagsterInstance.ephemeral()
    _run(instance, ["datasets/big_cc"])
    keys = instance.get_dynamic_partitions("big_cc_images")
    version = shards_of(keys[0])[1]
    assert re.fullmatch("[0-9a-f]{8}", version)
    assert keys == [
        f"big.tsv@{version}@{span}" for span in ("00000-00002", "00003-00005", "00006-00008", "00009-00009")
    ]
    assert not [r for r in file_server.requests if r.name.startswith("img/")]  # the plan fetches no image
    assert _summary(home) == ("partial", 1, 0, 0, 1)  # the list is in place, its images are not yet

    warehouse = home / "warehouse.duckdb"
    early = materialize(catalog_assets(), selection=["datasets/big_cc_shards"],
                        resources=_resources(), instance=instance)  # fmt: skip
    assert {c.check_name: c.passed for c in early.get_asset_check_evaluations()}["all_parts_finished"] is False
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        assert conn.execute("SELECT status FROM datasets.download_summary").fetchone() == ("partial",)
    for key in keys:
        _run(instance, ["datasets/big_cc_images"], key)
        with duckdb.connect(str(warehouse), read_only=True) as conn:  # parts never write the warehouse
            assert conn.execute("SELECT count(*) FROM datasets.shards").fetchone() == (0,)
    shards = home / "datasets" / "big_cc" / "shards" / "big"
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"{i:05d}.tar" for i in range(10)]
    fetched = sorted(r.name for r in file_server.requests if r.name.startswith("img/"))
    assert fetched == sorted(f"img/i{i:02d}.jpg" for i in range(IMAGES))  # each image once

    result = materialize(catalog_assets(), selection=["datasets/big_cc_shards"],
                         resources=_resources(), instance=instance)  # fmt: skip
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"all_parts_finished": True, "images_fetched": False}  # one image is gone
    with duckdb.connect(str(warehouse), read_only=True) as conn:
        shard_rows = conn.execute("SELECT count(*), count(DISTINCT shard), sum(images), sum(failed) "
                                  "FROM datasets.shards WHERE dataset = 'big_cc'").fetchone()  # fmt: skip
        assert shard_rows == (10, 10, IMAGES, 1)
        summary = conn.execute("SELECT downloaded + skipped, failed, total FROM datasets.download_summary").fetchone()
        assert summary == (1 + IMAGES - 1, 1, 1 + IMAGES)  # the list file and the images
        tars = conn.execute("SELECT count(*), count(sha256) FROM datasets.files WHERE path LIKE '%.tar'").fetchone()
        assert tars == (10, 10)
    recorded = _summary(home)
    assert recorded[0] == "partial"  # one image is gone
    _run(instance, ["datasets/big_cc"])  # planned again, the list unchanged: the finished shards still count
    assert _summary(home) == recorded
    assert instance.get_dynamic_partitions("big_cc_images") == keys

    # the lost image is back: a part fetches its shard's failed images again when asked, and the dataset is complete
    file_server.add(f"img/i{IMAGES - 1:02d}.jpg", _jpeg(250), content_type="image/jpeg")
    retry = {"ops": {"datasets__big_cc_images": {"config": {"retry_failed": True}}}}
    again = materialize(catalog_assets(), selection=["datasets/big_cc_images"], partition_key=keys[-1],
                        resources=_resources(), instance=instance, run_config=retry)  # fmt: skip
    assert again.success
    _run(instance, ["datasets/big_cc_shards"])
    assert _summary(home) == ("complete", 0, 0, 1 + IMAGES, 1 + IMAGES)


def test_a_changed_list_replans_its_partitions(parts) -> None:
    file_server, catalog, home = parts
    instance = DagsterInstance.ephemeral()
    _run(instance, ["datasets/big_cc"])
    first = instance.get_dynamic_partitions("big_cc_images")[0]
    _run(instance, ["datasets/big_cc_images"], first)
    # the same number of shards from other rows: new keys, so no partition shows as materialised from the old list
    _write_list(file_server, catalog, [f"i{i:02d}" for i in range(IMAGES - 1, -1, -1)])
    _run(instance, ["datasets/big_cc"])
    keys = instance.get_dynamic_partitions("big_cc_images")
    assert [shards_of(key)[2] for key in keys] == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert first not in keys and {shards_of(key)[1] for key in keys} != {shards_of(first)[1]}
    shards = home / "datasets" / "big_cc" / "shards" / "big"
    assert not list(shards.glob("*.tar"))  # the plan removed the shards of the earlier list
    # a run of a part of the earlier plan, launched before it, refuses to fetch into the new plan's folder
    listed, version, span = shards_of(first)
    big_cc = load_catalog(catalog)["big_cc"]
    with pytest.raises(UrlListError, match=f"is planned as another version than this part's \\({version}\\)"):
        fetch_image_part(big_cc, home / "datasets", listed, version, span, ImageOptions())
    assert not list(shards.glob("*.tar"))


def test_a_list_is_not_planned_again_while_a_part_writes_one_of_its_shards(parts) -> None:
    file_server, catalog, home = parts
    instance = DagsterInstance.ephemeral()
    _run(instance, ["datasets/big_cc"])
    _run(instance, ["datasets/big_cc_images"], instance.get_dynamic_partitions("big_cc_images")[0])
    shards = home / "datasets" / "big_cc" / "shards" / "big"
    _write_list(file_server, catalog, [f"i{i:02d}" for i in range(8)])
    with FileLock(shards / CLAIMS / "00004.lock"):  # a part of the earlier plan is writing shard 4
        before = sorted(p.name for p in shards.iterdir())
        refused = materialize(catalog_assets(), selection=["datasets/big_cc"], resources=_resources(),
                              instance=instance, raise_on_error=False)  # fmt: skip
    assert not refused.success
    assert "shard 00004 of an earlier version of the list is being written" in str(
        refused.get_step_failure_events()[0].step_failure_data.error
    )
    assert sorted(p.name for p in shards.iterdir()) == before  # nothing removed under the part
    _run(instance, ["datasets/big_cc"])  # once the part is done, the list is planned again
    assert not list(shards.glob("*.tar"))

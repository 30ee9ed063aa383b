"""URL lists into WebDataset shards, against the loopback file server: list layouts, skipping, resume, parts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvdata_assets.datasets import url_lists
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.list_files import read_list
from mvdata_assets.datasets.url_lists import UrlListError
from mvdata_assets_tests.datasets.fileserver import FileServer
from mvdata_assets_tests.datasets.lists import CC3M, fetch_url_list, image, members, outcomes, write_tsv


def test_cc3m_layout_reads_caption_and_url(tmp_path: Path) -> None:
    sample = write_tsv(
        tmp_path / "GCC-training.tsv",
        [
            ("a very typical bus station", "http://lh6.ggpht.com/-IvRtNLNcG8o/TpFyrudaT6I/AAAAAAAAM6o/_11MuAAKalQ/IMG_3422.JPG"),
            ("sierra looked stunning in this top", "http://78.media.tumblr.com/3b133294bdc7c7784b7e55f0a4c0d3c0/tumblr.jpg"),
        ],
    )  # fmt: skip
    rows = list(read_list(sample, CC3M))
    assert rows[0] == ("http://lh6.ggpht.com/-IvRtNLNcG8o/TpFyrudaT6I/AAAAAAAAM6o/_11MuAAKalQ/IMG_3422.JPG",
                       "a very typical bus station")  # fmt: skip
    assert all(url.startswith("http") and not caption.startswith("http") for url, caption in rows)

    swapped = UrlList(("list.tsv",), "tsv", url_column=0, caption_column=1)
    with pytest.raises(UrlListError, match=r"url_column \(column 0\) does not hold http\(s\) URLs.*swapped"):
        list(read_list(sample, swapped))


def test_parquet_list_by_column_name(tmp_path: Path) -> None:
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["https://x.org/a.jpg", None], "TEXT": ["a cat", "a dog"]}), path)
    spec = UrlList(("laion.parquet",), "parquet", url_column="URL", caption_column="TEXT")
    assert list(read_list(path, spec)) == [("https://x.org/a.jpg", "a cat"), ("", "a dog")]
    with pytest.raises(UrlListError, match="no column 'url'"):
        list(read_list(path, UrlList(("laion.parquet",), "parquet", url_column="url")))


def test_finished_shards_are_skipped_and_retry_fetches_only_failures(tmp_path: Path, file_server: FileServer) -> None:
    png = image("PNG", 1)
    rows = [(f"img{i}", file_server.add(f"img{i}.png", png, content_type="image/png")) for i in range(6)]
    rows.append(("gone", file_server.url_for("gone.png")))
    list_path = write_tsv(tmp_path / "list.tsv", rows)
    out = tmp_path / "shards"
    file_server.fault("img5.png", "status", status=503, times=3)  # the first attempt and both retries
    first = fetch_url_list(list_path, out, CC3M, retry_backoff_s=0.01)
    assert (first.downloaded, first.failed) == (5, 2)
    assert (outcomes(out)["img5"]["attempts"], outcomes(out)["gone"]["attempts"]) == (3, 1)  # a 404 is not retried

    file_server.clear_requests()
    again = fetch_url_list(list_path, out, CC3M)
    assert file_server.requests == []
    assert [s.state for s in again.shards] == ["skipped", "skipped"]
    assert (again.downloaded, again.skipped, again.failed) == (0, 5, 2)

    retried = fetch_url_list(list_path, out, CC3M, retry_failed=True)
    assert sorted(r.name for r in file_server.requests) == ["gone.png", "img5.png"]
    assert [s.state for s in retried.shards] == ["skipped", "retried"]
    assert (retried.downloaded, retried.skipped, retried.failed) == (1, 5, 1)
    assert retried.error_kinds == {"http_404": 1}
    assert sorted(members(out / "00001.tar")) == [f"00001{k}.{e}" for k in (0, 1) for e in ("json", "png", "txt")]
    assert outcomes(out)["img5"]["status"] == "downloaded"


KILLED_RUN = """
import sys
from pathlib import Path
from mvdata_assets.datasets import durable
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.url_lists import fetch_url_list
fetch_url_list(Path(sys.argv[1]), Path(sys.argv[2]), UrlList(("l",), "tsv", 1, 0, shard_size=4), timeout_s=60,
               allowed_networks=["127.0.0.0/8"])
"""


def test_a_killed_run_resumes_at_the_shard_it_was_writing(tmp_path: Path, file_server: FileServer) -> None:
    png = image("PNG", 2)
    rows = [(f"img{i}", file_server.add(f"img{i}.png", png, content_type="image/png")) for i in range(8)]
    list_path = write_tsv(tmp_path / "list.tsv", rows)
    out = tmp_path / "shards"
    file_server.fault("img7.png", "delay", seconds=60)  # the second shard never finishes before the kill
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(list_path), str(out)])
    try:
        deadline = time.monotonic() + 30
        # killed once the first shard is finished and the second is being written
        while not (file_server.requests_for("img7.png", wait=0) and (out / "00000.parquet").exists()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "00001.parquet").exists()
    file_server.clear_faults()
    file_server.clear_requests()

    run = fetch_url_list(list_path, out, CC3M)
    assert sorted(r.name for r in file_server.requests) == [f"img{i}.png" for i in range(4, 8)]
    assert [s.state for s in run.shards] == ["skipped", "fetched"] and (run.skipped, run.downloaded) == (4, 4)
    assert len(members(out / "00001.tar")) == 12 and not list(out.glob("*.part"))
    assert os.path.getsize(out / "00000.parquet") > 0


def test_sbu_layout_pairs_url_and_caption_lines(tmp_path: Path, file_server: FileServer) -> None:
    png = image("PNG", 4)
    urls = [file_server.add(f"sbu{i}.png", png, content_type="image/png") for i in range(5)]
    url_file, caption_file = tmp_path / "SBU_urls.txt", tmp_path / "SBU_captions.txt"
    url_file.write_text("".join(f"{u}\n" for u in urls), encoding="utf-8")
    caption_file.write_text("".join(f"caption {i} \u00e9\n" for i in range(5)), encoding="utf-8")
    spec = UrlList(("SBU_urls.txt",), "lines", shard_size=3, captions=("SBU_captions.txt",))

    run = fetch_url_list(url_file, tmp_path / "shards", spec, captions=caption_file)
    assert (run.downloaded, run.total) == (5, 5)
    assert {c: o["url"] for c, o in outcomes(tmp_path / "shards").items()} == {
        f"caption {i} \u00e9": u for i, u in enumerate(urls)
    }
    assert members(tmp_path / "shards" / "00001.tar")["000011.txt"] == "caption 4 \u00e9".encode()

    with pytest.raises(UrlListError, match=r"captions file .* holds the URLs: are the two swapped"):
        list(read_list(caption_file, spec, url_file))
    caption_file.write_text("one caption short\n" * 4, encoding="utf-8")
    file_server.clear_requests()
    with pytest.raises(UrlListError, match=r"has 5 lines but its captions file .* has 4: they can't be paired"):
        fetch_url_list(url_file, tmp_path / "other", spec, captions=caption_file)
    assert file_server.requests == []


def test_a_changed_list_replaces_its_stale_shards(tmp_path: Path, file_server: FileServer) -> None:
    """Keys follow the list's rows: shards of an older list (or another shard size) must not be kept as done."""
    old, new = image("PNG", 5), image("PNG", 6)
    list_path = write_tsv(tmp_path / "list.tsv", [(f"old{i}", file_server.add(f"old{i}.png", old)) for i in range(6)])
    out = tmp_path / "shards"
    first = fetch_url_list(list_path, out, CC3M)
    assert [s.sha256 for s in first.shards] == [hashlib.sha256((out / f"0000{i}.tar").read_bytes()).hexdigest()
                                                for i in (0, 1)]  # fmt: skip
    assert [s.tar_bytes for s in first.shards] == [(out / f"0000{i}.tar").stat().st_size for i in (0, 1)]

    write_tsv(list_path, [(f"new{i}", file_server.add(f"new{i}.png", new)) for i in range(3)])
    second = fetch_url_list(list_path, out, CC3M)
    assert second.stale_removed == 2 and [s.state for s in second.shards] == ["fetched"]
    assert sorted(p.name for p in out.iterdir()) == [".claims", "00000.parquet", "00000.tar", "_list.json"]
    assert set(outcomes(out)) == {"new0", "new1", "new2"}

    resharded = fetch_url_list(list_path, out, UrlList(("list.tsv",), "tsv", 1, 0, shard_size=2))
    assert resharded.stale_removed == 1 and [s.total for s in resharded.shards] == [2, 1]
    again = fetch_url_list(list_path, out, UrlList(("list.tsv",), "tsv", 1, 0, shard_size=2))
    assert again.stale_removed == 0 and [s.state for s in again.shards] == ["skipped", "skipped"]


def test_sbu_json_of_parallel_arrays_and_json_records(tmp_path: Path) -> None:
    """sbu-captions-all.json is an object of parallel arrays; LAION-style JSON is an array of records."""
    spec = UrlList(("sbu.json",), "json", url_column="image_urls", caption_column="captions")
    arrays = tmp_path / "sbu.json"
    arrays.write_text(json.dumps({"image_urls": ["http://static.flickr.com/1/a.jpg", " http://x.org/b.jpg "],
                                  "captions": ["a dog", "a cat"], "user_ids": ["1", "2"]}))  # fmt: skip
    assert list(read_list(arrays, spec)) == [
        ("http://static.flickr.com/1/a.jpg", "a dog"),
        ("http://x.org/b.jpg", "a cat"),
    ]
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"image_urls": "http://x.org/c.jpg", "captions": "c"}, {"captions": "no url"}]))
    assert list(read_list(records, spec)) == [("http://x.org/c.jpg", "c"), ("", "no url")]

    arrays.write_text(json.dumps({"image_urls": ["http://x.org/a.jpg"], "captions": []}))
    with pytest.raises(UrlListError, match=r"1 'image_urls' but 0 'captions'"):
        list(read_list(arrays, spec))
    arrays.write_text(json.dumps({"urls": [], "captions": []}))
    with pytest.raises(UrlListError, match=r"no key 'image_urls' \(it has urls, captions\)"):
        list(read_list(arrays, spec))
    arrays.write_text("{not json")
    with pytest.raises(UrlListError, match="not JSON"):
        list(read_list(arrays, spec))
    swapped = UrlList(("sbu.json",), "json", url_column="captions", caption_column="image_urls")
    records.write_text(json.dumps({"image_urls": ["http://x.org/a.jpg"], "captions": ["a dog"]}))
    with pytest.raises(UrlListError, match=r"url_column \(column 'captions'\) does not hold .* are the two swapped"):
        list(read_list(records, swapped))


def test_a_list_fetched_in_parts_gives_every_image_once(tmp_path: Path, file_server: FileServer) -> None:
    """Parts of a planned list (partitions, perhaps on other machines) fetch disjoint shards, the same ones a whole
    fetch makes; a part run again after a crash fetches only its unfinished shard; the recorded tar hashes hold."""
    png = image("PNG", 9)
    rows = [(f"img{i}", file_server.add(f"img{i}.png", png, content_type="image/png")) for i in range(14)]
    list_path = write_tsv(tmp_path / "list.tsv", rows)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    fetch_url_list(list_path, whole, CC3M)

    plan = url_lists.plan_url_list(list_path, parted, CC3M)
    assert (plan.rows, plan.shards, plan.stale_removed) == (14, 4, 0)
    file_server.clear_requests()
    first = fetch_url_list(list_path, parted, CC3M, shards=range(0, 2))
    second = fetch_url_list(list_path, parted, CC3M, shards=range(2, 4))
    assert [s.index for s in first.shards] == [0, 1] and [s.index for s in second.shards] == [2, 3]
    assert sorted(r.name for r in file_server.requests) == sorted(f"img{i}.png" for i in range(14))  # each image once
    assert outcomes(parted) == outcomes(whole)
    for i in range(4):
        assert members(parted / f"0000{i}.tar") == members(whole / f"0000{i}.tar")

    finished = url_lists.finished_shards(parted)
    assert [s.index for s in finished] == [0, 1, 2, 3] and sum(s.skipped for s in finished) == 14
    assert [s.sha256 for s in finished] == [hashlib.sha256((parted / f"0000{i}.tar").read_bytes()).hexdigest()
                                            for i in range(4)]  # fmt: skip

    (parted / "00003.parquet").unlink()  # the part was killed before its last shard was marked finished
    file_server.clear_requests()
    redone = fetch_url_list(list_path, parted, CC3M, shards=range(2, 4))
    assert [s.state for s in redone.shards] == ["skipped", "fetched"]
    assert sorted(r.name for r in file_server.requests) == ["img12.png", "img13.png"]


def test_a_part_of_a_list_changed_since_its_plan_is_refused(tmp_path: Path, file_server: FileServer) -> None:
    """Only the plan removes stale shards: a part finding another list (or no plan) stops, and removes nothing."""
    png = image("PNG", 3)
    list_path = write_tsv(tmp_path / "list.tsv", [(f"a{i}", file_server.add(f"a{i}.png", png)) for i in range(8)])
    out = tmp_path / "shards"
    with pytest.raises(UrlListError, match=r"holds no shards planned from this version of list.tsv"):
        fetch_url_list(list_path, out, CC3M, shards=range(0, 1))

    url_lists.plan_url_list(list_path, out, CC3M)
    fetch_url_list(list_path, out, CC3M, shards=range(0, 1))
    before = sorted(p.name for p in out.iterdir())
    write_tsv(list_path, [(f"b{i}", file_server.add(f"b{i}.png", png)) for i in range(8)])
    file_server.clear_requests()
    with pytest.raises(UrlListError, match=r"plan the list again"):
        fetch_url_list(list_path, out, CC3M, shards=range(1, 2))
    assert sorted(p.name for p in out.iterdir()) == before and file_server.requests == []

    replanned = url_lists.plan_url_list(list_path, out, CC3M)
    assert (replanned.shards, replanned.stale_removed) == (2, 1)
    assert sorted(p.name for p in out.iterdir()) == [url_lists.CLAIMS, "_list.json"]


@pytest.mark.parametrize("shards", [range(0, 2), None], ids=["a part", "the whole list"])
def test_a_shard_another_process_writes_is_left_to_it(
    tmp_path: Path, file_server: FileServer, shards: range | None
) -> None:
    """A part started twice (a step the broker gave to a second worker), or the whole list fetched beside the parts
    (`mvdata download`), never writes a shard another process holds."""
    png = image("PNG", 4)
    list_path = write_tsv(tmp_path / "list.tsv", [(f"c{i}", file_server.add(f"c{i}.png", png)) for i in range(8)])
    out = tmp_path / "shards"
    url_lists.plan_url_list(list_path, out, CC3M)
    (out / url_lists.CLAIMS).mkdir()
    holder = subprocess.Popen(  # another process holds shard 1's claim
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(60)", str(out / url_lists.CLAIMS / "00001.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        file_server.clear_requests()
        run = fetch_url_list(list_path, out, CC3M, shards=shards)
        assert [s.index for s in run.shards] == [0] and run.busy == [1]
        assert sorted(r.name for r in file_server.requests) == [f"c{i}.png" for i in range(4)]
        assert not (out / "00001.tar").exists() and not (out / "00001.tar.part").exists()
    finally:
        holder.kill()
        holder.wait()
    again = fetch_url_list(list_path, out, CC3M, shards=shards)
    assert [s.state for s in again.shards] == ["skipped", "fetched"] and again.busy == []

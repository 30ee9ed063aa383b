"""URL lists into WebDataset shards, against the loopback file server: every URL's outcome, resume and retry."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mvdata_assets.datasets import durable, url_lists
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.url_lists import UrlListError, UrlListRun, read_list
from mvdata_assets_tests.datasets.conftest import closed_port
from mvdata_assets_tests.datasets.fileserver import FileServer

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


@pytest.fixture
def server() -> FileServer:
    with FileServer() as s:
        yield s


def test_every_outcome_recorded_and_link_rot_by_kind(tmp_path: Path, server: FileServer) -> None:
    png, jpg = image("PNG", 10), image("JPEG", 20)
    gif = image("GIF", 30)
    html = b"<html><body>gone</body></html>"
    urls = {
        "png": server.add("png", png, content_type="image/png"),
        "jpg": server.add("jpg", jpg, content_type="image/jpeg; charset=binary"),
        "unlabelled": server.add("unlabelled", gif, content_type="application/octet-stream"),
        "missing": server.url_for("missing.jpg"),
        "forbidden": server.add("forbidden.jpg", jpg, content_type="image/jpeg"),
        "html": server.add("html.jpg", html, content_type="text/html"),
        "html_as_jpeg": server.add("html_as_jpeg.jpg", html, content_type="image/jpeg"),
        "cut_png": server.add("cut.png", png[:-20], content_type="image/png"),
        "cut_transfer": server.add("cut_transfer.jpg", jpg, content_type="image/jpeg"),
        "slow": server.add("slow.jpg", jpg, content_type="image/jpeg"),
        "not_a_url": "ftp://x.org/a.jpg",
    }
    server.fault("forbidden.jpg", "status", status=403)
    server.fault("cut_transfer.jpg", "truncate", after=len(jpg) // 2)
    server.fault("slow.jpg", "stall", seconds=3, after=0)
    list_path = write_tsv(tmp_path / "list.tsv", [(caption, url) for caption, url in urls.items()])

    run = fetch_url_list(list_path, tmp_path / "shards", CC3M, concurrency=16, timeout_s=0.5)

    got = outcomes(tmp_path / "shards")
    expected = {
        "png": (None, "downloaded", len(png)),
        "jpg": (None, "downloaded", len(jpg)),
        "unlabelled": (None, "downloaded", len(gif)),
        "missing": ("http_404", "failed", 0),
        "forbidden": ("http_403", "failed", 0),
        "html": ("not_an_image", "failed", 0),
        "html_as_jpeg": ("not_an_image", "failed", 0),
        "cut_png": ("truncated", "failed", 0),
        "cut_transfer": ("truncated", "failed", 0),
        "slow": ("timeout", "failed", 0),
        "not_a_url": ("invalid_url", "failed", 0),
    }
    assert {c: (o["error_kind"], o["status"], o["bytes"]) for c, o in got.items()} == expected
    # shard number (5 digits) then the row within the shard (as many digits as shard_size - 1 has)
    assert [o["key"] for o in got.values()] == [f"0000{s}{i}" for s, n in ((0, 4), (1, 4), (2, 3)) for i in range(n)]
    assert got["missing"]["http_status"] == 404 and got["html"]["error"] == "content type text/html"
    assert (run.downloaded, run.failed, run.skipped, run.total) == (3, 8, 0, 11)
    assert run.bytes == len(png) + len(jpg) + len(gif)
    assert run.error_kinds == {"http_404": 1, "http_403": 1, "not_an_image": 2, "truncated": 2, "timeout": 1,
                               "invalid_url": 1}  # fmt: skip
    assert [(s.index, s.state, s.total) for s in run.shards] == [
        (0, "fetched", 4),
        (1, "fetched", 4),
        (2, "fetched", 3),
    ]

    shard0 = members(tmp_path / "shards" / "00000.tar")
    assert sorted(shard0) == sorted(
        f"00000{i}.{ext}" for i, e in enumerate(["png", "jpg", "gif"]) for ext in (e, "txt", "json")
    )
    assert shard0["000000.png"] == png and shard0["000001.txt"] == b"jpg"
    assert json.loads(shard0["000002.json"]) == {"key": "000002", "url": urls["unlabelled"], "caption": "unlabelled",
                                                "status": 200, "bytes": len(gif),
                                                "content_type": "application/octet-stream"}  # fmt: skip
    assert members(tmp_path / "shards" / "00001.tar") == {}
    assert not list((tmp_path / "shards").glob("*.part"))


def test_images_over_the_size_limit_are_too_large_and_big_error_pages_keep_their_status(
    tmp_path: Path, server: FileServer
) -> None:
    small, big = image("PNG", 40), image("PNG", 50) + bytes(30_000)  # trailing bytes: still PNG-typed, too big
    urls = {
        "small": server.add("small.png", small, content_type="image/png"),
        "announced": server.add("announced.png", big, content_type="image/png"),
        "unannounced": server.add("unannounced.png", big, content_type="image/png"),
        "big_404": server.add("big_404.png", small, content_type="image/png"),
    }
    server.fault("unannounced.png", "no_length")  # counted as it arrives, not refused by its Content-Length
    server.fault("big_404.png", "status", status=404, body=b"<p>gone</p>" * 5_000)
    list_path = write_tsv(tmp_path / "list.tsv", [(caption, url) for caption, url in urls.items()])

    run = fetch_url_list(list_path, tmp_path / "shards", CC3M, max_bytes=20_000, retries=0)

    got = outcomes(tmp_path / "shards")
    assert {c: (o["error_kind"], o["error"], o["bytes"]) for c, o in got.items()} == {
        "small": (None, None, len(small)),
        "announced": ("too_large", "larger than 20000 bytes", 0),
        "unannounced": ("too_large", "larger than 20000 bytes", 0),
        "big_404": ("http_404", "HTTP 404", 0),
    }
    assert run.error_kinds == {"too_large": 2, "http_404": 1}


def test_finished_shards_are_skipped_and_retry_fetches_only_failures(tmp_path: Path, server: FileServer) -> None:
    png = image("PNG", 1)
    rows = [(f"img{i}", server.add(f"img{i}.png", png, content_type="image/png")) for i in range(6)]
    rows.append(("gone", server.url_for("gone.png")))
    list_path = write_tsv(tmp_path / "list.tsv", rows)
    out = tmp_path / "shards"
    server.fault("img5.png", "status", status=503, times=3)  # the first attempt and both retries
    first = fetch_url_list(list_path, out, CC3M, retry_backoff_s=0.01)
    assert (first.downloaded, first.failed) == (5, 2)
    assert (outcomes(out)["img5"]["attempts"], outcomes(out)["gone"]["attempts"]) == (3, 1)  # a 404 is not retried

    server.clear_requests()
    again = fetch_url_list(list_path, out, CC3M)
    assert server.requests == []
    assert [s.state for s in again.shards] == ["skipped", "skipped"]
    assert (again.downloaded, again.skipped, again.failed) == (0, 5, 2)

    retried = fetch_url_list(list_path, out, CC3M, retry_failed=True)
    assert sorted(r.name for r in server.requests) == ["gone.png", "img5.png"]
    assert [s.state for s in retried.shards] == ["skipped", "retried"]
    assert (retried.downloaded, retried.skipped, retried.failed) == (1, 5, 1)
    assert retried.error_kinds == {"http_404": 1}
    assert sorted(members(out / "00001.tar")) == [f"00001{k}.{e}" for k in (0, 1) for e in ("json", "png", "txt")]
    assert outcomes(out)["img5"]["status"] == "downloaded"


def test_each_shard_rename_is_made_durable_before_the_next_step(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tar's name is on disk before its parquet (the mark of a finished shard) is written, the parquet's before the
    shard is reported: seen by the folder fsyncs, in order."""
    png = image("PNG", 2)
    rows = [(f"img{i}", server.add(f"img{i}.png", png, content_type="image/png")) for i in range(6)]
    out = tmp_path / "shards"
    seen: list[tuple[str, ...]] = []  # what the folder held at each of its fsyncs
    real_fsync_dir = durable.fsync_dir

    def fsync_dir(directory: str | Path) -> None:
        if Path(directory) == out:
            seen.append(tuple(sorted(p.name for p in out.iterdir() if not p.name.endswith(".part"))))
        real_fsync_dir(directory)

    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    finished: list[tuple[int, int]] = []  # (shard, fsyncs seen when it was reported)
    fetch_url_list(
        write_tsv(tmp_path / "list.tsv", rows),
        out,
        CC3M,
        on_shard=lambda shard: finished.append((shard.index, len(seen))),
    )
    # one new name per fsync; the two shards are fetched at once, so either may finish first
    assert [len(names) for names in seen] == [1, 2, 3, 4, 5] and seen[0] == ("_list.json",)
    assert seen[-1] == ("00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "_list.json")

    def first_fsync_with(name: str) -> int:
        return next(k for k, names in enumerate(seen) if name in names)

    reported = dict(finished)
    assert sorted(reported) == [0, 1]
    for shard in (0, 1):
        tar, parquet = first_fsync_with(f"{shard:05d}.tar"), first_fsync_with(f"{shard:05d}.parquet")
        assert tar < parquet  # the tar's name was durable before the parquet was written
        assert reported[shard] > parquet  # and the parquet's before the shard was reported


KILLED_RUN = """
import sys
from pathlib import Path
from mvdata_assets.datasets import durable
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.url_lists import fetch_url_list
fetch_url_list(Path(sys.argv[1]), Path(sys.argv[2]), UrlList(("l",), "tsv", 1, 0, shard_size=4), timeout_s=60,
               allowed_networks=["127.0.0.0/8"])
"""


def test_a_killed_run_resumes_at_the_shard_it_was_writing(tmp_path: Path, server: FileServer) -> None:
    png = image("PNG", 2)
    rows = [(f"img{i}", server.add(f"img{i}.png", png, content_type="image/png")) for i in range(8)]
    list_path = write_tsv(tmp_path / "list.tsv", rows)
    out = tmp_path / "shards"
    server.fault("img7.png", "delay", seconds=60)  # the second shard never finishes before the kill
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(list_path), str(out)])
    try:
        deadline = time.monotonic() + 30
        # killed once the first shard is finished and the second is being written
        while not (server.requests_for("img7.png", wait=0) and (out / "00000.parquet").exists()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "00001.parquet").exists()
    server.clear_faults()
    server.clear_requests()

    run = fetch_url_list(list_path, out, CC3M)
    assert sorted(r.name for r in server.requests) == [f"img{i}.png" for i in range(4, 8)]
    assert [s.state for s in run.shards] == ["skipped", "fetched"] and (run.skipped, run.downloaded) == (4, 4)
    assert len(members(out / "00001.tar")) == 12 and not list(out.glob("*.part"))
    assert os.path.getsize(out / "00000.parquet") > 0


def test_busy_servers_and_refused_connections_are_tried_again(tmp_path: Path, server: FileServer) -> None:
    png = image("PNG", 3)
    urls = {name: server.add(f"{name}.png", png, content_type="image/png") for name in ("busy", "wait", "later")}
    urls |= {f"plain{i}": server.add(f"plain{i}.png", png, content_type="image/png") for i in range(6)}
    urls["refused"] = f"http://127.0.0.1:{closed_port()}/x.png"
    server.fault("busy.png", "status", status=503)
    server.fault("wait.png", "status", status=429, retry_after="0.5")
    server.fault("later.png", "status", status=429, retry_after="3600")  # longer than anyone waits: fails now
    list_path = write_tsv(tmp_path / "list.tsv", [(caption, url) for caption, url in urls.items()])
    spec = UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0, shard_size=100)

    fetch_url_list(list_path, tmp_path / "shards", spec, concurrency=1, retry_backoff_s=0.05)

    got = {c: (o["status"], o["error_kind"], o["attempts"]) for c, o in outcomes(tmp_path / "shards").items()}
    assert got == {"busy": ("downloaded", None, 2), "wait": ("downloaded", None, 2),
                   "later": ("failed", "http_429", 1), "refused": ("failed", "connection", 3),
                   **{f"plain{i}": ("downloaded", None, 1) for i in range(6)}}  # fmt: skip
    first, second = server.requests_for("wait.png")
    assert second.time - first.time >= 0.5  # Retry-After was honoured
    # with one transfer at a time, the images after `wait` were fetched while it paused: a pause holds no slot
    names = [r.name for r in server.requests]
    assert names.index("plain0.png") < names.index("wait.png", names.index("wait.png") + 1)


def test_sbu_layout_pairs_url_and_caption_lines(tmp_path: Path, server: FileServer) -> None:
    png = image("PNG", 4)
    urls = [server.add(f"sbu{i}.png", png, content_type="image/png") for i in range(5)]
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
    server.clear_requests()
    with pytest.raises(UrlListError, match=r"has 5 lines but its captions file .* has 4: they can't be paired"):
        fetch_url_list(url_file, tmp_path / "other", spec, captions=caption_file)
    assert server.requests == []


def test_a_changed_list_replaces_its_stale_shards(tmp_path: Path, server: FileServer) -> None:
    """Keys follow the list's rows: shards of an older list (or another shard size) must not be kept as done."""
    old, new = image("PNG", 5), image("PNG", 6)
    list_path = write_tsv(tmp_path / "list.tsv", [(f"old{i}", server.add(f"old{i}.png", old)) for i in range(6)])
    out = tmp_path / "shards"
    first = fetch_url_list(list_path, out, CC3M)
    assert [s.sha256 for s in first.shards] == [hashlib.sha256((out / f"0000{i}.tar").read_bytes()).hexdigest()
                                                for i in (0, 1)]  # fmt: skip
    assert [s.tar_bytes for s in first.shards] == [(out / f"0000{i}.tar").stat().st_size for i in (0, 1)]

    write_tsv(list_path, [(f"new{i}", server.add(f"new{i}.png", new)) for i in range(3)])
    second = fetch_url_list(list_path, out, CC3M)
    assert second.stale_removed == 2 and [s.state for s in second.shards] == ["fetched"]
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "_list.json"]
    assert set(outcomes(out)) == {"new0", "new1", "new2"}

    resharded = fetch_url_list(list_path, out, UrlList(("list.tsv",), "tsv", 1, 0, shard_size=2))
    assert resharded.stale_removed == 1 and [s.total for s in resharded.shards] == [2, 1]
    again = fetch_url_list(list_path, out, UrlList(("list.tsv",), "tsv", 1, 0, shard_size=2))
    assert again.stale_removed == 0 and [s.state for s in again.shards] == ["skipped", "skipped"]


def test_decode_catches_corruption_inside_an_image(tmp_path: Path, server: FileServer) -> None:
    good = image("JPEG", 7)
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(out, "JPEG")
    broken = out.getvalue()
    start_of_scan = broken.index(b"\xff\xda")
    broken = broken[: start_of_scan + 2] + b"\x00\x03" + broken[start_of_scan + 4 :]  # a scan header cut short
    urls = {"good": server.add("good.jpg", good, content_type="image/jpeg"),
            "broken": server.add("broken.jpg", broken, content_type="image/jpeg")}  # fmt: skip
    list_path = write_tsv(tmp_path / "list.tsv", [(c, u) for c, u in urls.items()])

    fetch_url_list(list_path, tmp_path / "checked", CC3M)  # magic bytes and ending only: both pass
    assert {c: o["status"] for c, o in outcomes(tmp_path / "checked").items()} == {"good": "downloaded",
                                                                                   "broken": "downloaded"}  # fmt: skip
    decoding = UrlList(("list.tsv",), "tsv", 1, 0, shard_size=4, decode=True)
    fetch_url_list(list_path, tmp_path / "decoded", decoding)
    got = outcomes(tmp_path / "decoded")
    assert (got["good"]["status"], got["good"]["width"], got["good"]["height"]) == ("downloaded", 8, 8)
    assert (got["broken"]["status"], got["broken"]["error_kind"]) == ("failed", "undecodable")
    assert got["broken"]["error"].startswith("does not decode: ")
    assert json.loads(members(tmp_path / "decoded" / "00000.tar")["000000.json"])["width"] == 8


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
    with pytest.raises(UrlListError, match=r"no array 'image_urls' \(it has urls, captions\)"):
        list(read_list(arrays, spec))
    arrays.write_text("{not json")
    with pytest.raises(UrlListError, match="not JSON"):
        list(read_list(arrays, spec))
    swapped = UrlList(("sbu.json",), "json", url_column="captions", caption_column="image_urls")
    records.write_text(json.dumps({"image_urls": ["http://x.org/a.jpg"], "captions": ["a dog"]}))
    with pytest.raises(UrlListError, match=r"url_column \(column 'captions'\) does not hold .* are the two swapped"):
        list(read_list(records, swapped))


def test_a_list_fetched_in_parts_gives_every_image_once(tmp_path: Path, server: FileServer) -> None:
    """Parts of a planned list (partitions, perhaps on other machines) fetch disjoint shards, the same ones a whole
    fetch makes; a part run again after a crash fetches only its unfinished shard; the recorded tar hashes hold."""
    png = image("PNG", 9)
    rows = [(f"img{i}", server.add(f"img{i}.png", png, content_type="image/png")) for i in range(14)]
    list_path = write_tsv(tmp_path / "list.tsv", rows)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    fetch_url_list(list_path, whole, CC3M)

    plan = url_lists.plan_url_list(list_path, parted, CC3M)
    assert (plan.rows, plan.shards, plan.stale_removed) == (14, 4, 0)
    server.clear_requests()
    first = fetch_url_list(list_path, parted, CC3M, shards=range(0, 2))
    second = fetch_url_list(list_path, parted, CC3M, shards=range(2, 4))
    assert [s.index for s in first.shards] == [0, 1] and [s.index for s in second.shards] == [2, 3]
    assert sorted(r.name for r in server.requests) == sorted(f"img{i}.png" for i in range(14))  # each image once
    assert outcomes(parted) == outcomes(whole)
    for i in range(4):
        assert members(parted / f"0000{i}.tar") == members(whole / f"0000{i}.tar")

    finished = url_lists.finished_shards(parted)
    assert [s.index for s in finished] == [0, 1, 2, 3] and sum(s.skipped for s in finished) == 14
    assert [s.sha256 for s in finished] == [hashlib.sha256((parted / f"0000{i}.tar").read_bytes()).hexdigest()
                                            for i in range(4)]  # fmt: skip

    (parted / "00003.parquet").unlink()  # the part was killed before its last shard was marked finished
    server.clear_requests()
    redone = fetch_url_list(list_path, parted, CC3M, shards=range(2, 4))
    assert [s.state for s in redone.shards] == ["skipped", "fetched"]
    assert sorted(r.name for r in server.requests) == ["img12.png", "img13.png"]


def test_a_part_of_a_list_changed_since_its_plan_is_refused(tmp_path: Path, server: FileServer) -> None:
    """Only the plan removes stale shards: a part finding another list (or no plan) stops, and removes nothing."""
    png = image("PNG", 3)
    list_path = write_tsv(tmp_path / "list.tsv", [(f"a{i}", server.add(f"a{i}.png", png)) for i in range(8)])
    out = tmp_path / "shards"
    with pytest.raises(UrlListError, match=r"holds no shards planned from this version of list.tsv"):
        fetch_url_list(list_path, out, CC3M, shards=range(0, 1))

    url_lists.plan_url_list(list_path, out, CC3M)
    fetch_url_list(list_path, out, CC3M, shards=range(0, 1))
    before = sorted(p.name for p in out.iterdir())
    write_tsv(list_path, [(f"b{i}", server.add(f"b{i}.png", png)) for i in range(8)])
    server.clear_requests()
    with pytest.raises(UrlListError, match=r"plan the list again"):
        fetch_url_list(list_path, out, CC3M, shards=range(1, 2))
    assert sorted(p.name for p in out.iterdir()) == before and server.requests == []

    replanned = url_lists.plan_url_list(list_path, out, CC3M)
    assert (replanned.shards, replanned.stale_removed) == (2, 1)
    assert sorted(p.name for p in out.iterdir()) == ["_list.json"]


def test_a_shard_another_process_writes_is_left_to_it(tmp_path: Path, server: FileServer) -> None:
    """A part started twice (a step the broker gave to a second worker) never writes a shard the first one holds."""
    png = image("PNG", 4)
    list_path = write_tsv(tmp_path / "list.tsv", [(f"c{i}", server.add(f"c{i}.png", png)) for i in range(8)])
    out = tmp_path / "shards"
    url_lists.plan_url_list(list_path, out, CC3M)
    holder = subprocess.Popen(  # another process holds shard 1's claim
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(60)", str(out / f"00001{url_lists.CLAIM_SUFFIX}")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        server.clear_requests()
        run = fetch_url_list(list_path, out, CC3M, shards=range(0, 2))
        assert [s.index for s in run.shards] == [0] and run.busy == [1]
        assert sorted(r.name for r in server.requests) == [f"c{i}.png" for i in range(4)]
        assert not (out / "00001.tar").exists() and not (out / "00001.tar.part").exists()
    finally:
        holder.kill()
        holder.wait()
    again = fetch_url_list(list_path, out, CC3M, shards=range(0, 2))
    assert [s.state for s in again.shards] == ["skipped", "fetched"] and again.busy == []

"""One shard of a URL list, against the loopback file server: every URL's outcome, the tar, retries, durability."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mvdata_assets.datasets import durable
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.url_lists import CLAIMS
from mvdata_assets_tests.datasets.conftest import closed_port
from mvdata_assets_tests.datasets.fileserver import FileServer
from mvdata_assets_tests.datasets.lists import CC3M, fetch_url_list, image, members, outcomes, write_tsv


def test_every_outcome_recorded_and_link_rot_by_kind(tmp_path: Path, file_server: FileServer) -> None:
    png, jpg = image("PNG", 10), image("JPEG", 20)
    gif = image("GIF", 30)
    html = b"<html><body>gone</body></html>"
    urls = {
        "png": file_server.add("png", png, content_type="image/png"),
        "jpg": file_server.add("jpg", jpg, content_type="image/jpeg; charset=binary"),
        "unlabelled": file_server.add("unlabelled", gif, content_type="application/octet-stream"),
        "missing": file_server.url_for("missing.jpg"),
        "forbidden": file_server.add("forbidden.jpg", jpg, content_type="image/jpeg"),
        "html": file_server.add("html.jpg", html, content_type="text/html"),
        "html_as_jpeg": file_server.add("html_as_jpeg.jpg", html, content_type="image/jpeg"),
        "cut_png": file_server.add("cut.png", png[:-20], content_type="image/png"),
        "cut_transfer": file_server.add("cut_transfer.jpg", jpg, content_type="image/jpeg"),
        "slow": file_server.add("slow.jpg", jpg, content_type="image/jpeg"),
        "not_a_url": "ftp://x.org/a.jpg",
    }
    file_server.fault("forbidden.jpg", "status", status=403)
    file_server.fault("cut_transfer.jpg", "truncate", after=len(jpg) // 2)
    file_server.fault("slow.jpg", "stall", seconds=3, after=0)
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
    tmp_path: Path, file_server: FileServer
) -> None:
    small, big = image("PNG", 40), image("PNG", 50) + bytes(30_000)  # trailing bytes: still PNG-typed, too big
    urls = {
        "small": file_server.add("small.png", small, content_type="image/png"),
        "announced": file_server.add("announced.png", big, content_type="image/png"),
        "unannounced": file_server.add("unannounced.png", big, content_type="image/png"),
        "big_404": file_server.add("big_404.png", small, content_type="image/png"),
    }
    file_server.fault("unannounced.png", "no_length")  # counted as it arrives, not refused by its Content-Length
    file_server.fault("big_404.png", "status", status=404, body=b"<p>gone</p>" * 5_000)
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


def test_each_shard_rename_is_made_durable_before_the_next_step(
    tmp_path: Path, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tar's name is on disk before its parquet (the mark of a finished shard) is written, the parquet's before the
    shard is reported: seen by the folder fsyncs, in order."""
    png = image("PNG", 2)
    rows = [(f"img{i}", file_server.add(f"img{i}.png", png, content_type="image/png")) for i in range(6)]
    out = tmp_path / "shards"
    seen: list[tuple[str, ...]] = []  # what the folder held at each of its fsyncs
    real_fsync_dir = durable.fsync_dir

    def fsync_dir(directory: str | Path) -> None:
        if Path(directory) == out:
            seen.append(
                tuple(sorted(p.name for p in out.iterdir() if not p.name.endswith(".part") and p.name != CLAIMS))
            )
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


def test_busy_servers_and_refused_connections_are_tried_again(tmp_path: Path, file_server: FileServer) -> None:
    png = image("PNG", 3)
    urls = {name: file_server.add(f"{name}.png", png, content_type="image/png") for name in ("busy", "wait", "later")}
    urls |= {f"plain{i}": file_server.add(f"plain{i}.png", png, content_type="image/png") for i in range(6)}
    urls["refused"] = f"http://127.0.0.1:{closed_port()}/x.png"
    file_server.fault("busy.png", "status", status=503)
    file_server.fault("wait.png", "status", status=429, retry_after="0.5")
    file_server.fault("later.png", "status", status=429, retry_after="3600")  # longer than anyone waits: fails now
    list_path = write_tsv(tmp_path / "list.tsv", [(caption, url) for caption, url in urls.items()])
    spec = UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0, shard_size=100)

    fetch_url_list(list_path, tmp_path / "shards", spec, concurrency=1, retry_backoff_s=0.05)

    got = {c: (o["status"], o["error_kind"], o["attempts"]) for c, o in outcomes(tmp_path / "shards").items()}
    assert got == {"busy": ("downloaded", None, 2), "wait": ("downloaded", None, 2),
                   "later": ("failed", "http_429", 1), "refused": ("failed", "connection", 3),
                   **{f"plain{i}": ("downloaded", None, 1) for i in range(6)}}  # fmt: skip
    first, second = file_server.requests_for("wait.png")
    assert second.time - first.time >= 0.5  # Retry-After was honoured
    # with one transfer at a time, the images after `wait` were fetched while it paused: a pause holds no slot
    names = [r.name for r in file_server.requests]
    assert names.index("plain0.png") < names.index("wait.png", names.index("wait.png") + 1)


def test_decode_catches_corruption_inside_an_image(tmp_path: Path, file_server: FileServer) -> None:
    good = image("JPEG", 7)
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(out, "JPEG")
    broken = out.getvalue()
    start_of_scan = broken.index(b"\xff\xda")
    broken = broken[: start_of_scan + 2] + b"\x00\x03" + broken[start_of_scan + 4 :]  # a scan header cut short
    urls = {"good": file_server.add("good.jpg", good, content_type="image/jpeg"),
            "broken": file_server.add("broken.jpg", broken, content_type="image/jpeg")}  # fmt: skip
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

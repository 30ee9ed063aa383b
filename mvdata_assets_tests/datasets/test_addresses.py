"""Requests never reach an address they must not: link-local for anything, anything but public for third-party URLs,
checked on the address connected to, after DNS, on every redirect."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mvdata_assets.datasets.addresses import CATALOG, AddressPolicy, check_network
from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.fetch import Downloader, FileTask
from mvdata_assets.datasets.url_lists import fetch_url_list
from mvdata_assets_tests.datasets.fileserver import FileServer

JPEG = b"\xff\xd8\xff\xe0" + bytes(2000) + b"\xff\xd9"
LIST = UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0, header=False, shard_size=10)


@pytest.mark.parametrize(
    ("ip", "catalog", "third_party"),
    [
        ("169.254.169.254", "link-local", "link-local"),
        ("::ffff:169.254.169.254", "link-local", "link-local"),
        ("fe80::1%eth0", "link-local", "link-local"),
        ("10.0.0.7", None, "private"),
        ("192.168.1.1", None, "private"),
        ("127.0.0.1", None, "loopback"),
        ("::1", None, "loopback"),
        ("224.0.0.251", None, "multicast"),
        ("93.184.216.34", None, None),
        ("2606:4700::1111", None, None),
    ],
)
def test_which_addresses_are_refused(ip: str, catalog: str | None, third_party: str | None) -> None:
    for policy, kind in ((CATALOG, catalog), (AddressPolicy.third_party(), third_party)):
        reason = policy.refusal(ip)
        assert (reason is None) if kind is None else (kind in (reason or "")), (policy, ip, reason)
    assert AddressPolicy.third_party(["10.0.0.0/8"]).refusal("10.0.0.7") is None  # a network allowed by the user


def test_a_setting_that_is_not_a_network_is_named() -> None:
    with pytest.raises(ValueError, match="MVDATA_IMAGE_ALLOWED_NETWORKS: '127.0.0.0/33' is not a network"):
        check_network("127.0.0.0/33")


class _Image(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        _Image.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(JPEG)))
        self.end_headers()
        self.wfile.write(JPEG)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[str]:
    """An image server on 127.0.0.2: another loopback address, as a private host behind a redirect would be."""
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Image)
    _Image.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _outcomes(shards: Path) -> dict[str, tuple[str, str]]:
    table = pq.read_table(next(shards.glob("*.parquet"))).to_pylist()
    return {row["caption"]: (row["status"], row["error_kind"]) for row in table}


def test_image_urls_and_their_redirects_reach_only_allowed_addresses(tmp_path: Path, elsewhere: str) -> None:
    with FileServer() as server:
        allowed = server.add("ok.jpg", JPEG, content_type="image/jpeg")
        hop = server.redirect("hop.jpg", f"{elsewhere}/private.jpg")  # allowed first hop, refused second
        rows = [("allowed", allowed), ("redirected", hop), ("direct", f"{elsewhere}/a.jpg")]
        (tmp_path / "list.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in rows))
        run = fetch_url_list(tmp_path / "list.tsv", tmp_path / "shards", LIST, allowed_networks=["127.0.0.1/32"])
        assert [r.method for r in server.requests_for("hop.jpg")] == ["GET"]  # the first hop was made
    blocked = ("failed", "blocked_address")
    assert _outcomes(tmp_path / "shards") == {"allowed": ("downloaded", None), "redirected": blocked, "direct": blocked}
    assert _Image.hits == []  # refused before any request reached 127.0.0.2
    assert (run.downloaded, run.failed, run.error_kinds["blocked_address"]) == (1, 2, 2)


def test_with_no_network_allowed_a_name_resolving_to_loopback_is_refused(tmp_path: Path) -> None:
    with FileServer() as server:
        url = server.add("ok.jpg", JPEG, content_type="image/jpeg").replace("127.0.0.1", "localhost")
        (tmp_path / "list.tsv").write_text(f"by_name\t{url}\n")
        run = fetch_url_list(tmp_path / "list.tsv", tmp_path / "shards", LIST)
        assert server.requests_for("ok.jpg") == []
    assert _outcomes(tmp_path / "shards") == {"by_name": ("failed", "blocked_address")}
    assert run.failed == 1


def test_a_catalog_file_at_a_refused_address_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    with FileServer() as server:
        task = FileTask(server.add("f.bin", JPEG), tmp_path / "f.bin", len(JPEG))
        (result,) = Downloader(addresses=AddressPolicy.third_party(), retries=3).fetch_all([task])
        assert [r.method for r in server.requests] == []
    assert (result.status, result.attempts) == ("failed", 1)
    assert "refused to connect" in (result.error or "") and "127.0.0.1 is a loopback address" in (result.error or "")


def test_a_segment_at_a_refused_address_is_never_requested(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    with FileServer() as server:
        task = FileTask(server.add("big.bin", data), tmp_path / "big.bin", len(data))
        # loopback stands in for link-local
        downloader = Downloader(
            addresses=AddressPolicy.third_party(), segment_min_bytes=1 << 20, segment_bytes=1 << 19, retries=0
        )
        (result,) = downloader.fetch_all([task])
        gets = [r for r in server.requests if r.method == "GET"]
    assert result.status == "failed" and "127.0.0.1 is a loopback address" in (result.error or "")
    assert gets == []

"""Images per second from a URL list into WebDataset shards, against img2dataset on the same list and server.

    .venv/bin/python bench/url_lists.py [--images 20000] [--img2dataset /path/to/venv/bin/img2dataset]

The loopback file server of the tests runs in its own process (so it does not share this one's GIL) and serves
IMAGES small JPEGs (~1 KiB). Ours reads the list in CC3M's layout (caption<TAB>url, no header); img2dataset reads the
same URLs from a headered TSV, with resizing and re-encoding off, so both only fetch, check and write shards.
img2dataset lives in its own venv (not a project dependency): `python3 -m venv /tmp/i2d-venv &&
/tmp/i2d-venv/bin/pip install img2dataset`.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvdata_assets.datasets.catalog import UrlList  # noqa: E402
from mvdata_assets.datasets.url_lists import fetch_url_list  # noqa: E402
from mvdata_assets_tests.datasets.fileserver import FileServer  # noqa: E402

DEFAULT_PEER = "/tmp/i2d-venv/bin/img2dataset"


def serve_jpegs(
    count: int, ready: multiprocessing.Queue, stop: multiprocessing.Event, root: Path | None = None
) -> None:
    """`count` small JPEGs at /img/<i>.jpg (and the files under `root`, if given) until `stop`."""
    from PIL import Image

    with FileServer(root) as server:
        for i in range(count):
            out = io.BytesIO()
            Image.new("RGB", (16, 16), (i % 256, i // 256 % 256, 0)).save(out, "JPEG")
            server.add(f"img/{i}.jpg", out.getvalue(), content_type="image/jpeg")
        ready.put(server.url)
        stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--img2dataset", default=DEFAULT_PEER)
    args = parser.parse_args()

    ready: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=serve_jpegs, args=(args.images, ready, stop), daemon=True)
    server.start()
    base = ready.get(timeout=300)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            urls = [f"{base}/img/{i}.jpg" for i in range(args.images)]
            ours_list = work / "cc3m.tsv"
            ours_list.write_text("".join(f"caption {i}\t{u}\n" for i, u in enumerate(urls)), encoding="utf-8")
            spec = UrlList(("cc3m.tsv",), "tsv", url_column=1, caption_column=0, shard_size=10_000)
            run = fetch_url_list(ours_list, work / "ours", spec, concurrency=64, max_host_connections=64,
                                 allowed_networks=["127.0.0.0/8"])  # fmt: skip
            ours = run.images_per_second
            print(f"ours: {run.downloaded} downloaded, {run.failed} failed in {run.seconds:.2f} s: {ours:,.0f} img/s")

            peer = Path(args.img2dataset)
            if not peer.exists():
                print(f"img2dataset: not found at {peer} (see this script's docstring); no ratio")
                return
            peer_list = work / "peer.tsv"
            peer_list.write_text("url\tcaption\n" + "".join(f"{u}\tcaption {i}\n" for i, u in enumerate(urls)))
            started = time.monotonic()
            subprocess.run(
                [str(peer), "--url_list", str(peer_list), "--input_format", "tsv", "--url_col", "url",
                 "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(work / "peer"),
                 "--processes_count", "2", "--thread_count", "64", "--number_sample_per_shard", "10000",
                 "--resize_mode", "no", "--disable_all_reencoding", "True", "--enable_wandb", "False"],
                check=True, capture_output=True,
            )  # fmt: skip
            seconds = time.monotonic() - started
            peer_ok = sum(1 for _ in (work / "peer").glob("*.tar"))
            print(f"img2dataset: {args.images} URLs, {peer_ok} shards in {seconds:.2f} s (process start included):"
                  f" {args.images / seconds:,.0f} URLs/s")  # fmt: skip
            print(f"ratio ours / img2dataset: {ours / (args.images / seconds):.2f}")
    finally:
        stop.set()
        server.join(10)


if __name__ == "__main__":
    main()

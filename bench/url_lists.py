"""Images per second from a URL list into WebDataset shards, against img2dataset on the same list and server.

    .venv/bin/python bench/url_lists.py [--images 20000] [--repeat 3] [--img2dataset /path/to/venv/bin/img2dataset]

The loopback file server of the tests runs in its own process (so it does not share this one's GIL) and serves
IMAGES small JPEGs (~1 KiB) and the lists. Ours reads the list in CC3M's layout (caption<TAB>url, no header);
img2dataset reads the same URLs from a headered TSV, with resizing and re-encoding off, so both only fetch, check and
write shards. Rows, each the best and the median of --repeat rounds:
  - the engine alone: `fetch_url_list` in this process, 64 images at once, all of them from one host;
  - the asset as users run it: `dagster asset materialize --select datasets/bench_urls` in a subprocess, its
    catalog a URL-list dataset of the served list, a fresh MVDATA_HOME (and DAGSTER_HOME) per run,
    MVDATA_WANDB_TRACKING=off, the engine's concurrency (MVDATA_IMAGE_CONCURRENCY and MVDATA_IMAGE_HOST_CONNECTIONS
    64: one host serves them all);
  - Dagster's start-up: the same for a list of one image, and the asset minus it (best - best, median - median);
  - img2dataset (2 processes, 64 threads), its process start included.
The target: images per second at least img2dataset's URLs per second (engine, and asset minus start-up).
img2dataset lives in a venv of its own (not a project dependency): `make bench-peers` installs it there.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvdata_assets.datasets.catalog import UrlList  # noqa: E402
from mvdata_assets.datasets.url_lists import fetch_url_list  # noqa: E402
from mvdata_assets_tests.dagster_cli import timed_project_run  # noqa: E402
from mvdata_assets_tests.datasets.fileserver import FileServer  # noqa: E402

DEFAULT_PEER = str(Path(__file__).with_name(".data") / "peers" / "img2dataset" / "bin" / "img2dataset")
SHARD = 10_000
AT_ONCE = 64
STARTUP = "dagster start-up (a list of one image)"


def serve_jpegs(count: int, root: Path, ready: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    """`count` small JPEGs at /img/<i>.jpg, and the files under `root`, until `stop`."""
    from PIL import Image

    with FileServer(root) as server:
        for i in range(count):
            out = io.BytesIO()
            Image.new("RGB", (16, 16), (i % 256, i // 256 % 256, 0)).save(out, "JPEG")
            server.add(f"img/{i}.jpg", out.getvalue(), content_type="image/jpeg")
        ready.put(server.url)
        stop.wait()


def images_in(shards: Path) -> int:
    """The images the tars under `shards` hold (checked after a run, outside its time)."""
    total = 0
    for tar in shards.rglob("*.tar"):
        with tarfile.open(tar) as archive:
            total += sum(1 for member in archive if member.name.endswith(".jpg"))
    return total


def asset_seconds(catalog: Path, name: str, home: Path, images: int) -> float:
    """`dagster asset materialize` of the URL-list dataset `name` into the fresh `home`; exits when it failed or
    its shards do not hold every image."""
    seconds = timed_project_run(
        f"datasets/{name}", home, MVDATA_CATALOG=str(catalog), MVDATA_WANDB_TRACKING="off",
        MVDATA_IMAGE_ALLOWED_NETWORKS="127.0.0.0/8", MVDATA_IMAGE_CONCURRENCY=str(AT_ONCE),
        MVDATA_IMAGE_HOST_CONNECTIONS=str(AT_ONCE),
    )  # fmt: skip
    if (got := images_in(home / "datasets" / name)) != images:
        sys.exit(f"datasets/{name}: {got} images in its shards, not {images}")
    return seconds


def peer_seconds(peer: Path, urls: list[str], work: Path) -> float:
    peer_list = work / "peer.tsv"
    peer_list.write_text("url\tcaption\n" + "".join(f"{u}\tcaption {i}\n" for i, u in enumerate(urls)))
    started = time.perf_counter()
    subprocess.run(
        [str(peer), "--url_list", str(peer_list), "--input_format", "tsv", "--url_col", "url",
         "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(work / "peer"),
         "--processes_count", "2", "--thread_count", str(AT_ONCE), "--number_sample_per_shard", str(SHARD),
         "--resize_mode", "no", "--disable_all_reencoding", "True", "--enable_wandb", "False"],
        check=True, capture_output=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if (got := images_in(work / "peer")) != len(urls):
        sys.exit(f"img2dataset: {got} images in its shards, not {len(urls)}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--img2dataset", default=DEFAULT_PEER)
    args = parser.parse_args()
    peer = Path(args.img2dataset)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "www" / "lists").mkdir(parents=True)
        ready: multiprocessing.Queue = multiprocessing.Queue()
        stop = multiprocessing.Event()
        server = multiprocessing.Process(target=serve_jpegs, args=(args.images, work / "www", ready, stop), daemon=True)
        server.start()
        try:
            base = ready.get(timeout=300)
            urls = [f"{base}/img/{i}.jpg" for i in range(args.images)]
            lists = {"cc3m.tsv": urls, "one.tsv": urls[:1]}
            for name, listed in lists.items():
                rows = "".join(f"caption {i}\t{u}\n" for i, u in enumerate(listed))
                (work / "www" / "lists" / name).write_text(rows, encoding="utf-8")
            url_list = {"format": "tsv", "header": False, "url_column": 1, "caption_column": 0, "shard_size": SHARD}
            catalog = work / "catalog.yaml"
            catalog.write_text(yaml.safe_dump({"datasets": {
                name: {"description": f"bench/url_lists.py: {len(lists[listed])} images", "access": "public",
                       "files": [{"url": f"{base}/lists/{listed}"}], "url_list": url_list}
                for name, listed in (("bench_urls", "cc3m.tsv"), ("bench_urls_startup", "one.tsv"))}}))  # fmt: skip
            spec = UrlList(("cc3m.tsv",), "tsv", url_column=1, caption_column=0, shard_size=SHARD)

            rows: dict[str, list[float]] = {"engine": [], "asset": [], STARTUP: []}
            if peer.exists():
                rows["img2dataset"] = []
            for round_ in range(args.repeat):
                out = work / f"round{round_}"
                run = fetch_url_list(work / "www" / "lists" / "cc3m.tsv", out / "engine", spec, concurrency=AT_ONCE,
                                     max_host_connections=AT_ONCE, allowed_networks=["127.0.0.0/8"])  # fmt: skip
                if run.downloaded != args.images:
                    sys.exit(f"engine: {run.downloaded} of {args.images} images downloaded ({run.failed} failed)")
                rows["engine"].append(run.seconds)
                rows["asset"].append(asset_seconds(catalog, "bench_urls", out / "asset", args.images))
                rows[STARTUP].append(asset_seconds(catalog, "bench_urls_startup", out / "startup", 1))
                if peer.exists():
                    rows["img2dataset"].append(peer_seconds(peer, urls, out))
        finally:
            stop.set()
            server.join(10)

    stats = {label: (min(seconds), statistics.median(seconds)) for label, seconds in rows.items()}
    (asset_best, asset_median), (up_best, up_median) = stats["asset"], stats[STARTUP]
    stats["asset minus start-up"] = (asset_best - up_best, asset_median - up_median)
    stats["img2dataset"] = stats.pop("img2dataset", (float("nan"), float("nan")))
    print(f"{args.images:,} images from one list, shards of {SHARD:,}; best and median of {args.repeat} rounds")
    print(f"  {'':<42}{'best s':>8}{'median s':>10}{'best img/s':>12}")
    for label, (best, median) in stats.items():
        rate = "" if label == STARTUP else f"{args.images / best:,.0f}"
        print(f"  {label:<42}{best:8.2f}{median:10.2f}{rate:>12}".rstrip())
    if not rows.get("img2dataset"):
        print(f"img2dataset: not found at {peer} (see this script's docstring); no ratio")
        return
    for label in ("engine", "asset minus start-up"):
        ratio = stats["img2dataset"][0] / stats[label][0]
        print(f"{'PASS' if ratio >= 1 else 'MISS'} {label}: {ratio:.2f}x img2dataset's rate (target >= 1, best)")


if __name__ == "__main__":
    main()

"""Images per second of a URL list backfilled on the cluster setup (cluster.py), with 1 and with 2 image workers, next
to img2dataset on the same URLs and server.

    .venv/bin/python bench/cluster.py [--images 20000] [--shard-size 1000] [--part-shards 2] [--img2dataset PATH]

Everything runs on this machine, on loopback: Postgres and Redis (Debian's postgresql and redis-server), the
dagster-daemon emptying the run queue, one Celery worker beside the warehouse and N on the `images` queue, and the
tests' file server in a process of its own serving IMAGES small JPEGs (bench/url_lists.py). Per round: a fresh data
root, the dataset asset plans the list (not timed), then the timed part: `dagster job backfill` of every image
partition until the last run has ended. Each run pays Dagster's start-up (a process per run, launched by the daemon),
so the rate counts what a backfill costs, not the engine alone (bench/url_lists.py measures that). img2dataset, in its
own venv (see bench/url_lists.py), fetches the same URLs with 2 processes, resizing and re-encoding off.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.url_lists import DEFAULT_PEER, serve_jpegs  # noqa: E402
from mvdata_assets_tests import cluster_services as services  # noqa: E402


def backfill_rate(
    work: Path,
    www: Path,
    base: str,
    images: int,
    shard_size: int,
    per_part: int,
    workers: int,
    pg: dict,
    broker: str,
) -> tuple[float, int]:
    """Images per second of one backfill with `workers` image workers, and how many partitions it ran."""
    work.mkdir()
    rows = "".join(f"caption {i}\t{base}/img/{i}.jpg\n" for i in range(images))
    (www / f"{work.name}.tsv").write_text(rows)
    catalog = {"datasets": {"bench_cc": {"description": "bench/cluster.py", "access": "public", "files": [
        {"url": f"{base}/{work.name}.tsv", "path": "list.tsv"}], "url_list": {
        "format": "tsv", "url_column": 1, "caption_column": 0, "shard_size": shard_size}}}}  # fmt: skip
    (work / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    env = services.cluster_env(
        pg, broker, work / "dagster", MVDATA_HOME=str(work / "shared"), MVDATA_CATALOG=str(work / "catalog.yaml"),
        MVDATA_IMAGE_PART_SHARDS=str(per_part), MVDATA_IMAGE_ALLOWED_NETWORKS="127.0.0.0/8",
        MVDATA_MAX_RUNS=str(2 * workers),
    )  # fmt: skip
    processes = [
        services.worker(env, "dagster", "warehouse", work / "warehouse.log"),
        services.daemon(env, work / "daemon.log"),
    ]
    processes += [services.worker(env, "images", f"images{i}", work / f"images{i}.log") for i in range(workers)]
    try:
        services.materialize(env, "datasets/bench_cc")
        partitions = math.ceil(math.ceil(images / shard_size) / per_part)
        started = time.monotonic()
        services.backfill(env, "bench_cc_images")
        runs = services.wait_for_backfill(env, partitions, timeout_s=3600)
        seconds = time.monotonic() - started
    finally:
        for proc in processes:
            services.stop(proc)
    if set(runs.values()) != {"SUCCESS"}:
        raise RuntimeError(f"{workers} workers: runs did not all succeed: {runs}")
    tars = list((work / "shared" / "datasets" / "bench_cc" / "shards" / "list").glob("*.tar"))
    if len(tars) != -(-images // shard_size):
        raise RuntimeError(f"{workers} workers: {len(tars)} shards written")
    return images / seconds, len(runs)


def img2dataset_rate(peer: Path, work: Path, base: str, images: int) -> float:
    work.mkdir()
    (work / "peer.tsv").write_text(
        "url\tcaption\n" + "".join(f"{base}/img/{i}.jpg\tcaption {i}\n" for i in range(images))
    )
    started = time.monotonic()
    subprocess.run(
        [str(peer), "--url_list", str(work / "peer.tsv"), "--input_format", "tsv", "--url_col", "url",
         "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(work / "out"),
         "--processes_count", "2", "--thread_count", "64", "--number_sample_per_shard", "10000",
         "--resize_mode", "no", "--disable_all_reencoding", "True", "--enable_wandb", "False"],
        check=True, capture_output=True,
    )  # fmt: skip
    return images / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--part-shards", type=int, default=2)
    parser.add_argument("--img2dataset", default=DEFAULT_PEER)
    args = parser.parse_args()
    if reason := services.missing():
        raise SystemExit(reason)

    ready: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    www = Path(tempfile.mkdtemp(prefix="bench-cluster-www-"))  # the lists, served beside the images
    server = multiprocessing.Process(target=serve_jpegs, args=(args.images, ready, stop, www), daemon=True)
    server.start()
    base = ready.get(timeout=300)
    try:
        with tempfile.TemporaryDirectory() as tmp, services.postgres() as pg, services.redis() as broker:
            rates = {}
            for workers in (1, 2):
                rates[workers], runs = backfill_rate(Path(tmp) / f"w{workers}", www, base, args.images, args.shard_size,
                                                     args.part_shards, workers, pg, broker)  # fmt: skip
                print(
                    f"{workers} image worker(s): {args.images} images, {runs} partition runs: "
                    f"{rates[workers]:,.0f} images/s",
                    flush=True,
                )
            print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}")
            peer = Path(args.img2dataset)
            if not peer.exists():
                print(f"img2dataset: not found at {peer} (see bench/url_lists.py); no comparison")
                return
            theirs = img2dataset_rate(peer, Path(tmp) / "peer", base, args.images)
            print(
                f"img2dataset (2 processes, start-up included): {theirs:,.0f} URLs/s; "
                f"1 worker / img2dataset: {rates[1] / theirs:.2f}, 2 workers / img2dataset: {rates[2] / theirs:.2f}"
            )
    finally:
        stop.set()
        server.join(10)
        shutil.rmtree(www, ignore_errors=True)


if __name__ == "__main__":
    main()

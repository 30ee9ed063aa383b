"""The project on a cluster (cluster.py, cluster/dagster.yaml), all of it real and on loopback: Postgres as the Dagster
instance, Redis as the Celery broker, dagster-daemon emptying the run queue, three Celery workers as separate
processes (one beside the warehouse, two for images), a loopback image server. A URL list of 8 partitions is
backfilled; one image worker is killed with SIGKILL while it writes a shard; its step runs again on the other."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mvdata_assets_tests import cluster_services as services
from mvdata_assets_tests.datasets.fileserver import FileServer

PARTS, PER_SHARD, DELAY_S = 8, 3, 0.6  # 8 shards of 3 images, a partition each; every image answered after DELAY_S
VISIBILITY_S = 10  # the broker gives a killed worker's step to another worker after this


def _jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade % 256, 30, 60)).save(out, "JPEG")
    return out.getvalue()


def _as_typed(argv: list) -> list[str]:
    """A command as docs/cluster.md types it: programs by name, the repository's files relative to it."""
    words = [str(Path(argv[0]).name)]
    for arg in argv[1:]:
        words.append(str(arg.relative_to(services.ROOT)) if isinstance(arg, Path) else arg)
    return words


def _shards_of(paths: Iterable[str], names: list[str]) -> set[int]:
    """The shards that the images at these server paths (img/<name>.jpg) go to."""
    return {names.index(path.removeprefix("img/").removesuffix(".jpg")) // PER_SHARD for path in paths}


def _images_asked(server: FileServer) -> set[str]:
    return {r.name for r in list(server.requests) if r.name.startswith("img/")}


def _in_order(words: list[str], within: list[str]) -> bool:
    rest = iter(within)
    return all(word in rest for word in words)


def test_docs_cluster_md_starts_the_processes_this_test_starts() -> None:
    """The daemon's and the workers' commands docs/cluster.md gives are (up to a worker's name and its quieter
    gossip) the ones the test below starts, so the setup it proves is the one the document tells users to run."""
    text = (services.ROOT / "docs" / "cluster.md").read_text()
    commands = [shlex.split(line.split("#", 1)[0].rstrip(" &"))
                for block in re.findall(r"^```bash\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
                for line in block.splitlines() if line.startswith(("celery ", "dagster-daemon "))]  # fmt: skip
    workers = {words[words.index("-Q") + 1]: words for words in commands if words[0] == "celery"}

    assert [words for words in commands if words[0] == "dagster-daemon"] == [_as_typed(services.daemon_argv())]
    assert set(workers) == {"dagster", "images"}
    for queue, words in workers.items():
        assert _in_order(words, _as_typed(services.worker_argv(queue, "w"))), (queue, words)


def test_a_backfill_on_celery_workers_survives_a_killed_worker(tmp_path: Path) -> None:
    if reason := services.missing():
        pytest.skip(reason)
    with FileServer() as server, services.postgres() as pg, services.redis() as broker:
        names = [f"p{i:02d}" for i in range(PARTS * PER_SHARD)]
        for i, name in enumerate(names):
            server.add(f"img/{name}.jpg", _jpeg(i * 9), content_type="image/jpeg")
            server.fault(f"img/{name}.jpg", "delay", seconds=DELAY_S, times=2)
        rows = "".join(f"caption {name}\t{server.url_for(f'img/{name}.jpg')}\n" for name in names).encode()
        url_list = {"format": "tsv", "url_column": 1, "caption_column": 0, "shard_size": PER_SHARD}
        catalog = {"datasets": {"big_cc": {"description": "d", "access": "public", "url_list": url_list,
                                           "files": [{"url": server.add("lists/big.tsv", rows)}]}}}  # fmt: skip
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        logs, shared = tmp_path / "logs", tmp_path / "shared"
        logs.mkdir()
        env = services.cluster_env(
            pg, broker, tmp_path / "dagster", MVDATA_HOME=str(shared), MVDATA_MAX_RUNS="4",
            MVDATA_CATALOG=str(tmp_path / "catalog.yaml"), MVDATA_IMAGE_PART_SHARDS="1", MVDATA_IMAGE_CONCURRENCY="1",
            MVDATA_IMAGE_ALLOWED_NETWORKS="127.0.0.0/8", MVDATA_CELERY_VISIBILITY_S=str(VISIBILITY_S),
        )  # fmt: skip
        processes = {
            "warehouse": services.worker(env, "dagster", "warehouse", logs / "warehouse.log"),
            "images1": services.worker(env, "images", "images1", logs / "images1.log"),
            "images2": services.worker(env, "images", "images2", logs / "images2.log"),
            "daemon": services.daemon(env, logs / "daemon.log"),
        }
        try:
            services.materialize(env, "datasets/big_cc")
            services.backfill(env, "big_cc_images")
            shards = shared / "datasets" / "big_cc" / "shards" / "big"
            deadline = time.monotonic() + 120
            # both image workers are writing a shard and have asked for its first image; none of the shards of
            # 3 delayed images can be done yet
            while len(list(shards.glob("*.tar.part"))) < 2 or len(_shards_of(_images_asked(server), names)) < 2:
                assert time.monotonic() < deadline, "the image workers never wrote two shards at once"
                time.sleep(0.05)
            writing = sorted(p.name for p in shards.glob("*.tar.part"))
            os.killpg(processes["images1"].pid, signal.SIGKILL)
            processes["images1"].wait()
            runs = services.wait_for_backfill(env, PARTS, timeout_s=180)
            assert Counter(runs.values()) == {"SUCCESS": PARTS}, runs
            services.dagster(
                env, "asset", "materialize", "-m", "mvdata_assets.cluster", "--select", "datasets/big_cc_shards"
            )
        finally:
            for proc in processes.values():
                services.stop(proc)

    stored = Counter()  # every image in exactly one shard, once
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as opened:
            stored.update(m.name for m in opened if m.name.endswith(".jpg"))
    assert len(stored) == PARTS * PER_SHARD and set(stored.values()) == {1}
    assert not list(shards.glob("*.part")) and len(list(shards.glob("*.parquet"))) == PARTS
    outcomes = [r for p in sorted(shards.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["caption"] for r in outcomes) == [f"caption {n}" for n in names]

    asked = Counter(r.name for r in server.requests if r.name.startswith("img/"))
    again = {name for name, n in asked.items() if n > 1}  # only the images of the shard the killed worker wrote
    assert len(asked) == PARTS * PER_SHARD and max(asked.values()) <= 2
    killed_shards = _shards_of(again, names)
    assert len(killed_shards) == 1 and {f"{s:05d}.tar.part" for s in killed_shards} <= set(writing), (again, writing)

    with duckdb.connect(str(shared / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT shard), sum(images), sum(in_place) FROM datasets.shards"
                            ).fetchone() == (PARTS, PARTS, PARTS * PER_SHARD, PARTS * PER_SHARD)  # fmt: skip
        assert conn.execute("SELECT count(*), count(DISTINCT path) FROM datasets.files").fetchone() == (1 + PARTS,) * 2

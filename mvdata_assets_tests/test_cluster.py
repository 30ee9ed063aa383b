"""The project on a cluster (cluster.py, cluster/dagster.yaml), all of it real and on loopback: Postgres as the Dagster
instance, Redis as the Celery broker, dagster-daemon emptying the run queue, three Celery workers as separate
processes (one beside the warehouse, two for images), a loopback image server. A URL list of 8 partitions is
backfilled; one image worker is killed with SIGKILL while it writes a shard; its step runs again on the other."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mvdata_assets_tests.datasets.fileserver import FileServer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARTS, PER_SHARD, DELAY_S = 8, 3, 0.6  # 8 shards of 3 images, a partition each; every image answered after DELAY_S
VISIBILITY_S = 10  # the broker gives a killed worker's step to another worker after this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stops a process started in a session of its own, and everything it started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def postgres() -> Iterator[dict[str, str]]:
    """A Postgres cluster of its own on a free loopback port (Debian's postgresql); yields the instance's settings.
    Postgres refuses to run as root: then it runs as the `postgres` user the package creates."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindirs:
        pytest.skip("postgresql not installed: apt-get install -y postgresql")
    bindir, as_postgres = bindirs[-1], os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_postgres else []
    folder = Path(tempfile.mkdtemp(prefix="mvdata-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()
    subprocess.run([*prefix, bindir / "initdb", "-D", data, "-U", "mvdata", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    proc = subprocess.Popen(
        [*prefix, bindir / "postgres", "-D", data, "-p", str(port), "-k", folder, "-c", "listen_addresses=127.0.0.1",
         "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_port(port, proc, "postgres")
        import psycopg2

        for _ in range(50):  # listening comes a moment before accepting logins
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="mvdata", dbname="postgres")
                break
            except psycopg2.OperationalError:
                time.sleep(0.1)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE dagster")
        conn.close()
        yield {"MVDATA_POSTGRES_HOST": "127.0.0.1", "MVDATA_POSTGRES_PORT": str(port), "MVDATA_POSTGRES_USER": "mvdata",
               "MVDATA_POSTGRES_PASSWORD": "unused", "MVDATA_POSTGRES_DB": "dagster"}  # fmt: skip
    finally:
        _stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed: apt-get install -y redis-server")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _wait_for_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade % 256, 30, 60)).save(out, "JPEG")
    return out.getvalue()


def _worker(env: dict[str, str], queue: str, name: str, log: Path) -> subprocess.Popen:
    argv = [BIN / "celery", "-A", "mvdata_assets.cluster", "worker", "-Q", queue, "-c", "1", "--prefetch-multiplier=1",
            "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]  # fmt: skip
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _dagster(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([BIN / "dagster", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_backfill_on_celery_workers_survives_a_killed_worker(tmp_path: Path) -> None:
    with FileServer() as server, postgres() as pg, redis() as broker:
        names = [f"p{i:02d}" for i in range(PARTS * PER_SHARD)]
        for i, name in enumerate(names):
            server.add(f"img/{name}.jpg", _jpeg(i * 9), content_type="image/jpeg")
            server.fault(f"img/{name}.jpg", "delay", seconds=DELAY_S, times=2)
        rows = "".join(f"caption {name}\t{server.url_for(f'img/{name}.jpg')}\n" for name in names).encode()
        url_list = {"format": "tsv", "url_column": 1, "caption_column": 0, "shard_size": PER_SHARD}
        catalog = {"datasets": {"big_cc": {"description": "d", "access": "public", "url_list": url_list,
                                           "files": [{"url": server.add("lists/big.tsv", rows)}]}}}  # fmt: skip
        (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
        home, dagster_home, shared = tmp_path / "logs", tmp_path / "dagster", tmp_path / "shared"
        for folder in (home, dagster_home):
            folder.mkdir()
        shutil.copy(ROOT / "cluster" / "dagster.yaml", dagster_home / "dagster.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVDATA_")} | pg | {
            "DAGSTER_HOME": str(dagster_home), "MVDATA_HOME": str(shared), "MVDATA_MAX_RUNS": "4",
            "MVDATA_CATALOG": str(tmp_path / "catalog.yaml"), "MVDATA_IMAGE_PART_SHARDS": "1",
            "MVDATA_IMAGE_CONCURRENCY": "1", "MVDATA_IMAGE_ALLOWED_NETWORKS": "127.0.0.0/8",
            "MVDATA_WANDB_TRACKING": "off", "MVDATA_CELERY_BROKER": f"{broker}/0",
            "MVDATA_CELERY_BACKEND": f"{broker}/1", "MVDATA_CELERY_VISIBILITY_S": str(VISIBILITY_S),
        }  # fmt: skip
        processes = {
            "warehouse": _worker(env, "dagster", "warehouse", home / "warehouse.log"),
            "images1": _worker(env, "images", "images1", home / "images1.log"),
            "images2": _worker(env, "images", "images2", home / "images2.log"),
            "daemon": subprocess.Popen([BIN / "dagster-daemon", "run", "-w", ROOT / "cluster" / "workspace.yaml"],
                                       env=env, cwd=ROOT, stdout=(home / "daemon.log").open("w"),
                                       stderr=subprocess.STDOUT, start_new_session=True),
        }  # fmt: skip
        try:
            _dagster(env, "asset", "materialize", "-m", "mvdata_assets.cluster", "--select", "datasets/big_cc")
            _dagster(env, "job", "backfill", "-m", "mvdata_assets.cluster", "-j", "big_cc_images", "--all", "all",
                     "--noprompt")  # fmt: skip
            shards = shared / "datasets" / "big_cc" / "shards" / "big"
            deadline = time.monotonic() + 120
            while len(list(shards.glob("*.tar.part"))) < 2:  # both image workers are writing a shard
                assert time.monotonic() < deadline, "the image workers never wrote two shards at once"
                time.sleep(0.05)
            time.sleep(DELAY_S / 2)  # their first images are asked for; no shard of 3 delayed images is done yet
            writing = sorted(p.name for p in shards.glob("*.tar.part"))
            os.killpg(processes["images1"].pid, signal.SIGKILL)
            processes["images1"].wait()
            runs = _wait_for_runs(env, PARTS, timeout_s=180)
            assert Counter(runs.values()) == {"SUCCESS": PARTS}, runs
            _dagster(env, "asset", "materialize", "-m", "mvdata_assets.cluster", "--select", "datasets/big_cc_shards")
        finally:
            for proc in processes.values():
                _stop(proc)

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
    killed_shards = {names.index(name.removeprefix("img/").removesuffix(".jpg")) // PER_SHARD for name in again}
    assert len(killed_shards) == 1 and {f"{s:05d}.tar.part" for s in killed_shards} <= set(writing), (again, writing)

    with duckdb.connect(str(shared / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT shard), sum(images), sum(in_place) FROM datasets.shards"
                            ).fetchone() == (PARTS, PARTS, PARTS * PER_SHARD, PARTS * PER_SHARD)  # fmt: skip
        assert conn.execute("SELECT count(*), count(DISTINCT path) FROM datasets.files").fetchone() == (1 + PARTS,) * 2


def _wait_for_runs(env: dict[str, str], count: int, timeout_s: float) -> dict[str, str]:
    """Run id -> status of the backfill's runs, once `count` of them have ended (read from the Postgres instance)."""
    script = (
        "import json; from dagster import DagsterInstance, RunsFilter; i = DagsterInstance.get(); "
        "print(json.dumps({r.run_id: r.status.value for r in i.get_runs(RunsFilter(tags={'dagster/backfill': "
        "i.get_backfills()[0].backfill_id}))}))"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        runs = yaml.safe_load(done.stdout)
        if len(runs) >= count and all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in runs.values()):
            return runs
        assert time.monotonic() < deadline, f"the backfill's runs did not end within {timeout_s:g} s: {runs}"
        time.sleep(1)

"""A cluster on loopback, for the cluster test and bench/cluster.py: Postgres (the Dagster instance), Redis (the
Celery broker), dagster-daemon and Celery workers of mvdata_assets.cluster, each a process of its own, started from
Debian's packages and the venv, stopped with everything they started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def missing() -> str | None:
    """What is not installed for a cluster on this machine (None: all is)."""
    if not sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        return "postgresql not installed: apt-get install -y postgresql"
    if shutil.which("redis-server") is None:
        return "redis-server not installed: apt-get install -y redis-server"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


def stop(proc: subprocess.Popen) -> None:
    """Stops a process started in a session of its own, and everything it started: what outlives it (a code server
    the daemon started, waiting for its runs once Postgres is gone) is killed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # its group outlives it while any member is alive
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start(argv: list, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in a session of its own (so `stop` and a SIGKILL reach its children), output to `log`."""
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


@contextlib.contextmanager
def postgres() -> Iterator[dict[str, str]]:
    """A Postgres cluster of its own on a free loopback port; yields cluster/dagster.yaml's settings for it.
    Postgres refuses to run as root: then it runs as the `postgres` user Debian's package creates."""
    bindir, as_postgres = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1], os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_postgres else []
    folder = Path(tempfile.mkdtemp(prefix="mvdata-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*prefix, bindir / "initdb", "-D", data, "-U", "mvdata", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    proc = subprocess.Popen(
        [*prefix, bindir / "postgres", "-D", data, "-p", str(port), "-k", folder, "-c", "listen_addresses=127.0.0.1",
         "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(port, proc, "postgres")
        import psycopg2

        for _ in range(100):  # it listens a moment before it accepts logins
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
        stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def redis() -> Iterator[str]:
    """A Redis server of its own on a free loopback port, nothing saved; yields its URL without a database."""
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc)


def cluster_env(pg: dict[str, str], broker: str, dagster_home: Path, **settings: str) -> dict[str, str]:
    """The environment every process of the cluster shares: this one's, less any MVDATA_* setting, plus the
    instance (cluster/dagster.yaml copied into `dagster_home`), the broker and `settings`."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "cluster" / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVDATA_")}
    return env | pg | {"DAGSTER_HOME": str(dagster_home), "MVDATA_CELERY_BROKER": f"{broker}/0",
                       "MVDATA_CELERY_BACKEND": f"{broker}/1", "MVDATA_WANDB_TRACKING": "off"} | settings  # fmt: skip


def worker_argv(queue: str, name: str) -> list:
    """The command of a Celery worker of mvdata_assets.cluster on `queue`, one task at a time (docs/cluster.md's,
    named, and without the chatter between workers that a single machine does not need)."""
    return [BIN / "celery", "-A", "mvdata_assets.cluster", "worker", "-Q", queue, "-c", "1", "--prefetch-multiplier=1",
            "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]  # fmt: skip


def daemon_argv() -> list:
    return [BIN / "dagster-daemon", "run", "-w", ROOT / "cluster" / "workspace.yaml"]


def worker(env: dict[str, str], queue: str, name: str, log: Path) -> subprocess.Popen:
    return start(worker_argv(queue, name), env, log)


def daemon(env: dict[str, str], log: Path) -> subprocess.Popen:
    return start(daemon_argv(), env, log)


def dagster(env: dict[str, str], *args: str) -> None:
    """The dagster CLI on mvdata_assets.cluster's instance; its output in the error when it fails."""
    done = subprocess.run([BIN / "dagster", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"dagster {' '.join(args)} exited with {done.returncode}:\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")  # fmt: skip


def materialize(env: dict[str, str], selection: str) -> None:
    """A run of `selection` from this process, its steps sent to the workers."""
    dagster(env, "asset", "materialize", "-m", "mvdata_assets.cluster", "--select", selection)


def backfill(env: dict[str, str], job: str) -> None:
    """A backfill of every partition of `job`: its runs wait in the instance's queue for the daemon."""
    dagster(env, "job", "backfill", "-m", "mvdata_assets.cluster", "-j", job, "--all", "all", "--noprompt")


def backfill_runs(env: dict[str, str]) -> dict[str, str]:
    """Run id -> status of the runs of the instance's latest backfill (read from Postgres in a child process, as
    this one may hold another instance)."""
    script = (
        "import json; from dagster import DagsterInstance, RunsFilter; i = DagsterInstance.get(); "
        "b = i.get_backfills(limit=1); print(json.dumps({r.run_id: r.status.value for r in "
        "i.get_runs(RunsFilter(tags={'dagster/backfill': b[0].backfill_id}))} if b else {}))"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def wait_for_backfill(env: dict[str, str], runs: int, timeout_s: float) -> dict[str, str]:
    """The latest backfill's run statuses, once `runs` of them have ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = backfill_runs(env)
        if len(statuses) >= runs and all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            raise TimeoutError(f"the backfill's runs did not end within {timeout_s:g} s: {statuses}")
        time.sleep(0.5)

"""W&B API sync against the loopback W&B-compatible server, and the peer dr-wandb on the same project.

    .venv/bin/python bench/api_sync.py [--runs 200 --steps 20000 --keys 10] [--peer /path/to/venv/bin/wandb-export]

A project of RUNS runs x STEPS steps x KEYS metrics (one run in ten still live: its last 500 steps are not in the
parquet export yet). Measured, with seconds and requests (GraphQL by operation, parquet downloads):
  - the engine (`sync_api` in this process): a full sync into a fresh warehouse, a re-sync with nothing changed, and
    a re-sync after 5 runs gained 1,000 steps;
  - the asset as users run it: `dagster asset materialize --select group:wandb` in a subprocess
    (MVDATA_WANDB_PROJECTS the project, a fresh MVDATA_HOME), a full sync then one with nothing changed (its exports
    and checks included); Dagster's start-up is the same command on a project of one run of 10 steps, and the
    asset's full sync is also shown minus it;
  - dr-wandb's `wandb-export ... --mode history` on the same server and project, and the ratios (engine, asset minus
    start-up). The server is the tests' (mvdata_assets_tests/runs/wandb_server.py).

dr-wandb goes in a venv of its own, away from the project's: `make bench-peers` installs it there.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvdata_assets.runs.api import sync_api  # noqa: E402
from mvdata_assets.runs.wandb_api import PAGE_RUNS  # noqa: E402
from mvdata_assets_tests.dagster_cli import timed_project_run  # noqa: E402
from mvdata_assets_tests.runs.wandb_server import WandbServer  # noqa: E402

ENTITY, PROJECT, TINY = "microvlm", "bench", "bench-startup"
DEFAULT_PEER = str(Path(__file__).with_name(".data") / "peers" / "dr-wandb" / "bin" / "wandb-export")


def history(seed: int, steps: int, keys: int, first_step: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    step = np.arange(first_step, first_step + steps, dtype=np.int64)
    columns = {"_step": step, "_timestamp": 1.74e9 + step * 0.5, "_runtime": step * 0.5}
    for k in range(keys):
        columns[f"train/metric_{k}"] = rng.random(steps) * 10.0 ** rng.integers(-3, 3)
    return pa.table(columns)


def build(server: WandbServer, runs: int, steps: int, keys: int) -> None:
    for i in range(runs):
        live = i % 10 == 0
        server.add_run(
            ENTITY, PROJECT, f"run{i:04d}", name=f"bench-{i}", state="running" if live else "finished",
            created_at=1.74e9 + i * 60, config={"lr": 10 ** -(i % 5), "seed": i}, summary={"loss": 0.1},
            history=history(i, steps, keys), exported_steps=steps - 500 if live else steps,
        )  # fmt: skip
    server.add_run(ENTITY, TINY, "tiny", name="tiny", state="finished", created_at=1.74e9, config={"lr": 0.1},
                   summary={"loss": 0.1}, history=history(0, 10, keys))  # fmt: skip
    server.prepare_exports()


def requests(server: WandbServer) -> str:
    ops = Counter(e.op for e in server.requests())
    ops.pop("otel", None)
    return ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))


def graphql_requests(server: WandbServer) -> int:
    return sum(1 for e in server.requests() if e.path.rstrip("/") == "/graphql")


def timed_sync(server: WandbServer, conn: duckdb.DuckDBPyConnection, label: str) -> float:
    server.clear_requests()
    started = time.perf_counter()
    report = sync_api(conn, [f"{ENTITY}/{PROJECT}"])
    seconds = time.perf_counter() - started
    assert not report.problems, report.problems[:3]
    print(f"  {label:<32} {seconds:8.2f} s   {graphql_requests(server):5d} GraphQL   ({requests(server)})")
    return seconds


def asset_sync(server: WandbServer, home: Path, project: str, label: str, values: int) -> float:
    """`dagster asset materialize --select group:wandb` of `project` into `home`; exits when it failed or stored
    other than `values` history values."""
    server.clear_requests()
    seconds = timed_project_run(
        "group:wandb", home, MVDATA_WANDB_TRACKING="off", MVDATA_WANDB_PROJECTS=f"{ENTITY}/{project}"
    )
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        stored = conn.execute("SELECT count(*) FROM wandb.history").fetchone()[0]
    if stored != values:
        sys.exit(f"{label}: stored {stored:,} history values, expected {values:,}")
    print(f"  {label:<32} {seconds:8.2f} s   {graphql_requests(server):5d} GraphQL   ({requests(server)})")
    return seconds


def run_peer(server: WandbServer, peer: str, work: Path) -> float | None:
    if not Path(peer).exists():
        print(f"  dr-wandb: not installed at {peer} (see this script's docstring); skipped")
        return None
    server.clear_requests()
    env = server.sdk_env(work / "peer-home")
    started = time.perf_counter()
    done = subprocess.run(
        [peer, ENTITY, PROJECT, "--name", "bench", "--data-root", str(work / "peer-data"), "--mode", "history"],
        env=env, cwd=work, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode:
        print(f"  dr-wandb failed ({done.returncode}): {done.stderr[-800:]}")
        return None
    print(f"  {'dr-wandb wandb-export (history)':<32} {seconds:8.2f} s   {graphql_requests(server):5d} GraphQL   "
          f"({requests(server)})")  # fmt: skip
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--peer", default=DEFAULT_PEER, help="dr-wandb's wandb-export ('' to skip)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        with WandbServer(data_dir=work / "server") as server:
            started = time.perf_counter()
            build(server, args.runs, args.steps, args.keys)
            values = args.runs * args.steps * args.keys
            built = time.perf_counter() - started
            print(f"W&B server on {server.url}: {args.runs} runs x {args.steps:,} steps x {args.keys} keys "
                  f"({values:,} values), built in {built:.1f} s; {os.cpu_count()} CPUs")  # fmt: skip
            os.environ.update(server.sdk_env(work / "sdk-home"))
            conn = duckdb.connect(str(work / "warehouse.duckdb"))
            full = timed_sync(server, conn, "full sync")
            stored = conn.execute("SELECT count(*) FROM wandb.history").fetchone()[0]
            assert stored == values, f"stored {stored:,} history values, expected {values:,}"
            timed_sync(server, conn, "re-sync, nothing changed")
            listing = 1 + math.ceil(args.runs / PAGE_RUNS)  # the login check and the light listing's pages
            assert graphql_requests(server) <= listing and server.count("HistoryPage") == 0
            assert server.count("parquet") == 0
            for i in sorted({round(j * (args.runs - 1) / 4) for j in range(5)}):
                server.append_history(ENTITY, PROJECT, f"run{i:04d}", history(i, 1000, args.keys, args.steps))
            timed_sync(server, conn, "re-sync, 5 runs + 1,000 steps")
            pages = server.requests("HistoryPage")
            assert {p.variables["minStep"] for p in pages} == {args.steps} and len({p.run for p in pages}) == 5
            conn.close()
            print(f"  full sync: {values / full / 1e6:.2f} M values/s")
            values += 5 * 1000 * args.keys  # the steps appended to 5 runs
            asset = asset_sync(server, work / "asset", PROJECT, "asset: full sync", values)
            again = asset_sync(server, work / "asset", PROJECT, "asset: nothing changed", values)
            again_requests = graphql_requests(server)
            startup = asset_sync(server, work / "startup", TINY, "start-up (1 run, 10 steps)", 10 * args.keys)
            print(f"  {'asset: full sync minus start-up':<32} {asset - startup:8.2f} s")
            peer = run_peer(server, args.peer, work) if args.peer else None
            print(f"\n{'PASS' if again <= 10 and again_requests <= 3 else 'MISS'} nothing changed, through the asset: "
                  f"{again:.2f} s, {again_requests} GraphQL requests (goal <= 10 s, <= 3 requests)")  # fmt: skip
            if peer:
                for label, seconds in (("engine", full), ("asset minus start-up", asset - startup)):
                    ratio = peer / seconds
                    print(f"{'PASS' if ratio >= 10 else 'MISS'} full sync, {label}: {seconds:.2f} s, dr-wandb "
                          f"{peer:.2f} s: {ratio:.1f}x faster (goal >= 10x)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline .wandb ingest: this engine against a straightforward reader, on runs written by the real SDK.

Prints ratios (the targets of design.md), each row the best and the median of --repeat rounds:
  1. one run of 100k steps x 8 keys: engine seconds to DuckDB (target <= 1.2 s) vs the straightforward
     reader (framing + protobuf + json.loads per value + long-format load), and framing + parse alone;
  2. five such runs through `dagster asset materialize` of group:wandb (wall, whole CLI) vs the straightforward
     reader on the same five (target >= 4x faster), judged on the command minus Dagster's start-up (the same command
     on a run of one step, in a fresh home, measured in the same round: best minus best, median minus median), the
     whole command's ratio shown beside it; then a no-change re-run (target <= 10 s wall);
  3. peak memory of the engine for one run and for five runs (target: flat).

Runs are written once with the wandb SDK (offline) into bench/.data and reused.
Usage: .venv/bin/python bench/offline_ingest.py [--steps 100000] [--runs 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mvdata_assets_tests import dagster_cli  # noqa: E402

DATA = HERE / ".data"
KEYS = 8

WRITER = """
import random, sys, wandb
steps, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
run = wandb.init(project="bench", mode="offline", dir=sys.argv[3], config={"lr": 3e-4, "seed": seed},
                 settings=wandb.Settings(console="off"))
for step in range(steps):
    run.log({f"m{i}": rng.random() for i in range(KEYS)})
run.finish()
""".replace("KEYS", str(KEYS))


def write_runs(count: int, steps: int) -> Path:
    root = DATA / f"runs-{steps}"
    existing = sorted(root.glob("run*/wandb/offline-run-*/run-*.wandb"))
    if len(existing) >= count:
        return root
    print(f"writing {count} runs of {steps} steps x {KEYS} keys with the wandb SDK (once; cached in {root})")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    pending = []
    for i in range(count):
        out = root / f"run{i}"
        if any(out.glob("wandb/offline-run-*/run-*.wandb")):
            continue
        out.mkdir(parents=True, exist_ok=True)
        pending.append(subprocess.Popen([sys.executable, "-c", WRITER, str(steps), str(i), str(out)], env=env))
        if len(pending) >= 2:  # two cores
            pending.pop(0).wait()
    for child in pending:
        child.wait()
    return root


def straightforward_read(path: Path, load: bool, conn=None) -> int:
    """The baseline: leveldb-log framing + protobuf + one json.loads per value + long-format load."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    pos, parts, rows = 7, [], []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        fragment = data[pos + 7 : pos + 7 + length]
        if zlib.crc32(fragment, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"crc at {pos}")
        pos += 7 + length
        parts.append(fragment)
        if kind not in (1, 4):
            continue
        record = pb.Record.FromString(b"".join(parts))
        parts = []
        if not load or record.WhichOneof("record_type") != "history":
            continue
        values = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step, ts = values.pop("_step"), values.pop("_timestamp", None)
        runtime = values.pop("_runtime", None)
        rows += [(step, ts, runtime, k, v) for k, v in values.items()]
    if load:
        import pyarrow as pa

        step, ts, runtime, keys, values = zip(*rows, strict=True)
        table = pa.table({"step": step, "ts": ts, "runtime": runtime, "key": keys, "value": values})
        conn.execute("CREATE TABLE IF NOT EXISTS h (step BIGINT, ts DOUBLE, runtime DOUBLE, key VARCHAR, value DOUBLE)")
        conn.register("t", table)
        conn.execute("INSERT INTO h SELECT * FROM t")
        conn.unregister("t")
    return len(rows)


def engine_child(dirs: list[str], database: str) -> dict:
    """Runs the engine in a fresh process so its peak RSS is its own."""
    code = """
import json, resource, sys, time
from pathlib import Path
import duckdb
from mvdata_assets.runs.offline import sync_offline
import wandb.proto.wandb_internal_pb2  # module imports are not engine time (the engine imports it lazily)
conn = duckdb.connect(sys.argv[1])
started = time.perf_counter()
report = sync_offline(conn, [Path(d) for d in sys.argv[2:]])
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - started, "rows": report.rows.get("history", 0),
                  "problems": report.problems, "peak_rss_mb": peak_mb}))
"""
    out = subprocess.run([sys.executable, "-c", code, database, *dirs], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def materialize(home: Path, dirs: list[Path]) -> float:
    return dagster_cli.timed_project_run("group:wandb", home, MVDATA_WANDB_OFFLINE_DIRS=":".join(map(str, dirs)))


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def best_median(seconds: list[float]) -> tuple[float, float]:
    return min(seconds), statistics.median(seconds)


def table(rows: dict[str, tuple[float, float]], baseline: str) -> None:
    """One line per row: best and median seconds, and the baseline's seconds / the row's (best, median)."""
    base_best, base_median = rows[baseline]
    print(f"   {'':<58}{'best s':>8}{'median s':>10}{'vs best':>9}{'median':>8}")
    for name, (best, median) in rows.items():
        print(f"   {name:<58}{best:8.2f}{median:10.2f}{base_best / best:9.1f}{base_median / median:8.1f}")


def verdict(passed: bool, what: str) -> None:
    print(f"   {'PASS' if passed else 'MISS'} {what}")


def main() -> None:
    import duckdb

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = write_runs(args.runs, args.steps)
    run_dirs = sorted(root.glob("run*"))[: args.runs]
    tiny = sorted(write_runs(1, 1).glob("run*"))[:1]  # Dagster's start-up: the same command on one step
    first = next(run_dirs[0].glob("wandb/offline-run-*/run-*.wandb"))
    print(f"one run: {first.stat().st_size / 1e6:.1f} MB, {args.steps} steps x {KEYS} keys; "
          f"best and median of {args.repeat} rounds")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        parse_only, baseline_one, engines, rows = [], [], [], 0
        for round_ in range(args.repeat):
            parse_only.append(timed(lambda: straightforward_read(first, load=False)))
            with duckdb.connect(str(tmp_path / f"baseline-{round_}.duckdb")) as conn:
                started = time.perf_counter()
                rows = straightforward_read(first, load=True, conn=conn)
                baseline_one.append(time.perf_counter() - started)
            engines.append(engine_child([str(run_dirs[0])], str(tmp_path / f"engine1-{round_}.duckdb")))
            assert engines[-1]["rows"] == rows, (engines[-1]["rows"], rows)
        engine_one = best_median([e["seconds"] for e in engines])
        print(f"\n1. one run to DuckDB ({rows:,} values)")
        table({"straightforward reader (framing+protobuf+json.loads+load)": best_median(baseline_one),
               "framing + protobuf parse alone": best_median(parse_only),
               "this engine (sync_offline)": engine_one},
              "straightforward reader (framing+protobuf+json.loads+load)")  # fmt: skip
        verdict(engine_one[0] <= 1.2, f"engine {engine_one[0]:.2f} s (target <= 1.2 s, best)")

        baseline_all, full, again, startup = [], [], [], []
        files = [next(d.glob("wandb/offline-run-*/run-*.wandb")) for d in run_dirs]
        for round_ in range(args.repeat):
            with duckdb.connect(str(tmp_path / f"baseline5-{round_}.duckdb")) as conn:
                baseline_all.append(timed(lambda conn=conn: [straightforward_read(f, True, conn) for f in files]))
            home = tmp_path / f"home-{round_}"
            full.append(materialize(home, run_dirs))
            again.append(materialize(home, run_dirs))
            startup.append(materialize(tmp_path / f"startup-{round_}", tiny))
        (full_best, full_median), (up_best, up_median) = best_median(full), best_median(startup)
        print(f"\n2. {len(run_dirs)} runs through `dagster asset materialize --select group:wandb` (wall, whole CLI)")
        table({"straightforward reader on the same runs": best_median(baseline_all),
               "asset: first sync": (full_best, full_median),
               "dagster start-up (the same on a run of one step)": (up_best, up_median),
               "asset minus start-up": (full_best - up_best, full_median - up_median),
               "asset: no change": best_median(again)},
              "straightforward reader on the same runs")  # fmt: skip
        # judged as the downloads are: Dagster's start-up is a fixed cost, reported apart (its row and the whole
        # command's ratio above)
        minus = min(baseline_all) / (full_best - up_best)
        verdict(minus >= 4, f"first sync minus start-up: {minus:.1f}x the straightforward reader (target >= 4x, best)")
        verdict(min(again) <= 10, f"no change: {min(again):.2f} s (target <= 10 s, best)")

        many = engine_child([str(d) for d in run_dirs], str(tmp_path / "engine5.duckdb"))
        print("\n3. engine peak memory (RSS)")
        print(f"   1 run:  {max(e['peak_rss_mb'] for e in engines):6.0f} MB")
        peak, seconds, values = many["peak_rss_mb"], many["seconds"], many["rows"]
        print(f"   {len(run_dirs)} runs: {peak:6.0f} MB  ({seconds:.2f} s, {values:,} values)")


if __name__ == "__main__":
    main()

"""sync_offline into a real DuckDB file, checked against what the real SDK was asked to log.

Ground truth: the writer's truth files (config, summary sets, every logged step) and, for what the SDK
adds by itself (timestamps, environment, system metrics, record offsets), `reference.py`.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from mvdata_assets.demo import wait_for_exit
from mvdata_assets.runs.offline import SyncReport, sync_offline
from mvdata_assets.runs.run_files import discover_run_files
from mvdata_assets_tests.runs import reference, truth
from mvdata_assets_tests.runs.conftest import (
    LEGACY_FIXTURE,
    WRITER,
    SdkRun,
    copy_tree_writable,
    place_run_file,
    writer_env,
)
from mvdata_assets_tests.runs.sdk_writer import QUOTE_KEY, SQL_KEY, UNICODE_KEY

BLOCK = reference.BLOCK
# `pow53` (exactly 2^53) is checked in test_wandb_file.test_int_2_pow_53_needs_no_value_json
SEPARATE = {"pow53"}
DUMP_COLUMNS = {
    "runs": "* EXCLUDE (synced_at)",
    "history": "*",
    "config": "*",
    "summary": "*",
    "metadata": "*",
    "system_metrics": "*",
    "_offline_files": "* EXCLUDE (synced_at)",
}


# ---------------------------------------------------------------- helpers


def sync(db: Path, dirs: list[Path], **kwargs) -> SyncReport:
    conn = duckdb.connect(str(db))
    try:
        return sync_offline(conn, dirs, **kwargs)
    finally:
        conn.close()


def _norm(v):
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, list):
        return tuple(v)
    return v


def dump(db: Path | duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    """Every table of the contract (and the watermarks), sorted, without synced_at."""
    conn = duckdb.connect(str(db), read_only=True) if isinstance(db, Path) else db
    try:
        return {
            table: [tuple(_norm(v) for v in row) for row in conn.execute(
                f"SELECT {cols} FROM wandb.{table} ORDER BY ALL"
            ).fetchall()]
            for table, cols in DUMP_COLUMNS.items()
        }  # fmt: skip
    finally:
        if isinstance(db, Path):
            conn.close()


def history(conn: duckdb.DuckDBPyConnection, run_id: str) -> dict[int, dict[str, tuple]]:
    out: dict[int, dict[str, tuple]] = defaultdict(dict)
    for step, key, value, value_json in conn.execute(
        "SELECT step, key, value, value_json FROM wandb.history WHERE run_id = ?", [run_id]
    ).fetchall():
        out[step][key] = (value, value_json)
    return dict(out)


def key_values(conn: duckdb.DuckDBPyConnection, table: str, run_id: str) -> tuple[dict[str, tuple], list[str]]:
    """({key: (value, value_json)}, keys stored more than once)."""
    rows = conn.execute(f"SELECT key, value, value_json FROM wandb.{table} WHERE run_id = ?", [run_id]).fetchall()
    out: dict[str, tuple] = {}
    dups = []
    for key, value, value_json in rows:
        if key in out:
            dups.append(key)
        out[key] = (value, value_json)
    return out, dups


def duplicate_history_keys(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    return conn.execute(
        """SELECT entity, project, run_id, step, key, count(*) FROM wandb.history
           GROUP BY ALL HAVING count(*) > 1 LIMIT 10"""
    ).fetchall()


def assert_history_matches(conn: duckdb.DuckDBPyConnection, run: SdkRun, steps: list[int] | None = None) -> None:
    errors = truth.step_mismatches(
        history(conn, run.run_id), run.truth, steps or sorted(truth.steps(run.truth)), run.name
    )
    assert not errors, "\n".join(errors[:30])


def run_row(conn: duckdb.DuckDBPyConnection, run_id: str) -> dict:
    cur = conn.execute("SELECT * FROM wandb.runs WHERE run_id = ?", [run_id])
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    assert len(rows) == 1, rows
    return dict(zip(names, rows[0], strict=True))


def copy_run(run: SdkRun, folder: Path) -> Path:
    """Copies the whole offline-run-* dir (run file, files/, media) into folder/wandb/."""
    return copy_tree_writable(run.run_dir, folder / "wandb" / run.run_dir.name)


def not_a_fragment_end(ref: reference.RefFile, n: int) -> int:
    """A cut that doesn't end exactly after a FIRST/MIDDLE fragment (that case: see the dedicated tests)."""
    ends = {f.end for f in ref.fragments if f.type in (reference.FIRST, reference.MIDDLE)}
    while n in ends:
        n += 1
    return n


# ---------------------------------------------------------------- one warehouse for the content checks


@pytest.fixture(scope="module")
def warehouse(sdk_runs: dict[str, SdkRun], tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("warehouse")
    legacy = copy_tree_writable(LEGACY_FIXTURE, base / "legacy")
    db = base / "warehouse.duckdb"
    dirs = [sdk_runs[n].out_dir for n in ("edge", "failed", "long")] + [legacy]
    report = sync(db, dirs)
    conn = duckdb.connect(str(db))  # read-write: the re-sync test syncs through it
    yield conn, report, dirs, db
    conn.close()


def test_sync_report(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, report, _, _ = warehouse
    assert report.problems == []
    assert [f.action for f in report.files] == ["new"] * 4
    by_run = {f.run.rsplit("/", 1)[1]: f for f in report.files}
    assert set(by_run) == {sdk_runs[n].run_id for n in ("edge", "failed", "long")} | {"g9dvvkua"}
    states = dict(conn.execute("SELECT run_id, state FROM wandb.runs").fetchall())
    assert (states[sdk_runs["failed"].run_id], states[sdk_runs["edge"].run_id]) == ("failed", "finished")
    logged = sum(len(values) for values in truth.steps(sdk_runs["long"].truth).values())
    assert by_run[sdk_runs["long"].run_id].rows["history"] == logged  # a row per value the SDK logged
    for table in ("runs", "history", "config", "summary", "metadata", "system_metrics"):  # all of it written now
        stored = conn.execute(f"SELECT count(*) FROM wandb.{table}").fetchone()[0]
        assert report.rows[table] == sum(f.rows[table] for f in report.files) == stored, table


@pytest.mark.parametrize("name", ["edge", "failed", "long"])
def test_history_equals_what_was_logged(warehouse, sdk_runs: dict[str, SdkRun], name: str) -> None:
    conn, _, _, _ = warehouse
    assert_history_matches(conn, sdk_runs[name])


def test_no_duplicate_history_rows(warehouse) -> None:
    conn, _, _, _ = warehouse
    assert duplicate_history_keys(conn) == []


def test_system_columns_hold_the_real_step_time_and_run(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    ref_steps = {s.step: s for s in reference.history(reference.read(run.wandb_file))}
    rows = conn.execute(
        "SELECT entity, project, run_id, step, timestamp, runtime_s, key, value FROM wandb.history WHERE run_id = ?",
        [run.run_id],
    ).fetchall()
    assert rows
    for entity, project, run_id, step, ts, runtime_s, key, _ in rows:
        assert (entity, project, run_id) == ("", run.project, run.run_id), key
        ref = ref_steps[step]
        assert abs(ts.timestamp() - ref.timestamp) < 2e-6, (step, key)
        assert runtime_s == ref.runtime, (step, key)
    # metrics named like the system columns are rows of their own, with the real step beside them
    keyed = {(step, key): value for _, _, _, step, _, _, key, value in rows}
    logged = truth.steps(run.truth)
    for step in (0, 5, 100):
        for key in ("step", "run_id", "timestamp", "value", SQL_KEY, QUOTE_KEY, UNICODE_KEY):
            assert keyed[(step, key)] == logged[step][key], (step, key)
        assert logged[step]["step"] != step and logged[step]["run_id"] != run.run_id
    project_json = conn.execute(
        "SELECT value_json FROM wandb.history WHERE run_id = ? AND step = 5 AND key = 'project'", [run.run_id]
    ).fetchone()
    assert json.loads(project_json[0]) == "not-the-project-5"
    # the SQL-looking key was stored as text, never run: the table and the other runs are all there
    assert conn.execute("SELECT count(DISTINCT run_id) FROM wandb.history").fetchone()[0] == 3


def test_sparse_steps_are_exact(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    steps = [s for (s,) in conn.execute(
        "SELECT DISTINCT step FROM wandb.history WHERE run_id = ? ORDER BY step", [run.run_id]
    ).fetchall()]  # fmt: skip
    assert steps == [s for s, _ in run.truth["steps"]] == [0, 5, 17, 100]
    assert sorted(history(conn, run.run_id)[17]) == ["loss", "only_here"]
    # step 5 was logged in two parts (commit=False, then commit): one step with both parts
    assert {"tmp_metric", "loss", "lst"} <= set(history(conn, run.run_id)[5])


def test_media_are_flattened_keys(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    got = history(conn, run.run_id)
    media_steps = [(s, k, v) for s, d in truth.steps(run.truth).items() for k, v in d.items() if truth.is_media(v)]
    assert {s for s, _, _ in media_steps} == {0, 100}
    for step, key, leaf in media_steps:
        assert truth.media_error(got[step], key, leaf) is None
        rel = json.loads(got[step][f"{key}.path"][1])
        assert (run.run_dir / "files" / rel).is_file(), rel


def test_images_are_flattened_keys(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    got = history(conn, sdk_runs["edge"].run_id)
    assert json.loads(got[0]["img._type"][1]) == "image-file"


def test_config_is_exact(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    rows, dups = key_values(conn, "config", run.run_id)
    assert dups == []
    want = truth.config(run.truth)
    assert sum(1 for k in want if k.startswith("c")) >= 1500
    errors = truth.compare(rows, want, "config")
    assert not errors, "\n".join(errors[:30])
    extra = {k for k in set(rows) - set(want) if not k.startswith("_wandb")}
    assert not extra, sorted(extra)
    # the later update replaced optim whole; 2^70 is exact text beside its DOUBLE
    assert "optim.sched.name" not in rows and rows["optim.lr"] == (1e-3, None)
    assert rows["huge"] == (float(2**70), str(2**70))


def test_summary_is_exact(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    rows, _ = key_values(conn, "summary", run.run_id)
    want = truth.summary(run.truth)
    # the `eval` subtree (logged, then set whole) has its own test below
    errors = truth.compare(rows, {k: v for k, v in want.items() if not k.startswith("eval.")}, "summary", SEPARATE)
    assert not errors, "\n".join(errors[:30])
    extra = set(rows) - set(want) - truth.media_subkeys(rows, want) - truth.SYSTEM_SUMMARY_KEYS
    assert not {k for k in extra if not k.startswith("_wandb.")}, sorted(extra)
    assert "tmp_metric" not in rows  # deleted by the run
    assert rows["huge"] == (float(2**70), str(2**70))
    assert rows["_step"] == (100.0, None)


def test_summary_set_whole_replaces_the_logged_subtree(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    """`eval` was logged as {"acc", "deep": {"f1"}} (summary deltas with nested keys eval.acc, eval.deep.f1),
    then set whole with run.summary["eval"] = {...}: one row per key, holding the value set last."""
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    rows, dups = key_values(conn, "summary", run.run_id)
    stored = conn.execute(
        "SELECT key, value FROM wandb.summary WHERE run_id = ? AND key LIKE 'eval.%' ORDER BY ALL", [run.run_id]
    ).fetchall()
    assert dups == [], f"summary keys stored more than once: {dups}: {stored}"
    assert rows["eval.acc"] == (run.truth["summary_sets"]["eval"]["acc"], None)
    assert rows["eval.deep.f1"] == (run.truth["summary_sets"]["eval"]["deep"]["f1"], None)


def test_metadata_has_os_python_host(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    env = reference.environment(reference.read(run.wandb_file))
    rows, dups = key_values(conn, "metadata", run.run_id)
    assert dups == []
    for key in ("os", "python", "host", "program"):
        assert json.loads(rows[key][1]) == getattr(env[0], key), key
    assert run_row(conn, run.run_id)["host"] == env[0].host


def test_metadata_numbers_are_values(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    """cpu_count, memory.total, disk./.total are numbers in the environment record: `value` holds them."""
    conn, _, _, _ = warehouse
    run = sdk_runs["edge"]
    env = [e for e in reference.environment(reference.read(run.wandb_file)) if e.cpu_count]
    assert env, "the SDK wrote no hardware environment record"
    hw = env[0]
    want = {"cpu_count": hw.cpu_count, "memory.total": hw.memory.total}
    for mount, disk in hw.disk.items():
        want[f"disk.{mount}.total"] = disk.total
        want[f"disk.{mount}.used"] = disk.used
    rows, _ = key_values(conn, "metadata", run.run_id)
    errors = truth.compare(rows, want, "metadata")
    assert not errors, "\n".join(errors)


def test_system_metrics_match_the_file(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    for name in ("edge", "long"):
        run = sdk_runs[name]
        want = sorted((round(t, 6), k, json.loads(v)) for t, k, v in reference.stats(reference.read(run.wandb_file)))
        assert want
        got = sorted(
            (round(ts.timestamp(), 6), key, value)
            for ts, key, value in conn.execute(
                "SELECT timestamp, key, value FROM wandb.system_metrics WHERE run_id = ?", [run.run_id]
            ).fetchall()
        )
        assert got == want


def test_runs_rows(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    conn, _, _, _ = warehouse
    edge = sdk_runs["edge"]
    row = run_row(conn, edge.run_id)
    ref = reference.read(edge.wandb_file)
    start = reference.run_record(ref).start_time
    count = conn.execute("SELECT count(*) FROM wandb.history WHERE run_id = ?", [edge.run_id]).fetchone()[0]
    assert row["state"] == "finished" and row["exit_code"] == 0 and row["source"] == "offline"
    assert row["last_step"] == 100
    assert row["history_rows"] == count == sum(len(s.items) for s in reference.history(ref))
    assert row["display_name"] == edge.truth["display_name"]
    assert row["project"] == edge.project and row["entity"] == ""
    assert row["created_at"] == datetime.fromtimestamp(start.seconds + start.nanos / 1e9, tz=UTC)
    assert row["source_path"] == str(edge.wandb_file.resolve())
    assert row["read_problem"] is None
    failed = run_row(conn, sdk_runs["failed"].run_id)
    assert (failed["state"], failed["exit_code"]) == ("failed", 1)
    long = run_row(conn, sdk_runs["long"].run_id)
    assert (long["state"], long["last_step"], long["history_rows"]) == ("finished", 4999, 40000)


def test_legacy_2021_run(warehouse) -> None:
    conn, _, dirs, _ = warehouse
    legacy = dirs[-1]
    meta_file = next(legacy.glob("offline-run-*/files/wandb-metadata.json"))
    want = truth.flat(json.loads(meta_file.read_text()))
    rows, dups = key_values(conn, "metadata", "g9dvvkua")
    assert dups == []
    errors = truth.compare(rows, want, "legacy metadata")
    assert not errors, "\n".join(errors)
    assert json.loads(rows["host"][1]) == "cvp" and json.loads(rows["username"][1]) == "vanpelt"
    row = run_row(conn, "g9dvvkua")
    assert (row["project"], row["host"], row["user"], row["state"]) == ("code-toad", "cvp", "vanpelt", "finished")
    ref = reference.read(next(legacy.glob("offline-run-*/run-g9dvvkua.wandb")))
    metrics = dict(conn.execute("SELECT key, value FROM wandb.system_metrics WHERE run_id = 'g9dvvkua'").fetchall())
    want_metrics = truth.flat({k: json.loads(v) for _, k, v in reference.stats(ref)})
    assert metrics == want_metrics


# ---------------------------------------------------------------- re-syncing


def test_resync_with_nothing_changed_reads_nothing(warehouse) -> None:
    conn, _, dirs, _ = warehouse
    before = dump(conn)
    generation = conn.execute("SELECT generation FROM wandb._generation").fetchall()
    report = sync_offline(conn, dirs)
    assert [f.action for f in report.files] == ["unchanged"] * 4
    assert report.bytes_read == 0 and report.marked_crashed == 0
    assert dump(conn) == before
    assert conn.execute("SELECT generation FROM wandb._generation").fetchall() == generation


def test_force_refresh_gives_the_same_tables(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    db = tmp_path / "w.duckdb"
    dirs = [sdk_runs[n].out_dir for n in ("edge", "failed")]
    sync(db, dirs)
    before = dump(db)
    report = sync(db, dirs, force_refresh=True)
    assert [f.action for f in report.files] == ["refreshed"] * 2
    assert dump(db) == before
    conn = duckdb.connect(str(db), read_only=True)
    assert duplicate_history_keys(conn) == []
    conn.close()


# ---------------------------------------------------------------- killed and growing runs


def test_killed_run_is_a_prefix_and_crashed(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["killed"]
    report = sync(tmp_path / "a.duckdb", [run.out_dir], running_window_s=0)
    assert report.problems == []
    conn = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    row = run_row(conn, run.run_id)
    assert row["state"] == "crashed" and row["exit_code"] is None
    got = history(conn, run.run_id)
    logged = [s for s, _ in run.truth["steps"]]
    k = len(got)
    assert k > 0 and sorted(got) == logged[:k]
    assert_history_matches(conn, run, logged[:k])
    conn.close()
    # within the running window it is still "running"
    assert sync(tmp_path / "b.duckdb", [run.out_dir], running_window_s=3600).marked_crashed == 0
    with duckdb.connect(str(tmp_path / "b.duckdb"), read_only=True) as conn:
        assert run_row(conn, run.run_id)["state"] == "running"
    # the next sync with a window its file has been quiet for marks it crashed, without reading it again
    report = sync(tmp_path / "b.duckdb", [run.out_dir], running_window_s=0)
    assert report.marked_crashed == 1 and report.bytes_read == 0
    with duckdb.connect(str(tmp_path / "b.duckdb"), read_only=True) as conn:
        assert run_row(conn, run.run_id)["state"] == "crashed"


def test_growing_file_ends_like_one_clean_sync(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["long"]
    data = run.wandb_file.read_bytes()
    ref = reference.read(run.wandb_file)
    ref_steps = reference.history(ref)
    rng = random.Random(4242)
    cuts = sorted(not_a_fragment_end(ref, rng.randrange(64, len(data))) for _ in range(5))
    cuts[0] = not_a_fragment_end(ref, rng.randrange(200, 4096))  # inside the fingerprinted head
    folder = tmp_path / "grow"
    path = place_run_file(folder, b"", run.run_id)
    db = tmp_path / "grow.duckdb"
    previous = 0
    for n in [*cuts, len(data)]:
        with path.open("ab") as f:
            f.write(data[previous:n])
        report = sync(db, [folder])
        (outcome,) = report.files
        assert outcome.problem is None or n < 500, outcome.problem
        if previous >= 4096:
            assert outcome.action == "grown", (n, outcome)
            assert outcome.bytes_read < n - previous + BLOCK, (n, outcome)
        conn = duckdb.connect(str(db), read_only=True)
        assert duplicate_history_keys(conn) == []
        whole = [s.step for s in ref_steps if s.end <= n]
        if whole:
            assert_history_matches(conn, run, whole)
        conn.close()
        previous = n
    clean = tmp_path / "clean.duckdb"
    sync(clean, [folder])
    assert dump(db) == dump(clean)


def test_growing_file_in_live_sized_steps(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    """While a run is live the SDK writes whole 32 KiB blocks, so a live file's size is a multiple of 32 KiB
    and its last record is usually cut right after its FIRST fragment. Syncing such snapshots must work."""
    run = sdk_runs["long"]
    data = run.wandb_file.read_bytes()
    ref = reference.read(run.wandb_file)
    first_ends = {f.end for f in ref.fragments if f.type == reference.FIRST}
    sizes = [n for n in range(BLOCK, len(data), BLOCK)][:4] + [len(data)]
    assert any(n in first_ends for n in sizes), "no snapshot ends after a FIRST fragment"
    folder = tmp_path / "live"
    path = place_run_file(folder, b"", run.run_id)
    db = tmp_path / "live.duckdb"
    errors = []
    previous = 0
    for n in sizes:
        with path.open("ab") as f:
            f.write(data[previous:n])
        previous = n
        try:
            sync(db, [folder])
        except BaseException as exc:  # noqa: BLE001 - report every snapshot, a MemoryError included
            errors.append(f"sync of a {n}-byte live snapshot raised {type(exc).__name__}: {exc}")
            continue
    assert not errors, "\n".join(errors)
    clean = tmp_path / "clean.duckdb"
    sync(clean, [folder])
    assert dump(db) == dump(clean)


def test_replaced_file_is_read_again_whole(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    long, failed = sdk_runs["long"], sdk_runs["failed"]
    folder = tmp_path / "f"
    path = place_run_file(folder, long.wandb_file.read_bytes(), long.run_id)
    db = tmp_path / "w.duckdb"
    sync(db, [folder])
    path.write_bytes(failed.wandb_file.read_bytes())  # another run now lives at this path
    report = sync(db, [folder])
    assert [f.action for f in report.files] == ["replaced"]
    conn = duckdb.connect(str(db), read_only=True)
    for table in ("runs", "history", "config", "summary", "metadata", "system_metrics"):
        left = conn.execute(f"SELECT count(*) FROM wandb.{table} WHERE run_id = ?", [long.run_id]).fetchone()[0]
        assert left == 0, f"{table} still holds the replaced run"
    assert_history_matches(conn, failed)
    conn.close()
    clean = tmp_path / "clean.duckdb"
    sync(clean, [folder])
    assert dump(db) == dump(clean)


def test_shrunk_file_is_read_again_whole(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["long"]
    data = run.wandb_file.read_bytes()
    ref = reference.read(run.wandb_file)
    folder = tmp_path / "f"
    path = place_run_file(folder, data, run.run_id)
    db = tmp_path / "w.duckdb"
    sync(db, [folder])
    n = not_a_fragment_end(ref, random.Random(5).randrange(len(data) // 4, len(data) // 2))
    path.write_bytes(data[:n])
    report = sync(db, [folder])
    assert [f.action for f in report.files] == ["replaced"]
    conn = duckdb.connect(str(db), read_only=True)
    whole = [s.step for s in reference.history(ref) if s.end <= n]
    assert_history_matches(conn, run, whole)
    assert run_row(conn, run.run_id)["last_step"] == whole[-1]
    conn.close()
    clean = tmp_path / "clean.duckdb"
    sync(clean, [folder])
    assert dump(db) == dump(clean)


# ---------------------------------------------------------------- bad input beside good runs


def test_bad_files_are_reported_and_good_runs_stored(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    folder = tmp_path / "mixed"
    edge, failed, long2 = sdk_runs["edge"], sdk_runs["failed"], sdk_runs["long2"]
    copy_run(edge, folder)
    copy_run(failed, folder)
    empty = place_run_file(folder, b"", "emptyrun", tag="empty")
    garbage = place_run_file(folder, random.Random(3).randbytes(5000), "garbage1", tag="garbage")
    data = bytearray(long2.wandb_file.read_bytes())
    ref = reference.read(long2.wandb_file)
    frag = next(f for f in ref.fragments if f.offset > len(data) // 2)
    data[frag.offset + 9] ^= 0x40
    flipped = place_run_file(folder, bytes(data), long2.run_id, tag="flipped")
    db = tmp_path / "w.duckdb"
    report = sync(db, [folder])
    assert len(discover_run_files([folder])) == 5
    problems = report.problems
    assert len(problems) == 3, problems
    for bad in (empty, garbage, flipped):
        assert sum(str(bad.resolve()) in p for p in problems) == 1, (bad, problems)
    assert any(f"offset {frag.offset}" in p for p in problems), problems
    conn = duckdb.connect(str(db), read_only=True)
    assert_history_matches(conn, edge)
    assert_history_matches(conn, failed)
    record_start = next(r.start for r in ref.records if frag in r.fragments)
    kept = [s.step for s in reference.history(ref) if s.end <= record_start]
    assert_history_matches(conn, long2, kept)
    assert str(flipped.resolve()) in run_row(conn, long2.run_id)["read_problem"]
    assert duplicate_history_keys(conn) == []
    conn.close()
    again = sync(db, [folder])
    assert {f.action for f in again.files} == {"unchanged"} and again.bytes_read == 0


def test_second_file_of_the_same_run_is_skipped(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["failed"]
    first = place_run_file(tmp_path / "a", run.wandb_file.read_bytes(), run.run_id, tag="a")
    second = place_run_file(tmp_path / "a", run.wandb_file.read_bytes(), run.run_id, tag="b")
    db = tmp_path / "w.duckdb"
    report = sync(db, [tmp_path / "a"])
    actions = {Path(f.path): f for f in report.files}
    assert actions[first.resolve()].action == "new"
    assert actions[second.resolve()].action == "skipped"
    assert str(second.resolve()) in actions[second.resolve()].problem
    conn = duckdb.connect(str(db), read_only=True)
    assert_history_matches(conn, run)
    assert duplicate_history_keys(conn) == []
    conn.close()


# ---------------------------------------------------------------- a sync killed part-way

SYNC_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import duckdb
    from mvdata_assets.runs import offline

    plain = offline._store_file

    def reported(*args):  # says when each file's transaction has committed, so the test can kill in between
        outcome = plain(*args)
        print("committed", flush=True)
        return outcome

    offline._store_file = reported
    sync_offline = offline.sync_offline
    conn = duckdb.connect(sys.argv[1])
    print("ready", flush=True)
    started = time.monotonic()
    sync_offline(conn, [Path(p) for p in sys.argv[2:]])
    conn.close()
    print("done", time.monotonic() - started, flush=True)
    """
)


def _start_sync(db: Path, dirs: list[Path]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SYNC_SCRIPT, str(db), *map(str, dirs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_sync_killed_part_way_then_resumed_equals_a_clean_sync(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    dirs = [sdk_runs[n].out_dir for n in ("long", "long2", "long3", "edge", "failed")]
    clean = tmp_path / "clean.duckdb"
    proc = _start_sync(clean, dirs)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    duration = float(out.split()[-1])
    want = dump(clean)
    conn = duckdb.connect(str(clean), read_only=True)
    per_run = dict(conn.execute("SELECT run_id, count(*) FROM wandb.history GROUP BY run_id").fetchall())
    conn.close()
    assert len(per_run) == len(dirs)
    db = tmp_path / "killed.duckdb"
    rng = random.Random(31337)
    killed_mid_sync, stored_after_kill = 0, []
    for _ in range(3):
        proc = _start_sync(db, dirs)
        line = ""
        while line.strip() != "committed" and not line.startswith("done") and proc.poll() is None:
            line = proc.stdout.readline()  # one more file committed in each round, then a kill inside the next one
        time.sleep(rng.uniform(0, 0.5) * duration / len(dirs))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_sync += 1
        proc.communicate(timeout=60)
        # whatever was committed is whole: each stored run has all its rows, none twice
        conn = duckdb.connect(str(db), read_only=True)
        assert duplicate_history_keys(conn) == []
        stored = conn.execute(
            "SELECT r.run_id, (SELECT count(*) FROM wandb.history h WHERE h.run_id = r.run_id) FROM wandb.runs r"
        ).fetchall()
        for run_id, rows in stored:
            assert rows == per_run[run_id], f"run {run_id}: {rows} of {per_run[run_id]} history rows after a kill"
        orphans = conn.execute(
            "SELECT count(*) FROM wandb.history WHERE run_id NOT IN (SELECT run_id FROM wandb.runs)"
        ).fetchone()[0]
        assert orphans == 0
        stored_after_kill.append(len(stored))
        conn.close()
    print("kills during sync:", killed_mid_sync, "runs stored after each round:", stored_after_kill)
    assert killed_mid_sync >= 1, "no kill landed during a sync"
    assert any(0 < n < len(dirs) for n in stored_after_kill), f"no kill left some runs stored: {stored_after_kill}"
    report = sync(db, dirs)
    assert report.problems == []
    assert dump(db) == want


def test_live_run_synced_while_written_then_after_more_steps(tmp_path: Path) -> None:
    """A run still being written by the SDK is stored as far as it is written, then completed, once each."""
    out = tmp_path / "live"
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), str(out), "live", "5"], env=writer_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "paused").exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the live writer never paused"
            time.sleep(0.05)
        db = tmp_path / "live.duckdb"
        while True:  # the SDK writes whole 32 KiB blocks while live: sync until some steps are there
            first = sync(db, [out], running_window_s=300)
            with duckdb.connect(str(db), read_only=True) as conn:
                row = conn.execute("SELECT state, last_step, history_rows FROM wandb.runs").fetchone()
            if row and row[2]:
                break
            assert time.monotonic() < deadline, "nothing of the live run became readable"
            time.sleep(0.2)
        assert row[0] == "running"
        assert 0 <= row[1] <= 2999  # what was logged so far (or part of it), nothing from after the pause
        (out / "continue").touch()
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr.decode(errors="replace")[-2000:]
    finally:
        if writer.poll() is None:
            writer.kill()
    run_truth = json.loads((out / "truth-live.json").read_text())
    wait_for_exit(run_truth["sidecar_pids"])
    second = sync(db, [out], running_window_s=300)
    assert [f.action for f in first.files] in (["new"], ["grown"])
    assert [f.action for f in second.files] == ["grown"]
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert 0 < second.files[0].bytes_read < run_file.stat().st_size  # only what was appended
    run = SdkRun("live", out, run_file.parent, run_file, run_truth)
    with duckdb.connect(str(db), read_only=True) as conn:
        assert_history_matches(conn, run)
        assert duplicate_history_keys(conn) == []
        assert run_row(conn, run.run_id)["state"] == "finished"
    clean = tmp_path / "clean.duckdb"
    sync(clean, [out])
    assert dump(db) == dump(clean)


def test_a_sync_killed_after_a_commit_still_moves_the_exports(
    tmp_path: Path, sdk_runs: dict[str, SdkRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generation moves in the transaction that stores a file: nothing committed is ever left unexported."""
    from mvdata_assets.runs import exports, offline

    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    sync_offline(conn, [sdk_runs["long"].out_dir])
    assert [e.rewritten for e in exports.export_group(conn, tmp_path / "exports", "metadata")][0]

    def killed(*args: object) -> int:
        raise KeyboardInterrupt  # after the new file's rows and watermark committed, before the sync ends

    monkeypatch.setattr(offline, "_expire_running", killed)
    with pytest.raises(KeyboardInterrupt):
        sync_offline(conn, [sdk_runs["long"].out_dir, sdk_runs["long2"].out_dir])
    monkeypatch.undo()
    assert sync_offline(conn, [sdk_runs["long"].out_dir, sdk_runs["long2"].out_dir]).count("unchanged") == 2
    written = exports.export_group(conn, tmp_path / "exports", "metadata")
    assert written[0].rewritten and written[0].rows == 2  # the exports catch up with the run the killed sync stored


def test_a_copy_of_a_run_folder_is_not_a_resumed_segment(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    """Same run id, same head: a copy (synced once); a resumed run's segments differ from their first bytes."""
    run = sdk_runs["long"]
    copy_run(run, tmp_path / "elsewhere")
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    report = sync_offline(conn, [run.out_dir, tmp_path / "elsewhere"])
    assert sorted(f.action for f in report.files) == ["new", "skipped"]
    assert "is already synced from" in next(f.problem for f in report.files if f.action == "skipped")
    alone = duckdb.connect(str(tmp_path / "alone.duckdb"))
    sync_offline(alone, [run.out_dir])
    history = "SELECT run_id, step, key, CAST(value AS VARCHAR), value_json FROM wandb.history ORDER BY ALL"
    assert conn.execute(history).fetchall() == alone.execute(history).fetchall()  # no step read twice or shifted
    assert conn.execute("SELECT count(*) FROM wandb.runs").fetchone() == (1,)

"""The W&B API source against the W&B-compatible server on loopback, through the real SDK (and its wandb-core)."""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
import wandb
from dagster import DagsterInstance, build_sensor_context, materialize

from mvdata_assets.resources import WandbResource, project_resources
from mvdata_assets.runs import api, wandb_api
from mvdata_assets.runs.api import ApiFilters, sync_api
from mvdata_assets.runs.assets import wandb_assets
from mvdata_assets.runs.sensors import wandb_api_runs
from mvdata_assets.runs.values import leaf_paths, split_value
from mvdata_assets.runs.wandb_api import DOCUMENTS, ApiSourceError, Client
from mvdata_assets.settings import load_settings
from mvdata_assets_tests.runs.wandb_server import API_KEY, WandbServer, check_document

E = "mvlm"
BASE = datetime(2025, 3, 1, 12, 0, 0)
UNICODE_KEY = "损失/ünï ✓"
QUOTE_KEY = 'it\'s "quoted"'
SQL_KEY = "x'); DROP TABLE wandb.runs; --"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WandbServer]:
    with WandbServer() as server:
        yield server
        assert not server.invalid_documents, server.invalid_documents  # nothing W&B would refuse was sent


@pytest.fixture
def sdk(server: WandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WandbServer:
    """The SDK in this process pointed at the server only (HOME, config and cache under tmp_path)."""
    for name, value in server.sdk_env(tmp_path / "sdk").items():
        monkeypatch.setenv(name, value)
    return server


def history(seed: int, steps: int) -> list[dict[str, Any]]:
    """Rows as a training script logs them: sparse eval keys, a nested dict, NaN / ±Inf, big ints, strings."""
    rng = random.Random(seed)
    rows = []
    for step in range(steps):
        row: dict[str, Any] = {
            "_step": step,
            "_timestamp": 1.74e9 + step * 0.5,
            "_runtime": step * 0.5,
            "train/loss": 4.0 * math.exp(-step / 300) + rng.random() * 0.01,
            "train/tokens": 2**53 + step * 7,  # beyond what a DOUBLE holds exactly
            UNICODE_KEY: rng.random(),
            QUOTE_KEY: step * 2.0,
            SQL_KEY: -step,
            "grad": {"norm": rng.random(), "clip": step % 2 == 0},
        }
        if step % 97 == 0:
            row["train/loss"] = float("nan")
        if step == 13:
            row[UNICODE_KEY] = float("inf")
        if step % 50 == 49:
            row["eval/vqav2_acc"] = step / steps
            row["eval/split"] = f"val-{step}"
        rows.append(row)
    return rows


def expected_rows(rows: list[dict[str, Any]]) -> dict[tuple[int, str], tuple[float | None, str | None]]:
    out = {}
    for row in rows:
        for name, item in row.items():
            if name in ("_step", "_timestamp", "_runtime"):
                continue
            for path, leaf in leaf_paths(item, (name,)):
                out[(row["_step"], ".".join(path))] = split_value(leaf)
    return out


def stored_rows(conn: duckdb.DuckDBPyConnection, run_id: str) -> dict[tuple[int, str], tuple[float | None, str | None]]:
    rows = conn.execute("SELECT step, key, value, value_json FROM wandb.history WHERE run_id = ?", [run_id]).fetchall()
    got = {(step, key): (value, value_json) for step, key, value, value_json in rows}
    assert len(got) == len(rows), "a (run, step, key) stored twice"
    return got


def same(a: tuple, b: tuple) -> bool:
    return all(
        (x is None and y is None) or x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x)
                                                and math.isnan(y))
        for x, y in zip(a, b, strict=True)
    )  # fmt: skip


def mismatches(expected: dict, got: dict) -> list[str]:
    problems = [f"missing {k}" for k in expected.keys() - got.keys()]
    problems += [f"extra {k}" for k in got.keys() - expected.keys()]
    problems += [f"{k}: {got[k]} != {v}" for k, v in expected.items() if k in got and not same(v, got[k])]
    return problems[:10]


def add_project(server: WandbServer, project: str, runs: int = 4, steps: int = 600) -> dict[str, list[dict]]:
    logged = {}
    for i in range(runs):
        rows = history(i, steps)
        logged[f"run{i}"] = rows
        server.add_run(
            E, project, f"run{i}",
            name=f"siglip-{i}", state=["finished", "running", "crashed", "preempted"][i % 4],
            created_at=BASE + timedelta(hours=i), heartbeat_at=BASE + timedelta(hours=i, minutes=40),
            tags=["demo", f"t{i % 2}"], group="siglip", job_type="pretrain", user="ana", host=f"gpu{i}",
            notes=f"run {i} ✓", config={"optim": {"lr": 10**-i, "betas": [0.9, 0.95]}, "huge": 2**70, UNICODE_KEY: "✓"},
            summary={"train/loss": rows[-1]["train/loss"], "best": {"acc": 0.5 + i / 10}, "_runtime": steps * 0.5},
            system_metrics={"system.gpu.0.gpu": 40.0 + i, "_timestamp": 1.74e9 + 100},
            metadata={"host": f"gpu{i}", "os": "Linux", "python": "3.11"},
            history=rows, exported_steps=steps - 37 * (i + 1),  # each run has a live tail past its exports
        )  # fmt: skip
    return logged


def test_a_project_lands_exactly(sdk: WandbServer, tmp_path: Path) -> None:
    logged = add_project(sdk, "p")
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    report = sync_api(conn, [f"{E}/p"])
    assert not report.problems and report.count("new") == 4
    for run_id, rows in logged.items():
        assert not mismatches(expected_rows(rows), stored_rows(conn, run_id)), run_id
    runs = {row[0]: row[1:] for row in conn.execute(
        """SELECT run_id, display_name, state, created_at, heartbeat_at, tags, "group", job_type, "user", host, notes,
                  source, last_step, history_rows, runtime_s, url FROM wandb.runs""").fetchall()}  # fmt: skip
    assert runs["run3"][:11] == ("siglip-3", "preempted", (BASE + timedelta(hours=3)).replace(tzinfo=UTC),
                                 (BASE + timedelta(hours=3, minutes=40)).replace(tzinfo=UTC), ["demo", "t1"], "siglip",
                                 "pretrain", "ana", "gpu3", "run 3 ✓", "api")  # fmt: skip
    assert runs["run3"][11:14] == (599, len(expected_rows(logged["run3"])), 300.0)
    assert runs["run3"][14] == f"{sdk.url}/{E}/p/runs/run3"
    query = "SELECT key, coalesce(value_json, value::VARCHAR) FROM wandb.config WHERE run_id = 'run2'"
    config = dict(conn.execute(query).fetchall())
    assert config == {"optim.lr": "0.01", "optim.betas": "[0.9,0.95]", "huge": str(2**70), UNICODE_KEY: '"✓"'}
    summary = dict(conn.execute("SELECT key, value FROM wandb.summary WHERE run_id = 'run1'").fetchall())
    assert summary == {"train/loss": logged["run1"][-1]["train/loss"], "best.acc": 0.6}
    metadata = dict(conn.execute("SELECT key, value_json FROM wandb.metadata WHERE run_id = 'run0'").fetchall())
    assert metadata == {"host": '"gpu0"', "os": '"Linux"', "python": '"3.11"'}
    assert [r.status for r in sdk.requests("file")] == [200] * 4  # File.url, with the key W&B asks for
    system = conn.execute("SELECT key, value, timestamp FROM wandb.system_metrics WHERE run_id = 'run1'").fetchall()
    assert system == [("system.gpu.0.gpu", 41.0, datetime.fromtimestamp(1.74e9 + 100, UTC))]


def test_a_resync_asks_only_for_what_changed(sdk: WandbServer, tmp_path: Path) -> None:
    logged = add_project(sdk, "incr", runs=12, steps=300)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    sync_api(conn, [f"{E}/incr"])
    sdk.clear_requests()
    report = sync_api(conn, [f"{E}/incr"])
    assert report.count("unchanged") == len(report.runs) == 12
    assert sdk.graphql_ops() == ["Viewer", "Runs"] and sdk.count("parquet") == 0  # no history request at all

    grown = ["run1", "run4", "run7", "run8", "run11"]
    for run_id in grown:
        more = [{"_step": 300 + k, "train/loss": 0.5 + k, "new_key": k} for k in range(1000)]
        sdk.append_history(E, "incr", run_id, more)
        logged[run_id] += more
    sdk.update_run(E, "incr", "run2", tags=["best"], config={"optim": {"lr": 0.5}}, summary={"final": 1.0})
    sdk.delete_run(E, "incr", "run5")
    sdk.clear_requests()
    report = sync_api(conn, [f"{E}/incr"])
    assert {r.key[2] for r in report.runs if r.status == "updated"} == {*grown, "run2"}
    assert [r.key[2] for r in report.runs if r.status == "deleted"] == ["run5"]
    pages = sdk.requests("HistoryPage")
    assert sorted(p.run for p in pages) == sorted(grown)  # only those runs' new steps travel
    assert all(p.variables["minStep"] == 300 and p.variables["maxStep"] == 1300 for p in pages)
    assert sdk.count("parquet") == 0 and sdk.count("RunFiles") == 0
    for run_id in grown:
        assert not mismatches(expected_rows(logged[run_id]), stored_rows(conn, run_id)), run_id
    assert conn.execute("SELECT tags, state FROM wandb.runs WHERE run_id = 'run2'").fetchone() == (["best"], "crashed")
    assert dict(conn.execute("SELECT key, value FROM wandb.config WHERE run_id = 'run2'").fetchall()) == {
        "optim.lr": 0.5
    }
    assert conn.execute("SELECT key, value FROM wandb.summary WHERE run_id = 'run2'").fetchall() == [("final", 1.0)]
    deleted = conn.execute("SELECT state, history_rows FROM wandb.runs WHERE run_id = 'run5'").fetchone()
    assert deleted[0] == "deleted" and deleted[1] == len(stored_rows(conn, "run5")) > 0  # marked, data kept

    sdk.clear_requests()
    before = conn.execute("SELECT count(*) FROM wandb.history").fetchone()[0]
    report = sync_api(conn, [f"{E}/incr"], force_refresh=True)
    assert report.count("new") == 11 and conn.execute("SELECT count(*) FROM wandb.history").fetchone()[0] == before
    assert sdk.count("RunParquetHistory") == 11


def test_sweeps_are_fetched_once_and_again_when_their_runs_change(sdk: WandbServer, tmp_path: Path) -> None:
    sweep_config = {"method": "grid", "metric": {"name": "loss", "goal": "minimize"},
                    "parameters": {"lr": {"values": [0.1, 0.01]}, "note": {"value": "a: b"}}}  # fmt: skip
    sdk.add_sweep(E, "sweeps", "sw1", name="lr sweep", state="RUNNING", config=sweep_config)
    for i in range(3):
        sdk.add_run(E, "sweeps", f"s{i}", sweep="sw1", state="running", config={"lr": i}, history=history(i, 20))
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    sync_api(conn, [f"{E}/sweeps"])
    row = conn.execute("SELECT sweep_id, name, state, config FROM wandb.sweeps").fetchone()
    assert row[:3] == ("sw1", "lr sweep", "RUNNING") and json.loads(row[3]) == sweep_config  # W&B's YAML, parsed
    assert conn.execute("SELECT DISTINCT sweep_id FROM wandb.runs").fetchall() == [("sw1",)]
    sdk.clear_requests()
    sync_api(conn, [f"{E}/sweeps"])
    assert sdk.count("Sweep") == 0
    sdk.add_sweep(E, "sweeps", "sw1", name="lr sweep", state="FINISHED", config={"method": "grid", "metric": "loss"})
    sdk.update_run(E, "sweeps", "s2", state="finished")
    sync_api(conn, [f"{E}/sweeps"])
    assert sdk.count("Sweep") == 1
    assert conn.execute("SELECT state FROM wandb.sweeps").fetchone() == ("FINISHED",)


def test_faults_are_retried_or_reported_per_run(sdk: WandbServer, tmp_path: Path) -> None:
    logged = add_project(sdk, "faults", runs=4, steps=200)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    limited = sdk.fault(op="Runs", status=429, retry_after=1, times=1)
    slow = sdk.fault(op="RunParquetHistory", run="run1", status=500, times=1)
    broken = sdk.fault(op="RunParquetHistory", run="run2", malformed=True, times=None)
    report = sync_api(conn, [f"{E}/faults"])
    assert limited.hits == 1 and slow.hits == 1 and broken.hits >= 1  # the 429 and the 500 were retried through
    assert {r.key[2]: r.status for r in report.runs} == {"run0": "new", "run1": "new", "run2": "failed",
                                                          "run3": "new"}  # fmt: skip
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{E}/faults/run2: ")
    assert not mismatches(expected_rows(logged["run1"]), stored_rows(conn, "run1"))
    assert conn.execute("SELECT count(*) FROM wandb.history WHERE run_id = 'run2'").fetchone()[0] == 0
    sdk.clear_faults()
    report = sync_api(conn, [f"{E}/faults"])  # the failed run was not recorded as synced: it comes next time
    assert {r.key[2] for r in report.runs if r.status == "new"} == {"run2"}
    assert not mismatches(expected_rows(logged["run2"]), stored_rows(conn, "run2"))
    sdk.fault(op="RunParquetHistory", run="run0", malformed=True, times=None)
    report = sync_api(conn, [f"{E}/faults"], force_refresh=True)
    assert {r.key[2] for r in report.runs if r.status == "failed"} == {"run0"}
    assert not mismatches(expected_rows(logged["run0"]), stored_rows(conn, "run0"))  # a failed refresh loses nothing
    sdk.clear_faults()


@pytest.mark.parametrize("path", ["vqa-sweep", f"{E}/", "/vqa-sweep"])
def test_a_project_that_is_not_entity_slash_project_is_named(tmp_path: Path, path: str) -> None:
    """load_settings takes MVDATA_WANDB_PROJECTS as given; the sync refuses a bad entry before any request."""
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    with pytest.raises(ApiSourceError, match=f"^MVDATA_WANDB_PROJECTS: '{re.escape(path)}' is not entity/project$"):
        sync_api(conn, [path], client_factory=object)
    conn.close()


def test_filters_and_a_bad_key(sdk: WandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_project(sdk, "filtered", runs=4, steps=50)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    report = sync_api(conn, [f"{E}/filtered"], filters=ApiFilters(states=("finished", "crashed")))
    assert sorted(r.key[2] for r in report.runs) == ["run0", "run2"]
    report = sync_api(conn, [f"{E}/filtered"], filters=ApiFilters(tags=("t1",)))
    assert sorted(r.key[2] for r in report.runs) == ["run1", "run3"]
    assert not report.count("deleted")  # runs the filter leaves out are not taken for deleted
    report = sync_api(conn, [f"{E}/filtered"], filters=ApiFilters(created_since="2025-03-01T14:00:00"))
    assert sorted(r.key[2] for r in report.runs) == ["run2", "run3"]
    with pytest.raises(ApiSourceError, match=f"{E}/nothing-here was not found"):
        sync_api(conn, [f"{E}/nothing-here"])

    wrong = "w" * 40
    monkeypatch.setenv("WANDB_API_KEY", wrong)
    with pytest.raises(ApiSourceError) as error:
        sync_api(conn, [f"{E}/filtered"])
    assert "login" in str(error.value) and sdk.url in str(error.value) and wrong not in str(error.value)
    assert conn.execute("SELECT count(*) FROM wandb.runs").fetchone()[0] == 4  # what was stored stays
    conn.close()
    assert API_KEY.encode() not in (tmp_path / "w.duckdb").read_bytes()


def test_both_sources_side_by_side_in_dagster(
    sdk: WandbServer, sdk_runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_project(sdk, "side", runs=2, steps=120)
    monkeypatch.setenv("MVDATA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MVDATA_WANDB_PROJECTS", f"{E}/side")
    monkeypatch.setenv("MVDATA_WANDB_OFFLINE_DIRS", str(sdk_runs["long"].out_dir))
    result = materialize(
        wandb_assets, resources=project_resources(load_settings()), instance=DagsterInstance.ephemeral()
    )
    assert result.success
    history = next(m.metadata for m in result.asset_materializations_for_node("wandb_tables")
                   if m.asset_key.to_user_string() == "wandb/history")  # fmt: skip
    assert history["runs_new"].value == 3 and history["api_requests_for_runs"].value >= 4
    with duckdb.connect(str(tmp_path / "home" / "warehouse.duckdb"), read_only=True) as conn:
        sources = conn.execute("SELECT source, count(*) FROM wandb.runs GROUP BY source ORDER BY source").fetchall()
        board = conn.execute("SELECT count(*) FROM wandb.leaderboard").fetchone()[0]
    assert sources == [("api", 2), ("offline", 1)] and board == 3
    exported = pq.read_table(tmp_path / "home" / "exports" / "runs_metadata.parquet").to_pylist()
    assert sorted(row["run_id"] for row in exported) == sorted(["run0", "run1", sdk_runs["long"].run_id])


def tick(instance: DagsterInstance, cursor: str | None) -> tuple[list, str | None, str | None]:
    resources = {"wandb": WandbResource.from_settings(load_settings())}
    result = wandb_api_runs(build_sensor_context(instance=instance, cursor=cursor, resources=resources))
    return result.run_requests or [], result.cursor, result.skip_reason and result.skip_reason.skip_message


def test_the_api_sensor_asks_once_per_change(sdk: WandbServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk.add_run(E, "watched", "done", state="finished", created_at=BASE, heartbeat_at=BASE + timedelta(hours=1),
                history=history(0, 30))  # fmt: skip
    sdk.add_run(E, "watched", "live", state="running", created_at=BASE + timedelta(hours=2),
                heartbeat_at=BASE + timedelta(hours=3), history=history(1, 30))  # fmt: skip
    monkeypatch.setenv("MVDATA_WANDB_PROJECTS", f"{E}/watched")
    instance = DagsterInstance.ephemeral()
    first, cursor, _ = tick(instance, None)
    assert len(first) == 1 and first[0].tags["mvdata/new_api_runs"] == "2"
    sdk.clear_requests()
    nothing, cursor, skip = tick(instance, cursor)
    assert not nothing and "no run new or changed" in skip
    assert sdk.graphql_ops() == ["Viewer", "RunsPoll"]  # the poll is one light query
    sdk.append_history(E, "watched", "live", [{"train/loss": 0.1}])  # still training: its history grows
    grown, cursor, _ = tick(instance, cursor)
    assert len(grown) == 1 and grown[0].tags["mvdata/changed_api_runs"] == "1"
    sdk.update_run(E, "watched", "live", state="crashed")  # stopped without a heartbeat
    crashed, cursor, _ = tick(instance, cursor)
    assert len(crashed) == 1 and crashed[0].tags["mvdata/changed_api_runs"] == "1"
    sdk.add_run(
        E, "watched", "synced-late", state="finished", created_at=BASE - timedelta(days=3), history=history(2, 10)
    )  # fmt: skip - an offline run synced days later: old createdAt
    late, cursor, _ = tick(instance, cursor)
    sdk.update_run(E, "watched", "done", state="running")  # resumed
    resumed, cursor, _ = tick(instance, cursor)
    assert late[0].tags["mvdata/new_api_runs"] == "1" and resumed[0].tags["mvdata/changed_api_runs"] == "1"
    assert len({r.run_key for r in [*first, *grown, *crashed, *late, *resumed]}) == 5  # each change its own key
    again, _, _ = tick(instance, cursor)
    assert not again
    assert not sdk.invalid_documents


def test_the_api_sensor_never_sticks(sdk: WandbServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk.add_project(E, "empty")
    sdk.add_run(E, "busy", "b1", state="running", history=history(0, 10))
    monkeypatch.setenv("MVDATA_WANDB_PROJECTS", f"{E}/empty,{E}/missing,{E}/busy")
    monkeypatch.setenv("MVDATA_WANDB_API_TIMEOUT_S", "3")
    instance = DagsterInstance.ephemeral()
    first, cursor, _ = tick(instance, None)  # the missing project fails; the others are polled
    assert len(first) == 1 and first[0].tags["mvdata/new_api_runs"] == "1"
    for _ in range(2):  # an empty project's cursor holds nothing a server could refuse, tick after tick
        nothing, cursor, skip = tick(instance, cursor)
        assert not nothing and f"could not poll {E}/missing" in skip
    sdk.add_run(E, "empty", "e1", state="running", history=history(1, 5))
    sdk.fault(op="RunsPoll", status=503, times=None)  # W&B down for a while: each tick ends within the timeout
    started = time.monotonic()
    down, down_cursor, skip = tick(instance, cursor)
    assert not down and down_cursor == cursor and "could not poll" in skip and time.monotonic() - started < 30
    sdk.clear_faults()
    back, cursor, _ = tick(instance, down_cursor)  # recovers by itself, and sees what happened meanwhile
    assert len(back) == 1 and back[0].tags["mvdata/new_api_runs"] == "1"
    assert not sdk.invalid_documents and not sdk.requests(where=lambda r: '"$gte": ""' in str(r.variables))


def test_every_document_the_project_sends_is_valid_against_w_and_b_schema() -> None:
    for document in DOCUMENTS:
        parsed, problems = check_document(document)
        assert parsed is not None and not problems, (document, problems)
    assert {op.name.value for doc in DOCUMENTS for op in check_document(doc)[0].definitions} == {
        "Runs", "RunsPoll", "RunParquetHistory", "HistoryPage", "RunFiles", "Sweep"}  # fmt: skip


def test_an_active_run_with_neither_exports_nor_live_data(sdk: WandbServer, tmp_path: Path) -> None:
    rows = history(5, 2500)
    sdk.add_run(E, "active", "a1", state="running", history=rows, exported_steps=0, live_data=False)
    sdk.add_run(E, "active", "lagging", state="finished", history=rows, exported_steps=1500, live_data=False)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    report = sync_api(conn, [f"{E}/active"])
    assert not report.problems and report.count("new") == 2
    for run_id in ("a1", "lagging"):
        assert not mismatches(expected_rows(rows), stored_rows(conn, run_id)), run_id
    pages = {run: [(r.variables["minStep"], r.variables["maxStep"]) for r in sdk.requests("HistoryPage", run=run)]
             for run in ("a1", "lagging")}  # fmt: skip
    assert pages == {"a1": [(0, 1000), (1000, 2000), (2000, 2500)], "lagging": [(1500, 2500)]}
    steps = dict(conn.execute("SELECT run_id, last_step FROM wandb._api_runs").fetchall())
    assert steps == {"a1": 2499, "lagging": 2499}


def test_a_step_w_and_b_has_not_served_yet_is_asked_for_again(sdk: WandbServer, tmp_path: Path) -> None:
    rows = history(6, 1000)
    sdk.add_run(E, "lag", "l1", state="running", history=rows, exported_steps=0, live_data=False, unserved=100)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    sync_api(conn, [f"{E}/lag"])
    assert conn.execute("SELECT last_step, listed_last_step FROM wandb._api_runs").fetchone() == (899, 999)
    assert conn.execute("SELECT last_step FROM wandb.runs").fetchone() == (899,)
    sdk.update_run(E, "lag", "l1", unserved=0)  # the listing is the same: only the history caught up
    sdk.clear_requests()
    report = sync_api(conn, [f"{E}/lag"])
    assert report.count("updated") == 1
    assert [(r.variables["minStep"], r.variables["maxStep"]) for r in sdk.requests("HistoryPage")] == [(900, 1000)]
    assert not mismatches(expected_rows(rows), stored_rows(conn, "l1"))
    sdk.clear_requests()
    assert sync_api(conn, [f"{E}/lag"]).count("unchanged") == 1 and sdk.count("HistoryPage") == 0


def test_a_live_run_synced_while_it_grows_ends_with_every_step_once(sdk: WandbServer, tmp_path: Path) -> None:
    rows = history(7, 3000)
    sdk.add_run(E, "growing", "g1", state="running", history=rows[:100], exported_steps=50)
    syncs_started = [0]

    def train() -> None:  # logs a chunk of steps during each sync; W&B exports some now and then, live data on and off
        for chunk, start in enumerate(range(100, 3000, 100)):
            deadline = time.monotonic() + 60
            while syncs_started[0] <= chunk and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(random.Random(chunk).random() * 0.03)  # somewhere inside that sync
            sdk.append_history(E, "growing", "g1", rows[start : start + 100])
            sdk.update_run(E, "growing", "g1", live_data=start % 300 != 0, unserved=(start // 100) % 3 * 10)
            if start % 500 == 0:
                sdk.export_history(E, "growing", "g1", upto=start - 200)

    trainer = threading.Thread(target=train)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    trainer.start()
    try:
        while trainer.is_alive() and syncs_started[0] < 200:
            syncs_started[0] += 1
            assert not sync_api(conn, [f"{E}/growing"]).problems
    finally:
        trainer.join()
    sdk.update_run(E, "growing", "g1", state="finished", unserved=0, live_data=True)
    sync_api(conn, [f"{E}/growing"])
    assert syncs_started[0] >= 29  # every chunk landed while a sync ran
    assert not mismatches(expected_rows(rows), stored_rows(conn, "g1"))  # stored_rows fails on any duplicate


def test_nulls_where_w_and_b_may_send_them(sdk: WandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = history(8, 300)
    nullable = {"files", "heartbeatAt", "config", "summaryMetrics", "systemMetrics", "historyKeys", "user", "tags",
                "sweepName", "displayName", "state", "group", "jobType", "notes", "historyLineCount"}  # fmt: skip
    sdk.add_run(E, "nulls", "n1", history=rows, nulls=nullable)
    sdk.add_run(E, "nulls", "n2", history=rows, nulls={"historyKeys"}, config={"_lr": 0.1, "_wandb": {"x": 1},
                "wandb_version": "0.31.0", "lr": 0.2})  # fmt: skip
    for i in range(3, 8):
        sdk.add_run(E, "nulls", f"n{i}", history=rows[:5])
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    monkeypatch.setattr(wandb_api, "PAGE_RUNS", 2)
    sdk.claims_more_pages = True  # ... and past the last run comes an empty page, null endCursor, "has next page"
    sdk.clear_requests()
    try:
        report = sync_api(conn, [f"{E}/nulls"])
        assert sdk.count("Runs") == 5 + 2  # 4 pages of runs and the empty one; the heavy fields' page and its empty one
    finally:
        sdk.claims_more_pages = False
    assert not report.problems and report.count("new") == 7
    row = conn.execute("""SELECT state, heartbeat_at, tags, "user", host, last_step FROM wandb.runs
                          WHERE run_id = 'n1'""")
    assert row.fetchone() == (None, None, [], None, None, 299)  # history read from the exports all the same
    assert not mismatches(expected_rows(rows), stored_rows(conn, "n2"))
    config = dict(conn.execute("SELECT key, value FROM wandb.config WHERE run_id = 'n2'").fetchall())
    assert config == {"_lr": 0.1, "lr": 0.2}  # W&B's own entries left out, the user's underscored key kept
    assert conn.execute("SELECT count(*) FROM wandb.metadata WHERE run_id = 'n1'").fetchone() == (0,)


def test_run_links_follow_the_sdk_app_url(sdk: WandbServer, tmp_path: Path) -> None:
    from wandb.apis.public.service_api import ServiceApi

    expected = {
        "https://api.wandb.ai": "https://forge.coreweave.com/wandb/e%2Fx/p/runs/r1",
        "https://api.forge.coreweave.com": "https://forge.coreweave.com/wandb/e%2Fx/p/runs/r1",
        "https://wandb.mycorp.com": "https://wandb.mycorp.com/e%2Fx/p/runs/r1",
        "https://api.mycorp.com": "https://app.mycorp.com/e%2Fx/p/runs/r1",
    }
    for base, url in expected.items():
        client = Client.__new__(Client)  # no login: only the settings' app URL is read
        client.service = ServiceApi(settings=wandb.Settings(base_url=base))
        assert client.run_url(("e/x", "p", "r1")) == url, base
    add_project(sdk, "links", runs=1, steps=5)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    sync_api(conn, [f"{E}/links"])
    assert conn.execute("SELECT url FROM wandb.runs").fetchone() == (f"{sdk.url}/{E}/links/runs/run0",)


def test_a_refused_login_names_the_sdk_default_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise wandb.errors.AuthenticationError("API key not valid")

    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setattr(wandb, "Api", refuse)  # no request: the default server is not on this machine's network
    with pytest.raises(ApiSourceError, match="W&B login at https://api.forge.coreweave.com failed: API key not valid"):
        Client()


def test_an_api_sync_killed_after_its_runs_committed_still_moves_the_exports(
    sdk: WandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mvdata_assets.runs import exports

    add_project(sdk, "killed", runs=2, steps=20)
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    exports.export_group(conn, tmp_path / "exports", "metadata")

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # every run committed, the sync not done

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):  # the server's settings stay
        patched.setattr(api, "_sync_sweeps", killed)
        sync_api(conn, [f"{E}/killed"])
    assert sync_api(conn, [f"{E}/killed"]).count("unchanged") == 2
    written = exports.export_group(conn, tmp_path / "exports", "metadata")
    assert written[0].rewritten and written[0].rows == 2

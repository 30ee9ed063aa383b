"""The test W&B server against the real wandb SDK 0.31 (its requests go through the wandb-core sidecar).

Each SDK check runs in a subprocess with an isolated HOME/config/cache (see `WandbServer.sdk_env`) and returns its
findings pickled, so values come back with their exact types; one module-wide server holds a project per test.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import pickle
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvdata_assets_tests.runs.wandb_server import API_KEY, WandbServer

E = "ent"
BASE = datetime(2024, 1, 1)


def sdk(server: WandbServer, home: Path, code: str, *, timeout: float = 120) -> Any:
    """Runs `code` (which sets `result`) with `wandb` imported and `api = wandb.Api(...)` for entity `ent`."""
    script = (
        "import base64, math, pickle, wandb\n"
        + textwrap.dedent(code)
        + "\nprint('RESULT=' + base64.b64encode(pickle.dumps(result)).decode())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=server.sdk_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=home,
    )
    assert proc.returncode == 0, f"SDK process failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")][-1]
    return pickle.loads(base64.b64decode(line.removeprefix("RESULT=")))


def same(a: Any, b: Any) -> bool:
    """Equality with NaN equal to NaN and types compared (1 is not 1.0, True is not 1)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# -- listing, filters, order, pages


LISTING = [
    {
        "run_id": f"r{i}",
        "name": f"run {i}",
        "state": ["finished", "running", "crashed"][i % 3],
        "created_at": BASE + timedelta(hours=i),
        "heartbeat_at": BASE + timedelta(hours=i, minutes=30),
        "tags": (["even"] if i % 2 == 0 else []) + (["three"] if i % 3 == 0 else []),
        "group": f"g{i % 2}",
        "job_type": "train",
        "config": {"lr": i / 10, "opt": {"name": "adam" if i % 2 else "sgd"}},
        "summary": {"loss": 1 / (i + 1)},
    }
    for i in range(7)
]


def expect(pred: Any) -> list[str]:
    return [r["run_id"] for r in LISTING if pred(r)]


def test_runs_listing_filters_order_and_pages(wandb_server: WandbServer, tmp_path: Path) -> None:
    for r in LISTING:
        wandb_server.add_run(E, "listing", **r)
    wandb_server.clear_requests()
    filters = {
        "created": {"createdAt": {"$gt": "2024-01-01T02:00:00"}},
        "heartbeat": {"heartbeatAt": {"$lte": "2024-01-01T01:30:00"}},
        "state": {"state": "running"},
        "tags": {"tags": {"$in": ["three"]}},
        "names": {"name": {"$in": ["r1", "r5", "zz"]}},
        "or": {"$or": [{"config.lr": 0.2}, {"summary_metrics.loss": 0.25}]},
        "and": {"$and": [{"config.opt.name": "adam"}, {"state": {"$ne": "finished"}}]},
        "value": {"config.lr.value": {"$gte": 0.5}},
    }
    got = sdk(
        wandb_server,
        tmp_path,
        f"""
        api = wandb.Api(overrides={{"entity": "ent"}})
        lazy = api.runs("ent/listing", per_page=3)
        result = {{"count": len(lazy)}}
        result["lazy"] = [
            (r.id, r.name, r.state, r.tags, r.created_at, r._attrs["heartbeatAt"], r.group, r.job_type,
             "config" in r._attrs)
            for r in lazy
        ]
        result["lazy_config"] = lazy[4].config
        # a new Api: one caches runs() by path, filters and order, and upgrades a cached lazy listing run by run
        full = list(wandb.Api(overrides={{"entity": "ent"}}).runs("ent/listing", per_page=4, lazy=False))
        result["full"] = [(r.id, r.config, r.summary_metrics) for r in full]
        result["desc"] = [r.id for r in api.runs("ent/listing", order="-created_at", per_page=2)]
        result["filters"] = {{
            k: [r.id for r in api.runs("ent/listing", filters=f, per_page=2)] for k, f in {filters!r}.items()
        }}
        """,
    )
    assert got["count"] == 7
    assert got["lazy"] == [
        (
            r["run_id"],
            r["name"],
            r["state"],
            r["tags"],
            r["created_at"].strftime("%Y-%m-%dT%H:%M:%S"),
            r["heartbeat_at"].strftime("%Y-%m-%dT%H:%M:%S"),
            r["group"],
            "train",
            False,
        )
        for r in LISTING
    ]
    assert got["lazy_config"] == LISTING[4]["config"]
    assert got["full"] == [(r["run_id"], r["config"], r["summary"]) for r in LISTING]
    assert got["desc"] == [f"r{i}" for i in reversed(range(7))]
    assert got["filters"] == {
        "created": expect(lambda r: r["created_at"] > BASE + timedelta(hours=2)),
        "heartbeat": expect(lambda r: r["heartbeat_at"] <= BASE + timedelta(hours=1, minutes=30)),
        "state": expect(lambda r: r["state"] == "running"),
        "tags": expect(lambda r: "three" in r["tags"]),
        "names": ["r1", "r5"],
        "or": expect(lambda r: r["config"]["lr"] == 0.2 or r["summary"]["loss"] == 0.25),
        "and": expect(lambda r: r["config"]["opt"]["name"] == "adam" and r["state"] != "finished"),
        "value": expect(lambda r: r["config"]["lr"] >= 0.5),
    }

    def runs_requests(**variables: Any) -> int:
        def match(req: Any) -> bool:
            return all(req.variables.get(k) == v for k, v in variables.items())

        return len(wandb_server.requests("Runs", where=match))

    # pages of k cost ceil(n / k) Runs requests; lazy runs cost one Run request when config is read, full ones none
    assert runs_requests(perPage=3, filters="{}", order="+created_at") == 3
    assert runs_requests(perPage=4, filters="{}") == 2
    assert runs_requests(perPage=2, order="-created_at") == 4
    for key, expected in got["filters"].items():
        assert runs_requests(perPage=2, filters=json.dumps(filters[key])) == max(1, math.ceil(len(expected) / 2))
    assert [r.run for r in wandb_server.requests("Run")] == ["r4"]
    assert wandb_server.graphql_ops()[0] == "Viewer"
    assert not wandb_server.invalid_documents  # every document the SDK sent is valid against W&B's schema


# -- exact values, files, metadata, sweeps


CONFIG = {
    "nan": float("nan"),
    "inf": float("inf"),
    "ninf": float("-inf"),
    "big": 2**70,
    "neg_big": -(2**70),
    "größe/λ": {"ключ": [1, 2.5, "x", None, True]},
    "nested": {"a": {"b": {"c": 1}}},
    "text": 'ünï\n"q"',
}


def test_values_files_metadata_and_sweeps(wandb_server: WandbServer, tmp_path: Path) -> None:
    metadata = {"host": "node-1", "python": "3.11.7", "gpu": "A100", "args": ["--lr", "0.1"]}
    blob = bytes(range(256)) * 40
    sweep_config = {"method": "grid", "metric": {"name": "loss", "goal": "minimize"}}
    wandb_server.add_sweep(E, "values", "sw1", config=sweep_config)
    wandb_server.add_run(
        E,
        "values",
        "v1",
        tags=["ü", "x y"],
        notes="some notes",
        sweep="sw1",
        config=CONFIG,
        summary={**CONFIG, "_wandb": {"runtime": 12}},
        system_metrics={"system.gpu.0.temp": 50.5},
        metadata=metadata,
        files={"output.log": "hello\n", "media/blob.bin": blob},
    )
    got = sdk(
        wandb_server,
        tmp_path,
        """
        import pathlib
        api = wandb.Api(overrides={"entity": "ent"})
        lazy = api.runs("ent/values")[0]
        run = api.run("ent/values/v1")
        files = list(run.files())
        for f in files:
            f.download(root="dl", replace=True)
        result = {
            "lazy_config": lazy.config, "config": run.config, "summary": run.summary_metrics,
            "system": run.system_metrics, "tags": run.tags, "notes": run.notes, "metadata": run.metadata,
            "files": [(f.name, f.size) for f in files],
            "downloaded": {f.name: pathlib.Path("dl", f.name).read_bytes() for f in files},
            "sweep": (run.sweep_name, run.sweep.config),
        }
        """,
    )
    assert same(got["lazy_config"], CONFIG)
    assert same(got["config"], CONFIG)
    assert same(got["summary"], {**CONFIG, "_wandb": {"runtime": 12}})
    assert got["system"] == {"system.gpu.0.temp": 50.5}
    assert (got["tags"], got["notes"]) == (["ü", "x y"], "some notes")
    assert got["metadata"] == metadata
    names = ["media/blob.bin", "output.log", "wandb-metadata.json"]
    assert [n for n, _ in got["files"]] == names
    assert got["downloaded"]["media/blob.bin"] == blob
    assert got["downloaded"]["output.log"] == b"hello\n"
    assert json.loads(got["downloaded"]["wandb-metadata.json"]) == metadata
    assert got["sweep"] == ("sw1", sweep_config)
    assert wandb_server.count("file", run="v1") == 4  # three downloads + metadata


# -- history: parquet exports + live tail


def history_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    rows = []
    for step in range(start, start + n):
        row: dict[str, Any] = {
            "_step": step,
            "_timestamp": 1.7e9 + step + 0.25,
            "_runtime": step + 0.5,
            "loss": 1 / (step + 3),
            "count": step,
            "größe/λ": step + 0.125,
        }
        if step % 3 == 0:
            row["phase"] = f"p{step % 4}"
        if step % 5 == 0:
            row["weird"] = [float("nan"), float("inf"), float("-inf")][step % 3]
        if step % 7 == 0:
            row["nested"] = {"x": step, "y": [step, step + 1]}
        rows.append(row)
    return rows


def logged(row: dict[str, Any]) -> dict[str, Any]:
    """A scanned row without the nulls parquet exports hold for keys a step did not log."""
    return {k: v for k, v in row.items() if v is not None}


def test_scan_history_exports_live_tail_and_sampled(wandb_server: WandbServer, tmp_path: Path) -> None:
    truth = history_rows(2500)
    wandb_server.add_run(E, "hist", "exp", state="running", history=truth, exported_steps=2000, export_files=2)
    wandb_server.add_run(E, "hist", "live", state="running", history=truth, exported_steps=0)
    wandb_server.add_run(E, "hist", "keyed", state="running", history=truth, exported_steps=2000, export_files=2)
    wandb_server.add_run(E, "hist", "grown", state="running", history=truth[:1200], exported_steps=1000)
    wandb_server.append_history(E, "hist", "grown", truth[1200:1800])
    wandb_server.export_history(E, "hist", "grown", upto=1500)
    wandb_server.append_history(E, "hist", "grown", truth[1800:])
    events = [{"_timestamp": 1.7e9 + i, "system.cpu": 10.0 + i} for i in range(20)]
    wandb_server.add_run(E, "hist", "done", history=truth, events=events)
    wandb_server.clear_requests()
    got = sdk(
        wandb_server,
        tmp_path,
        """
        api = wandb.Api(overrides={"entity": "ent"})
        runs = {r.id: r for r in api.runs("ent/hist")}
        result = {name: list(runs[name].scan_history(use_cache=False)) for name in ("exp", "live", "grown", "done")}
        result["sampled"] = runs["done"].history(samples=100, pandas=False)
        result["sampled_keys"] = runs["done"].history(keys=["loss", "phase"], samples=50, pandas=False)
        result["system"] = runs["done"].history(stream="system", samples=5, pandas=False)
        result["keyed"] = [r["_step"] for r in runs["live"].scan_history(keys=["loss"], use_cache=False)]
        result["keyed_exp"] = list(runs["keyed"].scan_history(keys=["loss", "größe/λ"], use_cache=False))
        result["window"] = list(runs["exp"].scan_history(min_step=1990, max_step=2010, use_cache=False))
        """,
    )
    for name in ("exp", "live", "grown", "done"):
        rows = [logged(r) for r in got[name]]
        if name == "grown":
            # W&B's trap, reproduced: the export ends inside a page, and the HistoryPage for that page returns its
            # exported steps too, which the SDK appends to the parquet rows without de-duplicating
            counts = Counter(r["_step"] for r in rows)
            assert sorted(step for step, n in counts.items() if n > 1) == list(range(1000, 1500))
            rows = list({r["_step"]: r for r in rows}.values())
        assert len(rows) == 2500, name
        for row, expected in zip(sorted(rows, key=lambda r: r["_step"]), truth, strict=True):
            assert same(row, expected), (name, row, expected)
    # the same trap for a window across the export boundary: its exported steps come twice
    assert [r["_step"] for r in got["window"]] == sorted([*range(1990, 2000), *range(1990, 2010)])

    def ops(run: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for req in wandb_server.requests(run=run):
            counts[req.op] = counts.get(req.op, 0) + 1
        return counts

    # export files are downloaded whole; HistoryPage only for windows reaching the live steps (pages of 1000)
    assert ops("exp") == {"RunHistoryKeys": 2, "RunParquetHistory": 2, "parquet": 4, "HistoryPage": 2}
    # 2 + ceil(2500 / 1000) for the full scan; the keyed scan pages the live steps with SampledHistoryPage
    assert ops("live") == {"RunHistoryKeys": 2, "RunParquetHistory": 2, "HistoryPage": 3, "SampledHistoryPage": 3}
    assert got["keyed"] == list(range(2500))
    # with keys, wandb-core reads the export files remotely with HTTP range requests
    assert [r["_step"] for r in got["keyed_exp"]] == list(range(2500))
    assert all(r["loss"] == truth[r["_step"]]["loss"] for r in got["keyed_exp"])
    assert {r.status for r in wandb_server.requests("parquet", run="keyed")} == {206}
    specs = [json.loads(r.variables["spec"]) for r in wandb_server.requests("SampledHistoryPage", run="live")]
    assert [(s["minStep"], s["maxStep"], s["samples"]) for s in specs] == [
        (0, 999, 1000),
        (1000, 1999, 1000),
        (2000, 2499, 500),
    ]
    assert ops("grown") == {"RunHistoryKeys": 1, "RunParquetHistory": 1, "parquet": 1, "HistoryPage": 2}
    assert ops("done")["parquet"] == 1 and "HistoryPage" not in ops("done")
    assert ops("done")["RunFullHistory"] == 2 and ops("done")["RunSampledHistory"] == 1  # history + events

    assert got["system"] == [events[i] for i in (0, 5, 10, 14, 19)]
    sampled = got["sampled"]
    assert len(sampled) == 100 and sampled[0]["_step"] == 0 and sampled[-1]["_step"] == 2499
    assert all(same(logged(r), truth[r["_step"]]) for r in sampled)
    keyed = got["sampled_keys"]
    assert len(keyed) == 50 and all(set(r) == {"_step", "loss", "phase"} for r in keyed)
    assert all(r["loss"] == truth[r["_step"]]["loss"] and r["_step"] % 3 == 0 for r in keyed)


# -- auth, faults and retries


def test_retries_on_429_and_500(wandb_server: WandbServer, tmp_path: Path) -> None:
    for i in range(3):
        wandb_server.add_run(E, "faults", f"f{i}", history=history_rows(30), exported_steps=0)
    wandb_server.fault("Runs", status=429, retry_after=1, times=1)
    wandb_server.fault("HistoryPage", run="f1", status=500, times=1)
    wandb_server.clear_requests()
    got = sdk(
        wandb_server,
        tmp_path,
        """
        api = wandb.Api(overrides={"entity": "ent"})
        runs = list(api.runs("ent/faults", per_page=2))
        result = {"ids": [r.id for r in runs], "rows": len(list(runs[1].scan_history(use_cache=False)))}
        """,
    )
    assert got == {"ids": ["f0", "f1", "f2"], "rows": 30}
    assert [r.status for r in wandb_server.requests("Runs")] == [429, 200, 200]
    assert [r.status for r in wandb_server.requests("HistoryPage")] == [500, 200]


def test_bad_key_malformed_answer_and_bad_filter_fail_fast(wandb_server: WandbServer, tmp_path: Path) -> None:
    wandb_server.add_run(E, "errors", "e1")
    wandb_server.fault("Runs", malformed=True, times=1)
    got = sdk(
        wandb_server,
        tmp_path,
        """
        def error(call):
            try:
                call()
            except Exception as e:
                return f"{type(e).__name__}: {e}"
        api = wandb.Api(overrides={"entity": "ent"})
        result = {
            "bad_key": error(lambda: wandb.Api(api_key="b" * 40, overrides={"entity": "ent"})),
            "malformed": error(lambda: list(api.runs("ent/errors", per_page=5))),
            "bad_filter": error(lambda: list(api.runs("ent/errors", filters={"state": {"$near": 1}}))),
            "missing": error(lambda: list(api.runs("ent/nope"))),
        }
        """,
    )
    assert "AuthenticationError" in got["bad_key"] and "not logged in" in got["bad_key"]
    assert got["malformed"].startswith("WandbApiFailedError: ")  # the SDK says the answer broke off
    assert "unsupported filter operator '$near'" in got["bad_filter"]
    assert "Could not find project nope" in got["missing"]
    assert 401 in [r.status for r in wandb_server.requests("Viewer")]


# -- the server on its own (no SDK): GraphQL features, auth, ranges, logging


def post(server: WandbServer, body: dict[str, Any], key: str | None = API_KEY) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"api:{key}".encode()).decode()
    req = urllib.request.Request(f"{server.url}/graphql", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_graphql_aliases_fragments_directives_and_auth(wandb_server: WandbServer) -> None:
    wandb_server.add_run(E, "gql", "g1", tags=["a"], history=[{"loss": 0.5}, {"loss": float("nan")}])
    query = """
    query Custom($entity: String!, $project: String = "gql", $withTags: Boolean!, $cursor: String) {
      project(name: $project, entityName: $entity) {
        __typename
        runs(first: 1, after: $cursor) { edges { node { ...F r: name tags @include(if: $withTags) } } }
        one: run(name: "g1") { ... on Run { historyLineCount } history(samples: 10) }
      }
    }
    fragment F on Run { id displayName }
    """
    status, body = post(wandb_server, {"query": query, "variables": {"entity": E, "withTags": False}})
    assert status == 200, body
    project = body["data"]["project"]
    node = project["runs"]["edges"][0]["node"]
    assert project["__typename"] == "Project" and node["r"] == node["displayName"] == "g1" and "tags" not in node
    assert project["one"]["historyLineCount"] == 2
    assert project["one"]["history"] == ['{"_step":0,"loss":0.5}', '{"_step":1,"loss":NaN}']
    assert post(wandb_server, {"query": query}, key="x" * 40)[0] == 401
    assert post(wandb_server, {"query": query}, key=None)[0] == 401


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ("query Broken { project(name: ) }", "Syntax Error"),
        ('query F { project(name: "gql") { run(name: "g1") { host missing } } }', "Cannot query field 'missing'"),
        ('query A { project(name: "gql") { run(runName: "g1") { name } } }', "Unknown argument 'runName'"),
        ("query V($s: String!) { project(name: $s) { run(name: $s) { history(minStep: $s) } } }",
         "Variable '$s' of type 'String!' used in position expecting type 'Int64'"),
        ('query N { project(name: "gql") { runs { edges { node { name } } } cursor } }', "Cannot query field 'cursor'"),
    ],
)  # fmt: skip
def test_documents_w_and_b_would_refuse_are_refused(wandb_server: WandbServer, document: str, error: str) -> None:
    before = len(wandb_server.invalid_documents)
    status, body = post(wandb_server, {"query": document, "variables": {"s": "x"}})
    assert status == 200 and "data" not in body, body
    assert any(error in e["message"] for e in body["errors"]), body
    assert len(wandb_server.invalid_documents) == before + 1


def test_nulls_the_schema_forbids_are_errors_and_filters_are_parsed_whole(wandb_server: WandbServer) -> None:
    wandb_server.add_run(E, "nulls", "n1", nulls={"files", "config", "heartbeatAt"})
    wandb_server.add_run(E, "nulls", "n2", nulls={"createdAt"})  # W&B never does this: createdAt is DateTime!
    query = """query Q($f: JSONString) { project(name: "nulls", entityName: "ent") {
        runCount(filters: $f)
        runs { edges { node { name config heartbeatAt createdAt files { edges { node { name } } } } } } } }"""
    status, body = post(wandb_server, {"query": query, "variables": {"f": "{}"}})
    assert status == 200 and any("non-nullable field Run.createdAt" in e["message"] for e in body["errors"]), body
    status, body = post(wandb_server, {"query": query, "variables": {"f": '{"createdAt": {"$gte": ""}}'}})
    assert body["data"]["project"]["runCount"] is None and "invalid timestamp ''" in body["errors"][0]["message"]
    empty = """query Q($f: JSONString) { project(name: "nothing", entityName: "ent") { runCount(filters: $f) } }"""
    wandb_server.add_project(E, "nothing")
    status, body = post(wandb_server, {"query": empty, "variables": {"f": '{"createdAt": {"$gte": ""}}'}})
    assert "invalid timestamp ''" in body["errors"][0]["message"]  # no run to match, refused all the same
    wandb_server.delete_run(E, "nulls", "n2")
    status, body = post(wandb_server, {"query": query, "variables": {"f": "{}"}})
    node = body["data"]["project"]["runs"]["edges"][0]["node"]
    assert "errors" not in body and node["config"] is node["heartbeatAt"] is node["files"] is None


AUTH = {"Authorization": "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()}


def keyed(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers=AUTH)


def test_file_range_requests_and_persistent_faults(wandb_server: WandbServer) -> None:
    wandb_server.add_run(E, "ranges", "x1", files={"f.bin": bytes(range(200))})
    url = f"{wandb_server.url}/files/{E}/ranges/x1/f.bin"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)  # run files need the API key, as W&B's do
    assert refused.value.code == 401
    req = urllib.request.Request(url, headers={"Range": "bytes=10-19", **AUTH})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 206 and resp.read() == bytes(range(10, 20))
        assert resp.headers["Content-Range"] == "bytes 10-19/200"
    fault = wandb_server.fault("file", run="x1", status=503, times=None)
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(keyed(url), timeout=10)
        assert info.value.code == 503
    wandb_server.clear_faults()
    with urllib.request.urlopen(keyed(url), timeout=10) as resp:
        assert resp.read() == bytes(range(200))
    assert fault.hits == 3
    wandb_server.fault("file", run="x1", drop=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        urllib.request.urlopen(keyed(url), timeout=10)
    wandb_server.fault("file", run="x1", delay=0.3)
    started = time.monotonic()
    with urllib.request.urlopen(keyed(url), timeout=10) as resp:
        assert resp.read() == bytes(range(200)) and time.monotonic() - started >= 0.3
    assert [r.status for r in wandb_server.requests("file", run="x1")][-6:] == [503, 503, 503, 200, 0, 200]


def test_mutations_and_table_history(wandb_server: WandbServer) -> None:
    table = pa.table({"loss": [0.5, 0.25, 0.125], "_step": [0, 1, 2]})
    wandb_server.add_run(E, "mut", "m1", state="running", history=table, exported_steps=2, tags=["a"])
    wandb_server.add_run(E, "mut", "m2")
    before = wandb_server.run_record(E, "mut", "m1").heartbeat_at
    wandb_server.append_history(E, "mut", "m1", [{"loss": 0.0625, "note": "x"}])
    wandb_server.update_run(E, "mut", "m1", tags=["b"], config={"lr": 2**70}, summary={"loss": 0.0625}, state="failed")
    wandb_server.delete_run(E, "mut", "m2")
    query = """
    query Q($e: String!, $f: JSONString) {
      project(name: "mut", entityName: $e) {
        runCount(filters: $f)
        run(name: "m1") {
          state tags config summaryMetrics heartbeatAt historyLineCount historyKeys
          history(minStep: 1, maxStep: 10, samples: 100)
          parquetHistory(liveKeys: ["_step", "loss"]) { parquetUrls liveData }
        }
      }
    }
    """
    beat = (before + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    status, body = post(wandb_server, {"query": query, "variables": {"e": E, "f": json.dumps({"heartbeatAt": beat})}})
    assert status == 200, body
    project = body["data"]["project"]
    run = project["run"]
    assert project["runCount"] == 1  # m2 is gone; m1's heartbeat advanced with the appended step
    assert (run["state"], run["tags"], run["historyLineCount"]) == ("failed", ["b"], 4)
    assert json.loads(run["config"]) == {"lr": {"value": 2**70, "desc": None}}
    assert json.loads(run["summaryMetrics"]) == {"loss": 0.0625}
    assert (
        run["historyKeys"]["lastStep"] == 3 and run["historyKeys"]["keys"]["note"]["typeCounts"][0]["type"] == "string"
    )
    assert [json.loads(line) for line in run["history"]] == [
        {"_step": 1, "loss": 0.25},
        {"_step": 2, "loss": 0.125},
        {"_step": 3, "loss": 0.0625, "note": "x"},
    ]
    assert len(run["parquetHistory"]["parquetUrls"]) == 1
    assert run["parquetHistory"]["liveData"] == [{"_step": 2, "loss": 0.125}, {"_step": 3, "loss": 0.0625}]
    with urllib.request.urlopen(run["parquetHistory"]["parquetUrls"][0], timeout=10) as resp:
        exported = pq.read_table(pa.BufferReader(resp.read()))
    assert exported.to_pylist() == [{"_step": 0, "loss": 0.5}, {"_step": 1, "loss": 0.25}]

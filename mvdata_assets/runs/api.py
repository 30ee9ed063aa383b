"""The W&B API source: every run of the projects in MVDATA_WANDB_PROJECTS into the warehouse, incrementally.

Through the wandb SDK: `wandb.Api` does the login (WANDB_API_KEY, WANDB_BASE_URL, netrc) and its wandb-core
sidecar makes every GraphQL request, with its retries and Retry-After. The SDK's run objects ask one more
request per run for most fields, so the queries here are written out, sent through the same sidecar.

Per project, a re-sync that finds nothing changed costs the SDK's login check and one `Runs` page per 1,000
runs: each page carries every field that tells a run changed (state, heartbeat, history length, tags,
config, summary, …). Only new or changed runs cost more: their history comes from the parquet exports
(only files not ingested yet, read with pyarrow, never row by row) and the live tail after the last stored
step through `HistoryPage`, never the sampled `history()`. Runs are fetched concurrently and stored by
this thread, one run per transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import urllib3

from mvdata_assets.runs import store
from mvdata_assets.runs.store import SCHEMA, RunKey
from mvdata_assets.runs.values import EXACT_INT_LIMIT, NestedState, leaf_paths, parse_json, split_value, to_json

PAGE_RUNS = 1000  # runs per listing page
PAGE_STEPS = 1000  # steps per HistoryPage request (the SDK's page size)
SYSTEM_COLUMNS = ("_step", "_timestamp", "_runtime")

RUN_FIELDS = """name displayName state createdAt heartbeatAt tags group jobType sweepName host notes
    config summaryMetrics systemMetrics historyLineCount historyKeys user { username }"""

POLL_FIELDS = "name state createdAt heartbeatAt historyLineCount"  # what a sensor tick needs, nothing heavy
LIVE_STATES = ("running", "pending", "preempting")

RUNS_QUERY = """query Runs($project: String!, $entity: String!, $cursor: String, $perPage: Int, $order: String,
        $filters: JSONString) {
    project(name: $project, entityName: $entity) {
        runs(filters: $filters, after: $cursor, first: $perPage, order: $order) {
            edges { node { FIELDS } cursor }
            pageInfo { endCursor hasNextPage }
        }
    }
}"""

PARQUET_QUERY = """query RunParquetHistory($project: String!, $entity: String!, $run: String!, $liveKeys: [String!]!) {
    project(name: $project, entityName: $entity) {
        run(name: $run) { parquetHistory(liveKeys: $liveKeys) { parquetUrls liveData } }
    }
}"""

HISTORY_QUERY = """query HistoryPage($project: String!, $entity: String!, $run: String!, $minStep: Int64!,
        $maxStep: Int64!, $pageSize: Int!) {
    project(name: $project, entityName: $entity) {
        run(name: $run) { history(minStep: $minStep, maxStep: $maxStep, samples: $pageSize) }
    }
}"""

FILES_QUERY = """query RunFiles($project: String!, $entity: String!, $run: String!, $names: [String]) {
    project(name: $project, entityName: $entity) {
        run(name: $run) { files(names: $names) { edges { node { name directUrl } } } }
    }
}"""

SWEEP_QUERY = """query Sweep($project: String!, $entity: String!, $name: String!) {
    project(name: $project, entityName: $entity) {
        sweep(sweepName: $name) { name displayName state config }
    }
}"""

HISTORY_SCHEMA = pa.schema(
    [("step", pa.int64()), ("timestamp", pa.float64()), ("runtime_s", pa.float64()), ("key", pa.string()),
     ("value", pa.float64()), ("value_json", pa.string())]
)  # fmt: skip


class ApiSourceError(RuntimeError):
    """A whole source can't be read (a bad API key, an unknown project): one clear message, no secret in it."""


@dataclass(frozen=True)
class ApiFilters:
    states: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # a run with any of them
    created_since: str | None = None  # ISO date or time, UTC

    def to_graphql(self) -> dict:
        parts: list[dict] = []
        if self.states:
            parts.append({"state": {"$in": list(self.states)}})
        if self.tags:
            parts.append({"tags": {"$in": list(self.tags)}})
        if self.created_since:
            parts.append({"createdAt": {"$gte": self.created_since}})
        return {"$and": parts} if parts else {}

    @property
    def active(self) -> bool:
        return bool(self.to_graphql())


@dataclass
class RunOutcome:
    key: RunKey
    status: str  # new | updated | unchanged | deleted | failed
    history_rows: int = 0
    requests: int = 0
    problem: str | None = None


@dataclass
class ApiSyncReport:
    runs: list[RunOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, *statuses: str) -> int:
        return sum(1 for r in self.runs if r.status in statuses)

    @property
    def changed(self) -> bool:
        return any(r.status in ("new", "updated", "deleted") for r in self.runs)


# ---- talking to W&B ------------------------------------------------------------------------------------------


class Client:
    """GraphQL through the SDK's wandb-core sidecar; export and metadata files by plain HTTP GET (signed URLs)."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        import wandb  # imported only when an API source is configured: the SDK costs ~1 s to import

        try:
            self.api = wandb.Api(timeout=int(timeout_s))
        except Exception as exc:  # noqa: BLE001 - the SDK raises several types for a refused login
            base = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
            raise ApiSourceError(f"W&B login at {base} failed: {_without_secrets(str(exc))}") from None
        self.base_url = self.api.settings.get("base_url") or "https://api.wandb.ai"
        self.http = urllib3.PoolManager(
            num_pools=4, maxsize=16, retries=urllib3.Retry(total=5, backoff_factor=0.5, status_forcelist=(429, 500,
                                                                                                         502, 503, 504))
        )  # fmt: skip

    def graphql(self, query: str, variables: dict) -> dict:
        return self.api._service_api.execute_graphql(query, variables)  # noqa: SLF001 - no public raw GraphQL in 0.31

    def get(self, url: str, dest: Path) -> None:
        with self.http.request("GET", url, preload_content=False) as response, dest.open("wb") as out:
            if response.status != 200:
                raise OSError(f"GET {urlsplit(url).path}: HTTP {response.status}")
            for block in response.stream(1 << 20):
                out.write(block)

    def app_url(self) -> str:
        return self.base_url.replace("://api.", "://", 1).rstrip("/")


def _without_secrets(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def list_runs(client: Client, entity: str, project: str, filters: dict, fields: str = RUN_FIELDS) -> Iterator[dict]:
    cursor = None
    while True:
        data = client.graphql(
            RUNS_QUERY.replace("FIELDS", fields),
            {"entity": entity, "project": project, "cursor": cursor, "perPage": PAGE_RUNS, "order": "+created_at",
             "filters": json.dumps(filters)},
        )  # fmt: skip
        if not data.get("project"):
            raise ApiSourceError(f"W&B project {entity}/{project} was not found (or this API key can't see it)")
        runs = data["project"]["runs"]
        for edge in runs["edges"]:
            yield edge["node"]
        if not runs["pageInfo"]["hasNextPage"]:
            return
        cursor = runs["pageInfo"]["endCursor"]


def poll(client: Client, projects: Sequence[str], cursor: dict) -> tuple[list[str], dict]:
    """Runs new or changed since the cursor, for a sensor: one light `Runs` query per project.

    It asks only for runs created or heartbeating since the last poll, plus the runs that were live then
    (a run that crashes stops heartbeating but changes state). The cursor keeps, per project, those times
    and the runs seen live or at the boundary, so a run is reported once per change.
    """
    changed, new_cursor = [], {}
    for path in projects:
        entity, _, project = path.partition("/")
        last = cursor.get(path, {})
        seen: dict[str, list] = last.get("runs", {})
        filters = {"$or": [
            {"createdAt": {"$gte": last["created"]}}, {"heartbeatAt": {"$gte": last["heartbeat"]}},
            {"name": {"$in": [name for name, (state, *_) in seen.items() if state in LIVE_STATES]}},
        ]} if last else {}  # fmt: skip
        nodes = list(list_runs(client, entity, project, filters, POLL_FIELDS))
        created = max([last.get("created", ""), *(n["createdAt"] or "" for n in nodes)])
        heartbeat = max([last.get("heartbeat", ""), *(n["heartbeatAt"] or "" for n in nodes)])
        state = {n["name"]: [n["state"], n["heartbeatAt"], n["historyLineCount"], n["createdAt"]] for n in nodes}
        changed += [f"{path}/{name}" for name, now in state.items() if seen.get(name) != now]
        # remembered: live runs, and those at the boundaries that the next query's $gte returns again
        keep = {name: now for name, now in {**seen, **state}.items()
                if now[0] in LIVE_STATES or now[1] == heartbeat or now[3] == created}  # fmt: skip
        new_cursor[path] = {"created": created, "heartbeat": heartbeat, "runs": keep}
    return sorted(changed), new_cursor


# ---- one run: what changed, and fetching it --------------------------------------------------------------


def _loads(value: Any) -> Any:
    """W&B sends config, summary, system metrics and history keys as JSON strings (NaN written bare)."""
    return parse_json(value) if isinstance(value, str) else (value or {})


def last_step(node: dict) -> int:
    step = _loads(node.get("historyKeys")).get("lastStep")
    return -1 if step is None else int(step)


def fingerprint(node: dict) -> str:
    """Everything of a listed run whose change means a re-sync of that run."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Fetched:
    """What a worker thread brought back for one run, ready to store."""

    node: dict
    history: list[pa.Table]
    export_files: list[str]
    metadata: dict | None
    requests: int


def fetch_run(
    client: Client, entity: str, project: str, node: dict, stored_step: int, ingested: Sequence[str], work: Path,
    *, want_metadata: bool,
) -> Fetched:  # fmt: skip
    run_id, newest = node["name"], last_step(node)
    requests, tables, files = 0, [], list(ingested)
    if newest > stored_step:
        answer = client.graphql(PARQUET_QUERY, {"entity": entity, "project": project, "run": run_id,
                                                "liveKeys": ["_step"]})  # fmt: skip
        requests += 1
        parquet = answer["project"]["run"]["parquetHistory"]
        live_steps = [int(_loads(row)["_step"]) if isinstance(row, str) else int(row["_step"])
                      for row in parquet.get("liveData") or []]  # fmt: skip
        boundary = min(live_steps) if live_steps else newest + 1  # first step not in the exports
        if stored_step + 1 < boundary:
            urls = parquet.get("parquetUrls") or []
            fresh = [u for u in urls if urlsplit(u).path not in ingested] or urls
            for i, url in enumerate(fresh):
                dest = work / f"{run_id}-{i}.parquet"
                client.get(url, dest)
                requests += 1
                tables.append(export_rows(pq.read_table(dest), after_step=stored_step, before_step=boundary))
                dest.unlink()
            files = sorted({*ingested, *(urlsplit(u).path for u in urls)})
        start = max(stored_step + 1, boundary)
        while start <= newest:
            stop = min(start + PAGE_STEPS, newest + 1)
            variables = {"entity": entity, "project": project, "run": run_id, "minStep": start, "maxStep": stop,
                         "pageSize": PAGE_STEPS}  # fmt: skip
            answer = client.graphql(HISTORY_QUERY, variables)
            requests += 1
            tables.append(json_rows(answer["project"]["run"]["history"], after_step=stored_step))
            start = stop
    metadata = None
    if want_metadata:
        metadata, asked = fetch_metadata(client, entity, project, run_id)
        requests += asked
    return Fetched(node, tables, files, metadata, requests)


def fetch_metadata(client: Client, entity: str, project: str, run_id: str) -> tuple[dict | None, int]:
    answer = client.graphql(FILES_QUERY, {"entity": entity, "project": project, "run": run_id,
                                          "names": ["wandb-metadata.json"]})  # fmt: skip
    edges = ((answer.get("project") or {}).get("run") or {}).get("files", {}).get("edges") or []
    if not edges:
        return None, 1
    with tempfile.NamedTemporaryFile() as tmp:
        client.get(edges[0]["node"]["directUrl"], Path(tmp.name))
        return json.loads(Path(tmp.name).read_text() or "{}"), 2


# ---- W&B values to warehouse rows --------------------------------------------------------------------------


def export_rows(table: pa.Table, after_step: int, before_step: int) -> pa.Table:
    """A parquet export (one row per step, one typed column per metric) as long history rows, columnar."""
    step = table.column("_step").cast(pa.int64())
    keep = pc.and_(pc.greater(step, after_step), pc.less(step, before_step))
    table = table.filter(keep)
    step = table.column("_step").cast(pa.int64())
    timestamp = _float_column(table, "_timestamp")
    runtime = _float_column(table, "_runtime")
    parts = []
    for name in table.column_names:
        if name in SYSTEM_COLUMNS:
            continue
        for key, column in _leaf_columns(name, table.column(name)):
            valid = pc.is_valid(column)
            if not pc.any(valid).as_py():
                continue
            value, value_json = _split_column(column.filter(valid))
            count = len(value)
            parts.append(pa.table(
                [step.filter(valid), timestamp.filter(valid), runtime.filter(valid), pa.array([key] * count),
                 value, value_json], schema=HISTORY_SCHEMA))  # fmt: skip
    return (
        pa.concat_tables(parts).combine_chunks() if parts else HISTORY_SCHEMA.empty_table()
    )  # one chunk: DuckDB inserts it ~2x faster


def _float_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name in table.column_names:
        return table.column(name).cast(pa.float64())
    return pa.chunked_array([pa.nulls(table.num_rows, pa.float64())])


def _leaf_columns(name: str, column: pa.ChunkedArray) -> Iterator[tuple[str, pa.ChunkedArray]]:
    """Struct columns (dicts logged as metrics) become dotted keys, as the offline reader flattens them."""
    if pa.types.is_struct(column.type):
        for i in range(column.type.num_fields):
            child = pc.struct_field(column, [i])
            yield from _leaf_columns(f"{name}.{column.type.field(i).name}", child)
    else:
        yield name, column


def _split_column(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """The warehouse's value rule, for a whole column at once where its type allows."""
    typ = column.type
    if pa.types.is_floating(typ):
        return column.cast(pa.float64()).combine_chunks(), pa.nulls(len(column), pa.string())
    if pa.types.is_integer(typ):
        as_int = column.cast(pa.int64())
        beyond = pc.greater(pc.abs(as_int), EXACT_INT_LIMIT)
        exact = pc.if_else(beyond, pc.cast(as_int, pa.string()), pa.scalar(None, pa.string()))
        return as_int.cast(pa.float64(), safe=False).combine_chunks(), exact.combine_chunks()
    pairs = [split_value(v) for v in column.to_pylist()]  # strings, booleans, lists: a JSON text each
    return pa.array([p[0] for p in pairs], pa.float64()), pa.array([p[1] for p in pairs], pa.string())


def json_rows(rows: Sequence[str | dict], after_step: int) -> pa.Table:
    """HistoryPage rows (JSON text, one per step) as long history rows; only steps after `after_step`."""
    steps, stamps, runtimes, keys, values, jsons = [], [], [], [], [], []
    for raw in rows:
        row = parse_json(raw) if isinstance(raw, str) else raw
        step = row.get("_step")
        if step is None or step <= after_step:
            continue
        stamp, runtime = row.get("_timestamp"), row.get("_runtime")
        for name, item in row.items():
            if name in SYSTEM_COLUMNS:
                continue
            for path, leaf in leaf_paths(item, (name,)):
                value, value_json = split_value(leaf)
                steps.append(step)
                stamps.append(stamp)
                runtimes.append(runtime)
                keys.append(".".join(path))
                values.append(value)
                jsons.append(value_json)
    return pa.table([steps, stamps, runtimes, keys, values, jsons], schema=HISTORY_SCHEMA)


def _state_of(values: dict, skip_private: bool) -> NestedState:
    state = NestedState()
    for key, value in values.items():
        if skip_private and key.startswith("_"):
            continue
        state.apply((key,), to_json(value))
    return state


def _config(node: dict) -> dict:
    """W&B wraps each config value as {"value": …, "desc": …}."""
    return {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in _loads(node["config"]).items()}


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)  # W&B's times are UTC without an offset


# ---- the sync ---------------------------------------------------------------------------------------------


def sync_api(
    conn: duckdb.DuckDBPyConnection,
    projects: Sequence[str],
    *,
    filters: ApiFilters = ApiFilters(),
    force_refresh: bool = False,
    concurrency: int = 8,
    client_factory: Callable[[], Client] = Client,
    log: Callable[[str], None] = lambda message: None,
) -> ApiSyncReport:
    started = time.monotonic()
    store.ensure_schema(conn)
    report = ApiSyncReport()
    if not projects:
        return report
    client = client_factory()
    with tempfile.TemporaryDirectory(prefix="mvdata-wandb-") as work, ThreadPoolExecutor(concurrency) as pool:
        for path in projects:
            entity, _, project = path.partition("/")
            if not entity or not project:
                raise ApiSourceError(f"MVDATA_WANDB_PROJECTS: {path!r} is not entity/project")
            try:
                _sync_project(conn, client, pool, concurrency, Path(work), entity, project, filters, force_refresh,
                              report, log)  # fmt: skip
            except ApiSourceError:
                raise
            except Exception as exc:  # noqa: BLE001 - one project failing leaves the others and the stored data
                report.problems.append(f"{path}: listing failed: {_without_secrets(str(exc))}")
    if report.changed:
        store.bump_generation(conn)
    report.seconds = time.monotonic() - started
    return report


def _sync_project(
    conn: duckdb.DuckDBPyConnection, client: Client, pool: ThreadPoolExecutor, concurrency: int, work: Path,
    entity: str, project: str, filters: ApiFilters, force_refresh: bool, report: ApiSyncReport,
    log: Callable[[str], None],
) -> None:  # fmt: skip
    known = {
        run_id: (print_, step, files or [], deleted)
        for run_id, print_, step, files, deleted in conn.execute(
            f"""SELECT run_id, fingerprint, last_step, export_files, deleted_at FROM {SCHEMA}._api_runs
                WHERE entity = ? AND project = ?""",
            [entity, project],
        ).fetchall()
    }
    listed = list_runs(client, entity, project, filters.to_graphql())
    sweep_rows = conn.execute(
        f"SELECT sweep_id FROM {SCHEMA}.sweeps WHERE entity = ? AND project = ?", [entity, project]
    )
    stored_sweeps = {sweep_id for (sweep_id,) in sweep_rows.fetchall()}
    sweeps: set[str] = set()
    seen: set[str] = set()
    pending: list[tuple[RunKey, Future, bool, bool]] = []  # run, its fetch, new?, replacing what is stored?

    def drain(limit: int) -> None:
        while len(pending) > limit:
            _store_fetched(conn, client, *pending.pop(0), report)

    for node in listed:
        run_id = node["name"]
        seen.add(run_id)
        old = known.get(run_id)
        unchanged = old and not force_refresh and old[0] == fingerprint(node) and old[3] is None
        if node.get("sweepName") and (not unchanged or node["sweepName"] not in stored_sweeps):
            sweeps.add(node["sweepName"])  # a changed run may mean its sweep moved on
        if unchanged:
            report.runs.append(RunOutcome((entity, project, run_id), "unchanged"))
            continue
        is_new = old is None or force_refresh
        stored = -1 if is_new else (old[1] if old[1] is not None else -1)
        future = pool.submit(fetch_run, client, entity, project, node, stored, [] if is_new else old[2], work,
                             want_metadata=is_new)  # fmt: skip
        pending.append(((entity, project, run_id), future, is_new, bool(force_refresh and old)))
        drain(2 * concurrency)  # bounded read-ahead: memory stays flat as projects grow
    drain(0)
    _sync_sweeps(conn, client, entity, project, sweeps, report)
    if not filters.active:  # a filtered listing can't tell a deleted run from one the filter leaves out
        for run_id in known.keys() - seen:
            if known[run_id][3] is None:
                _mark_deleted(conn, (entity, project, run_id))
                report.runs.append(RunOutcome((entity, project, run_id), "deleted"))
    log(f"{entity}/{project}: {len(seen)} runs listed")


def _store_fetched(
    conn: duckdb.DuckDBPyConnection, client: Client, key: RunKey, future: Future, is_new: bool, replace: bool,
    report: ApiSyncReport,
) -> None:  # fmt: skip
    try:
        fetched: Fetched = future.result()
    except Exception as exc:  # noqa: BLE001 - one run failing never aborts the others; what is stored stays
        problem = f"{'/'.join(key)}: {type(exc).__name__}: {_without_secrets(str(exc))}"
        report.problems.append(problem)
        report.runs.append(RunOutcome(key, "failed", problem=problem))
        return
    node = fetched.node
    conn.execute("BEGIN")
    try:
        if replace:  # force_refresh: the old rows go in the same transaction as the new ones arrive
            store.delete_run(conn, *key)
        rows = 0
        for table in fetched.history:
            if table.num_rows:
                store.insert_history(conn, key, table)
                rows += table.num_rows
        config, summary = _config(node), _loads(node.get("summaryMetrics"))
        store.replace_values(conn, "config", key, _state_of(config, skip_private=True))
        store.replace_values(conn, "summary", key, _state_of(summary, skip_private=True))
        if fetched.metadata is not None:
            store.replace_values(conn, "metadata", key, _state_of(fetched.metadata, skip_private=False))
        _replace_system_metrics(conn, key, _loads(node.get("systemMetrics")), node)
        previous = (
            None
            if is_new
            else conn.execute(
                f"SELECT history_rows, host FROM {SCHEMA}.runs WHERE entity = ? AND project = ? AND run_id = ?",
                list(key),
            ).fetchone()
        )
        total_rows = rows + ((previous[0] or 0) if previous else 0)
        host = node.get("host") or (fetched.metadata or {}).get("host") or (previous[1] if previous else None)
        _upsert_run(conn, key, node, summary, total_rows, client.app_url(), host)
        conn.execute(
            f"""INSERT OR REPLACE INTO {SCHEMA}._api_runs VALUES (?, ?, ?, ?, ?, ?, ?, NULL, now())""",
            [*key, fingerprint(node), last_step(node), total_rows, fetched.export_files],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    report.runs.append(RunOutcome(key, "new" if is_new else "updated", rows, fetched.requests))
    report.rows["history"] = report.rows.get("history", 0) + rows


def _replace_system_metrics(conn: duckdb.DuckDBPyConnection, key: RunKey, metrics: dict, node: dict) -> None:
    """The listing carries each system metric's latest value: one row per metric at that time."""
    conn.execute(f"DELETE FROM {SCHEMA}.system_metrics WHERE entity = ? AND project = ? AND run_id = ?", list(key))
    stamp = metrics.get("_timestamp")
    when = datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else _time(node.get("heartbeatAt"))
    store.insert_stats(conn, key, [(when, k, to_json(v)) for k, v in metrics.items() if not k.startswith("_")])


def _upsert_run(
    conn: duckdb.DuckDBPyConnection, key: RunKey, node: dict, summary: dict, history_rows: int, app_url: str,
    host: str | None,
) -> None:  # fmt: skip
    runtime = summary.get("_runtime")
    conn.execute(
        f"""INSERT OR REPLACE INTO {SCHEMA}.runs VALUES
            (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'api', ?, ?, now(), NULL, NULL, NULL)""",
        [
            *key, key[2], node.get("displayName"), node.get("state"), _time(node.get("createdAt")),
            _time(node.get("heartbeatAt")), runtime if isinstance(runtime, int | float) else None,
            list(node.get("tags") or []), node.get("group"), node.get("jobType"), node.get("sweepName"),
            (node.get("user") or {}).get("username"), host, node.get("notes"),
            f"{app_url}/{key[0]}/{key[1]}/runs/{key[2]}", last_step(node) if last_step(node) >= 0 else None,
            history_rows,
        ],
    )  # fmt: skip


def _sync_sweeps(
    conn: duckdb.DuckDBPyConnection, client: Client, entity: str, project: str, sweep_ids: set[str],
    report: ApiSyncReport,
) -> None:  # fmt: skip
    for sweep_id in sorted(sweep_ids):
        try:
            answer = client.graphql(SWEEP_QUERY, {"entity": entity, "project": project, "name": sweep_id})
        except Exception as exc:  # noqa: BLE001 - a sweep's details failing leaves its runs stored
            report.problems.append(f"{entity}/{project} sweep {sweep_id}: {_without_secrets(str(exc))}")
            continue
        sweep = (answer.get("project") or {}).get("sweep")
        if sweep:
            conn.execute(
                f"INSERT OR REPLACE INTO {SCHEMA}.sweeps VALUES (?, ?, ?, ?, ?, ?)",
                [entity, project, sweep["name"], sweep.get("displayName"), sweep.get("state"), sweep.get("config")],
            )
            report.rows["sweeps"] = report.rows.get("sweeps", 0) + 1


def _mark_deleted(conn: duckdb.DuckDBPyConnection, key: RunKey) -> None:
    """Kept, with its data, but marked: state 'deleted' and the time the sync noticed."""
    where = "WHERE entity = ? AND project = ? AND run_id = ?"
    conn.execute(f"UPDATE {SCHEMA}.runs SET state = 'deleted', synced_at = now() {where}", list(key))
    conn.execute(f"UPDATE {SCHEMA}._api_runs SET deleted_at = now() {where}", list(key))

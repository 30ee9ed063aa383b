"""The W&B API source: every run of the projects in MVDATA_WANDB_PROJECTS into the warehouse, incrementally.

Through the wandb SDK: `wandb.Api` does the login (WANDB_API_KEY, WANDB_BASE_URL, netrc) and its wandb-core
sidecar makes every request, GraphQL and file downloads alike, with its retries, Retry-After and the API key
(sent only to the W&B host). The queries are written out because the SDK's run objects ask one more request per
run; each is valid against W&B's schema (the tests check every document against it).

Per project, the steps of a sync:
1. List the runs, 500 a page, with the light fields of the SDK's own listing (`LightweightRunFragment`): a
   re-sync that finds nothing changed costs the login check and one page per 500 runs.
2. For the runs that are new, changed, or whose history was not read to its last step, fetch the heavy fields
   (config, summary, system metrics, history keys) by name, 50 runs a request.
3. Read each such run's history after its last stored step, as wandb-core's history reader does: the parquet
   exports (only when they can hold steps not stored yet), then `HistoryPage` up to W&B's `lastStep`, whatever
   the exports and live data say (an active run often has neither). Record as synced only the highest step read,
   so a step W&B had not served yet is asked for again next time.
4. Store each run in one transaction; runs are fetched concurrently and stored by this thread.
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
from urllib.parse import quote

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from mvdata_assets.runs import store
from mvdata_assets.runs.store import SCHEMA, RunKey
from mvdata_assets.runs.values import EXACT_INT_LIMIT, NestedState, leaf_paths, parse_json, split_value, to_json

PAGE_RUNS = 500  # runs per listing page (light fields only)
DETAIL_RUNS = 50  # runs whose heavy fields come in one request
PAGE_STEPS = 1000  # steps per HistoryPage request (the SDK's page size)
DOWNLOAD_TIMEOUT_S = 600.0  # one export or run file, through wandb-core
SYSTEM_COLUMNS = ("_step", "_timestamp", "_runtime")
WANDB_CONFIG_KEYS = ("_wandb", "wandb_version")  # W&B's own entries of a run's config, not the user's
LIVE_STATES = ("running", "pending", "preempting")

# what the SDK's listing asks for (wandb/apis/public/runs.py, LightweightRunFragment), less what never changes
LIGHT_FIELDS = """name displayName state createdAt heartbeatAt tags group jobType sweepName commit description notes
    historyLineCount user { username }"""
HEAVY_FIELDS = "name config summaryMetrics systemMetrics historyKeys"
POLL_FIELDS = "name state heartbeatAt historyLineCount"

RUNS_QUERY = """query Runs($project: String!, $entity: String!, $cursor: String, $perPage: Int, $order: String,
        $filters: JSONString) {
    project(name: $project, entityName: $entity) {
        runs(filters: $filters, after: $cursor, first: $perPage, order: $order) {
            edges { node { FIELDS } cursor }
            pageInfo { endCursor hasNextPage }
        }
    }
}"""

# a sensor tick: the run count and the newest run (new runs), and the runs live now or at the last tick
POLL_QUERY = """query RunsPoll($project: String!, $entity: String!, $cursor: String, $perPage: Int,
        $filters: JSONString) {
    project(name: $project, entityName: $entity) {
        runCount
        newest: runs(order: "-created_at", first: 1) { edges { node { name } } }
        runs(filters: $filters, after: $cursor, first: $perPage) {
            edges { node { FIELDS } cursor }
            pageInfo { endCursor hasNextPage }
        }
    }
}""".replace("FIELDS", POLL_FIELDS)

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
        run(name: $run) { files(names: $names) { edges { node { name url sizeBytes } } } }
    }
}"""

SWEEP_QUERY = """query Sweep($project: String!, $entity: String!, $name: String!) {
    project(name: $project, entityName: $entity) {
        sweep(sweepName: $name) { name displayName state config }
    }
}"""

DOCUMENTS = (RUNS_QUERY.replace("FIELDS", LIGHT_FIELDS), RUNS_QUERY.replace("FIELDS", HEAVY_FIELDS), POLL_QUERY,
             PARQUET_QUERY, HISTORY_QUERY, FILES_QUERY, SWEEP_QUERY)  # fmt: skip

HISTORY_SCHEMA = pa.schema(
    [("step", pa.int64()), ("timestamp", pa.float64()), ("runtime_s", pa.float64()), ("key", pa.string()),
     ("value", pa.float64()), ("value_json", pa.string())]
)  # fmt: skip


class ApiSourceError(RuntimeError):
    """A whole source can't be read (a bad API key, an unknown project): one clear message, no secret in it."""


class RunVanished(RuntimeError):
    """A listed run that W&B no longer has (deleted during the sync): the next listing marks it deleted."""


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
    """GraphQL and file downloads through the SDK's wandb-core sidecar, each bounded to `timeout_s`."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        import wandb  # imported only when an API source is configured: the SDK costs ~1 s to import

        self.timeout_s = timeout_s
        try:
            self.api = wandb.Api(timeout=max(1, round(timeout_s)))
        except Exception as exc:  # noqa: BLE001 - the SDK raises several types for a refused login
            base = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
            raise ApiSourceError(f"W&B login at {base} failed: {without_secrets(str(exc))}") from None
        self.service = self.api._service_api  # noqa: SLF001 - the SDK's own transport; no public raw GraphQL in 0.31

    def graphql(self, query: str, variables: dict) -> dict:
        return self.service.execute_graphql(query, variables, timeout=self.timeout_s)

    def download(self, url: str, dest: Path, size: int = 0) -> None:
        """As the SDK's `File.download`: wandb-core fetches the URL, with the API key when it is W&B's own host."""
        from wandb.proto import wandb_api_pb2 as apb

        request = apb.DownloadFileRequest(path=str(dest), url=url, size=size)
        self.service.send_api_request(apb.ApiRequest(download_file_request=request), timeout=DOWNLOAD_TIMEOUT_S)

    def run_url(self, key: RunKey) -> str:
        """The run's page, built as the SDK's `Run.url` from the SDK's app URL (wandb.ai, its default server, or a
        self-hosted one: `WANDB_APP_URL` overrides)."""
        entity, project, run_id = (quote(part, safe="") for part in key)
        return f"{self.service.app_url}{entity}/{project}/runs/{run_id}"


def without_secrets(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def _pages(client: Client, query: str, variables: dict, per_page: int) -> Iterator[dict]:
    """The `project` of each page of a runs listing, paged with the last edge's cursor as the SDK pages."""
    entity, project = variables["entity"], variables["project"]
    cursor = None
    while True:
        data = client.graphql(query, {**variables, "cursor": cursor, "perPage": per_page})
        found = data.get("project")
        if not found:
            raise ApiSourceError(f"W&B project {entity}/{project} was not found (or this API key can't see it)")
        yield found
        runs = found.get("runs") or {}
        edges = runs.get("edges") or []
        following = (edges[-1] or {}).get("cursor") if edges else None
        if not (runs.get("pageInfo") or {}).get("hasNextPage") or not following or following == cursor:
            return  # the last page, or a page W&B says is not the last but gives nothing to go on from
        cursor = following


def _nodes(runs: dict | None) -> Iterator[dict]:
    for edge in (runs or {}).get("edges") or []:
        if edge and edge.get("node"):
            yield edge["node"]


def list_runs(
    client: Client, entity: str, project: str, filters: dict, fields: str = LIGHT_FIELDS, per_page: int | None = None
) -> Iterator[dict]:
    variables = {"entity": entity, "project": project, "order": "+created_at", "filters": json.dumps(filters)}
    for page in _pages(client, RUNS_QUERY.replace("FIELDS", fields), variables, per_page or PAGE_RUNS):
        yield from _nodes(page.get("runs"))


def run_details(client: Client, entity: str, project: str, names: Sequence[str]) -> dict[str, dict]:
    """The heavy fields of the named runs, by name (a run deleted meanwhile is missing)."""
    nodes = list_runs(client, entity, project, {"name": {"$in": list(names)}}, HEAVY_FIELDS, per_page=len(names))
    return {node["name"]: node for node in nodes}


def poll_project(client: Client, path: str, last: dict | None) -> tuple[list[str], int, dict]:
    """What changed in one project since the last sensor tick: (runs changed, runs new, the project's new cursor).

    One light request: the run count and the newest run tell new runs; the runs live now or live at the last tick
    tell live runs moving on (history, heartbeat) and ending (their state). Filters use only keys the SDK documents
    for `Api.runs` (`state`, `name`), so the cursor never holds a value a server could refuse.
    """
    entity, _, project = path.partition("/")
    was_live = sorted((last or {}).get("live", {}))
    live_filter: dict = {"state": {"$in": list(LIVE_STATES)}}
    filters = {"$or": [live_filter, {"name": {"$in": was_live}}]} if was_live else live_filter
    variables = {"entity": entity, "project": project, "filters": json.dumps(filters)}
    count, newest, seen = 0, None, {}
    for i, page in enumerate(_pages(client, POLL_QUERY, variables, PAGE_RUNS)):
        if i == 0:
            count = page.get("runCount") or 0
            newest = next((node["name"] for node in _nodes(page.get("newest"))), None)
        for node in _nodes(page.get("runs")):
            seen[node["name"]] = [node.get("state"), node.get("heartbeatAt"), node.get("historyLineCount")]
    cursor = {"count": count, "newest": newest, "live": {n: s for n, s in seen.items() if s[0] in LIVE_STATES}}
    if last is None:
        return [], count, cursor
    before = last.get("live", {})
    changed = [f"{path}/{name}" for name, now in seen.items() if name in before and before[name] != now]
    changed += [f"{path}/{name}" for name in before if name not in seen]  # deleted while live
    changed += [
        f"{path}/{name}"
        for name, now in seen.items()
        if name not in before and now[0] in LIVE_STATES and name != newest
    ]  # fmt: skip - resumed, or new behind the newest
    new = max(count - last.get("count", 0), int(newest != last.get("newest")))
    return sorted(set(changed)), new, cursor


# ---- one run: what changed, and fetching it --------------------------------------------------------------


def _loads(value: Any) -> Any:
    """W&B sends config, summary, system metrics and history keys as JSON strings (NaN written bare), or null."""
    loaded = parse_json(value) if isinstance(value, str) else value
    return loaded if isinstance(loaded, dict) else {}


def last_step(node: dict) -> int:
    """W&B's last logged step: `historyKeys.lastStep`, else the summary's `_step`; -1 for none."""
    step = _loads(node.get("historyKeys")).get("lastStep")
    if not isinstance(step, int | float):
        step = _loads(node.get("summaryMetrics")).get("_step")
    return int(step) if isinstance(step, int | float) else -1


def fingerprint(node: dict) -> str:
    """Every light field of a listed run: a change means a re-sync of that run."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Fetched:
    """What a worker thread brought back for one run, ready to store."""

    node: dict
    history: list[pa.Table]
    stored_through: int  # the highest step read, this time or before
    metadata: dict | None
    requests: int


def _run_of(answer: dict, run_id: str) -> dict:
    run = (answer.get("project") or {}).get("run")
    if run is None:
        raise RunVanished(f"W&B no longer has run {run_id}")
    return run


def fetch_run(
    client: Client, entity: str, project: str, node: dict, stored_step: int, work: Path, *, want_metadata: bool
) -> Fetched:
    """Every step after `stored_step`: the exports where they may hold such steps, then `HistoryPage` up to W&B's
    last step (wandb-core reads live history the same way when the answer names no live steps)."""
    run_id, newest = node["name"], last_step(node)
    requests, tables, through = 0, [], stored_step
    variables = {"entity": entity, "project": project, "run": run_id}
    if newest > stored_step or newest < 0:  # W&B's last step unknown (no history keys): ask all the same
        answer = client.graphql(PARQUET_QUERY, {**variables, "liveKeys": ["_step"]})
        requests += 1
        parquet = _run_of(answer, run_id).get("parquetHistory") or {}
        live_steps = [step for step in map(_step_of, parquet.get("liveData") or []) if step is not None]
        newest = max([newest, *live_steps])
        exports_end = min(live_steps) if live_steps else None  # unknown: the exports may hold any step
        if exports_end is None or exports_end > stored_step + 1:
            for i, url in enumerate(parquet.get("parquetUrls") or []):
                dest = work / f"{run_id}-{i}.parquet"
                client.download(url, dest)
                requests += 1
                rows, last = export_rows(pq.read_table(dest), after_step=stored_step)
                dest.unlink()
                tables.append(rows)
                through = max(through, last)
        start = through + 1
        while start <= newest:
            stop = min(start + PAGE_STEPS, newest + 1)
            answer = client.graphql(HISTORY_QUERY, {**variables, "minStep": start, "maxStep": stop,
                                                    "pageSize": stop - start})  # fmt: skip
            requests += 1
            rows, last = json_rows(_run_of(answer, run_id).get("history") or [], after_step=through)
            tables.append(rows)
            through = max(through, last)
            start = stop
    metadata = None
    if want_metadata:
        metadata, asked = fetch_metadata(client, entity, project, run_id, work)
        requests += asked
    return Fetched(node, tables, through, metadata, requests)


def _step_of(row: Any) -> int | None:
    row = parse_json(row) if isinstance(row, str) else row
    step = row.get("_step") if isinstance(row, dict) else None
    return int(step) if isinstance(step, int | float) else None  # W&B sends some steps as floats


def fetch_metadata(client: Client, entity: str, project: str, run_id: str, work: Path) -> tuple[dict | None, int]:
    """`wandb-metadata.json` (host, os, python, gpu, git, …) as the SDK's `Run.metadata` gets it: `File.url`,
    downloaded by wandb-core with the API key. A run without the file (or with `files` null) has none."""
    answer = client.graphql(FILES_QUERY, {"entity": entity, "project": project, "run": run_id,
                                          "names": ["wandb-metadata.json"]})  # fmt: skip
    files = _run_of(answer, run_id).get("files") or {}
    node = next((e["node"] for e in files.get("edges") or [] if e and e.get("node") and e["node"].get("url")), None)
    if node is None:
        return None, 1
    dest = work / f"{run_id}-metadata.json"
    client.download(node["url"], dest, node.get("sizeBytes") or 0)
    try:
        metadata = parse_json(dest.read_text(encoding="utf-8") or "{}")
    finally:
        dest.unlink(missing_ok=True)
    return (metadata if isinstance(metadata, dict) else None), 2


# ---- W&B values to warehouse rows --------------------------------------------------------------------------


def export_rows(table: pa.Table, after_step: int) -> tuple[pa.Table, int]:
    """A parquet export (one row per step, one typed column per metric) as long history rows of the steps after
    `after_step`, columnar; and the highest step it holds (`after_step` when none is later)."""
    table = table.filter(pc.greater(table.column("_step").cast(pa.int64()), after_step))
    step = table.column("_step").cast(pa.int64())
    last = pc.max(step).as_py() if table.num_rows else None
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
    rows = pa.concat_tables(parts).combine_chunks() if parts else HISTORY_SCHEMA.empty_table()  # one chunk: DuckDB
    return rows, after_step if last is None else last  # inserts it ~2x faster


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


def json_rows(rows: Sequence[str | dict], after_step: int) -> tuple[pa.Table, int]:
    """HistoryPage rows (JSON text, one per step) as long history rows of the steps after `after_step`; and the
    highest step among them (`after_step` when none is later)."""
    steps, stamps, runtimes, keys, values, jsons = [], [], [], [], [], []
    last = after_step
    for raw in rows:
        row = parse_json(raw) if isinstance(raw, str) else raw
        step = _step_of(row)
        if step is None or step <= after_step:
            continue
        last = max(last, step)
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
    return pa.table([steps, stamps, runtimes, keys, values, jsons], schema=HISTORY_SCHEMA), last


def _state_of(values: dict, leave_out: Sequence[str] = ()) -> NestedState:
    state = NestedState()
    for key, value in values.items():
        if key not in leave_out:
            state.apply((key,), to_json(value))
    return state


def _config(node: dict) -> dict:
    """The user's config: W&B wraps each value as {"value": …, "desc": …}; its own `_wandb` entries are left out
    (user keys starting with `_` are kept)."""
    values = ((k, v) for k, v in _loads(node.get("config")).items() if k not in WANDB_CONFIG_KEYS)
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in values}


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
                report.problems.append(f"{path}: listing failed: {without_secrets(str(exc))}")
    report.seconds = time.monotonic() - started
    return report


@dataclass
class _Known:
    """What the warehouse holds of an API run: the listing it was synced from, and how far its history goes."""

    fingerprint: str | None
    stored_step: int  # the highest step read
    listed_step: int  # W&B's last step then: above stored_step, the history is still to finish
    deleted: bool


def _sync_project(
    conn: duckdb.DuckDBPyConnection, client: Client, pool: ThreadPoolExecutor, concurrency: int, work: Path,
    entity: str, project: str, filters: ApiFilters, force_refresh: bool, report: ApiSyncReport,
    log: Callable[[str], None],
) -> None:  # fmt: skip
    known = {
        run_id: _Known(print_, -1 if stored is None else stored, -1 if listed is None else listed, deleted is not None)
        for run_id, print_, stored, listed, deleted in conn.execute(
            f"""SELECT run_id, fingerprint, last_step, listed_last_step, deleted_at FROM {SCHEMA}._api_runs
                WHERE entity = ? AND project = ?""",
            [entity, project],
        ).fetchall()
    }
    where = [entity, project]
    sweep_rows = conn.execute(f"SELECT sweep_id FROM {SCHEMA}.sweeps WHERE entity = ? AND project = ?", where)
    stored_sweeps = {sweep_id for (sweep_id,) in sweep_rows.fetchall()}
    sweeps: set[str] = set()
    seen: set[str] = set()
    waiting: list[dict] = []  # changed runs whose heavy fields are still to fetch
    pending: list[tuple[RunKey, Future, bool, bool]] = []  # run, its fetch, new?, replacing what is stored?

    def drain(limit: int) -> None:
        while len(pending) > limit:
            _store_fetched(conn, client, *pending.pop(0), report)

    def fetch_waiting() -> None:
        details = run_details(client, entity, project, [node["name"] for node in waiting])
        for node in waiting:
            key = (entity, project, node["name"])
            if node["name"] not in details:
                report.problems.append(f"{'/'.join(key)}: deleted on W&B during the sync")
                continue
            old = known.get(node["name"])
            is_new = old is None or force_refresh
            stored = -1 if is_new else old.stored_step
            future = pool.submit(fetch_run, client, entity, project, {**node, **details[node["name"]]}, stored, work,
                                 want_metadata=is_new)  # fmt: skip
            pending.append((key, future, is_new, bool(force_refresh and old)))
            drain(2 * concurrency)  # bounded read-ahead: memory stays flat as projects grow
        waiting.clear()

    for node in list_runs(client, entity, project, filters.to_graphql()):
        run_id = node["name"]
        seen.add(run_id)
        old = known.get(run_id)
        unchanged = (old is not None and not force_refresh and not old.deleted
                     and old.fingerprint == fingerprint(node) and old.stored_step >= old.listed_step)  # fmt: skip
        if node.get("sweepName") and (not unchanged or node["sweepName"] not in stored_sweeps):
            sweeps.add(node["sweepName"])  # a changed run may mean its sweep moved on
        if unchanged:
            report.runs.append(RunOutcome((entity, project, run_id), "unchanged"))
            continue
        waiting.append(node)
        if len(waiting) == DETAIL_RUNS:
            fetch_waiting()
    if waiting:
        fetch_waiting()
    drain(0)
    _sync_sweeps(conn, client, entity, project, sweeps, report)
    if not filters.active:  # a filtered listing can't tell a deleted run from one the filter leaves out
        for run_id in known.keys() - seen:
            if not known[run_id].deleted:
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
        problem = f"{'/'.join(key)}: {type(exc).__name__}: {without_secrets(str(exc))}"
        report.problems.append(problem)
        report.runs.append(RunOutcome(key, "failed", problem=problem))
        return
    node = fetched.node
    with store.transaction(conn):
        if replace:  # force_refresh: the old rows go in the same transaction as the new ones arrive
            store.delete_run(conn, *key)
        rows = 0
        for table in fetched.history:
            if table.num_rows:
                store.insert_history(conn, key, table)
                rows += table.num_rows
        config, summary = _config(node), _loads(node.get("summaryMetrics"))
        store.replace_values(conn, "config", key, _state_of(config))
        store.replace_values(conn, "summary", key, _state_of(summary, [k for k in summary if k.startswith("_")]))
        if fetched.metadata is not None:
            store.replace_values(conn, "metadata", key, _state_of(fetched.metadata))
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
        host = (fetched.metadata or {}).get("host") or (previous[1] if previous else None)
        stored_step = fetched.stored_through if fetched.stored_through >= 0 else None
        _upsert_run(conn, key, node, summary, total_rows, client.run_url(key), host, stored_step)
        conn.execute(
            f"""INSERT OR REPLACE INTO {SCHEMA}._api_runs
                (entity, project, run_id, fingerprint, last_step, listed_last_step, history_rows, deleted_at, synced_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, NULL, now())""",
            [*key, fingerprint(_light(node)), stored_step, last_step(node), total_rows],
        )
        store.bump_generation(conn)  # with the rows: a kill after the commit still leaves the exports to catch up
    report.runs.append(RunOutcome(key, "new" if is_new else "updated", rows, fetched.requests))
    report.rows["history"] = report.rows.get("history", 0) + rows


def _light(node: dict) -> dict:
    """The listing's fields of a run whose heavy fields were fetched too (what the next listing compares)."""
    heavy = HEAVY_FIELDS.split()[1:]
    return {k: v for k, v in node.items() if k not in heavy}


def _replace_system_metrics(conn: duckdb.DuckDBPyConnection, key: RunKey, metrics: dict, node: dict) -> None:
    """W&B keeps each system metric's latest value: one row per metric at that time."""
    conn.execute(f"DELETE FROM {SCHEMA}.system_metrics WHERE entity = ? AND project = ? AND run_id = ?", list(key))
    stamp = metrics.get("_timestamp")
    when = datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else _time(node.get("heartbeatAt"))
    store.insert_stats(conn, key, [(when, k, to_json(v)) for k, v in metrics.items() if not k.startswith("_")])


def _upsert_run(
    conn: duckdb.DuckDBPyConnection, key: RunKey, node: dict, summary: dict, history_rows: int, url: str,
    host: str | None, stored_step: int | None,
) -> None:  # fmt: skip
    runtime = summary.get("_runtime")
    conn.execute(
        f"""INSERT OR REPLACE INTO {SCHEMA}.runs VALUES
            (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'api', ?, ?, now(), NULL, NULL, NULL)""",
        [
            *key, key[2], node.get("displayName"), node.get("state"), _time(node.get("createdAt")),
            _time(node.get("heartbeatAt")), runtime if isinstance(runtime, int | float) else None,
            list(node.get("tags") or []), node.get("group"), node.get("jobType"), node.get("sweepName"),
            (node.get("user") or {}).get("username"), host, node.get("notes"), url, stored_step, history_rows,
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
            report.problems.append(f"{entity}/{project} sweep {sweep_id}: {without_secrets(str(exc))}")
            continue
        sweep = (answer.get("project") or {}).get("sweep")
        if not sweep:
            continue
        try:
            config = to_json(yaml.safe_load(sweep.get("config") or "{}"))  # the user's YAML, kept as JSON
        except yaml.YAMLError as exc:
            report.problems.append(f"{entity}/{project} sweep {sweep_id}: its config is not YAML: {exc}")
            config = to_json(sweep.get("config"))
        with store.transaction(conn):
            conn.execute(
                f"INSERT OR REPLACE INTO {SCHEMA}.sweeps VALUES (?, ?, ?, ?, ?, ?)",
                [entity, project, sweep["name"], sweep.get("displayName"), sweep.get("state"), config],
            )
            store.bump_generation(conn)
        report.rows["sweeps"] = report.rows.get("sweeps", 0) + 1


def _mark_deleted(conn: duckdb.DuckDBPyConnection, key: RunKey) -> None:
    """Kept, with its data, but marked: state 'deleted' and the time the sync noticed."""
    where = "WHERE entity = ? AND project = ? AND run_id = ?"
    with store.transaction(conn):
        conn.execute(f"UPDATE {SCHEMA}.runs SET state = 'deleted', synced_at = now() {where}", list(key))
        conn.execute(f"UPDATE {SCHEMA}._api_runs SET deleted_at = now() {where}", list(key))
        store.bump_generation(conn)

"""The W&B API source: every run of the projects in MVDATA_WANDB_PROJECTS into the warehouse, incrementally.

The requests are in wandb_api.py (through the SDK's wandb-core sidecar), one run's history and metadata in
api_run.py; this module decides what to fetch and stores it.

Per project, the steps of a sync:
1. List the runs, 500 a page, with the light fields of the SDK's own listing (`LightweightRunFragment`): a
   re-sync that finds nothing changed costs the login check and one page per 500 runs.
2. For the runs that are new, changed, or whose history was not read to its last step, fetch the heavy fields
   (config, summary, system metrics, history keys) by name, 50 runs a request.
3. Read each such run's history after its last stored step (api_run.py). Record as synced only the highest step
   read, so a step W&B had not served yet is asked for again next time.
4. Store each run in one transaction; runs are fetched concurrently and stored by this thread.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import yaml

from mvdata_assets import defaults
from mvdata_assets.runs import store
from mvdata_assets.runs.api_run import Fetched, fetch_run
from mvdata_assets.runs.store import SCHEMA, RunKey
from mvdata_assets.runs.values import NestedState, to_json
from mvdata_assets.runs.wandb_api import (
    HEAVY_FIELDS,
    SWEEP_QUERY,
    ApiSourceError,
    Client,
    field_json,
    last_step,
    list_runs,
    run_details,
    split_project,
    without_secrets,
)

DETAIL_RUNS = 50  # runs whose heavy fields come in one request
WANDB_CONFIG_KEYS = ("_wandb", "wandb_version")  # W&B's own entries of a run's config, not the user's


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


def fingerprint(node: dict) -> str:
    """Every light field of a listed run: a change means a re-sync of that run."""
    return hashlib.sha256(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()


def _state_of(values: dict, leave_out: Sequence[str] = ()) -> NestedState:
    state = NestedState()
    for key, value in values.items():
        if key not in leave_out:
            state.apply((key,), to_json(value))
    return state


def _config(node: dict) -> dict:
    """The user's config: W&B wraps each value as {"value": …, "desc": …}; its own `_wandb` entries are left out
    (user keys starting with `_` are kept)."""
    values = ((k, v) for k, v in field_json(node.get("config")).items() if k not in WANDB_CONFIG_KEYS)
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
    concurrency: int = defaults.API_CONCURRENCY,
    client_factory: Callable[[], Client] = Client,
    log: Callable[[str], None] = lambda message: None,
) -> ApiSyncReport:
    started = time.monotonic()
    store.ensure_schema(conn)
    report = ApiSyncReport()
    if not projects:
        return report
    try:  # every entry before any request: a bad one is named, not met after the others synced
        paths = [(path, *split_project(path)) for path in projects]
    except ValueError as exc:
        raise ApiSourceError(str(exc)) from None
    client = client_factory()
    with tempfile.TemporaryDirectory(prefix="mvdata-wandb-") as work, ThreadPoolExecutor(concurrency) as pool:
        for path, entity, project in paths:
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
        config, summary = _config(node), field_json(node.get("summaryMetrics"))
        written = {
            "runs": 1,
            "history": rows,
            "config": store.replace_values(conn, "config", key, _state_of(config)),
            "summary": store.replace_values(
                conn, "summary", key, _state_of(summary, [k for k in summary if k.startswith("_")])
            ),
            "system_metrics": _replace_system_metrics(conn, key, field_json(node.get("systemMetrics")), node),
        }
        if fetched.metadata is not None:
            written["metadata"] = store.replace_values(conn, "metadata", key, _state_of(fetched.metadata))
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
    report.runs.append(RunOutcome(key, "new" if is_new else "updated", fetched.requests))
    for table, count in written.items():
        report.rows[table] = report.rows.get(table, 0) + count


def _light(node: dict) -> dict:
    """The listing's fields of a run whose heavy fields were fetched too (what the next listing compares)."""
    heavy = HEAVY_FIELDS.split()[1:]
    return {k: v for k, v in node.items() if k not in heavy}


def _replace_system_metrics(conn: duckdb.DuckDBPyConnection, key: RunKey, metrics: dict, node: dict) -> int:
    """W&B keeps each system metric's latest value: one row per metric at that time; returns how many rows."""
    conn.execute(f"DELETE FROM {SCHEMA}.system_metrics WHERE entity = ? AND project = ? AND run_id = ?", list(key))
    stamp = metrics.get("_timestamp")
    when = datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int | float) else _time(node.get("heartbeatAt"))
    return store.insert_stats(conn, key, [(when, k, to_json(v)) for k, v in metrics.items() if not k.startswith("_")])


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


def _mark_deleted(conn: duckdb.DuckDBPyConnection, key: RunKey) -> None:
    """Kept, with its data, but marked: state 'deleted' and the time the sync noticed."""
    where = "WHERE entity = ? AND project = ? AND run_id = ?"
    with store.transaction(conn):
        conn.execute(f"UPDATE {SCHEMA}.runs SET state = 'deleted', synced_at = now() {where}", list(key))
        conn.execute(f"UPDATE {SCHEMA}._api_runs SET deleted_at = now() {where}", list(key))
        store.bump_generation(conn)

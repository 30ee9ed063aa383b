"""A W&B-compatible HTTP server on 127.0.0.1 for tests and benchmarks of the W&B API source.

Since wandb 0.27 every `wandb.Api` request is made by the Go sidecar `wandb-core`, so mocking Python HTTP does
nothing: tests point `WANDB_BASE_URL` at this server instead. It speaks enough GraphQL for the listing and history
flows of wandb 0.31: every document is validated against W&B's schema (`wandb_schema.graphql`, rebuilt from the code
W&B generates from it) and refused with a GraphQL server's errors when it asks for a field, argument or variable type
W&B does not have. It answers as W&B does where W&B's answers surprise: null `endCursor` on an empty page, null
`files`, active runs with neither exports nor live data, YAML sweep configs, run files that need the API key. It
serves run files and parquet history exports over GET, injects faults and logs every request.

    with WandbServer() as server:
        server.add_run("ent", "proj", "run1", config={"lr": 0.1}, history=[{"loss": 1.0}], exported_steps=0)
        env = server.env()  # WANDB_BASE_URL and WANDB_API_KEY for the SDK
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import graphql
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

logger = logging.getLogger(__name__)

API_KEY = "0123456789abcdef0123456789abcdef01234567"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
STEP = "_step"
_BASE_TIME = datetime(2024, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# GraphQL: every document is validated against W&B's schema (the reference subset in wandb_schema.graphql, plus
# the fields of wandb-core's own login query), then executed by graphql-core with the resolvers below.

SCHEMA_FILE = Path(__file__).with_name("wandb_schema.graphql")
# wandb-core's `Viewer` query (core/internal/gql/gql_gen.go, ViewerViewerUser), sent by `wandb.Api()` at login;
# the reference subset covers only what the project asks for itself.
_LOGIN_FIELDS = """
extend type User { entity: String  email: String  flags: JSONString  teams: EntityConnection }
type EntityConnection { edges: [EntityEdge!]! }
type EntityEdge { node: Entity }
type Entity { name: String! }
"""
SCHEMA = graphql.build_schema(SCHEMA_FILE.read_text(encoding="utf-8") + _LOGIN_FIELDS)


class GraphQLError(Exception):
    """An error reported to the client in the GraphQL `errors` list (HTTP 200), which wandb-core does not retry."""


_DOCUMENTS: dict[str, tuple[graphql.DocumentNode | None, list[str]]] = {}


def check_document(text: str) -> tuple[graphql.DocumentNode | None, list[str]]:
    """The parsed document and the errors a GraphQL server gives for it (syntax, unknown fields and arguments,
    wrong variable types); cached, as the SDK sends the same few documents again and again."""
    found = _DOCUMENTS.get(text)
    if found is None:
        try:
            document = graphql.parse(text)
        except graphql.GraphQLError as error:
            found = (None, [error.message])
        else:
            found = (document, [error.message for error in graphql.validate(SCHEMA, document)])
        if len(_DOCUMENTS) < 1000:
            _DOCUMENTS[text] = found
    return found


def operation_name(body: Mapping[str, Any]) -> str:
    """The operation's name: wandb-core sends `operationName` only for its own queries, not for the SDK's."""
    name = body.get("operationName")
    if name:
        return str(name)
    m = re.search(r"\b(?:query|mutation|subscription)\s+([_A-Za-z][_0-9A-Za-z]*)", str(body.get("query") or ""))
    return m.group(1) if m else ""


def _resolve(source: Any, info: graphql.GraphQLResolveInfo, **args: Any) -> Any:
    """Plain data answers from its keys; the node classes below from their `gql_<field>` methods."""
    if isinstance(source, dict):
        return source.get(info.field_name)
    if isinstance(source, _RunNode) and info.field_name in source.run.nulls:
        return None  # graphql-core refuses this for a field the schema says is never null
    return getattr(source, "gql_" + info.field_name)(**args)


# ---------------------------------------------------------------------------------------------------------------
# Values: W&B's encodings of config, summary, timestamps, history rows.


def _dumps(value: Any) -> str:
    """JSON the way the W&B backend stores it: NaN/Infinity literals, exact big ints, unicode kept."""
    return json.dumps(value, ensure_ascii=False, allow_nan=True, separators=(",", ":"))


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings (as wandb-core's parquet reader returns them): Go's JSON parser rejects NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _timestamp(value: datetime | str | float | None, default: datetime) -> datetime:
    """A naive UTC datetime at whole seconds: W&B reports createdAt/heartbeatAt as `2024-01-01T00:00:00`."""
    if value is None:
        value = default
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.replace(microsecond=0)


def _format_time(value: datetime) -> str:
    return value.strftime(TIME_FORMAT)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _cursor(key: Any) -> str:
    return base64.urlsafe_b64encode(_dumps(key).encode()).decode()


def _uncursor(cursor: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except ValueError as e:
        raise GraphQLError(f"invalid cursor {cursor!r}") from e


def _sample(n: int, k: int) -> list[int]:
    """Evenly spaced indices including the first and last, as W&B samples history for charts."""
    if k <= 0:
        return []
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# ---------------------------------------------------------------------------------------------------------------
# History: arrow columns (memory for the 200 runs x 20k steps benchmark), exact for any JSON value.


def _kind(value: Any) -> str:
    t = type(value)
    if t is bool:
        return "b"
    if t is int:
        return "i" if -(2**63) <= value < 2**63 else "x"
    if t is float:
        return "f"
    if t is str:
        return "s"
    return "x"


_ARROW_TYPES = {"b": pa.bool_(), "i": pa.int64(), "f": pa.float64(), "s": pa.string()}


def _encode_column(values: list[Any]) -> tuple[pa.Array, bool]:
    """One key's values as a typed arrow array, or as JSON text when no single arrow type holds them exactly."""
    kinds = set()
    for v in values:
        if v is not None:
            kinds.add(_kind(v))
            if len(kinds) > 1:
                break
    if len(kinds) == 1 and (kind := next(iter(kinds))) in _ARROW_TYPES:
        return pa.array(values, _ARROW_TYPES[kind]), False
    return pa.array([None if v is None else _dumps(v) for v in values], pa.string()), True


def _export_column(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A JSON-text column as W&B's exporter would type it (mixed ints/floats as double, dicts as structs)."""
    values = [None if v is None else json.loads(v) for v in column.to_pylist()]
    try:
        return pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return column


class History:
    """A run's history rows, sorted by `_step`; immutable, so request threads read it without locks."""

    def __init__(self, table: pa.Table, json_keys: frozenset[str], exported: int, export_files: int) -> None:
        self.table = table
        self.json_keys = json_keys
        self.steps = array("q", table.column(STEP).to_pylist()) if table.num_rows else array("q")
        self.exported = max(0, min(exported, table.num_rows))
        self.export_files = max(1, export_files)
        self._key_info: dict[str, Any] | None = None

    @staticmethod
    def encode(rows: list[Mapping[str, Any]] | pa.Table, first_step: int) -> tuple[pa.Table, frozenset[str]]:
        """Rows (dicts; missing `_step` numbered on from `first_step`; None = key not logged) or a ready table."""
        if isinstance(rows, pa.Table):
            table = rows
            if STEP not in table.column_names:
                table = table.add_column(0, STEP, pa.array(range(first_step, first_step + table.num_rows), pa.int64()))
            others = [name for name in table.column_names if name != STEP]
            table = pa.table([table.column(STEP).cast(pa.int64()), *table.select(others).columns], [STEP, *others])
            return table.sort_by(STEP), frozenset()
        rows = [dict(r) for r in rows]
        for i, row in enumerate(rows):
            row.setdefault(STEP, first_step + i)
        rows.sort(key=lambda r: r[STEP])
        columns, json_keys = {STEP: pa.array([r[STEP] for r in rows], pa.int64())}, set()
        for key in sorted({k for r in rows for k in r} - {STEP}):
            columns[key], is_json = _encode_column([r.get(key) for r in rows])
            if is_json:
                json_keys.add(key)
        return pa.table(columns), frozenset(json_keys)

    def append(self, rows: list[Mapping[str, Any]] | pa.Table) -> History:
        """A new History with `rows` after the current last step (a column whose type changes becomes JSON text)."""
        first = self.steps[-1] + 1 if self.steps else 0
        new, new_json = self.encode(rows, first)
        if self.steps and new.num_rows and new.column(STEP)[0].as_py() <= self.steps[-1]:
            raise ValueError(f"appended steps must come after step {self.steps[-1]}")
        old = self.table
        keys = list(old.column_names) + [k for k in new.column_names if k not in old.column_names]
        columns, json_keys = {}, set()
        for key in keys:
            a = old.column(key) if key in old.column_names else None
            b = new.column(key) if key in new.column_names else None
            a_json, b_json = key in self.json_keys, key in new_json
            if a is not None and b is not None and (a.type != b.type or a_json != b_json):
                a, b = (self._as_json(c, j) for c, j in ((a, a_json), (b, b_json)))
                a_json = b_json = True
            typ = (a if a is not None else b).type
            a = a if a is not None else pa.nulls(old.num_rows, typ)
            b = b if b is not None else pa.nulls(new.num_rows, typ)
            columns[key] = pa.chunked_array(_chunks(a) + _chunks(b), typ)
            if a_json or b_json:
                json_keys.add(key)
        return History(pa.table(columns), frozenset(json_keys), self.exported, self.export_files)

    @staticmethod
    def _as_json(column: pa.ChunkedArray, is_json: bool) -> pa.ChunkedArray:
        if is_json:
            return column
        return pa.chunked_array([pa.array([None if v is None else _dumps(v) for v in column.to_pylist()], pa.string())])

    def with_exports(self, exported: int | None = None, export_files: int | None = None) -> History:
        return History(
            self.table,
            self.json_keys,
            self.table.num_rows if exported is None else exported,
            self.export_files if export_files is None else export_files,
        )

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else -1

    def index(self, step: int) -> int:
        return bisect.bisect_left(self.steps, step)

    def rows(self, start: int, stop: int, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows [start, stop) as dicts of the logged keys only, values exactly as logged."""
        table = self.table.slice(start, max(0, stop - start))
        if keys is not None:
            table = table.select([k for k in keys if k in self.table.column_names])
        json_keys = self.json_keys.intersection(table.column_names)
        out = []
        for row in table.to_pylist():
            row = {k: v for k, v in row.items() if v is not None}
            for k in json_keys.intersection(row):
                row[k] = json.loads(row[k])
            out.append(row)
        return out

    def key_info(self) -> dict[str, Any]:
        """W&B's `historyKeys`: per key the count of rows by value type, and the last step."""
        if self._key_info is None:
            keys = {}
            for name in self.table.column_names:
                column = self.table.column(name)
                count = len(column) - column.null_count
                if not count:
                    continue
                if name in self.json_keys:
                    first = json.loads(pc.drop_null(column)[0].as_py())
                    typ = {dict: "map", list: "list", str: "string", bool: "boolean"}.get(type(first), "number")
                else:
                    typ = {pa.string(): "string", pa.bool_(): "boolean"}.get(column.type, "number")
                keys[name] = {"typeCounts": [{"type": typ, "count": count}]}
            self._key_info = {"keys": keys, "lastStep": self.last_step}
        return self._key_info

    def export_table(self) -> pa.Table:
        """The exported rows as the parquet export holds them (without keys first logged after the boundary)."""
        table = self.table.slice(0, self.exported)
        table = table.select([k for k in table.column_names if table.column(k).null_count < table.num_rows])
        for key in self.json_keys.intersection(table.column_names):
            table = table.set_column(table.schema.get_field_index(key), key, _export_column(table.column(key)))
        return table


def _chunks(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


# ---------------------------------------------------------------------------------------------------------------
# The data: projects, runs, sweeps.


@dataclasses.dataclass
class RunRecord:
    """One run as the server holds it. Mutations replace fields (copy on write) so readers never see half-updates."""

    entity: str
    project: str
    name: str
    seq: int
    display_name: str
    state: str
    created_at: datetime
    heartbeat_at: datetime
    tags: tuple[str, ...]
    group: str | None
    job_type: str | None
    sweep: str | None
    user: str
    host: str | None
    notes: str | None
    description: str | None
    commit: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    system_metrics: dict[str, Any]
    events: tuple[dict[str, Any], ...]
    files: dict[str, tuple[bytes, datetime]]
    history: History
    live_data: bool = True  # False: parquetHistory's liveData is empty, as W&B often answers for an active run
    unserved: int = 0  # the newest rows W&B counts (historyKeys, historyLineCount) but serves no page of yet
    nulls: frozenset[str] = frozenset()  # GraphQL fields of this run answered null (those the schema allows)

    @property
    def storage_id(self) -> str:
        return _b64(f"Run:v1:{self.name}:{self.project}:{self.entity}")


@dataclasses.dataclass
class SweepRecord:
    entity: str
    project: str
    name: str
    display_name: str | None
    method: str
    state: str
    config: dict[str, Any]
    best_loss: float | None
    created_at: datetime


@dataclasses.dataclass
class ProjectRecord:
    entity: str
    name: str
    internal_id: int
    created_at: datetime
    runs: dict[str, RunRecord] = dataclasses.field(default_factory=dict)
    sweeps: dict[str, SweepRecord] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Run filters (MongoDB style, as W&B evaluates them) and ordering.

_MISSING = object()
_FIELD_ALIASES = {
    "created_at": "createdAt",
    "heartbeat_at": "heartbeatAt",
    "display_name": "displayName",
    "job_type": "jobType",
    "sweepName": "sweep",
    "user": "username",
}


def _lookup(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def run_field(run: RunRecord, path: str) -> Any:
    """The value a filter or order path names: top-level W&B run fields, `config.X[.value]`, `summary_metrics.X`."""
    head, _, rest = path.partition(".")
    head = _FIELD_ALIASES.get(head, head)
    if head == "config":
        parts = rest.split(".")
        value = _lookup(run.config, parts)
        if value is _MISSING and parts[-1] == "value":
            value = _lookup(run.config, parts[:-1])
        return value
    if head in ("summary_metrics", "summaryMetrics", "summary"):
        return _lookup(run.summary, rest.split("."))
    if head in ("systemMetrics", "system_metrics"):
        return _lookup(run.system_metrics, rest.split("."))
    simple = {
        "createdAt": run.created_at,
        "heartbeatAt": run.heartbeat_at,
        "state": run.state,
        "tags": list(run.tags),
        "name": run.name,
        "displayName": run.display_name,
        "group": run.group,
        "jobType": run.job_type,
        "sweep": run.sweep,
        "username": run.user,
        "host": run.host,
        "notes": run.notes,
        "description": run.description,
        "commit": run.commit,
        "historyLineCount": len(run.history),
    }
    return simple.get(head, _MISSING) if not rest else _MISSING


def _coerce(field_value: Any, operand: Any) -> Any:
    if isinstance(field_value, datetime) and isinstance(operand, str):
        try:
            return _timestamp(operand, _BASE_TIME)
        except ValueError as e:
            raise GraphQLError(f"invalid timestamp {operand!r} in filters") from e
    return operand


def _compare(op: str, value: Any, operand: Any) -> bool:
    operand = _coerce(value, operand)
    if op == "$eq":
        return value == operand and (type(value) is bool) == (type(operand) is bool)
    try:
        return {"$gt": value > operand, "$gte": value >= operand, "$lt": value < operand, "$lte": value <= operand}[op]
    except TypeError:
        return False


def _match_condition(value: Any, cond: Any) -> bool:
    """MongoDB semantics, including arrays: a scalar condition on a list field matches any element."""
    if not (isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond)):
        if isinstance(value, list) and not isinstance(cond, list):
            return any(_compare("$eq", v, cond) for v in value)
        return value is not _MISSING and _compare("$eq", value, cond)
    for op, operand in cond.items():
        values = value if isinstance(value, list) else [value]
        if op in ("$eq", "$gt", "$gte", "$lt", "$lte"):
            ok = any(v is not _MISSING and v is not None and _compare(op, v, operand) for v in values) or (
                op == "$eq" and operand is None and value in (None, _MISSING)
            )
        elif op == "$ne":
            ok = not _match_condition(value, {"$eq": operand})
        elif op == "$in":
            ok = any(_match_condition(value, item) for item in operand) or (
                None in operand and value in (None, _MISSING)
            )
        elif op == "$nin":
            ok = not _match_condition(value, {"$in": operand})
        elif op == "$all":
            ok = all(_match_condition(value, item) for item in operand)
        elif op == "$exists":
            ok = (value is not _MISSING) == bool(operand)
        elif op == "$regex":
            flags = re.I if "i" in str(cond.get("$options", "")) else 0
            ok = any(isinstance(v, str) and re.search(operand, v, flags) for v in values)
        elif op == "$options":
            ok = True
        elif op == "$not":
            ok = not _match_condition(value, operand)
        else:
            raise GraphQLError(f"unsupported filter operator {op!r}")
        if not ok:
            return False
    return True


_OPERATORS = {
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$all",
    "$exists",
    "$regex",
    "$options",
    "$not",
}
_TIME_FIELDS = {"createdAt", "heartbeatAt"}


def check_filters(filters: Any, field: str | None = None) -> None:
    """Refuses a filter as W&B's parser does before looking at any run: unknown operators, and times that don't
    parse (an empty `createdAt` bound is an error even in a project with no runs)."""
    if isinstance(filters, list):
        for item in filters:
            check_filters(item, field)
        return
    if not isinstance(filters, dict):
        if field in _TIME_FIELDS and filters is not None:
            try:
                _timestamp(filters, _BASE_TIME)
            except (ValueError, TypeError):
                raise GraphQLError(f"invalid timestamp {filters!r} in filters") from None
        return
    for key, value in filters.items():
        if key in ("$and", "$or", "$nor"):
            check_filters(value)
        elif key.startswith("$"):
            if key not in _OPERATORS or field is None:
                raise GraphQLError(f"unsupported filter operator {key!r}")
            check_filters(value, field)
        else:
            check_filters(value, _FIELD_ALIASES.get(key, key))


def run_matches(run: RunRecord, filters: Mapping[str, Any]) -> bool:
    """Whether a run passes W&B run filters: `$and`/`$or`/`$nor` and field conditions."""
    for key, cond in filters.items():
        if key == "$and":
            ok = all(run_matches(run, f) for f in cond)
        elif key == "$or":
            ok = any(run_matches(run, f) for f in cond)
        elif key == "$nor":
            ok = not any(run_matches(run, f) for f in cond)
        elif key.startswith("$"):
            raise GraphQLError(f"unsupported filter operator {key!r}")
        else:
            ok = _match_condition(run_field(run, key), cond)
        if not ok:
            return False
    return True


def _sort_key(run: RunRecord, path: str) -> list[Any]:
    """A JSON-able total order key: (type rank, value, creation sequence), so cursors can carry it."""
    value = run_field(run, path)
    if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
        key = [0, value]
    elif isinstance(value, str):
        key = [1, value]
    elif isinstance(value, datetime):
        key = [2, value.strftime("%Y-%m-%dT%H:%M:%S.%f")]
    elif value is _MISSING or value is None or isinstance(value, float):
        key = [4, 0]
    else:
        key = [3, json.dumps(value, sort_keys=True)]
    return [*key, run.seq]


# ---------------------------------------------------------------------------------------------------------------
# GraphQL object types, resolved field by field.


def _page(items: list[tuple[Any, str]], has_next: bool) -> dict[str, Any]:
    """A Relay-style connection page: `edges {node cursor}` and `pageInfo {endCursor hasNextPage}`."""
    return {
        "edges": [{"node": node, "cursor": cursor} for node, cursor in items],
        "pageInfo": {"__typename": "PageInfo", "endCursor": items[-1][1] if items else None, "hasNextPage": has_next},
    }


class _QueryRoot:
    typename = "Query"

    def __init__(self, server: WandbServer) -> None:
        self.server = server

    def gql_viewer(self) -> dict[str, Any]:
        s = self.server
        return {
            "id": _b64(f"User:{s.username}"),
            "name": s.username,
            "username": s.username,
            "entity": s.default_entity,
            "email": f"{s.username}@example.com",
            "flags": "{}",
            "teams": {"edges": [{"node": {"name": t}} for t in s.teams]},
        }

    def gql_project(self, name: str | None = None, entityName: str | None = None) -> _ProjectNode | None:
        project = self.server.project_record(entityName or self.server.default_entity, name or "")
        return _ProjectNode(self.server, project) if project else None


class _ProjectNode:
    typename = "Project"

    def __init__(self, server: WandbServer, project: ProjectRecord) -> None:
        self.server = server
        self.project = project

    def gql_id(self) -> str:
        return _b64(f"Project:{self.project.internal_id}")

    def gql_internalId(self) -> str:
        return str(self.project.internal_id)

    def gql_name(self) -> str:
        return self.project.name

    def gql_entityName(self) -> str:
        return self.project.entity

    def gql_readOnly(self) -> bool:
        return False

    def _runs(self, filters: str | None) -> list[RunRecord]:
        try:
            parsed = json.loads(filters or "{}")
        except ValueError as e:
            raise GraphQLError(f"invalid filters: {e}") from None
        check_filters(parsed)  # as W&B: the whole filter is parsed, whether or not any run is there to match
        with self.server.lock:
            runs = list(self.project.runs.values())
        return [r for r in runs if run_matches(r, parsed)]

    def gql_runCount(self, filters: Any = None) -> int:
        return len(self._runs(filters))

    def gql_runs(
        self, filters: Any = None, after: str | None = None, first: int | None = 50, order: str | None = None, **_: Any
    ) -> dict[str, Any]:
        runs = self._runs(filters)
        order = order or "+created_at"
        descending = order.startswith("-")
        path = order.lstrip("+-") or "created_at"
        keyed = sorted(((_sort_key(r, path), r) for r in runs), key=lambda kr: kr[0], reverse=descending)
        if after:
            mark = _uncursor(after)
            keyed = [kr for kr in keyed if (kr[0] < mark if descending else kr[0] > mark)]
        first = 50 if first is None else first
        page = keyed[:first]
        items = [(_RunNode(self.server, r), _cursor(k)) for k, r in page]
        return _page(items, len(keyed) > first or self.server.claims_more_pages)

    def gql_run(self, name: str | None = None, **_: Any) -> _RunNode | None:
        with self.server.lock:
            run = self.project.runs.get(name or "")
        return _RunNode(self.server, run) if run else None

    def gql_sweep(self, sweepName: str | None = None, **_: Any) -> _SweepNode | None:
        with self.server.lock:
            sweep = self.project.sweeps.get(sweepName or "")
        return _SweepNode(self.server, self.project, sweep) if sweep else None


class _SweepNode:
    typename = "Sweep"

    def __init__(self, server: WandbServer, project: ProjectRecord, sweep: SweepRecord) -> None:
        self.server = server
        self.project = project
        self.sweep = sweep

    def gql_id(self) -> str:
        return _b64(f"Sweep:{self.sweep.entity}:{self.sweep.project}:{self.sweep.name}")

    def gql_name(self) -> str:
        return self.sweep.name

    def gql_displayName(self) -> str | None:
        return self.sweep.display_name

    def gql_method(self) -> str:
        return self.sweep.method

    def gql_state(self) -> str:
        return self.sweep.state

    def gql_description(self) -> None:
        return None

    def gql_bestLoss(self) -> float | None:
        return self.sweep.best_loss

    def gql_config(self) -> str:
        return yaml.safe_dump(self.sweep.config, sort_keys=False)  # the user's YAML text, as W&B keeps it

    def gql_createdAt(self) -> str:
        return _format_time(self.sweep.created_at)

    gql_updatedAt = gql_createdAt

    def gql_runCount(self) -> int:
        with self.server.lock:
            return sum(1 for r in self.project.runs.values() if r.sweep == self.sweep.name)

    gql_runCountExpected = gql_runCount


class _RunNode:
    typename = "Run"

    def __init__(self, server: WandbServer, run: RunRecord) -> None:
        self.server = server
        self.run = run

    def gql_id(self) -> str:
        return self.run.storage_id

    def gql_name(self) -> str:
        return self.run.name

    def gql_displayName(self) -> str:
        return self.run.display_name

    def gql_projectId(self) -> int:
        return self.server.project_record(self.run.entity, self.run.project).internal_id

    def gql_tags(self) -> list[str]:
        return list(self.run.tags)

    def gql_state(self) -> str:
        return self.run.state

    def gql_sweepName(self) -> str | None:
        return self.run.sweep

    def gql_group(self) -> str | None:
        return self.run.group

    def gql_jobType(self) -> str | None:
        return self.run.job_type

    def gql_commit(self) -> str | None:
        return self.run.commit

    def gql_host(self) -> str | None:
        return self.run.host

    def gql_readOnly(self) -> bool:
        return False

    def gql_createdAt(self) -> str:
        return _format_time(self.run.created_at)

    def gql_heartbeatAt(self) -> str:
        return _format_time(self.run.heartbeat_at)

    def gql_description(self) -> str | None:
        return self.run.description

    def gql_notes(self) -> str | None:
        return self.run.notes

    def gql_config(self) -> str:
        return _dumps({k: {"value": v, "desc": None} for k, v in self.run.config.items()})

    def gql_summaryMetrics(self) -> str:
        return _dumps(self.run.summary)

    def gql_systemMetrics(self) -> str:
        return _dumps(self.run.system_metrics)

    def gql_historyLineCount(self) -> int:
        return len(self.run.history)

    def gql_historyKeys(self, **_: Any) -> dict[str, Any]:
        return _json_safe(self.run.history.key_info())

    def gql_user(self) -> dict[str, Any]:
        return {
            "id": _b64(f"User:{self.run.user}"),
            "name": self.run.user,
            "username": self.run.user,
        }

    def gql_history(
        self, minStep: int | None = None, maxStep: int | None = None, samples: int | None = 500, **_: Any
    ) -> list[str]:
        history = self.run.history
        served = len(history) - self.run.unserved
        start = min(served, 0 if minStep is None else history.index(int(minStep)))
        stop = min(served, len(history) if maxStep is None else history.index(int(maxStep)))
        picks = _sample(stop - start, 500 if samples is None else int(samples))
        if len(picks) == stop - start:
            rows = history.rows(start, stop)
        else:
            rows = [history.rows(start + i, start + i + 1)[0] for i in picks]
        return [_dumps(row) for row in rows]

    def gql_events(self, samples: int | None = 500, **_: Any) -> list[str]:
        events = self.run.events
        return [_dumps(events[i]) for i in _sample(len(events), 500 if samples is None else int(samples))]

    def gql_sampledHistory(self, specs: list[str] | None = None, **_: Any) -> list[list[dict[str, Any]]]:
        return [self._sampled(json.loads(spec) if isinstance(spec, str) else spec) for spec in specs or []]

    def _sampled(self, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
        history = self.run.history
        keys = list(dict.fromkeys(spec.get("keys") or []))
        start = history.index(int(spec["minStep"])) if spec.get("minStep") is not None else 0
        # maxStep is inclusive here (unlike history(minStep, maxStep)): wandb-core 0.31 pages keyed scans as
        # {minStep: 0, maxStep: 999, samples: 1000}, {minStep: 1000, maxStep: 1999, ...}
        stop = history.index(int(spec["maxStep"]) + 1) if spec.get("maxStep") is not None else len(history)
        if any(k not in history.table.column_names for k in keys):
            return []
        table = history.table.slice(start, max(0, stop - start))
        if keys:
            mask = pc.is_valid(table.column(keys[0]))
            for k in keys[1:]:
                mask = pc.and_(mask, pc.is_valid(table.column(k)))
            positions = pc.indices_nonzero(mask).to_pylist()
        else:
            positions = list(range(table.num_rows))
        picks = [positions[i] for i in _sample(len(positions), int(spec.get("samples") or 500))]
        rows = [history.rows(start + p, start + p + 1, keys or None)[0] for p in picks]
        return _json_safe(rows)

    def gql_parquetHistory(self, liveKeys: list[str] | None = None, **_: Any) -> dict[str, Any]:
        history = self.run.history
        urls = self.server.parquet_urls(self.run, history)
        served = len(history) - self.run.unserved
        live = history.rows(history.exported, served, liveKeys or [STEP]) if self.run.live_data else []
        return {"parquetUrls": urls, "liveData": _json_safe(live)}

    def _files(self) -> list[tuple[str, bytes, datetime]]:
        return sorted((name, data, when) for name, (data, when) in self.run.files.items())

    def gql_fileCount(self) -> int:
        return len(self.run.files)

    def gql_files(
        self,
        names: list[str] | None = None,
        after: str | None = None,
        first: int | None = 50,
        pattern: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        files = self._files()
        if names:
            files = [f for f in files if f[0] in names]
        elif pattern:
            regex = re.compile("".join({"%": ".*", "_": "."}.get(c, re.escape(c)) for c in pattern), re.S)
            files = [f for f in files if regex.fullmatch(f[0])]
        if after:
            mark = _uncursor(after)
            files = [f for f in files if f[0] > mark]
        first = 50 if first is None else first
        items = [(self._file(*f), _cursor(f[0])) for f in files[:first]]
        return _page(items, len(files) > first)

    def _file(self, name: str, data: bytes, when: datetime) -> dict[str, Any]:
        url = self.server.file_url(self.run, name)
        return {
            "id": _b64(f"File:{self.run.storage_id}:{name}"),
            "name": name,
            "url": url,
            "directUrl": url,  # W&B's may need the key too: the SDK downloads `url` through wandb-core
            "sizeBytes": len(data),
            "mimetype": "application/json" if name.endswith(".json") else "application/octet-stream",
            "updatedAt": _format_time(when),
            "md5": base64.b64encode(hashlib.md5(data).digest()).decode(),
        }


# ---------------------------------------------------------------------------------------------------------------
# Faults and the request log.


@dataclasses.dataclass
class Fault:
    """An injected failure for the requests it matches, for its next `times` matches (None: for ever).

    `op` is a GraphQL operation name, or `file` / `parquet` / `otel` for the GET/telemetry routes; `run` is the
    run name in the variables (or URL). Effects: `delay` seconds first; then `status` (with `Retry-After` when
    `retry_after` is set), or `drop` (close without answering), or `malformed` (HTTP 200 with broken JSON).
    """

    op: str | None = None
    run: str | None = None
    path: str | None = None
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop: bool = False
    malformed: bool = False
    times: int | None = 1
    hits: int = 0

    def matches(self, op: str, run: str | None, path: str) -> bool:
        return (
            (self.times is None or self.hits < self.times)
            and (self.op is None or self.op == op)
            and (self.run is None or self.run == run)
            and (self.path is None or path.startswith(self.path))
        )


@dataclasses.dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it: GraphQL operation name and variables, or the GET route."""

    method: str
    path: str
    op: str
    variables: Mapping[str, Any]
    run: str | None
    status: int
    seconds: float
    fault: bool


# ---------------------------------------------------------------------------------------------------------------
# HTTP.


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def _serve(self, method: str) -> None:
        wb = self.server.wandb
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        op, variables, run, payload = self._classify(method, path, body)
        fault = wb.take_fault(op, run, path)
        self._started = time.monotonic()
        self._entry: LoggedRequest | None = LoggedRequest(method, path, op, variables, run, 0, 0.0, bool(fault))
        try:
            if fault and fault.delay:
                time.sleep(fault.delay)
            if fault and fault.drop:
                self._record(0)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            elif fault and fault.malformed:
                self._send(200, b'{"data": {"project": ', "application/json")
            elif fault and fault.status:
                headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                body_out = _dumps({"errors": [{"message": f"injected HTTP {fault.status}"}]}).encode()
                self._send(fault.status, body_out, "application/json", headers)
            else:
                self._route(method, path, op, payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._record(0)

    def _record(self, status: int) -> None:
        """Logs the request once, before its answer is written, so a client never sees an answer not yet logged."""
        if self._entry is not None:
            entry, self._entry = self._entry, None
            seconds = time.monotonic() - self._started
            self.server.wandb.log_request(dataclasses.replace(entry, status=status, seconds=seconds))

    def send_response(self, code: int, message: str | None = None) -> None:
        self._record(code)
        super().send_response(code, message)

    def _classify(self, method: str, path: str, body: bytes) -> tuple[str, dict[str, Any], str | None, Any]:
        if method == "POST" and path.rstrip("/") == "/graphql":
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                return "", {}, None, None
            variables = payload.get("variables") or {}
            run = next((variables[k] for k in ("name", "run", "runName") if isinstance(variables.get(k), str)), None)
            return operation_name(payload), variables, run, payload
        parts = [unquote(p) for p in path.split("/") if p]
        if parts[:1] == ["files"] and len(parts) >= 5:
            return "file", {"name": "/".join(parts[4:])}, parts[3], None
        if parts[:1] == ["parquet"] and len(parts) == 5:
            return "parquet", {"index": parts[4]}, parts[3], None
        if parts[:2] == ["sdk", "otel"]:
            return "otel", {}, None, None
        return "", {}, None, None

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, key = base64.b64decode(token).decode().partition(":")
        except ValueError:
            return False
        return user == "api" and key in self.server.wandb.api_keys

    def _route(self, method: str, path: str, op: str, payload: Any) -> None:
        wb = self.server.wandb
        if op == "otel":
            return self._send(200, b"", "application/x-protobuf")
        if op in ("file", "parquet") and method in ("GET", "HEAD"):
            if op == "file" and not self._authorized():  # run files are W&B's, behind the API key
                return self._send(401, b"unauthorized", "text/plain")
            found = wb.download(path)
            if found is None:
                return self._send(404, b"not found", "text/plain")
            return self._send_file(method, *found)
        if path.rstrip("/") != "/graphql" or method != "POST":
            logger.warning("wandb_server: no route for %s %s", method, path)
            return self._send(404, b"not found", "text/plain")
        if not self._authorized():
            # W&B answers a missing or unknown API key with 401 and a JSON error; wandb-core does not retry it.
            return self._send(
                401, _dumps({"errors": [{"message": "user is not logged in"}]}).encode(), "application/json"
            )
        if payload is None:
            return self._send(400, _dumps({"errors": [{"message": "invalid JSON body"}]}).encode(), "application/json")
        result = wb.execute(payload, op)
        return self._send(200, json.dumps(result, ensure_ascii=False, allow_nan=False).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, method: str, data: bytes | Path, content_type: str) -> None:
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        start, stop, status = 0, size, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        if method == "HEAD":
            return
        if isinstance(data, bytes):
            self.wfile.write(data[start:stop])
        else:
            with data.open("rb") as f:
                f.seek(start)
                remaining = stop - start
                while remaining > 0:
                    chunk = f.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    wandb: WandbServer


# ---------------------------------------------------------------------------------------------------------------
# The server and its test-facing API.


class WandbServer:
    """A W&B-compatible server on loopback. Start with `with WandbServer() as server:` (or `start()`/`stop()`).

    Tests build data with `add_run` (+ `append_history`, `update_run`, `export_history`, `delete_run`,
    `add_file`, `add_sweep`), inject failures with `fault(...)` and read `requests(...)` / `count(...)`.
    """

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (API_KEY,),
        username: str = "tester",
        default_entity: str | None = None,
        teams: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | Path | None = None,
    ) -> None:
        self.api_keys = frozenset(api_keys)
        self.username = username
        self.default_entity = default_entity or username
        self.teams = tuple(teams)
        self.lock = threading.RLock()
        self.projects: dict[tuple[str, str], ProjectRecord] = {}
        self.invalid_documents: list[tuple[str, list[str]]] = []  # (operation, errors) of every refused document
        self.claims_more_pages = False  # every runs page says hasNextPage, the empty one after the last too
        self._host, self._port = host, port
        self._data_dir_arg = Path(data_dir) if data_dir else None
        self._data_dir: Path | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[Fault] = []
        self._log: list[LoggedRequest] = []
        self._seq = 0
        self._exports: dict[tuple[str, str, str], tuple[History, list[str]]] = {}
        self._export_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._downloads: dict[str, Path] = {}

    # -- lifecycle

    def start(self) -> WandbServer:
        """Binds (port 0: an ephemeral port) and serves in a daemon thread."""
        if self._data_dir_arg:
            self._data_dir_arg.mkdir(parents=True, exist_ok=True)
        self._data_dir = Path(tempfile.mkdtemp(prefix="wandb-server-", dir=self._data_dir_arg))
        self._httpd = _HTTPServer((self._host, self._port), _Handler)
        self._httpd.wandb = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="wandb-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._data_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> WandbServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def env(self, api_key: str | None = None) -> dict[str, str]:
        """The variables that point the wandb SDK (and wandb-core) at this server."""
        return {"WANDB_BASE_URL": self.url, "WANDB_API_KEY": api_key or min(self.api_keys)}

    def sdk_env(self, home: Path, api_key: str | None = None) -> dict[str, str]:
        """A whole environment for a wandb SDK process that sees only this server: HOME, settings, cache (parquet
        exports are cached by run, not content) and run dirs under `home`; no proxies, no other WANDB_* variable."""
        dirs = {"HOME": "home", "WANDB_CONFIG_DIR": "config", "WANDB_CACHE_DIR": "cache", "WANDB_DIR": "dir"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and "proxy" not in k.lower()}
        for var, sub in dirs.items():
            (home / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(home / sub)
        env.update(self.env(api_key), NO_PROXY="127.0.0.1,localhost", WANDB_SILENT="true")
        return env

    # -- data

    def project_record(self, entity: str, project: str) -> ProjectRecord | None:
        with self.lock:
            return self.projects.get((entity, project))

    def add_project(self, entity: str, project: str) -> ProjectRecord:
        with self.lock:
            record = self.projects.get((entity, project))
            if record is None:
                record = ProjectRecord(entity, project, len(self.projects) + 1, _BASE_TIME)
                self.projects[(entity, project)] = record
            return record

    def add_run(
        self,
        entity: str,
        project: str,
        run_id: str,
        *,
        name: str | None = None,
        state: str = "finished",
        created_at: datetime | str | float | None = None,
        heartbeat_at: datetime | str | float | None = None,
        tags: Iterable[str] = (),
        group: str | None = None,
        job_type: str | None = None,
        sweep: str | None = None,
        user: str | None = None,
        host: str | None = None,
        notes: str | None = None,
        description: str | None = None,
        commit: str | None = None,
        config: Mapping[str, Any] | None = None,
        summary: Mapping[str, Any] | None = None,
        system_metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes | str] | None = None,
        history: list[Mapping[str, Any]] | pa.Table | None = None,
        events: Iterable[Mapping[str, Any]] = (),
        exported_steps: int | None = None,
        export_files: int = 1,
        live_data: bool = True,
        unserved: int = 0,
        nulls: Iterable[str] = (),
    ) -> RunRecord:
        """Adds (or replaces) a run. History rows are dicts (`_step` defaults to the row's index; None or a missing
        key = not logged) or a pyarrow Table for bulk data. The first `exported_steps` rows are in the parquet
        export (split into `export_files` files), the rest are live (default: everything exported); with
        `live_data=False` parquetHistory names no live steps, as W&B often answers for an active run; the newest
        `unserved` rows are counted but in no answer yet (W&B's history lagging its listing). `nulls` names
        GraphQL fields of the run answered null (`files`, `config`, `historyKeys`, `heartbeatAt`, `user`, ...)."""
        project_record = self.add_project(entity, project)
        with self.lock:
            self._seq += 1
            seq = self._seq
        created = _timestamp(created_at, _BASE_TIME + timedelta(minutes=seq))
        table, json_keys = History.encode(history if history is not None else [], 0)
        exported = table.num_rows if exported_steps is None else exported_steps
        hist = History(table, json_keys, exported, export_files)
        when = created
        run_files = {k: (v.encode() if isinstance(v, str) else bytes(v), when) for k, v in (files or {}).items()}
        if metadata is not None:
            run_files["wandb-metadata.json"] = (json.dumps(metadata, indent=4, ensure_ascii=False).encode(), when)
        if sweep and sweep not in project_record.sweeps:
            self.add_sweep(entity, project, sweep)
        record = RunRecord(
            entity=entity,
            project=project,
            name=run_id,
            seq=seq,
            display_name=name or run_id,
            state=state,
            created_at=created,
            heartbeat_at=_timestamp(heartbeat_at, created + timedelta(seconds=60)),
            tags=tuple(tags),
            group=group,
            job_type=job_type,
            sweep=sweep,
            user=user or self.username,
            host=host,
            notes=notes,
            description=description,
            commit=commit,
            config=dict(config or {}),
            summary=dict(summary or {}),
            system_metrics=dict(system_metrics or {}),
            events=tuple(dict(e) for e in events),
            files=run_files,
            history=hist,
            live_data=live_data,
            unserved=unserved,
            nulls=frozenset(nulls),
        )
        with self.lock:
            project_record.runs[run_id] = record
        return record

    def run_record(self, entity: str, project: str, run_id: str) -> RunRecord:
        with self.lock:
            record = self.projects.get((entity, project))
            if record is None or run_id not in record.runs:
                raise KeyError(f"no run {entity}/{project}/{run_id}")
            return record.runs[run_id]

    def update_run(self, entity: str, project: str, run_id: str, **changes: Any) -> RunRecord:
        """Edits run fields (tags, config, summary, state, heartbeat_at, notes, name, ...), replacing the values."""
        renames = {"name": "display_name"}
        with self.lock:
            run = self.run_record(entity, project, run_id)
            for key, value in changes.items():
                field = renames.get(key, key)
                if field in ("created_at", "heartbeat_at"):
                    value = _timestamp(value, run.created_at)
                elif field in ("tags", "nulls"):
                    value = (tuple if field == "tags" else frozenset)(value)
                elif field in ("config", "summary", "system_metrics"):
                    value = dict(value)
                elif field not in {f.name for f in dataclasses.fields(RunRecord)} or field in ("history", "seq"):
                    raise TypeError(f"update_run: unknown or read-only field {key!r}")
                setattr(run, field, value)
            return run

    def append_history(
        self,
        entity: str,
        project: str,
        run_id: str,
        rows: list[Mapping[str, Any]] | pa.Table,
        *,
        heartbeat_at: datetime | str | float | None = None,
        export: bool = False,
    ) -> RunRecord:
        """Logs more steps to a (live) run: they are live data until exported; heartbeatAt advances."""
        with self.lock:
            run = self.run_record(entity, project, run_id)
            history = run.history.append(rows)
            run.history = history.with_exports() if export else history
            run.heartbeat_at = _timestamp(heartbeat_at, run.heartbeat_at + timedelta(seconds=max(1, len(rows))))
            return run

    def export_history(
        self, entity: str, project: str, run_id: str, upto: int | None = None, files: int | None = None
    ) -> RunRecord:
        """Moves the export boundary: the first `upto` rows (default: all) are in the parquet export."""
        with self.lock:
            run = self.run_record(entity, project, run_id)
            run.history = run.history.with_exports(upto, files)
            return run

    def delete_run(self, entity: str, project: str, run_id: str) -> None:
        with self.lock:
            self.run_record(entity, project, run_id)
            del self.projects[(entity, project)].runs[run_id]

    def add_file(self, entity: str, project: str, run_id: str, name: str, data: bytes | str) -> None:
        with self.lock:
            run = self.run_record(entity, project, run_id)
            run.files = {**run.files, name: (data.encode() if isinstance(data, str) else data, run.heartbeat_at)}

    def add_sweep(
        self,
        entity: str,
        project: str,
        sweep_id: str,
        *,
        name: str | None = None,
        method: str = "random",
        state: str = "FINISHED",
        config: Mapping[str, Any] | None = None,
        best_loss: float | None = None,
    ) -> SweepRecord:
        project_record = self.add_project(entity, project)
        sweep = SweepRecord(
            entity,
            project,
            sweep_id,
            name,
            method,
            state,
            dict(config or {"method": method}),
            best_loss,
            _BASE_TIME,
        )
        with self.lock:
            project_record.sweeps[sweep_id] = sweep
        return sweep

    # -- parquet exports and file downloads

    def parquet_urls(self, run: RunRecord, history: History) -> list[str]:
        """URLs of the run's export files for this history snapshot, writing them on first use."""
        if history.exported == 0:
            return []
        key = (run.entity, run.project, run.name)
        with self.lock:
            lock = self._export_locks.setdefault(key, threading.Lock())
        with lock:
            cached = self._exports.get(key)
            if cached is None or cached[0] is not history:
                cached = (history, self._write_exports(run, history))
                self._exports[key] = cached
        return cached[1]

    def _write_exports(self, run: RunRecord, history: History) -> list[str]:
        assert self._data_dir, "server not started"
        table = history.export_table()
        n = min(history.export_files, table.num_rows)
        folder = Path(tempfile.mkdtemp(prefix=f"{run.seq}-", dir=self._data_dir))
        urls = []
        for i in range(n):
            start, stop = table.num_rows * i // n, table.num_rows * (i + 1) // n
            path = folder / f"{i}.parquet"
            pq.write_table(table.slice(start, stop - start), path, row_group_size=10_000)
            token = f"{folder.name}-{i}.parquet"
            with self.lock:
                self._downloads[token] = path
            urls.append(f"{self.url}/parquet/{_q(run.entity)}/{_q(run.project)}/{_q(run.name)}/{token}")
        return urls

    def prepare_exports(self) -> None:
        """Writes every run's parquet export now (benchmarks: keep generation out of the measured sync)."""
        with self.lock:
            runs = [r for p in self.projects.values() for r in p.runs.values()]
        for run in runs:
            self.parquet_urls(run, run.history)

    def file_url(self, run: RunRecord, name: str) -> str:
        return f"{self.url}/files/{_q(run.entity)}/{_q(run.project)}/{_q(run.name)}/{_q(name)}"

    def download(self, path: str) -> tuple[bytes | Path, str] | None:
        """The body for a GET of a run file (the handler asks for the API key) or of a parquet export (a signed
        URL: no key)."""
        parts = [unquote(p) for p in path.split("/") if p]
        if parts[0] == "parquet":
            with self.lock:
                found = self._downloads.get(parts[-1])
            return (found, "application/vnd.apache.parquet") if found and found.exists() else None
        entity, project, run_id, name = parts[1], parts[2], parts[3], "/".join(parts[4:])
        try:
            run = self.run_record(entity, project, run_id)
        except KeyError:
            return None
        data = run.files.get(name)
        return (data[0], "application/octet-stream") if data else None

    # -- GraphQL

    def execute(self, payload: Mapping[str, Any], op_name: str) -> dict[str, Any]:
        """Validates and runs one GraphQL request. As a GraphQL server answers: an invalid document gets `errors`
        and no `data`; an error while executing (a resolver refusing an argument, a null where the schema forbids
        one) gets `errors` beside the partial `data`. Both come with HTTP 200, which wandb-core does not retry."""
        document, problems = check_document(str(payload.get("query") or ""))
        if document is None or problems:
            with self.lock:
                self.invalid_documents.append((op_name, problems))
            logger.warning("wandb_server: %s is not valid against W&B's schema: %s", op_name, problems)
            return {"errors": [{"message": message} for message in problems]}
        result = graphql.execute(
            SCHEMA,
            document,
            root_value=_QueryRoot(self),
            variable_values=payload.get("variables") or {},
            operation_name=payload.get("operationName") or None,
            field_resolver=_resolve,
        )
        answer: dict[str, Any] = {"data": result.data}
        if result.errors:
            answer["errors"] = [{"message": error.message, "path": error.path} for error in result.errors]
            unexpected = [e for e in result.errors if not isinstance(e.original_error, GraphQLError | type(None))]
            for error in unexpected:  # a server bug, not an answer W&B would give: say so in the test's log
                logger.error("wandb_server: %s failed", op_name, exc_info=error.original_error)
        return answer

    # -- faults

    def fault(
        self,
        op: str | None = None,
        *,
        run: str | None = None,
        path: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
        drop: bool = False,
        malformed: bool = False,
        times: int | None = 1,
    ) -> Fault:
        """Makes the next `times` matching requests fail (see `Fault`); returns it so tests can read `hits`."""
        fault = Fault(op, run, path, status, retry_after, delay, drop, malformed, times)
        with self.lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def take_fault(self, op: str, run: str | None, path: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.matches(op, run, path):
                    fault.hits += 1
                    return fault
        return None

    # -- request log

    def log_request(self, entry: LoggedRequest) -> None:
        with self.lock:
            self._log.append(entry)

    def requests(
        self, op: str | None = None, *, run: str | None = None, where: Callable[[LoggedRequest], bool] | None = None
    ) -> list[LoggedRequest]:
        """Logged requests, oldest first, optionally only those of an operation/route and run."""
        with self.lock:
            log = list(self._log)
        return [
            r
            for r in log
            if (op is None or r.op == op) and (run is None or r.run == run) and (where is None or where(r))
        ]

    def count(self, op: str | None = None, *, run: str | None = None) -> int:
        return len(self.requests(op, run=run))

    def graphql_ops(self) -> list[str]:
        """The GraphQL operation names in order: the request sequence a flow made."""
        return [r.op for r in self.requests(where=lambda r: r.path.rstrip("/") == "/graphql")]

    def clear_requests(self) -> None:
        with self.lock:
            self._log.clear()


def _q(text: str) -> str:
    return quote(text, safe="")

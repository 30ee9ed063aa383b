"""Parquet exports of the `wandb` schema: one row per run (typed wide slices) and the wide history.

Exports are rewritten only when the warehouse's sync generation moved since they were written
(or a file is missing), and always through a temporary file renamed into place.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from mvdata_assets.db import quoted, sql_string
from mvdata_assets.runs import store
from mvdata_assets.runs.store import SCHEMA
from mvdata_assets.runs.values import to_json

RUN_ID_COLUMNS = ("_entity", "_project", "_run_id")
HISTORY_ID_COLUMNS = (*RUN_ID_COLUMNS, "_step", "_timestamp", "_runtime")
METADATA_SLICES = ("config", "summary", "metadata", "system_metrics", "system_attrs", "sweep_info")
# what each export group writes, `<name>.parquet` each: the metadata group is rewritten as one, as is the history
EXPORT_GROUPS = {
    "metadata": ("runs_metadata", *(f"runs_metadata_{s}" for s in METADATA_SLICES)),
    "history": ("runs_history",),
}

EXPORTS_DDL = f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._exports (
    name VARCHAR PRIMARY KEY, generation BIGINT, path VARCHAR, rows BIGINT, written_at TIMESTAMPTZ
)"""


@dataclass
class Export:
    name: str
    path: Path
    rows: int
    columns: list[tuple[str, str]]
    rewritten: bool


def _column_names(keys: list[str], reserved: tuple[str, ...]) -> list[str]:
    """Metric and config keys keep their names; one that equals an id column gets a suffix."""
    taken = set(reserved)
    names = []
    for key in keys:
        name = key
        while name in taken:
            name += "#"
        taken.add(name)
        names.append(name)
    return names


def _typed_column(values: list) -> pa.Array:
    """Numbers stay DOUBLE, booleans BOOLEAN, anything else its exact JSON text."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, float) for v in present):
        return pa.array(values, pa.float64())
    if all(isinstance(v, str) and v in ("true", "false") for v in present):
        return pa.array([None if v is None else v == "true" for v in values], pa.bool_())
    return pa.array([None if v is None else (v if isinstance(v, str) else to_json(v)) for v in values], pa.string())


def _wide(run_keys: list[tuple], long_rows: list[tuple]) -> pa.Table:
    """(entity, project, run_id, key, value, value_json) rows → one row per run, one column per key."""
    index = {k: i for i, k in enumerate(run_keys)}
    by_key: dict[str, list] = defaultdict(lambda: [None] * len(run_keys))
    for entity, project, run_id, key, value, value_json in long_rows:
        by_key[key][index[(entity, project, run_id)]] = value_json if value_json is not None else value
    keys = sorted(by_key)
    columns = [pa.array([k[i] for k in run_keys], pa.string()) for i in range(3)]
    columns += [_typed_column(by_key[k]) for k in keys]
    return pa.Table.from_arrays(columns, names=[*RUN_ID_COLUMNS, *_column_names(keys, RUN_ID_COLUMNS)])


def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _metadata_tables(conn: duckdb.DuckDBPyConnection) -> dict[str, pa.Table]:
    runs = conn.execute(f"SELECT * FROM {SCHEMA}.runs ORDER BY created_at, entity, project, run_id").to_arrow_table()
    run_keys = list(zip(*(runs[c].to_pylist() for c in ("entity", "project", "run_id")), strict=True))
    ids = "entity, project, run_id"

    def long(sql: str) -> list[tuple]:
        return conn.execute(sql).fetchall()

    tables = {"runs_metadata": runs}
    for name in ("config", "summary", "metadata"):
        tables[name] = _wide(run_keys, long(f"SELECT {ids}, key, value, value_json FROM {SCHEMA}.{name}"))
    tables["system_metrics"] = _wide(
        run_keys,
        long(
            f"""SELECT {ids}, key, arg_max(value, timestamp), arg_max(value_json, timestamp)
                FROM {SCHEMA}.system_metrics GROUP BY ALL"""
        ),
    )
    attrs = ("state", "source", "host", "user", "created_at", "heartbeat_at", "runtime_s", "last_step",
             "history_rows", "exit_code", "source_path", "read_problem", "synced_at")  # fmt: skip
    tables["system_attrs"] = _with_ids(runs, attrs)
    sweep = conn.execute(
        f"""SELECT r.entity, r.project, r.run_id, r.sweep_id, s.name AS sweep_name, s.state AS sweep_state,
                   s.config AS sweep_config
            FROM {SCHEMA}.runs r LEFT JOIN {SCHEMA}.sweeps s USING (entity, project, sweep_id)
            ORDER BY r.created_at, r.entity, r.project, r.run_id"""
    ).to_arrow_table()
    tables["sweep_info"] = _with_ids(sweep, ("sweep_id", "sweep_name", "sweep_state", "sweep_config"))
    return tables


def _with_ids(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    return pa.Table.from_arrays(
        [table[c] for c in ("entity", "project", "run_id", *columns)], names=[*RUN_ID_COLUMNS, *columns]
    )


def _history_sql(conn: duckdb.DuckDBPyConnection) -> tuple[str, list[int]]:
    keys = conn.execute(
        f"""SELECT k.key, h.key_ref, bool_and(h.value_json IS NULL)
            FROM {SCHEMA}._history h JOIN {SCHEMA}._keys k USING (key_ref) GROUP BY ALL ORDER BY k.key"""
    ).fetchall()
    names = _column_names([k for k, _, _ in keys], HISTORY_ID_COLUMNS)
    params: list[int] = []
    columns = []
    for (_, key_ref, numeric), name in zip(keys, names, strict=True):
        expr = "value" if numeric else "coalesce(value_json, CAST(value AS VARCHAR))"
        columns.append(f"first({expr}) FILTER (WHERE key_ref = ?) AS {quoted(name)}")
        params.append(key_ref)
    pivot = ", ".join(["run_ref, step AS _step, min(timestamp) AS _timestamp, min(runtime_s) AS _runtime", *columns])
    sql = f"""SELECT r.entity AS _entity, r.project AS _project, r.run_id AS _run_id, p.* EXCLUDE (run_ref)
              FROM (SELECT {pivot} FROM {SCHEMA}._history GROUP BY run_ref, step) p
              JOIN {SCHEMA}._run_refs r USING (run_ref)
              ORDER BY _entity, _project, _run_id, _step"""
    return sql, params


def export_group(
    conn: duckdb.DuckDBPyConnection,
    directory: Path,
    group: str,
    force: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> list[Export]:
    """Writes one of EXPORT_GROUPS (`metadata`: runs_metadata and its six slices; `history`)."""
    store.ensure_schema(conn)
    conn.execute(EXPORTS_DDL)
    directory.mkdir(parents=True, exist_ok=True)
    current = store.generation(conn)
    names = list(EXPORT_GROUPS[group])
    written = dict(conn.execute(f"SELECT name, generation FROM {SCHEMA}._exports WHERE name IN ?", [names]).fetchall())
    fresh = all(written.get(n) == current and (directory / f"{n}.parquet").exists() for n in names)
    results = []
    if fresh and not force:
        log(f"warehouse unchanged since generation {current}: keeping {', '.join(names)}")
        for name in names:
            path = directory / f"{name}.parquet"
            schema = pq.read_schema(path)
            rows = pq.read_metadata(path).num_rows
            results.append(Export(name, path, rows, [(f.name, str(f.type)) for f in schema], rewritten=False))
        return results
    if group == "metadata":
        tables = _metadata_tables(conn)
        for name in names:
            table = tables["runs_metadata" if name == "runs_metadata" else name.removeprefix("runs_metadata_")]
            path = directory / f"{name}.parquet"
            _write(table, path)
            results.append(Export(name, path, table.num_rows, [(f.name, str(f.type)) for f in table.schema], True))
    else:
        path = directory / "runs_history.parquet"
        sql, params = _history_sql(conn)
        tmp = path.with_suffix(".parquet.tmp")
        # DuckDB streams the pivot straight to parquet: the history never sits in Python memory
        conn.execute(f"COPY ({sql}) TO {sql_string(str(tmp))} (FORMAT parquet)", params)
        os.replace(tmp, path)
        schema = pq.read_schema(path)
        rows = pq.read_metadata(path).num_rows
        results.append(Export("runs_history", path, rows, [(f.name, str(f.type)) for f in schema], True))
    for export in results:
        conn.execute(
            f"INSERT OR REPLACE INTO {SCHEMA}._exports VALUES (?, ?, ?, ?, now())",
            [export.name, current, str(export.path), export.rows],
        )
    return results

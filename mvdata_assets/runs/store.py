"""The `wandb` schema of the warehouse: tables of the data contract plus sync bookkeeping."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from mvdata_assets.runs.values import NestedState, flat_rows

SCHEMA = "wandb"

_VALUE_TABLE = """(
    entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL, value DOUBLE, value_json VARCHAR
)"""

DDL = [
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.runs (
        entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        name VARCHAR, display_name VARCHAR, state VARCHAR,
        created_at TIMESTAMPTZ, heartbeat_at TIMESTAMPTZ, runtime_s DOUBLE,
        tags VARCHAR[], "group" VARCHAR, job_type VARCHAR, sweep_id VARCHAR, "user" VARCHAR,
        host VARCHAR, notes VARCHAR, url VARCHAR, source VARCHAR NOT NULL,
        last_step BIGINT, history_rows BIGINT, synced_at TIMESTAMPTZ,
        exit_code INTEGER, source_path VARCHAR, read_problem VARCHAR,
        PRIMARY KEY (entity, project, run_id)
    )""",
    # History is stored with small integer references for the run and the metric name: VARCHAR columns are
    # the dearest part of DuckDB's inserts, and history is most of what is written.
    # `wandb.history` is the view of the contract over it (entity, project, run_id, ..., key, ...).
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._run_refs (
        run_ref INTEGER PRIMARY KEY, entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        UNIQUE (entity, project, run_id)
    )""",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}._keys (key_ref INTEGER PRIMARY KEY, key VARCHAR NOT NULL UNIQUE)",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._history (
        run_ref INTEGER NOT NULL, step BIGINT NOT NULL, timestamp TIMESTAMPTZ, runtime_s DOUBLE,
        key_ref INTEGER NOT NULL, value DOUBLE, value_json VARCHAR
    )""",
    f"""CREATE VIEW IF NOT EXISTS {SCHEMA}.history AS
        SELECT r.entity, r.project, r.run_id, h.step, h.timestamp, h.runtime_s, k.key, h.value, h.value_json
        FROM {SCHEMA}._history h
        JOIN {SCHEMA}._run_refs r ON h.run_ref = r.run_ref
        JOIN {SCHEMA}._keys k ON h.key_ref = k.key_ref""",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.config {_VALUE_TABLE}",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.summary {_VALUE_TABLE}",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.metadata {_VALUE_TABLE}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.system_metrics (
        entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        timestamp TIMESTAMPTZ, key VARCHAR NOT NULL, value DOUBLE, value_json VARCHAR
    )""",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.sweeps (
        entity VARCHAR NOT NULL, project VARCHAR NOT NULL, sweep_id VARCHAR NOT NULL,
        name VARCHAR, state VARCHAR, config VARCHAR, PRIMARY KEY (entity, project, sweep_id)
    )""",
    # one row per offline run file: how far it was read (the watermark) and how it looked then
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._offline_files (
        path VARCHAR PRIMARY KEY, entity VARCHAR, project VARCHAR, run_id VARCHAR,
        size BIGINT, mtime_ns BIGINT, inode BIGINT, fingerprint VARCHAR, read_offset BIGINT,
        problem VARCHAR, config_state VARCHAR, summary_state VARCHAR, metadata_state VARCHAR,
        synced_at TIMESTAMPTZ DEFAULT now()
    )""",
    # per API run: what the last sync listed (to find changed runs), the highest step it stored (last_step) and
    # W&B's last step then (listed_last_step): a run whose history is behind W&B's is read again
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._api_runs (
        entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        fingerprint VARCHAR, last_step BIGINT, history_rows BIGINT,
        deleted_at TIMESTAMPTZ, synced_at TIMESTAMPTZ, listed_last_step BIGINT, PRIMARY KEY (entity, project, run_id)
    )""",
    # an older release's warehouse lacks this column
    f"ALTER TABLE {SCHEMA}._api_runs ADD COLUMN IF NOT EXISTS listed_last_step BIGINT",
    # bumped by every sync that changed something; exports compare it to skip rewriting
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._generation (
        id INTEGER PRIMARY KEY, generation BIGINT NOT NULL, changed_at TIMESTAMPTZ
    )""",
]

VALUE_ROWS = pa.schema([("key", pa.string()), ("value", pa.float64()), ("value_json", pa.string())])
STATS_ROWS = pa.schema(
    [
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("key", pa.string()),
        ("value", pa.float64()),
        ("value_json", pa.string()),
    ]
)

RUN_TABLES = ("history", "config", "summary", "metadata", "system_metrics")
RunKey = tuple[str, str, str]  # entity, project, run_id


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    for statement in DDL:
        conn.execute(statement)


def generation(conn: duckdb.DuckDBPyConnection) -> int:
    row = conn.execute(f"SELECT generation FROM {SCHEMA}._generation WHERE id = 1").fetchone()
    return row[0] if row else 0


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    conn.begin()
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def bump_generation(conn: duckdb.DuckDBPyConnection) -> None:
    """Called inside the transaction that changes the warehouse, so no change is ever committed without it."""
    conn.execute(
        f"""INSERT INTO {SCHEMA}._generation VALUES (1, 1, now())
            ON CONFLICT (id) DO UPDATE SET generation = generation + 1, changed_at = now()"""
    )


def run_ref(conn: duckdb.DuckDBPyConnection, key: RunKey) -> int:
    """The run's integer reference in `_history`, created on first use."""
    conn.execute(
        f"""INSERT INTO {SCHEMA}._run_refs
            SELECT coalesce(max(run_ref), 0) + 1, ?, ?, ? FROM {SCHEMA}._run_refs
            ON CONFLICT DO NOTHING""",
        list(key),
    )
    return conn.execute(
        f"SELECT run_ref FROM {SCHEMA}._run_refs WHERE entity = ? AND project = ? AND run_id = ?", list(key)
    ).fetchone()[0]


def key_refs(conn: duckdb.DuckDBPyConnection, keys: list[str]) -> list[int]:
    """Integer references of metric names, new names added (a handful per run)."""
    known = dict(conn.execute(f"SELECT key, key_ref FROM {SCHEMA}._keys WHERE key IN ?", [keys]).fetchall())
    missing = [k for k in dict.fromkeys(keys) if k not in known]
    if missing:
        start = conn.execute(f"SELECT coalesce(max(key_ref), 0) + 1 FROM {SCHEMA}._keys").fetchone()[0]
        new = {k: start + i for i, k in enumerate(missing)}
        conn.executemany(f"INSERT INTO {SCHEMA}._keys VALUES (?, ?)", [[ref, k] for k, ref in new.items()])
        known |= new
    return [known[k] for k in keys]


def delete_run(conn: duckdb.DuckDBPyConnection, entity: str, project: str, run_id: str) -> None:
    conn.execute(
        f"""DELETE FROM {SCHEMA}._history WHERE run_ref IN (
            SELECT run_ref FROM {SCHEMA}._run_refs WHERE entity = ? AND project = ? AND run_id = ?)""",
        [entity, project, run_id],
    )
    for table in (*RUN_TABLES[1:], "runs"):
        conn.execute(
            f"DELETE FROM {SCHEMA}.{table} WHERE entity = ? AND project = ? AND run_id = ?",
            [entity, project, run_id],
        )


def insert_history(conn: duckdb.DuckDBPyConnection, key: RunKey, history: pa.Table) -> None:
    """Long history rows (step, timestamp s, runtime_s, key, value, value_json) of one run, keys as references."""
    if not history.num_rows:
        return
    names = history["key"].combine_chunks()
    if not pa.types.is_dictionary(names.type):
        names = names.dictionary_encode()
    refs = pa.array(key_refs(conn, names.dictionary.to_pylist()), pa.int32())
    batch = history.set_column(history.schema.get_field_index("key"), "key_ref", pc.take(refs, names.indices))
    conn.register("history_chunk", batch)
    try:
        conn.execute(
            f"""INSERT INTO {SCHEMA}._history
                SELECT ?, step,
                       CASE WHEN isfinite("timestamp") THEN to_timestamp("timestamp") END,
                       CASE WHEN isfinite(runtime_s) THEN runtime_s END,
                       key_ref, value, value_json
                FROM history_chunk""",
            [run_ref(conn, key)],
        )
    finally:
        conn.unregister("history_chunk")


def replace_values(conn: duckdb.DuckDBPyConnection, table: str, key: RunKey, state: NestedState) -> int:
    """The run's rows of `table` become the state's leaves (a few hundred rows at most: rewritten whole); returns
    how many rows were written."""
    conn.execute(f"DELETE FROM {SCHEMA}.{table} WHERE entity = ? AND project = ? AND run_id = ?", list(key))
    rows = state.rows()
    if not rows:
        return 0
    keys, values, jsons = zip(*rows, strict=True)
    batch = pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(values, pa.float64()), pa.array(jsons, pa.string())],
        schema=VALUE_ROWS,
    )
    conn.register("value_rows", batch)
    try:
        conn.execute(f"INSERT INTO {SCHEMA}.{table} SELECT ?, ?, ?, key, value, value_json FROM value_rows", list(key))
    finally:
        conn.unregister("value_rows")
    return len(rows)


def insert_stats(conn: duckdb.DuckDBPyConnection, key: RunKey, stats: list) -> int:
    """The run's system metrics records as rows (a nested value makes one row per leaf); returns how many."""
    rows = [(when, *row) for when, k, v in stats for row in flat_rows(k, v)]
    if not rows:
        return 0
    when, keys, values, jsons = zip(*rows, strict=True)
    batch = pa.Table.from_arrays(
        [pa.array(when, STATS_ROWS.field("timestamp").type), pa.array(keys), pa.array(values, pa.float64()),
         pa.array(jsons, pa.string())],
        schema=STATS_ROWS,
    )  # fmt: skip
    conn.register("stats_rows", batch)
    try:
        conn.execute(
            f"INSERT INTO {SCHEMA}.system_metrics SELECT ?, ?, ?, timestamp, key, value, value_json FROM stats_rows",
            list(key),
        )
    finally:
        conn.unregister("stats_rows")
    return len(rows)

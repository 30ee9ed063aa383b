"""The `wandb` schema of the warehouse: tables of the data contract plus sync bookkeeping."""

from __future__ import annotations

import duckdb

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
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.history (
        entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        step BIGINT NOT NULL, timestamp TIMESTAMPTZ, runtime_s DOUBLE,
        key VARCHAR NOT NULL, value DOUBLE, value_json VARCHAR
    )""",
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
    # bumped by every sync that changed something; exports compare it to skip rewriting
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._generation (
        id INTEGER PRIMARY KEY, generation BIGINT NOT NULL, changed_at TIMESTAMPTZ
    )""",
]

RUN_TABLES = ("history", "config", "summary", "metadata", "system_metrics")


def ensure_schema(conn: duckdb.DuckDBPyConnection) -> None:
    for statement in DDL:
        conn.execute(statement)


def generation(conn: duckdb.DuckDBPyConnection) -> int:
    row = conn.execute(f"SELECT generation FROM {SCHEMA}._generation WHERE id = 1").fetchone()
    return row[0] if row else 0


def bump_generation(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        f"""INSERT INTO {SCHEMA}._generation VALUES (1, 1, now())
            ON CONFLICT (id) DO UPDATE SET generation = generation + 1, changed_at = now()"""
    )


def delete_run(conn: duckdb.DuckDBPyConnection, entity: str, project: str, run_id: str) -> None:
    for table in (*RUN_TABLES, "runs"):
        conn.execute(
            f"DELETE FROM {SCHEMA}.{table} WHERE entity = ? AND project = ? AND run_id = ?",
            [entity, project, run_id],
        )

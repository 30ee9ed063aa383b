"""Whether `wandb.history` can be trusted: no (run, step, key) stored twice, no row without its run in `wandb.runs`.

Both are counted over the whole history, a scan that grows with every run stored, so the counts are kept with the sync
generation they were taken at. Only a sync that changed something moves the generation (`store.bump_generation`, in
the same transaction as its rows), so while it stands the counts stand too, and a re-run that changed nothing reads
no history. Plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from mvdata_assets.runs import store
from mvdata_assets.runs.store import SCHEMA

CHECKS_DDL = f"""CREATE TABLE IF NOT EXISTS {SCHEMA}._history_checks (
    id INTEGER PRIMARY KEY, generation BIGINT NOT NULL, duplicate_keys BIGINT NOT NULL, orphan_rows BIGINT NOT NULL,
    checked_at TIMESTAMPTZ
)"""


@dataclass(frozen=True)
class HistoryCheck:
    generation: int  # the sync generation the counts are of
    duplicate_keys: int  # (run, step, key) stored more than once
    orphan_rows: int  # history rows whose run is not in wandb.runs
    counted_now: bool  # False: kept from an earlier check of the same generation


def check_history(conn: duckdb.DuckDBPyConnection) -> HistoryCheck:
    """The counts for the warehouse as it is (`conn` holds the writer lock: no sync moves the generation meanwhile)."""
    store.ensure_schema(conn)
    conn.execute(CHECKS_DDL)
    current = store.generation(conn)
    kept = conn.execute(
        f"SELECT duplicate_keys, orphan_rows FROM {SCHEMA}._history_checks WHERE id = 1 AND generation = ?", [current]
    ).fetchone()
    if kept is not None:
        return HistoryCheck(current, *kept, counted_now=False)
    duplicates = conn.execute(
        f"""SELECT count(*) FROM (
                SELECT 1 FROM {SCHEMA}._history GROUP BY run_ref, step, key_ref HAVING count(*) > 1)"""
    ).fetchone()[0]
    orphans = conn.execute(
        f"""SELECT count(*) FROM {SCHEMA}._history h
            ANTI JOIN (SELECT run_ref FROM {SCHEMA}._run_refs JOIN {SCHEMA}.runs USING (entity, project, run_id)) r
            ON h.run_ref = r.run_ref"""
    ).fetchone()[0]
    conn.execute(
        f"""INSERT INTO {SCHEMA}._history_checks VALUES (1, ?, ?, ?, now())
            ON CONFLICT (id) DO UPDATE SET generation = excluded.generation, duplicate_keys = excluded.duplicate_keys,
                orphan_rows = excluded.orphan_rows, checked_at = excluded.checked_at""",
        [current, duplicates, orphans],
    )
    return HistoryCheck(current, duplicates, orphans, counted_now=True)

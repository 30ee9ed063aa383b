"""Syncs local W&B run folders (offline-run-* / run-*) into the warehouse, incrementally.

Each run file has a watermark row (size, mtime, inode, a fingerprint of its head and the byte
offset read up to). Unchanged files are not opened; grown files are read from the watermark;
shrunk or replaced files are read again whole. A file's rows and its watermark are written in one
transaction, so a kill at any point leaves either the old or the new state, never duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from mvdata_assets.runs import store
from mvdata_assets.runs.store import SCHEMA
from mvdata_assets.runs.values import finite_or_none, flat_rows
from mvdata_assets.runs.wandb_file import (
    Chunk,
    NotAWandbFile,
    RunHeader,
    legacy_metadata,
    prefetch,
    read_chunks,
)

FINGERPRINT_BYTES = 4096
VALUE_ROWS = pa.schema([("key", pa.string()), ("value", pa.float64()), ("value_json", pa.string())])
STATS_ROWS = pa.schema(
    [
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("key", pa.string()),
        ("value", pa.float64()),
        ("value_json", pa.string()),
    ]
)


@dataclass
class FileOutcome:
    path: str
    action: str  # new | grown | replaced | unchanged | refreshed | skipped
    run: str | None = None  # entity/project/run_id
    state: str | None = None
    history_rows: int = 0
    bytes_read: int = 0
    problem: str | None = None


@dataclass
class SyncReport:
    files: list[FileOutcome] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    state_changes: int = 0

    def count(self, *actions: str) -> int:
        return sum(1 for f in self.files if f.action in actions)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files)

    @property
    def problems(self) -> list[str]:
        return [f.problem for f in self.files if f.problem]

    @property
    def changed(self) -> bool:
        return self.count("new", "grown", "replaced", "refreshed") > 0 or self.state_changes > 0


def discover_run_files(dirs: Iterable[Path]) -> list[Path]:
    """Run files under each folder: the folder may be a `wandb/` dir or the dir holding one."""
    found: set[Path] = set()
    for base in dirs:
        for root in (base, base / "wandb"):
            for pattern in ("offline-run-*/run-*.wandb", "run-*/run-*.wandb"):
                found.update(p.resolve() for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def sync_offline(
    conn: duckdb.DuckDBPyConnection,
    dirs: Iterable[Path],
    *,
    force_refresh: bool = False,
    running_window_s: float = 300.0,
) -> SyncReport:
    started = time.monotonic()
    store.ensure_schema(conn)
    report = SyncReport()
    known = {
        row[0]: row
        for row in conn.execute(
            f"SELECT path, entity, project, run_id, size, mtime_ns, inode, fingerprint, read_offset "
            f"FROM {SCHEMA}._offline_files"
        ).fetchall()
    }
    for path in discover_run_files(dirs):
        report.files.append(_sync_file(conn, path, known.get(str(path)), force_refresh, running_window_s, report))
    report.state_changes += _expire_running(conn, running_window_s)
    if report.changed:
        store.bump_generation(conn)
    report.seconds = time.monotonic() - started
    return report


def _fingerprint(path: Path, length: int = FINGERPRINT_BYTES) -> str:
    """`<n>:<sha256 of the first n bytes>`; a grown file keeps the fingerprint of the bytes it had."""
    with path.open("rb") as f:
        head = f.read(length)
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()}"


def _same_head(path: Path, fingerprint: str | None) -> bool:
    if not fingerprint or ":" not in fingerprint:
        return False
    return _fingerprint(path, int(fingerprint.split(":", 1)[0])) == fingerprint


def _sync_file(
    conn: duckdb.DuckDBPyConnection,
    path: Path,
    prev: tuple | None,
    force_refresh: bool,
    running_window_s: float,
    report: SyncReport,
) -> FileOutcome:
    st = path.stat()
    if prev and not force_refresh and (prev[4], prev[5], prev[6]) == (st.st_size, st.st_mtime_ns, st.st_ino):
        return FileOutcome(str(path), "unchanged", run="/".join(prev[1:4]) if prev[3] else None)
    try:
        fingerprint = _fingerprint(path)
    except OSError as exc:
        return FileOutcome(str(path), "skipped", problem=f"{path}: {exc}")
    grown = prev is not None and not force_refresh and prev[3] and st.st_size >= prev[4] and _same_head(path, prev[7])
    if grown:
        action, start = "grown", prev[8]
    else:
        action, start = ("refreshed" if force_refresh else "replaced") if prev else "new", 0
    outcome = FileOutcome(str(path), action)
    conn.begin()
    try:
        _read_into(conn, path, prev if grown else None, start, outcome, report, st, running_window_s, prev)
        conn.execute(
            f"INSERT OR REPLACE INTO {SCHEMA}._offline_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                str(path),
                *(outcome.run.split("/", 2) if outcome.run else (None, None, None)),
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                fingerprint,
                outcome.bytes_read + start,
                outcome.problem,
            ],
        )
        conn.commit()
    except Exception:
        conn.rollback()
        raise
    return outcome


def _read_into(
    conn: duckdb.DuckDBPyConnection,
    path: Path,
    resumed: tuple | None,
    start: int,
    outcome: FileOutcome,
    report: SyncReport,
    st: os.stat_result,
    running_window_s: float,
    prev: tuple | None,
) -> None:
    key: tuple[str, str, str] | None = tuple(resumed[1:4]) if resumed else None
    if prev and prev[3] and not resumed:
        store.delete_run(conn, *prev[1:4])
    header: RunHeader | None = None
    config: dict[str, str | None] = {}
    summary: dict[str, str | None] = {}
    environment: dict = {}
    stats: list = []
    exit_code = exit_runtime = None
    last_step = max_runtime = None
    rows = 0
    end = start
    try:
        for chunk in prefetch(read_chunks(path, start)):
            end = chunk.end_offset
            outcome.problem = chunk.problem or outcome.problem
            if chunk.run and key is None:
                header = chunk.run
                key = (header.entity, header.project, header.run_id)
                owner = _owner(conn, key, path)
                if owner:
                    outcome.action = "skipped"
                    outcome.problem = f"{path}: run {'/'.join(key)} is already synced from {owner}"
                    outcome.run, outcome.bytes_read = None, 0
                    return
                store.delete_run(conn, *key)
            if key is None:
                continue
            _insert_history(conn, key, chunk)
            rows += chunk.history.num_rows
            last_step, max_runtime = _extend_extent(chunk, last_step, max_runtime)
            config.update(chunk.config)
            summary.update(chunk.summary)
            environment.update(chunk.environment)
            stats += chunk.stats
            if chunk.exit_code is not None:
                exit_code, exit_runtime = chunk.exit_code, chunk.exit_runtime_s
    except NotAWandbFile as exc:
        outcome.problem = str(exc)
    outcome.bytes_read = end - start
    if key is None:
        outcome.problem = outcome.problem or f"{path}: no run record"
        return
    outcome.run = "/".join(key)
    if not resumed and not environment:
        environment = legacy_metadata(path.parent)
    _replace_values(conn, "config", key, config, incremental=resumed is not None)
    _replace_values(conn, "summary", key, summary, incremental=resumed is not None)
    _replace_values(conn, "metadata", key, {k: v for k, v in _json_items(environment)}, incremental=resumed is not None)
    _insert_stats(conn, key, stats)
    outcome.history_rows = rows
    for table, count in (("history", rows), ("system_metrics", len(stats))):
        report.rows[table] = report.rows.get(table, 0) + count
    outcome.state = _upsert_run(
        conn, key, header, environment, path, st, running_window_s,
        rows, last_step, max_runtime, exit_code, exit_runtime, outcome.problem,
    )  # fmt: skip


def _owner(conn: duckdb.DuckDBPyConnection, key: tuple[str, str, str], path: Path) -> str | None:
    """Another, still existing, file this run was already synced from (a copy or a resumed segment)."""
    for (other,) in conn.execute(
        f"SELECT path FROM {SCHEMA}._offline_files WHERE entity = ? AND project = ? AND run_id = ? AND path <> ?",
        [*key, str(path)],
    ).fetchall():
        if Path(other).exists():
            return other
    return None


def _json_items(environment: dict) -> list[tuple[str, str]]:
    return [(k, json.dumps(v)) for k, v in environment.items()]


def _extend_extent(chunk: Chunk, last_step: int | None, max_runtime: float | None) -> tuple:
    if chunk.history.num_rows:
        step = pc.max(chunk.history["step"]).as_py()
        last_step = step if last_step is None else max(last_step, step)
        runtime = finite_or_none(pc.max(chunk.history["runtime_s"]).as_py())
        if runtime is not None:
            max_runtime = runtime if max_runtime is None else max(max_runtime, runtime)
    return last_step, max_runtime


def _insert_history(conn: duckdb.DuckDBPyConnection, key: tuple[str, str, str], chunk: Chunk) -> None:
    if not chunk.history.num_rows:
        return
    conn.register("history_chunk", chunk.history)
    try:
        conn.execute(
            f"""INSERT INTO {SCHEMA}.history
                SELECT ?, ?, ?, step,
                       CASE WHEN isfinite("timestamp") THEN to_timestamp("timestamp") END,
                       CASE WHEN isfinite(runtime_s) THEN runtime_s END,
                       key, value, value_json
                FROM history_chunk""",
            list(key),
        )
    finally:
        conn.unregister("history_chunk")


def _replace_values(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    key: tuple[str, str, str],
    updates: dict[str, str | None],
    incremental: bool,
) -> None:
    """Writes the final value of each updated top-level key (flattened); None removes the key."""
    if not updates:
        return
    if incremental:
        touched = pa.table({"k": pa.array(list(updates), pa.string())})
        conn.register("touched_keys", touched)
        try:
            conn.execute(
                f"""DELETE FROM {SCHEMA}.{table} AS t
                    WHERE entity = ? AND project = ? AND run_id = ?
                      AND EXISTS (SELECT 1 FROM touched_keys
                                  WHERE t.key = touched_keys.k OR starts_with(t.key, touched_keys.k || '.'))""",
                list(key),
            )
        finally:
            conn.unregister("touched_keys")
    rows = [row for k, v in updates.items() if v is not None for row in flat_rows(k, v)]
    _insert_value_rows(conn, table, key, rows)


def _insert_value_rows(conn: duckdb.DuckDBPyConnection, table: str, key: tuple[str, str, str], rows: list) -> None:
    if not rows:
        return
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


def _insert_stats(conn: duckdb.DuckDBPyConnection, key: tuple[str, str, str], stats: list) -> None:
    rows = [(when, *row) for when, k, v in stats for row in flat_rows(k, v)]
    if not rows:
        return
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


def _state(exit_code: int | None, mtime: float, running_window_s: float) -> str:
    if exit_code is not None:
        return "finished" if exit_code == 0 else "failed"
    return "running" if time.time() - mtime < running_window_s else "crashed"


def _upsert_run(
    conn: duckdb.DuckDBPyConnection,
    key: tuple[str, str, str],
    header: RunHeader | None,
    environment: dict,
    path: Path,
    st: os.stat_result,
    running_window_s: float,
    rows: int,
    last_step: int | None,
    max_runtime: float | None,
    exit_code: int | None,
    exit_runtime: float | None,
    problem: str | None,
) -> str:
    old = conn.execute(
        f"""SELECT display_name, created_at, tags, "group", job_type, sweep_id, "user", host, notes,
                   last_step, history_rows, runtime_s, exit_code
            FROM {SCHEMA}.runs WHERE entity = ? AND project = ? AND run_id = ?""",
        list(key),
    ).fetchone()
    if header is None and old is None:
        return "unknown"
    if old is not None and header is None:
        display_name, created_at, tags, group, job_type, sweep_id, user, host, notes = old[:9]
        last_step = old[9] if last_step is None else max(last_step, old[9] or last_step)
        rows += old[10] or 0
        max_runtime = max_runtime if max_runtime is not None else old[11]
        exit_code = exit_code if exit_code is not None else old[12]
    else:
        assert header is not None
        display_name, created_at, tags = header.display_name, header.started_at, header.tags
        group, job_type, sweep_id, host, notes = (
            header.group, header.job_type, header.sweep_id, header.host, header.notes
        )  # fmt: skip
        user = environment.get("username") or environment.get("email")
    state = _state(exit_code, st.st_mtime, running_window_s)
    runtime = exit_runtime if exit_runtime else max_runtime
    conn.execute(
        f"""INSERT OR REPLACE INTO {SCHEMA}.runs VALUES
            (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'offline', ?, ?, now(), ?, ?, ?)""",
        [
            *key, key[2], display_name or None, state, created_at,
            datetime.fromtimestamp(st.st_mtime, tz=UTC), runtime, tags, group or None, job_type or None,
            sweep_id or None, user or None, host or environment.get("host") or None, notes or None,
            last_step, rows, exit_code, str(path), problem,
        ],
    )  # fmt: skip
    return state


def _expire_running(conn: duckdb.DuckDBPyConnection, running_window_s: float) -> int:
    """A run with no exit record stops being 'running' once its file has been quiet for the window."""
    changed = conn.execute(
        f"""UPDATE {SCHEMA}.runs SET state = 'crashed'
            WHERE source = 'offline' AND state = 'running'
              AND heartbeat_at < now() - to_seconds(?::DOUBLE)""",
        [float(running_window_s)],
    ).fetchone()
    return int(changed[0]) if changed else 0

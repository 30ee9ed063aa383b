"""Syncs local W&B run folders (offline-run-* / run-*) into the warehouse, incrementally.

Each run file has a watermark row (run_files.py: size, mtime, inode, a fingerprint of its head and
the byte offset read up to). Unchanged files are not opened; grown files are read from the watermark;
shrunk or replaced files are read again whole. A file's rows and its watermark are written in one
transaction, so a kill at any point leaves either the old or the new state, never duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.compute as pc

from mvdata_assets import defaults
from mvdata_assets.runs import store
from mvdata_assets.runs.run_files import (
    Watermark,
    discover_run_files,
    head_fingerprint,
    load_watermarks,
    resumed_runs,
    same_head,
    save_watermark,
)
from mvdata_assets.runs.store import SCHEMA, RunKey
from mvdata_assets.runs.values import NestedState, finite_or_none, to_json
from mvdata_assets.runs.wandb_file import (
    Chunk,
    NotAWandbFile,
    Prefetch,
    RunHeader,
    legacy_metadata,
    read_chunks,
)


@dataclass
class FileOutcome:
    path: str
    action: str  # new | grown | replaced | unchanged | refreshed | skipped
    run: str | None = None  # entity/project/run_id
    bytes_read: int = 0
    problem: str | None = None
    rows: dict[str, int] = field(default_factory=dict)  # rows written, by table


@dataclass
class SyncReport:
    files: list[FileOutcome] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    marked_crashed: int = 0  # runs without an exit record whose file stayed quiet past the running window

    def count(self, *actions: str) -> int:
        return sum(1 for f in self.files if f.action in actions)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files)

    @property
    def problems(self) -> list[str]:
        return [f.problem for f in self.files if f.problem]


def sync_offline(
    conn: duckdb.DuckDBPyConnection,
    dirs: Iterable[Path],
    *,
    force_refresh: bool = False,
    running_window_s: float = defaults.RUNNING_WINDOW_S,
) -> SyncReport:
    started = time.monotonic()
    store.ensure_schema(conn)
    report = SyncReport()
    known = load_watermarks(conn)
    segmented, singles = resumed_runs(discover_run_files(dirs))
    for segments in segmented:  # first: a copy of one of their files is then seen as already synced
        for outcome in _store_segments(conn, segments, known, force_refresh, running_window_s):
            report.files.append(outcome)
            for table, count in outcome.rows.items():
                report.rows[table] = report.rows.get(table, 0) + count
    plans = [_plan(path, known.get(str(path)), force_refresh) for path in singles]
    to_read = [i for i, plan in enumerate(plans) if isinstance(plan, _Plan)]
    readers: dict[int, Prefetch] = {}
    try:
        for i, plan in enumerate(plans):
            if isinstance(plan, _Plan):
                chunks = readers.pop(i, None) or plan.reader()
                following = next((j for j in to_read if j > i), None)
                if following is not None:  # start reading the next file while this one is stored
                    readers[following] = plans[following].reader()
                plan = _store_file(conn, plan, chunks, running_window_s)
            report.files.append(plan)
            for table, count in plan.rows.items():
                report.rows[table] = report.rows.get(table, 0) + count
    finally:
        for reader in readers.values():
            reader.close()
    report.marked_crashed = _expire_running(conn, running_window_s)
    report.seconds = time.monotonic() - started
    return report


@dataclass
class _Plan:
    """A file to read: whole, or from its watermark (`resumed`)."""

    path: Path
    outcome: FileOutcome
    watermark: Watermark  # what will be stored once the read commits
    prev: Watermark | None
    resumed: Watermark | None
    mtime: float

    def reader(self) -> Prefetch:
        return Prefetch(read_chunks(self.path, self.resumed.read_offset if self.resumed else 0))


def _plan(path: Path, prev: Watermark | None, force_refresh: bool) -> _Plan | FileOutcome:
    """Compares the file with its watermark: unchanged files are not opened."""
    try:
        st = path.stat()
        if prev and not force_refresh and (prev.size, prev.mtime_ns, prev.inode) == (
            st.st_size, st.st_mtime_ns, st.st_ino
        ):  # fmt: skip
            return FileOutcome(str(path), "unchanged", run="/".join(prev.run_key) if prev.run_key else None)
        grown = bool(prev and not force_refresh and prev.run_key and st.st_size >= prev.size)
        grown = grown and same_head(path, prev.fingerprint)
        action = "grown" if grown else ("refreshed" if force_refresh else "replaced") if prev else "new"
        watermark = Watermark(
            str(path), None, None, None, st.st_size, st.st_mtime_ns, st.st_ino, head_fingerprint(path), 0
        )
    except OSError as exc:
        return FileOutcome(str(path), "skipped", problem=f"{path}: {exc}")
    return _Plan(path, FileOutcome(str(path), action), watermark, prev, prev if grown else None, st.st_mtime)


def _store_file(conn: duckdb.DuckDBPyConnection, plan: _Plan, chunks: Prefetch, running_window_s: float) -> FileOutcome:
    """The file's rows and its new watermark, in one transaction."""
    conn.begin()
    try:
        _read_file(conn, plan, chunks, running_window_s)
        save_watermark(conn, plan.watermark)
        if plan.outcome.action != "skipped":  # with the rows: a kill after the commit still leaves exports to catch up
            store.bump_generation(conn)
        conn.commit()
    except Exception as exc:  # one unreadable file never stops the others; what was stored stays
        conn.rollback()
        chunks.close()
        return FileOutcome(str(plan.path), "skipped", problem=f"{plan.path}: {type(exc).__name__}: {exc}")
    return plan.outcome


def _store_segments(
    conn: duckdb.DuckDBPyConnection, paths: list[Path], known: dict[str, Watermark], force_refresh: bool,
    running_window_s: float,
) -> list[FileOutcome]:  # fmt: skip
    """A resumed run's segments, read together in order as one run, as `wandb sync` uploads them: in one
    transaction with their watermarks. A change to any of them reads them all again from their start (they are
    download logs and the like: a few records each)."""
    plans = [_plan(path, known.get(str(path)), force_refresh) for path in paths]
    if all(isinstance(plan, FileOutcome) for plan in plans):
        return plans  # all unchanged
    plans = [_plan(path, known.get(str(path)), True) for path in paths]
    readable = [plan for plan in plans if isinstance(plan, _Plan)]
    outcomes = [plan for plan in plans if isinstance(plan, FileOutcome)]
    conn.begin()
    try:
        earlier = None
        for plan in readable:
            chunks = plan.reader()
            try:
                earlier = _read_file(conn, plan, chunks, running_window_s, earlier, segment=True) or earlier
            finally:
                chunks.close()
            save_watermark(conn, plan.watermark)
        store.bump_generation(conn)
        conn.commit()
    except Exception as exc:  # noqa: BLE001 - one unreadable run never stops the others; what was stored stays
        conn.rollback()
        problem = f"{type(exc).__name__}: {exc}"
        return [
            *outcomes,
            *(FileOutcome(str(plan.path), "skipped", problem=f"{plan.path}: {problem}") for plan in readable),
        ]
    return [*outcomes, *(plan.outcome for plan in readable)]


@dataclass
class _Progress:
    """What reading one file gathered besides the history rows (which go straight to DuckDB)."""

    header: RunHeader | None = None
    environment: dict = field(default_factory=dict)
    stats: list = field(default_factory=list)
    exit_code: int | None = None
    exit_runtime_s: float | None = None
    last_step: int | None = None
    max_runtime_s: float | None = None
    history_rows: int = 0

    def add(self, chunk: Chunk) -> None:
        self.environment.update(chunk.environment)
        self.stats += chunk.stats
        if chunk.exit_code is not None:
            self.exit_code, self.exit_runtime_s = chunk.exit_code, chunk.exit_runtime_s
        history = chunk.history
        if history.num_rows:
            self.history_rows += history.num_rows
            step = pc.max(history["step"]).as_py()
            self.last_step = step if self.last_step is None else max(self.last_step, step)
            runtime = finite_or_none(pc.max(history["runtime_s"]).as_py())
            if runtime is not None:
                self.max_runtime_s = runtime if self.max_runtime_s is None else max(self.max_runtime_s, runtime)


@dataclass
class _Earlier:
    """A run read from its earlier segments: where the next segment's steps start, and what was gathered."""

    key: RunKey
    progress: _Progress
    states: dict[str, NestedState]

    @property
    def step_offset(self) -> int:
        return 0 if self.progress.last_step is None else self.progress.last_step + 1


def _read_file(
    conn: duckdb.DuckDBPyConnection, plan: _Plan, chunks: Prefetch, running_window_s: float,
    earlier: _Earlier | None = None, *, segment: bool = False,
) -> _Earlier | None:  # fmt: skip
    """Reads the file (from the watermark when resumed; after `earlier` when it is a later segment of a resumed
    run) and writes its rows; runs inside a transaction. Returns the run as read so far."""
    path, resumed, prev, watermark, outcome = plan.path, plan.resumed, plan.prev, plan.watermark, plan.outcome
    key = resumed.run_key if resumed else (earlier.key if earlier else None)
    start = resumed.read_offset if resumed else 0
    if prev and prev.run_key and not resumed and not earlier:
        store.delete_run(conn, *prev.run_key)
    states = earlier.states if earlier else {
        table: NestedState.from_json(getattr(resumed, f"{table}_state") if resumed else None)
        for table in ("config", "summary", "metadata")
    }  # fmt: skip
    progress = earlier.progress if earlier else _Progress()
    offset = earlier.step_offset if earlier else 0
    stats_before, rows_before = len(progress.stats), progress.history_rows
    end = start
    try:
        for chunk in chunks:
            end = chunk.end_offset
            outcome.problem = chunk.problem or outcome.problem
            if chunk.run and key is None:
                progress.header = chunk.run
                key = (chunk.run.entity, chunk.run.project, chunk.run.run_id)
                owner = None if segment else _owner(conn, key, path)
                if owner:  # a copy of a file already synced
                    outcome.action = "skipped"
                    outcome.problem = f"{path}: run {'/'.join(key)} is already synced from {owner}"
                    return None
                store.delete_run(conn, *key)
            if key is None:
                continue
            if offset:  # a resumed segment counts its steps from 0; W&B's sync starts them after the last one
                steps = pc.add(chunk.history["step"], offset)
                chunk = replace(chunk, history=chunk.history.set_column(chunk.history.schema.get_field_index("step"),
                                                                       "step", steps))  # fmt: skip
            store.insert_history(conn, key, chunk.history)
            progress.add(chunk)
            for path_key, value_json in chunk.config:
                states["config"].apply(path_key, value_json)
            for path_key, value_json in chunk.summary:
                states["summary"].apply(path_key, value_json)
    except NotAWandbFile as exc:
        outcome.problem = str(exc)
    outcome.bytes_read = end - start
    watermark.read_offset, watermark.problem = end, outcome.problem
    if key is None:
        outcome.problem = watermark.problem = outcome.problem or f"{path}: no run record"
        return None
    outcome.run = "/".join(key)
    watermark.entity, watermark.project, watermark.run_id = key
    if not progress.environment and not resumed:
        progress.environment = legacy_metadata(path.parent)
    for name, value in progress.environment.items():
        states["metadata"].apply((name,), to_json(value))
    outcome.rows = {"history": progress.history_rows - rows_before}
    for table, state in states.items():
        outcome.rows[table] = store.replace_values(conn, table, key, state)
        setattr(watermark, f"{table}_state", state.to_json())
    outcome.rows["system_metrics"] = store.insert_stats(conn, key, progress.stats[stats_before:])
    outcome.rows["runs"] = _upsert_run(conn, key, progress, path, plan.mtime, running_window_s, outcome.problem)
    return _Earlier(key, progress, states)


def _owner(conn: duckdb.DuckDBPyConnection, key: RunKey, path: Path) -> str | None:
    """Another, still existing, file this run was already synced from (a copy or a resumed segment)."""
    for (other,) in conn.execute(
        f"SELECT path FROM {SCHEMA}._offline_files WHERE entity = ? AND project = ? AND run_id = ? AND path <> ?",
        [*key, str(path)],
    ).fetchall():
        if Path(other).exists():
            return other
    return None


def _state(exit_code: int | None, mtime: float, running_window_s: float) -> str:
    if exit_code is not None:
        return "finished" if exit_code == 0 else "failed"
    return "running" if time.time() - mtime < running_window_s else "crashed"


def _upsert_run(
    conn: duckdb.DuckDBPyConnection,
    key: RunKey,
    progress: _Progress,
    path: Path,
    mtime: float,
    running_window_s: float,
    problem: str | None,
) -> int:
    """Writes the run's row (returns 1; 0 while the file has shown no run record); a resumed read adds to what the
    earlier reads of the file found."""
    old = conn.execute(
        f"""SELECT display_name, created_at, tags, "group", job_type, sweep_id, "user", host, notes,
                   last_step, history_rows, runtime_s, exit_code
            FROM {SCHEMA}.runs WHERE entity = ? AND project = ? AND run_id = ?""",
        list(key),
    ).fetchone()
    header, environment = progress.header, progress.environment
    last_step, rows, runtime, exit_code = (
        progress.last_step, progress.history_rows, progress.max_runtime_s, progress.exit_code
    )  # fmt: skip
    if header is None and old is None:
        return 0
    if header is None:
        display_name, created_at, tags, group, job_type, sweep_id, user, host, notes = old[:9]
        last_step = old[9] if last_step is None else max(last_step, old[9] if old[9] is not None else last_step)
        rows += old[10] or 0
        runtime = runtime if runtime is not None else old[11]
        exit_code = exit_code if exit_code is not None else old[12]
    else:
        display_name, created_at, tags = header.display_name, header.started_at, header.tags
        group, job_type, sweep_id, host, notes = (
            header.group, header.job_type, header.sweep_id, header.host, header.notes
        )  # fmt: skip
        user = environment.get("username") or environment.get("email")
        host = host or environment.get("host")
    state = _state(exit_code, mtime, running_window_s)
    runtime = progress.exit_runtime_s or runtime
    conn.execute(
        f"""INSERT OR REPLACE INTO {SCHEMA}.runs VALUES
            (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'offline', ?, ?, now(), ?, ?, ?)""",
        [
            *key, key[2], display_name or None, state, created_at,
            datetime.fromtimestamp(mtime, tz=UTC), runtime, tags, group or None, job_type or None,
            sweep_id or None, user or None, host or None, notes or None,
            last_step, rows, exit_code, str(path), problem,
        ],
    )  # fmt: skip
    return 1


def _expire_running(conn: duckdb.DuckDBPyConnection, running_window_s: float) -> int:
    """A run with no exit record stops being 'running' once its file has been quiet for the window."""
    with store.transaction(conn):
        changed = conn.execute(
            f"""UPDATE {SCHEMA}.runs SET state = 'crashed'
                WHERE source = 'offline' AND state = 'running'
                  AND heartbeat_at < now() - to_seconds(?::DOUBLE)""",
            [float(running_window_s)],
        ).fetchone()
        count = int(changed[0]) if changed else 0
        if count:
            store.bump_generation(conn)
    return count

"""Opening the DuckDB warehouse: one writer at a time, and a wait that says how long it took.

DuckDB lets one process write a file. A file lock beside the database serialises our own
writers (Dagster steps, the CLI, benchmarks) so none of them falls into DuckDB's own lock error
or dagster-duckdb's silent ~100 s back-off; the wait is reported in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout


class WarehouseBusy(RuntimeError):
    """Another writer held the warehouse for longer than the allowed wait."""


@contextmanager
def warehouse_lock(
    database: Path,
    timeout_s: float = 600.0,
    on_wait: Callable[[float], None] | None = None,
    on_busy: Callable[[str], None] | None = None,
) -> Iterator[float]:
    """Holds the warehouse's writer lock; yields the seconds spent waiting for it. When another writer holds it,
    `on_busy` hears so before the wait starts (a silent wait looks like a hang) and `on_wait` how long it lasted."""
    database.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(database) + ".lock")
    started = time.monotonic()
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_busy:
                on_busy(f"waiting up to {timeout_s:.0f} s for another writer of {database}")
            lock.acquire(timeout=timeout_s)
    except Timeout as exc:
        raise WarehouseBusy(f"{database} is being written by another process; gave up after {timeout_s:.0f} s") from exc
    waited = time.monotonic() - started
    if on_wait and waited >= 0.5:
        on_wait(waited)
    try:
        yield waited
    finally:
        lock.release()


@contextmanager
def connect(
    database: Path,
    timeout_s: float = 600.0,
    on_wait: Callable[[float], None] | None = None,
    on_busy: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    with warehouse_lock(database, timeout_s, on_wait, on_busy):
        conn = duckdb.connect(str(database))
        try:
            yield conn
        finally:
            conn.close()

"""Opening the DuckDB warehouse: one writer at a time, and a wait that says how long it took; and names and text
put into its SQL (`quoted`, `sql_string`), which are data (a metric may be named `"; DROP`), never SQL.

DuckDB lets one process write a file. A file lock beside the database serialises our own
writers (Dagster steps, the CLI, benchmarks) so none of them falls into DuckDB's own lock error
or dagster-duckdb's silent ~100 s back-off; the wait is reported in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout

from mvdata_assets.defaults import LOCK_TIMEOUT_S


class Busy(RuntimeError):
    """Another process held a lock for longer than the allowed wait."""


class WarehouseBusy(Busy):
    """Another writer held the warehouse for longer than the allowed wait."""


@contextmanager
def exclusive(
    lock_path: Path,
    what: str,
    timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[float], None] | None = None,
    on_busy: Callable[[str], None] | None = None,
    busy: type[Busy] = Busy,
) -> Iterator[float]:
    """Holds the file lock at `lock_path`, guarding `what`; yields the seconds spent waiting for it. When another
    process holds it, `on_busy` hears so before the wait starts (a silent wait looks like a hang) and `on_wait` how
    long it lasted."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    started = time.monotonic()
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_busy:
                on_busy(f"waiting up to {timeout_s:.0f} s for another writer of {what}")
            lock.acquire(timeout=timeout_s)
    except Timeout as exc:
        raise busy(f"{what} is being written by another process; gave up after {timeout_s:.0f} s") from exc
    waited = time.monotonic() - started
    if on_wait and waited >= 0.5:
        on_wait(waited)
    try:
        yield waited
    finally:
        lock.release()


def warehouse_lock(
    database: Path,
    timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[float], None] | None = None,
    on_busy: Callable[[str], None] | None = None,
) -> AbstractContextManager[float]:
    """The warehouse's writer lock, beside the database file."""
    return exclusive(Path(str(database) + ".lock"), str(database), timeout_s, on_wait, on_busy, WarehouseBusy)


@contextmanager
def connect(
    database: Path,
    timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[float], None] | None = None,
    on_busy: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    with warehouse_lock(database, timeout_s, on_wait, on_busy):
        conn = duckdb.connect(str(database))
        try:
            yield conn
        finally:
            conn.close()


def quoted(name: str) -> str:
    """`name` as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def sql_string(text: str) -> str:
    """`text` as a DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"

"""The DuckDB warehouse as a Dagster resource: dagster-duckdb's resource behind our writer lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import get_dagster_logger
from dagster_duckdb import DuckDBResource

from mvdata_assets.db import warehouse_lock


class WarehouseResource(DuckDBResource):
    """One writer at a time; a wait for another writer is logged in seconds."""

    lock_timeout_s: float = 600.0

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        log = get_dagster_logger()
        with (
            warehouse_lock(
                Path(self.database),
                self.lock_timeout_s,
                on_wait=lambda s: log.info(f"waited {s:.1f} s for another writer of {self.database}"),
            ),
            super().get_connection() as conn,
        ):
            yield conn

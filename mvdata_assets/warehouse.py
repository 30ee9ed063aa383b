"""The DuckDB warehouse in Dagster: the resource (dagster-duckdb's, behind our writer lock) and the IO manager over
it, through which a user's own assets take the project's tables, exports and datasets as inputs.

The engines write their tables themselves (they stream; nothing large passes through Python), so the project's
assets return no value. The IO manager loads them by the input's type annotation: `pyarrow.Table` (the default),
`pandas.DataFrame`, or `WarehouseTable`, a lazy handle whose DuckDB relation filters and aggregates inside the
warehouse. A dataset asset loads as a `DatasetManifest`. What a user's asset returns (a DataFrame, an Arrow table,
a DuckDB relation) is stored as a warehouse table named after its key. dagster-duckdb's own IO manager is not used:
it deletes a table before each write, it knows nothing of datasets or exports, and it bypasses the writer lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
from dagster import (
    AssetKey,
    ConfigurableIOManager,
    InputContext,
    MetadataValue,
    OutputContext,
    TableColumn,
    TableSchema,
    get_dagster_logger,
)
from dagster_duckdb import DuckDBResource

from mvdata_assets.datasets import store as datasets_store
from mvdata_assets.db import quoted, sql_string, warehouse_lock
from mvdata_assets.defaults import LOCK_TIMEOUT_S
from mvdata_assets.runs import run_datasets
from mvdata_assets.runs import store as runs_store

ENGINE_SCHEMAS = (runs_store.SCHEMA, datasets_store.SCHEMA)  # written by the engines only
DATASETS_GROUP = "datasets"  # the dataset assets' group and key prefix: such an input loads as a DatasetManifest
EXPORTS = ("wandb", "exports")  # asset key prefix of the parquet exports


class WarehouseResource(DuckDBResource):
    """One writer at a time; a wait for another writer is logged in seconds."""

    lock_timeout_s: float = LOCK_TIMEOUT_S

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        log = get_dagster_logger()
        with (
            warehouse_lock(
                Path(self.database),
                self.lock_timeout_s,
                on_wait=lambda s: log.info(f"waited {s:.1f} s for another writer of {self.database}"),
                on_busy=log.info,
            ),
            super().get_connection() as conn,
        ):
            yield conn


@dataclass(frozen=True)
class WarehouseTable:
    """A warehouse table (or parquet export) not read yet: `with table.relation() as rel:` opens it as a DuckDB
    relation under the warehouse's lock, so a billion-row history is filtered and aggregated in DuckDB, e.g.
    `rel.filter("key = 'train/loss'").aggregate("run_id, min(value)").df()`. The relation lives as long as the
    `with` block."""

    warehouse: WarehouseResource
    source: str  # what follows FROM: a quoted table name or a read_parquet(...) call
    columns: tuple[str, ...] = ()

    @property
    def query(self) -> str:
        picked = ", ".join(quoted(c) for c in self.columns) if self.columns else "*"
        return f"SELECT {picked} FROM {self.source}"

    @contextmanager
    def relation(self) -> Iterator[duckdb.DuckDBPyRelation]:
        with self.warehouse.get_connection() as conn:
            yield conn.sql(self.query)


@dataclass(frozen=True)
class DatasetFile:
    path: str
    bytes: int | None
    sha256: str | None
    status: str  # downloaded | skipped | failed | manual


@dataclass(frozen=True)
class DatasetShard:
    list: str
    shard: int
    path: str
    images: int | None
    in_place: int | None
    failed: int | None
    sha256: str | None


@dataclass(frozen=True)
class DatasetManifest:
    """A downloaded dataset as its last download left it: status, folder, and every file with its checksum."""

    name: str
    status: str  # complete | partial | failed | manual | missing (never downloaded)
    folder: str
    files: tuple[DatasetFile, ...]
    shards: tuple[DatasetShard, ...] = ()


class WarehouseIOManager(ConfigurableIOManager):
    """Loads the project's assets for downstream assets; stores what a user's asset returns as a table."""

    warehouse: WarehouseResource
    exports_dir: str
    data_root: str

    # -- storing a user's asset

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:  # the project's assets write the warehouse themselves
            return
        schema, table = table_of(context.asset_key)
        data = _as_arrow(obj, context.asset_key)
        name = f"{quoted(schema)}.{quoted(table)}"
        with self.warehouse.get_connection() as conn:
            conn.register("mvdata_output", data)
            try:
                conn.execute("BEGIN")
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted(schema)}")
                conn.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM mvdata_output")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.unregister("mvdata_output")
            metadata = table_metadata(conn, schema, table)
        context.add_output_metadata(metadata)

    # -- loading the project's assets (and the user's)

    def load_input(self, context: InputContext) -> Any:
        key = context.asset_key
        wanted = context.dagster_type.typing_type
        if key.path[0] == DATASETS_GROUP and key.path[-1] != "download_summary":
            if wanted not in (DatasetManifest, Any, object):
                raise TypeError(f"{key.to_user_string()} is a dataset: take it as a DatasetManifest, not {wanted}")
            return self.manifest(key.path[-1])
        columns = tuple((context.definition_metadata or {}).get("columns") or ())
        table = WarehouseTable(self.warehouse, self._source(context), columns)
        if wanted is WarehouseTable:
            return table
        with table.relation() as relation:
            return relation.df() if wanted is pd.DataFrame else relation.to_arrow_table()

    def _source(self, context: InputContext) -> str:
        key = context.asset_key
        if tuple(key.path[:-1]) == EXPORTS:
            path = Path(self.exports_dir) / f"{key.path[-1]}.parquet"
            return f"read_parquet({sql_string(str(path))})"
        upstream = context.upstream_output.definition_metadata if context.upstream_output else None
        declared = (upstream or {}).get("dagster/table_name")
        if declared:
            return ".".join(quoted(part) for part in str(declared).split("."))
        schema, table = table_of(key, reading=True)
        return f"{quoted(schema)}.{quoted(table)}"

    def manifest(self, name: str) -> DatasetManifest:
        with self.warehouse.get_connection() as conn:
            known = conn.execute(
                """SELECT count(*) FROM information_schema.tables
                   WHERE table_schema = 'datasets' AND table_name = 'download_summary'"""
            ).fetchone()[0]
            if not known:
                return DatasetManifest(name, "missing", str(Path(self.data_root) / name), ())
            status = conn.execute("SELECT status FROM datasets.download_summary WHERE dataset = ?", [name]).fetchone()
            files = conn.execute(
                "SELECT path, bytes, sha256, status FROM datasets.files WHERE dataset = ? ORDER BY path", [name]
            ).fetchall()
            shards = conn.execute(
                """SELECT list, shard, path, images, in_place, failed, sha256 FROM datasets.shards
                   WHERE dataset = ? ORDER BY list, shard""",
                [name],
            ).fetchall()
        return DatasetManifest(
            name,
            status[0] if status else "missing",
            str(Path(self.data_root) / name),
            tuple(DatasetFile(*row) for row in files),
            tuple(DatasetShard(*row) for row in shards),
        )


def table_of(key: AssetKey, reading: bool = False) -> tuple[str, str]:
    """The warehouse table of an asset: schema from the key's prefix (`analysis/per_state` -> analysis.per_state;
    no prefix -> main). A user's asset may not write into the engines' schemas."""
    schema, table = "_".join(key.path[:-1]) or "main", key.path[-1]
    if not reading and schema in ENGINE_SCHEMAS:
        raise ValueError(
            f"asset {key.to_user_string()}: the schema {schema!r} is the project's own (its engines write it); "
            "give your asset another key prefix, e.g. key_prefix='analysis'"
        )
    return schema, table


def _as_arrow(obj: Any, key: AssetKey) -> pa.Table | pa.RecordBatchReader:
    if isinstance(obj, pa.Table | pa.RecordBatchReader):
        return obj
    if isinstance(obj, pd.DataFrame):
        return pa.Table.from_pandas(obj, preserve_index=False)
    if isinstance(obj, duckdb.DuckDBPyRelation):
        return obj.fetch_record_batch()  # streamed: a large relation never sits in memory whole
    raise TypeError(
        f"asset {key.to_user_string()} returned a {type(obj).__name__}; the warehouse stores a pandas DataFrame, a "
        "pyarrow Table or a DuckDB relation"
    )


def table_metadata(conn: duckdb.DuckDBPyConnection, schema: str, table: str, stored_in: str | None = None) -> dict:
    """What Dagster shows for a warehouse table: its name, row count and column schema. `stored_in`: the table holding
    the rows of a view with as many rows, counted instead of the view."""
    rows = conn.execute(f"SELECT count(*) FROM {quoted(schema)}.{quoted(stored_in or table)}").fetchone()[0]
    return {
        "dagster/table_name": f"{schema}.{table}",
        "dagster/row_count": MetadataValue.int(rows),
        "dagster/column_schema": column_schema(conn, schema, table),
    }


def column_schema(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> TableSchema:
    columns = conn.execute(
        """SELECT column_name, data_type FROM information_schema.columns
           WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position""",
        [schema, table],
    ).fetchall()
    return TableSchema(columns=[TableColumn(c, t) for c, t in columns])


def declared_table(schema: str, table: str) -> dict:
    """An engine table's name and columns for its asset's definition, so the catalog shows them before anything is
    stored; read from an empty in-memory warehouse the engines' own DDL built, never written by hand."""
    return {"dagster/table_name": f"{schema}.{table}", "dagster/column_schema": column_schema(_empty(), schema, table)}


@cache
def _empty() -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect()
    runs_store.ensure_schema(conn)
    datasets_store.ensure_schema(conn)
    conn.execute(run_datasets.DDL)
    return conn

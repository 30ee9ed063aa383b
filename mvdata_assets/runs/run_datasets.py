"""Which training runs used which catalog datasets: the join between the two halves of the warehouse.

A run names its data in its config, under keys such as `data.datasets` (a list), `dataset`, `datasets` or
`data_root` (a path). A value names a catalog dataset when it is the dataset's name, or a path with the name as one
of its folders (`/data/coco/train2017` names `coco`). `wandb.run_datasets` holds one row per run and dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import PurePath

import duckdb

from mvdata_assets.runs.store import SCHEMA

DDL = f"""CREATE OR REPLACE TABLE {SCHEMA}.run_datasets (
    entity VARCHAR NOT NULL, project VARCHAR NOT NULL, run_id VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    config_key VARCHAR NOT NULL, config_value VARCHAR
)"""


def named(value: object) -> Iterator[str]:
    """The strings a config value holds: itself, or each string of a list."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from named(item)


def datasets_named(text: str, catalog: set[str]) -> set[str]:
    if text in catalog:
        return {text}
    return {part for part in PurePath(text).parts if part in catalog}


def build(
    conn: duckdb.DuckDBPyConnection, catalog: Sequence[str], keys: Sequence[str], leave_out: Sequence[str] = ()
) -> int:
    """Rewrites wandb.run_datasets from the runs' config (a few rows per run: rebuilt whole), leaving out the runs
    of the projects in `leave_out` (the download runs' own log names every dataset it fetched); returns its rows."""
    names = set(catalog)
    config = conn.execute(
        f"SELECT entity, project, run_id, key, coalesce(value_json, CAST(value AS VARCHAR)) FROM {SCHEMA}.config "
        "WHERE key IN ? AND project NOT IN ? ORDER BY ALL",
        [list(keys), [*leave_out, ""]],
    ).fetchall()
    rows = {}
    for entity, project, run_id, key, text in config:
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            value = text
        for item in named(value):
            for dataset in datasets_named(item, names):
                rows.setdefault((entity, project, run_id, dataset), (key, item))
    conn.execute("BEGIN")
    try:
        conn.execute(DDL)
        if rows:
            conn.executemany(
                f"INSERT INTO {SCHEMA}.run_datasets VALUES (?, ?, ?, ?, ?, ?)",
                [[*run, *found] for run, found in rows.items()],
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(rows)

"""One run from the W&B API: its history after the steps already stored, and its metadata file, as warehouse rows.

History comes as wandb-core's history reader reads it: the parquet exports (only when they can hold steps not
stored yet), then `HistoryPage` up to W&B's `lastStep`, whatever the exports and live data say (an active run often
has neither). Both become long rows (step, key, value) by the warehouse's value rule, columnar where the types allow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mvdata_assets.runs.values import EXACT_INT_LIMIT, leaf_paths, parse_json, split_value
from mvdata_assets.runs.wandb_api import FILES_QUERY, HISTORY_QUERY, PARQUET_QUERY, Client, RunVanished, last_step
from mvdata_assets.runs.wandb_format import SYSTEM_KEYS

PAGE_STEPS = 1000  # steps per HistoryPage request (the SDK's page size)
HISTORY_SCHEMA = pa.schema(
    [("step", pa.int64()), ("timestamp", pa.float64()), ("runtime_s", pa.float64()), ("key", pa.string()),
     ("value", pa.float64()), ("value_json", pa.string())]
)  # fmt: skip


@dataclass
class Fetched:
    """What a worker thread brought back for one run, ready to store."""

    node: dict
    history: list[pa.Table]
    stored_through: int  # the highest step read, this time or before
    metadata: dict | None
    requests: int


def _run_of(answer: dict, run_id: str) -> dict:
    run = (answer.get("project") or {}).get("run")
    if run is None:
        raise RunVanished(f"W&B no longer has run {run_id}")
    return run


def fetch_run(
    client: Client, entity: str, project: str, node: dict, stored_step: int, work: Path, *, want_metadata: bool
) -> Fetched:
    """Every step after `stored_step`: the exports where they may hold such steps, then `HistoryPage` up to W&B's
    last step (wandb-core reads live history the same way when the answer names no live steps)."""
    run_id, newest = node["name"], last_step(node)
    requests, tables, through = 0, [], stored_step
    variables = {"entity": entity, "project": project, "run": run_id}
    if newest > stored_step or newest < 0:  # W&B's last step unknown (no history keys): ask all the same
        answer = client.graphql(PARQUET_QUERY, {**variables, "liveKeys": ["_step"]})
        requests += 1
        parquet = _run_of(answer, run_id).get("parquetHistory") or {}
        live_steps = [step for step in map(_step_of, parquet.get("liveData") or []) if step is not None]
        newest = max([newest, *live_steps])
        exports_end = min(live_steps) if live_steps else None  # unknown: the exports may hold any step
        if exports_end is None or exports_end > stored_step + 1:
            for i, url in enumerate(parquet.get("parquetUrls") or []):
                dest = work / f"{run_id}-{i}.parquet"
                client.download(url, dest)
                requests += 1
                rows, last = export_rows(pq.read_table(dest), after_step=stored_step)
                dest.unlink()
                tables.append(rows)
                through = max(through, last)
        start = through + 1
        while start <= newest:
            stop = min(start + PAGE_STEPS, newest + 1)
            answer = client.graphql(HISTORY_QUERY, {**variables, "minStep": start, "maxStep": stop,
                                                    "pageSize": stop - start})  # fmt: skip
            requests += 1
            rows, last = json_rows(_run_of(answer, run_id).get("history") or [], after_step=through)
            tables.append(rows)
            through = max(through, last)
            start = stop
    metadata = None
    if want_metadata:
        metadata, asked = fetch_metadata(client, entity, project, run_id, work)
        requests += asked
    return Fetched(node, tables, through, metadata, requests)


def _step_of(row: Any) -> int | None:
    row = parse_json(row) if isinstance(row, str) else row
    step = row.get("_step") if isinstance(row, dict) else None
    return int(step) if isinstance(step, int | float) else None  # W&B sends some steps as floats


def fetch_metadata(client: Client, entity: str, project: str, run_id: str, work: Path) -> tuple[dict | None, int]:
    """`wandb-metadata.json` (host, os, python, gpu, git, …) as the SDK's `Run.metadata` gets it: `File.url`,
    downloaded by wandb-core with the API key. A run without the file (or with `files` null) has none."""
    answer = client.graphql(FILES_QUERY, {"entity": entity, "project": project, "run": run_id,
                                          "names": ["wandb-metadata.json"]})  # fmt: skip
    files = _run_of(answer, run_id).get("files") or {}
    node = next((e["node"] for e in files.get("edges") or [] if e and e.get("node") and e["node"].get("url")), None)
    if node is None:
        return None, 1
    dest = work / f"{run_id}-metadata.json"
    client.download(node["url"], dest, node.get("sizeBytes") or 0)
    try:
        metadata = parse_json(dest.read_text(encoding="utf-8") or "{}")
    finally:
        dest.unlink(missing_ok=True)
    return (metadata if isinstance(metadata, dict) else None), 2


def export_rows(table: pa.Table, after_step: int) -> tuple[pa.Table, int]:
    """A parquet export (one row per step, one typed column per metric) as long history rows of the steps after
    `after_step`, columnar; and the highest step it holds (`after_step` when none is later)."""
    table = table.filter(pc.greater(table.column("_step").cast(pa.int64()), after_step))
    step = table.column("_step").cast(pa.int64())
    last = pc.max(step).as_py() if table.num_rows else None
    timestamp = _float_column(table, "_timestamp")
    runtime = _float_column(table, "_runtime")
    parts = []
    for name in table.column_names:
        if name in SYSTEM_KEYS:
            continue
        for key, column in _leaf_columns(name, table.column(name)):
            valid = pc.is_valid(column)
            if not pc.any(valid).as_py():
                continue
            value, value_json = _split_column(column.filter(valid))
            count = len(value)
            parts.append(pa.table(
                [step.filter(valid), timestamp.filter(valid), runtime.filter(valid), pa.array([key] * count),
                 value, value_json], schema=HISTORY_SCHEMA))  # fmt: skip
    rows = pa.concat_tables(parts).combine_chunks() if parts else HISTORY_SCHEMA.empty_table()  # one chunk: DuckDB
    return rows, after_step if last is None else last  # inserts it faster than many small ones


def _float_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name in table.column_names:
        return table.column(name).cast(pa.float64())
    return pa.chunked_array([pa.nulls(table.num_rows, pa.float64())])


def _leaf_columns(name: str, column: pa.ChunkedArray) -> Iterator[tuple[str, pa.ChunkedArray]]:
    """Struct columns (dicts logged as metrics) become dotted keys, as the offline reader flattens them."""
    if pa.types.is_struct(column.type):
        for i in range(column.type.num_fields):
            child = pc.struct_field(column, [i])
            yield from _leaf_columns(f"{name}.{column.type.field(i).name}", child)
    else:
        yield name, column


def _split_column(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """The warehouse's value rule, for a whole column at once where its type allows."""
    typ = column.type
    if pa.types.is_floating(typ):
        return column.cast(pa.float64()).combine_chunks(), pa.nulls(len(column), pa.string())
    if pa.types.is_integer(typ):
        as_int = column.cast(pa.int64())
        beyond = pc.greater(pc.abs(as_int), EXACT_INT_LIMIT)
        exact = pc.if_else(beyond, pc.cast(as_int, pa.string()), pa.scalar(None, pa.string()))
        return as_int.cast(pa.float64(), safe=False).combine_chunks(), exact.combine_chunks()
    pairs = [split_value(v) for v in column.to_pylist()]  # strings, booleans, lists: a JSON text each
    return pa.array([p[0] for p in pairs], pa.float64()), pa.array([p[1] for p in pairs], pa.string())


def json_rows(rows: Sequence[str | dict], after_step: int) -> tuple[pa.Table, int]:
    """HistoryPage rows (JSON text, one per step) as long history rows of the steps after `after_step`; and the
    highest step among them (`after_step` when none is later)."""
    steps, stamps, runtimes, keys, values, jsons = [], [], [], [], [], []
    last = after_step
    for raw in rows:
        row = parse_json(raw) if isinstance(raw, str) else raw
        step = _step_of(row)
        if step is None or step <= after_step:
            continue
        last = max(last, step)
        stamp, runtime = row.get("_timestamp"), row.get("_runtime")
        for name, item in row.items():
            if name in SYSTEM_KEYS:
                continue
            for path, leaf in leaf_paths(item, (name,)):
                value, value_json = split_value(leaf)
                steps.append(step)
                stamps.append(stamp)
                runtimes.append(runtime)
                keys.append(".".join(path))
                values.append(value)
                jsons.append(value_json)
    return pa.table([steps, stamps, runtimes, keys, values, jsons], schema=HISTORY_SCHEMA), last

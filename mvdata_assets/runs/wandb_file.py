"""Reads a `.wandb` run file (offline or synced run folder) from any record boundary onwards.

Framing, CRC checks, history items and summary deltas are decoded by the C scanner
(`_wandb_scan`), or by its pure-Python twin (`wandb_scan_fallback`) where the optional C extension
is not built; the few remaining record kinds are decoded here with wandb's proto classes.
Reading stops at the end of the file, at an incomplete tail (a live or killed run: not an
error, the next read resumes there) or at a corrupt record (reported with file and offset;
everything before it is kept).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from mvdata_assets.runs.values import KeyPath
from mvdata_assets.runs.wandb_format import (
    BLOCK,
    CONFIG,
    ENVIRONMENT,
    EXIT,
    HEADER,
    HEADER_BYTES,
    MAGIC,
    RUN,
    STATS,
    STATUS_CORRUPT,
    STATUS_INCOMPLETE,
    SUMMARY_SEPARATOR,
)

log = logging.getLogger(__name__)

# The scanner: the C extension when it is built (it is optional: an install without a C compiler or zlib's headers
# goes on without it), else the pure-Python one, which reads what W&B writes the same, more slowly.
# MVDATA_WANDB_SCANNER=python picks the pure-Python scanner even where the C one is built (tests, debugging).
if os.environ.get("MVDATA_WANDB_SCANNER") == "python":
    from mvdata_assets.runs import wandb_scan_fallback as scanner
else:
    try:
        from mvdata_assets.runs import _wandb_scan as scanner
    except ImportError:
        from mvdata_assets.runs import wandb_scan_fallback as scanner

        log.warning("the C .wandb scanner is not built: run files are read by the slower pure-Python one")

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
PREFETCH_CHUNKS = 2  # decoded chunks waiting for the caller, at most

HISTORY_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("timestamp", pa.float64()),
        ("runtime_s", pa.float64()),
        ("key", pa.dictionary(pa.int32(), pa.string())),
        ("value", pa.float64()),
        ("value_json", pa.string()),
    ]
)


class NotAWandbFile(ValueError):
    """The file is empty or does not start with the `.wandb` header."""


@dataclass
class RunHeader:
    run_id: str
    entity: str
    project: str
    display_name: str
    group: str
    job_type: str
    tags: list[str]
    host: str
    notes: str
    sweep_id: str
    started_at: datetime | None


@dataclass
class Chunk:
    """What one stretch of the file held; in the config and summary updates, a value of None removes its key."""

    end_offset: int
    history: pa.Table
    summary: list[tuple[KeyPath, str | None]]  # updates in order; None removes
    run: RunHeader | None = None
    config: list[tuple[KeyPath, str | None]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    stats: list[tuple[datetime, str, str]] = field(default_factory=list)
    exit_code: int | None = None
    exit_runtime_s: float | None = None
    problem: str | None = None  # a corrupt record: reading stopped there


def check_header(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    if not head:
        raise NotAWandbFile(f"{path}: empty file")
    if len(head) < HEADER_BYTES or HEADER.unpack(head) != MAGIC:
        raise NotAWandbFile(f"{path}: not a W&B run file (bad header {head!r})")


def read_chunks(path: Path, start: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Chunks of decoded records from `start` (0 or a record boundary returned earlier)."""
    check_header(path)
    offset = max(start, HEADER_BYTES)
    with path.open("rb") as f:
        size = f.seek(0, 2)
        want = chunk_bytes
        while offset < size:
            f.seek(offset)
            # end each read on a block boundary so no fragment is split between reads
            span = want - (offset + want) % BLOCK
            data = f.read(span)
            at_eof = offset + len(data) >= size
            result = scanner.scan(data, offset)
            stop = result["stop"]
            problem = None
            if result["status"] == STATUS_CORRUPT:
                problem = f"{path}: corrupt record at offset {result['error_offset']}: {result['error']}"
            if result["records"] or problem:
                yield _chunk(result, problem)
            if problem or (result["status"] == STATUS_INCOMPLETE and at_eof):
                return
            if stop == offset:
                want *= 2  # one record larger than the read: read more at once
                continue
            offset = stop
            want = chunk_bytes


class Prefetch:
    """Decodes chunks in a thread, starting at once, while the caller stores earlier ones.

    The C scanner releases the GIL (the pure-Python one mostly holds it) and so do DuckDB's inserts, so reading
    and storing run on two cores; starting the next file's reader while this one is stored keeps them busy across
    file boundaries.
    At most PREFETCH_CHUNKS decoded chunks wait, so memory stays bounded.
    """

    _DONE = object()

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._chunks = chunks
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="wandb-file-reader", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def _produce(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            while (item := self._ready.get()) is not self._DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _chunk(result: dict[str, Any], problem: str | None) -> Chunk:
    rows = result["rows"]
    keys = pa.array(result["keys"], pa.string())
    key_ids = pa.Array.from_buffers(pa.int32(), rows, [None, pa.py_buffer(result["key"])])
    history = pa.Table.from_arrays(
        [
            pa.Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(result["step"])]),
            pa.Array.from_buffers(pa.float64(), rows, [None, pa.py_buffer(result["timestamp"])]),
            pa.Array.from_buffers(pa.float64(), rows, [None, pa.py_buffer(result["runtime"])]),
            pa.DictionaryArray.from_arrays(key_ids, keys),
            pa.Array.from_buffers(
                pa.float64(), rows, [pa.py_buffer(result["value_valid"]), pa.py_buffer(result["value"])]
            ),
            pa.Array.from_buffers(
                pa.string(),
                rows,
                [
                    pa.py_buffer(result["json_valid"]),
                    pa.py_buffer(result["json_offsets"]),
                    pa.py_buffer(result["json_data"]),
                ],
            ),
        ],
        schema=HISTORY_SCHEMA,
    )
    chunk = Chunk(
        end_offset=result["stop"],
        history=history,
        summary=[(tuple(key.split(SUMMARY_SEPARATOR)), value) for key, value in result["summary"]],
        problem=problem,
    )
    if result["others"]:
        # imported here: the proto module imports all of wandb, which a sync with nothing new never needs
        from wandb.proto.wandb_internal_pb2 import Record

        for kind, payload in result["others"]:
            _decode_other(chunk, kind, Record.FromString(payload))
    return chunk


def _timestamp(ts: Any) -> datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


def _item_path(item: Any) -> KeyPath:
    return (item.key,) if item.key else tuple(item.nested_key)


def _updates(record: Any) -> list[tuple[KeyPath, str | None]]:
    """ConfigRecord / SummaryRecord items as ordered (key path, value_json or None for removed)."""
    updates: list[tuple[KeyPath, str | None]] = [(_item_path(i), i.value_json) for i in record.update]
    updates += [(_item_path(i), None) for i in record.remove]
    return updates


def _message_to_python(message: Any) -> Any:
    """Like MessageToDict, but 64-bit integers stay numbers (MessageToDict writes them as strings)."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        return message.ToDatetime(tzinfo=UTC).isoformat()
    out: dict[str, Any] = {}
    for field_descriptor, value in message.ListFields():
        if field_descriptor.message_type is not None and field_descriptor.message_type.GetOptions().map_entry:
            value_descriptor = field_descriptor.message_type.fields_by_name["value"]
            out[field_descriptor.name] = {
                str(k): _message_to_python(v) if value_descriptor.message_type else v for k, v in value.items()
            }
        elif field_descriptor.message_type is not None:
            is_list = field_descriptor.label == field_descriptor.LABEL_REPEATED
            out[field_descriptor.name] = (
                [_message_to_python(v) for v in value] if is_list else _message_to_python(value)
            )
        elif field_descriptor.label == field_descriptor.LABEL_REPEATED:
            out[field_descriptor.name] = list(value)
        else:
            out[field_descriptor.name] = value
    return out


def _decode_other(chunk: Chunk, kind: int, record: Any) -> None:
    if kind == RUN:
        run = record.run
        chunk.run = RunHeader(
            run_id=run.run_id,
            entity=run.entity,
            project=run.project,
            display_name=run.display_name,
            group=run.run_group,
            job_type=run.job_type,
            tags=list(run.tags),
            host=run.host,
            notes=run.notes,
            sweep_id=run.sweep_id,
            started_at=_timestamp(run.start_time),
        )
        chunk.config += _updates(run.config)
        chunk.summary[:0] = _updates(run.summary)  # a resumed run carries its summary so far
    elif kind == CONFIG:
        chunk.config += _updates(record.config)
    elif kind == ENVIRONMENT:
        env = _message_to_python(record.environment)
        env.pop("writer_id", None)
        env.pop("_info", None)
        chunk.environment.update(env)
    elif kind == STATS:
        when = _timestamp(record.stats.timestamp)
        chunk.stats += [(when, item.key, item.value_json) for item in record.stats.item]
    elif kind == EXIT:
        chunk.exit_code = record.exit.exit_code
        chunk.exit_runtime_s = float(record.exit.runtime) if record.exit.runtime else None


def legacy_metadata(run_dir: Path) -> dict[str, Any]:
    """Older SDKs (≤0.15) wrote the environment to files/wandb-metadata.json instead of a record."""
    path = run_dir / "files" / "wandb-metadata.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

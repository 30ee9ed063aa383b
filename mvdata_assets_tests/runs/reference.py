"""An independent, deliberately plain reader of `.wandb` files, used as ground truth by the tests.

It follows the format as wandb documents it (wandb/sdk/internal/datastore.py): a 7-byte header, leveldb-log framing
in 32 KiB blocks with CRC-checked fragments, and one `wandb_internal_pb2.Record` per assembled
payload. It shares no code with the engine. It reads intact files only (a CRC mismatch raises) and
stops quietly at an incomplete tail.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FRAG = struct.Struct("<IHB")
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class Fragment:
    offset: int  # where its 7-byte header starts
    type: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + FRAG.size + self.length


@dataclass
class RefRecord:
    start: int  # offset of its first fragment
    end: int  # offset just past its last fragment
    fragments: list[Fragment]
    record: Any

    @property
    def kind(self) -> str:
        return self.record.WhichOneof("record_type")


@dataclass
class RefFile:
    records: list[RefRecord] = field(default_factory=list)
    fragments: list[Fragment] = field(default_factory=list)
    size: int = 0

    def of_kind(self, kind: str) -> list[RefRecord]:
        return [r for r in self.records if r.kind == kind]


def read(path: Path) -> RefFile:
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: bad header")
    out = RefFile(size=len(data))
    pos = len(HEADER)
    pending: list[Fragment] = []
    payload = b""
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < FRAG.size:
            pos += left
            continue
        if pos + FRAG.size > len(data):
            break
        crc, length, ftype = FRAG.unpack_from(data, pos)
        if crc == 0 and length == 0 and ftype == 0:
            break
        body = data[pos + FRAG.size : pos + FRAG.size + length]
        if len(body) < length:
            break
        if zlib.crc32(body, zlib.crc32(bytes([ftype]))) != crc:
            raise ValueError(f"{path}: checksum mismatch at {pos}")
        frag = Fragment(pos, ftype, length)
        out.fragments.append(frag)
        pos = frag.end
        if ftype == FULL:
            out.records.append(RefRecord(frag.offset, frag.end, [frag], pb.Record.FromString(body)))
        elif ftype == FIRST:
            pending, payload = [frag], body
        elif ftype == MIDDLE:
            pending.append(frag)
            payload += body
        elif ftype == LAST:
            pending.append(frag)
            payload += body
            out.records.append(RefRecord(pending[0].offset, frag.end, pending, pb.Record.FromString(payload)))
            pending, payload = [], b""
        else:
            raise ValueError(f"{path}: bad fragment type {ftype} at {frag.offset}")
    return out


def item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class RefStep:
    step: int
    timestamp: float
    runtime: float
    items: dict[str, str]  # key -> value_json, system keys (_step, _timestamp, _runtime) removed
    end: int  # file offset just past the record


def history(ref: RefFile) -> list[RefStep]:
    steps = []
    for rec in ref.of_kind("history"):
        items = {item_key(i): i.value_json for i in rec.record.history.item}
        step = int(json.loads(items.pop("_step"))) if "_step" in items else rec.record.history.step.num
        ts = json.loads(items.pop("_timestamp", "NaN"))
        rt = json.loads(items.pop("_runtime", "NaN"))
        steps.append(RefStep(step, ts, rt, items, rec.end))
    return steps


def stats(ref: RefFile) -> list[tuple[float, str, str]]:
    """(unix seconds, key, value_json) of every system-metrics item."""
    out = []
    for rec in ref.of_kind("stats"):
        ts = rec.record.stats.timestamp
        when = ts.seconds + ts.nanos / 1e9
        out += [(when, item.key, item.value_json) for item in rec.record.stats.item]
    return out


def environment(ref: RefFile) -> list[Any]:
    return [rec.record.environment for rec in ref.of_kind("environment")]


def run_record(ref: RefFile) -> Any:
    runs = ref.of_kind("run")
    return runs[0].record.run if runs else None


def same_number(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b

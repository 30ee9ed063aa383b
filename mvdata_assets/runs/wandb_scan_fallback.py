"""Pure-Python `.wandb` scanner: the same `scan(data, offset) -> dict` as the C extension `_wandb_scan`.

The C scanner is an optional extension; where it was not built (no C compiler or zlib headers), `wandb_file` reads
with this module. Both give the same dict for the same run file, whole, cut or damaged: framing, CRC checks,
statuses, error messages and offsets, record classification (the C walk of a Record's fields), and the history and
summary columns down to their bytes. History and summary bodies are decoded with wandb's proto classes, which read
what any protobuf encoder writes as the C code does (bytes no encoder writes may be read differently); values are
converted per chunk with pyarrow and numpy. It is several times slower than the C scanner.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import math
import re
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError

from mvdata_assets.runs.values import EXACT_INT_LIMIT
from mvdata_assets.runs.wandb_format import (
    BLOCK,
    CONFIG,
    ENVIRONMENT,
    EXIT,
    FIRST,
    FRAG_HEADER,
    FULL,
    HISTORY,
    HISTORY_SEPARATOR,
    LAST,
    MIDDLE,
    NOT_A_KIND,
    RUN,
    STATS,
    STATUS_CLEAN,
    STATUS_CORRUPT,
    STATUS_INCOMPLETE,
    SUMMARY,
    SUMMARY_SEPARATOR,
    SYSTEM_KEYS,
)

# Record kinds handed back raw, as the C scanner's `wanted_other`
WANTED_OTHER = frozenset({CONFIG, STATS, RUN, EXIT, ENVIRONMENT})

_FRAGMENT = struct.Struct("<IHB")
# The format's checksum is IEEE CRC-32 (zlib's), not CRC32C; binascii computes it even where zlib is missing.
_TYPE_CRC = {t: binascii.crc32(bytes((t,))) for t in (FULL, FIRST, MIDDLE, LAST)}
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
TWO_53 = float(EXACT_INT_LIMIT)
MAX_NUMBER_BYTES = 400  # longer value_json text is never parsed as a number (the C scanner's limit)
SPECIALS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # how W&B writes non-finite floats
_NUMBER_GRAMMAR = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"  # JSON's
_NUMBER = re.compile(_NUMBER_GRAMMAR)
_NUMBER_RE2 = rf"\A{_NUMBER_GRAMMAR}\z"  # whole text, in pyarrow's (RE2's) syntax
# typed `text` values become a JSON string the way the C scanner escapes them: quote, backslash, controls only
_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", **{chr(c): f"\\u{c:04x}" for c in range(0x20)}})


class _BadWire(Exception):
    """A record's bytes are not a protobuf message (the C scanner's -3)."""


@functools.cache
def _proto() -> Any:
    # imported on first use: the proto module imports all of wandb, which a module import alone never needs
    from wandb.proto import wandb_internal_pb2

    return wandb_internal_pb2


# ---------------------------------------------------------------- protobuf wire reading (as the C scanner reads it)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if pos >= end:
            raise _BadWire
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & _U64, pos
    raise _BadWire


def _record_kind(payload: memoryview) -> tuple[int, int, int]:
    """(field, start, end) of a Record's first length-delimited field that names its kind, or (0, 0, 0).

    The fields before it must be well-formed; what follows it is not read (the C scanner's `scan_record`).
    """
    pos, end = 0, len(payload)
    while pos < end:
        tag, pos = _varint(payload, pos, end)
        field, wire = (tag >> 3) & _U32, tag & 7
        if wire == 0:
            _, pos = _varint(payload, pos, end)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if end - pos < width:
                raise _BadWire
            pos += width
        elif wire == 2:
            length, pos = _varint(payload, pos, end)
            if end - pos < length:
                raise _BadWire
            if field not in NOT_A_KIND:
                return field, pos, pos + length
            pos += length
        else:
            raise _BadWire
    return 0, 0, 0


# ---------------------------------------------------------------- item parsing (values of HistoryItem / SummaryItem)


def _to_int64(value: float) -> int:
    """C's (int64_t) cast of a double as x86-64 does it: out of range gives INT64_MIN."""
    if -(2.0**63) <= value < 2.0**63:
        return int(value)
    return -(1 << 63)


def _json_number(text: str) -> tuple[int, float]:
    """(kind, value) of one value_json: 1 exact, 2 a double only approximates it (huge int), 0 not a number."""
    if text in SPECIALS:
        return 1, SPECIALS[text]
    if not text or len(text) > MAX_NUMBER_BYTES or not _NUMBER.fullmatch(text):
        return 0, 0.0
    value = float(text)  # correctly rounded, like glibc's strtod
    unsigned = text.lstrip("-")
    if len(unsigned) > 15 and not any(c in text for c in ".eE"):
        a = abs(value)
        if a > TWO_53 or (a == TWO_53 and unsigned != str(EXACT_INT_LIMIT)):
            return 2, value
    return 1, value


def _typed(item: Any) -> tuple[int, float, str]:
    """(kind, value, JSON text) of a HistoryItem without value_json, from its typed value (fields 3..8)."""
    which = item.WhichOneof("value")
    if which == "none":
        return 0, 0.0, "null"
    if which == "boolean":
        return 0, 0.0, "true" if item.boolean else "false"
    if which == "integer":
        v = item.integer
        return (2 if abs(v) > EXACT_INT_LIMIT else 1), float(v), str(v)
    if which == "number":
        return 1, item.number, ""
    if which == "text":
        return 0, 0.0, '"' + item.text.translate(_ESCAPES) + '"'
    if which == "json":
        return 0, 0.0, item.json
    return 0, 0.0, ""


def _number_or_nan(item: Any) -> float:
    """A system item's value (_step, _timestamp, _runtime): value_json if numeric, else a typed number, else NaN."""
    if item.value_json:
        kind, value = _json_number(item.value_json)
        if kind:
            return value
    kind, value, _ = _typed(item)
    return value if kind else math.nan


def _parse_numbers(texts: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """(kind, value) per value_json text, all at once: what `_json_number` gives for each."""
    if len(texts) == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.float64)
    byte_len = pc.binary_length(texts).to_numpy(zero_copy_only=False)
    numeric = pc.match_substring_regex(texts, _NUMBER_RE2).to_numpy(zero_copy_only=False)
    numeric &= byte_len <= MAX_NUMBER_BYTES
    # non-numbers become "0" so the cast (correctly rounded, like strtod) sees JSON numbers only
    values = pc.cast(pc.if_else(pa.array(numeric), texts, pa.scalar("0")), pa.float64()).to_numpy(zero_copy_only=False)
    values = np.array(values, dtype=np.float64)  # writable
    kind = numeric.astype(np.int8)
    fraction = pc.match_substring_regex(texts, "[.eE]").to_numpy(zero_copy_only=False)
    negative = pc.starts_with(texts, "-").to_numpy(zero_copy_only=False)
    long_int = numeric & ~fraction & (byte_len - negative > 15)
    if long_int.any():
        magnitude = np.abs(values)
        exact_pow53 = pc.is_in(texts, pa.array([str(EXACT_INT_LIMIT), str(-EXACT_INT_LIMIT)])).to_numpy(
            zero_copy_only=False
        )
        huge = long_int & ((magnitude > TWO_53) | ((magnitude == TWO_53) & ~exact_pow53))
        kind[huge] = 2
    for text, special in SPECIALS.items():
        mask = pc.equal(texts, text).to_numpy(zero_copy_only=False)
        kind[mask] = 1
        values[mask] = special
    values[kind == 0] = 0.0
    return kind, values


# ---------------------------------------------------------------- scan state (records into columns)


class _Scan:
    """What one `scan` call gathers: per-record lists, turned into the C scanner's buffers at the end."""

    def __init__(self) -> None:
        self.records = 0
        self.keys: dict[str, int] = {}
        self.record_steps: list[int] = []
        self.record_ts: list[float] = []
        self.record_rt: list[float] = []
        self.record_rows: list[int] = []
        self.key_ids: list[int] = []
        self.texts: list[str] = []
        self.typed: list[tuple[int, int, float]] = []  # (row, kind, value) of items without value_json
        self.summary: dict[str, str | None] = {}  # in order of each key's last update
        self.others: list[tuple[int, bytes]] = []

    def record(self, payload: memoryview) -> None:
        field, start, end = _record_kind(payload)
        if field == HISTORY:
            self.history(payload[start:end])
        elif field == SUMMARY:
            self.summary_record(payload[start:end])
        elif field in WANTED_OTHER:
            self.others.append((field, bytes(payload)))

    def history(self, body: memoryview) -> None:
        try:
            record = _proto().HistoryRecord.FromString(body)
        except DecodeError as exc:
            raise _BadWire from exc
        step, have_step, ts, rt = -1, False, math.nan, math.nan
        metrics = []
        for item in record.item:
            key = item.key or HISTORY_SEPARATOR.join(item.nested_key)
            if key in SYSTEM_KEYS:
                value = _number_or_nan(item)
                if key == "_step":
                    if not math.isnan(value):
                        step, have_step = _to_int64(value), True
                elif key == "_timestamp":
                    ts = value
                else:
                    rt = value
            else:
                metrics.append((key, item))
        if not have_step and record.HasField("step"):
            step = record.step.num  # an empty HistoryStep is step 0
        keys, key_ids, texts = self.keys, self.key_ids, self.texts
        for key, item in metrics:
            key_id = keys.get(key)
            if key_id is None:
                key_id = keys[key] = len(keys)
            key_ids.append(key_id)
            if item.value_json:
                texts.append(item.value_json)
            else:
                kind, value, text = _typed(item)
                self.typed.append((len(texts), kind, value))
                texts.append(text)
        self.record_steps.append(step)
        self.record_ts.append(ts)
        self.record_rt.append(rt)
        self.record_rows.append(len(metrics))

    def summary_record(self, body: memoryview) -> None:
        try:
            record = _proto().SummaryRecord.FromString(body)
        except DecodeError as exc:
            raise _BadWire from exc
        summary = self.summary
        for item in record.update:
            key = item.key or SUMMARY_SEPARATOR.join(item.nested_key)
            summary.pop(key, None)
            summary[key] = item.value_json or "null"
        for item in record.remove:
            key = item.key or SUMMARY_SEPARATOR.join(item.nested_key)
            summary.pop(key, None)
            summary[key] = None

    def columns(self) -> dict[str, Any]:
        rows = len(self.texts)
        counts = np.array(self.record_rows, dtype=np.int64)
        texts = pa.array(self.texts, pa.string())
        kind, values = _parse_numbers(texts)
        for row, typed_kind, value in self.typed:
            kind[row] = typed_kind
            values[row] = value if typed_kind else 0.0
        keep_json = kind != 1
        lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False) if rows else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(np.where(keep_json, lengths, 0))]).astype(np.int32)
        json_data = "".join(itertools.compress(self.texts, keep_json.tolist())).encode()
        return {
            "rows": rows,
            "keys": list(self.keys),
            "summary": list(self.summary.items()),
            "others": self.others,
            "step": np.repeat(np.array(self.record_steps, dtype=np.int64), counts).tobytes(),
            "timestamp": np.repeat(np.array(self.record_ts, dtype=np.float64), counts).tobytes(),
            "runtime": np.repeat(np.array(self.record_rt, dtype=np.float64), counts).tobytes(),
            "key": np.array(self.key_ids, dtype=np.int32).tobytes(),
            "value": values.tobytes(),
            "value_valid": np.packbits(kind != 0, bitorder="little").tobytes(),
            "json_offsets": offsets.tobytes(),
            "json_data": json_data,
            "json_valid": np.packbits(keep_json, bitorder="little").tobytes(),
        }


# ---------------------------------------------------------------- framing and the result dict


def scan(data: bytes, offset: int) -> dict[str, Any]:
    """Frames, checks and decodes the records of `data`, the file's bytes from absolute `offset` (a record boundary).

    Stops at the end of the data, at an incomplete record (status 1) or at a corrupt fragment or record
    (status 2); `stop` is the offset after the last whole record. The dict is the C scanner's, key for key.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    s = _Scan()
    status, error, error_offset, stop = STATUS_CLEAN, None, -1, offset
    pos = 0
    in_record = False
    pending = bytearray()
    unpack = _FRAGMENT.unpack_from
    while pos < n:
        abs_pos = offset + pos
        # C's remainder (its sign is the dividend's), so a negative base frames as the C scanner does
        block_left = BLOCK - (abs_pos % BLOCK if abs_pos >= 0 else -(-abs_pos % BLOCK))
        if block_left < FRAG_HEADER:  # zero padding at a block's end
            if pos + block_left > n:
                status = STATUS_INCOMPLETE
                break
            pos += block_left
            if not in_record:
                stop = offset + pos
            continue
        if pos + FRAG_HEADER > n:
            status = STATUS_INCOMPLETE
            break
        crc, length, ftype = unpack(view, pos)
        if ftype == 0 and length == 0 and crc == 0:  # zeros: space never written (preallocated or cut)
            status = STATUS_INCOMPLETE
            break
        bad_type = ftype < FULL or ftype > LAST
        if length > block_left - FRAG_HEADER or bad_type:
            status, error_offset = STATUS_CORRUPT, abs_pos
            error = "bad fragment type" if bad_type else "fragment crosses its block"
            break
        if pos + FRAG_HEADER + length > n:
            status = STATUS_INCOMPLETE
            break
        fragment = view[pos + FRAG_HEADER : pos + FRAG_HEADER + length]
        if binascii.crc32(fragment, _TYPE_CRC[ftype]) != crc:
            status, error, error_offset = STATUS_CORRUPT, "checksum mismatch", abs_pos
            break
        if ftype in (FULL, FIRST) and in_record:
            status, error, error_offset = STATUS_CORRUPT, "record started before the previous one ended", abs_pos
            break
        if ftype in (MIDDLE, LAST) and not in_record:
            status, error, error_offset = STATUS_CORRUPT, "record continues with no start", abs_pos
            break
        pos += FRAG_HEADER + length
        if ftype == FULL:
            payload = fragment
        else:
            if ftype == FIRST:
                pending.clear()
                in_record = True
            pending += fragment
            if ftype != LAST:
                continue
            in_record = False
            payload = memoryview(bytes(pending))
        try:
            s.record(payload)
        except _BadWire:
            status, error, error_offset = STATUS_CORRUPT, "record is not a valid protobuf message", stop
            break
        s.records += 1
        stop = offset + pos
    if status == STATUS_CLEAN and in_record:  # data ends inside a record
        status = STATUS_INCOMPLETE
    return {
        "stop": stop,
        "status": status,
        "error": error,
        "error_offset": error_offset,
        "records": s.records,
        **s.columns(),
    }

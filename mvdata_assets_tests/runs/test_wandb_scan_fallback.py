"""The pure-Python scanner (`wandb_scan_fallback`) gives what the C scanner (`_wandb_scan`) gives, for the same input.

Compared on the runs the real SDK writes (and the 2021 fixture), on cut and damaged copies of them, on files made
here that hold every value and framing case the C code treats specially, and on random records; then end to end:
warehouses synced with either scanner hold the same tables.
"""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import NamedTuple

import duckdb
import pytest
from wandb.proto import wandb_internal_pb2 as pb

from mvdata_assets.runs import wandb_file, wandb_scan_fallback
from mvdata_assets.runs.wandb_file import DEFAULT_CHUNK_BYTES
from mvdata_assets.runs.wandb_format import BLOCK, HEADER_BYTES
from mvdata_assets_tests.runs import reference
from mvdata_assets_tests.runs.conftest import LEGACY_FIXTURE, SdkRun, copy_tree_writable, place_run_file
from mvdata_assets_tests.runs.test_offline import sync

try:
    from mvdata_assets.runs import _wandb_scan
except ImportError:
    _wandb_scan = None

needs_c = pytest.mark.skipif(
    _wandb_scan is None,
    reason="the C scanner mvdata_assets.runs._wandb_scan is not built here (no C compiler or zlib headers at "
    "install): there is nothing to compare the pure-Python scanner with",
)

# read sizes as read_chunks uses them: one block, a few blocks, not a block multiple, the default
CHUNK_SIZES = (BLOCK, 3 * BLOCK, 5 * BLOCK + 123, DEFAULT_CHUNK_BYTES)
FULL, FIRST, MIDDLE, LAST = reference.FULL, reference.FIRST, reference.MIDDLE, reference.LAST


# ---------------------------------------------------------------- helpers


def assert_same_scan(data: bytes, offset: int, what: str) -> dict:
    """Both scanners on (data, offset): the same dict, key for key and byte for byte."""
    want = _wandb_scan.scan(data, offset)
    got = wandb_scan_fallback.scan(data, offset)
    if got != want:
        differ = sorted(k for k in want.keys() | got.keys() if want.get(k, "<missing>") != got.get(k, "<missing>"))
        detail = {k: (want.get(k), got.get(k)) for k in differ if k not in ("others",)}
        raise AssertionError(f"{what}, scan(data[{len(data)} bytes], {offset}): {differ} differ: {detail!r:.3000}")
    assert list(got) == list(want), what
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()], what
    return want


def assert_same_reads(data: bytes, what: str, chunk_sizes: tuple[int, ...] = CHUNK_SIZES) -> None:
    """The scans read_chunks makes over a file's bytes, at each read size: the same from both scanners."""
    size = len(data)
    for chunk_bytes in chunk_sizes:
        offset, want = HEADER_BYTES, chunk_bytes
        while offset < size:
            span = want - (offset + want) % BLOCK
            piece = data[offset : offset + span]
            result = assert_same_scan(piece, offset, f"{what}, reads of {chunk_bytes}")
            at_eof = offset + len(piece) >= size
            if result["status"] == 2 or (result["status"] == 1 and at_eof):
                break
            if result["stop"] == offset:
                want *= 2
                continue
            offset, want = result["stop"], chunk_bytes


class Fragment(NamedTuple):
    offset: int
    type: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + 7 + self.length


def fragments(data: bytes) -> list[Fragment]:
    """Where a file's fragments are (framing only, no checks): to cut files at chosen places."""
    out, pos = [], HEADER_BYTES
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:
            break
        out.append(Fragment(pos, kind, length))
        pos += 7 + length
    return out


def sized_record(size: int) -> bytes:
    """A record of exactly `size` bytes (an output record: read past by the scanners), to place what follows."""
    for n in range(size, -1, -1):
        payload = record(output=pb.OutputRecord(line="o" * n))
        if len(payload) == size:
            return payload
    raise ValueError(size)


def frame(payloads: list[bytes], start: bytes = reference.HEADER) -> bytes:
    """A run file holding `payloads` as records, split at block ends into FIRST/MIDDLE/LAST as the SDK does."""
    out = bytearray(start)
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < 7:
                out += b"\0" * left
                left = BLOCK
            part, rest = rest[: left - 7], rest[left - 7 :]
            kind = (FULL if not rest else FIRST) if first else (LAST if not rest else MIDDLE)
            out += fragment(kind, part)
            first = False
            if not rest:
                break
    return bytes(out)


def fragment(kind: int, part: bytes, crc: int | None = None) -> bytes:
    if crc is None:
        crc = zlib.crc32(part, zlib.crc32(bytes([kind])))
    return struct.pack("<IHB", crc, len(part), kind) + part


def record(**kwargs) -> bytes:
    return pb.Record(**kwargs).SerializeToString()


def history(*items: pb.HistoryItem, step: int | None = None, empty_step: bool = False) -> bytes:
    rec = pb.Record(history=pb.HistoryRecord(item=list(items)))
    if step is not None:
        rec.history.step.num = step
    if empty_step:
        rec.history.step.SetInParent()
    return rec.SerializeToString()


def item(key: str | None = None, value_json: str | None = None, nested: list[str] | None = None, **typed):
    kwargs = dict(typed)
    if key is not None:
        kwargs["key"] = key
    if nested is not None:
        kwargs["nested_key"] = nested
    if value_json is not None:
        kwargs["value_json"] = value_json
    return pb.HistoryItem(**kwargs)


def summary(updates: list[tuple], removes: list[tuple] = ()) -> bytes:
    def summary_item(spec: tuple) -> pb.SummaryItem:
        key, value = spec[0], spec[1] if len(spec) > 1 else None
        kwargs = {"nested_key": key} if isinstance(key, list) else {"key": key}
        if value is not None:
            kwargs["value_json"] = value
        return pb.SummaryItem(**kwargs)

    return record(
        summary=pb.SummaryRecord(update=[summary_item(u) for u in updates], remove=[summary_item(r) for r in removes])
    )


def run_files(sdk_runs: dict[str, SdkRun]) -> dict[str, bytes]:
    files = {name: run.wandb_file.read_bytes() for name, run in sdk_runs.items()}
    files["legacy-2021"] = next(LEGACY_FIXTURE.glob("offline-run-*/run-*.wandb")).read_bytes()
    return files


# ---------------------------------------------------------------- files the SDK wrote


@needs_c
def test_sdk_runs_and_the_2021_file_scan_the_same(sdk_runs: dict[str, SdkRun]) -> None:
    for name, data in run_files(sdk_runs).items():
        whole = assert_same_scan(data[HEADER_BYTES:], HEADER_BYTES, name)
        # the killed run's file may end inside a record or just after one, as the kill lands
        assert whole["status"] in ((0, 1) if name == "killed" else (0,)), (name, whole["status"], whole["error"])
        assert_same_reads(data, name)
    # the runs hold what the comparison is about: history rows, summary updates, removals, raw records
    edge = assert_same_scan(sdk_runs["edge"].wandb_file.read_bytes()[HEADER_BYTES:], HEADER_BYTES, "edge")
    assert edge["rows"] and edge["summary"] and edge["others"]
    assert any(value is None for _, value in edge["summary"])


@needs_c
def test_cut_copies_scan_the_same(sdk_runs: dict[str, SdkRun]) -> None:
    """Cuts inside fragment headers, payloads and block padding, and right after FIRST/MIDDLE fragments (a record's
    first parts only, as a live run's file often ends)."""
    rng = random.Random(5150)
    files = run_files(sdk_runs)
    for name in ("edge", "killed", "long", "failed", "legacy-2021"):
        data = files[name]
        frags = fragments(data)

        def pick(candidates: list[int], k: int, size: int = len(data)) -> list[int]:
            candidates = [c for c in candidates if HEADER_BYTES <= c < size]
            return rng.sample(candidates, min(k, len(candidates)))

        cuts = pick([f.end for f in frags if f.type in (FIRST, MIDDLE)], 3)
        cuts += pick([f.offset + rng.randrange(1, 7) for f in frags], 2)
        cuts += pick([f.offset + 7 + rng.randrange(f.length) for f in frags if f.length], 3)
        cuts += pick([b - rng.randrange(1, 7) for b in range(BLOCK, len(data), BLOCK)], 1)
        cuts += pick(list(range(BLOCK, len(data), BLOCK)), 1)
        for n in sorted(set(cuts)):
            cut = data[:n]
            result = assert_same_scan(cut[HEADER_BYTES:], HEADER_BYTES, f"{name} cut at {n}")
            assert result["status"] in (0, 1), (name, n, result["error"])
            assert_same_reads(cut, f"{name} cut at {n}", (3 * BLOCK,))


@needs_c
def test_damaged_copies_scan_the_same(sdk_runs: dict[str, SdkRun]) -> None:
    """A flipped bit in a payload, a CRC, a length, a type; a fragment zeroed: each stops both scanners alike."""
    rng = random.Random(77)
    for name in ("edge", "long", "failed"):
        data = sdk_runs[name].wandb_file.read_bytes()
        ref = reference.read(sdk_runs[name].wandb_file)
        for i in range(8):
            frag = rng.choice(ref.fragments[1:])
            damaged = bytearray(data)
            where = (
                rng.randrange(frag.offset + 7, frag.end) if frag.length and i % 4 else frag.offset + (0, 4, 6)[i % 3]
            )
            damaged[where] ^= 1 << rng.randrange(8)
            result = assert_same_scan(bytes(damaged[HEADER_BYTES:]), HEADER_BYTES, f"{name} flip at {where}")
            # a flipped length can also reach past the end of the data: then the tail is incomplete
            assert (result["status"] == 2 and result["error"]) or where < frag.offset + 7, (name, where, result)
            assert_same_reads(bytes(damaged), f"{name} flip at {where}", (BLOCK, 5 * BLOCK + 123))
        zeroed = bytearray(data)
        frag = ref.fragments[len(ref.fragments) // 2]
        zeroed[frag.offset : frag.end] = bytes(frag.end - frag.offset)
        result = assert_same_scan(bytes(zeroed[HEADER_BYTES:]), HEADER_BYTES, f"{name} zeroed fragment")
        assert result["status"] == 1 and result["stop"] <= frag.offset


# ---------------------------------------------------------------- files made here


NUMBER_TEXTS = [
    "0", "-0", "-0.0", "1", "-1", "3.25", "1e3", "1E-3", "2.5e+10", "1e400", "-1e400", "1e-400", "5e-324",
    "1.7976931348623157e308", "0.1", "123456789012345", "1234567890123456", "12345678901234567",
    "9007199254740992", "-9007199254740992", "9007199254740993", "-9007199254740993", "9007199254740991",
    "18446744073709551616", "1180591620717411303424", "9007199254740992.0", "9007199254740993e0",
    "NaN", "Infinity", "-Infinity", "nan", "inf", "-inf", "+1", "01", "-01", "1.", ".5", "1e", "1e+", "-", "",
    " 1", "1 ", "1\n", "0x10", "1_000", "١", '"1"', "true", "false", "null", "[1, 2]", '{"a": 1}', "\"ünï ✓\"",
    "1" * 400, "1" * 401, "0." + "1" * 398, "0." + "1" * 399, "-" + "9" * 399,
]  # fmt: skip


def crafted_payloads() -> list[bytes]:
    """Records covering each case the C scanner treats on its own."""
    payloads = [
        # values as value_json, each with its own step
        *[history(item("_step", str(i)), item("v", text), item("w", text)) for i, text in enumerate(NUMBER_TEXTS)],
        # typed values (no value_json): none, bool, ints around 2^53, doubles incl. NaN/-0/inf, text, json
        history(
            item("_step", "100"),
            item("none", none=0),
            item("t", boolean=True),
            item("f", boolean=False),
            item("i", integer=-42),
            item("i53", integer=2**53),
            item("i53p", integer=2**53 + 1),
            item("ineg", integer=-(2**53) - 1),
            item("imax", integer=2**63 - 1),
            item("imin", integer=-(2**63)),
            item("d", number=2.5),
            item("dnan", number=math.nan),
            item("dnegz", number=-0.0),
            item("dinf", number=-math.inf),
            item("s", text='quote " backslash \\ nl \n tab \t ctl \x01\x1f del \x7f ünï ✓'),
            item("j", json='{"a": [1, 2]}'),
            item("jn", json="12.5"),
            item("empty"),
            item("both", value_json="7", integer=8),
        ),
        # nested keys: '.'-joined in history; `key` wins over nested_key
        history(item(nested=["a", "b", "c"], value_json="1"), item("k", nested=["x", "y"], value_json="2"), step=3),
        # the step: from HistoryStep, from _step (truncated, typed, huge, non-finite, not a number), or none
        history(item("x", "1"), step=7),
        history(item("x", "1"), empty_step=True),
        history(item("x", "1")),
        history(item("_step", "3.9"), item("x", "1"), step=50),
        history(item("_step", "-2.5"), item("x", "1")),
        history(item("_step", "NaN"), item("x", "1"), step=9),
        history(item("_step", '"text"'), item("x", "1"), step=11),
        history(item("_step", "1e300"), item("x", "1")),
        history(item("_step", "Infinity"), item("x", "1")),
        history(item("_step", "-Infinity"), item("x", "1")),
        history(item("_step", "9223372036854775807"), item("x", "1")),
        history(item("_step", "-9223372036854775808"), item("x", "1")),
        history(item("_step", integer=12), item("x", "1")),
        history(item("_step", number=13.75), item("x", "1")),
        history(item("_step", "1"), item("_step", "2"), item("x", "1")),
        history(item(nested=["_step"], value_json="21"), item("x", "1")),
        # _timestamp / _runtime: numbers, typed, text (NaN), last one wins
        history(item("_step", "30"), item("_timestamp", "1700000000.123456"), item("_runtime", "12.5"), item("y", "1")),
        history(item("_step", "31"), item("_timestamp", number=1.5), item("_runtime", integer=3), item("y", "1")),
        history(item("_step", "32"), item("_timestamp", '"x"'), item("_runtime", "1"), item("_runtime", "2")),
        history(item("_step", "33")),  # no metric rows
        history(item("_step", "34"), item("_timestamp", "Infinity"), item("_runtime", "-0"), item("", "5")),
        # keys: unicode, separators, SQL-ish; one key repeated across records keeps its id
        history(item("größe/λ ✓", "1"), item("a.b", "2"), item("c\x1fd", "3"), item("x'); --", "4"), item("x", "5")),
        # summary: updates, nested keys ('\x1f'-joined), removals, re-updates (order of last update), no value
        summary([("a", "1"), (["n", "m"], '{"z": 1}'), ("b", '"two"'), ("nv",)]),
        summary([("c", "3"), ("a", "10")], [("b",), (["n", "m"],)]),
        summary([("b", "back")], [("never-set",)]),
        summary([(["p", "q", "r"], "NaN"), ("größe ✓", "1")]),
        # records handed back raw, and records skipped
        record(run=pb.RunRecord(run_id="abc", project="p", display_name="ünï")),
        record(config=pb.ConfigRecord(update=[pb.ConfigItem(key="lr", value_json="0.1")])),
        record(exit=pb.RunExitRecord(exit_code=3, runtime=5)),
        record(stats=pb.StatsRecord(item=[pb.StatsItem(key="cpu", value_json="1.5")])),
        record(environment=pb.EnvironmentRecord(os="Linux")),
        record(final=pb.FinalRecord()),
        record(header=pb.HeaderRecord()),
        record(footer=pb.FooterRecord()),
        record(preempting=pb.RunPreemptingRecord()),
        b"\x5a\x00",  # telemetry (field 11), empty
        record(output=pb.OutputRecord(line="hello")),
        record(num=5),
        b"",
        # fields before the kind (control, uuid, _info) are passed over, in any order
        record(uuid="u-1", control=pb.Control(local=True)) + history(item("_step", "40"), item("z", "1")),
        b"\xc2\x0c\x04\x0a\x02id" + summary([("after_info", "1")]),
        b"\x08\x07\x9a\x01\x02u2" + record(config=pb.ConfigRecord(update=[pb.ConfigItem(key="k", value_json="1")])),
        # an unknown length-delimited field first: the record has no kind the scanner reads
        b"\xf2\x01\x03abc" + history(item("_step", "41"), item("z", "1")),
        # a record larger than a block: FIRST, MIDDLE..., LAST
        history(item("_step", "50"), item("big", '"' + "x" * 3 * BLOCK + '"'), item("after", "2.5")),
        summary([("big", '"' + "y" * BLOCK + '"')]),
    ]
    return payloads


@needs_c
def test_crafted_records_scan_the_same() -> None:
    payloads = crafted_payloads()
    data = frame(payloads)
    result = assert_same_scan(data[HEADER_BYTES:], HEADER_BYTES, "crafted")
    assert result["status"] == 0 and result["records"] == len(payloads)
    assert_same_reads(data, "crafted")
    # cuts in and around each fragment's header, inside its payload, and at its end
    cuts = set()
    for frag in fragments(data):
        cuts |= {frag.offset + d for d in (1, 3, 6, 7, 8)} | {frag.offset + 7 + frag.length // 2, frag.end}
    for n in sorted(c for c in cuts if c <= len(data)):
        assert_same_scan(data[HEADER_BYTES:n], HEADER_BYTES, f"crafted cut at {n}")


@needs_c
def test_crafted_records_from_every_boundary_scan_the_same() -> None:
    data = frame(crafted_payloads())
    starts = [f.offset for f in fragments(data) if f.type in (FULL, FIRST)]
    for start in starts:
        assert_same_scan(data[start:], start, f"crafted from {start} to the end")
        assert_same_scan(data[start : start + 4096], start, f"crafted from {start}, 4096 bytes")


def bad_files() -> dict[str, bytes]:
    """Framing and payloads the C scanner rejects or stops at, each after a good record."""
    good = frame([history(item("_step", "1"), item("a", "1")), summary([("s", "1")])])
    ok = history(item("_step", "2"), item("a", "2"))
    crossing = struct.pack("<IHB", zlib.crc32(ok, zlib.crc32(bytes([FULL]))), BLOCK, FULL) + ok
    # a record that ends 3 bytes before the block's end: what follows is padding
    to_padding = good + fragment(FULL, sized_record(BLOCK - len(good) - 7 - 3))
    # a record whose first part ends 3 bytes before the block's end: padding inside a record (no SDK writes it)
    split = sized_record(BLOCK - len(good) - 7 - 3 + 40)
    padded_record = good + fragment(FIRST, split[:-40]) + b"\0\0\0" + fragment(LAST, split[-40:])
    return {
        "checksum": good + fragment(FULL, ok, crc=12345),
        "bad type": good + fragment(5, ok),
        "type zero": good + fragment(0, ok),
        "crosses block": good + crossing,
        "middle first": good + fragment(MIDDLE, ok),
        "last first": good + fragment(LAST, ok),
        "full inside a record": good + fragment(FIRST, ok[:5]) + fragment(FULL, ok),
        "first inside a record": good + fragment(FIRST, ok[:5]) + fragment(FIRST, ok),
        "zeros": good + bytes(64) + fragment(FULL, ok),
        "ends inside a record": good + fragment(FIRST, ok[:5]) + fragment(MIDDLE, ok[5:9]),
        "ends in padding": to_padding + b"\0",
        "padding then a record": to_padding + b"\0\0\0" + fragment(FULL, ok),
        "padding not zeros": to_padding + b"\x01\x02\x03" + fragment(FULL, ok),
        "padding inside a record": padded_record + fragment(FULL, ok),
        "padding then a record's parts": to_padding + b"\0\0\0" + fragment(FIRST, ok[:4]) + fragment(LAST, ok[4:]),
        "not protobuf": good + fragment(FULL, b"\xff\xff\xff"),
        "group wire type": good + fragment(FULL, b"\x0b\x0c" + ok),
        "truncated field": good + fragment(FULL, b"\x12\x05\x0a\x03"),
        "bad history body": good + fragment(FULL, b"\x12\x04\x0a\x05ab"),
        "bad item": good + fragment(FULL, b"\x12\x04\x0a\x02\x0a\x07"),
        "bad summary body": good + fragment(FULL, b"\x1a\x03\x0a\x05a"),
        "bad step": good + fragment(FULL, b"\x12\x04\x12\x02\x08\xff"),
        "bad kind body, not read": good + fragment(FULL, b"\x2a\x03\xff\xff\xff"),
        "garbage after the kind, not read": good + fragment(FULL, ok + b"\xff\xff"),
    }


@needs_c
@pytest.mark.parametrize("name", list(bad_files()))
def test_bad_framing_and_records_scan_the_same(name: str) -> None:
    data = bad_files()[name]
    result = assert_same_scan(data[HEADER_BYTES:], HEADER_BYTES, name)
    assert result["records"] >= 2, (name, result)
    # every cut of the last 64 bytes (where the bad part is), a few before
    for n in sorted({*range(max(HEADER_BYTES, len(data) - 64), len(data) + 1), *range(HEADER_BYTES, len(data), 1009)}):
        assert_same_scan(data[HEADER_BYTES:n], HEADER_BYTES, f"{name} cut at {n}")


@needs_c
def test_other_bases_and_buffers_scan_the_same() -> None:
    """A base that is no file offset of this data still frames the same; bytearray and memoryview are accepted."""
    data = frame([history(item("_step", "1"), item("a", "1"))] * 3)[HEADER_BYTES:]
    for base in (0, HEADER_BYTES, BLOCK - 10, BLOCK - 7, BLOCK - 3, 5 * BLOCK + 100, -5, -BLOCK - 3):
        assert_same_scan(data, base, f"base {base}")
    for buffer in (bytearray(data), memoryview(data)):
        assert wandb_scan_fallback.scan(buffer, HEADER_BYTES) == _wandb_scan.scan(buffer, HEADER_BYTES)
    assert_same_scan(b"", HEADER_BYTES, "no data")


def random_value(rng: random.Random) -> dict:
    choice = rng.randrange(9)
    if choice == 0:
        return {"value_json": rng.choice(NUMBER_TEXTS)}
    if choice == 1:
        return {"value_json": repr(rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-300, 300))}
    if choice == 2:
        return {"value_json": str(rng.randint(-(2**70), 2**70) >> rng.randrange(70))}
    if choice == 3:
        return {"integer": rng.randint(-(2**63), 2**63 - 1) >> rng.randrange(64)}
    if choice == 4:
        return {"number": rng.choice([rng.random(), math.nan, math.inf, -0.0, 1e308 * rng.random()])}
    if choice == 5:
        return {"text": "".join(rng.choice('ab"\\\n\x00\x1f✓ü') for _ in range(rng.randrange(6)))}
    if choice == 6:
        return {"boolean": rng.random() < 0.5}
    if choice == 7:
        return {"json": rng.choice(["[]", "{}", "1.5", "null"])}
    return {}


def random_key(rng: random.Random) -> dict:
    names = ["a", "b", "_step", "_timestamp", "_runtime", "ü✓", "x.y", "p\x1fq", ""]
    if rng.random() < 0.3:
        return {"nested_key": [rng.choice(names) for _ in range(rng.randint(1, 3))]}
    return {"key": rng.choice(names)}


def random_payload(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind <= 1:
        rec = pb.Record(
            history=pb.HistoryRecord(
                item=[pb.HistoryItem(**random_key(rng), **random_value(rng)) for _ in range(rng.randrange(8))]
            )
        )
        if rng.random() < 0.5:
            rec.history.step.num = rng.randint(-5, 2**40)
        return rec.SerializeToString()
    if kind == 2:
        values = [v for v in (random_value(rng) for _ in range(6)) if "value_json" in v]
        items = [pb.SummaryItem(**random_key(rng), **v) for v in values]
        removes = [pb.SummaryItem(**random_key(rng)) for _ in range(rng.randrange(3))]
        return pb.Record(summary=pb.SummaryRecord(update=items, remove=removes)).SerializeToString()
    return record(stats=pb.StatsRecord(item=[pb.StatsItem(key="k", value_json="1")]))


@needs_c
def test_random_records_scan_the_same() -> None:
    rng = random.Random(31337)
    for i in range(60):
        data = frame([random_payload(rng) for _ in range(rng.randrange(1, 80))])
        assert_same_scan(data[HEADER_BYTES:], HEADER_BYTES, f"random file {i}")
        for _ in range(4):
            n = rng.randrange(HEADER_BYTES, len(data) + 1)
            assert_same_scan(data[HEADER_BYTES:n], HEADER_BYTES, f"random file {i} cut at {n}")
        damaged = bytearray(data)
        damaged[rng.randrange(HEADER_BYTES, len(data))] ^= 1 << rng.randrange(8)
        assert_same_scan(bytes(damaged[HEADER_BYTES:]), HEADER_BYTES, f"random file {i} damaged")


# ---------------------------------------------------------------- choosing the scanner

CHOOSE_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if sys.argv[1] == "hide":
        sys.modules["mvdata_assets.runs._wandb_scan"] = None  # its import raises ImportError, as when not built
    from mvdata_assets.runs import wandb_file
    print(wandb_file.scanner.__name__)
    """
)


@pytest.mark.parametrize(
    ("env", "hide", "want", "warns"),
    [
        (
            "",
            "no",
            "mvdata_assets.runs._wandb_scan" if _wandb_scan else "mvdata_assets.runs.wandb_scan_fallback",
            _wandb_scan is None,
        ),
        ("python", "no", "mvdata_assets.runs.wandb_scan_fallback", False),
        ("", "hide", "mvdata_assets.runs.wandb_scan_fallback", True),
    ],
)
def test_the_scanner_is_chosen_at_import(env: str, hide: str, want: str, warns: bool) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "MVDATA_WANDB_SCANNER"}
    if env:
        environ["MVDATA_WANDB_SCANNER"] = env
    proc = subprocess.run(
        [sys.executable, "-c", CHOOSE_SCRIPT, hide], capture_output=True, text=True, env=environ, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == want
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING mvdata_assets.runs.wandb_file")]
    assert len(warnings) == (1 if warns else 0), proc.stderr
    if warns:
        assert "pure-Python" in warnings[0] and "slower" in warnings[0]


# ---------------------------------------------------------------- end to end: the same warehouse

# columns that say when a sync ran, not what it read
WHEN_SYNCED = {"synced_at", "changed_at"}


def every_table(db: Path) -> dict[str, list[tuple]]:
    """Every table and view of schema wandb, rows sorted, without the sync-time columns."""
    conn = duckdb.connect(str(db), read_only=True)
    try:
        tables = [t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'wandb' ORDER BY ALL"
        ).fetchall()]  # fmt: skip
        out = {}
        for table in tables:
            columns = [c for (c,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'wandb' AND table_name = ? "
                "ORDER BY ordinal_position", [table]
            ).fetchall() if c not in WHEN_SYNCED]  # fmt: skip
            select = ", ".join(f'"{c}"' for c in columns)
            rows = conn.execute(f"SELECT {select} FROM wandb.{table} ORDER BY ALL").fetchall()
            out[table] = [tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in row) for row in rows]
        return out
    finally:
        conn.close()


def synced_with_each_scanner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, dirs: list[Path]
) -> tuple[dict, dict]:
    tables = []
    for scanner in (_wandb_scan, wandb_scan_fallback):
        with monkeypatch.context() as patch:
            patch.setattr(wandb_file, "scanner", scanner)
            db = tmp_path / f"{name}-{scanner.__name__.rsplit('.', 1)[1]}.duckdb"
            sync(db, dirs, running_window_s=0)  # no run is "running": the state doesn't hang on the clock
        tables.append(every_table(db))
    return tables[0], tables[1]


@needs_c
def test_offline_runs_sync_to_the_same_tables(
    tmp_path: Path, sdk_runs: dict[str, SdkRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = copy_tree_writable(LEGACY_FIXTURE, tmp_path / "legacy")
    dirs = [run.out_dir for run in sdk_runs.values()] + [legacy]
    with_c, with_python = synced_with_each_scanner(tmp_path, monkeypatch, "runs", dirs)
    assert {"runs", "history", "summary", "config", "system_metrics", "_offline_files"} <= set(with_c)
    assert len(with_c["runs"]) == len(sdk_runs) + 1 and len(with_c["history"]) > 5000 * 8
    for table in with_c:
        assert with_python[table] == with_c[table], table


@needs_c
def test_cut_and_damaged_runs_sync_to_the_same_tables(
    tmp_path: Path, sdk_runs: dict[str, SdkRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "damaged"
    for name, run in sdk_runs.items():
        data = run.wandb_file.read_bytes()
        ref = reference.read(run.wandb_file)
        cut = next((f.end for f in reversed(ref.fragments) if f.type == FIRST), len(data) // 2)  # mid-record
        if name in ("long", "edge", "killed"):
            place_run_file(folder, data[:cut], run.run_id, tag="cut")
        elif name in ("long2", "failed"):
            damaged = bytearray(data)
            frag = ref.fragments[len(ref.fragments) // 2]
            damaged[frag.offset + 7 + frag.length // 2] ^= 0x10
            place_run_file(folder, bytes(damaged), run.run_id, tag="flipped")
    with_c, with_python = synced_with_each_scanner(tmp_path, monkeypatch, "damaged", [folder])
    assert any(row for row in with_c["_offline_files"] if "corrupt" in str(row))
    for table in with_c:
        assert with_python[table] == with_c[table], table

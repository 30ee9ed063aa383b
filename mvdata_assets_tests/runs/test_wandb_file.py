"""The `.wandb` reader (mvdata_assets.runs.wandb_file + the C scanner) against runs written by the real SDK.

Ground truth is what the writer logged (truth files) and, for what the SDK adds by itself (timestamps,
environment, system metrics, record offsets), the independent reader in `reference.py`.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mvdata_assets.runs.wandb_file import NotAWandbFile, check_header, read_chunks
from mvdata_assets.runs.wandb_format import BLOCK
from mvdata_assets_tests.runs import reference, truth
from mvdata_assets_tests.runs.conftest import SdkRun
from mvdata_assets_tests.runs.sdk_writer import SQL_KEY

# `pow53` (exactly 2^53) is checked on its own in test_int_2_pow_53_needs_no_value_json
SEPARATE = {"pow53"}


def read_all(path: Path, start: int = 0, **kwargs) -> list:
    return list(read_chunks(path, start, **kwargs))


def history_by_step(chunks: list) -> dict[int, dict[str, tuple]]:
    """{step: {key: (value, value_json)}}; fails on a (step, key) seen twice."""
    out: dict[int, dict[str, tuple]] = defaultdict(dict)
    for chunk in chunks:
        for row in chunk.history.to_pylist():
            assert row["key"] not in out[row["step"]], f"duplicate row for step {row['step']} key {row['key']!r}"
            out[row["step"]][row["key"]] = (row["value"], row["value_json"])
    return dict(out)


def assert_steps_match_truth(got: dict[int, dict[str, tuple]], run: SdkRun, steps: list[int]) -> None:
    errors = truth.step_mismatches(got, run.truth, steps, run.name)
    assert not errors, "\n".join(errors[:30])


def normalized(table_rows: list[dict]) -> list[tuple]:
    def norm(v):
        return "NaN" if isinstance(v, float) and math.isnan(v) else v

    return [tuple(norm(v) for v in row.values()) for row in table_rows]


def merged(chunks: list) -> tuple[list, dict, dict, list, int | None, int]:
    """(history rows, summary, config, stats, exit code, end offset) of a whole read."""
    history, summary, config, stats, exit_code = [], {}, {}, [], None
    for chunk in chunks:
        history += chunk.history.to_pylist()
        # updates come as ordered (key path, value_json or None for removed)
        summary.update((".".join(path), value) for path, value in chunk.summary)
        config.update((".".join(path), value) for path, value in chunk.config)
        stats += chunk.stats
        exit_code = chunk.exit_code if chunk.exit_code is not None else exit_code
    return normalized(history), summary, config, stats, exit_code, chunks[-1].end_offset


# ---------------------------------------------------------------- headers


def test_empty_file_is_not_a_wandb_file(tmp_path: Path) -> None:
    path = tmp_path / "run-empty.wandb"
    path.write_bytes(b"")
    with pytest.raises(NotAWandbFile, match="empty") as info:
        check_header(path)
    assert str(path) in str(info.value)
    with pytest.raises(NotAWandbFile) as info:
        read_all(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"hello, this is not a W&B file at all\n",
        b":W&",  # shorter than the header
        b":W&B" + bytes([0xE1, 0xBE, 0x01]) + b"\x00" * 64,  # right magic, unknown version
        b":W&B" + bytes([0xE2, 0xBE, 0x00]) + b"\x00" * 64,  # wrong magic number
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
        b"\x00" * 7,
    ],
    ids=["text", "short", "version", "magic", "png", "zeros"],
)
def test_non_wandb_files_are_rejected_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "run-garbage.wandb"
    path.write_bytes(content)
    with pytest.raises(NotAWandbFile) as info:
        check_header(path)
    assert str(path) in str(info.value)
    with pytest.raises(NotAWandbFile) as info:
        read_all(path)
    assert str(path) in str(info.value)


def test_header_only_file_has_no_records(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    path = tmp_path / "run-head.wandb"
    path.write_bytes(sdk_runs["long"].wandb_file.read_bytes()[: len(reference.HEADER)])
    chunks = read_all(path)
    assert sum(c.history.num_rows for c in chunks) == 0
    assert all(c.problem is None for c in chunks)


# ---------------------------------------------------------------- whole files


def test_edge_history_values_are_exact(sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["edge"]
    chunks = read_all(run.wandb_file)
    assert all(c.problem is None for c in chunks)
    got = history_by_step(chunks)
    assert_steps_match_truth(got, run, [s for s, _ in run.truth["steps"]])
    # metrics named like system columns are data; the step column is the real step
    logged = truth.steps(run.truth)
    for step, key in ((5, "step"), (5, "run_id"), (100, "timestamp"), (0, SQL_KEY)):
        assert got[step][key] == (float(logged[step][key]), None), (step, key)
    assert logged[5]["step"] != 5


def test_edge_system_columns_match_the_file(sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["edge"]
    ref_steps = reference.history(reference.read(run.wandb_file))
    assert [s.step for s in ref_steps] == [s for s, _ in run.truth["steps"]]
    rows = [r for c in read_all(run.wandb_file) for r in c.history.to_pylist()]
    by_step = {s.step: s for s in ref_steps}
    assert {r["step"] for r in rows} == set(by_step)
    for r in rows:
        ref = by_step[r["step"]]
        assert r["timestamp"] == ref.timestamp, r
        assert r["runtime_s"] == ref.runtime, r


def test_int_2_pow_53_needs_no_value_json(sdk_runs: dict[str, SdkRun]) -> None:
    """2^53 = 9007199254740992 is exactly a DOUBLE: the rule says value only (values.py agrees: <= 2^53)."""
    run = sdk_runs["edge"]
    got = history_by_step(read_all(run.wandb_file))
    logged = truth.steps(run.truth)[0]["pow53"]
    assert logged == 2**53 and float(logged) == logged
    value, value_json = got[0]["pow53"]
    assert value == float(2**53)
    assert value_json is None, f"2^53 kept as value_json {value_json!r} although the DOUBLE is exact"


def test_edge_config_and_summary_records(sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["edge"]
    _, summary, config, _, exit_code, _ = merged(read_all(run.wandb_file))
    want = run.truth["config"]
    assert len(want) > 1500
    for key, value in want.items():
        assert key in config, key
        assert json.loads(config[key]) == value, key
    assert config["huge"] == str(2**70)
    assert summary["huge"] == str(2**70)
    assert "tmp_metric" in summary and summary["tmp_metric"] is None  # deleted by the run
    assert json.loads(summary["note"]) == run.truth["summary_sets"]["note"]
    assert exit_code == 0


def test_stats_and_environment_match_the_file(sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["edge"]
    ref = reference.read(run.wandb_file)
    chunks = read_all(run.wandb_file)
    stats = [s for c in chunks for s in c.stats]
    want = reference.stats(ref)
    assert want, "the SDK wrote no system metrics"
    assert [(k, v) for _, k, v in stats] == [(k, v) for _, k, v in want]
    for (when, _, _), (ref_when, _, _) in zip(stats, want, strict=True):
        assert abs(when.timestamp() - ref_when) < 2e-6
    environment = {}
    for c in chunks:
        environment.update(c.environment)
    envs = reference.environment(ref)
    assert environment["os"] == envs[0].os
    assert environment["python"] == envs[0].python
    assert environment["host"] == envs[0].host
    header = next(c.run for c in chunks if c.run)
    run_record = reference.run_record(ref)
    assert (header.run_id, header.project, header.display_name) == (
        run.run_id,
        run.project,
        run.truth["display_name"],
    )
    assert header.started_at == datetime.fromtimestamp(
        run_record.start_time.seconds + run_record.start_time.nanos / 1e9, tz=UTC
    )


@pytest.mark.parametrize("name", ["edge", "long"])
def test_read_size_does_not_change_what_is_read(sdk_runs: dict[str, SdkRun], name: str) -> None:
    """Small reads force records longer than one read (the edge run's record spans three blocks)."""
    path = sdk_runs[name].wandb_file
    whole = merged(read_all(path))
    for chunk_bytes in (BLOCK, 3 * BLOCK, 5 * BLOCK + 123):
        assert merged(read_all(path, chunk_bytes=chunk_bytes)) == whole, chunk_bytes


def test_failed_run_exit_code(sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["failed"]
    chunks = read_all(run.wandb_file)
    _, _, _, _, exit_code, _ = merged(chunks)
    assert exit_code == 1
    assert_steps_match_truth(history_by_step(chunks), run, [s for s, _ in run.truth["steps"]])


# ---------------------------------------------------------------- damaged files


def _copy_prefix(src: Path, dst: Path, n: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def test_truncated_copies_read_whole_steps_only(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["long"]
    ref = reference.read(run.wandb_file)
    ref_steps = reference.history(ref)
    rng = random.Random(20240611)
    offsets = sorted({rng.randrange(len(reference.HEADER) + 1, ref.size) for _ in range(20)})
    for n in offsets:
        path = _copy_prefix(run.wandb_file, tmp_path / f"run-{run.run_id}-{n}.wandb", n)
        chunks = read_all(path)
        assert all(c.problem is None for c in chunks), (n, [c.problem for c in chunks])
        complete = [s.step for s in ref_steps if s.end <= n]
        got = history_by_step(chunks)
        assert sorted(got) == complete, f"cut at {n}: steps read differ from the whole records before it"
        assert_steps_match_truth(got, run, complete)
        last_whole = max((r.end for r in ref.records if r.end <= n), default=len(reference.HEADER))
        assert (chunks[-1].end_offset if chunks else len(reference.HEADER)) == last_whole, f"cut at {n}"


def _cuts_at_fragment_ends(ref: reference.RefFile, kinds: tuple[int, ...], limit: int) -> list[int]:
    cuts = [f.end for f in ref.fragments if f.type in kinds]
    return cuts[:limit]


READ_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from collections import Counter
    from pathlib import Path
    from mvdata_assets.runs.wandb_file import read_chunks
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 1024**3, hard))
    out = []
    for p in sys.argv[1:]:
        res = {"path": p, "steps": [], "error": None, "end": None, "problem": None}
        try:
            for c in read_chunks(Path(p)):
                res["steps"] += sorted(set(c.history.column("step").to_pylist()))
                res["end"] = c.end_offset
                res["problem"] = c.problem or res["problem"]
        except BaseException as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
        out.append(res)
    print(json.dumps(out))
    """
)


def read_in_subprocess(paths: list[Path]) -> list[dict]:
    """Reads in a child with an address-space limit: a reader that loops must not take the machine along."""
    proc = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_cut_at_a_fragment_boundary_reads_up_to_the_last_record(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    """A live or killed run's file often ends right after a FIRST (or MIDDLE) fragment: the SDK writes whole
    32 KiB blocks while a run is live, so a record crossing the block end is cut after its first part."""
    cuts = []
    for name, kinds in (("long", (reference.FIRST,)), ("edge", (reference.FIRST, reference.MIDDLE))):
        run = sdk_runs[name]
        ref = reference.read(run.wandb_file)
        for n in _cuts_at_fragment_ends(ref, kinds, 3):
            path = _copy_prefix(run.wandb_file, tmp_path / f"{name}-{n}.wandb", n)
            cuts.append((path, n, ref))
    assert any(n % BLOCK == 0 for _, n, _ in cuts), "expected at least one cut on a block boundary"
    results = read_in_subprocess([p for p, _, _ in cuts])
    errors = []
    for (path, n, ref), res in zip(cuts, results, strict=True):
        want_steps = [s.step for s in reference.history(ref) if s.end <= n]
        last_whole = max(r.end for r in ref.records if r.end <= n)
        if res["error"]:
            errors.append(f"cut at {n} ({path.name}): reader raised {res['error']}")
            continue
        if res["problem"]:
            errors.append(f"cut at {n}: reported as corrupt: {res['problem']}")
        if res["steps"] != want_steps:
            errors.append(f"cut at {n}: steps {res['steps'][-3:]} != {want_steps[-3:]}")
        if res["end"] != last_whole:
            errors.append(f"cut at {n}: read up to {res['end']}, not to the last whole record's end {last_whole}")
    assert not errors, "\n".join(errors)


def test_resume_after_the_file_grew(tmp_path: Path, sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["long"]
    data = run.wandb_file.read_bytes()
    ref_steps = reference.history(reference.read(run.wandb_file))
    rng = random.Random(7)
    path = tmp_path / f"run-{run.run_id}.wandb"
    for n in sorted(rng.randrange(BLOCK, len(data)) for _ in range(3)):
        _copy_prefix(run.wandb_file, path, n)
        first = read_all(path)
        resume_at = first[-1].end_offset
        path.write_bytes(data)
        rest = read_all(path, resume_at)
        got = history_by_step(first + rest)  # fails on any (step, key) read twice
        assert_steps_match_truth(got, run, [s.step for s in ref_steps])
        assert rest[-1].exit_code == 0


def test_flipped_byte_reports_file_and_offset_and_keeps_records_before(
    tmp_path: Path, sdk_runs: dict[str, SdkRun]
) -> None:
    run = sdk_runs["long"]
    data = run.wandb_file.read_bytes()
    ref = reference.read(run.wandb_file)
    ref_steps = reference.history(ref)
    rng = random.Random(99)
    frags = [f for f in ref.fragments if len(data) // 4 < f.offset < 3 * len(data) // 4]
    for i in range(5):
        frag = rng.choice(frags)
        pos = rng.randrange(frag.offset, frag.end)
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / f"run-{run.run_id}-flip{i}.wandb"
        path.write_bytes(bytes(damaged))
        chunks = read_all(path)
        problems = [c.problem for c in chunks if c.problem]
        assert len(problems) == 1, (pos, problems)
        assert str(path) in problems[0]
        assert f"offset {frag.offset}" in problems[0], (pos, frag, problems[0])
        record_start = next(r.start for r in ref.records if frag in r.fragments)
        kept = [s.step for s in ref_steps if s.end <= record_start]
        got = history_by_step(chunks)
        assert sorted(got) == kept, f"flip at {pos}: kept {len(got)} steps, expected {len(kept)}"
        assert_steps_match_truth(got, run, kept)
        assert chunks[-1].end_offset == record_start


def test_killed_run_reads_a_prefix_of_what_was_logged(sdk_runs: dict[str, SdkRun]) -> None:
    run = sdk_runs["killed"]
    chunks = read_all(run.wandb_file)
    assert all(c.problem is None for c in chunks)
    assert all(c.exit_code is None for c in chunks)
    got = history_by_step(chunks)
    logged = [s for s, _ in run.truth["steps"]]
    k = len(got)
    assert k > 0
    assert sorted(got) == logged[:k], "stored steps are not a prefix of the logged ones"
    assert_steps_match_truth(got, run, logged[:k])


# ---------------------------------------------------------------- a 2021 file (SDK 0.10.20)


def test_legacy_2021_fixture(legacy_dir: Path) -> None:
    path = next(legacy_dir.glob("offline-run-*/run-g9dvvkua.wandb"))
    chunks = read_all(path)
    assert all(c.problem is None for c in chunks)
    header = next(c.run for c in chunks if c.run)
    assert (header.run_id, header.project, header.host) == ("g9dvvkua", "code-toad", "cvp")
    exits = [c.exit_code for c in chunks if c.exit_code is not None]
    assert exits == [0]
    ref = reference.read(path)
    assert [(k, v) for c in chunks for _, k, v in c.stats] == [(k, v) for _, k, v in reference.stats(ref)]
    assert chunks[-1].end_offset == ref.size

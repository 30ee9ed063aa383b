"""The run files on disk and what was read of each: finding them, grouping a resumed run's segments, and the
watermark each file keeps in `wandb._offline_files`.

A watermark holds a file's size, mtime, inode, a fingerprint of its head and the byte offset read up to: unchanged
files are not opened, grown ones are read from the offset, shrunk or replaced ones again whole (offline.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import duckdb

from mvdata_assets.runs.store import SCHEMA, RunKey

FINGERPRINT_BYTES = 4096


def discover_run_files(dirs: Iterable[Path]) -> list[Path]:
    """Run files under each folder: the folder may be a `wandb/` dir or the dir holding one."""
    found: set[Path] = set()
    for base in dirs:
        for root in (base, base / "wandb"):
            for pattern in ("offline-run-*/run-*.wandb", "run-*/run-*.wandb"):
                found.update(p.resolve() for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def file_states(dirs: Iterable[Path]) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]} of every run file: what a sensor compares between ticks (no file is opened)."""
    states = {}
    for path in discover_run_files(dirs):
        try:
            st = path.stat()
        except OSError:
            continue  # gone between the listing and the stat
        states[str(path)] = [st.st_size, st.st_mtime_ns]
    return states


@dataclass
class Watermark:
    """A row of `_offline_files`: how far a run file was read, how it looked then, and the run's
    config / summary / metadata state (key paths), which later appended updates apply to."""

    path: str
    entity: str | None
    project: str | None
    run_id: str | None
    size: int
    mtime_ns: int
    inode: int
    fingerprint: str
    read_offset: int
    problem: str | None = None
    config_state: str | None = None
    summary_state: str | None = None
    metadata_state: str | None = None

    @property
    def run_key(self) -> RunKey | None:
        return (self.entity or "", self.project or "", self.run_id) if self.run_id else None


def head_fingerprint(path: Path, length: int = FINGERPRINT_BYTES) -> str:
    """`<n>:<sha256 of the first n bytes>`; a grown file keeps the fingerprint of the bytes it had."""
    with path.open("rb") as f:
        head = f.read(length)
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()}"


def same_head(path: Path, fingerprint: str | None) -> bool:
    if not fingerprint or ":" not in fingerprint:
        return False
    return head_fingerprint(path, int(fingerprint.split(":", 1)[0])) == fingerprint


def save_watermark(conn: duckdb.DuckDBPyConnection, watermark: Watermark) -> None:
    names = [f.name for f in fields(Watermark)]
    placeholders = ", ".join("?" * len(names))
    conn.execute(
        f"INSERT OR REPLACE INTO {SCHEMA}._offline_files ({', '.join(names)}) VALUES ({placeholders})",
        [getattr(watermark, name) for name in names],
    )


def resumed_runs(files: list[Path]) -> tuple[list[list[Path]], list[Path]]:
    """The resumed runs among the files, each as its segments in order, and the other files.

    A W&B run resumed by several processes (the download log under a multi-process executor) leaves a folder per
    process, each with its own `run-<id>.wandb`. Files of one run id whose heads differ are its segments; a file
    with the same head as another is a copy, read (and found already synced) alone.
    """
    by_name: dict[str, list[Path]] = {}
    for path in files:
        by_name.setdefault(path.name, []).append(path)
    segmented, singles = [], []
    for paths in by_name.values():
        heads: dict[str, Path] = {}
        for path in sorted(paths, key=segment_order):
            try:
                heads.setdefault(head_fingerprint(path), path)
            except OSError:
                singles.append(path)  # gone meanwhile: reported by the single-file path
        segments = list(heads.values())
        if len(segments) > 1:
            segmented.append(segments)
            singles += [path for path in paths if path not in segments and path not in singles]
        else:
            singles += [path for path in paths if path not in singles]
    return segmented, sorted(singles)


def segment_order(path: Path) -> tuple[str, int, str]:
    """`offline-run-<YYYYMMDD_HHMMSS>-<id>[-<n>]`: by start time, then the SDK's `-1`, `-2` for a folder name taken."""
    parts = path.parent.name.split("-")
    started = parts[2] if len(parts) > 2 else ""
    again = int(parts[-1]) if len(parts) > 4 and parts[-1].isdigit() else 0
    return started, again, str(path)


def load_watermarks(conn: duckdb.DuckDBPyConnection) -> dict[str, Watermark]:
    """Every file's watermark, by path."""
    columns = ", ".join(f.name for f in fields(Watermark))
    return {
        row[0]: Watermark(*row) for row in conn.execute(f"SELECT {columns} FROM {SCHEMA}._offline_files").fetchall()
    }

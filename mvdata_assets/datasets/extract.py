"""Safe, restartable unpacking of downloaded dataset archives (.zip, .tar, .tar.gz/.tgz) into their dataset folder.

Why not ``extractall``: a hostile or broken archive can write outside the dataset folder (absolute names, ``..``,
symlinks pointing out and then written through), and an extraction killed halfway looks finished. So:

* Every member is placed *before anything is written* (placement.py, reading the archive through archives.py); one
  bad member refuses the whole archive with :class:`UnsafeArchive`, naming the archive, the member and the reason,
  and an archive that would not fit (the expansion ratio, the free disk) with :class:`ArchiveTooBig`.
* Archives are too big to stage in a scratch copy (COCO is ~20 GB), so members are written in place, each atomically
  (``name.part`` then rename), never following a symlink, with setuid/setgid/sticky bits and group/other write
  dropped.
* A marker, ``<target>/.extracted-<archive name>.json``, is written only once everything is on disk. Without a
  valid marker the next call redoes the whole extraction; with one, the archive isn't even opened.

Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mvdata_assets.datasets.archives import (
    ARCHIVE_SUFFIXES,
    ArchiveTooBig,
    BadArchive,
    Member,
    OpenArchive,
    Reader,
    UnsafeArchive,
    archive_kind,
)
from mvdata_assets.datasets.digests import sha256_of
from mvdata_assets.datasets.placement import Placement, Planner, RelPath, check_room
from mvdata_assets.defaults import EXTRACT_MAX_RATIO

__all__ = [
    "ARCHIVE_SUFFIXES", "ArchiveTooBig", "BadArchive", "Extracted", "UnsafeArchive", "extract", "is_extracted",
    "marker_path",
]  # fmt: skip


_MARKER_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Extracted:
    """What :func:`extract` did; ``skipped`` means a valid marker showed the work was already done."""

    archive: Path
    target: Path
    members: int  # entries in the archive (files, directories and links)
    bytes: int  # bytes of regular-file content written
    skipped: bool


def marker_path(archive: Path, target: Path) -> Path:
    """Where the "finished extracting ``archive``" marker lives; one per archive, so several can share a folder."""
    return Path(target) / f".extracted-{Path(archive).name}.json"


def is_extracted(archive: Path, target: Path, sha256: str | None = None) -> bool:
    """True only if a marker shows ``archive`` - as it is now - was fully extracted into ``target``.

    "As it is now" means the same size and mtime (and, when ``sha256`` is given, the marker recorded that same
    checksum), so a re-downloaded archive is extracted again. The top-level entries the marker lists must still
    exist, so deleting an extracted folder also triggers a redo. The archive itself is only stat-ed, never read.
    """
    archive, target = Path(archive), Path(target)
    try:
        st = archive.stat()
        marker = json.loads(marker_path(archive, target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != _MARKER_VERSION:
        return False
    if marker.get("archive") != archive.name or marker.get("size") != st.st_size:
        return False
    if marker.get("mtime_ns") != st.st_mtime_ns:
        return False
    if sha256 is not None and str(marker.get("sha256") or "").lower() != sha256.lower():
        return False
    top_level = marker.get("top_level")
    if not isinstance(top_level, list) or not all(isinstance(name, str) for name in top_level):
        return False
    return all(os.path.lexists(target / name) for name in top_level)


def extract(
    archive: Path,
    target: Path,
    *,
    sha256: str | None = None,
    protected: Collection[Path] = (),
    max_ratio: int = EXTRACT_MAX_RATIO,
) -> Extracted:
    """Unpack ``archive`` into ``target`` unless a valid marker says that's done; see the module docstring for rules.

    Raises ValueError for an unsupported file type; before writing anything, :class:`UnsafeArchive` for a member that
    would escape ``target`` or replace a file of ``protected`` (the dataset's other downloads, verified already), and
    :class:`ArchiveTooBig` when the members' declared sizes exceed ``max_ratio`` times the archive's size or the
    free disk; :class:`BadArchive` for a corrupt archive or a ``sha256`` mismatch. After any error there is no
    marker, so the next call starts over.
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if is_extracted(archive, target, sha256):
        done = json.loads(marker_path(archive, target).read_text(encoding="utf-8"))
        return Extracted(archive, target, int(done["members"]), int(done["bytes"]), skipped=True)

    before = archive.stat()
    if sha256 is not None:
        actual = sha256_of(archive)  # the marker never vouches for a file other than the one the catalog describes
        if actual != sha256.lower():
            raise BadArchive(archive, f"sha256 is {actual}, expected {sha256.lower()}; download it again")
    root = Path(os.path.realpath(target))
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"extraction target {target} is not a directory")

    with OpenArchive(archive, kind) as source:
        planner = Planner(archive, root, protected)
        count = 0
        for member in source.members():
            planner.add(member)
            count += 1
        ops = planner.finish()
        check_room(archive, root, ops, planner, before.st_size, max_ratio)
        # Validation passed: from here on the folder changes. Drop a stale marker first so that an interruption
        # can't leave an old "done" next to half-new content.
        marker = marker_path(archive, root)
        for stale in (marker, marker.with_name(marker.name + ".part")):
            stale.unlink(missing_ok=True)
        written = _Writer(archive, root, source.open).run(ops)

    after = archive.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise BadArchive(archive, "the archive changed while it was being extracted; extract again")
    os.sync()  # the marker promises the content is there, so the content must be durable before it
    _write_marker(
        marker,
        {
            "version": _MARKER_VERSION,
            "archive": archive.name,
            "size": before.st_size,
            "mtime_ns": before.st_mtime_ns,
            "sha256": sha256.lower() if sha256 else None,
            "members": count,
            "bytes": written,
            "top_level": sorted({op.dest[0] for op in ops if op.dest}),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return Extracted(archive, target, count, written, skipped=False)


# --- writing: in place, one member at a time, each atomically, never through a symlink --------------------------------


def _file_mode(mode: int | None) -> int | None:
    """Permissions as archived, minus setuid/setgid/sticky and group/other write; the owner can always read/write."""
    if mode is None:
        return None
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _dir_mode(mode: int | None) -> int | None:
    """Like _file_mode, but the owner keeps rwx so the rest of the archive can still be written inside."""
    return None if mode is None else (mode & 0o755) | 0o700


def _copy_stream(src: Reader, fd: int) -> int:
    """Copy a member's content into an open file; returns the byte count. A seam tests use to interrupt writes."""
    total = 0
    while chunk := src.read(_CHUNK):
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        total += len(chunk)
    return total


class _Writer:
    def __init__(self, archive: Path, root: Path, opener: Callable[[Member], Reader]) -> None:
        self.archive, self.root, self.opener = archive, root, opener
        self._dirs: set[RelPath] = set()
        self._dests: set[RelPath] = set()

    def run(self, ops: list[Placement]) -> int:
        self._dests = {op.dest for op in ops}
        self.root.mkdir(parents=True, exist_ok=True)
        written = 0
        for op in ops:
            self._ensure_dirs(op.dest[:-1])
            path = self.root.joinpath(*op.dest)
            kind = op.member.kind
            if kind == "dir":
                self._make_dir(op.dest, _dir_mode(op.member.mode))
            elif kind == "file":
                written += self._write_file(op, path)
            elif kind == "symlink":
                self._place(op, path, lambda part, op=op: os.symlink(str(op.link), part))
            else:
                assert isinstance(op.link, tuple)  # a hard link's source is a resolved path, not link text
                source = self.root.joinpath(*op.link)
                self._place(op, path, lambda part, source=source: os.link(source, part, follow_symlinks=False))
        return written

    def _ensure_dirs(self, path: RelPath) -> None:
        """Create missing parents; a symlink or file appearing where validation saw a directory is an error."""
        for i in range(1, len(path) + 1):
            prefix = path[:i]
            if prefix in self._dirs:
                continue
            full = self.root.joinpath(*prefix)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                os.mkdir(full)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, "changed during extraction, not a directory", str(full))
            self._dirs.add(prefix)

    def _make_dir(self, dest: RelPath, mode: int | None) -> None:
        full = self.root.joinpath(*dest)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, "changed during extraction, now a symlink", str(full))
            os.unlink(full)  # a file where the archive has a directory: the archive wins, as with tar
            st = None
        if st is None:
            os.mkdir(full)
        if mode is not None:
            os.chmod(full, mode, follow_symlinks=False)
        self._dirs.add(dest)

    def _part(self, dest: RelPath) -> Path:
        """``name.part`` beside the member, unless the archive itself has a member by that name."""
        suffix, n = ".part", 0
        while (*dest[:-1], dest[-1] + suffix) in self._dests:
            n += 1
            suffix = f".part{n}"
        return self.root.joinpath(*dest[:-1], dest[-1] + suffix)

    def _write_file(self, op: Placement, path: Path) -> int:
        part = self._part(op.dest)
        part.unlink(missing_ok=True)  # left by an interrupted run
        mode = _file_mode(op.member.mode)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            src = self.opener(op.member)
            try:
                count = _copy_stream(src, fd)
            finally:
                src.close()
            if count != op.member.size:
                raise BadArchive(
                    self.archive, f"member '{op.member.name}' is truncated ({count} of {op.member.size} bytes)"
                )
            if mode is not None:
                os.fchmod(fd, mode)
            if op.member.mtime is not None:
                os.utime(fd, (op.member.mtime, op.member.mtime))
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(part, path)
        return count

    def _place(self, op: Placement, path: Path, make: Callable[[Path], None]) -> None:
        part = self._part(op.dest)
        part.unlink(missing_ok=True)
        make(part)
        os.replace(part, path)
        if os.path.lexists(part):  # rename() between two links to one inode is a no-op that leaves the source
            part.unlink()


def _write_marker(marker: Path, content: dict[str, Any]) -> None:
    """Write the marker atomically, so a crash leaves either no marker or a whole one."""
    part = marker.with_name(marker.name + ".part")
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(content, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, marker)

"""Safe, restartable unpacking of downloaded dataset archives (.zip, .tar, .tar.gz/.tgz) into their dataset folder.

Why not ``extractall``: a hostile or broken archive can write outside the dataset folder (absolute names, ``..``,
symlinks pointing out and then written through), and an extraction killed halfway looks finished. So:

* Every member is checked *before anything is written*; one bad member refuses the whole archive with
  :class:`UnsafeArchive`, naming the archive, the member and the reason. Member paths are resolved against a model
  of the folder as it will be (symlinks from earlier members, and symlinks already on disk), so link chains such as
  ``l1 -> .`` then ``l2 -> l1/..`` are caught, not only literal ``..``.
* Archives are too big to stage in a scratch copy (COCO is ~20 GB), so members are written in place, each atomically
  (``name.part`` then rename), never following a symlink, with setuid/setgid/sticky bits and group/other write
  dropped.
* A marker, ``<target>/.extracted-<archive name>.json``, is written only once everything is on disk. Without a
  valid marker the next call redoes the whole extraction; with one, the archive isn't even opened.

Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from mvdata_assets.datasets.catalog import ARCHIVE_SUFFIXES  # the one list of what can be unpacked

__all__ = ["ARCHIVE_SUFFIXES", "BadArchive", "Extracted", "UnsafeArchive", "extract", "is_extracted", "marker_path"]


_MARKER_VERSION = 1
DEFAULT_MAX_RATIO = 100  # text compresses ~10x; a zip bomb expands 1,000x and more
_CHUNK = 1 << 20
_MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit
_MAX_ZIP_LINK_BYTES = 4096  # PATH_MAX: a longer "symlink" entry is not a symlink target
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_MARKER_RE = re.compile(r"^\.extracted-.*\.json(\.part)?$")

# What reading a damaged archive raises, across zipfile/tarfile and their decompressors.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,  # zip compression method this Python can't decode
)


class UnsafeArchive(ValueError):
    """An archive member would land outside the target (or clobber what it mustn't); nothing was extracted."""

    def __init__(self, archive: Path, member: str, reason: str) -> None:
        self.archive = Path(archive)
        self.member = member
        self.reason = reason
        shown = member if member.isprintable() else repr(member)
        super().__init__(f"refusing to extract {self.archive}: member '{shown}' {reason}; nothing was extracted")


class ArchiveTooBig(ValueError):
    """The archive would expand past the allowed ratio or the free disk; nothing was extracted."""

    def __init__(self, archive: Path, reason: str) -> None:
        self.archive = Path(archive)
        super().__init__(f"refusing to extract {self.archive}: {reason}; nothing was extracted")


class BadArchive(ValueError):
    """The archive can't be read: corrupt, truncated, encrypted, or not the file the checksum describes."""

    def __init__(self, archive: Path, reason: str) -> None:
        self.archive = Path(archive)
        self.reason = reason
        super().__init__(f"{self.archive}: {reason}")


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
    max_ratio: int = DEFAULT_MAX_RATIO,
) -> Extracted:
    """Unpack ``archive`` into ``target`` unless a valid marker says that's done; see the module docstring for rules.

    Raises ValueError for an unsupported file type; before writing anything, :class:`UnsafeArchive` for a member that
    would escape ``target`` or replace a file of ``protected`` (the dataset's other downloads, verified already), and
    :class:`ArchiveTooBig` when the members' declared sizes exceed ``max_ratio`` times the archive's size or the
    free disk; :class:`BadArchive` for a corrupt archive or a ``sha256`` mismatch. After any error there is no
    marker, so the next call starts over.
    """
    archive, target = Path(archive), Path(target)
    kind = _archive_kind(archive)
    if is_extracted(archive, target, sha256):
        done = json.loads(marker_path(archive, target).read_text(encoding="utf-8"))
        return Extracted(archive, target, int(done["members"]), int(done["bytes"]), skipped=True)

    before = archive.stat()
    if sha256 is not None:
        actual = _sha256_of(archive)
        if actual != sha256.lower():
            raise BadArchive(archive, f"sha256 is {actual}, expected {sha256.lower()}; download it again")
    root = Path(os.path.realpath(target))
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"extraction target {target} is not a directory")

    with _OpenArchive(archive, kind) as source:
        planner = _Planner(archive, root, protected)
        count = 0
        for member in source.members():
            planner.add(member)
            count += 1
        ops = planner.finish()
        _check_room(archive, root, ops, planner, before.st_size, max_ratio)
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


class _Reader(Protocol):
    """The little of a file object that copying a member needs."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


# --- archive readers: both turn their format into the same _Member stream ---------------------------------------------

MemberKind = Literal["dir", "file", "symlink", "hardlink"]


@dataclass(frozen=True)
class _Member:
    """One archive entry in format-neutral form; ``ref`` is the reader's handle for opening its content."""

    name: str  # as stored, for messages
    path: str  # with "/" separators, for placing it
    kind: MemberKind
    link: str | None  # symlink target (relative to the member's folder) or hardlink target (relative to the root)
    size: int
    mode: int | None  # permission bits as archived, None when the archive has none
    mtime: float | None
    ref: Any


def _archive_kind(archive: Path) -> Literal["zip", "tar"]:
    """Pick the reader from the file name; anything else is refused rather than guessed at."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    raise ValueError(f"can't extract {archive}: unsupported archive type (supported: {', '.join(ARCHIVE_SUFFIXES)})")


class _Source:
    """An open archive: its members in order, and a way to read one member's bytes."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive

    def close(self) -> None:
        raise NotImplementedError

    def members(self) -> Iterator[_Member]:
        raise NotImplementedError

    def open(self, member: _Member) -> _Reader:
        raise NotImplementedError


class _ZipSource(_Source):
    def __init__(self, archive: Path) -> None:
        super().__init__(archive)
        # Closed by close(); looked up at call time so tests can prove a skip never opens it.
        self.zf = zipfile.ZipFile(archive)

    def close(self) -> None:
        self.zf.close()

    def members(self) -> Iterator[_Member]:
        for info in self.zf.infolist():
            # Windows tools write "\" as the separator; treat it as one, so "..\x" is the escape it looks like.
            name = info.filename.replace("\\", "/")
            mode = info.external_attr >> 16
            fmt = stat.S_IFMT(mode)
            if info.flag_bits & 0x1:
                raise BadArchive(self.archive, f"member '{info.filename}' is encrypted; can't extract it")
            link = None
            if name.endswith("/") or fmt == stat.S_IFDIR:
                kind: MemberKind = "dir"
            elif fmt == stat.S_IFLNK:
                kind = "symlink"
                if info.file_size > _MAX_ZIP_LINK_BYTES:
                    raise UnsafeArchive(self.archive, info.filename, "is a symlink with an implausibly long target")
                link = self.zf.read(info).decode("utf-8", "surrogateescape").replace("\\", "/")
            elif fmt in (0, stat.S_IFREG):
                kind = "file"
            else:
                raise UnsafeArchive(self.archive, info.filename, "is a device file, FIFO or socket")
            perms = stat.S_IMODE(mode) if stat.S_IMODE(mode) & 0o777 else None
            yield _Member(info.filename, name, kind, link, info.file_size, perms, _zip_mtime(info), info)

    def open(self, member: _Member) -> _Reader:
        return self.zf.open(member.ref)


class _TarSource(_Source):
    def __init__(self, archive: Path) -> None:
        super().__init__(archive)
        # Closed by close(); looked up at call time so tests can prove a skip never opens it.
        self.tf = tarfile.open(archive, "r:*")  # noqa: SIM115

    def close(self) -> None:
        self.tf.close()

    def members(self) -> Iterator[_Member]:
        for info in self.tf.getmembers():  # reads the whole archive: a truncated one fails here, before any write
            if info.isreg():
                kind: MemberKind = "file"
            elif info.isdir():
                kind = "dir"
            elif info.issym():
                kind = "symlink"
            elif info.islnk():
                kind = "hardlink"
            elif info.ischr() or info.isblk() or info.isfifo():
                raise UnsafeArchive(self.archive, info.name, "is a device file or FIFO")
            else:
                raise UnsafeArchive(self.archive, info.name, f"has an unsupported tar type {info.type!r}")
            link = info.linkname if kind in ("symlink", "hardlink") else None
            yield _Member(info.name, info.name, kind, link, info.size, info.mode, float(info.mtime), info)

    def open(self, member: _Member) -> _Reader:
        stream = self.tf.extractfile(member.ref)
        if stream is None:  # only for non-files, which never get here
            raise BadArchive(self.archive, f"member '{member.name}' has no content")
        return stream


class _OpenArchive:
    """Opens the right reader, turning "this isn't a readable archive" into a BadArchive that names the file."""

    def __init__(self, archive: Path, kind: Literal["zip", "tar"]) -> None:
        self.archive, self.kind = archive, kind
        self.source: _Source | None = None

    def __enter__(self) -> _Source:
        try:
            self.source = _ZipSource(self.archive) if self.kind == "zip" else _TarSource(self.archive)
        except _READ_ERRORS as exc:
            raise BadArchive(self.archive, f"not a readable {self.kind} archive ({exc})") from exc
        return _Guarded(self.source)

    def __exit__(self, *exc: object) -> None:
        if self.source is not None:
            self.source.close()


class _Guarded(_Source):
    """Wraps a source so a damaged archive surfaces as BadArchive naming it, wherever the damage is noticed."""

    def __init__(self, inner: _Source) -> None:
        super().__init__(inner.archive)
        self.inner = inner

    def close(self) -> None:
        self.inner.close()

    def members(self) -> Iterator[_Member]:
        try:
            yield from self.inner.members()
        except _READ_ERRORS as exc:
            raise BadArchive(self.archive, f"corrupt or truncated archive ({exc})") from exc

    def open(self, member: _Member) -> _Reader:
        try:
            return _GuardedStream(self.inner.open(member), self.archive, member.name)
        except _READ_ERRORS as exc:
            raise BadArchive(self.archive, f"can't read member '{member.name}' ({exc})") from exc


class _GuardedStream:
    """A member's content stream whose read errors (bad CRC, truncation) become BadArchive naming the member."""

    def __init__(self, stream: _Reader, archive: Path, name: str) -> None:
        self.stream, self.archive, self.name = stream, archive, name

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self.stream.read(size)
        except _READ_ERRORS as exc:
            raise BadArchive(self.archive, f"can't read member '{self.name}' ({exc})") from exc

    def close(self) -> None:
        self.stream.close()


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    """Zip timestamps are local wall-clock time; unrepresentable ones (month 0, ...) are dropped, not fatal."""
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


# --- validation: every member's final, symlink-free destination, computed before anything is written ------------------

RelPath = tuple[str, ...]  # a path relative to the target, one string per component


class _Escape(Exception):
    """Internal: a path left the target or can't be created; the caller adds archive and member."""


@dataclass(frozen=True)
class _Op:
    """One write, at ``dest`` (symlink-free, relative to the target root); ``link`` as it goes on disk."""

    member: _Member
    dest: RelPath
    link: str | RelPath | None = None  # symlink text, or the hard link's source path


def _member_parts(name: str) -> RelPath:
    """Split a member name into components, refusing names that are absolute or climb out of the target."""
    if "\x00" in name:
        raise _Escape("contains a NUL byte")
    if name.startswith("/"):
        raise _Escape("is an absolute path")
    if _DRIVE_RE.match(name):
        raise _Escape("starts with a Windows drive letter")
    norm = posixpath.normpath(name)
    if norm == ".":
        return ()
    parts = tuple(norm.split("/"))
    if parts[0] == "..":
        raise _Escape("leaves the target folder ('..')")
    return parts


def _link_parts(text: str) -> list[str]:
    """A link target's components, with the no-op ones dropped."""
    return [p for p in text.split("/") if p not in ("", ".")]


class _Planner:
    """Models the target as it will be after each member, to place every member without following a link outside.

    The model is the archive's own entries so far laid over what is on disk now. Resolving a path walks it one
    component at a time and substitutes any symlink met on the way, so ``..`` is only ever applied to real
    directories: the same thing the kernel would do, without anything written.
    """

    def __init__(self, archive: Path, root: Path, protected: Collection[Path] = ()) -> None:
        self.archive = archive
        self.root = root
        self.protected = {
            Path(os.path.realpath(path)).relative_to(root).parts
            for path in protected
            if Path(os.path.realpath(path)).is_relative_to(root)
        }
        self.state: dict[RelPath, tuple[str, str | None]] = {}  # path -> (dir|file|symlink, symlink text)
        self._disk: dict[RelPath, os.stat_result | None] = {}
        self.ops: list[_Op] = []
        real_archive = Path(os.path.realpath(archive))
        self.archive_path: RelPath | None = None
        if real_archive.is_relative_to(root):
            self.archive_path = real_archive.relative_to(root).parts

    # What is at a path: the archive's latest entry there, else the disk, trusting disk only under real directories.
    def disk_stat(self, path: RelPath) -> os.stat_result | None:
        if path in self._disk:
            return self._disk[path]
        result: os.stat_result | None = None
        parent = self.disk_stat(path[:-1]) if len(path) > 1 else None
        if len(path) == 1 or (parent is not None and stat.S_ISDIR(parent.st_mode)):
            try:
                result = os.lstat(self.root.joinpath(*path))
            except (FileNotFoundError, NotADirectoryError):
                result = None
        self._disk[path] = result
        return result

    def kind_at(self, path: RelPath) -> tuple[str, str | None] | None:
        if path in self.state:
            return self.state[path]
        st = self.disk_stat(path)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            return ("symlink", os.readlink(self.root.joinpath(*path)))
        return ("dir", None) if stat.S_ISDIR(st.st_mode) else ("file", None)

    def resolve(self, parts: Sequence[str], *, follow_last: bool) -> RelPath:
        """The symlink-free path ``parts`` (relative to the root) leads to; raises _Escape if it leaves the root."""
        stack: list[str] = []
        queue = deque(p for p in parts if p not in ("", "."))
        hops = 0
        while queue:
            part = queue.popleft()
            if part == "..":
                if not stack:
                    raise _Escape("leads outside the target folder")
                stack.pop()
                continue
            stack.append(part)
            found = self.kind_at(tuple(stack))
            if found is not None and found[0] == "symlink" and (queue or follow_last):
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise _Escape("goes through a symlink loop")
                text = found[1] or ""
                stack.pop()
                if text.startswith("/"):  # only on-disk links can be absolute; the archive's are refused earlier
                    real = Path(os.path.realpath(text))
                    if not real.is_relative_to(self.root):
                        raise _Escape(f"goes through the symlink '{'/'.join((*stack, part))}' -> {text}")
                    stack = []
                    queue.extendleft(reversed(real.relative_to(self.root).parts))
                else:
                    queue.extendleft(reversed(_link_parts(text)))
                continue
            if queue and found is not None and found[0] != "dir":
                raise _Escape(f"needs '{'/'.join(stack)}' to be a directory, but it is a file")
        return tuple(stack)

    def resolve_link(self, folder: RelPath, text: str) -> RelPath:
        """Where a symlink in ``folder`` with target ``text`` leads; absolute targets (on-disk links) included."""
        if text.startswith("/"):
            real = Path(os.path.realpath(text))
            if not real.is_relative_to(self.root):
                raise _Escape(f"leads outside the target folder ({text})")
            return self.resolve(real.relative_to(self.root).parts, follow_last=True)
        return self.resolve((*folder, *_link_parts(text)), follow_last=True)

    def add(self, member: _Member) -> None:
        try:
            self._add(member)
            if isinstance(member.ref, tarfile.TarInfo):
                self._tar_filter(member.ref)
        except _Escape as exc:
            raise UnsafeArchive(self.archive, member.name, str(exc)) from None

    def _add(self, member: _Member) -> None:
        parts = _member_parts(member.path)
        if member.kind == "dir":
            dest = self.resolve(parts, follow_last=True)  # an existing link to a directory inside is kept
        else:
            if not parts:
                raise _Escape("names the target folder itself")
            dest = self.resolve(parts, follow_last=False)  # a file replaces a link, never writes through it
        if dest and (dest == self.archive_path or (len(dest) == 1 and _MARKER_RE.match(dest[0]))):
            raise _Escape("would overwrite the archive or its extraction marker")
        if dest in self.protected and member.kind != "dir":
            raise _Escape(f"would overwrite '{'/'.join(dest)}', a file of the dataset's catalog")

        existing = self.kind_at(dest) if dest else ("dir", None)
        link: str | RelPath | None = None
        if member.kind == "dir":
            if dest:
                self._record(dest, ("dir", None))
                self.ops.append(_Op(member, dest))
            return
        if existing is not None and existing[0] == "dir":
            raise _Escape("would replace a directory")
        if existing is not None and existing[0] == "symlink" and dest not in self.state:
            # Replacing (not following) it would be safe, but a link pointing out was put there on purpose.
            try:
                self.resolve_link(dest[:-1], existing[1] or "")
            except _Escape:
                raise _Escape("would overwrite a symlink that points outside the target folder") from None
        if member.kind == "symlink":
            text = member.link or ""
            if not text or "\x00" in text:
                raise _Escape("is a symlink with an empty or invalid target")
            if text.startswith("/") or _DRIVE_RE.match(text):
                raise _Escape(f"is a symlink to an absolute path ({text})")
            try:  # checked again in finish(), as later members can change what it leads to
                self.resolve_link(dest[:-1], text)
            except _Escape as exc:
                raise _Escape(f"is a symlink that {exc}") from None
            link = text
            self._record(dest, ("symlink", text))
        elif member.kind == "hardlink":
            try:
                source = self.resolve(_member_parts(member.link or ""), follow_last=False)
            except _Escape as exc:
                raise _Escape(f"is a hard link whose target {exc}") from None
            if self.state.get(source) != ("file", None) or source == dest:
                raise _Escape(f"is a hard link to '{member.link}', which is not an earlier file in the archive")
            link = source
            self._record(dest, ("file", None))
        else:
            self._record(dest, ("file", None))
        self.ops.append(_Op(member, dest, link))

    def _record(self, dest: RelPath, entry: tuple[str, str | None]) -> None:
        for i in range(1, len(dest)):
            self.state[dest[:i]] = ("dir", None)
        self.state[dest] = entry

    def _tar_filter(self, info: tarfile.TarInfo) -> None:
        """Second opinion from the stdlib's "data" filter (3.11.4+), which knows tar quirks we might not."""
        try:
            tarfile.data_filter(info, str(self.root))
        except tarfile.FilterError as exc:
            raise _Escape(f"is refused by tarfile's data filter ({exc})") from None

    def finish(self) -> list[_Op]:
        """Check every symlink that survives against the final layout: a later link can redirect an earlier one."""
        for op in self.ops:
            if op.member.kind != "symlink" or self.state.get(op.dest) != ("symlink", op.link):
                continue
            try:
                self.resolve_link(op.dest[:-1], str(op.link))
            except _Escape as exc:
                raise UnsafeArchive(self.archive, op.member.name, f"is a symlink that {exc}") from None
        return self.ops


def _check_room(archive: Path, root: Path, ops: list[_Op], planner: _Planner, size: int, max_ratio: int) -> None:
    """The members' declared sizes (what the readers let through, at most) against the ratio and the free disk."""
    declared = sum(op.member.size for op in ops if op.member.kind == "file")
    if declared > max_ratio * max(size, 1):
        ratio = declared / max(size, 1)
        limit = f"the limit is {max_ratio}: MVDATA_EXTRACT_MAX_RATIO"
        raise ArchiveTooBig(
            archive, f"its members declare {declared:,} bytes, {ratio:,.0f} times its {size:,} ({limit})"
        )
    replaced = 0  # files already there (an interrupted extraction) give their room back as they are replaced
    for op in ops:
        st = planner.disk_stat(op.dest) if op.dest and op.member.kind == "file" else None
        replaced += st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if declared - replaced > free:
        needed = (declared - replaced) / 2**30
        raise ArchiveTooBig(archive, f"it needs {needed:.2f} GiB and {free / 2**30:.2f} GiB is free under {root}")


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


def _copy_stream(src: _Reader, fd: int) -> int:
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
    def __init__(self, archive: Path, root: Path, opener: Callable[[_Member], _Reader]) -> None:
        self.archive, self.root, self.opener = archive, root, opener
        self._dirs: set[RelPath] = set()
        self._dests: set[RelPath] = set()

    def run(self, ops: list[_Op]) -> int:
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

    def _write_file(self, op: _Op, path: Path) -> int:
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

    def _place(self, op: _Op, path: Path, make: Callable[[Path], None]) -> None:
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


def _sha256_of(archive: Path) -> str:
    """Hash the archive, so the marker never vouches for a file other than the one the catalog describes."""
    with open(archive, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()

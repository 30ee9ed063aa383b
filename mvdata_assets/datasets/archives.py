"""Reading dataset archives (.zip, .tar, .tar.gz/.tgz) as one stream of members, whatever the format.

Both readers turn their format into the same `Member` records (name, kind, link, size, mode, mtime) and open a
member's content as a plain stream; a damaged archive surfaces as `BadArchive` naming the archive and the member,
wherever the damage is noticed. The other errors of an extraction are defined here too, as the readers raise them
for members no dataset folder may hold. Plain Python.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from mvdata_assets.datasets.catalog_schema import ARCHIVE_KINDS, ARCHIVE_SUFFIXES  # the one list of what is unpacked

MAX_ZIP_LINK_BYTES = 4096  # PATH_MAX: a longer "symlink" entry is not a symlink target

# What reading a damaged archive raises, across zipfile/tarfile and their decompressors.
READ_ERRORS: tuple[type[BaseException], ...] = (
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


class Reader(Protocol):
    """The little of a file object that copying a member needs."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


# --- archive readers: both turn their format into the same Member stream ---------------------------------------------

MemberKind = Literal["dir", "file", "symlink", "hardlink"]


@dataclass(frozen=True)
class Member:
    """One archive entry in format-neutral form; ``ref`` is the reader's handle for opening its content."""

    name: str  # as stored, for messages
    path: str  # with "/" separators, for placing it
    kind: MemberKind
    link: str | None  # symlink target (relative to the member's folder) or hardlink target (relative to the root)
    size: int
    mode: int | None  # permission bits as archived, None when the archive has none
    mtime: float | None
    ref: Any


def archive_kind(archive: Path) -> Literal["zip", "tar"]:
    """Pick the reader from the file name; anything else is refused rather than guessed at."""
    name = archive.name.lower()
    for suffix, kind in ARCHIVE_KINDS.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(f"can't extract {archive}: unsupported archive type (supported: {', '.join(ARCHIVE_SUFFIXES)})")


class _Source:
    """An open archive: its members in order, and a way to read one member's bytes."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive

    def close(self) -> None:
        raise NotImplementedError

    def members(self) -> Iterator[Member]:
        raise NotImplementedError

    def open(self, member: Member) -> Reader:
        raise NotImplementedError


class _ZipSource(_Source):
    def __init__(self, archive: Path) -> None:
        super().__init__(archive)
        # Closed by close(); looked up at call time so tests can prove a skip never opens it.
        self.zf = zipfile.ZipFile(archive)

    def close(self) -> None:
        self.zf.close()

    def members(self) -> Iterator[Member]:
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
                if info.file_size > MAX_ZIP_LINK_BYTES:
                    raise UnsafeArchive(self.archive, info.filename, "is a symlink with an implausibly long target")
                link = self.zf.read(info).decode("utf-8", "surrogateescape").replace("\\", "/")
            elif fmt in (0, stat.S_IFREG):
                kind = "file"
            else:
                raise UnsafeArchive(self.archive, info.filename, "is a device file, FIFO or socket")
            perms = stat.S_IMODE(mode) if stat.S_IMODE(mode) & 0o777 else None
            yield Member(info.filename, name, kind, link, info.file_size, perms, _zip_mtime(info), info)

    def open(self, member: Member) -> Reader:
        return self.zf.open(member.ref)


class _TarSource(_Source):
    def __init__(self, archive: Path) -> None:
        super().__init__(archive)
        # Closed by close(); looked up at call time so tests can prove a skip never opens it.
        self.tf = tarfile.open(archive, "r:*")  # noqa: SIM115

    def close(self) -> None:
        self.tf.close()

    def members(self) -> Iterator[Member]:
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
                raise UnsafeArchive(
                    self.archive, info.name, f"has an unsupported tar type {info.type.decode('latin-1')!r}"
                )
            link = info.linkname if kind in ("symlink", "hardlink") else None
            yield Member(info.name, info.name, kind, link, info.size, info.mode, float(info.mtime), info)

    def open(self, member: Member) -> Reader:
        stream = self.tf.extractfile(member.ref)
        if stream is None:  # only for non-files, which never get here
            raise BadArchive(self.archive, f"member '{member.name}' has no content")
        return stream


class OpenArchive:
    """Opens the right reader, turning "this isn't a readable archive" into a BadArchive that names the file."""

    def __init__(self, archive: Path, kind: Literal["zip", "tar"]) -> None:
        self.archive, self.kind = archive, kind
        self.source: _Source | None = None

    def __enter__(self) -> _Source:
        try:
            self.source = _ZipSource(self.archive) if self.kind == "zip" else _TarSource(self.archive)
        except READ_ERRORS as exc:
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

    def members(self) -> Iterator[Member]:
        try:
            yield from self.inner.members()
        except READ_ERRORS as exc:
            raise BadArchive(self.archive, f"corrupt or truncated archive ({exc})") from exc

    def open(self, member: Member) -> Reader:
        try:
            return _GuardedStream(self.inner.open(member), self.archive, member.name)
        except READ_ERRORS as exc:
            raise BadArchive(self.archive, f"can't read member '{member.name}' ({exc})") from exc


class _GuardedStream:
    """A member's content stream whose read errors (bad CRC, truncation) become BadArchive naming the member."""

    def __init__(self, stream: Reader, archive: Path, name: str) -> None:
        self.stream, self.archive, self.name = stream, archive, name

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self.stream.read(size)
        except READ_ERRORS as exc:
            raise BadArchive(self.archive, f"can't read member '{self.name}' ({exc})") from exc

    def close(self) -> None:
        self.stream.close()


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    """Zip timestamps are local wall-clock time; unrepresentable ones (month 0, ...) are dropped, not fatal."""
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None

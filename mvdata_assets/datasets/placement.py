"""Where each archive member lands, computed for the whole archive before anything is written.

Member paths are resolved against a model of the folder as it will be (symlinks from earlier members, and symlinks
already on disk), so link chains such as `l1 -> .` then `l2 -> l1/..` are caught, not only literal `..`. One bad
member refuses the whole archive with `UnsafeArchive`, naming the archive, the member and the reason; so does a
member that would replace the archive, its marker or a file of the dataset's catalog. `check_room` refuses an
archive whose members declare more than the allowed expansion or the free disk. Plain Python.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tarfile
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from mvdata_assets.datasets.archives import ArchiveTooBig, Member, UnsafeArchive

MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit
DRIVE_RE = re.compile(r"^[A-Za-z]:")
MARKER_RE = re.compile(r"^\.extracted-.*\.json(\.part)?$")


RelPath = tuple[str, ...]  # a path relative to the target, one string per component


class Escape(Exception):
    """Internal: a path left the target or can't be created; the caller adds archive and member."""


@dataclass(frozen=True)
class Placement:
    """One write, at ``dest`` (symlink-free, relative to the target root); ``link`` as it goes on disk."""

    member: Member
    dest: RelPath
    link: str | RelPath | None = None  # symlink text, or the hard link's source path


def member_parts(name: str) -> RelPath:
    """Split a member name into components, refusing names that are absolute or climb out of the target."""
    if "\x00" in name:
        raise Escape("contains a NUL byte")
    if name.startswith("/"):
        raise Escape("is an absolute path")
    if DRIVE_RE.match(name):
        raise Escape("starts with a Windows drive letter")
    norm = posixpath.normpath(name)
    if norm == ".":
        return ()
    parts = tuple(norm.split("/"))
    if parts[0] == "..":
        raise Escape("leaves the target folder ('..')")
    return parts


def link_parts(text: str) -> list[str]:
    """A link target's components, with the no-op ones dropped."""
    return [p for p in text.split("/") if p not in ("", ".")]


class Planner:
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
        self.ops: list[Placement] = []
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
        """The symlink-free path ``parts`` (relative to the root) leads to; raises Escape if it leaves the root."""
        stack: list[str] = []
        queue = deque(p for p in parts if p not in ("", "."))
        hops = 0
        while queue:
            part = queue.popleft()
            if part == "..":
                if not stack:
                    raise Escape("leads outside the target folder")
                stack.pop()
                continue
            stack.append(part)
            found = self.kind_at(tuple(stack))
            if found is not None and found[0] == "symlink" and (queue or follow_last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise Escape("goes through a symlink loop")
                text = found[1] or ""
                stack.pop()
                if text.startswith("/"):  # only on-disk links can be absolute; the archive's are refused earlier
                    real = Path(os.path.realpath(text))
                    if not real.is_relative_to(self.root):
                        raise Escape(f"goes through the symlink '{'/'.join((*stack, part))}' -> {text}")
                    stack = []
                    queue.extendleft(reversed(real.relative_to(self.root).parts))
                else:
                    queue.extendleft(reversed(link_parts(text)))
                continue
            if queue and found is not None and found[0] != "dir":
                raise Escape(f"needs '{'/'.join(stack)}' to be a directory, but it is a file")
        return tuple(stack)

    def resolve_link(self, folder: RelPath, text: str) -> RelPath:
        """Where a symlink in ``folder`` with target ``text`` leads; absolute targets (on-disk links) included."""
        if text.startswith("/"):
            real = Path(os.path.realpath(text))
            if not real.is_relative_to(self.root):
                raise Escape(f"leads outside the target folder ({text})")
            return self.resolve(real.relative_to(self.root).parts, follow_last=True)
        return self.resolve((*folder, *link_parts(text)), follow_last=True)

    def add(self, member: Member) -> None:
        try:
            self._add(member)
            if isinstance(member.ref, tarfile.TarInfo):
                self._tar_filter(member.ref)
        except Escape as exc:
            raise UnsafeArchive(self.archive, member.name, str(exc)) from None

    def _add(self, member: Member) -> None:
        parts = member_parts(member.path)
        if member.kind == "dir":
            dest = self.resolve(parts, follow_last=True)  # an existing link to a directory inside is kept
        else:
            if not parts:
                raise Escape("names the target folder itself")
            dest = self.resolve(parts, follow_last=False)  # a file replaces a link, never writes through it
        if dest and (dest == self.archive_path or (len(dest) == 1 and MARKER_RE.match(dest[0]))):
            raise Escape("would overwrite the archive or its extraction marker")
        if dest in self.protected and member.kind != "dir":
            raise Escape(f"would overwrite '{'/'.join(dest)}', a file of the dataset's catalog")

        existing = self.kind_at(dest) if dest else ("dir", None)
        link: str | RelPath | None = None
        if member.kind == "dir":
            if dest:
                self._record(dest, ("dir", None))
                self.ops.append(Placement(member, dest))
            return
        if existing is not None and existing[0] == "dir":
            raise Escape("would replace a directory")
        if existing is not None and existing[0] == "symlink" and dest not in self.state:
            # Replacing (not following) it would be safe, but a link pointing out was put there on purpose.
            try:
                self.resolve_link(dest[:-1], existing[1] or "")
            except Escape:
                raise Escape("would overwrite a symlink that points outside the target folder") from None
        if member.kind == "symlink":
            text = member.link or ""
            if not text or "\x00" in text:
                raise Escape("is a symlink with an empty or invalid target")
            if text.startswith("/") or DRIVE_RE.match(text):
                raise Escape(f"is a symlink to an absolute path ({text})")
            try:  # checked again in finish(), as later members can change what it leads to
                self.resolve_link(dest[:-1], text)
            except Escape as exc:
                raise Escape(f"is a symlink that {exc}") from None
            link = text
            self._record(dest, ("symlink", text))
        elif member.kind == "hardlink":
            try:
                source = self.resolve(member_parts(member.link or ""), follow_last=False)
            except Escape as exc:
                raise Escape(f"is a hard link whose target {exc}") from None
            if source == dest:
                raise Escape("is a hard link to itself")
            if self.state.get(source) != ("file", None):
                raise Escape(f"is a hard link to '{member.link}', which is not an earlier file in the archive")
            link = source
            self._record(dest, ("file", None))
        else:
            self._record(dest, ("file", None))
        self.ops.append(Placement(member, dest, link))

    def _record(self, dest: RelPath, entry: tuple[str, str | None]) -> None:
        for i in range(1, len(dest)):
            self.state[dest[:i]] = ("dir", None)
        self.state[dest] = entry

    def _tar_filter(self, info: tarfile.TarInfo) -> None:
        """Second opinion from the stdlib's "data" filter (3.11.4+), which knows tar quirks we might not."""
        try:
            tarfile.data_filter(info, str(self.root))
        except tarfile.FilterError as exc:
            raise Escape(f"is refused by tarfile's data filter ({exc})") from None

    def finish(self) -> list[Placement]:
        """Check every symlink that survives against the final layout: a later link can redirect an earlier one."""
        for op in self.ops:
            if op.member.kind != "symlink" or self.state.get(op.dest) != ("symlink", op.link):
                continue
            try:
                self.resolve_link(op.dest[:-1], str(op.link))
            except Escape as exc:
                raise UnsafeArchive(self.archive, op.member.name, f"is a symlink that {exc}") from None
        return self.ops


def check_room(archive: Path, root: Path, ops: list[Placement], planner: Planner, size: int, max_ratio: int) -> None:
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

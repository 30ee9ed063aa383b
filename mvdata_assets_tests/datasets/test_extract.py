"""Archive extraction unpacks good archives exactly, refuses escaping ones before writing a byte, and only redoes
work that isn't provably finished. Every archive here is a real zip/tar built in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mvdata_assets.datasets import extract as extract_mod
from mvdata_assets.datasets import placement
from mvdata_assets.datasets.extract import (
    ARCHIVE_SUFFIXES,
    ArchiveTooBig,
    BadArchive,
    Extracted,
    UnsafeArchive,
    extract,
    is_extracted,
    marker_path,
)

MTIME = 1_700_000_000
# (kind, name, payload, mode): payload is bytes for files, the link target for links.
Entry = tuple[Any, ...]

BIN = bytes(range(256)) * 41
GOOD: list[Entry] = [
    ("dir", "data/"),
    ("file", "data/a.txt", b"alpha\n", 0o666),
    ("file", "data/sub/b.bin", BIN, 0o644),
    ("file", "top.txt", b"", 0o644),
    ("file", "run.sh", b"#!/bin/sh\necho hi\n", 0o4755),
    ("dir", "empty/"),
]
GOOD_TREE: dict[str, object] = {
    "data": "dir",
    "data/a.txt": b"alpha\n",
    "data/sub": "dir",
    "data/sub/b.bin": BIN,
    "top.txt": b"",
    "run.sh": b"#!/bin/sh\necho hi\n",
    "empty": "dir",
}
GOOD_BYTES = sum(len(e[2]) for e in GOOD if e[0] == "file")
FORMATS = ["zip", "tar", "tar.gz", "tgz"]


# --- building real archives -------------------------------------------------------------------------------------------


def make_tar(path: Path, entries: Sequence[Entry]) -> Path:
    """A tar (gzipped for .tar.gz/.tgz) holding exactly ``entries``, names written verbatim."""
    mode = "w:gz" if path.name.endswith(("gz",)) else "w"
    with tarfile.open(path, mode) as tf:
        for kind, name, *rest in entries:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            data = None
            if kind == "file":
                data = rest[0]
                info.size = len(data)
                info.mode = rest[1] if len(rest) > 1 else 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, rest[0]
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, rest[0]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            else:
                raise AssertionError(kind)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def make_zip(path: Path, entries: Sequence[Entry]) -> Path:
    """A zip holding exactly ``entries``; names are written verbatim (zipfile doesn't sanitise on write)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for kind, name, *rest in entries:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
            info.create_system = 3  # unix, so external_attr carries a mode
            if kind == "file":
                info.external_attr = (stat.S_IFREG | (rest[1] if len(rest) > 1 else 0o644)) << 16
                zf.writestr(info, rest[0])
            elif kind == "dir":
                info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
                zf.writestr(info, b"")
            elif kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, rest[0])
            else:
                raise AssertionError(kind)
    return path


def make_archive(path: Path, entries: Sequence[Entry]) -> Path:
    return make_zip(path, entries) if path.suffix == ".zip" else make_tar(path, entries)


def tree(root: Path, *, skip: Sequence[str] = ()) -> dict[str, object]:
    """Everything under ``root`` (not following links): dirs, file bytes and link targets by relative path."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in skip:
                continue
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def extracted_tree(archive: Path, target: Path) -> dict[str, object]:
    """The target's content minus the archive itself and its marker."""
    return tree(target, skip=(archive.name, marker_path(archive, target).name))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A dataset folder, as in $MVDATA_HOME/datasets/<name>: the archive is downloaded into it."""
    folder = tmp_path / "datasets" / "coco"
    folder.mkdir(parents=True)
    return folder


# --- good archives ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_archive_extracts_exact_contents_and_marker(target: Path, fmt: str) -> None:
    archive = make_archive(target / f"val2017.{fmt}", GOOD)

    result = extract(archive, target)

    assert result == Extracted(archive, target, members=len(GOOD), bytes=GOOD_BYTES, skipped=False)
    assert extracted_tree(archive, target) == GOOD_TREE
    assert is_extracted(archive, target)
    marker = json.loads(marker_path(archive, target).read_text())
    st = archive.stat()
    assert marker["archive"] == archive.name
    assert (marker["size"], marker["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert (marker["members"], marker["bytes"], marker["sha256"]) == (len(GOOD), GOOD_BYTES, None)
    assert marker["top_level"] == ["data", "empty", "run.sh", "top.txt"]
    assert marker["finished_at"]
    assert not list(target.rglob("*.part"))


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_modes_are_kept_without_setuid_or_group_write(target: Path, fmt: str) -> None:
    archive = make_archive(target / f"a.{fmt}", GOOD)
    extract(archive, target)
    assert stat.S_IMODE((target / "run.sh").stat().st_mode) == 0o755  # setuid dropped, exec kept
    assert stat.S_IMODE((target / "data/a.txt").stat().st_mode) == 0o644  # group/other write dropped
    if fmt == "tar":
        assert (target / "data/sub/b.bin").stat().st_mtime == MTIME


def test_tar_of_dot_with_dot_slash_names(target: Path) -> None:
    """``tar -C dir -czf x.tgz .`` writes "./" and "./name": the root entry is a no-op, not an error."""
    archive = make_tar(target / "sbu.tgz", [("dir", "./"), ("file", "./a.txt", b"a"), ("file", "./d/b.txt", b"b")])
    result = extract(archive, target)
    assert result.members == 3
    assert extracted_tree(archive, target) == {"a.txt": b"a", "d": "dir", "d/b.txt": b"b"}


def test_missing_target_is_created(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", GOOD)
    target = tmp_path / "new" / "deeper"
    assert extract(archive, target).bytes == GOOD_BYTES
    assert tree(target, skip=(marker_path(archive, target).name,)) == GOOD_TREE


# --- skipping finished work -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_second_call_is_skipped_without_opening_the_archive(
    target: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_archive(target / f"a.{fmt}", GOOD)
    extract(archive, target)
    (target / "data/a.txt").write_bytes(b"edited by a user")  # a re-extraction would put "alpha" back

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was opened")

    monkeypatch.setattr(zipfile, "ZipFile", refuse)
    monkeypatch.setattr(tarfile, "open", refuse)
    second = extract(archive, target)

    assert second == Extracted(archive, target, members=len(GOOD), bytes=GOOD_BYTES, skipped=True)
    assert (target / "data/a.txt").read_bytes() == b"edited by a user"


def test_replaced_archive_is_extracted_again(target: Path) -> None:
    archive = make_zip(target / "a.zip", GOOD)
    extract(archive, target)
    make_zip(archive, [("file", "data/a.txt", b"version two, longer\n")])
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))

    assert not is_extracted(archive, target)
    result = extract(archive, target)

    assert (result.skipped, result.members) == (False, 1)
    assert (target / "data/a.txt").read_bytes() == b"version two, longer\n"
    assert json.loads(marker_path(archive, target).read_text())["top_level"] == ["data"]


def test_touched_archive_same_size_is_extracted_again(target: Path) -> None:
    archive = make_tar(target / "a.tar", GOOD)
    extract(archive, target)
    os.utime(archive, (MTIME, MTIME))
    (target / "top.txt").write_bytes(b"stale")
    assert not is_extracted(archive, target)
    assert extract(archive, target).skipped is False
    assert (target / "top.txt").read_bytes() == b""


def test_deleted_top_level_entry_triggers_redo(target: Path) -> None:
    archive = make_tar(target / "a.tar.gz", GOOD)
    extract(archive, target)
    shutil.rmtree(target / "data")
    assert not is_extracted(archive, target)
    assert extract(archive, target).skipped is False
    assert extracted_tree(archive, target) == GOOD_TREE


def test_is_extracted_is_false_without_marker_or_archive_or_with_broken_marker(target: Path) -> None:
    archive = make_zip(target / "a.zip", GOOD)
    assert not is_extracted(archive, target)
    extract(archive, target)
    marker = marker_path(archive, target)
    good = marker.read_text()
    marker.write_text("{not json")
    assert not is_extracted(archive, target)
    marker.write_text(good)
    assert is_extracted(archive, target)
    archive.unlink()
    assert not is_extracted(archive, target)


# --- checksums --------------------------------------------------------------------------------------------------------


def test_sha256_is_checked_and_recorded(target: Path) -> None:
    archive = make_zip(target / "a.zip", GOOD)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()

    assert extract(archive, target, sha256=digest.upper()).skipped is False

    assert json.loads(marker_path(archive, target).read_text())["sha256"] == digest
    assert is_extracted(archive, target, digest)
    assert not is_extracted(archive, target, "0" * 64)
    assert extract(archive, target, sha256=digest).skipped is True


def test_sha256_mismatch_writes_nothing(target: Path) -> None:
    archive = make_zip(target / "a.zip", GOOD)
    before = tree(target)
    with pytest.raises(BadArchive, match=r"a\.zip: sha256 is [0-9a-f]{64}, expected 0{64}"):
        extract(archive, target, sha256="0" * 64)
    assert tree(target) == before


# --- interrupted work -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_interrupted_extraction_is_redone(target: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_archive(target / f"a.{fmt}", GOOD)
    real_copy = extract_mod._copy_stream
    calls: list[int] = []

    def dies_on_second_file(src: Any, fd: int) -> int:
        calls.append(fd)
        if len(calls) == 2:
            os.write(fd, b"half a fi")
            raise KeyboardInterrupt("power cut")
        return real_copy(src, fd)

    monkeypatch.setattr(extract_mod, "_copy_stream", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        extract(archive, target)
    assert (target / "data/a.txt").read_bytes() == b"alpha\n"  # the first member did land
    assert not (target / "data/sub/b.bin").exists()  # the interrupted one never appears under its real name
    assert not list(target.rglob("*.part"))
    assert not marker_path(archive, target).exists()
    assert not is_extracted(archive, target)

    monkeypatch.setattr(extract_mod, "_copy_stream", real_copy)
    result = extract(archive, target)

    assert result.skipped is False
    assert extracted_tree(archive, target) == GOOD_TREE
    assert is_extracted(archive, target)


def test_partial_leftovers_are_overwritten(target: Path) -> None:
    """A run killed outright (no cleanup) leaves no marker, truncated files and ``.part`` files: all get redone."""
    archive = make_tar(target / "a.tar", GOOD)
    extract(archive, target)
    marker_path(archive, target).unlink()
    (target / "data/sub/b.bin").write_bytes(BIN[:100])
    (target / "run.sh.part").write_bytes(b"half")

    result = extract(archive, target)

    assert result.skipped is False
    assert extracted_tree(archive, target) == GOOD_TREE
    assert is_extracted(archive, target)


# --- unsafe archives: refused before anything is written --------------------------------------------------------------

# why each is refused, as the error says it after the member's name
UP = "leaves the target folder ('..')"
ABSOLUTE = "is an absolute path"
LINK_OUT = "is a symlink that leads outside the target folder"
DEVICE = "is a device file or FIFO"
DRIVE = "starts with a Windows drive letter"

UNSAFE: list[tuple[str, list[Entry], str, str]] = [
    ("tar", [("file", "../evil.txt", b"x")], "../evil.txt", UP),
    ("tar", [("file", "/abs.txt", b"x")], "/abs.txt", ABSOLUTE),
    (
        "tar.gz",
        [("file", "ok.txt", b"fine"), ("file", "a/../../evil.txt", b"x")],
        "a/../../evil.txt",
        UP,
    ),
    ("tar", [("symlink", "etc", "/etc")], "etc", "is a symlink to an absolute path (/etc)"),
    ("tar", [("symlink", "up", "../..")], "up", LINK_OUT),
    (
        "tar",
        [("file", "x", b"x"), ("hardlink", "hl", "../x")],
        "hl",
        "is a hard link whose target leaves the target folder",
    ),
    ("tar", [("hardlink", "hl", "/etc/passwd")], "hl", "is a hard link whose target is an absolute path"),
    (
        "zip",
        [("symlink", "d", ".."), ("file", "d/evil.txt", b"x")],
        "d",
        LINK_OUT,
    ),  # the link is refused, not just its use
    # Each link alone looks harmless; together l2 -> l1/.. -> ./.. leaves the folder.
    (
        "tar",
        [("symlink", "l1", "."), ("symlink", "l2", "l1/..")],
        "l2",
        LINK_OUT,
    ),
    # A later link redirects an earlier one: l -> a/.. was inside until a -> . arrived.
    (
        "tgz",
        [("symlink", "l", "a/.."), ("symlink", "a", ".")],
        "l",
        LINK_OUT,
    ),
    (
        "tar",
        [("hardlink", "hl", "later.txt"), ("file", "later.txt", b"x")],
        "hl",
        "is a hard link to 'later.txt', which is not an earlier file in the archive",
    ),
    (
        "tar",
        [("dir", "d/"), ("hardlink", "hl", "d")],
        "hl",
        "is a hard link to 'd', which is not an earlier file in the archive",
    ),  # a hard link to a directory
    ("tar", [("file", "hl", b"x"), ("hardlink", "hl", "hl")], "hl", "is a hard link to itself"),
    ("tar", [("fifo", "pipe")], "pipe", DEVICE),
    ("tar", [("chr", "null")], "null", DEVICE),
    ("zip", [("file", "../evil.txt", b"x")], "../evil.txt", UP),
    ("zip", [("file", "/abs.txt", b"x")], "/abs.txt", ABSOLUTE),
    (
        "zip",
        [("file", "fine.txt", b"x"), ("symlink", "link", "../../x")],
        "link",
        LINK_OUT,
    ),
    ("zip", [("symlink", "link", "/etc/passwd")], "link", "is a symlink to an absolute path (/etc/passwd)"),
    ("zip", [("symlink", "link", "..\\..\\x")], "link", LINK_OUT),
    ("zip", [("file", "..\\evil.txt", b"x")], "..\\evil.txt", UP),
    ("zip", [("file", "dir\\..\\..\\evil.txt", b"x")], "dir\\..\\..\\evil.txt", UP),
    ("zip", [("file", "C:\\evil.txt", b"x")], "C:\\evil.txt", DRIVE),
    ("zip", [("file", "C:/evil.txt", b"x")], "C:/evil.txt", DRIVE),
    (
        "zip",
        [("file", "a", b"x"), ("file", "a/b", b"y")],
        "a/b",
        "needs 'a' to be a directory, but it is a file",
    ),  # a file where a directory must be
]


@pytest.mark.parametrize(("fmt", "entries", "member", "reason"), UNSAFE, ids=[f"{f}:{m}" for f, _, m, _ in UNSAFE])
def test_unsafe_member_is_refused_and_nothing_written(
    tmp_path: Path, target: Path, fmt: str, entries: list[Entry], member: str, reason: str
) -> None:
    (target / "keep.txt").write_bytes(b"already here")
    archive = make_archive(target / f"evil.{fmt}", entries)
    before = tree(tmp_path)

    with pytest.raises(UnsafeArchive) as caught:
        extract(archive, target)

    assert caught.value.member == member
    assert f"member '{member}' {reason}" in str(caught.value)
    assert str(archive) in str(caught.value)
    assert tree(tmp_path) == before  # nothing inside the target, nor next to it
    assert not is_extracted(archive, target)


def test_archive_symlink_to_outside_is_refused_even_for_a_missing_target(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar", [("file", "ok.txt", b"x"), ("symlink", "out", "../../elsewhere")])
    target = tmp_path / "not" / "yet"
    with pytest.raises(UnsafeArchive, match="'out'"):
        extract(archive, target)
    assert not (tmp_path / "not").exists()


@pytest.mark.parametrize("fmt", ["zip", "tar"])  # zip matters: tar also has the stdlib data filter as a backstop
@pytest.mark.parametrize("member", ["out", "out/x.txt", "out/"])
@pytest.mark.parametrize("absolute", [True, False], ids=["abs-link", "rel-link"])
def test_symlink_on_disk_pointing_outside_is_neither_overwritten_nor_followed(
    tmp_path: Path, target: Path, member: str, fmt: str, absolute: bool
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (target / "out").symlink_to(outside if absolute else Path("../../outside"))
    entries: list[Entry] = [("dir", member)] if member.endswith("/") else [("file", member, b"x")]
    archive = make_archive(target / f"a.{fmt}", entries)
    before = tree(tmp_path)

    with pytest.raises(UnsafeArchive, match="outside"):
        extract(archive, target)

    assert tree(tmp_path) == before
    assert (target / "out").is_symlink()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("name", ["a.tar", ".extracted-a.tar.json"])
def test_archive_may_not_overwrite_itself_or_its_marker(target: Path, name: str) -> None:
    archive = make_tar(target / "a.tar", [("file", name, b"overwritten")])
    data = archive.read_bytes()
    with pytest.raises(UnsafeArchive, match="overwrite the archive"):
        extract(archive, target)
    assert archive.read_bytes() == data


def test_file_may_not_replace_a_directory_on_disk(target: Path) -> None:
    (target / "data").mkdir()
    (target / "data" / "mine.txt").write_bytes(b"mine")
    archive = make_zip(target / "a.zip", [("file", "data", b"flat")])
    with pytest.raises(UnsafeArchive, match="replace a directory"):
        extract(archive, target)
    assert (target / "data" / "mine.txt").read_bytes() == b"mine"


# --- links that stay inside are fine ----------------------------------------------------------------------------------


def test_tar_links_that_stay_inside_are_extracted(target: Path) -> None:
    archive = make_tar(
        target / "a.tar",
        [
            ("file", "data/real.txt", b"real"),
            ("symlink", "link.txt", "data/real.txt"),
            ("symlink", "dirlink", "data"),
            ("file", "dirlink/through.txt", b"via link"),  # lands in data/, the link stays a link
            ("hardlink", "hard.txt", "data/real.txt"),
            ("symlink", "data/up", "../link.txt"),
        ],
    )

    result = extract(archive, target)

    assert result.bytes == len(b"real") + len(b"via link")
    assert extracted_tree(archive, target) == {
        "data": "dir",
        "data/real.txt": b"real",
        "data/through.txt": b"via link",
        "data/up": ("link", "../link.txt"),
        "link.txt": ("link", "data/real.txt"),
        "dirlink": ("link", "data"),
        "hard.txt": b"real",
    }
    assert (target / "hard.txt").stat().st_ino == (target / "data/real.txt").stat().st_ino
    assert (target / "data/up").read_bytes() == b"real"
    assert is_extracted(archive, target)


def test_zip_symlink_inside_is_created_as_a_link(target: Path) -> None:
    archive = make_zip(target / "a.zip", [("file", "d/a.txt", b"a"), ("symlink", "d/l", "a.txt")])
    extract(archive, target)
    assert os.readlink(target / "d/l") == "a.txt"
    assert (target / "d/l").read_bytes() == b"a"


@pytest.mark.parametrize("absolute", [True, False], ids=["abs-link", "rel-link"])
def test_symlink_on_disk_pointing_inside_is_replaced_not_written_through(target: Path, absolute: bool) -> None:
    (target / "real.txt").write_bytes(b"untouched")
    (target / "alias.txt").symlink_to(target / "real.txt" if absolute else Path("real.txt"))
    archive = make_zip(target / "a.zip", [("file", "alias.txt", b"from archive")])
    assert extract(archive, target).skipped is False
    assert not (target / "alias.txt").is_symlink()
    assert (target / "alias.txt").read_bytes() == b"from archive"
    assert (target / "real.txt").read_bytes() == b"untouched"


# --- bad input --------------------------------------------------------------------------------------------------------


def test_unsupported_extension_is_a_value_error_naming_the_file(target: Path) -> None:
    archive = target / "images.rar"
    archive.write_bytes(b"Rar!")
    with pytest.raises(ValueError, match=r"images\.rar: unsupported archive type") as caught:
        extract(archive, target)
    assert not isinstance(caught.value, UnsafeArchive | BadArchive)


@pytest.mark.parametrize("link", [False, True], ids=["file", "symlink-to-file"])
def test_a_target_that_is_not_a_directory_is_refused_naming_it(tmp_path: Path, link: bool) -> None:
    archive = make_tar(tmp_path / "a.tar", GOOD)
    target = tmp_path / "coco"
    (tmp_path / "file").write_bytes(b"not a folder")
    if link:
        target.symlink_to(tmp_path / "file")
    else:
        (tmp_path / "file").rename(target)
    with pytest.raises(NotADirectoryError, match=f"^extraction target {re.escape(str(target))} is not a directory$"):
        extract(archive, target)
    assert target.read_bytes() == b"not a folder"
    assert not is_extracted(archive, target)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("fmt", "damage"),
    [
        ("zip", _truncated),
        ("zip", lambda p: p.write_bytes(b"this is not a zip file at all" * 100)),
        ("tar.gz", _truncated),
        ("tgz", lambda p: p.write_bytes(b"\x1f\x8b" + b"garbage" * 100)),
        ("tar", _truncated),
    ],
    ids=["zip-truncated", "zip-garbage", "targz-truncated", "tgz-garbage", "tar-truncated"],
)
def test_corrupt_archive_is_a_clear_error_and_writes_nothing(target: Path, fmt: str, damage: Any) -> None:
    big = os.urandom(300_000)  # incompressible, so truncation lands inside member data
    archive = make_archive(target / f"broken.{fmt}", [("file", "a.bin", big), ("file", "b.bin", big)])
    damage(archive)
    before = tree(target)

    with pytest.raises(BadArchive) as caught:
        extract(archive, target)

    assert str(archive) in str(caught.value)
    assert tree(target) == before
    assert not is_extracted(archive, target)


def test_zip_with_bad_crc_fails_midway_without_marker(target: Path) -> None:
    archive = target / "crc.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", b"first member is fine")
        zf.writestr("b.txt", b"MARKER-PAYLOAD-TO-FLIP")
    data = archive.read_bytes()
    archive.write_bytes(data.replace(b"MARKER-PAYLOAD-TO-FLIP", b"marker-payload-to-flip"))

    with pytest.raises(BadArchive, match=r"crc\.zip: can't read member 'b\.txt'"):
        extract(archive, target)

    assert not marker_path(archive, target).exists()
    assert not (target / "b.txt").exists()
    assert not list(target.glob("*.part"))


def test_encrypted_zip_is_refused_before_writing(target: Path) -> None:
    archive = make_zip(target / "secret.zip", [("file", "a.txt", b"x")])
    # The stdlib can't write ZipCrypto, but readers go by the "encrypted" flag bit: set it in both headers.
    data = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + flags_at] |= 0x1
    archive.write_bytes(bytes(data))
    before = tree(target)
    with pytest.raises(BadArchive, match=r"secret\.zip: member 'a\.txt' is encrypted"):
        extract(archive, target)
    assert tree(target) == before


def test_archive_changing_during_extraction_leaves_no_marker(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_zip(target / "a.zip", GOOD)
    real_copy = extract_mod._copy_stream

    def redownload_meanwhile(src: Any, fd: int) -> int:
        os.utime(archive, (MTIME, MTIME))
        return real_copy(src, fd)

    monkeypatch.setattr(extract_mod, "_copy_stream", redownload_meanwhile)
    with pytest.raises(BadArchive, match="changed while it was being extracted"):
        extract(archive, target)
    assert not marker_path(archive, target).exists()


def test_suffixes_match_the_catalog() -> None:
    """The catalog only lets ``extract: true`` through for suffixes this module can unpack."""
    from mvdata_assets.datasets.catalog import ARCHIVE_SUFFIXES as CATALOG_SUFFIXES

    assert set(ARCHIVE_SUFFIXES) == set(CATALOG_SUFFIXES)


# --- bounds: expansion, free disk, the dataset's own files ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_an_archive_expanding_past_the_ratio_is_refused_before_anything_is_written(target: Path, fmt: str) -> None:
    bomb = target / f"bomb.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(bomb, "w") as zf:
            zf.writestr("zeros.bin", bytes(20 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
    else:
        make_tar(bomb, [("file", "zeros.bin", bytes(20 * 2**20), 0o644)])
    assert bomb.stat().st_size * 100 < 20 * 2**20  # 20 MiB of zeros compress far beyond 100x
    with pytest.raises(ArchiveTooBig, match=r"declare 20,971,520 bytes, [\d,]+ times its [\d,]+ \(the limit is 100: "
                                            r"MVDATA_EXTRACT_MAX_RATIO\); nothing was extracted"):  # fmt: skip
        extract(bomb, target)
    assert sorted(p.name for p in target.iterdir()) == [bomb.name]
    assert extract(bomb, target, max_ratio=4096).bytes == 20 * 2**20  # a user who expects it raises the limit


def test_an_archive_bigger_than_the_free_disk_is_refused(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_zip(target / "big.zip", GOOD)
    real = shutil.disk_usage
    monkeypatch.setattr(placement.shutil, "disk_usage", lambda p: real(p)._replace(free=GOOD_BYTES - 1))
    with pytest.raises(ArchiveTooBig, match=r"it needs 0.00 GiB and 0.00 GiB is free under"):
        extract(archive, target)
    assert sorted(p.name for p in target.iterdir()) == [archive.name]


def test_a_member_named_like_a_file_of_the_catalog_is_refused(target: Path) -> None:
    """The dataset's questions.json was verified; an archive member of that name must not replace it afterwards."""
    (target / "questions.json").write_bytes(b"verified download")
    archive = make_zip(target / "extra.zip", [("file", "./questions.json", b"something else", 0o644)])
    with pytest.raises(UnsafeArchive, match="would overwrite 'questions.json', a file of the dataset's catalog"):
        extract(archive, target, protected=[target / "questions.json", archive])
    assert (target / "questions.json").read_bytes() == b"verified download"
    assert not marker_path(archive, target).exists()

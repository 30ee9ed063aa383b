"""The archive readers refuse members no dataset folder may hold as they list them, naming the archive, the member
and what it is. (Refusals of where a member would land, and that nothing is written, are in test_extract.py.)"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from mvdata_assets.datasets.archives import OpenArchive, UnsafeArchive, archive_kind


def tar_of(path: Path, info: tarfile.TarInfo) -> Path:
    """A tar whose one member is ``info``, without content (devices, FIFOs and unknown types have none)."""
    with tarfile.open(path, "w") as tf:
        tf.addfile(info)
    return path


def zip_of(path: Path, name: str, mode: int, content: bytes = b"") -> Path:
    """A zip whose one member carries ``mode`` (type and permissions) in its Unix attributes."""
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
        info.create_system = 3  # unix, so external_attr carries the mode
        info.external_attr = mode << 16
        zf.writestr(info, content)
    return path


def refusal(archive: Path) -> UnsafeArchive:
    with OpenArchive(archive, archive_kind(archive)) as source, pytest.raises(UnsafeArchive) as caught:
        list(source.members())
    return caught.value


def test_a_tar_block_device_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("sda")
    info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
    archive = tar_of(tmp_path / "disk.tar", info)
    error = refusal(archive)
    assert (error.member, error.reason) == ("sda", "is a device file or FIFO")
    assert str(error) == f"refusing to extract {archive}: member 'sda' is a device file or FIFO; nothing was extracted"


def test_a_tar_member_of_an_unknown_type_is_refused_naming_the_type(tmp_path: Path) -> None:
    info = tarfile.TarInfo("odd")
    info.type = b"Z"  # no tar type: neither a file, a directory, a link nor a device
    archive = tar_of(tmp_path / "odd.tar", info)
    error = refusal(archive)
    assert (error.member, error.reason) == ("odd", "has an unsupported tar type 'Z'")
    assert str(archive) in str(error)


@pytest.mark.parametrize(
    "kind", [stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK], ids=["fifo", "socket", "chr", "blk"]
)
def test_a_zip_fifo_socket_or_device_is_refused(tmp_path: Path, kind: int) -> None:
    archive = zip_of(tmp_path / "special.zip", "special", kind | 0o644)
    error = refusal(archive)
    assert (error.member, error.reason) == ("special", "is a device file, FIFO or socket")
    assert str(archive) in str(error)


def test_a_zip_symlink_with_a_target_longer_than_path_max_is_refused(tmp_path: Path) -> None:
    archive = zip_of(tmp_path / "link.zip", "link", stat.S_IFLNK | 0o777, b"a/" * 2049)  # 4098 bytes
    error = refusal(archive)
    assert (error.member, error.reason) == ("link", "is a symlink with an implausibly long target")
    assert str(archive) in str(error)

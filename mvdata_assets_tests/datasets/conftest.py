"""The loopback file server, as a fixture for every test of the datasets half (and `serve`, a file on it as a download
task), and a port nobody listens on."""

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from mvdata_assets.datasets.fetch import FileTask
from mvdata_assets_tests.datasets.downloading import sha256
from mvdata_assets_tests.datasets.fileserver import FileServer, file_server

__all__ = ["closed_port", "file_server"]


def closed_port() -> int:
    """A loopback port that refuses connections (bound, then released, never listened on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def serve(file_server: FileServer, tmp_path: Path) -> Callable[..., FileTask]:
    """Add `data` under `name` and return the task that fetches it into tmp_path (with size and sha256 by default)."""

    def add(name: str, data: bytes, *, size: bool = True, checksum: bool = True, **kwargs: object) -> FileTask:
        url = file_server.add(name, data, **kwargs)  # type: ignore[arg-type]
        return FileTask(url, tmp_path / "data" / name, len(data) if size else None, sha256(data) if checksum else None)

    return add

"""The loopback file server, as a fixture for every test of the datasets half, and a port nobody listens on."""

import socket

from mvdata_assets_tests.datasets.fileserver import file_server

__all__ = ["closed_port", "file_server"]


def closed_port() -> int:
    """A loopback port that refuses connections (bound, then released, never listened on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

"""The loopback file server, as a fixture for every test of the datasets half."""

from mvdata_assets_tests.datasets.fileserver import file_server

__all__ = ["file_server"]

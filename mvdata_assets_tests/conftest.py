"""Tests run with the project's defaults, whatever the developer's shell exports."""

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

_DEFAULT_HOME = tempfile.mkdtemp(prefix="mvdata-tests-home-")


def pytest_configure() -> None:
    # before any test module imports the Definitions (which read the settings at import)
    for name in list(os.environ):
        if name.startswith(("MVDATA_", "WANDB_")) or name in ("HF_TOKEN", "HF_ENDPOINT"):
            del os.environ[name]
    # download runs are logged to W&B only where a test turns it on (offline, or at a loopback server)
    os.environ["MVDATA_WANDB_TRACKING"] = "off"
    # URL-list images are served on loopback, which third-party URLs may not reach by default
    os.environ["MVDATA_IMAGE_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    # a test that forgets to set MVDATA_HOME writes into a temporary folder, never into the checkout's .mvdata
    os.environ["MVDATA_HOME"] = _DEFAULT_HOME


def pytest_unconfigure() -> None:
    shutil.rmtree(_DEFAULT_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_wandb_service() -> Iterator[None]:
    """A test that uses the SDK in this process leaves WANDB_SERVICE set (the SDK's way of pointing child
    processes at its service); later tests' child processes must start their own, as real jobs do."""
    yield
    os.environ.pop("WANDB_SERVICE", None)

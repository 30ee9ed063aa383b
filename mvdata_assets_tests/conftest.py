"""Tests run with the project's defaults, whatever the developer's shell exports."""

import os


def pytest_configure() -> None:
    # before any test module imports the Definitions (which read the settings at import)
    for name in list(os.environ):
        if name.startswith("MVDATA_") or name in ("HF_TOKEN", "HF_ENDPOINT", "WANDB_API_KEY", "WANDB_BASE_URL"):
            del os.environ[name]

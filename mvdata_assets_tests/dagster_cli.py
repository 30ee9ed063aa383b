"""The project's commands as a user runs them, in a subprocess of this venv: `dagster asset materialize` and
`mvdata demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def materialize(
    module: str, selection: str, env: dict[str, str], cwd: Path = REPO, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """`dagster asset materialize -m module --select selection`, from `cwd`; Dagster writes its log to stderr."""
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", module, "--select", selection]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def run_demo(env: dict[str, str]) -> None:
    """`mvdata demo` into `env`'s MVDATA_HOME, as `make demo` runs it; fails the test when it fails."""
    demo = subprocess.run([str(BIN / "mvdata"), "demo"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]

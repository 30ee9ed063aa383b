"""The project's commands as a user runs them, in a subprocess of this venv: `dagster asset materialize` and
`mvdata demo`; the tests and the benchmarks run them through here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def materialize(
    module: str, selection: str, env: dict[str, str], cwd: Path = REPO, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """`dagster asset materialize -m module --select selection`, from `cwd`; Dagster writes its log to stderr."""
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", module, "--select", selection]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def timed_project_run(selection: str, home: Path, **settings: str) -> float:
    """Seconds of `dagster asset materialize -m mvdata_assets.definitions --select selection` as the benchmarks time
    it: MVDATA_HOME `home` and DAGSTER_HOME inside it, `settings` and none of the user's MVDATA_* ones (a W&B project
    of theirs would be pulled too). Exits with Dagster's log when the run did not succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVDATA_")}
    env |= {"MVDATA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), **settings}
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = materialize("mvdata_assets.definitions", selection, env)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "RUN_SUCCESS" not in done.stderr:
        sys.exit(f"dagster asset materialize --select {selection} failed:\n{done.stderr[-3000:]}")
    return seconds


def run_demo(env: dict[str, str]) -> None:
    """`mvdata demo` into `env`'s MVDATA_HOME, as `make demo` runs it; fails the test when it fails."""
    demo = subprocess.run([str(BIN / "mvdata"), "demo"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]

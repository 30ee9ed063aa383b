"""Real offline runs written once per session by the real wandb SDK (in subprocesses), with truth files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mvdata_assets.demo import wait_for_exit
from mvdata_assets_tests.runs.wandb_server import WandbServer

WRITER = Path(__file__).with_name("sdk_writer.py")
# an offline run written by SDK 0.10.20 (2021): the older layout, with config.yaml and wandb-*.json beside the file
LEGACY_FIXTURE = Path(__file__).with_name("fixtures") / "wandb-offline-2021"

# name -> (scenario, seed); the three `long` runs have distinct run ids (needed where runs are synced together)
JOBS = {
    "edge": ("edge", 0),
    "killed": ("killed", 7),
    "long": ("long", 1),
    "long2": ("long", 2),
    "long3": ("long", 3),
    "failed": ("failed", 4),
}
WRITE_TIMEOUT_S = 180


@dataclass(frozen=True)
class SdkRun:
    name: str
    out_dir: Path  # holds wandb/offline-run-*/ and truth-*.json
    run_dir: Path  # wandb/offline-run-*/
    wandb_file: Path
    truth: dict

    @property
    def run_id(self) -> str:
        return self.truth["run_id"]

    @property
    def project(self) -> str:
        return self.truth["project"]


def writer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def _finish(name: str, out: Path, proc: subprocess.Popen, scenario: str) -> SdkRun:
    try:
        stdout, stderr = proc.communicate(timeout=WRITE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"sdk_writer {name} timed out: {stderr.decode(errors='replace')[-3000:]}") from None
    expected_rc = -signal.SIGKILL if scenario == "killed" else 0
    if proc.returncode != expected_rc:
        raise AssertionError(
            f"sdk_writer {name} exited {proc.returncode} (expected {expected_rc}):\n"
            f"{stdout.decode(errors='replace')[-2000:]}\n{stderr.decode(errors='replace')[-4000:]}"
        )
    truth = json.loads((out / f"truth-{scenario}.json").read_text(encoding="utf-8"))
    wait_for_exit(truth.get("sidecar_pids", []))
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"{name}: expected one run file, found {files}"
    wandb_file = files[0]
    assert wandb_file.name == f"run-{truth['run_id']}.wandb"
    # these runs are shared by every test of the pytest run: guard them against writes
    wandb_file.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return SdkRun(name, out, wandb_file.parent, wandb_file, truth)


@pytest.fixture(scope="session")
def sdk_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SdkRun]:
    """All scenarios, written in parallel subprocesses by the real SDK in offline mode."""
    base = tmp_path_factory.mktemp("sdk_runs")
    procs = {}
    for name, (scenario, seed) in JOBS.items():
        out = base / name
        procs[name] = (
            out,
            subprocess.Popen(
                [sys.executable, str(WRITER), str(out), scenario, str(seed)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=writer_env(),
                cwd=base,
            ),
            scenario,
        )
    return {name: _finish(name, out, proc, scenario) for name, (out, proc, scenario) in procs.items()}


def copy_tree_writable(src: Path, dst: Path) -> Path:
    """Copies a run folder; files keep their modes (read-only stays read-only), folders become writable."""
    shutil.copytree(src, dst, symlinks=True)
    for root, dirs, _ in os.walk(dst):
        for d in dirs:
            p = Path(root) / d
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    Path(dst).chmod(Path(dst).stat().st_mode | stat.S_IWUSR)
    return dst


@pytest.fixture
def legacy_dir(tmp_path: Path) -> Path:
    """A copy of the 2021 fixture (SDK 0.10.20): `legacy/offline-run-20210216_154407-g9dvvkua/...`."""
    if not LEGACY_FIXTURE.is_dir():
        pytest.fail(f"fixture missing: {LEGACY_FIXTURE}")
    return copy_tree_writable(LEGACY_FIXTURE, tmp_path / "legacy")


def place_run_file(folder: Path, data: bytes, run_id: str, tag: str = "copy") -> Path:
    """Writes `data` where an offline run's file lives: folder/wandb/offline-run-<tag>-<id>/run-<id>.wandb."""
    run_dir = folder / "wandb" / f"offline-run-20990101_000000-{tag}-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"run-{run_id}.wandb"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def wandb_server() -> Iterator[WandbServer]:
    """A W&B-compatible server on 127.0.0.1 (ephemeral port), shared by a module's tests: each SDK process that
    talks to it costs ~1 s of wandb-core start-up, so tests use their own projects instead of their own server."""
    with WandbServer() as server:
        yield server

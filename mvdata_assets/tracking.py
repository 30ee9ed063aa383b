"""Logs every dataset download run to Weights & Biases, numbered in order, with each dataset's counts.

One W&B run per download run (a Dagster run, or one `mvdata download`), whatever the executor: the run
number, the W&B run id and every dataset finished so far live in a small state file per download run
under `$MVDATA_HOME/tracking`, behind one file lock, so steps in separate processes share one W&B run
(each resumes it) and the counter is atomic across concurrent download runs. Plain Python: the Dagster
layer passes the Dagster run id and a warning callback.

Tracking never fails a download: no login, no network or any W&B error gives one warning and tracking
stops for that download run while the downloads go on.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from filelock import FileLock

from mvdata_assets.datasets.store import REPORT_COLUMNS, Summary

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

PROJECT = "MicroVLM-E-datasets-logs"
INIT_TIMEOUT_S = 30.0  # wandb.init may take this long to start its run before tracking gives up on it
DEFAULT_BASE_URL = "https://api.wandb.ai"

# W&B runs this process has open, by download run: the in-process executor logs every dataset into one
# run and finishes it after the last; a process that ends early leaves the SDK's exit hook to finish it.
_open_runs: dict[str, Run] = {}
# download runs whose tracking gave up in this process: their other datasets neither retry nor warn again
_given_up: set[str] = set()


@dataclass(frozen=True)
class TrackedRun:
    """Where the W&B run of a download run is, for the materialisation's metadata."""

    number: int
    name: str
    url: str | None  # online
    offline_dir: Path | None  # offline


class RunCounter:
    """The download run number: one integer file, incremented under a file lock (two runs at once get two)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "run_counter"
        self.lock = FileLock(str(folder / ".lock"))

    def current(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def store(self, number: int) -> None:
        """Call with the lock held."""
        _write_by_rename(self.path, f"{number}\n")


def _write_by_rename(path: Path, text: str) -> None:
    """A crash never leaves a half-written counter or state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def wandb_mode() -> str:
    return (os.environ.get("WANDB_MODE") or "online").lower()


def unreachable_reason(base_url: str, timeout_s: float = 3.0) -> str | None:
    """Why the W&B server can't be reached, found in seconds: the SDK itself would retry until its init timeout.
    Where a proxy serves the server's URL (HTTPS_PROXY and the like, as the SDK reads them), the proxy is what a
    connection reaches first, so it is the one tried."""
    parts = urlsplit(base_url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    through = ""
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts, through = urlsplit(proxy if "://" in proxy else f"http://{proxy}"), f" through the proxy {proxy}"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"W&B server {base_url} is unreachable{through} ({exc.strerror or exc})"


def logs_dir(home: Path) -> Path:
    """Where the download runs' W&B logs are written when offline (the SDK adds `wandb/offline-run-*` under it)."""
    return home / "tracking"


class DownloadTracker:
    """The W&B side of one download run; `start` before a dataset's transfers, `record` after them."""

    def __init__(
        self,
        home: Path,
        selected: Sequence[str],
        data_root: Path,
        *,
        warn: Callable[[str], None],
        dagster_run_id: str | None = None,
        project: str = PROJECT,
        entity: str | None = None,
        init_timeout_s: float = INIT_TIMEOUT_S,
    ) -> None:
        self.folder = logs_dir(home)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.counter = RunCounter(self.folder)
        self.dagster_run_id = dagster_run_id
        self.key = dagster_run_id or f"mvdata-download-{uuid.uuid4().hex}"  # a terminal download is one run too
        self.state_path = (
            self.folder / "runs" / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in self.key)}.json"
        )
        self.selected = list(selected)
        self.data_root = data_root
        self.warn = warn
        self.project, self.entity, self.init_timeout_s = project, entity, init_timeout_s

    @property
    def run(self) -> Run | None:
        return _open_runs.get(self.key)

    def start(self) -> TrackedRun | None:
        """Opens (or resumes) the download run's W&B run; the first call of a download run takes its number."""
        if self.key in _given_up:
            return None
        if self.run is None:
            try:
                self._open()
            except Exception as exc:  # noqa: BLE001 - any W&B failure must leave the downloads going
                self._give_up(f"W&B tracking is off for this download run: {type(exc).__name__}: {exc}")
                return None
        return self.tracked() if self.run is not None else None

    def record(self, summary: Summary, bytes_transferred: int) -> TrackedRun | None:
        """Logs a finished dataset and the progress; after the last selected dataset, the summary, then finishes.

        The counts are the dataset's true ones (`store.summarize`): a complete dataset counts nothing as failed.
        """
        if self.start() is None:
            return None
        run = self.run
        try:
            with self.counter.lock:
                state = self._load()
                state["datasets"][summary.dataset] = {"summary": asdict(summary), "bytes": bytes_transferred}
                self._save(state)
            outcomes = [Summary(**d["summary"]) for d in state["datasets"].values()]
            processed = len(outcomes)
            total = max(len(self.selected), processed)
            run.log(self._dataset_metrics(summary, bytes_transferred) | {
                "progress/datasets_processed": processed,
                "progress/total_datasets": total,
                "progress/percentage": 100.0 * processed / total,
            })  # fmt: skip
            tracked = self.tracked()
            if processed >= total:
                self._log_summary(run, outcomes, state["started"])
                run.finish()
                _open_runs.pop(self.key, None)
            return tracked
        except Exception as exc:  # noqa: BLE001 - see start()
            self._give_up(f"W&B tracking stopped for this download run: {type(exc).__name__}: {exc}")
            return None

    def record_failure(self, dataset: str, files: int, est_size_bytes: int | None, seconds: float) -> None:
        """A dataset whose download raised (no disk space, a busy warehouse): logged with every file failed."""
        self.record(Summary(dataset, "failed", 0, files, 0, files, est_size_bytes, 0, seconds), 0)

    def tracked(self) -> TrackedRun:
        run = self.run
        offline = run.offline
        return TrackedRun(
            number=self._load()["number"],
            name=run.name or "",
            url=None if offline else run.url,
            offline_dir=Path(run.dir).parent if offline else None,
        )

    # ---- internals -------------------------------------------------------------------------------------------

    def _open(self) -> None:
        mode = wandb_mode()
        if mode == "disabled":
            self._give_up("W&B tracking is off: WANDB_MODE=disabled")
            return
        if mode != "offline":
            reason = unreachable_reason(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
            if reason:
                self._give_up(f"W&B tracking is off for this download run: {reason}")
                return
        with self.counter.lock:  # held across init so two download runs can't take the same number
            state = self._load_or_none()
            if state is None:
                number = self.counter.current() + 1
                state = {
                    "number": number,
                    "wandb_id": secrets.token_hex(4),
                    "started": time.time(),
                    "key": self.key,
                    "datasets": {},
                }
                _open_runs[self.key] = self._init(state)
                self.counter.store(number)
                self._save(state)
            else:
                _open_runs[self.key] = self._init(state)

    def _init(self, state: dict) -> Run:
        import wandb  # imported when tracking is on: the SDK is slow to import

        number = state["number"]
        return wandb.init(
            mode=wandb_mode(),  # as read here: the SDK's process-wide settings may predate the environment
            project=self.project,
            entity=self.entity,
            id=state["wandb_id"],
            resume="allow",  # steps in other processes of the same download run add to the same W&B run
            name=f"microvlme-datasets-{number}log",
            dir=str(self.folder),
            job_type="dataset_download",
            tags=["dataset_download", f"run_{number}"],
            config={
                "run_number": number,
                "data_root": str(self.data_root),
                "datasets": self.selected or "all",
                "dagster_run_id": self.dagster_run_id,
                "timestamp": datetime.fromtimestamp(state["started"], UTC).isoformat(),
            },
            reinit="create_new",  # never take over, or finish, a W&B run the caller has open
            settings=wandb.Settings(init_timeout=self.init_timeout_s, silent=True, console="off"),
        )

    @staticmethod
    def _dataset_metrics(summary: Summary, bytes_transferred: int) -> dict[str, Any]:
        prefix = f"dataset/{summary.dataset}/"
        return {
            prefix + "downloaded": summary.downloaded,
            prefix + "failed": summary.failed,
            prefix + "skipped": summary.skipped,
            prefix + "total": summary.total,
            prefix + "success_rate": summary.success_rate,
            prefix + "bytes": bytes_transferred,
            prefix + "seconds": summary.seconds,
        }

    @staticmethod
    def _log_summary(run: Run, outcomes: list[Summary], started: float) -> None:
        import wandb

        duration = time.time() - started
        downloaded = sum(o.downloaded for o in outcomes)
        failed = sum(o.failed for o in outcomes)
        skipped = sum(o.skipped for o in outcomes)
        attempted = sum(o.total for o in outcomes)
        statuses = [o.status for o in outcomes]
        rows = [list(o.report_row()) for o in sorted(outcomes, key=lambda o: o.dataset)]
        run.log({
            "summary/total_files_downloaded": downloaded,
            "summary/total_files_failed": failed,
            "summary/total_files_skipped": skipped,
            "summary/total_files_attempted": attempted,
            "summary/overall_success_rate": (downloaded + skipped) / attempted if attempted else 0.0,
            "summary/duration_seconds": duration,
            "summary/duration_minutes": duration / 60,
            "summary/fully_downloaded_datasets": statuses.count("complete"),
            "summary/partially_downloaded_datasets": statuses.count("partial"),
            "summary/failed_datasets": statuses.count("failed"),
            "summary/skipped_special_access": statuses.count("manual"),
            "summary/timestamp": datetime.now(UTC).isoformat(),
            "dataset_summary": wandb.Table(columns=list(REPORT_COLUMNS), data=rows),
        })  # fmt: skip

    def _give_up(self, reason: str) -> None:
        if self.key not in _given_up:
            _given_up.add(self.key)
            self.warn(reason)

    def _load_or_none(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None

    def _load(self) -> dict:
        state = self._load_or_none()
        if state is None:
            raise RuntimeError(f"tracking state {self.state_path} is gone")
        return state

    def _save(self, state: dict) -> None:
        _write_by_rename(self.state_path, json.dumps(state))

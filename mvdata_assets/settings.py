"""Every MVDATA_* setting, read from the environment in one place."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mvdata_assets import defaults
from mvdata_assets.datasets.addresses import check_network
from mvdata_assets.runs.wandb_api import split_project

WEEK_S = 7 * 24 * 3600.0
MOST_AT_ONCE = 4096  # more transfers or requests at once than any machine here gains from


def _float(name: str, default: float, *, unit: str = "seconds", most: float = WEEK_S) -> float:
    """A positive, finite duration up to `most`: a negative lock timeout would wait forever, 0 s would fail every
    transfer at once, NaN compares false with everything."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value <= most):
        raise ValueError(f"{name} must be a number of {unit} above 0 and at most {most:g}, got {raw!r}")
    return value


def _count(name: str, default: int, most: int = MOST_AT_ONCE, least: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if not raw.strip().isdigit() or not least <= int(raw) <= most:
        raise ValueError(f"{name} must be a whole number from {least} to {most}, got {raw!r}")
    return int(raw)


def _switch(name: str, default: str) -> bool:
    raw = (os.environ.get(name) or default).lower()
    if raw not in ("1", "on", "true", "0", "off", "false"):
        raise ValueError(f"{name} must be on or off, got {raw!r}")
    return raw in ("1", "on", "true")


def _list(name: str, default: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in (os.environ.get(name) or default).split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    home: Path
    wandb_offline_dirs: tuple[Path, ...]
    running_window_s: float
    lock_timeout_s: float
    data_root: Path
    catalog: Path | None  # None: the bundled catalog
    download_concurrency: int
    image_concurrency: int  # URL-list images in flight at once
    image_host_connections: int  # ... of which at most this many to one host
    image_timeout_s: float  # an image transfer that receives nothing for this long fails as `timeout`
    image_allowed_networks: tuple[str, ...]  # URL-list images may reach these networks besides public addresses
    image_part_shards: int  # > 0: URL-list images as a partitioned asset, this many shards a partition (0: one step)
    extract_max_ratio: int  # an archive expanding to more than this many times its size is refused
    sensor_interval_s: int
    sensor_enabled: bool  # on by default when a W&B source is configured
    tracking_enabled: bool  # log each download run to W&B (the SDK's WANDB_MODE picks online / offline)
    wandb_projects: tuple[str, ...]  # entity/project pulled from the W&B API
    api_states: tuple[str, ...]  # API filters: run states, tags (any of), created since (ISO, UTC)
    api_tags: tuple[str, ...]
    api_created_since: str | None
    api_concurrency: int
    api_timeout_s: float  # one W&B request, retries included
    leaderboard_metrics: tuple[str, ...]  # glob patterns of the main metrics
    leaderboard_config: tuple[str, ...]  # config keys to show; none: those that differ between runs
    run_dataset_keys: tuple[str, ...]  # config keys naming the datasets a run trained on
    wandb_freshness_h: float  # wandb/runs is overdue when no sync for this long
    git_url: str | None  # the repository the project is pushed to: assets link to their code there
    git_branch: str

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def exports(self) -> Path:
        return self.home / "exports"


def load_settings() -> Settings:
    home = Path(os.environ.get("MVDATA_HOME") or ".mvdata").expanduser().absolute()
    dirs = tuple(
        Path(p).expanduser().absolute() for p in os.environ.get("MVDATA_WANDB_OFFLINE_DIRS", "").split(":") if p
    )
    projects = _list("MVDATA_WANDB_PROJECTS", "")
    for path in projects:
        split_project(path)
    return Settings(
        home=home,
        wandb_offline_dirs=dirs,
        # a run with no exit record counts as running while its file changed this recently
        running_window_s=_float("MVDATA_WANDB_RUNNING_WINDOW_S", defaults.RUNNING_WINDOW_S),
        lock_timeout_s=_float("MVDATA_WAREHOUSE_LOCK_TIMEOUT_S", defaults.LOCK_TIMEOUT_S),
        data_root=Path(os.environ.get("MVDATA_DATA_ROOT") or home / "datasets").expanduser().absolute(),
        catalog=Path(os.environ["MVDATA_CATALOG"]).expanduser().absolute()
        if os.environ.get("MVDATA_CATALOG")
        else None,
        download_concurrency=_count("MVDATA_DOWNLOAD_CONCURRENCY", defaults.DOWNLOAD_CONCURRENCY),
        image_concurrency=_count("MVDATA_IMAGE_CONCURRENCY", defaults.IMAGE_CONCURRENCY),
        image_host_connections=_count("MVDATA_IMAGE_HOST_CONNECTIONS", defaults.IMAGE_HOST_CONNECTIONS),
        image_timeout_s=_float("MVDATA_IMAGE_TIMEOUT_S", defaults.IMAGE_TIMEOUT_S),
        extract_max_ratio=_count("MVDATA_EXTRACT_MAX_RATIO", defaults.EXTRACT_MAX_RATIO),
        image_allowed_networks=tuple(map(check_network, _list("MVDATA_IMAGE_ALLOWED_NETWORKS", ""))),
        image_part_shards=_count("MVDATA_IMAGE_PART_SHARDS", 0, least=0),  # 0: images in the dataset's own step
        # Dagster's minimum_interval_seconds is a whole number: 0.5 would become 0, a sensor ticking without pause
        sensor_interval_s=_count("MVDATA_WANDB_SENSOR_INTERVAL_S", 30, most=int(WEEK_S)),
        sensor_enabled=_switch(
            "MVDATA_WANDB_SENSOR", "on" if dirs or os.environ.get("MVDATA_WANDB_PROJECTS") else "off"
        ),
        tracking_enabled=_switch("MVDATA_WANDB_TRACKING", "on"),
        wandb_projects=projects,
        api_states=_list("MVDATA_WANDB_API_STATES", ""),
        api_tags=_list("MVDATA_WANDB_API_TAGS", ""),
        api_created_since=os.environ.get("MVDATA_WANDB_API_CREATED_SINCE") or None,
        api_concurrency=_count("MVDATA_WANDB_API_CONCURRENCY", defaults.API_CONCURRENCY),
        api_timeout_s=_float("MVDATA_WANDB_API_TIMEOUT_S", defaults.API_TIMEOUT_S),
        leaderboard_metrics=_list("MVDATA_LEADERBOARD_METRICS", "*loss*,*acc,*accuracy*,*f1*,*bleu*,*cider*"),
        leaderboard_config=_list("MVDATA_LEADERBOARD_CONFIG", ""),
        wandb_freshness_h=_float("MVDATA_WANDB_FRESHNESS_H", 24.0, unit="hours", most=24 * 365),
        git_url=os.environ.get("MVDATA_GIT_URL") or None,
        git_branch=os.environ.get("MVDATA_GIT_BRANCH") or "main",
        run_dataset_keys=_list(
            "MVDATA_RUN_DATASET_KEYS", "data.datasets,data.dataset,data.data_root,datasets,dataset,data_root"
        ),
    )

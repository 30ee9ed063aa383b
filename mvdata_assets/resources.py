"""The project's Dagster resources, filled from the MVDATA_* settings when the definitions load.

Assets and sensors read their settings from resources, not from the environment: each run-time setting is a field of
a resource here, so the launchpad shows it and a run may override it (`resources: {datasets: {config:
{image_timeout_s: 30}}}`), within the same bounds as the environment variable (`settings.py`). Each field's default
is the environment's value as loaded here, because Dagster builds a run's resource from its class defaults plus the
run's config: a run that overrides one field keeps the others as the environment set them. `EnvVar`s are not used:
one has no default (an unset variable fails the run) and cannot hold a list or a float. Settings that shape the
definitions (catalog, sensors, freshness, image parts, git links) are read when they load; credentials (HF_TOKEN,
W&B's own) stay in the environment, so that the launchpad never shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from mvdata_assets.datasets.addresses import check_network
from mvdata_assets.datasets.download import ImageOptions
from mvdata_assets.runs.api import ApiFilters
from mvdata_assets.settings import MOST_AT_ONCE, WEEK_S, Settings, load_settings
from mvdata_assets.tracking import INIT_TIMEOUT_S, PROJECT, DownloadTracker, logs_dir
from mvdata_assets.warehouse import WarehouseIOManager, WarehouseResource


def datasets_fields(settings: Settings) -> dict[str, Any]:
    return {
        "data_root": str(settings.data_root),
        "download_concurrency": settings.download_concurrency,
        "image_concurrency": settings.image_concurrency,
        "image_host_connections": settings.image_host_connections,
        "image_timeout_s": settings.image_timeout_s,
        "extract_max_ratio": settings.extract_max_ratio,
        "image_allowed_networks": list(settings.image_allowed_networks),
    }


def wandb_fields(settings: Settings) -> dict[str, Any]:
    return {
        "offline_dirs": [str(d) for d in settings.wandb_offline_dirs],
        "running_window_s": settings.running_window_s,
        "projects": list(settings.wandb_projects),
        "api_states": list(settings.api_states),
        "api_tags": list(settings.api_tags),
        "api_created_since": settings.api_created_since,
        "api_concurrency": settings.api_concurrency,
        "api_timeout_s": settings.api_timeout_s,
        "leaderboard_metrics": list(settings.leaderboard_metrics),
        "leaderboard_config": list(settings.leaderboard_config),
        "run_dataset_keys": list(settings.run_dataset_keys),
        "exports_dir": str(settings.exports),
        "cache_dir": str(settings.home / "cache"),
    }


# the one load per process: the resources' defaults here, the sensors' schedule and the definitions' shape
LOADED_SETTINGS = load_settings()
DATASETS, WANDB = datasets_fields(LOADED_SETTINGS), wandb_fields(LOADED_SETTINGS)


def _setting(variable: str, what: str, default: Any) -> Any:
    return Field(default=default, description=f"{variable}: {what}")


def _count(variable: str, what: str, default: int) -> Any:
    return Field(default=default, ge=1, le=MOST_AT_ONCE, description=f"{variable}: {what}")


def _seconds(variable: str, what: str, default: float) -> Any:
    return Field(default=default, gt=0, le=WEEK_S, description=f"{variable}: {what} (seconds)")


class DatasetsResource(ConfigurableResource):
    """Where the datasets go and how their files and URL-list images are fetched."""

    data_root: str = _setting("MVDATA_DATA_ROOT", "a folder per dataset under it", DATASETS["data_root"])
    download_concurrency: int = _count(
        "MVDATA_DOWNLOAD_CONCURRENCY", "transfers in flight at once", DATASETS["download_concurrency"]
    )
    image_concurrency: int = _count(
        "MVDATA_IMAGE_CONCURRENCY", "URL-list images in flight at once", DATASETS["image_concurrency"]
    )
    image_host_connections: int = _count(
        "MVDATA_IMAGE_HOST_CONNECTIONS", "of which at most this many to one host", DATASETS["image_host_connections"]
    )
    image_timeout_s: float = _seconds(
        "MVDATA_IMAGE_TIMEOUT_S", "an image receiving nothing this long fails", DATASETS["image_timeout_s"]
    )
    image_allowed_networks: list[str] = _setting(
        "MVDATA_IMAGE_ALLOWED_NETWORKS",
        "networks images may reach besides public addresses",
        DATASETS["image_allowed_networks"],
    )
    extract_max_ratio: int = _count(
        "MVDATA_EXTRACT_MAX_RATIO",
        "an archive expanding past this many times its size is refused",
        DATASETS["extract_max_ratio"],
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetsResource:
        return cls(**datasets_fields(settings))

    def image_options(self, retry_failed: bool) -> ImageOptions:
        return ImageOptions(self.image_concurrency, self.image_host_connections, self.image_timeout_s, retry_failed,
                            tuple(map(check_network, self.image_allowed_networks)))  # fmt: skip


class WandbResource(ConfigurableResource):
    """Where the W&B runs come from (offline folders, API projects) and what the derived tables show."""

    offline_dirs: list[str] = _setting(
        "MVDATA_WANDB_OFFLINE_DIRS", "folders searched for offline runs", WANDB["offline_dirs"]
    )
    running_window_s: float = _seconds(
        "MVDATA_WANDB_RUNNING_WINDOW_S",
        "a run without an exit record is running while its file changed this recently",
        WANDB["running_window_s"],
    )
    projects: list[str] = _setting("MVDATA_WANDB_PROJECTS", "entity/project pulled from the W&B API", WANDB["projects"])
    api_states: list[str] = _setting(
        "MVDATA_WANDB_API_STATES", "only runs in these states (none: all)", WANDB["api_states"]
    )
    api_tags: list[str] = _setting(
        "MVDATA_WANDB_API_TAGS", "only runs with any of these tags (none: all)", WANDB["api_tags"]
    )
    api_created_since: str | None = _setting(
        "MVDATA_WANDB_API_CREATED_SINCE", "ISO date, UTC", WANDB["api_created_since"]
    )
    api_concurrency: int = _count("MVDATA_WANDB_API_CONCURRENCY", "W&B API requests at once", WANDB["api_concurrency"])
    api_timeout_s: float = _seconds(
        "MVDATA_WANDB_API_TIMEOUT_S", "one W&B request, retries included", WANDB["api_timeout_s"]
    )
    leaderboard_metrics: list[str] = _setting(
        "MVDATA_LEADERBOARD_METRICS", "glob patterns of the main metrics", WANDB["leaderboard_metrics"]
    )
    leaderboard_config: list[str] = _setting(
        "MVDATA_LEADERBOARD_CONFIG",
        "config keys shown (none: those that differ between runs)",
        WANDB["leaderboard_config"],
    )
    run_dataset_keys: list[str] = _setting(
        "MVDATA_RUN_DATASET_KEYS", "config keys naming a run's datasets", WANDB["run_dataset_keys"]
    )
    exports_dir: str = _setting("MVDATA_HOME", "exports/ under it: the parquet exports", WANDB["exports_dir"])
    cache_dir: str = _setting(
        "MVDATA_HOME", "cache/ under it: pictures redrawn only when the warehouse changed", WANDB["cache_dir"]
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> WandbResource:
        return cls(**wandb_fields(settings))

    @property
    def offline_paths(self) -> list[Path]:
        return [Path(d) for d in self.offline_dirs]

    @property
    def api_filters(self) -> ApiFilters:
        return ApiFilters(tuple(self.api_states), tuple(self.api_tags), self.api_created_since)


class DownloadTrackingResource(ConfigurableResource):
    """Logs each Dagster run that downloads datasets as one W&B run; WANDB_MODE picks online or offline."""

    enabled: bool = _setting("MVDATA_WANDB_TRACKING", "log each download run to W&B", LOADED_SETTINGS.tracking_enabled)
    home: str = _setting(
        "MVDATA_HOME", "tracking/ under it: the run counter and the offline W&B folders", str(LOADED_SETTINGS.home)
    )
    project: str = PROJECT
    entity: str | None = None
    init_timeout_s: float = INIT_TIMEOUT_S

    @property
    def logs_dir(self) -> Path:
        return logs_dir(Path(self.home))

    def tracker(
        self, dagster_run_id: str, selected: Sequence[str], data_root: str, warn: Callable[[str], None]
    ) -> DownloadTracker | None:
        if not self.enabled:
            return None  # no W&B run, and the run counter stays as it is
        return DownloadTracker(
            Path(self.home),
            selected,
            Path(data_root),
            warn=warn,
            dagster_run_id=dagster_run_id,
            project=self.project,
            entity=self.entity,
            init_timeout_s=self.init_timeout_s,
        )


def project_resources(settings: Settings) -> dict[str, Any]:
    """Every resource the project's assets and sensors use, for these settings."""
    warehouse = WarehouseResource(database=str(settings.warehouse), lock_timeout_s=settings.lock_timeout_s)
    return {
        "warehouse": warehouse,
        "datasets": DatasetsResource.from_settings(settings),
        "wandb": WandbResource.from_settings(settings),
        "tracking": DownloadTrackingResource(enabled=settings.tracking_enabled, home=str(settings.home)),
        # downstream assets (the project's and a user's own) load the tables, exports and datasets through it
        "io_manager": WarehouseIOManager(
            warehouse=warehouse, exports_dir=str(settings.exports), data_root=str(settings.data_root)
        ),
    }

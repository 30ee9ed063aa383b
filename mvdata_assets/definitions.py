"""The one Definitions object of the project."""

from __future__ import annotations

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from mvdata_assets.datasets.assets import GROUP as DATASETS_GROUP
from mvdata_assets.datasets.assets import DownloadTrackingResource, dataset_assets
from mvdata_assets.runs.assets import GROUP as WANDB_GROUP
from mvdata_assets.runs.assets import wandb_assets, wandb_checks
from mvdata_assets.runs.sensors import wandb_api_runs, wandb_offline_runs
from mvdata_assets.settings import load_settings
from mvdata_assets.warehouse import WarehouseIOManager, WarehouseResource

settings = load_settings()
warehouse = WarehouseResource(database=str(settings.warehouse), lock_timeout_s=settings.lock_timeout_s)

wandb_sync_job = define_asset_job("wandb_sync", selection=f"group:{WANDB_GROUP}")
datasets_job = define_asset_job("datasets_download", selection=f"group:{DATASETS_GROUP}")
# runs the assets' automation conditions (exports, leaderboard, download summary follow their upstream);
# Dagster's default automation sensor starts stopped, this one starts running
automation = AutomationConditionSensorDefinition(
    "mvdata_automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING
)
main_job = define_asset_job("mvdata_main", selection="*", description="Both halves: every dataset and W&B asset.")

defs = Definitions(
    assets=[*dataset_assets(), *wandb_assets],
    asset_checks=wandb_checks,
    jobs=[main_job, wandb_sync_job, datasets_job],
    sensors=[wandb_offline_runs, wandb_api_runs, automation],
    resources={
        "warehouse": warehouse,
        "tracking": DownloadTrackingResource(enabled=settings.tracking_enabled),
        # downstream assets (the project's and a user's own) load the tables, exports and datasets through it
        "io_manager": WarehouseIOManager(
            warehouse=warehouse, exports_dir=str(settings.exports), data_root=str(settings.data_root)
        ),
    },
    # small steps over one local DuckDB file: a process per step would cost ~5 s each for nothing
    executor=in_process_executor,
)

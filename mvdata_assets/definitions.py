"""The one Definitions object of the project."""

from __future__ import annotations

from dagster import Definitions, define_asset_job, in_process_executor

from mvdata_assets.runs.assets import GROUP as WANDB_GROUP
from mvdata_assets.runs.assets import wandb_assets, wandb_checks
from mvdata_assets.settings import load_settings
from mvdata_assets.warehouse import WarehouseResource

settings = load_settings()

wandb_sync_job = define_asset_job("wandb_sync", selection=f"group:{WANDB_GROUP}")

defs = Definitions(
    assets=wandb_assets,
    asset_checks=wandb_checks,
    jobs=[wandb_sync_job],
    resources={
        "warehouse": WarehouseResource(database=str(settings.warehouse), lock_timeout_s=settings.lock_timeout_s)
    },
    # small steps over one local DuckDB file: a process per step would cost ~5 s each for nothing
    executor=in_process_executor,
)

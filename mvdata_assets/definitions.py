"""The one Definitions object of the project."""

from __future__ import annotations

from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

from dagster import (
    AnchorBasedFilePathMapping,
    AssetKey,
    AssetSelection,
    AssetSpec,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    ExecutorDefinition,
    FreshnessPolicy,
    define_asset_job,
    in_process_executor,
    link_code_references_to_git,
    with_source_code_references,
)

from mvdata_assets.datasets.assets import GROUP as DATASETS_GROUP
from mvdata_assets.datasets.assets import dataset_assets, dataset_key
from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets.resources import LOADED_SETTINGS, project_resources
from mvdata_assets.runs.assets import GROUP as WANDB_GROUP
from mvdata_assets.runs.assets import build_run_datasets_asset, wandb_assets, wandb_checks
from mvdata_assets.runs.sensors import wandb_api_runs, wandb_offline_runs

settings = LOADED_SETTINGS  # what shapes the definitions: catalog, image parts, freshness, git links

catalog = load_catalog(settings.catalog)
datasets = dataset_assets(catalog, settings.image_part_shards)
catalog_keys = [dataset_key(name) for name in catalog]
# URL-list images in parts are partitioned: backfills run them (one job each, for `dagster job backfill`), never the
# jobs over unpartitioned assets
image_part_keys = [key for assets_def in datasets if assets_def.partitions_def for key in assets_def.keys]
image_parts = AssetSelection.assets(*image_part_keys)
image_jobs = [define_asset_job(key.path[-1], selection=AssetSelection.assets(key)) for key in image_part_keys]

WRITES_WAREHOUSE = {"mvdata/warehouse": "write"}  # cluster/dagster.yaml runs such jobs one at a time
wandb_sync_job = define_asset_job("wandb_sync", selection=f"group:{WANDB_GROUP}", tags=WRITES_WAREHOUSE)
datasets_job = define_asset_job(
    "datasets_download", selection=AssetSelection.groups(DATASETS_GROUP) - image_parts, tags=WRITES_WAREHOUSE
)
# runs the assets' automation conditions (exports, leaderboard, download summary follow their upstream);
# Dagster's default automation sensor starts stopped, this one starts running
automation = AutomationConditionSensorDefinition(
    "mvdata_automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING
)
main_job = define_asset_job(
    "mvdata_main",
    selection=AssetSelection.all() - image_parts,
    description="Both halves: every dataset and W&B asset.",
    tags=WRITES_WAREHOUSE,
)

CODE_VERSION = version("mvdata_assets")  # the engines' logic changes with the package's releases


def with_conventions(spec: AssetSpec) -> AssetSpec:
    """What a Dagster user looks for on every asset: owner, source tag, code version; `wandb/runs` has a freshness
    policy (MVDATA_WANDB_FRESHNESS_H: overdue when no sync for that long)."""
    freshness = (
        FreshnessPolicy.time_window(fail_window=timedelta(hours=settings.wandb_freshness_h))
        if spec.key == AssetKey(["wandb", "runs"])
        else spec.freshness_policy
    )
    return spec.replace_attributes(
        owners=["team:microvlm-e"],
        tags={**spec.tags, "mvdata/source": spec.key.path[0]},
        code_version=CODE_VERSION,
        freshness_policy=freshness,
    )


project_assets = with_source_code_references([*datasets, *wandb_assets, build_run_datasets_asset(catalog_keys)])
if settings.git_url:  # links from each asset to its code in the repository the project is pushed to
    project_assets = link_code_references_to_git(
        project_assets,
        git_url=settings.git_url,
        git_branch=settings.git_branch,
        file_path_mapping=AnchorBasedFilePathMapping(
            local_file_anchor=Path(__file__).parent, file_anchor_path_in_repository="mvdata_assets"
        ),
    )


def project_definitions(executor: ExecutorDefinition = in_process_executor) -> Definitions:
    """The project's definitions with `executor`: in-process by default, because its steps are small and share one
    local DuckDB file (a process per step costs more than most steps); a user's module may pass `multiprocess_executor`
    (datasets downloaded side by side) or a distributed one."""
    return Definitions(
        assets=project_assets,
        asset_checks=wandb_checks,
        jobs=[main_job, wandb_sync_job, datasets_job, *image_jobs],
        sensors=[wandb_offline_runs, wandb_api_runs, automation],
        resources=project_resources(settings),
        executor=executor,
    ).map_asset_specs(func=with_conventions)


defs = project_definitions()

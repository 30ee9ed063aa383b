"""A user's own module, as README's "Build on it" shows: the project's definitions and assets of one's own that
take its W&B tables (as a DataFrame, an Arrow table, a lazy relation) and a dataset (as a manifest) as inputs.

    dagster asset materialize -m mvdata_assets_tests.user_project --select 'group:analysis'
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
from dagster import AssetIn, Definitions, asset

from mvdata_assets import definitions as project
from mvdata_assets.warehouse import DatasetManifest, WarehouseTable


@asset(key_prefix="analysis", group_name="analysis", ins={"runs": AssetIn(key=["wandb", "runs"])})
def runs_per_state(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.groupby("state", as_index=False).size().rename(columns={"size": "runs"})


@asset(key_prefix="analysis", group_name="analysis", ins={"history": AssetIn(key=["wandb", "history"])})
def best_loss(history: WarehouseTable) -> pd.DataFrame:
    """Aggregated inside DuckDB: the history is never loaded into Python."""
    with history.relation() as rel:
        best = rel.filter("key = 'train/loss' AND isfinite(value)").aggregate("run_id, min(value) AS best_loss")
        return best.order("run_id").df()


@asset(
    key_prefix="analysis",
    group_name="analysis",
    ins={"settings": AssetIn(key=["wandb", "config"], metadata={"columns": ["run_id", "key"]})},
)
def config_keys(settings: pa.Table) -> pa.Table:
    """Only the columns asked for are read (`config` is Dagster's own parameter name: an input can't have it)."""
    return settings.group_by("key").aggregate([("run_id", "count_distinct")]).sort_by("key")


@asset(key_prefix="analysis", group_name="analysis", ins={"coco": AssetIn(key=["datasets", "demo_coco"])})
def coco_files(coco: DatasetManifest) -> pd.DataFrame:
    return pd.DataFrame(
        {"path": [f.path for f in coco.files], "sha256": [f.sha256 for f in coco.files], "status": coco.status}
    )


defs = Definitions.merge(project.defs, Definitions(assets=[runs_per_state, best_loss, config_keys, coco_files]))

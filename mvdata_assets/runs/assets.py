"""Dagster wiring for the W&B half: tables filled by the offline sync engine, and parquet exports."""

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    AutomationCondition,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
    multi_asset,
    multi_asset_check,
)

from mvdata_assets import charts
from mvdata_assets.resources import WandbResource
from mvdata_assets.runs import exports, leaderboard, run_datasets, store
from mvdata_assets.runs.api import ApiSyncReport, sync_api
from mvdata_assets.runs.checks import check_history
from mvdata_assets.runs.offline import SyncReport, sync_offline
from mvdata_assets.runs.store import SCHEMA, generation
from mvdata_assets.runs.wandb_api import Client
from mvdata_assets.tracking import PROJECT as DOWNLOAD_LOGS
from mvdata_assets.warehouse import WarehouseResource, declared_table, table_metadata

GROUP = "wandb"
TABLES = ("runs", *store.RUN_TABLES)


# downstream of the tables, these follow every sync by themselves (the automation sensor must be running)
FOLLOW_UPSTREAM = AutomationCondition.eager()
METRIC_PANELS = 4  # main metrics drawn on wandb/history's picture, a panel each


def table_key(name: str) -> AssetKey:
    return AssetKey([GROUP, name])


def export_key(name: str) -> AssetKey:
    return AssetKey([GROUP, "exports", name])


class SyncConfig(Config):
    force_refresh: bool = False
    """Re-read every run file from its start instead of from where the last sync stopped."""


class ExportConfig(Config):
    force_rewrite: bool = False


def _table_metadata(conn, table: str) -> dict:
    # wandb.history is a view joining its rows to their run and key names: counted through it, every row is joined
    metadata = table_metadata(conn, SCHEMA, table, "_history" if table == "history" else None)
    preview = conn.execute(f"SELECT * FROM {SCHEMA}.{table} LIMIT 5").fetchall()
    columns = [c.name for c in metadata["dagster/column_schema"].columns]
    return {**metadata, "preview": MetadataValue.md(charts.markdown_table(columns, preview, width=40))}


def warehouse_version(conn) -> DataVersion:
    """The W&B tables' data version: the warehouse's sync generation, moved only by a sync that changed something,
    so a re-run that changed nothing leaves everything downstream fresh."""
    return DataVersion(f"generation-{generation(conn)}")


def _sync_metadata(offline: SyncReport, api: ApiSyncReport) -> dict:
    return {
        "runs_new": MetadataValue.int(offline.count("new") + api.count("new")),
        "runs_updated": MetadataValue.int(offline.count("grown", "replaced", "refreshed") + api.count("updated")),
        "runs_unchanged": MetadataValue.int(offline.count("unchanged") + api.count("unchanged")),
        "runs_deleted_upstream": MetadataValue.int(api.count("deleted")),
        "runs_marked_crashed": MetadataValue.int(offline.marked_crashed),
        "bytes_read": MetadataValue.int(offline.bytes_read),
        "api_requests_for_runs": MetadataValue.int(sum(r.requests for r in api.runs)),
        "seconds": MetadataValue.float(round(offline.seconds + api.seconds, 3)),
        "problems": MetadataValue.json(offline.problems + api.problems),
    }


@multi_asset(
    specs=[
        AssetSpec(
            table_key(t),
            group_name=GROUP,
            kinds={"duckdb", "wandb"},
            description=f"{SCHEMA}.{t}",
            metadata=declared_table(SCHEMA, t),
        )
        for t in TABLES
    ],
    # any selection runs it (`+wandb/leaderboard`, "Materialize" with upstream in the UI); one sync fills every
    # table whichever are selected, and reports the selected ones
    can_subset=True,
    description="Syncs every run under MVDATA_WANDB_OFFLINE_DIRS and of the MVDATA_WANDB_PROJECTS on the W&B API "
    "into the warehouse, incrementally.",
)
def wandb_tables(
    context: AssetExecutionContext, config: SyncConfig, warehouse: WarehouseResource, wandb: WandbResource
):
    with warehouse.get_connection() as conn:
        offline = sync_offline(
            conn,
            wandb.offline_paths,
            force_refresh=config.force_refresh,
            running_window_s=wandb.running_window_s,
        )
        api = sync_api(
            conn,
            wandb.projects,
            filters=wandb.api_filters,
            force_refresh=config.force_refresh,
            concurrency=wandb.api_concurrency,
            client_factory=partial(Client, wandb.api_timeout_s),
            log=context.log.info,
        )
        for problem in offline.problems + api.problems:
            context.log.warning(problem)
        crashed = offline.marked_crashed
        context.log.info(
            f"{len(offline.files)} run files: {offline.count('new')} new, "
            f"{offline.count('grown', 'replaced', 'refreshed')} updated, {offline.count('unchanged')} unchanged; "
            f"{offline.bytes_read} bytes in {offline.seconds:.2f} s"
            + (f"; marked crashed, quiet past the running window: {crashed}" if crashed else "")
        )
        if wandb.projects:
            context.log.info(
                f"W&B API: {len(api.runs)} runs: {api.count('new')} new, {api.count('updated')} updated, "
                f"{api.count('unchanged')} unchanged, {api.count('deleted')} deleted upstream, "
                f"{api.count('failed')} failed, in {api.seconds:.2f} s"
            )
        shared = _sync_metadata(offline, api)
        version = warehouse_version(conn)
        for table in TABLES:
            if table_key(table) not in context.selected_asset_keys:
                continue
            rows = offline.rows.get(table, 0) + api.rows.get(table, 0)
            yield MaterializeResult(
                asset_key=table_key(table),
                data_version=version,
                metadata={
                    **shared,
                    "rows_written": MetadataValue.int(rows),
                    **_table_metadata(conn, table),
                    **(_curves_metadata(conn, wandb) if table == "history" else {}),
                },
            )


def _curves_metadata(conn, wandb: WandbResource) -> dict:
    """The main metrics of the latest runs as a picture; redrawn only when a sync changed the warehouse."""
    cache = Path(wandb.cache_dir) / "history_curves.md"
    stamp = f"<!-- generation {generation(conn)} -->\n"
    if cache.exists() and cache.read_text().startswith(stamp):
        picture = cache.read_text()[len(stamp) :]
    else:
        metrics = leaderboard.main_metrics(conn, wandb.leaderboard_metrics)[:METRIC_PANELS]
        curves = leaderboard.latest_curves(conn, metrics)
        picture = (
            charts.markdown_image(charts.metric_curves(curves), "main metrics of the latest runs")
            if curves
            else ("No history values match MVDATA_LEADERBOARD_METRICS yet.")
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(stamp + picture)
    return {"main_metrics": MetadataValue.md(picture)}


@multi_asset(
    specs=[
        *(
            AssetSpec(
                export_key(name),
                group_name=GROUP,
                kinds={"parquet"},
                deps=[table_key(t) for t in TABLES if t != "history"],
                description=f"{name}.parquet: one row per run",
                automation_condition=FOLLOW_UPSTREAM,
            )
            for name in exports.EXPORT_GROUPS["metadata"]
        ),
        AssetSpec(
            export_key("runs_history"),
            group_name=GROUP,
            kinds={"parquet"},
            deps=[table_key("history"), table_key("runs")],
            description="runs_history.parquet: one row per run and step, one column per metric",
            automation_condition=FOLLOW_UPSTREAM,
        ),
    ],
    can_subset=True,
    description="Parquet exports in $MVDATA_HOME/exports, rewritten only when a sync changed the warehouse.",
)
def wandb_exports(
    context: AssetExecutionContext, config: ExportConfig, warehouse: WarehouseResource, wandb: WandbResource
):
    """One step for all exports: each Dagster step costs more than writing these files."""
    selected = {key.path[-1] for key in context.selected_asset_keys}
    groups = [group for group, names in exports.EXPORT_GROUPS.items() if selected & set(names)]
    with warehouse.get_connection() as conn:
        for group in groups:
            version = warehouse_version(conn)
            for export in exports.export_group(
                conn, Path(wandb.exports_dir), group, config.force_rewrite, context.log.info
            ):
                yield MaterializeResult(
                    asset_key=export_key(export.name),
                    data_version=version,
                    metadata={
                        "path": MetadataValue.path(str(export.path)),
                        "dagster/row_count": MetadataValue.int(export.rows),
                        "rewritten": MetadataValue.bool(export.rewritten),
                        "dagster/column_schema": TableSchema(
                            columns=[TableColumn(n, t) for n, t in export.columns[:200]]
                        ),
                    },
                )


@asset(
    key=table_key("leaderboard"),
    group_name=GROUP,
    kinds={"duckdb"},
    deps=[table_key("runs"), table_key("history"), table_key("config")],
    metadata={"dagster/table_name": f"{SCHEMA}.leaderboard"},
    automation_condition=FOLLOW_UPSTREAM,
    description="wandb.leaderboard: per run, best and last value of the main metrics and the key config values, "
    "newest first (MVDATA_LEADERBOARD_METRICS / MVDATA_LEADERBOARD_CONFIG choose them).",
)
def wandb_leaderboard(warehouse: WarehouseResource, wandb: WandbResource) -> MaterializeResult:
    with warehouse.get_connection() as conn:
        board = leaderboard.build(conn, wandb.leaderboard_metrics, wandb.leaderboard_config)
        top = conn.execute(f"SELECT * FROM {SCHEMA}.leaderboard LIMIT 20").fetchall()
        version = warehouse_version(conn)
    shown = ["display_name", "state", *(c for c in board.columns if c.startswith(("best:", "last:", "config:")))]
    index = [board.columns.index(c) for c in shown]
    return MaterializeResult(
        data_version=version,
        metadata={
            "dagster/row_count": MetadataValue.int(board.rows),
            "metrics": MetadataValue.json(
                {m: "lower is better" if leaderboard.lower_is_better(m) else "higher is better" for m in board.metrics}
            ),
            "config_keys": MetadataValue.json(board.config_keys),
            "newest runs": MetadataValue.md(
                charts.markdown_table(shown, [[_cell(row[i]) for i in index] for row in top])
            ),
        },
    )


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def build_run_datasets_asset(dataset_keys: Sequence[AssetKey]) -> AssetsDefinition:
    """`wandb/run_datasets`, downstream of every catalog dataset and of the runs' config: the lineage shows which
    datasets fed which training runs."""

    @asset(
        key=table_key("run_datasets"),
        group_name=GROUP,
        kinds={"duckdb"},
        deps=[*dataset_keys, table_key("runs"), table_key("config")],
        metadata=declared_table(SCHEMA, "run_datasets"),
        # follows a sync or a download by itself, even while some datasets were never downloaded
        automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
        description="wandb.run_datasets: the catalog datasets each run names in its config "
        "(MVDATA_RUN_DATASET_KEYS: data.datasets, dataset, data_root, ...).",
    )
    def wandb_run_datasets(warehouse: WarehouseResource, wandb: WandbResource) -> MaterializeResult:
        with warehouse.get_connection() as conn:
            store.ensure_schema(conn)
            rows = run_datasets.build(
                conn, [key.path[-1] for key in dataset_keys], wandb.run_dataset_keys, leave_out=[DOWNLOAD_LOGS]
            )
            used = conn.execute(
                f"SELECT dataset, count(DISTINCT run_id) FROM {SCHEMA}.run_datasets GROUP BY dataset ORDER BY dataset"
            ).fetchall()
            version = warehouse_version(conn)
        return MaterializeResult(
            data_version=version,
            metadata={
                "dagster/row_count": MetadataValue.int(rows),
                "runs_per_dataset": MetadataValue.md(charts.markdown_table(("dataset", "runs"), used)),
            },
        )

    return wandb_run_datasets


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            "history_has_no_duplicates",
            asset=table_key("history"),
            description="No (run, step, key) appears twice in wandb.history.",
            blocking=True,  # a duplicated value would double-count downstream: nothing after it runs
        ),
        AssetCheckSpec(
            "history_runs_exist",
            asset=table_key("history"),
            description="Every history row belongs to a run in wandb.runs.",
        ),
    ],
)
def history_checks(warehouse: WarehouseResource):
    """Both checks in one step, from counts over the whole history that a re-run with nothing synced does not repeat
    (runs/checks.py)."""
    with warehouse.get_connection() as conn:
        checked = check_history(conn)
    counted = (
        "counted in this run"
        if checked.counted_now
        else f"kept: the history has not changed since generation {checked.generation} was checked"
    )
    for check_name, count, label in (
        ("history_has_no_duplicates", checked.duplicate_keys, "duplicate_keys"),
        ("history_runs_exist", checked.orphan_rows, "orphan_rows"),
    ):
        yield AssetCheckResult(
            check_name=check_name,
            asset_key=table_key("history"),
            passed=count == 0,
            severity=AssetCheckSeverity.ERROR,
            metadata={label: MetadataValue.int(count), "generation": checked.generation, "counts": counted},
        )


wandb_assets = [wandb_tables, wandb_exports, wandb_leaderboard]
wandb_checks = [history_checks]

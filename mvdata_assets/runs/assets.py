"""Dagster wiring for the W&B half: tables filled by the offline sync engine, and parquet exports."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    multi_asset,
    multi_asset_check,
)

from mvdata_assets.runs import exports
from mvdata_assets.runs.offline import SyncReport, sync_offline
from mvdata_assets.runs.store import SCHEMA
from mvdata_assets.settings import load_settings
from mvdata_assets.warehouse import WarehouseResource

GROUP = "wandb"
TABLES = ("runs", "history", "config", "summary", "metadata", "system_metrics")
METADATA_EXPORTS = ("runs_metadata", *(f"runs_metadata_{s}" for s in exports.METADATA_SLICES))


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
    columns = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [SCHEMA, table],
    ).fetchall()
    count = conn.execute(f"SELECT count(*) FROM {SCHEMA}.{table}").fetchone()[0]
    preview = conn.execute(f"SELECT * FROM {SCHEMA}.{table} LIMIT 5").fetchall()
    header = "| " + " | ".join(c for c, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(v)[:40].replace("|", "\\|") for v in row) + " |\n" for row in preview)
    return {
        "dagster/row_count": MetadataValue.int(count),
        "dagster/column_schema": TableSchema(columns=[TableColumn(c, t) for c, t in columns]),
        "preview": MetadataValue.md(header + body),
        "table": MetadataValue.text(f"{SCHEMA}.{table}"),
    }


def _sync_metadata(report: SyncReport) -> dict:
    return {
        "runs_new": MetadataValue.int(report.count("new")),
        "runs_updated": MetadataValue.int(report.count("grown", "replaced", "refreshed")),
        "runs_unchanged": MetadataValue.int(report.count("unchanged")),
        "bytes_read": MetadataValue.int(report.bytes_read),
        "seconds": MetadataValue.float(round(report.seconds, 3)),
        "problems": MetadataValue.json(report.problems),
    }


@multi_asset(
    specs=[
        AssetSpec(table_key(t), group_name=GROUP, kinds={"duckdb", "wandb"}, description=f"{SCHEMA}.{t}")
        for t in TABLES
    ],
    can_subset=False,
    description="Syncs every run under MVDATA_WANDB_OFFLINE_DIRS into the warehouse, incrementally.",
)
def wandb_offline_tables(context: AssetExecutionContext, config: SyncConfig, warehouse: WarehouseResource):
    settings = load_settings()
    with warehouse.get_connection() as conn:
        report = sync_offline(
            conn,
            settings.wandb_offline_dirs,
            force_refresh=config.force_refresh,
            running_window_s=settings.running_window_s,
        )
        for problem in report.problems:
            context.log.warning(problem)
        context.log.info(
            f"{len(report.files)} run files: {report.count('new')} new, "
            f"{report.count('grown', 'replaced', 'refreshed')} updated, {report.count('unchanged')} unchanged; "
            f"{report.bytes_read} bytes in {report.seconds:.2f} s"
        )
        shared = _sync_metadata(report)
        for table in TABLES:
            yield MaterializeResult(
                asset_key=table_key(table),
                metadata={
                    **shared,
                    "rows_written": MetadataValue.int(report.rows.get(table, 0)),
                    **_table_metadata(conn, table),
                },
            )


@multi_asset(
    specs=[
        *(
            AssetSpec(
                export_key(name),
                group_name=GROUP,
                kinds={"parquet"},
                deps=[table_key(t) for t in TABLES if t != "history"],
                description=f"{name}.parquet: one row per run",
            )
            for name in METADATA_EXPORTS
        ),
        AssetSpec(
            export_key("runs_history"),
            group_name=GROUP,
            kinds={"parquet"},
            deps=[table_key("history"), table_key("runs")],
            description="runs_history.parquet: one row per run and step, one column per metric",
        ),
    ],
    can_subset=True,
    description="Parquet exports in $MVDATA_HOME/exports, rewritten only when a sync changed the warehouse.",
)
def wandb_exports(context: AssetExecutionContext, config: ExportConfig, warehouse: WarehouseResource):
    """One step for all exports: each Dagster step costs more than writing these files."""
    settings = load_settings()
    selected = {key.path[-1] for key in context.selected_asset_keys}
    groups = [
        g for g, names in (("metadata", METADATA_EXPORTS), ("history", ("runs_history",))) if selected & set(names)
    ]
    with warehouse.get_connection() as conn:
        for group in groups:
            for export in exports.export_all(conn, settings.exports, group, config.force_rewrite, context.log.info):
                yield MaterializeResult(
                    asset_key=export_key(export.name),
                    metadata={
                        "path": MetadataValue.path(str(export.path)),
                        "dagster/row_count": MetadataValue.int(export.rows),
                        "rewritten": MetadataValue.bool(export.rewritten),
                        "dagster/column_schema": TableSchema(
                            columns=[TableColumn(n, t) for n, t in export.columns[:200]]
                        ),
                    },
                )


@multi_asset_check(
    specs=[
        AssetCheckSpec(
            "history_has_no_duplicates",
            asset=table_key("history"),
            description="No (run, step, key) appears twice in wandb.history.",
        ),
        AssetCheckSpec(
            "history_runs_exist",
            asset=table_key("history"),
            description="Every history row belongs to a run in wandb.runs.",
        ),
    ],
)
def history_checks(warehouse: WarehouseResource):
    """Both checks in one step: each Dagster step costs more than these queries."""
    with warehouse.get_connection() as conn:
        duplicates = conn.execute(
            f"""SELECT count(*) FROM (SELECT 1 FROM {SCHEMA}._history
                GROUP BY run_ref, step, key_ref HAVING count(*) > 1)"""
        ).fetchone()[0]
        orphans = conn.execute(
            f"""SELECT count(*) FROM {SCHEMA}._history h
                ANTI JOIN (SELECT run_ref FROM {SCHEMA}._run_refs JOIN {SCHEMA}.runs USING (entity, project, run_id)) r
                ON h.run_ref = r.run_ref"""
        ).fetchone()[0]
    for check_name, count, label in (
        ("history_has_no_duplicates", duplicates, "duplicate_keys"),
        ("history_runs_exist", orphans, "orphan_rows"),
    ):
        yield AssetCheckResult(
            check_name=check_name,
            asset_key=table_key("history"),
            passed=count == 0,
            severity=AssetCheckSeverity.ERROR,
            metadata={label: MetadataValue.int(count)},
        )


wandb_assets = [wandb_offline_tables, wandb_exports]
wandb_checks = [history_checks]

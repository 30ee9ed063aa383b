"""The `mvdata` command: what the warehouse holds, and the demo's run writer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mvdata_assets.db import connect
from mvdata_assets.runs import store
from mvdata_assets.settings import load_settings


def report() -> int:
    settings = load_settings()
    if not settings.warehouse.exists():
        print(f"no warehouse yet at {settings.warehouse}: materialise the assets first (make demo)")
        return 1
    with connect(settings.warehouse, settings.lock_timeout_s) as conn:
        store.ensure_schema(conn)
        runs = conn.execute(
            """SELECT project, run_id, coalesce(display_name, ''), state, last_step, history_rows
               FROM wandb.runs ORDER BY project, created_at"""
        ).fetchall()
        counts = {t: conn.execute(f"SELECT count(*) FROM wandb.{t}").fetchone()[0] for t in store.RUN_TABLES}
    print(f"\nW&B runs in the warehouse ({len(runs)}):")
    print(f"  {'project':<14} {'run':<10} {'name':<22} {'state':<9} {'last step':>9} {'history rows':>12}")
    for project, run_id, name, state, last_step, rows in runs:
        step = "-" if last_step is None else last_step
        print(f"  {project:<14} {run_id:<10} {name:<22} {state:<9} {step:>9} {rows:>12}")
    print("\nRows per table: " + ", ".join(f"wandb.{t} {n:,}" for t, n in counts.items()))
    print(f"Warehouse: {settings.warehouse}")
    exports = sorted(settings.exports.glob("*.parquet"))
    print(f"Exports ({len(exports)} parquet files): {settings.exports}")
    query = "SELECT key, count(*) FROM wandb.history GROUP BY key"
    print(f"Query: .venv/bin/python -c \"import duckdb; duckdb.connect('{settings.warehouse}').sql('{query}').show()\"")
    dirs = ":".join(str(d) for d in settings.wandb_offline_dirs)
    print(f"Open the UI: MVDATA_WANDB_OFFLINE_DIRS={dirs} .venv/bin/dagster dev -w workspace.yaml")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mvdata", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="what the warehouse holds and where the exports are")
    demo = commands.add_parser("demo-runs", help="write the demo's offline W&B runs (skipped if present)")
    demo.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "demo-runs":
        from mvdata_assets.demo import write_demo_runs

        written = write_demo_runs(args.out_dir)
        print(f"wrote {len(written)} offline runs under {args.out_dir / 'wandb'}" if written else
              f"demo runs already in {args.out_dir / 'wandb'}: not rewritten")  # fmt: skip
        return 0
    return report()


if __name__ == "__main__":
    sys.exit(main())

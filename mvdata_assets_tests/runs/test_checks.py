"""The history checks' counts on a warehouse synced from real SDK runs: what they find, and that a re-run with
nothing synced since reads no history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from mvdata_assets.runs import store
from mvdata_assets.runs.checks import check_history
from mvdata_assets.runs.offline import sync_offline
from mvdata_assets_tests.runs.conftest import SdkRun


@pytest.fixture
def synced(sdk_runs: dict[str, SdkRun], tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    report = sync_offline(conn, [sdk_runs["long"].out_dir, sdk_runs["edge"].out_dir])
    assert report.problems == []
    yield conn
    conn.close()


def changed_by_a_sync(conn: duckdb.DuckDBPyConnection, statement: str, *params: object) -> None:
    """`statement` in a transaction that moves the sync generation, as every sync that stores something does."""
    with store.transaction(conn):
        conn.execute(statement, list(params))
        store.bump_generation(conn)


def test_a_clean_history_passes_and_a_rerun_with_nothing_synced_reads_no_history(synced) -> None:
    first = check_history(synced)
    assert (first.duplicate_keys, first.orphan_rows, first.counted_now) == (0, 0, True)
    assert first.generation == store.generation(synced) > 0

    # a row stored twice behind the syncs' back (the generation stays): the counts are kept, so nothing was read
    synced.execute("INSERT INTO wandb._history SELECT * FROM wandb._history LIMIT 1")
    again = check_history(synced)

    assert (again.duplicate_keys, again.orphan_rows, again.counted_now) == (0, 0, False)
    assert again.generation == first.generation


def test_values_stored_twice_are_counted_once_a_sync_moved_the_generation(synced) -> None:
    check_history(synced)
    changed_by_a_sync(synced, "INSERT INTO wandb._history SELECT * FROM wandb._history ORDER BY ALL LIMIT 3")

    checked = check_history(synced)

    assert (checked.duplicate_keys, checked.orphan_rows, checked.counted_now) == (3, 0, True)
    assert checked.generation == store.generation(synced)


def test_history_rows_of_a_run_missing_from_runs_are_orphans(synced, sdk_runs: dict[str, SdkRun]) -> None:
    run_id = sdk_runs["edge"].run_id
    rows = synced.execute("SELECT count(*) FROM wandb.history WHERE run_id = ?", [run_id]).fetchone()[0]
    changed_by_a_sync(synced, "DELETE FROM wandb.runs WHERE run_id = ?", run_id)

    checked = check_history(synced)

    assert checked.orphan_rows == rows > 0
    assert checked.duplicate_keys == 0

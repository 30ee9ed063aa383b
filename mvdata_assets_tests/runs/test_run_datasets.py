"""Runs joined to the catalog datasets their config names."""

from __future__ import annotations

from pathlib import Path

import duckdb

from mvdata_assets.runs import run_datasets, store
from mvdata_assets.runs.values import NestedState, to_json

KEYS = ("data.datasets", "dataset", "datasets", "data_root")


def test_runs_name_datasets_by_list_name_or_path(tmp_path: Path) -> None:
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    store.ensure_schema(conn)
    configs = {
        "listed": {"data": {"datasets": ["coco", "vqav2", "not_in_catalog"]}},
        "single": {"dataset": "gqa"},
        "by_path": {"data_root": "/mnt/data/textvqa/train_images", "dataset": "textvqa"},
        "numbers": {"dataset": 3, "data": {"datasets": [1, None, {"name": "coco"}]}},
        "other_key": {"eval_dataset": "coco"},
        "download_log": {"datasets": ["coco", "gqa"]},  # in the download runs' own project: not a training run
    }
    for run_id, config in configs.items():
        state = NestedState()
        for key, value in config.items():
            state.apply((key,), to_json(value))
        store.replace_values(conn, "config", ("e", "logs" if run_id == "download_log" else "p", run_id), state)
    catalog = ["coco", "vqav2", "gqa", "textvqa", "cc3m"]
    assert run_datasets.build(conn, catalog, KEYS, leave_out=["logs"]) == 4
    rows = conn.execute("SELECT run_id, dataset, config_key FROM wandb.run_datasets ORDER BY ALL").fetchall()
    assert rows == [("by_path", "textvqa", "data_root"), ("listed", "coco", "data.datasets"),
                    ("listed", "vqav2", "data.datasets"), ("single", "gqa", "dataset")]  # fmt: skip
    store.replace_values(conn, "config", ("e", "p", "listed"), NestedState())  # rebuilt whole: gone runs go
    assert run_datasets.build(conn, catalog, KEYS, leave_out=["logs"]) == 2
    assert run_datasets.build(conn, catalog, KEYS) == 4  # the log's two, when its project is not left out

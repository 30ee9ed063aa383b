"""wandb.leaderboard and the history picture, checked against what the SDK runs logged (their truth files)."""

from __future__ import annotations

import base64
import io
import math

import duckdb
import pytest
from PIL import Image

from mvdata_assets import charts
from mvdata_assets.runs import leaderboard
from mvdata_assets.runs.offline import sync_offline
from mvdata_assets_tests.runs import truth as truth_of
from mvdata_assets_tests.runs.conftest import SdkRun
from mvdata_assets_tests.runs.sdk_writer import QUOTE_KEY, SQL_KEY, UNICODE_KEY

LONG = ("long", "long2", "long3")


@pytest.fixture(scope="module")
def warehouse(sdk_runs: dict[str, SdkRun], tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(tmp_path_factory.mktemp("leaderboard") / "warehouse.duckdb"))
    sync_offline(conn, [sdk_runs[name].out_dir for name in (*LONG, "edge")])
    return conn


def _expected(run: SdkRun, metric: str) -> tuple[float, float]:
    """Best (max, as these metrics are not losses) and last finite value, from what was logged."""
    values = [(step, data[metric]) for step, data in truth_of.steps(run.truth).items() if metric in data]
    finite = [(step, v) for step, v in values if isinstance(v, float | int) and math.isfinite(v)]
    return max(v for _, v in finite), max(finite)[1]


def test_best_and_last_of_every_main_metric_per_run(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    board = leaderboard.build(warehouse, ["metric_*"])
    assert board.metrics == sorted(f"metric_{k}" for k in range(8))
    assert board.config_keys == ["seed"]  # the only config value that differs between the long runs
    rows = {row[2]: dict(zip(board.columns, row, strict=True)) for row in warehouse.execute(
        "SELECT * FROM wandb.leaderboard").fetchall()}  # fmt: skip
    assert len(rows) == 4  # every run, the edge run too (it logs none of these metrics)
    for name in LONG:
        run = sdk_runs[name]
        row = rows[run.run_id]
        for metric in board.metrics:
            best, last = _expected(run, metric)
            assert row[f"best:{metric}"] == best and row[f"last:{metric}"] == last, (name, metric)
        assert row["config:seed"] == str(run.truth["config"]["seed"])
    edge = rows[sdk_runs["edge"].run_id]
    assert all(edge[f"best:{m}"] is None for m in board.metrics)
    created = [c for (c,) in warehouse.execute("SELECT created_at FROM wandb.leaderboard").fetchall()]
    assert created == sorted(created, reverse=True)  # newest first


def test_losses_are_best_when_lowest_and_names_are_data(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    weird = [QUOTE_KEY, UNICODE_KEY, SQL_KEY]
    wanted = ["late_key", "huge", "optim.lr", "c0001", UNICODE_KEY, "no such key"]
    board = leaderboard.build(warehouse, ["loss", *weird], config_keys=wanted)
    assert set(board.metrics) == {"loss", *weird}
    values = warehouse.execute("SELECT * FROM wandb.leaderboard WHERE run_id = ?", [sdk_runs["edge"].run_id])
    row = dict(zip(board.columns, values.fetchone(), strict=True))
    logged = truth_of.steps(sdk_runs["edge"].truth)
    losses = [data["loss"] for data in logged.values() if "loss" in data]
    assert leaderboard.lower_is_better("loss") and row["best:loss"] == min(losses)
    for key in weird:  # quotes, unicode and SQL in metric names become column names, never SQL
        assert row[f"best:{key}"] == max(data[key] for data in logged.values() if key in data)
    config = truth_of.config(sdk_runs["edge"].truth)
    assert [row[f"config:{k}"] for k in wanted] == [
        config["late_key"],
        str(2**70),
        "0.001",
        str(config["c0001"]),
        config[UNICODE_KEY],
        None,
    ]  # strings unquoted, ints exact (2^70 too), floats as written
    assert warehouse.execute("SELECT count(*) FROM wandb.runs").fetchone()[0] == 4  # nothing was dropped


def test_no_matching_metric_still_lists_every_run(warehouse) -> None:
    board = leaderboard.build(warehouse, ["nothing_matches_*"])
    assert board.metrics == [] and board.rows == 4


def test_curves_of_the_latest_runs_thinned_but_true(warehouse, sdk_runs: dict[str, SdkRun]) -> None:
    curves = leaderboard.latest_curves(warehouse, ["metric_1"], runs=2, points=50)
    newest = warehouse.execute(
        """SELECT run_id, coalesce(display_name, run_id) FROM wandb.runs WHERE project = 'long-proj'
           ORDER BY created_at DESC LIMIT 2"""
    ).fetchall()
    assert sorted(curves["metric_1"]) == sorted(label for _, label in newest)
    for steps, _ in curves["metric_1"].values():
        assert len(steps) == 50 and steps == sorted(steps)
        assert 0 < steps[0] < 100 and 4900 < steps[-1] < 5000  # buckets of 100 steps, averaged
    # each point is the mean of its bucket of 100: the mean over the run is kept
    run_id, label = newest[0]
    run = next(sdk_runs[name] for name in LONG if sdk_runs[name].run_id == run_id)
    logged = [data["metric_1"] for data in truth_of.steps(run.truth).values()]
    assert sum(curves["metric_1"][label][1]) / 50 == pytest.approx(sum(logged) / len(logged))


def test_pictures_are_pngs_the_ui_can_show(warehouse) -> None:
    curves = leaderboard.latest_curves(warehouse, ["metric_0", "metric_1", "metric_2"])
    markdown = charts.markdown_image(charts.metric_curves(curves), "curves")
    assert markdown.startswith("![curves](data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(markdown.split(",", 1)[1].rstrip(")"))))
    assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400  # two rows of panels
    assert len(set(image.getdata())) > 20  # lines in several colours, not a blank canvas


@pytest.mark.parametrize(
    "metric",
    ["loss", "train/loss", "val_loss", "trainLoss", "eval/error_rate", "top1_err", "eval/wer", "cer", "test/PPL",
     "val-mse", "rmse", "mae", "perplexity", "time/latency_ms"],
)  # fmt: skip
def test_losses_and_error_rates_are_best_when_lowest(metric: str) -> None:
    assert leaderboard.lower_is_better(metric)


@pytest.mark.parametrize(
    "metric",
    ["vqa/answer_acc", "eval/answer_accuracy", "maestro_f1", "power", "cider", "bleu4", "precision", "recall",
     "career_score", "accuracy", "answer_f1"],
)  # fmt: skip
def test_accuracies_are_best_when_highest_though_their_names_hold_an_abbreviation(metric: str) -> None:
    assert not leaderboard.lower_is_better(metric)

"""`wandb.leaderboard`: per run, the best and last value of the main metrics next to its key config values.

Rebuilt whole from the warehouse on each materialisation: one aggregate DuckDB runs over a few columns of the
history, so it can never drift from the tables. One row per run, newest first.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb

from mvdata_assets.db import quoted
from mvdata_assets.runs.store import SCHEMA
from mvdata_assets.runs.values import EXACT_INT_LIMIT

# metrics whose best value is the smallest; every other main metric is better when larger. The long words count
# anywhere in a name (`val_loss`, `trainLoss`); abbreviations only as a word of it, cut at `/`, `_`, `-`, `.`, digits
# or camelCase (`eval/wer`, `top1_err`, but not the "wer" in `answer_acc` nor the "mae" in `maestro_f1`)
LOWER_IS_BETTER_IN = re.compile(r"loss|error|perplexity|latency", re.IGNORECASE)
LOWER_IS_BETTER_WORDS = {"err", "ppl", "wer", "cer", "mse", "mae", "rmse"}
_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
MAX_METRICS = 12
# a config value as people write it: strings unquoted, whole numbers without ".0", the rest as JSON text
_CONFIG_TEXT = f"""CASE
    WHEN c.value_json IS NOT NULL THEN coalesce(json_extract_string(c.value_json, '$'), c.value_json)
    WHEN c.value = trunc(c.value) AND abs(c.value) < {EXACT_INT_LIMIT} THEN c.value::BIGINT::VARCHAR
    ELSE c.value::VARCHAR END"""
MAX_CONFIG_KEYS = 8


@dataclass(frozen=True)
class Leaderboard:
    metrics: list[str]
    config_keys: list[str]
    rows: int
    columns: list[str]


def lower_is_better(metric: str) -> bool:
    if LOWER_IS_BETTER_IN.search(metric):
        return True
    return any(word.lower() in LOWER_IS_BETTER_WORDS for word in _WORDS.findall(metric))


def main_metrics(conn: duckdb.DuckDBPyConnection, patterns: Sequence[str]) -> list[str]:
    """Numeric history keys matching the patterns, those logged by most runs first."""
    counts = conn.execute(
        f"""SELECT k.key, count(DISTINCT h.run_ref) AS runs
            FROM {SCHEMA}._history h JOIN {SCHEMA}._keys k USING (key_ref)
            WHERE h.value IS NOT NULL AND isfinite(h.value)
            GROUP BY k.key ORDER BY runs DESC, k.key"""
    ).fetchall()
    return [key for key, _ in counts if any(fnmatch.fnmatchcase(key, p) for p in patterns)][:MAX_METRICS]


def key_config(conn: duckdb.DuckDBPyConnection, wanted: Sequence[str]) -> list[str]:
    """The config keys asked for, or else those whose value differs between runs of a project (what was tuned)."""
    if wanted:
        return list(wanted)
    rows = conn.execute(
        f"""SELECT key, count(*) AS runs FROM {SCHEMA}.config
            WHERE key NOT LIKE '\\_wandb%' ESCAPE '\\'
            GROUP BY project, key HAVING count(DISTINCT coalesce(value_json, value::VARCHAR)) > 1
            ORDER BY runs DESC, key"""
    ).fetchall()
    return list(dict.fromkeys(key for key, _ in rows))[:MAX_CONFIG_KEYS]


def build(
    conn: duckdb.DuckDBPyConnection, metric_patterns: Sequence[str], config_keys: Sequence[str] = ()
) -> Leaderboard:
    metrics = main_metrics(conn, metric_patterns)
    configs = key_config(conn, config_keys)
    best = ", ".join(
        f"{'min' if lower_is_better(m) else 'max'}(value) FILTER (WHERE key = ${i + 1}) AS {quoted('best:' + m)}, "
        f"arg_max(value, step) FILTER (WHERE key = ${i + 1}) AS {quoted('last:' + m)}"
        for i, m in enumerate(metrics)
    )
    picked = ", ".join(
        f"any_value({_CONFIG_TEXT}) FILTER (WHERE c.key = ${len(metrics) + i + 1}) AS {quoted('config:' + k)}"
        for i, k in enumerate(configs)
    )
    params = [*metrics, *configs]
    metric_keys = ", ".join(f"${i + 1}" for i in range(len(metrics))) or "NULL"
    conn.execute(
        f"""CREATE OR REPLACE TABLE {SCHEMA}.leaderboard AS
            WITH values AS (
                SELECT r.entity, r.project, r.run_id, k.key, h.value, h.step
                FROM {SCHEMA}._history h
                JOIN {SCHEMA}._keys k USING (key_ref)
                JOIN {SCHEMA}._run_refs r USING (run_ref)
                WHERE k.key IN ({metric_keys}) AND isfinite(h.value)
            ),
            metrics AS (
                SELECT entity, project, run_id{", " + best if best else ""}
                FROM values GROUP BY entity, project, run_id
            ),
            configs AS (
                SELECT c.entity, c.project, c.run_id{", " + picked if picked else ""}
                FROM {SCHEMA}.config c GROUP BY c.entity, c.project, c.run_id
            )
            SELECT r.entity, r.project, r.run_id, r.display_name, r.state, r.created_at, r.last_step,
                   m.* EXCLUDE (entity, project, run_id), c.* EXCLUDE (entity, project, run_id)
            FROM {SCHEMA}.runs r
            LEFT JOIN metrics m USING (entity, project, run_id)
            LEFT JOIN configs c USING (entity, project, run_id)
            ORDER BY r.created_at DESC NULLS LAST, r.run_id""",
        params,
    )
    columns = [c for (c,) in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = 'leaderboard' "
        "ORDER BY ordinal_position", [SCHEMA]).fetchall()]  # fmt: skip
    rows = conn.execute(f"SELECT count(*) FROM {SCHEMA}.leaderboard").fetchone()[0]
    return Leaderboard(metrics, configs, rows, columns)


def latest_curves(
    conn: duckdb.DuckDBPyConnection, metrics: Sequence[str], runs: int = 5, points: int = 300
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{metric: {run: (steps, values)}} of the newest runs that log them, averaged down to ~`points` per line."""
    if not metrics:
        return {}
    keys = ", ".join(f"${i + 3}" for i in range(len(metrics)))
    rows = conn.execute(
        f"""WITH picked AS (
                SELECT h.run_ref, k.key, h.step, h.value FROM {SCHEMA}._history h JOIN {SCHEMA}._keys k USING (key_ref)
                WHERE k.key IN ({keys}) AND isfinite(h.value)
            ),
            latest AS (
                SELECT ref.run_ref, coalesce(r.display_name, r.run_id) AS label
                FROM {SCHEMA}.runs r JOIN {SCHEMA}._run_refs ref USING (entity, project, run_id)
                WHERE ref.run_ref IN (SELECT run_ref FROM picked)
                ORDER BY r.created_at DESC NULLS LAST, r.run_id LIMIT $1
            ),
            bucketed AS (
                SELECT l.label, p.key, p.step, p.value,
                       ntile($2) OVER (PARTITION BY p.run_ref, p.key ORDER BY p.step) AS bucket
                FROM picked p JOIN latest l USING (run_ref)
            )
            SELECT key, label, avg(step), avg(value) FROM bucketed
            GROUP BY key, label, bucket ORDER BY key, label, min(step)""",
        [runs, points, *metrics],
    ).fetchall()
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {m: {} for m in metrics}
    for key, label, step, value in rows:
        steps, values = curves[key].setdefault(label, ([], []))
        steps.append(step)
        values.append(value)
    return {m: c for m, c in curves.items() if c}

"""Writes one offline run with the real wandb SDK, plus a truth file of exactly what was logged.

Usage: python sdk_writer.py OUT_DIR SCENARIO [SEED]

The run lands in OUT_DIR/wandb/offline-run-*/run-*.wandb and the truth in OUT_DIR/truth-SCENARIO.json:
run id, project, the config as given (init config merged with later updates), explicit summary sets and
deletions, and every logged step as [step, dict]. Media objects are recorded as {"__media__": "<_type>"};
everything else is recorded as given (JSON with NaN/Infinity, ints exact).

Scenarios: edge, killed, long, failed, live. Runs in its own process: the tests never call wandb.init themselves.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from mvdata_assets.demo import sidecar_pids

SQL_KEY = "x'); DROP TABLE wandb.history; --"
QUOTE_KEY = 'it\'s "q"'
UNICODE_KEY = "größe/λ"


def _set_env(out: Path) -> None:
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_DISABLE_GIT"] = "true"
    os.environ["WANDB_DISABLE_CODE"] = "true"
    # offline mode needs no network; anything that tries anyway goes to a closed loopback port
    os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        os.environ[var] = str(out / ".wandb-home" / sub)
    os.environ.pop("WANDB_API_KEY", None)


def _write_truth(out: Path, scenario: str, truth: dict) -> None:
    truth["sidecar_pids"] = sidecar_pids()
    text = json.dumps(truth, allow_nan=True, ensure_ascii=False, indent=None)
    target = out / f"truth-{scenario}.json"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".truth-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _media(wandb, step: int) -> dict:
    """Media objects for one step and their truth placeholders."""
    media = {"page": (wandb.Html(f"<p>step {step} &amp; more</p>"), "html-file")}
    try:
        import PIL.Image  # wandb.Image needs pillow (a dev dependency)
    except ImportError:
        return media
    img = PIL.Image.new("RGB", (4, 3), color=(step % 256, 10, 200))
    media["img"] = (wandb.Image(img, caption=f"step {step}"), "image-file")
    return media


def _edge_metrics(i: int) -> dict:
    return {
        "loss": 1.0 / (i + 1),
        "nan_metric": float("nan"),
        "pinf": float("inf"),
        "ninf": float("-inf"),
        UNICODE_KEY: i + 0.5,
        QUOTE_KEY: i * 2.0,
        SQL_KEY: i + 0.25,
        "run_id": i + 1000,
        "step": i + 2000,
        "timestamp": i + 3000.5,
        "value": -1.5 - i,
        "project": f"not-the-project-{i}",
        "text": f"step {i} 'single' \"double\" ünïcode ✓\nnewline\ttab \\ backslash",
        "flag": i % 2 == 0,
        "none_metric": None,
        "eval": {"acc": 0.5 + i / 1000, "deep": {"f1": 0.25 + i}},
        "big_int": 2**60 + i,
        "int53p": 2**53 + 1,
        "pow53": 2**53,
        "neg_big": -(2**62) - i,
        "lst": [i, 0.5, "a", None],
        "precise": 0.1 + 0.2 + i,
        "tiny": 5e-324,
        "maxfloat": 1.7976931348623157e308,
        "neg_zero": -0.0,
    }


def _edge_config() -> dict:
    config: dict = {}
    for i in range(1500):
        kind = i % 7
        if kind == 0:
            value = i * 0.25 + 1e-9
        elif kind == 1:
            value = i
        elif kind == 2:
            value = f"value-{i:04d}-" + "abcdefghij" * 16
        elif kind == 3:
            value = i % 2 == 0
        elif kind == 4:
            value = None
        elif kind == 5:
            value = [i, i + 0.5, f"s{i}"]
        else:
            value = 2**53 + i * 3 + 1
        config[f"c{i:04d}"] = value
    config["optim"] = {"lr": 3e-4, "betas": [0.9, 0.95], "sched": {"name": "cosine", "warmup": 500}}
    config["huge"] = 2**70
    config[UNICODE_KEY] = "значение ✓"
    return config


def edge(wandb, out: Path) -> dict:
    config = _edge_config()
    run = wandb.init(mode="offline", dir=str(out), project="edge-proj", config=config, name="edge run ✓")
    steps: list = []

    def log(step: int, data: dict, truth_data: dict | None = None, commit: bool | None = None) -> None:
        kwargs = {"step": step} if commit is None else {"step": step, "commit": commit}
        run.log(data, **kwargs)
        record = truth_data if truth_data is not None else data
        if steps and steps[-1][0] == step:
            steps[-1][1].update(record)
        else:
            steps.append([step, dict(record)])

    def with_media(i: int, metrics: dict) -> tuple[dict, dict]:
        data, truth_data = dict(metrics), dict(metrics)
        for key, (obj, kind) in _media(wandb, i).items():
            data[key] = obj
            truth_data[key] = {"__media__": kind}
        return data, truth_data

    log(0, *with_media(0, _edge_metrics(0)))
    # step 5 is logged in two parts (commit=False then commit) and must arrive as one step
    part = _edge_metrics(5)
    first = {k: part[k] for k in list(part)[:10]}
    rest = {k: part[k] for k in list(part)[10:]}
    log(5, {**first, "tmp_metric": 42.0}, commit=False)
    log(5, rest)
    log(17, {"loss": 0.17, "only_here": 17.25})
    # commit=True flushes step 100 now: without it the SDK holds the step open until finish(), after the
    # summary sets below, and the logged values would override them
    log(100, *with_media(100, _edge_metrics(100)), commit=True)

    update = {"late_key": "late ✓", "optim": {"lr": 1e-3, "betas": [0.8, 0.9]}}
    run.config.update(update, allow_val_change=True)
    config.update(update)

    summary_sets = {
        "huge": 2**70,
        "note": "done ✓ 'q' \"dq\"",
        "best": {"acc": 0.99, "epoch": 7, "tags": ["a", "b"]},
        "eval": {"acc": 0.875, "deep": {"f1": 0.75}},
        "loss": 0.015625,
    }
    for key, value in summary_sets.items():
        run.summary[key] = value
    del run.summary["tmp_metric"]
    run_id, project = run.id, run.project
    run.finish()
    return {
        "run_id": run_id,
        "project": project,
        "display_name": "edge run ✓",
        "config": config,
        "summary_sets": summary_sets,
        "summary_deletes": ["tmp_metric"],
        "steps": steps,
        "exit_code": 0,
    }


def _plain_run(wandb, out: Path, project: str, n_steps: int, n_keys: int, seed: int, config: dict):
    rng = random.Random(seed)
    run = wandb.init(mode="offline", dir=str(out), project=project, config=config)
    steps = []
    for step in range(n_steps):
        data = {}
        for k in range(n_keys):
            value = rng.random() * 10 ** rng.randint(-6, 6)
            data[f"metric_{k}"] = -value if rng.random() < 0.3 else value
        if step % 97 == 0:
            data["metric_0"] = float("nan")
        run.log(data)
        steps.append([step, data])
    return run, steps


def killed(wandb, out: Path, seed: int) -> None:
    run, steps = _plain_run(wandb, out, "killed-proj", 300, 4, seed, {"kind": "killed", "seed": seed})
    truth = {
        "run_id": run.id,
        "project": run.project,
        "config": {"kind": "killed", "seed": seed},
        "summary_sets": {},
        "summary_deletes": [],
        "steps": steps,
        "exit_code": None,
        "scenario": "killed",
    }
    _write_truth(out, "killed", truth)
    os.kill(os.getpid(), signal.SIGKILL)


def _finished_plain_run(wandb, out: Path, seed: int, project: str, steps: int, keys: int, config: dict,
                        exit_code: int) -> dict:  # fmt: skip
    run, logged = _plain_run(wandb, out, project, steps, keys, seed, config)
    run_id, project = run.id, run.project
    run.finish(exit_code=exit_code)
    return {
        "run_id": run_id,
        "project": project,
        "config": config,
        "summary_sets": {},
        "summary_deletes": [],
        "steps": logged,
        "exit_code": exit_code,
    }


def long(wandb, out: Path, seed: int) -> dict:
    config = {"kind": "long", "seed": seed, "optim": {"lr": 1e-4}}
    return _finished_plain_run(wandb, out, seed, "long-proj", 5000, 8, config, exit_code=0)


def failed(wandb, out: Path, seed: int) -> dict:
    return _finished_plain_run(wandb, out, seed, "failed-proj", 10, 3, {"kind": "failed"}, exit_code=1)


def live(wandb, out: Path, seed: int) -> dict:
    """Logs 3,000 steps, says so (OUT_DIR/paused) and waits for OUT_DIR/continue, then logs 1,000 more."""
    config = {"kind": "live", "seed": seed}
    run, first = _plain_run(wandb, out, "live-proj", 3000, 4, seed, config)
    (out / "paused").write_text(run.id)
    for _ in range(2400):
        if (out / "continue").exists():
            break
        time.sleep(0.05)
    else:
        raise SystemExit("never told to continue")
    rng = random.Random(seed + 1)
    later = []
    for step in range(3000, 4000):
        data = {f"metric_{k}": rng.random() for k in range(4)}
        run.log(data)
        later.append([step, data])
    run_id, project = run.id, run.project
    run.finish()
    return {"run_id": run_id, "project": project, "config": config, "summary_sets": {}, "summary_deletes": [],
            "steps": first + later, "exit_code": 0}  # fmt: skip


def main(argv: list[str]) -> int:
    out = Path(argv[1]).resolve()
    scenario = argv[2]
    seed = int(argv[3]) if len(argv) > 3 else 0
    out.mkdir(parents=True, exist_ok=True)
    _set_env(out)
    import wandb

    if scenario == "edge":
        truth = edge(wandb, out)
    elif scenario == "killed":
        killed(wandb, out, seed)
        return 1  # not reached
    elif scenario == "long":
        truth = long(wandb, out, seed)
    elif scenario == "failed":
        truth = failed(wandb, out, seed)
    elif scenario == "live":
        truth = live(wandb, out, seed)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    truth["scenario"] = scenario
    _write_truth(out, scenario, truth)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

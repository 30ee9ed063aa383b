"""`mvdata demo` (`run_demo`): a handful of realistic MicroVLM-E training runs written with the real wandb SDK,
offline; a small catalog of demo files in the real format, served on loopback; then every asset materialised with
the dagster CLI on that data.

Each run is written by its own child process (`python -m mvdata_assets.demo RUN_NAME OUT_DIR`),
so a run can be killed mid-training like a real crashed job, and the SDK's global state never
leaks into the caller.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

DEMO_RUNS = {
    # name: (learning rate, vision encoder, steps, killed at step)
    "siglip-lr3e-4": (3e-4, "siglip-so400m", 1500, None),
    "siglip-lr1e-4": (1e-4, "siglip-so400m", 1500, None),
    "clip-lr3e-4": (3e-4, "clip-vit-l14", 1200, None),
    "clip-lr6e-4-killed": (6e-4, "clip-vit-l14", 1500, 700),
}
DEMO_DATA = {"siglip-so400m": ["demo_coco", "demo_cc3m"], "clip-vit-l14": ["demo_coco", "demo_vqav2"]}


def write_run(name: str, out_dir: Path) -> None:
    import wandb  # imported here: only the child process that writes a run needs the SDK

    lr, encoder, steps, killed_at = DEMO_RUNS[name]
    rng = random.Random(name)
    run = wandb.init(
        project="MicroVLM-E",
        name=name,
        mode="offline",
        dir=str(out_dir),
        group=encoder,
        job_type="pretrain",
        tags=["demo", encoder],
        config={
            "model": {"vision_encoder": encoder, "llm": "qwen2.5-0.5b", "projector": "mlp2x_gelu"},
            "optim": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.05, "warmup_steps": 100},
            # the demo catalog's datasets: `wandb/run_datasets` joins these runs to them
            "data": {"datasets": DEMO_DATA[encoder], "batch_size": 64, "image_size": 384},
            "seed": rng.randint(0, 2**31),
        },
        settings=wandb.Settings(x_stats_sampling_interval=0.5, console="off"),
    )
    (out_dir / f".sidecars-{name}").write_text(" ".join(map(str, sidecar_pids())))
    for step in range(steps):
        warmup = min(1.0, (step + 1) / 100)
        lr_now = lr * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = 4.0 * math.exp(-step / (400 * (3e-4 / lr) ** 0.3)) + 0.9 + rng.gauss(0, 0.04)
        metrics = {
            "train/loss": loss,
            "train/lr": lr_now,
            "train/grad_norm": abs(rng.gauss(1.0, 0.3)),
            "train/tokens_per_s": rng.gauss(5200, 150),
        }
        if step % 100 == 99:
            metrics |= {
                "eval/loss": loss + 0.1,
                "eval/vqav2_acc": min(0.78, 0.3 + step / steps * 0.45 + rng.gauss(0, 0.01)),
                "eval/textvqa_acc": min(0.6, 0.15 + step / steps * 0.4 + rng.gauss(0, 0.01)),
            }
        run.log(metrics, step=step)
        if killed_at is not None and step == killed_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a job killed mid-training: no finish(), no exit record
    run.summary["best/eval_vqav2_acc"] = max(0.3, min(0.78, 0.75 - lr * 100))
    run.finish()


def proc_table() -> dict[int, tuple[int, int, str]]:
    """{pid: (ppid, session id, state)} of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def sidecar_pids() -> list[int]:
    """This process's children: after wandb.init, its wandb-core sidecar, which writes the run file."""
    return [pid for pid, (ppid, _, _) in proc_table().items() if ppid == os.getpid()]


def wait_for_exit(pids: list[int], timeout_s: float = 60.0) -> None:
    """Returns once none of `pids` runs any more (gone, or a zombie). Why here: a sidecar may outlive its writer
    (killed or not) and still append to the run file."""
    deadline = time.monotonic() + timeout_s
    while any(proc_table().get(pid, (0, 0, "X"))[2] not in ("Z", "X") for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} still running after {timeout_s} s")
        time.sleep(0.05)


def write_demo_runs(out_dir: Path) -> list[str]:
    """Writes the demo runs into out_dir/wandb unless they are there already; returns names written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any((out_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        return []
    # each writer starts its own wandb-core (not a service this process may have, named by WANDB_SERVICE): so a
    # killed writer's sidecar ends with it and its file is final once that sidecar is gone
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    children = {
        name: subprocess.Popen([sys.executable, "-m", "mvdata_assets.demo", name, str(out_dir)], env=env)
        for name in DEMO_RUNS
    }
    try:
        for name, child in children.items():
            code = child.wait()
            killed = DEMO_RUNS[name][3] is not None
            if code != 0 and not (killed and code == -signal.SIGKILL):
                raise RuntimeError(f"writing demo run {name} failed with exit code {code}")
            pids = out_dir / f".sidecars-{name}"
            wait_for_exit([int(pid) for pid in pids.read_text().split()])  # the run file is final only then
            pids.unlink()
    except BaseException:  # the other writers stop too, and no partial set is left to be taken for the demo's runs
        for child in children.values():
            child.kill()
            child.wait()
        shutil.rmtree(out_dir / "wandb", ignore_errors=True)
        raise
    return list(children)


# ---- the datasets half of the demo: a small catalog served from loopback -------------------------------------


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid solid-colour PNG, written by hand so the demo needs no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


DEMO_PORT = 47_817  # loopback port of the demo's file server, when free
ARCHIVE_TIME = (2017, 9, 1, 0, 0, 0)  # of every member of the demo's zip
DEMO_LIST_IMAGES = 48  # the demo CC3M list's images, fetched into 3 WebDataset shards of 16


def write_demo_files(www: Path, base_url: str) -> dict[str, bytes]:
    """Small stand-ins for COCO, VQAv2 and CC3M files: a zip of images + captions, JSON, a tar.gz, and a
    caption<TAB>url list whose images the same loopback server serves (at `base_url`)."""
    rng = random.Random(0)
    images = {f"val2017/{i:012d}.png": _png(32, 24, (rng.randrange(256), rng.randrange(256), 90)) for i in range(24)}
    captions = {"annotations": [{"image_id": i, "caption": f"a demo picture number {i}"} for i in range(24)]}
    # the archives carry fixed times instead of now: the same bytes every time, so a second demo finds its files
    # verified and downloads nothing
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        for name, data in [*images.items(), ("annotations/captions_val2017.json", json.dumps(captions).encode())]:
            archive.writestr(zipfile.ZipInfo(name, date_time=ARCHIVE_TIME), data)
    questions = [{"question_id": i, "image_id": i % 24, "question": "What colour is it?"} for i in range(100)]
    answers = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=answers, mode="wb", mtime=0) as gzipped,
        tarfile.open(fileobj=gzipped, mode="w") as archive,
    ):
        data = json.dumps([{"question_id": q["question_id"], "answer": "red"} for q in questions]).encode()
        info = tarfile.TarInfo("annotations/v2_demo_annotations.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    (www / "cc3m" / "img").mkdir(parents=True, exist_ok=True)
    for i in range(DEMO_LIST_IMAGES):
        (www / "cc3m" / "img" / f"{i}.png").write_bytes(_png(16, 16, (rng.randrange(256), 120, rng.randrange(256))))
    tsv = "".join(f"a demo caption {i}\t{base_url}/cc3m/img/{i}.png\n" for i in range(DEMO_LIST_IMAGES))
    files = {
        "coco/val2017_demo.zip": zipped.getvalue(),
        "vqav2/v2_demo_questions.json": json.dumps({"questions": questions}).encode(),
        "vqav2/v2_demo_annotations.tar.gz": answers.getvalue(),
        "cc3m/GCC-demo.tsv": tsv.encode(),
    }
    for name, data in files.items():
        (www / name).parent.mkdir(parents=True, exist_ok=True)
        (www / name).write_bytes(data)
    return files


def write_demo_catalog(path: Path, base_url: str, files: dict[str, bytes]) -> Path:
    """The demo catalog, in the same format as the real one, pointing at the loopback server."""

    def entry(name: str, extract: bool = False) -> dict:
        data = files[name]
        item = {"url": f"{base_url}/{name}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return item | ({"extract": True} if extract else {})

    catalog = {
        "datasets": {
            "demo_coco": {
                "description": "A few COCO-style images and captions (demo stand-in for coco)",
                "access": "public",
                "files": [entry("coco/val2017_demo.zip", extract=True)],
            },
            "demo_vqav2": {
                "description": "VQAv2-style questions and answers (demo stand-in for vqav2)",
                "access": "public",
                "files": [entry("vqav2/v2_demo_questions.json"), entry("vqav2/v2_demo_annotations.tar.gz", True)],
            },
            "demo_cc3m": {
                "description": "A CC3M-style URL list: caption<TAB>url, no header (demo stand-in for cc3m)",
                "access": "public",
                "files": [entry("cc3m/GCC-demo.tsv")],
                "url_list": {"format": "tsv", "header": False, "url_column": 1, "caption_column": 0, "shard_size": 16},
            },
            "demo_flickr30k": {
                "description": "Flickr30k needs a manual download (demo of a manual dataset)",
                "access": "manual",
                "instructions": "kaggle datasets download -d hsankesara/flickr-image-dataset",
            },
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


@contextmanager
def serve_directory(root: Path, port: int = 0) -> Iterator[str]:
    """Serves `root` on loopback for as long as the block runs (on `port` when it is free, else on any free
    port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        pass


def run_demo(home: Path) -> int:
    """Writes the W&B runs and the demo files, serves them, and materialises every asset with the dagster CLI."""
    runs = home / "demo" / "wandb-runs"
    written = write_demo_runs(runs)
    print(f"W&B runs: wrote {len(written)} offline runs" if written else f"W&B runs: already in {runs}")
    www = home / "demo" / "www"
    www.mkdir(parents=True, exist_ok=True)
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    instance_config = home / "dagster" / "dagster.yaml"
    if not instance_config.exists():  # no telemetry upload, no first-visit pop-up from dagster.io: loopback only
        instance_config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    log = home / "demo" / "materialize.log"
    # the same port each time when it is free: the demo list names it, so an unchanged list is not fetched again
    with serve_directory(www, DEMO_PORT) as base_url:
        files = write_demo_files(www, base_url)
        catalog = write_demo_catalog(home / "demo" / "catalog.yaml", base_url, files)
        print(f"Datasets: demo catalog {catalog} served from {base_url}")
        # set here too: the report printed after the demo reads the same settings
        os.environ.update(
            MVDATA_HOME=str(home),
            DAGSTER_HOME=str(home / "dagster"),
            MVDATA_WANDB_OFFLINE_DIRS=str(runs),
            MVDATA_CATALOG=str(catalog),
            WANDB_MODE="offline",  # no account needed: the download run is logged offline
            MVDATA_IMAGE_ALLOWED_NETWORKS="127.0.0.0/8",  # the demo's list images are served on loopback
        )
        env = {**os.environ, "WANDB_SILENT": "true"}
        dagster = Path(sys.executable).parent / "dagster"
        # one pass closes the loop: `datasets/download_summary` follows every dataset step and stores the download
        # run's own W&B log (written offline under $MVDATA_HOME/tracking) in the wandb tables; CI checks it
        command = [str(dagster), "asset", "materialize", "-m", "mvdata_assets.definitions", "--select", "*"]
        print(f"Materialising every asset: {' '.join(command[1:])} (log: {log})")
        with log.open("w") as out:
            code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(log.read_text()[-4000:])
        return code
    steps = log.read_text().count("STEP_SUCCESS")
    print(f"{steps} steps succeeded")
    return 0


if __name__ == "__main__":
    write_run(sys.argv[1], Path(sys.argv[2]))

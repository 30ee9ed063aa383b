"""Writes a handful of realistic MicroVLM-E training runs with the real wandb SDK, offline.

Each run is written by its own child process (`python -m mvdata_assets.demo RUN_NAME OUT_DIR`),
so a run can be killed mid-training like a real crashed job, and the SDK's global state never
leaks into the caller.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

DEMO_RUNS = {
    # name: (learning rate, vision encoder, steps, killed at step)
    "siglip-lr3e-4": (3e-4, "siglip-so400m", 1500, None),
    "siglip-lr1e-4": (1e-4, "siglip-so400m", 1500, None),
    "clip-lr3e-4": (3e-4, "clip-vit-l14", 1200, None),
    "clip-lr6e-4-killed": (6e-4, "clip-vit-l14", 1500, 700),
}


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
            "data": {"datasets": ["coco", "llava_pretrain"], "batch_size": 64, "image_size": 384},
            "seed": rng.randint(0, 2**31),
        },
        settings=wandb.Settings(x_stats_sampling_interval=0.5, console="off"),
    )
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


def write_demo_runs(out_dir: Path) -> list[str]:
    """Writes the demo runs into out_dir/wandb unless they are there already; returns names written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any((out_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        return []
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    children = {
        name: subprocess.Popen([sys.executable, "-m", "mvdata_assets.demo", name, str(out_dir)], env=env)
        for name in DEMO_RUNS
    }
    for name, child in children.items():
        code = child.wait()
        killed = DEMO_RUNS[name][3] is not None
        if code != 0 and not (killed and code == -signal.SIGKILL):
            raise RuntimeError(f"writing demo run {name} failed with exit code {code}")
    return list(children)


if __name__ == "__main__":
    write_run(sys.argv[1], Path(sys.argv[2]))

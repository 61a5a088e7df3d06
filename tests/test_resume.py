"""A run killed after its last checkpoint resumes with `ckpt_path=last`: metrics logged past the
checkpoint are not kept twice, and W&B records carry the trainer's step (W&B drops records whose
own step goes backwards)."""

import csv
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.train import ENV, ROOT, common, configs, run_api

from saev.train import job as training
from saev.train import logs


def rows(path: pathlib.Path) -> list[tuple[int, str]]:
    with open(path, newline="") as fd:
        return [(int(r[0]), r[1]) for r in list(csv.reader(fd))[1:]]


@pytest.mark.slow
def test_kill_after_checkpoint_then_resume_logs_each_step_once(shard_root, tmp_path):
    base = common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2", "log_every=2"]
    base += ["ckpt_every=20", "run_id=cut"]
    long = ["n_train=2_000_000", "wandb.enabled=false"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *base, *long], cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = tmp_path / "cut" / "00-relu" / "metrics.csv"
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill it well between two checkpoints (every 20 steps)
            if ckpt.exists() and metrics.exists() and max(s for s, _ in rows(metrics)) % 20 >= 6:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the run never checkpointed and logged past it")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    logged_past = max(s for s, _ in rows(metrics))
    ckpt_step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    assert logged_past > ckpt_step  # what the killed attempt logged past its checkpoint
    end = ckpt_step + 10
    resumed = run_api(base + [f"n_train={end * 128}", "ckpt_path=last"])
    got = rows(resumed / "00-relu" / "metrics.csv")
    assert len(got) == len(set(got)), "a step was logged twice"
    steps = [s for s, m in got if m == "train/mse"]
    assert steps == list(range(2, end + 1, 2))


def test_wandb_records_carry_the_trainer_step(shard_root, tmp_path, monkeypatch):
    import wandb

    logged = []
    real_init = wandb.init

    def init(**kw):
        run = real_init(**kw)
        real_log = run.log

        def log(data, step=None, **rest):
            logged.append((data, step))
            return real_log(data, step=step, **rest)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    training.train([configs(common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2"])])
    assert len(logged) > 3
    for data, step in logged:
        assert step is None and isinstance(data[logs.MetricsLog.STEP_KEY], int)
    assert os.environ.get("WANDB_MODE") == "offline"

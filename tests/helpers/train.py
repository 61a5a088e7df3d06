"""Training runs for tests: configs composed from the real conf/, runs through the Python API or
`python train.py` (optionally under DDP on CPU), and their saved weights."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import safetensors.torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saev.train import config as train_config
from saev.train import job as training

train_config.register()

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def common(shard_root, runs_root) -> list[str]:
    return [
        f"data.shard_root={shard_root}", "data.layer=0", "data.batch_size=128",
        "data.val_fraction=0.125", "data.buffer_mb=4", "data.n_workers=1", "n_train=7680",
        f"runs_root={runs_root}", "lr=3e-3", "lr_warmup_steps=5", "log_every=10",
    ]  # fmt: skip


def configs(overrides: list[str]) -> train_config.TrainConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def run_api(overrides: list[str], names=None) -> pathlib.Path:
    cfg = configs(overrides + ["wandb.enabled=false"])
    cfgs = [cfg] if names is None else [dataclasses.replace(cfg, name=n) for n in names]
    return training.train(cfgs)


def weights(path: pathlib.Path) -> dict:
    return safetensors.torch.load_file(path / "sae.safetensors")


DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def train_cli(args: list[str], stderr: bool = False):
    cmd = [sys.executable, "train.py", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines.count(lines[-1]) == 1  # the run directory, printed once, last
    output = res.stdout + res.stderr
    return (pathlib.Path(lines[-1]), output) if stderr else pathlib.Path(lines[-1])

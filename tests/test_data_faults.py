"""Data faults a user meets on day one: unfinished recordings, stale normalization statistics,
and durability of what the recorder writes."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.shards import cfg_for, make_read_only, make_shards

from saev import shards
from saev.data import normalization
from saev.data.datamodule import ShardDataModule

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def unfinished_recording(tmp_path) -> pathlib.Path:
    """A recording killed after 2 of its 3 shards: metadata.json plans 20 examples, 14 exist."""
    md = shards.Metadata(
        model={"family": "test", "ckpt": "none"}, layers=(0,), cls_token=False,
        n_patches_per_example=4, d_model=8, dtype="float32", n_examples=20,
        examples_per_shard=7, data={"name": "synthetic"},
    )  # fmt: skip
    acts_NLTD = np.random.default_rng(0).normal(size=(14, 1, 4, 8)).astype(np.float32)
    with shards.ShardWriter(tmp_path, md) as writer:
        writer.add(acts_NLTD, [{"index": i} for i in range(14)])
    return writer.root


@pytest.mark.slow
def test_train_refuses_an_unfinished_recording_up_front(tmp_path):
    root = unfinished_recording(tmp_path)
    cmd = [sys.executable, "train.py", f"data.shard_root={root}", "data.layer=0"]
    cmd += [f"runs_root={tmp_path / 'runs'}", "data.batch_size=8", "n_train=64"]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert "has not finished (14 of 20 examples)" in err[0] and "record.py" in err[0]
    assert not (tmp_path / "runs").exists()  # refused before any run directory was made


def test_unfinished_recording_is_refused_by_every_reader(tmp_path):
    root = unfinished_recording(tmp_path)
    with pytest.raises(shards.ShardError, match="has not finished") as err:
        ShardDataModule(cfg_for(root, layer=0)).setup("fit")
    assert "\n" not in str(err.value)
    # The recorder itself still opens it to resume.
    assert shards.open_shards(root, require_complete=False).n_examples == 14


def rerecord_in_place(root: pathlib.Path, seed: int) -> None:
    """New values in every shard file, same metadata, names and sizes (as re-recording the same
    directory with other weights would leave it)."""
    rng = np.random.default_rng(seed)
    for f in shards.open_shards(root).files:
        size = f.path.stat().st_size // 4
        (rng.normal(size=size) * 3 + 5).astype(np.float32).tofile(f.path)


def stats_of(root, **kw):
    dm = ShardDataModule(cfg_for(root, scale_mean=True, scale_norm=True, **kw))
    dm.setup("fit")
    return dm.norm_stats


def test_norm_stats_are_recomputed_when_the_shards_change_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_CACHE", str(tmp_path / "cache"))
    root, _ = make_shards(tmp_path)
    old = stats_of(root)
    rerecord_in_place(root, seed=1)
    new = stats_of(root)
    assert not torch.allclose(new.mean_D, old.mean_D)
    # And they are the statistics of the new content: a cold estimate agrees.
    (root / normalization.STATS_DIR).rename(tmp_path / "old-stats")
    cold = stats_of(root)
    assert torch.equal(cold.mean_D, new.mean_D) and cold.scale == new.scale


def test_path_keyed_fallback_does_not_reuse_another_directory_s_stats(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_CACHE", str(tmp_path / "cache"))
    root, _ = make_shards(tmp_path)
    make_read_only(root, monkeypatch)
    old = stats_of(root)
    assert list((tmp_path / "cache").rglob("*.json"))  # cached by path in the fallback
    rerecord_in_place(root, seed=2)  # another dataset now lives at the same path
    new = stats_of(root)
    assert not torch.allclose(new.mean_D, old.mean_D)


def test_shard_writer_syncs_the_directory_after_each_rename(tmp_path, monkeypatch):
    """A rename is durable only once its directory is fsynced: the .bin's name must be synced
    before shards.json points at it, and shards.json's own rename before the writer moves on."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            events.append(("fsync-dir", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", pathlib.Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    root, _ = make_shards(tmp_path, n_examples=7, per_shard=7)
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    bin_i = next(i for i in renames if events[i][1] == "acts000000.bin")
    listing_i = next(i for i in renames if events[i][1] == "shards.json" and i > bin_i)
    dir_syncs = [i for i, e in enumerate(events) if e == ("fsync-dir", str(root))]
    assert any(bin_i < i < listing_i for i in dir_syncs)
    assert any(i > listing_i for i in dir_syncs)
    assert json.loads((root / "shards.json").read_text())[0]["name"] == "acts000000.bin"

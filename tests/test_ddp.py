"""DDP through `python train.py trainer.devices=2 trainer.strategy=ddp` on CPU (gloo), with real
processes: the ranks split every global batch, so the run ends where one process ends; one run
directory and one W&B run per SAE; `run_id=` and `ckpt_path=last` work."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers.train import DDP, common, train_cli

from saev import synthetic

SAES = "sweep={sae: [topk, relu]}"


def max_relative_difference(a: pathlib.Path, b: pathlib.Path) -> float:
    worst = 0.0
    for name in ("00-topk", "01-relu"):
        wa = safetensors.torch.load_file(a / name / "sae.safetensors")
        wb = safetensors.torch.load_file(b / name / "sae.safetensors")
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            diff = (wa[key] - wb[key]).norm() / wa[key].norm().clamp_min(1e-12)
            worst = max(worst, float(diff))
    return worst


@pytest.fixture(scope="module")
def one_process(shard_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("one")
    return train_cli(
        common(shard_root, runs) + ["sae.exp_factor=2", "run_id=one", SAES, "wandb.enabled=false"]
    )


@pytest.mark.slow
def test_ddp_run_ends_where_one_process_ends(shard_root, one_process, tmp_path):
    run = train_cli(common(shard_root, tmp_path) + ["sae.exp_factor=2", SAES, *DDP])
    assert [p.name for p in tmp_path.iterdir()] == [run.name]  # one run directory
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "00-topk", "01-relu", "checkpoints", "wandb",
    ]  # fmt: skip
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # one W&B run per SAE
    assert max_relative_difference(one_process, run) < 1e-5


@pytest.mark.slow
def test_ddp_resume_with_run_id_and_ckpt_path_last(shard_root, one_process, tmp_path):
    base = common(shard_root, tmp_path) + ["sae.exp_factor=2", SAES, *DDP, "wandb.enabled=false"]
    base += ["run_id=cut", "ckpt_every=5"]
    train_cli(base + ["n_train=3200"])  # stops at step 25 of 60, mid-epoch
    resumed = train_cli(base + ["ckpt_path=last"])
    assert resumed == tmp_path / "cut"
    assert max_relative_difference(one_process, resumed) < 1e-5
    logged = (resumed / "00-topk" / "metrics.csv").read_text().splitlines()
    assert len(logged) == len(set(logged))


@pytest.mark.slow
def test_ddp_on_a_tiny_recording_validates_and_ends_where_one_process_ends(tmp_path):
    """3 examples: 1 held out (a rank with nothing to validate) and a train split of 32 tokens,
    smaller than one batch per rank. Lightning refused a rank's zero-length validation loader,
    and the other rank then died on the closed connection."""
    cfg = synthetic.SyntheticConfig(d_model=16, n_features=32, active=3, n_examples=3)
    root = synthetic.write(tmp_path / "shards", cfg)
    args = [
        f"data.shard_root={root}", "data.layer=0", "data.batch_size=512", "data.val_fraction=0.34",
        "data.buffer_mb=4", "data.n_workers=1", "n_train=5120", f"runs_root={tmp_path}",
        "sae=topk", "sae.k=3", "sae.exp_factor=2", "wandb.enabled=false",
    ]  # fmt: skip
    runs = {
        n: train_cli([*args, f"run_id=ranks-{n}", *DDP[:1], f"trainer.devices={n}", DDP[2]])
        for n in (1, 2)
    }
    got = {n: json.loads((run / "00-topk" / "metrics.json").read_text()) for n, run in runs.items()}
    assert got[1]["step"] == got[2]["step"] == 10
    assert got[2]["val"]["nmse"] == pytest.approx(got[1]["val"]["nmse"], rel=1e-5)
    a, b = (safetensors.torch.load_file(r / "00-topk" / "sae.safetensors") for r in runs.values())
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_with_dropped_nonfinite_rows_finishes(shard_root, tmp_path):
    """Ranks that drop different numbers of NaN rows still take the same number of steps (a
    rank with fewer batches would leave the other waiting forever at the end)."""
    poisoned = tmp_path / "shards"
    shutil.copytree(shard_root, poisoned)
    (poisoned / "norm-stats").exists() and shutil.rmtree(poisoned / "norm-stats")
    first = poisoned / "acts000000.bin"
    acts_NTD = np.fromfile(first, dtype=np.float32).reshape(-1, 16, 16)
    acts_NTD[:20, 3:8, 0] = np.nan  # 5 tokens of each of the first 20 examples
    acts_NTD.tofile(first)
    args = common(poisoned, tmp_path / "runs") + ["sae=topk", "sae.exp_factor=2", *DDP]
    run, output = train_cli(args + ["data.skip_nonfinite=true", "wandb.enabled=false"], True)
    assert (run / "00-topk" / "sae.safetensors").exists()
    assert "non-finite activations" in output


@pytest.mark.slow
def test_ddp_inside_a_sweep_job(shard_root, tmp_path):
    """Lightning starts the other rank by re-running the program: it must re-run this job (in
    the job's run directory), not the whole multirun."""
    args = ["-m", *common(shard_root, tmp_path), "sae=topk,relu", "sae.exp_factor=2", *DDP]
    sweep_dir = train_cli(args + ["wandb.enabled=false"])
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["job-0"]
    rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:])
    for name in ("00-topk", "01-relu"):
        assert (sweep_dir / "job-0" / name / "sae.safetensors").exists()
    assert list((tmp_path / "multirun").iterdir()) == [sweep_dir]  # no second sweep

"""Synthetic ground-truth shards: format, determinism, CLI, recovery measure."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from saev import shards, synthetic


def test_write_is_valid_deterministic_and_sparse(tmp_path):
    cfg = synthetic.SyntheticConfig(
        d_model=8,
        n_features=16,
        active=2,
        noise=0.0,
        n_examples=20,
        n_patches=3,
        examples_per_shard=8,
    )
    root = synthetic.write(tmp_path, cfg)
    ss = shards.open_shards(root)
    assert ss.metadata.d_model == 8 and ss.n_examples == 20 and len(ss.files) == 3
    acts = np.concatenate([ss.memmap(i)[:, 0].reshape(-1, 8) for i in range(3)])
    dict_FD = synthetic.load_dictionary(root)
    assert dict_FD.shape == (16, 8)
    # Without noise each token is exactly 2 features with coefficients in [0.5, 1.5].
    coef, *_ = np.linalg.lstsq(dict_FD.numpy().T, acts.T, rcond=None)
    assert np.allclose(dict_FD.numpy().T @ coef, acts.T, atol=1e-4)
    again = synthetic.write(tmp_path / "again", cfg)
    assert (again / "acts000002.bin").read_bytes() == (root / "acts000002.bin").read_bytes()
    assert again.name == root.name


def test_offset_and_noise_change_the_data(tmp_path):
    base = dict(d_model=8, n_features=16, active=2, n_examples=4, n_patches=2, examples_per_shard=4)
    a = synthetic.write(tmp_path, synthetic.SyntheticConfig(**base, noise=0.0))
    b = synthetic.write(tmp_path, synthetic.SyntheticConfig(**base, noise=0.0, offset=10.0))
    xa = shards.open_shards(a).memmap(0).reshape(-1, 8)
    xb = shards.open_shards(b).memmap(0).reshape(-1, 8)
    assert np.allclose(np.linalg.norm(xb - xa, axis=-1), 10.0, atol=1e-4)


@pytest.mark.slow
def test_cli_and_bad_input(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "saev.synthetic",
        "--dump-to",
        str(tmp_path),
        "--n-examples",
        "4",
        "--d-model",
        "4",
        "--n-features",
        "8",
        "--active",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    root = res.stdout.strip().splitlines()[-1]
    assert shards.open_shards(root).metadata.n_examples == 4
    res = subprocess.run(cmd[:-1] + ["9"], capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.startswith("error: active=9 exceeds")


def test_recovery_measure():
    dict_FD = torch.nn.functional.normalize(torch.randn(10, 6), dim=-1)
    perfect = synthetic.recovery(torch.cat([dict_FD * 3, torch.randn(5, 6)]), dict_FD)
    assert perfect["recovered"] == 1.0 and perfect["mean_best_cos"] == pytest.approx(1.0)
    half = synthetic.recovery(dict_FD[:5], dict_FD)
    assert half["recovered"] == pytest.approx(0.5, abs=0.11)


def test_children_fire_only_with_their_parent():
    cfg = synthetic.SyntheticConfig(d_model=8, n_features=12, active=2, noise=0.0, children=2)
    assert cfg.n_parents == 4 and list(cfg.children_of(1)) == [6, 7]
    on_NF = synthetic.coefficients(cfg, 4000, torch.Generator().manual_seed(0)) > 0
    assert (on_NF[:, :4].sum(1) == 2).all()  # `active` parents per token
    for p in range(4):
        kids = list(cfg.children_of(p))
        assert not (on_NF[:, kids].any(1) & ~on_NF[:, p]).any()  # a child only with its parent
        assert (on_NF[:, kids].sum(1) <= 1).all()  # at most one child at a time
        share = on_NF[on_NF[:, p]][:, kids].any(1).float().mean()
        assert 0.45 < share < 0.55  # on half of the parent's tokens
    flat = synthetic.SyntheticConfig(d_model=8, n_features=12, active=2, noise=0.0)
    on_flat = synthetic.coefficients(flat, 4000, torch.Generator().manual_seed(0)) > 0
    assert (on_flat.sum(1) == 2).all() and on_flat[:, 4:].any()  # every feature fires alone
    with pytest.raises(ValueError, match="multiple of 1 \\+ children"):
        synthetic.SyntheticConfig(n_features=10, children=2)
    with pytest.raises(ValueError, match="exceeds the 4 parent features"):
        synthetic.SyntheticConfig(n_features=12, active=5, children=2)

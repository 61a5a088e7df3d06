"""`python visualize.py`: per-latent statistics and top tokens equal a brute-force computation."""

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import torch

from saev import nn, synthetic
from saev.data import OrderedLoader

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_visualize_matches_brute_force(tmp_path):
    cfg = synthetic.SyntheticConfig(
        d_model=8, n_features=16, active=2, noise=0.01, n_examples=40, n_patches=6,
        examples_per_shard=16,
    )  # fmt: skip
    shard_root = synthetic.write(tmp_path / "shards", cfg)
    torch.manual_seed(0)
    sae_cfg = nn.SAEConfig(
        activation="relu", d_model=8, d_sae=24, sparsity_coeff=1e-3, sparsity_warmup_steps=0,
        l1_decoder_norm=False,
    )  # fmt: skip
    sae = nn.SAE(sae_cfg)
    with torch.no_grad():  # random encoder and bias so that latents fire at varied rates
        sae.W_enc.normal_()
        sae.b_enc.uniform_(-1.5, 0.5)
    ckpt = sae.save(tmp_path / "sae")

    cmd = [sys.executable, "visualize.py", f"ckpt={ckpt}", f"data.shard_root={shard_root}"]
    cmd += ["data.layer=0", "data.batch_size=50", "top_k=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = pathlib.Path(res.stdout.strip().splitlines()[-1])
    assert out == ckpt / "visuals"

    # Brute force: every token's latents at once.
    batches = list(OrderedLoader(shard_root, 0, 10_000))
    x_ND = torch.cat([b["act"] for b in batches])
    ex_N = torch.cat([b["example_idx"] for b in batches])
    tok_N = torch.cat([b["token_idx"] for b in batches])
    with torch.no_grad():
        f_NS = nn.load(ckpt).encode(x_ND)
    assert len(f_NS) == 40 * 6
    with open(out / "latents.csv") as fd:
        rows = list(csv.DictReader(fd))
    freq_S = np.array([float(r["freq"]) for r in rows])
    max_S = np.array([float(r["max"]) for r in rows])
    np.testing.assert_allclose(freq_S, (f_NS > 0).double().mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(max_S, f_NS.max(0).values.numpy(), rtol=1e-5)
    assert 0 < freq_S.min() < freq_S.max() < 1  # latents fire at varied rates: a non-trivial case

    top = np.load(out / "top.npz")
    vals_KS, rows_KS = f_NS.topk(5, dim=0)
    np.testing.assert_allclose(top["values_SK"], vals_KS.T.numpy(), rtol=1e-5)
    for s in range(24):
        for j in range(5):
            if vals_KS[j, s] > 0:
                got = f_NS[
                    (ex_N == top["example_idx_SK"][s, j]) & (tok_N == top["token_idx_SK"][s, j]), s
                ]
                assert got.item() == vals_KS[j, s].item()


def test_visualize_bad_ckpt_is_one_line(tmp_path):
    cmd = [sys.executable, "visualize.py", f"ckpt={tmp_path / 'nothing'}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.json" in err[0]

"""The tiny recorded dataset that visualize's and the browser's tests share: shards from
`python record.py` (the tiny random ViT over synthetic images), a crafted ReLU SAE whose latents
fire at varied, known rates, and its rendered browser. The fixtures are module-scoped and offered
to every test module through tests/conftest.py."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from saev import nn
from saev.data.loaders import OrderedLoader

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
N_IMAGES, N_TOKENS, D = 24, 17, 64  # tiny ViT: CLS + 4x4 patches of 8 px, 64 wide
TWO_TOKENS, DEAD = 1, 2  # crafted latents: fires on exactly two tokens; never fires


def run(script, *args, cwd=ROOT):
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def last_line(res) -> pathlib.Path:
    assert res.returncode == 0, res.stderr[-3000:]
    return pathlib.Path(res.stdout.strip().splitlines()[-1])


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    return err[0]


@pytest.fixture(scope="module")
def recorded_shards(tmp_path_factory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("record")
    # 5 examples per shard file: the pass crosses files.
    args = [f"data.n_images={N_IMAGES}", "max_patches_per_shard=85", "n_workers=0"]
    return last_line(run("record.py", *args, f"dump_to={work}", cwd=work))


def all_tokens(shard_root, tokens="all"):
    batches = list(OrderedLoader(shard_root, -1, 100_000, tokens, n_workers=0))
    cat = lambda k: torch.cat([b[k] for b in batches])  # noqa: E731
    return cat("act"), cat("example_idx"), cat("token_idx")


def crafted_sae(x_ND: torch.Tensor, d_sae=24) -> nn.SAE:
    """ReLU SAE whose latents fire on varied fractions of the tokens; latent TWO_TOKENS on exactly
    two tokens, latent DEAD on none."""
    torch.manual_seed(0)
    cfg = nn.SAEConfig(
        activation="relu", d_model=D, d_sae=d_sae, sparsity_coeff=1e-3, sparsity_warmup_steps=0,
        l1_decoder_norm=False,
    )  # fmt: skip
    sae = nn.SAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_()
        proj_NS = x_ND @ sae.W_enc
        q_S = torch.linspace(0.3, 0.995, d_sae)
        sae.b_enc.copy_(-torch.quantile(proj_NS, q_S, dim=0).diagonal())
        top3 = proj_NS[:, TWO_TOKENS].topk(3).values
        sae.b_enc[TWO_TOKENS] = -(top3[1] + top3[2]) / 2
        sae.b_enc[DEAD] = -proj_NS[:, DEAD].max() - 1.0
    return sae


@pytest.fixture(scope="module")
def crafted_ckpt(recorded_shards, tmp_path_factory) -> pathlib.Path:
    x_ND, _, _ = all_tokens(recorded_shards)
    # The SAE says it was trained on all tokens (CLS included): the pass must default to that.
    train = {"data": {"shard_root": str(recorded_shards), "layer": -1, "tokens": "all"}}
    return crafted_sae(x_ND).save(tmp_path_factory.mktemp("sae") / "sae", {"train": train})


@pytest.fixture(scope="module")
def rendered(crafted_ckpt, tmp_path_factory):
    """Every live latent drawn once, grayscale and opaque so the heatmap's brightest cell is its
    largest activation."""
    out = tmp_path_factory.mktemp("vis") / "out"
    args = [f"ckpt={crafted_ckpt}", f"out={out}", "top_k=6", "n_images=3", "n_latents=1000"]
    args += ["heatmap.colormap=gray", "heatmap.opacity=1.0", "data.batch_size=50"]
    assert last_line(run("visualize.py", *args)) == out
    return out

"""Defaults that learn: the learning-rate rule in the width, recorded where the run is recorded;
and (slow) the recovery benchmark's defaults case."""

import dataclasses
import json
import pathlib
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saev import synthetic
from saev.nn import SAE
from saev.nn.config import dead_after
from saev.train import config as train_config
from saev.train import job as training
from saev.train.config import default_lr

ROOT = pathlib.Path(__file__).resolve().parents[1]
train_config.register()


def test_default_lr_rule():
    assert default_lr(2**14, "topk") == pytest.approx(2e-3)
    assert default_lr(2**16, "relu") == pytest.approx(1e-3)
    # Capped for narrow TopK-family SAEs, where the rule's steps would churn the dictionary.
    assert default_lr(4096, "batchtopk") == pytest.approx(4e-3)
    assert default_lr(2048, "topk") == default_lr(96, "batchtopk") == default_lr(1, "topk") == 5e-3
    assert default_lr(256, "jumprelu") == default_lr(256, "relu") == pytest.approx(2e-3 * 8)


def test_default_lr_is_resolved_recorded_and_used(tmp_path):
    torch.set_num_threads(1)
    cfg = synthetic.SyntheticConfig(
        d_model=16, n_features=32, active=3, n_examples=32, n_patches=16, examples_per_shard=32
    )
    root = synthetic.write(tmp_path / "shards", cfg)
    common = [
        f"data.shard_root={root}", "data.layer=0", "data.batch_size=64", "data.val_fraction=0.125",
        "data.buffer_mb=4", "data.n_workers=1", "n_train=640", f"runs_root={tmp_path}",
        "lr_warmup_steps=2", "log_every=5", "wandb.enabled=false", "sae=topk", "sae.k=3",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        ruled = OmegaConf.to_object(compose("train", overrides=[*common, "sae.exp_factor=2"]))
        given = OmegaConf.to_object(
            compose("train", overrides=[*common, "sae.d_sae=64", "lr=1e-3"])
        )
    assert ruled.lr is None  # d_sae is known only once the shards give d_model
    named = lambda c, n: dataclasses.replace(c, name=n)
    run = training.train([named(ruled, "ruled"), named(given, "given")])
    job = {c["name"]: c for c in json.loads((run / "job.json").read_text())}
    assert job["ruled"]["lr"] == pytest.approx(default_lr(32, "topk"))
    assert job["given"]["lr"] == 1e-3  # an explicit lr wins
    config = json.loads((run / "ruled" / "config.json").read_text())
    assert config["train"]["lr"] == pytest.approx(default_lr(32, "topk"))
    rows = [r.split(",") for r in (run / "ruled" / "metrics.csv").read_text().splitlines()[1:]]
    lrs = [float(v) for _, k, v in rows if k == "train/lr"]
    assert lrs[-1] == pytest.approx(default_lr(32, "topk"))


def test_dead_window_follows_the_run_length_unless_given():
    """AuxK's dead window defaults to a twentieth of the run (at most Gao et al.'s 10M), so a
    short run revives latents; an explicit sae.dead_after_tokens wins."""
    common = ["data.shard_root=/s", "data.layer=0", "sae=topk"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        short, long_, given = (
            OmegaConf.to_object(compose("train", overrides=[*common, *extra])).sae
            for extra in (["n_train=1000000"], ["n_train=10000000000"], ["sae.dead_after_tokens=7"])
        )
    assert (short.dead_after_tokens, long_.dead_after_tokens) == (50_000, 10_000_000)
    assert given.dead_after_tokens == 7
    assert SAE(dataclasses.replace(short, d_model=8, d_sae=64)).cfg.dead_window == 50_000


@pytest.mark.slow
def test_recovery_benchmark_defaults_case(tmp_path):
    """Every kind with conf/'s defaults (only width and k or the sparsity coefficient set)
    recovers >= 90% of the true features in 768k tokens (benchmarks/recovery.py --defaults)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recovery

    argv = ["recovery.py", "--defaults", "--dump-to", str(tmp_path / "d"), "--runs-root"]
    sys.argv = [*argv, str(tmp_path / "r")]
    args = recovery.parse_args()
    for name, got in recovery.run(args).items():
        assert got["recovered"] >= 0.9, (name, got)


def recover_directly(syn, kinds: tuple[str, ...], d_sae: int, tokens: int, seed: int) -> dict:
    """Each kind as conf/ ships it (only k and d_sae set, the lr rule, AuxK's dead window of a
    run of `tokens`) trained on fresh tokens by the module's step without Lightning (lr warm-up
    100, clipping 1.0 as conf/train.yaml); the fraction of true features each recovered."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    dict_FD = synthetic.make_dictionary(syn)[0]
    x0_ND = synthetic.sample(syn, 8192, gen)
    mean_D = x0_ND.mean(0)
    scale = (syn.d_model / (x0_ND - mean_D).pow(2).sum(-1).mean()).sqrt().item()  # scale_norm
    DATA = ["data.shard_root=unused", "data.layer=0", f"n_train={tokens}"]  # SAE settings only
    saes, opts = {}, {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for kind in kinds:
            over = [*DATA, f"sae={kind}", f"sae.k={syn.active}", f"sae.d_sae={d_sae}"]
            cfg = OmegaConf.to_object(compose("train", overrides=over))
            sae_cfg = dataclasses.replace(cfg.sae, dead_after_tokens=dead_after(tokens))
            saes[kind] = SAE(sae_cfg.resolve(syn.d_model))
            saes[kind].set_norm(mean_D, scale)
            assert cfg.lr == default_lr(d_sae, sae_cfg.activation)  # the rule's, resolved
            opts[kind] = torch.optim.Adam(saes[kind].parameters(), lr=cfg.lr)
            for group in opts[kind].param_groups:
                group["initial_lr"] = cfg.lr
    for step in range(tokens // 512):
        x_BD = synthetic.sample(syn, 512, gen)
        for name, sae in saes.items():
            sae.init_b_dec_(x_BD)
            for group in opts[name].param_groups:
                group["lr"] = group["initial_lr"] * min(1.0, (step + 1) / 100)
            loss = sae(x_BD, may_be_dead=step * 512 >= sae.cfg.dead_window).loss
            opts[name].zero_grad()
            loss.backward()
            sae.remove_parallel_grad_()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opts[name].step()
            sae.normalize_decoder_()
    return {n: synthetic.recovery(s.W_dec.detach(), dict_FD)["recovered"] for n, s in saes.items()}


@pytest.mark.slow
def test_batchtopk_and_matryoshka_defaults_recover_a_superposed_dictionary():
    """conf/'s BatchTopK and Matryoshka, only k and d_sae set, on the defaults family's case 1
    (d_model 32, 8x more features, k 4, width 2x; 1M tokens). Before the TopK warm-up and the
    size-weighted prefixes they recovered 37% and 25% of the features (TopK: 100%)
    (docs/training.md). About 40 s."""
    syn = synthetic.SyntheticConfig(d_model=32, n_features=256, active=4, noise=0.01, seed=1)
    got = recover_directly(syn, ("batchtopk", "matryoshka"), 512, 1_000_000, seed=2)
    assert got["batchtopk"] >= 0.9 and got["matryoshka"] >= 0.8, got


@pytest.mark.slow
def test_topk_family_defaults_recover_a_dictionary_as_wide_as_its_features():
    """The defaults family's case 6 (d_model 32, 96 features, k 3, d_sae 96, noise 0.1, 3M
    tokens): no latent to spare. At the uncapped width rule's lr (2.6e-2) TopK recovered 84-93%
    and BatchTopK 81-90% over four seeds; capped at 5e-3, 98-100% and 88-96% (docs/training.md,
    "The learning rate's cap"). About 40 s."""
    syn = synthetic.SyntheticConfig(d_model=32, n_features=96, active=3, noise=0.1, seed=6)
    got = recover_directly(syn, ("topk", "batchtopk"), 96, 3_000_000, seed=0)
    # Here: TopK 97.9%, BatchTopK 90.6% (uncapped: 94.8%, 88.5%). The BatchTopK ranges overlap
    # across seeds, so only TopK's bound tells the two apart; BatchTopK's is a floor.
    assert got["topk"] >= 0.95 and got["batchtopk"] >= 0.85, got

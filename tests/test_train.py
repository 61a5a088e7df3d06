"""`python train.py` end to end on tiny synthetic shards, and the training job's Python API.

Subprocess runs pay ~8 s of imports each, so one run trains every SAE kind through `sweep`.
Other job-level checks call `saev.train.job` in-process with configs composed from the real conf/.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers.train import ENV, ROOT, common, configs, run_api, weights

import saev.nn
from saev import cli, synthetic
from saev.data.config import DataConfig
from saev.data.datamodule import ShardDataModule
from saev.data.loaders import OrderedLoader
from saev.train import config as train_config
from saev.train import job as training
from saev.train.metrics import SAEMetrics
from saev.train.module import SAEModule

KINDS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
train_config.register()


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine are ~10x faster without OpenMP thread contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def recompute_val(sae_dir: pathlib.Path) -> dict:
    """Validation metrics of a saved SAE, from scratch: load, read the held-out split, measure."""
    cfg = json.loads((sae_dir / "config.json").read_text())
    sae = saev.nn.load(sae_dir)
    dm = ShardDataModule(DataConfig(**cfg["train"]["data"]))
    dm.setup("fit")
    metric = SAEMetrics(sae.cfg.d_model, sae.cfg.d_sae)
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = sae(batch["act"])
            metric.update(batch["act"], out.x_hat, out.f_x)
    dm.teardown()
    return metric.compute()


@pytest.mark.slow
def test_every_kind_trains_loads_and_matches_logged_metrics(shard_root, tmp_path):
    sweep = "sweep={sae: [" + ", ".join(KINDS) + "]}"
    cmd = [
        sys.executable,
        "train.py",
        *common(shard_root, tmp_path),
        "sae.exp_factor=4",
        "val_every=20",
        sweep,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = pathlib.Path(res.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path
    dirs = sorted(p for p in run_dir.iterdir() if (p / "sae.safetensors").exists())
    # Named <index>-<kind>; a Matryoshka SAE's kind names its activation too.
    kinds = [k if k != "matryoshka" else "matryoshka-batchtopk" for k in KINDS]
    assert [d.name for d in dirs] == [f"{i:02d}-{k}" for i, k in enumerate(kinds)]
    for d in dirs:
        sae = saev.nn.load(d)
        logged = json.loads((d / "metrics.json").read_text())
        assert logged["step"] == 60
        got = recompute_val(d)
        # Better than predicting the mean (whose nmse is 1) by a wide margin.
        assert logged["val"]["nmse"] < 0.5, (d.name, logged["val"])
        for key in ("nmse", "explained_variance", "l0", "dead", "dense"):
            assert logged["val"][key] == pytest.approx(float(got[key]), rel=1e-4, abs=1e-6), (
                d.name,
                key,
            )
        assert sae.W_dec.shape == (64, 16)
        rows = (d / "metrics.csv").read_text().splitlines()
        assert rows[0] == "step,metric,value"
        steps_with_val = {int(r.split(",")[0]) for r in rows[1:] if r.split(",")[1] == "val/nmse"}
        assert steps_with_val == {20, 40, 60}  # val_every=20, and at the end
        assert any(r.startswith("60,train/nmse,") for r in rows)
        config = json.loads((d / "config.json").read_text())
        assert config["shards"]["d_model"] == 16 and config["train"]["data"]["layer"] == 0
    # One offline W&B run per SAE, grouped by the job.
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == len(KINDS)


def test_resume_from_last_checkpoint_is_exact(shard_root, tmp_path):
    base = common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2", "ckpt_every=5"]
    full = run_api(base + ["run_id=full"])
    # The interrupted run stops at step 25 of 60 (its last checkpoint), then resumes: schedules
    # depend only on the step, and the loader is repositioned to the step's batch.
    run_api(base + ["run_id=cut", "n_train=3200"])
    with pytest.raises(ValueError, match="already holds a run; resume it with ckpt_path=last"):
        run_api(base + ["run_id=cut"])
    resumed = run_api(base + ["run_id=cut", "ckpt_path=last"])
    a, b = weights(full / "00-relu"), weights(resumed / "00-relu")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((resumed / "00-relu" / "metrics.json").read_text())["step"] == 60


def test_read_paths_train_the_same_weights(shard_root, tmp_path, monkeypatch):
    """data.read=pread (the path for sets larger than memory) feeds the SAEs exactly what mmap
    does; the tiny examples are sent through the range copy that the two paths differ in."""
    from saev.data import pipeline

    monkeypatch.setattr(pipeline, "SMALL_RUN_BYTES", 0)
    base = common(shard_root, tmp_path) + ["sae=topk", "sae.exp_factor=2", "n_train=1920"]
    runs = {
        read: run_api(base + [f"data.read={read}", f"run_id={read}"]) for read in ("mmap", "pread")
    }
    a, b = weights(runs["mmap"] / "00-topk"), weights(runs["pread"] / "00-topk")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert json.loads((runs["pread"] / "job.json").read_text())[0]["data"]["read"] == "pread"


def float16_shards(tmp_path) -> pathlib.Path:
    cfg = synthetic.SyntheticConfig(
        d_model=16, n_features=32, active=3, offset=3.0, n_examples=160, n_patches=16,
        examples_per_shard=64, dtype="float16",
    )  # fmt: skip
    return synthetic.write(tmp_path / "shards", cfg)


def test_16bit_batches_kept_for_the_device_train_the_same_weights(tmp_path, monkeypatch):
    """What a GPU run does with float16 shards (loader batches stay float16, the module up-casts
    them after the transfer), here on the CPU: exactly the weights of host up-casting."""
    root = float16_shards(tmp_path)
    base = common(root, tmp_path) + ["sae=topk", "sae.k=3", "sae.exp_factor=2", "n_train=1920"]
    host = run_api(base + ["run_id=host"])
    monkeypatch.setattr(training, "on_gpu", lambda job: True)
    dtypes = []
    real = SAEModule.on_after_batch_transfer
    monkeypatch.setattr(
        SAEModule,
        "on_after_batch_transfer",
        lambda self, b, i: (dtypes.append(b["act"].dtype), real(self, b, i))[1],
    )
    device = run_api(base + ["run_id=device"])
    assert set(dtypes) == {torch.float16}
    a, b = weights(host / "00-topk"), weights(device / "00-topk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_16bit_shards_reach_the_gpu_in_16_bits_and_train(tmp_path, monkeypatch):
    """float16 shards: batches leave the loader in float16 (half the bytes to copy and send) and
    become float32 on the GPU; the SAE learns as well as from float32 shards."""
    root = float16_shards(tmp_path)
    seen = []
    real = SAEModule.on_after_batch_transfer

    def spy(self, batch, dataloader_idx):
        out = real(self, batch, dataloader_idx)
        seen.append((batch["act"].dtype, batch["act"].device.type, out["act"].dtype))
        return out

    monkeypatch.setattr(SAEModule, "on_after_batch_transfer", spy)
    run = run_api(common(root, tmp_path) + ["sae=topk", "sae.k=3", "sae.exp_factor=2"])
    assert seen and set(seen) == {(torch.float16, "cuda", torch.float32)}
    metrics = json.loads((run / "00-topk" / "metrics.json").read_text())
    assert metrics["val"]["nmse"] < 0.5


def test_normalization_changes_what_the_sae_sees(shard_root, tmp_path):
    base = common(shard_root, tmp_path) + [
        "sae=topk",
        "sae.exp_factor=2",
        "sae.k=3",
        "n_train=1280",
    ]
    plain = run_api(base + ["run_id=plain", "data.scale_norm=false"]) / "00-topk"
    scaled = (
        run_api(base + ["run_id=scaled", "data.scale_mean=true", "data.scale_norm=true"])
        / "00-topk"
    )
    a, b = saev.nn.load(plain), saev.nn.load(scaled)
    assert torch.equal(a.norm_mean, torch.zeros(16)) and a.norm_scale == 1.0
    x = next(iter(OrderedLoader(shard_root, 0, 512, n_workers=0, buffer_mb=1)))["act"]
    seen = b.normalize(x)
    # The synthetic offset (norm 3) is removed and the mean squared norm becomes d_model.
    assert x.mean(0).norm() > 2.5 and seen.mean(0).norm() < 0.3
    assert seen.pow(2).sum(-1).mean() == pytest.approx(16, rel=0.1)
    assert not torch.allclose(a.W_dec, b.W_dec)
    # Both checkpoints take raw activations: the scaled SAE reconstructs raw inputs.
    assert ((b(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.5
    config = json.loads((scaled / "config.json").read_text())
    assert config["normalization"]["scale"] == pytest.approx(float(b.norm_scale))


def test_sparsity_and_lr_warmup_are_logged(shard_root, tmp_path):
    base = common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2", "n_train=2560"]
    warm = ["sae.sparsity_warmup_steps=40", "lr_warmup_steps=40", "log_every=5"]
    run = run_api(base + warm + ["sae.sparsity_coeff=4e-4"])
    rows = [r.split(",") for r in (run / "00-relu" / "metrics.csv").read_text().splitlines()[1:]]
    coeff = {int(s): float(v) for s, k, v in rows if k == "train/sparsity_coeff"}
    lr = {int(s): float(v) for s, k, v in rows if k == "train/lr"}
    assert coeff[10] == pytest.approx(4e-4 * 10 / 40) and coeff[20] == pytest.approx(4e-4 * 20 / 40)
    assert lr[10] == pytest.approx(3e-3 * 11 / 40) and lr[20] < lr[5] * 5


def test_non_finite_loss_stops_naming_sae_and_step(shard_root, tmp_path, capsys):
    base = common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2", "ckpt_every=1"]
    cfg = configs(base + ["wandb.enabled=false", "lr_warmup_steps=0", "run_id=boom"])
    ok = dataclasses.replace(cfg, name="ok", lr=1e-3)
    # Adam moves each weight by ~lr per step; without the unit-norm decoder the reconstruction
    # grows like (lr * step)^2 until its squared error overflows float32 a few steps in.
    unbounded = dataclasses.replace(cfg.sae, normalize_decoder=False)
    bad = dataclasses.replace(cfg, name="bad", lr=1e5, sae=unbounded)
    with pytest.raises(SystemExit) as exc:
        cli.run_or_exit(lambda: training.train([ok, bad]), training.USER_ERRORS)
    assert exc.value.code == 2
    # The progress bar comes first on stderr; the error is the whole last line.
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss for SAE bad at step ")
    ckpt = tmp_path / "boom" / "checkpoints" / "last.ckpt"
    assert f"last good checkpoint: {ckpt}" in err
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize(
    "override, message",
    [
        ("sae.d_model=99", "sae.d_model=99 but the shards hold d_model=16"),
        ("sae.k=1000", "sae.k=1000 is larger than d_sae=32"),
        ("sae.d_sae=0", "sae.d_sae must be positive"),
        ("lr=0", "lr must be positive"),
        ("sae.activation=gelu", "unknown SAE activation 'gelu'"),
        ("sae=gelu", "Could not find 'sae/gelu'"),
        ("sae.sparsity_coeff=1.0", "sae.sparsity_coeff applies only to"),
        ("data.layer=3", "layer 3"),
        ("data.read=direct", "data.read='direct' must be one of ('auto', 'mmap', 'pread')"),
    ],
)
def test_bad_input_fails_before_training(shard_root, tmp_path, capsys, override, message):
    overrides = common(shard_root, tmp_path) + ["sae=topk", "sae.exp_factor=2", override]
    with pytest.raises(SystemExit) as exc:
        cli.run_or_exit(lambda: training.train([configs(overrides)]), training.USER_ERRORS)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.glob("*/checkpoints"))


@pytest.mark.slow
def test_cli_error_is_one_line(shard_root, tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        *common(shard_root, tmp_path),
        "sae.exp_factor=2",
        "sae.k=1000",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: sae.k=1000 is larger than d_sae=32."
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_recovery_of_true_features(tmp_path):
    """TopK, BatchTopK and ReLU each find >= 90% of a known dictionary's features (cos > 0.9)."""
    syn = synthetic.SyntheticConfig(
        d_model=16, n_features=32, active=3, noise=0.01, n_examples=256, n_patches=64,
        examples_per_shard=256,
    )  # fmt: skip
    root = synthetic.write(tmp_path, syn)
    data = [
        f"data.shard_root={root}", "data.layer=0", "data.batch_size=256", "data.val_fraction=0.02",
        "data.buffer_mb=16", "data.n_workers=1", "n_train=102400", f"runs_root={tmp_path}",
        "lr=3e-3", "lr_warmup_steps=20", "log_every=100", "ckpt_every=100000",
        "wandb.enabled=false",
    ]  # fmt: skip
    width = ["sae.d_sae=128", "sae.exp_factor=null"]
    aux = ["sae.aux_k=64", "sae.dead_after_tokens=50000"]
    kinds = {
        "topk": ["sae=topk", "sae.k=3", *aux],
        "batchtopk": ["sae=batchtopk", "sae.k=3", *aux],
        "relu": ["sae=relu", "sae.sparsity_coeff=1.0", "sae.sparsity_warmup_steps=100"],
    }
    cfgs = [dataclasses.replace(configs(data + width + o), name=n) for n, o in kinds.items()]
    run_dir = training.train(cfgs)
    dict_FD = synthetic.load_dictionary(root)
    for name in kinds:
        got = synthetic.recovery(saev.nn.load(run_dir / name).W_dec, dict_FD)
        assert got["recovered"] >= 0.9, (name, got)
        assert got["mean_best_cos"] > 0.9, (name, got)


def test_bf16_mixed_precision_trains(shard_root, tmp_path):
    base = common(shard_root, tmp_path) + [
        "sae=topk",
        "sae.exp_factor=2",
        "sae.k=3",
        "n_train=1280",
    ]
    run = run_api(base + ["precision=bf16-mixed"]) / "00-topk"
    ref = run_api(base + ["run_id=fp32"]) / "00-topk"
    a, b = weights(run), weights(ref)
    assert a["W_dec"].dtype == torch.float32  # mixed precision keeps float32 weights
    assert not torch.equal(a["W_dec"], b["W_dec"])  # but the step ran in bf16
    assert json.loads((run / "metrics.json").read_text())["val"]["nmse"] < 0.8


@pytest.mark.slow
def test_compiled_step_matches_eager(shard_root, tmp_path):
    base = common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2", "n_train=640"]
    eager = weights(run_api(base + ["run_id=eager"]) / "00-relu")
    compiled = weights(run_api(base + ["run_id=compiled", "compile=true"]) / "00-relu")
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


def test_unknown_sae_kind_on_the_command_line_is_one_line(capsys):
    cli.check_sae_choices(["sae=relu,topk", "lr=1"], ROOT / "conf")
    with pytest.raises(SystemExit):
        cli.check_sae_choices(["sae=relu,gelu"], ROOT / "conf")
    err = capsys.readouterr().err
    assert err.startswith("error: unknown SAE kind sae=gelu; choose one of ['batchtopk',")
    assert err.count("\n") == 1


def test_grad_clip_and_seed_are_per_sae(shard_root, tmp_path):
    cfg = configs(common(shard_root, tmp_path) + ["sae=relu", "sae.exp_factor=2", "n_train=640"])
    cfg = dataclasses.replace(cfg, wandb=dataclasses.replace(cfg.wandb, enabled=False))
    variants = {
        "base": cfg,
        "clipped": dataclasses.replace(cfg, grad_clip=1e-4),
        "unclipped": dataclasses.replace(cfg, grad_clip=0.0),
        "seed1": dataclasses.replace(cfg, seed=1),
    }
    run = training.train([dataclasses.replace(c, name=n) for n, c in variants.items()])
    w = {n: weights(run / n)["W_enc"] for n in variants}
    assert not torch.equal(w["base"], w["clipped"]) and not torch.equal(w["base"], w["seed1"])
    # Adam undoes a constant gradient scale, so clipping shows only where the clip factor varies
    # from step to step; a tiny max norm clips every step by a different factor.
    assert not torch.equal(w["clipped"], w["unclipped"])


def test_wandb_defaults_to_offline_without_network_or_account(shard_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = configs(common(shard_root, tmp_path) + ["sae=topk", "sae.exp_factor=2", "n_train=640"])
    run = training.train([dataclasses.replace(cfg, name=n) for n in ("a", "b")])
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(("-00", "-01")) for p in offline)

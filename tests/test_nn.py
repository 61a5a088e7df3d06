"""SAE modules through the Python API: shapes, each setting's effect on training, save/load."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from saev import nn as saev_nn
from saev.nn import SAE, SAEConfig

D, S = 16, 64

KIND = {
    "relu": dict(
        activation="relu", sparsity_coeff=1e-2, sparsity_warmup_steps=0, l1_decoder_norm=False
    ),
    "topk": dict(activation="topk", k=4, aux_k=16, aux_coeff=1 / 32),
    "batchtopk": dict(
        activation="batchtopk", k=4, aux_k=16, aux_coeff=1 / 32, threshold_momentum=0.1
    ),
    "jumprelu": dict(
        activation="jumprelu",
        sparsity_coeff=1e-3,
        sparsity_warmup_steps=0,
        bandwidth=0.05,
        init_threshold=0.05,
    ),
}


def make(kind="topk", seed=0, **kw) -> SAE:
    return SAE(SAEConfig(d_sae=S, **{**KIND[kind], **kw}).resolve(D), seed=seed)


def data(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dict_FD = torch.nn.functional.normalize(torch.randn(32, D, generator=gen), dim=-1)
    idx = torch.rand(n, 32, generator=gen).topk(3, dim=-1).indices
    coef = torch.zeros(n, 32).scatter(-1, idx, 0.5 + torch.rand(n, 3, generator=gen))
    return coef @ dict_FD + 2.0


def train(sae: SAE, x_ND: torch.Tensor, steps=30, lr=1e-2, batch=64) -> SAE:
    """A minimal copy of the module's step: init b_dec, Adam, parallel-grad removal, renorm."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for step in range(steps):
        x = x_ND[(step * batch) % len(x_ND) :][:batch]
        sae.init_b_dec_(x)
        out = sae(x)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
    return sae


def weights_differ(a: SAE, b: SAE) -> bool:
    return any(not torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind", list(KIND))
def test_shapes_and_output(kind):
    sae = make(kind)
    x = torch.randn(8, D)
    out = sae(x)
    assert isinstance(out, saev_nn.Output)
    assert out.x_hat.shape == (8, D) and out.f_x.shape == (8, S)
    assert sae.W_dec.shape == (S, D)
    assert sae.encode(x).shape == (8, S) and sae.decode(sae.encode(x)).shape == (8, D)
    assert torch.allclose(out.loss, out.mse + out.sparsity + out.aux)
    assert out.f_x.min() >= 0 or kind == "jumprelu"


def test_topk_keeps_k_per_example():
    sae = make("topk")
    assert ((sae.encode(torch.randn(32, D)) > 0).sum(-1) <= 4).all()


def test_batchtopk_trains_on_batch_budget_and_infers_per_example():
    sae = make("batchtopk")
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    f = sae(x).f_x
    assert (f > 0).sum() <= 4 * 64
    assert (f > 0).sum(-1).max() > 4  # the budget is shared across the batch, not per example
    assert torch.isfinite(sae.threshold)
    sae.eval()
    # The learned threshold makes inference independent of the batch (fresh inputs, so none sits
    # exactly on the threshold, which is one of the training batch's activations).
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    f_all = sae.encode(x)
    f_one = torch.cat([sae.encode(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(f_all, f_one, atol=1e-5)
    assert torch.equal(f_all > 0, sae.pre_acts(sae.normalize(x)) > sae.threshold)
    # Training moves the threshold it uses at inference (EMA of the smallest kept activation).
    before = sae.threshold.clone()
    train(sae, data(), steps=5)
    assert not torch.allclose(before, sae.threshold)


def test_batchtopk_topk_warmup_selects_per_example_first():
    sae = make("batchtopk", topk_warmup_steps=2)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    for _ in range(2):  # the warm-up: k latents of every example, as TopK
        assert torch.equal((sae(x).f_x > 0).sum(-1), torch.full((64,), 4))
    f = sae(x).f_x  # then the batch's k*B largest
    assert (f > 0).sum() <= 4 * 64 and (f > 0).sum(-1).max() > 4
    assert int(sae.steps_trained) == 3 and torch.isfinite(sae.threshold)
    # The warm-up's step count is saved, so a resumed run does not warm up again.
    again = make("batchtopk", topk_warmup_steps=2)
    again.load_state_dict(sae.state_dict())
    assert (again(x).f_x > 0).sum(-1).max() > 4


def test_batchtopk_threshold_momentum_changes_inference():
    x = data()
    a = train(make("batchtopk", threshold_momentum=0.5), x, steps=10).eval()
    b = train(make("batchtopk", threshold_momentum=0.01), x, steps=10).eval()
    assert not torch.allclose(a.threshold, b.threshold)
    assert not torch.equal(a.encode(x) > 0, b.encode(x) > 0)


def test_jumprelu_ste_gives_threshold_gradient():
    sae = make("jumprelu")
    out = sae(torch.randn(256, D))
    out.loss.backward()
    g_wide = sae.log_threshold.grad.clone()
    assert g_wide.abs().sum() > 0
    narrow = make("jumprelu", bandwidth=1e-4)
    narrow(torch.randn(256, D)).loss.backward()
    assert not torch.allclose(g_wide, narrow.log_threshold.grad)
    # Training moves the thresholds, and the L0 coefficient pushes them up (sparser).
    trained = train(make("jumprelu", sparsity_coeff=0.1), data(), steps=40)
    assert trained.log_threshold.mean() > make("jumprelu").log_threshold.mean()


def test_auxk_trains_dead_latents():
    x = data()
    on = make("topk", dead_after_tokens=64)
    off = make("topk", dead_after_tokens=64, aux_k=0)
    train(on, x, steps=3)
    train(off, x, steps=3)
    on.zero_grad(), off.zero_grad()
    out_on, out_off = on(x[:64]), off(x[:64])
    assert out_on.aux > 0 and out_off.aux == 0
    out_on.loss.backward()
    out_off.loss.backward()
    dead = off.tokens_since_fired >= 64
    assert dead.any()
    # Only AuxK sends gradient to the encoder columns of dead latents.
    assert on.W_enc.grad[:, dead].abs().sum() > 0
    assert off.W_enc.grad[:, dead].abs().sum() == 0


def test_decoder_unit_norm_and_parallel_gradient_removed():
    sae = make("relu")
    out = sae(data()[:64])
    out.loss.backward()
    sae.remove_parallel_grad_()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(S), atol=1e-5)
    trained = train(make("relu"), data())
    assert torch.allclose(trained.W_dec.norm(dim=-1), torch.ones(S), atol=1e-5)
    free = train(make("relu", normalize_decoder=False), data())
    assert not torch.allclose(free.W_dec.norm(dim=-1), torch.ones(S), atol=1e-3)


def test_l1_weighted_by_decoder_norm_changes_training():
    x = data()
    kw = dict(normalize_decoder=False, dec_init_norm=0.1)
    a = train(make("relu", l1_decoder_norm=True, **kw), x)
    b = train(make("relu", **kw), x)
    assert weights_differ(a, b)
    out = a(x[:8])
    f = out.f_x
    assert torch.allclose(out.sparsity, 1e-2 * (f @ a.W_dec.norm(dim=-1)).mean())


def test_init_choices():
    t = make("relu")
    assert torch.equal(t.W_enc, t.W_dec.T)
    r = make("relu", enc_init="random")
    assert not torch.allclose(r.W_enc, r.W_dec.T)
    assert weights_differ(train(make("relu"), data()), train(r, data()))
    x = data()[:64]
    m = make("relu")
    m.init_b_dec_(x)
    assert torch.allclose(m.b_dec, x.mean(0))
    z = make("relu", b_dec_init="zeros")
    z.init_b_dec_(x)
    assert torch.equal(z.b_dec, torch.zeros(D))
    assert weights_differ(
        train(make("relu"), data()), train(make("relu", b_dec_init="zeros"), data())
    )
    free = dict(normalize_decoder=False)
    small = make("relu", dec_init_norm=0.1, **free)
    assert torch.allclose(small.W_dec.norm(dim=-1), torch.full((S,), 0.1))
    assert weights_differ(train(make("relu", **free), data()), train(small, data()))


def test_matryoshka_prefix_losses():
    sae = make("topk", matryoshka=[0.25, 0.5])
    x = data()[:32]
    out = sae(x)
    f, W, b = out.f_x, sae.W_dec, sae.b_dec
    # Each prefix's loss weighs by its size (the default), or all alike (Bussmann et al. 2025).
    err = [(f[:, :m] @ W[:m] + b - x).pow(2).sum(-1).mean() for m in (16, 32, 64)]
    assert torch.allclose(out.mse, sum(e * m / 112 for e, m in zip(err, (16, 32, 64))))
    sae.cfg.matryoshka_weights = "equal"
    assert torch.allclose(sae(x).mse, sum(err) / 3)
    assert torch.allclose(out.x_hat, f @ W + b)
    plain = train(make("topk"), data())
    nested = train(make("topk", matryoshka=[0.25, 0.5]), data())
    assert weights_differ(plain, nested)
    # The first prefix alone reconstructs better when trained to (the point of Matryoshka).
    xs = data(seed=1)
    err = lambda s: (s.encode(xs)[:, :16] @ s.W_dec[:16] + s.b_dec - xs).pow(2).mean()
    assert err(nested) < err(plain)


def test_normalization_is_folded_in():
    x = data()[:16]
    mean, scale = x.mean(0), 0.5
    a = make("relu", seed=3)
    a.set_norm(mean, scale)
    b = make("relu", seed=3)
    assert torch.allclose(a.encode(x), b.encode((x - mean) * scale), atol=1e-6)
    assert torch.allclose(
        a.decode(a.encode(x)), b.decode(b.encode((x - mean) * scale)) / scale + mean, atol=1e-5
    )


@pytest.mark.parametrize("kind", list(KIND))
def test_save_load_roundtrip(tmp_path, kind):
    sae = train(make(kind, matryoshka=[0.5]), data(), steps=3)
    sae.set_norm(torch.arange(D).float(), 0.25)
    sae.save(tmp_path / "ckpt", extra={"note": 1})
    loaded = saev_nn.load(tmp_path / "ckpt")
    assert not loaded.training and loaded.cfg == sae.cfg
    sae.eval()
    x = data(seed=2)[:16]
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["normalization"]["scale"] == 0.25 and config["note"] == 1
    assert torch.equal(saev_nn.from_pretrained(tmp_path, subfolder="ckpt").W_dec, sae.W_dec)


def test_load_needs_neither_hydra_nor_lightning(tmp_path):
    make("topk").save(tmp_path)
    code = (
        "import sys, saev.nn as n; s = n.load(sys.argv[1]); "
        "assert not {'hydra', 'lightning', 'pytorch_lightning'} & set(sys.modules), 'imported'; "
        "print(tuple(s.W_dec.shape))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"({S}, {D})"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(activation="gelu"), "unknown SAE activation"),
        (
            dict(activation="topk", k=65, aux_k=0, aux_coeff=0.0, d_sae=64, d_model=D),
            "larger than d_sae",
        ),
        (dict(d_sae=0), "must be positive"),
        (dict(exp_factor=-1.0), "must be positive"),
        (
            dict(activation="topk", k=4, aux_k=0, aux_coeff=0.0, sparsity_coeff=1.0),
            "applies only to",
        ),
        (dict(activation="topk", aux_k=0, aux_coeff=0.0), "must be set"),
        (dict(l1_decoder_norm=True), "no effect"),
        (dict(matryoshka=[0.5, 0.25]), "increasing"),
        (dict(matryoshka_weights="log"), "size|equal"),
        (dict(topk_warmup_steps=10), "only to batchtopk"),
    ],
)
def test_config_errors(kw, message):
    base = dict(KIND["relu"]) if kw.get("activation", "relu") == "relu" else {}
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{**base, **kw})


def test_d_model_mismatch():
    cfg = SAEConfig(**KIND["relu"], d_model=32)
    with pytest.raises(ValueError, match="shards hold d_model=16"):
        cfg.resolve(16)
    assert dataclasses.replace(cfg, d_model=None).resolve(16).d_sae == 16 * 16

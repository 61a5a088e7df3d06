"""The sparse TopK-family step (saev.nn.sparse) against dense references: forward values and every
gradient, AuxK, Matryoshka, BatchTopK's exact batch selection, and bf16 pre-activations."""

import pytest
import torch

from saev.nn import SAE, SAEConfig, sparse

D, S, B = 16, 64, 48
KIND = {
    "topk": dict(activation="topk", k=4, aux_k=16, aux_coeff=1 / 32),
    "batchtopk": dict(
        activation="batchtopk", k=4, aux_k=16, aux_coeff=1 / 32, threshold_momentum=0.1
    ),
}


def make(kind, seed=0, **kw) -> SAE:
    """A float64 SAE with non-trivial biases, so that every gradient path is exercised."""
    sae = SAE(SAEConfig(d_sae=S, **{**KIND[kind], **kw}).resolve(D), seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(S, generator=gen, dtype=torch.float64))
        sae.b_dec.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
        sae.W_enc.add_(0.1 * torch.randn(D, S, generator=gen, dtype=torch.float64))
    return sae.train()


def batch(seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen, dtype=torch.float64) + 1.0


def dense_reference(sae: SAE, x_BD: torch.Tensor, dead_S: torch.Tensor | None):
    """The step written densely with plain autograd: b_dec folded into the bias, scatter of the
    top-k into a [B, S] tensor, dense decoder product, and AuxK as a masked dense top-k."""
    cfg = sae.cfg
    W_enc, b_enc, W_dec, b_dec = (
        p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    pre_BS = x_BD @ W_enc + (b_enc - b_dec @ W_enc)
    if cfg.activation == "topk":
        v, i = pre_BS.topk(cfg.k, dim=-1)
        f_BS = torch.zeros_like(pre_BS).scatter(-1, i, v.relu())
    else:
        pos = pre_BS.relu().flatten()
        v, i = pos.topk(cfg.k * len(x_BD))
        f_BS = torch.zeros_like(pos).scatter(0, i, v).view_as(pre_BS)
    if cfg.matryoshka:
        x_hat_BD, total, start = b_dec.expand_as(x_BD), 0.0, 0
        sizes = cfg.prefix_sizes
        for end in sizes:  # each prefix's loss weighs by its size (matryoshka_weights="size")
            x_hat_BD = x_hat_BD + f_BS[:, start:end] @ W_dec[start:end]
            err = (x_hat_BD - x_BD).pow(2).sum(-1).mean()
            total, start = total + err * (end / sum(sizes)), end
        mse = total
    else:
        x_hat_BD = f_BS @ W_dec + b_dec
        mse = (x_hat_BD - x_BD).pow(2).sum(-1).mean()
    aux = torch.zeros((), dtype=x_BD.dtype)
    if dead_S is not None and dead_S.any():
        k_aux = min(cfg.aux_k, S)
        v, i = pre_BS.masked_fill(~dead_S, float("-inf")).topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(pre_BS).scatter(-1, i, v.relu()).nan_to_num(0.0)
        e_BD = (x_BD - x_hat_BD).detach()
        var = (e_BD - e_BD.mean(0)).pow(2).mean()
        scale = min(int(dead_S.sum()) / k_aux, 1.0)
        aux = cfg.aux_coeff * scale * (f_aux @ W_dec - e_BD).pow(2).sum(-1).mean() / var
    loss = mse + aux
    loss.backward()
    grads = {"W_enc": W_enc.grad, "b_enc": b_enc.grad, "W_dec": W_dec.grad, "b_dec": b_dec.grad}
    return f_BS, x_hat_BD, mse, aux, loss, grads


def assert_grads(sae: SAE, grads: dict) -> None:
    """Every parameter's gradient equals the reference's."""
    for name, g in grads.items():
        torch.testing.assert_close(getattr(sae, name).grad, g, msg=name)


@pytest.mark.parametrize("kind", list(KIND))
@pytest.mark.parametrize("n_dead", [0, 5, 40])
@pytest.mark.parametrize("matryoshka", [[], [0.25, 0.5]])
def test_sparse_step_equals_dense_reference(kind, n_dead, matryoshka):
    """Forward values and the gradients of W_enc, b_enc, W_dec and b_dec, with AuxK over 0, a
    few (fewer than aux_k) and many dead latents."""
    sae = make(kind, dead_after_tokens=1000, matryoshka=matryoshka)
    dead_S = torch.zeros(S, dtype=torch.bool)
    dead_S[torch.randperm(S, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    sae.tokens_since_fired.copy_(torch.where(dead_S, 1000, 0))
    x = batch()
    f_ref, x_hat_ref, mse_ref, aux_ref, loss_ref, grads = dense_reference(sae, x, dead_S)
    out = sae(x)
    assert out.latents.is_sparse
    out.loss.backward()
    torch.testing.assert_close(out.f_x, f_ref)
    torch.testing.assert_close(out.x_hat, x_hat_ref)
    torch.testing.assert_close(out.mse, mse_ref)
    torch.testing.assert_close(out.aux, aux_ref)
    torch.testing.assert_close(out.loss, loss_ref)
    assert (out.aux > 0) == (n_dead > 0)
    assert_grads(sae, grads)
    # The fired-latent bookkeeping sees the same latents as the dense [B, S] tensor.
    fired = (f_ref > 0).any(0)
    assert torch.equal(sae.tokens_since_fired == 0, fired)


def test_pre_activations_reuse_one_workspace_across_steps_and_saes():
    """On CPU the TopK family computes its [B, S] pre-activations into one reused tensor: each
    step of two same-shape SAEs, interleaved, equals the dense reference on its own batch."""
    sparse._WORKSPACES.clear()
    saes = [make("topk", seed=0), make("batchtopk", seed=1)]
    pointers = set()
    for step in range(3):
        for sae in saes:
            x = batch(seed=step)
            _, x_hat_ref, _, _, loss_ref, grads = dense_reference(sae, x, None)
            sae.zero_grad()
            out = sae(x)
            out.loss.backward()
            torch.testing.assert_close(out.x_hat, x_hat_ref)
            torch.testing.assert_close(out.loss, loss_ref)
            assert_grads(sae, grads)
            pointers |= {t.data_ptr() for t in sparse._WORKSPACES.values()}
    assert [t.numel() for t in sparse._WORKSPACES.values()] == [B * S]
    assert len(pointers) == 1
    # A smaller shape is served from the same buffer; a larger one replaces it.
    small = sparse.workspace((B // 2, S), batch(), torch.float64)
    assert small.data_ptr() in pointers and small.shape == (B // 2, S)
    large = sparse.workspace((2 * B, S), batch(), torch.float64)
    assert large.shape == (2 * B, S) and [t.numel() for t in sparse._WORKSPACES.values()] == [
        2 * B * S
    ]
    # A workspace made under inference mode (validation comes first) still serves training.
    sparse._WORKSPACES.clear()
    with torch.inference_mode():
        saes[0](batch())
    saes[0](batch()).loss.backward()
    assert len(sparse._WORKSPACES) == 1


def test_auxk_skipped_without_dead_latents_and_before_dead_after_tokens():
    sae = make("topk", dead_after_tokens=1000)
    sae.tokens_since_fired.fill_(1000)
    assert sae(batch(), may_be_dead=False).aux == 0
    assert sae(batch()).aux > 0
    sae.tokens_since_fired.zero_()
    assert sae(batch()).aux == 0


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).requires_grad_()
    W_enc = torch.randn(4, 7, generator=gen, **{"dtype": torch.float64}).requires_grad_()
    b_enc, b_dec = torch.randn(7, **kw), torch.randn(4, **kw)
    dead_M = torch.tensor([1, 3, 6])

    def with_auxk(pre_BS):  # two groups: rows sorted within each, not across them
        return [sparse.topk_rows(pre_BS, 3), sparse.topk_among(pre_BS, dead_M, 2)]

    def topk(pre_BS):  # one group: rows sorted
        return [sparse.topk_rows(pre_BS, 3)]

    for select in (with_auxk, topk):

        def encode(x, W, be, bd, select=select):
            return tuple(g[0] for g in sparse.sparse_encode(x, W, be, bd, select))

        assert torch.autograd.gradcheck(encode, (x, W_enc, b_enc, b_dec))
    W_dec = torch.randn(7, 4, **kw)
    vals, rows, cols = sparse.topk_rows(torch.randn(5, 7, generator=gen, dtype=torch.float64), 3)
    vals = vals.abs().requires_grad_()
    lat = sparse.Latents((5, 7), vals, rows, cols)
    assert torch.autograd.gradcheck(lambda v, W: sparse.sparse_decode(lat, W, v), (vals, W_dec))
    assert torch.autograd.gradcheck(sparse.encoder_pre_acts, (x, W_enc, b_enc, b_dec))


@pytest.mark.parametrize("spread", [0.0, 3.0])
def test_batch_selection_is_exact_including_saturated_rows(spread):
    """The batch's n_keep largest, whether no row, one row (+10) or many rows (rows scaled by
    up to e^3) have all their candidates kept and are taken whole."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(32, 50, generator=gen) * (spread * torch.rand(32, 1, generator=gen)).exp()
    pre[3] += 10.0  # one row holds most of the batch's largest values: its candidates saturate
    cases = [(pre, n, r) for n, r in [(64, 8), (64, 50), (32 * 50, 8), (10, 2), (96, 3), (200, 7)]]
    cases.append((pre.abs() + 0.1, 64, 2))  # every row saturated: all taken whole
    for pre, n_keep, per_row in cases:
        vals, rows, cols = sparse.topk_batch(pre, n_keep, per_row)
        assert torch.equal(rows, rows.sort().values) and len(vals) == n_keep
        ref_v, ref_i = pre.relu().flatten().topk(n_keep)
        got = torch.zeros(32 * 50).index_put((rows * 50 + cols,), vals)
        ref = torch.zeros(32 * 50).scatter(0, ref_i, ref_v)
        torch.testing.assert_close(got, ref)
        assert len(torch.unique(rows * 50 + cols)) == n_keep  # no entry twice


def test_latents_densify_lazily_and_count_fired():
    sae = make("topk")
    out = sae(batch())
    assert out.latents._dense is None  # the step never built the [B, S] tensor
    f = out.f_x
    assert f.shape == (B, S) and out.latents._dense is f
    assert torch.equal(out.latents.fired_S(), (f > 0).any(0))
    for f_BS in (f, torch.zeros(0, S)):  # dense latents (ReLU, JumpReLU); a rank's empty batch
        assert torch.equal(sparse.Latents.from_dense(f_BS).fired_S(), (f_BS > 0).any(0))


def test_bf16_pre_acts_close_to_float32_at_large_data_mean():
    """At data mean 30x the signal, centering in float32 before the bf16 product keeps
    pre-activations within 1% of float32; the folded bias (b_enc - b_dec @ W_enc) does not."""
    gen = torch.Generator().manual_seed(0)
    d, s = 256, 1024
    sae = SAE(SAEConfig(d_sae=s, **KIND["topk"]).resolve(d), seed=0)
    mean_D = torch.randn(d, generator=gen)
    signal = torch.randn(512, d, generator=gen)
    x = signal + mean_D * (30 * signal.norm(dim=-1).mean() / mean_D.norm())
    sae.init_b_dec_(x)
    ref = sae.pre_acts(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sae.pre_acts(x).float()
        folded = (x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)).float()
    rel = lambda p: ((p - ref).norm() / ref.norm()).item()
    assert rel(got) < 0.01, rel(got)
    assert rel(folded) > 0.03, rel(folded)
    overlap = lambda p: (
        (
            torch.zeros_like(ref).scatter(-1, p.topk(32).indices, 1.0)
            * torch.zeros_like(ref).scatter(-1, ref.topk(32).indices, 1.0)
        ).sum()
        / ref.numel()
        * s
        / 32
    )
    assert overlap(got) > 0.95 > overlap(folded)
    # The whole step runs under autocast, its gradients in float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.train()(x)
    out.loss.backward()
    assert sae.W_enc.grad.dtype == torch.float32 and torch.isfinite(sae.W_enc.grad).all()


def test_jumprelu_pre_acts_stay_float32_under_autocast():
    cfg = SAEConfig(
        activation="jumprelu", sparsity_coeff=1e-3, sparsity_warmup_steps=0, bandwidth=1e-3,
        init_threshold=1e-3, d_sae=S,
    ).resolve(D)  # fmt: skip
    sae = SAE(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sae.pre_acts(torch.randn(4, D)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(KIND))
def test_sparse_step_on_cuda_equals_dense_reference(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    sae = make(kind, dead_after_tokens=1000).cuda()
    sae.tokens_since_fired[:10] = 1000
    x = batch().cuda()
    dead_S = sae.tokens_since_fired >= 1000
    f_ref, x_hat_ref, _, aux_ref, loss_ref, grads = dense_reference(sae, x, dead_S)
    out = sae(x)
    out.loss.backward()
    torch.testing.assert_close(out.f_x, f_ref)
    torch.testing.assert_close(out.loss, loss_ref)
    assert_grads(sae, grads)

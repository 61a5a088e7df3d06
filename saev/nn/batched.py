"""Same-shape SAEs of one job as batched matrix products (docs/training.md, "Batched groups").

SAEs of a job whose kind (activation and Matryoshka prefixes) and shapes agree form a group, and
a training step runs each group's encoders as one `baddbmm` over stacked [N, D, S] weights and its
decoders as one `bmm` (dense kinds) or one `embedding_bag` over N*B bags (TopK family, latent ids
offset by n*S, so the group decodes as one wide sparse SAE). Everything else stays per SAE and
runs the same code as an SAE on its own (`SAE.losses`, `SAE.selector`): k, sparsity
coefficients and their warmup, JumpReLU bandwidths, BatchTopK thresholds, AuxK's dead latents,
and, in `SAEModule`, learning rates, schedules, clipping and metrics.

The stacked weights are `torch.stack` of each SAE's own Parameters, so gradients reach those
Parameters through autograd (DDP's hooks, per-SAE Adam groups and checkpoints see nothing new);
the copy costs N*D*S per weight, against the B*N*D*S of each product.

Each SAE centers its input by its own b_dec in float32 before the product, as
`sparse.encoder_pre_acts` does alone (the [N, B, D] centered inputs are small next to [N, B, S]),
rather than folding b_dec into the bias, which loses precision under bf16.

Shapes: N SAEs in a group, B batch, D d_model, S d_sae, M selected entries. Only torch is imported
here, like `saev.nn`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saev.nn import SAE, TOPK_FAMILY, Output, SAEConfig, sparse
from saev.nn.jumprelu import jumprelu_l0
from saev.nn.relu_l1 import relu_l1
from saev.nn.sparse import Latents


def group_key(cfg: SAEConfig) -> tuple:
    """What a group's SAEs must share: the batched products need one kind and one shape."""
    return (cfg.activation, tuple(cfg.matryoshka), cfg.d_model, cfg.d_sae)


def groups(cfgs: Sequence[SAEConfig]) -> list[list[int]]:
    """Indices of `cfgs` grouped by `group_key`, groups in order of their first member."""
    out: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        out.setdefault(group_key(cfg), []).append(i)
    return list(out.values())


def forward_group(
    saes: Sequence[SAE], x_BD: Tensor, scales_N: Sequence, dead_N: Sequence[bool]
) -> list[Output]:
    """`[sae(x_BD, scales_N[n], dead_N[n]) for n, sae in enumerate(saes)]` with the products
    batched; the SAEs must share `group_key` and be in training mode (else they run one by one)."""
    if len({group_key(s.cfg) for s in saes}) != 1:
        raise ValueError("a batched group needs SAEs of one kind and shape.")
    if len(saes) == 1 or not all(s.training for s in saes):
        return [sae(x_BD, scales_N[n], dead_N[n]) for n, sae in enumerate(saes)]
    x_NBD = torch.stack([sae.normalize(x_BD) for sae in saes])
    if saes[0].cfg.activation in TOPK_FAMILY:
        return _sparse_group(saes, x_NBD, dead_N)
    return _dense_group(saes, x_NBD, scales_N)


def _stack(saes: Sequence[SAE], name: str) -> Tensor:
    return torch.stack([getattr(sae, name) for sae in saes])


def _dense_group(saes: Sequence[SAE], x_NBD: Tensor, scales_N: Sequence) -> list[Output]:
    cfg, N = saes[0].cfg, len(saes)
    params = [_stack(saes, n) for n in ("W_enc", "b_enc", "b_dec")]
    # The activation in place on the pre-activations (not read again) with the sparsity term's
    # gradient fused, as for one SAE (saev.nn.relu_l1, saev.nn.jumprelu).
    if cfg.activation == "jumprelu":
        # float32 pre-activations under autocast, as SAE.pre_acts (the bandwidth is below bf16's
        # resolution).
        with torch.autocast(x_NBD.device.type, enabled=False):
            pre_NBS = _CenteredBmm.apply(x_NBD.float(), *params)
        theta_NS = _stack(saes, "log_threshold").exp()
        bw_N = [sae.cfg.bandwidth for sae in saes]
        f_NBS, penalty_NB = jumprelu_l0(pre_NBS, theta_NS, pre_NBS.new_tensor(bw_N))
    else:
        pre_NBS = _CenteredBmm.apply(x_NBD, *params)
        weights = [sae.l1_weights_S() for sae in saes]
        w_NS = None
        if any(w is not None for w in weights):  # l1_decoder_norm may differ within a group
            w_NS = torch.stack([pre_NBS.new_ones(cfg.d_sae) if w is None else w for w in weights])
        f_NBS, penalty_NB = relu_l1(pre_NBS, w_NS)
    decoded = [None] * N
    if not cfg.matryoshka:
        decoded = torch.bmm(f_NBS, _stack(saes, "W_dec")).unbind(0)
    # Per-SAE views by unbind, whose backward stacks the N gradients once; indexing [n] would
    # fill an [N, B, S] zero gradient per SAE.
    return [
        sae.losses(x_BD, Latents.from_dense(f_BS), scale, penalty_B=pen_B, decoded_BD=dec_BD)
        for sae, x_BD, f_BS, scale, pen_B, dec_BD in zip(
            saes, x_NBD.unbind(0), f_NBS.unbind(0), scales_N, penalty_NB.unbind(0), decoded
        )
    ]


def _sparse_group(saes: Sequence[SAE], x_NBD: Tensor, dead_N: Sequence[bool]) -> list[Output]:
    N, B, D = x_NBD.shape
    S = saes[0].cfg.d_sae
    deads = [sae.dead_latents(d) for sae, d in zip(saes, dead_N)]
    selects = [sae.selector(B, dead_M) for sae, dead_M in zip(saes, deads)]
    params = [_stack(saes, n) for n in ("W_enc", "b_enc", "b_dec")]
    flat = _SparseEncodeN.apply(x_NBD, *params, selects)
    per_sae, i = [], 0
    for dead_M in deads:  # each SAE's (vals, rows, cols) groups: kept entries, then AuxK's
        n_groups = 1 if dead_M is None else 2
        per_sae.append([tuple(flat[j : j + 3]) for j in range(i, i + 3 * n_groups, 3)])
        i += 3 * n_groups
    decoded = [None] * N
    if not saes[0].cfg.matryoshka:
        # One wide sparse SAE: example n*B + b, latent n*S + s.
        main = [g[0] for g in per_sae]
        wide = Latents(
            (N * B, N * S),
            torch.cat([v for v, _, _ in main]),
            torch.cat([r + n * B for n, (_, r, _) in enumerate(main)]),
            torch.cat([c + n * S for n, (_, _, c) in enumerate(main)]),
        )
        args = (wide.vals_N, wide.rows_N, wide.cols_N, wide.offsets_B(), _stack(saes, "W_dec"))
        decoded = _SparseDecodeN.apply(*args).unbind(0)
    return [
        sae.sparse_losses(x_BD, groups, dead_M, dec_BD)
        for sae, x_BD, groups, dead_M, dec_BD in zip(saes, x_NBD.unbind(0), per_sae, deads, decoded)
    ]


def _centered_forward(x_NBD, W_enc_NDS, b_enc_NS, b_dec_ND, reuse=False) -> tuple[Tensor, Tensor]:
    """`sparse._centered_forward` of each SAE, as one baddbmm (`reuse`: into a workspace)."""
    dtype, exact = sparse._compute_dtype(x_NBD), W_enc_NDS.dtype
    xc_NBD = x_NBD.to(exact) - b_dec_ND.to(exact)[:, None]
    N, B, S = x_NBD.shape[0], x_NBD.shape[1], W_enc_NDS.shape[2]
    out = sparse.workspace((N, B, S), x_NBD, dtype) if reuse else None
    with torch.autocast(x_NBD.device.type, enabled=False):
        pre_NBS = torch.baddbmm(
            b_enc_NS.to(dtype)[:, None], xc_NBD.to(dtype), W_enc_NDS.to(dtype), out=out
        )
    return xc_NBD, pre_NBS


class _CenteredBmm(torch.autograd.Function):
    """`sparse._CenteredLinear` of N SAEs: b_dec's gradient is -W_enc @ sum_b g_b per SAE."""

    @staticmethod
    def forward(ctx, x_NBD, W_enc_NDS, b_enc_NS, b_dec_ND):
        xc_NBD, pre_NBS = _centered_forward(x_NBD, W_enc_NDS, b_enc_NS, b_dec_ND)
        ctx.save_for_backward(xc_NBD.to(pre_NBS.dtype), W_enc_NDS)
        ctx.device_type = x_NBD.device.type
        return pre_NBS

    @staticmethod
    @sparse._exact
    def backward(ctx, g_NBS):
        xc_NBD, W_enc_NDS = ctx.saved_tensors
        exact = W_enc_NDS.dtype
        g_NS = g_NBS.sum(1, dtype=exact)  # no float32 copy of a bf16 [N, B, S]
        g_x = g_W = g_b_dec = None
        if ctx.needs_input_grad[0]:
            g_x = torch.bmm(g_NBS, W_enc_NDS.to(g_NBS.dtype).transpose(1, 2)).to(exact)
        if ctx.needs_input_grad[1]:
            g_W = torch.bmm(xc_NBD.transpose(1, 2), g_NBS.to(xc_NBD.dtype)).to(exact)
        if ctx.needs_input_grad[3]:
            g_b_dec = -torch.bmm(W_enc_NDS, g_NS[..., None]).squeeze(-1)
        return g_x, g_W, g_NS, g_b_dec


class _SparseEncodeN(torch.autograd.Function):
    """`sparse._SparseEncode` of N SAEs: one baddbmm, each SAE's own selection on its [B, S]
    slice, and a backward over all SAEs' entries at once (entry ids offset by n*B and n*S): one
    index_add for b_enc, one bmm for b_dec, and one sparse product for W_enc (`sparse.sparse_mm`).
    Returns, per SAE and per group of its selection, (vals, rows, cols) with the SAE's own ids."""

    @staticmethod
    def forward(ctx, x_NBD, W_enc_NDS, b_enc_NS, b_dec_ND, selects):
        # pre_NBS is dropped here, as in sparse._SparseEncode: into a reused workspace.
        xc_NBD, pre_NBS = _centered_forward(x_NBD, W_enc_NDS, b_enc_NS, b_dec_ND, reuse=True)
        N, B, S = pre_NBS.shape
        outs, rows, cols, vals = [], [], [], []
        for n, select in enumerate(selects):
            for raw_M, rows_M, cols_M in select(pre_NBS[n]):
                vals_M = raw_M.to(W_enc_NDS.dtype).clamp_min(0)
                outs += [vals_M, rows_M, cols_M]
                rows.append(rows_M + n * B)
                cols.append(cols_M + n * S)
                vals.append(vals_M)
        ctx.mark_non_differentiable(*outs[1::3], *outs[2::3])
        ctx.save_for_backward(xc_NBD, W_enc_NDS, torch.cat(rows), torch.cat(cols), torch.cat(vals))
        ctx.device_type, ctx.sizes = x_NBD.device.type, [len(v) for v in vals]
        return tuple(outs)

    @staticmethod
    @sparse._exact
    def backward(ctx, *grads):
        xc_NBD, W_enc_NDS, rows_M, cols_M, vals_M = ctx.saved_tensors
        vals = vals_M.split(ctx.sizes)
        N, B, D = xc_NBD.shape
        S = W_enc_NDS.shape[2]
        g_M = torch.cat(
            [torch.zeros_like(v) if g is None else g.to(v) for g, v in zip(grads[0::3], vals)]
        )
        # ReLU's derivative: zero where the selected value was not positive.
        g_M = g_M * (vals_M > 0)
        g_NS = g_M.new_zeros(N * S).index_add_(0, cols_M, g_M).view(N, S)
        g_x = g_W = g_b_dec = None
        if ctx.needs_input_grad[0]:
            W_T = W_enc_NDS.transpose(1, 2).reshape(N * S, D)
            g_x = sparse.sparse_mm(rows_M, cols_M, g_M, N * B, W_T).view(N, B, D)
        if ctx.needs_input_grad[1]:
            g_NSD = sparse.sparse_mm(cols_M, rows_M, g_M, N * S, xc_NBD.reshape(N * B, D))
            g_W = g_NSD.view(N, S, D).transpose(1, 2).to(W_enc_NDS.dtype)
        if ctx.needs_input_grad[3]:
            g_b_dec = -torch.bmm(W_enc_NDS, g_NS[..., None]).squeeze(-1)
        return g_x, g_W, g_NS, g_b_dec, None


class _SparseDecodeN(torch.autograd.Function):
    """`sparse._SparseDecode` of N SAEs as one wide SAE: one embedding_bag over N*B bags of the
    [N*S, D] stacked decoders (ids offset by n*B, n*S) and one per-entry backward kernel; W_dec's
    gradient one sparse product (`sparse.sparse_mm`). Returns [N, B, D]."""

    @staticmethod
    def forward(ctx, vals_M, rows_M, cols_M, offsets_M, W_dec_NSD):
        N, S, D = W_dec_NSD.shape
        ctx.save_for_backward(vals_M, rows_M, cols_M, offsets_M, W_dec_NSD)
        ctx.device_type = W_dec_NSD.device.type
        W_MD = W_dec_NSD.reshape(N * S, D)
        out = torch.nn.functional.embedding_bag(
            cols_M, W_MD, offsets_M, mode="sum", per_sample_weights=vals_M.to(W_MD.dtype)
        )
        return out.view(N, -1, D)

    @staticmethod
    @sparse._exact
    def backward(ctx, g_NBD):
        vals_M, rows_M, cols_M, offsets_M, W_dec_NSD = ctx.saved_tensors
        N, S, D = W_dec_NSD.shape
        g_NBD = g_NBD.to(W_dec_NSD.dtype).contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_NBD.view(-1, D), W_dec_NSD.reshape(N * S, D), cols_M, offsets_M, rows_M, 0, -1
            ).to(vals_M.dtype)
        if ctx.needs_input_grad[4]:
            g_W = sparse.sparse_mm(cols_M, rows_M, vals_M, N * S, g_NBD.view(-1, D)).view(N, S, D)
        return g_vals, None, None, None, g_W

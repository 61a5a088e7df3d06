"""Sparse training step of the TopK family: after the encoder's one dense product, every forward
and backward operation touches only the selected latents.

A TopK SAE keeps k of S latents per example, yet differentiating `scatter(topk(pre))` densely
pays a [B, S] gradient and a second B x S x D product for the encoder weight gradient. Here the
encoder weight gradient is a sparse [S, B] x dense [B, D] product over the B*k selected entries
(`sparse_mm`: itself an `embedding_bag`, a bag per latent), and decoding is `embedding_bag` over
the k active decoder rows with a sparse backward, so a step
costs one B x S x D product plus O(B k D) (the same accounting as EleutherAI's sparsify, whose
`fused_encoder.py` uses an index_add; this implementation is our own). Shapes: B batch, D d_model,
S d_sae, N selected entries, A AuxK entries.

Only torch is imported here, like `saev.nn`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor


class Latents:
    """The latents of one batch: sparse (entry n is latent `cols_N[n]` of example `rows_N[n]`,
    value `vals_N[n]`, rows in increasing order) or dense ([B, S]); `dense()` is computed only
    when asked (metrics, validation) and cached."""

    def __init__(
        self,
        shape: tuple[int, int],
        vals_N: Tensor | None = None,
        rows_N: Tensor | None = None,
        cols_N: Tensor | None = None,
        dense_BS: Tensor | None = None,
    ):
        self.shape = shape
        self.vals_N, self.rows_N, self.cols_N = vals_N, rows_N, cols_N
        self._dense, self._offsets = dense_BS, None

    @classmethod
    def from_dense(cls, f_BS: Tensor) -> Latents:
        return cls(tuple(f_BS.shape), dense_BS=f_BS)

    @property
    def is_sparse(self) -> bool:
        return self.vals_N is not None

    def dense(self) -> Tensor:
        """[B, S] latent activations (differentiable)."""
        if self._dense is None:
            f_BS = self.vals_N.new_zeros(self.shape)
            self._dense = f_BS.index_put((self.rows_N, self.cols_N), self.vals_N)
        return self._dense

    def fired_S(self) -> Tensor:
        """Which latents are positive on at least one example, [S] bool; no host sync."""
        if not self.is_sparse:
            f_BS = self._dense.detach()
            if len(f_BS) == 0:  # a DDP rank's empty batch (amax needs a row)
                return f_BS.new_zeros(f_BS.shape[1], dtype=torch.bool)
            return f_BS.amax(0) > 0  # one reduction: (f > 0).any(0) took 50 ms, this 8 ms here
        hits_S = self.vals_N.new_zeros(self.shape[1])
        return hits_S.index_add_(0, self.cols_N, (self.vals_N.detach() > 0).to(hits_S.dtype)) > 0

    def offsets_B(self) -> Tensor:
        """Start of each example's entries (for `embedding_bag`); rows must be sorted."""
        if self._offsets is None:
            counts_B = torch.bincount(self.rows_N, minlength=self.shape[0])
            self._offsets = counts_B.cumsum(0) - counts_B
        return self._offsets


def _exact(fn):
    """Run a backward (or a forward that must stay in the parameters' dtype) with autocast off:
    under bf16-mixed, Lightning runs the backward inside the autocast region, and autocast would
    turn these small, precision-sensitive products into bf16 ones."""

    @functools.wraps(fn)
    def wrapped(ctx, *args):
        with torch.autocast(ctx.device_type, enabled=False):
            return fn(ctx, *args)

    return wrapped


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def sparse_mm(
    rows_N: Tensor, cols_N: Tensor, vals_N: Tensor, n_rows: int, dense_CD: Tensor, rows_sorted=False
) -> Tensor:
    """[n_rows, D] = M @ dense_CD for the sparse [n_rows, C] matrix M whose entry n is vals_N[n] at
    (rows_N[n], cols_N[n]) (repeats add up): one `embedding_bag` with a bag per row of M, over the
    entries sorted by row (`rows_sorted`: they already are), without an [N, D] intermediate.

    On this 2-core CPU it is 3-6x faster than torch.sparse.mm of a COO matrix, which coalesces (a
    sort and a merge of all entries) and then loops over them: 3.5 against 11.3 ms for the W_enc
    gradient of B = 4096, S = 8192, D = 256, k = 32, and 0.9 against 5.8 ms for the input's."""
    if not rows_sorted:
        order_N = torch.argsort(rows_N, stable=True)  # stable: a fixed summation order
        cols_N, vals_N = cols_N[order_N], vals_N[order_N]
    counts = torch.bincount(rows_N, minlength=n_rows)
    return torch.nn.functional.embedding_bag(
        cols_N, dense_CD, counts.cumsum(0) - counts, mode="sum",
        per_sample_weights=vals_N.to(dense_CD.dtype),
    )  # fmt: skip


def encoder_pre_acts(x_BD: Tensor, W_enc_DS: Tensor, b_enc_S: Tensor, b_dec_D: Tensor) -> Tensor:
    """(x - b_dec) @ W_enc + b_enc with b_dec subtracted in float32 before the product: folding it
    into the bias (b_enc - b_dec @ W_enc) subtracts two rounded products, which in bf16 with a
    large data mean moves pre-activations by several percent. Differentiable (dense path)."""
    return _CenteredLinear.apply(x_BD, W_enc_DS, b_enc_S, b_dec_D)


_WORKSPACES: dict[torch.dtype, Tensor] = {}


def workspace(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype) -> Tensor | None:
    """A reused CPU tensor for pre-activations that never leave the forward that computes them
    (the TopK family selects from them and keeps only what it selected); None on a GPU (its
    caching allocator reuses memory already) or under torch.compile.

    A fresh [B, S] tensor is fresh memory, faulted in page by page at every step: on this 2-core
    VM a [4096, 256] x [256, 8192] product took 144-168 ms into a fresh output and 105-130 ms into
    a reused one. The SAEs of a step run one after another, so they all share one buffer per
    dtype, as large as the largest of them needs: no more memory than the step's peak."""
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    numel = math.prod(shape)
    if dtype not in _WORKSPACES or _WORKSPACES[dtype].numel() < numel:
        _WORKSPACES.pop(dtype, None)  # freed before the larger one is made
        with torch.inference_mode(False):  # a normal tensor, so that training may write it too
            _WORKSPACES[dtype] = torch.empty(numel, dtype=dtype)
    return _WORKSPACES[dtype][:numel].view(shape)


def _centered_forward(x_BD, W_enc_DS, b_enc_S, b_dec_D, reuse=False) -> tuple[Tensor, Tensor]:
    """(x - b_dec, its product with W_enc plus b_enc); `reuse`: into `workspace` where there is
    one (for pre-activations that the caller drops before returning)."""
    # The parameters' dtype (float32 under mixed precision) for everything but the product.
    dtype, exact = _compute_dtype(x_BD), W_enc_DS.dtype
    xc_BD = x_BD.to(exact) - b_dec_D.to(exact)
    B, S = x_BD.shape[0], W_enc_DS.shape[1]
    out = workspace((B, S), x_BD, dtype) if reuse else None
    with torch.autocast(x_BD.device.type, enabled=False):
        pre_BS = torch.addmm(b_enc_S.to(dtype), xc_BD.to(dtype), W_enc_DS.to(dtype), out=out)
    return xc_BD, pre_BS


class _CenteredLinear(torch.autograd.Function):
    """Dense encoder with b_dec's gradient as -W_enc @ sum_b g_b (a [D, S] x [S] product), not
    the B x S x D product that differentiating `x - b_dec` through the GEMM would cost."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DS, b_enc_S, b_dec_D):
        xc_BD, pre_BS = _centered_forward(x_BD, W_enc_DS, b_enc_S, b_dec_D)
        ctx.save_for_backward(xc_BD.to(pre_BS.dtype), W_enc_DS)
        ctx.device_type = x_BD.device.type
        return pre_BS

    @staticmethod
    @_exact
    def backward(ctx, g_BS):
        xc_BD, W_enc_DS = ctx.saved_tensors
        exact = W_enc_DS.dtype
        g_S = g_BS.sum(0, dtype=exact)  # not .to(exact): a float32 copy of a bf16 [B, S]
        g_x = g_W = None
        if ctx.needs_input_grad[0]:
            g_x = (g_BS @ W_enc_DS.to(g_BS.dtype).T).to(exact)
        if ctx.needs_input_grad[1]:
            g_W = (xc_BD.T @ g_BS.to(xc_BD.dtype)).to(exact)
        g_b_dec = -(W_enc_DS @ g_S) if ctx.needs_input_grad[3] else None
        return g_x, g_W, g_S, g_b_dec


Selector = Callable[[Tensor], list[tuple[Tensor, Tensor, Tensor]]]
"""pre_BS -> groups of (raw values, rows, cols) of selected entries (no gradient needed)."""


class _SparseEncode(torch.autograd.Function):
    """Encoder forward (one dense product), then `select`; returns, per group, the ReLU of the
    selected pre-activations (in the parameters' dtype) with their rows and columns. The backward
    sends the gradient of the selected values only: b_enc gets its index_add, W_enc a sparse
    [S, B] x [B, D] product, b_dec -W_enc @ g_S."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DS, b_enc_S, b_dec_D, select: Selector):
        # pre_BS is dropped here (the selection copies what it keeps): into a reused workspace.
        xc_BD, pre_BS = _centered_forward(x_BD, W_enc_DS, b_enc_S, b_dec_D, reuse=True)
        outs, rows, cols, vals = [], [], [], []
        for raw_N, rows_N, cols_N in select(pre_BS):
            vals_N = raw_N.to(W_enc_DS.dtype).clamp_min(0)
            outs += [vals_N, rows_N, cols_N]
            rows.append(rows_N)
            cols.append(cols_N)
            vals.append(vals_N)
        ctx.mark_non_differentiable(*rows, *cols)
        ctx.save_for_backward(xc_BD, W_enc_DS, *rows, *cols, *vals)
        ctx.n_groups, ctx.B, ctx.device_type = len(rows), x_BD.shape[0], x_BD.device.type
        return tuple(outs)

    @staticmethod
    @_exact
    def backward(ctx, *grads):
        n = ctx.n_groups
        xc_BD, W_enc_DS, *saved = ctx.saved_tensors
        rows, cols, vals = saved[:n], saved[n : 2 * n], saved[2 * n :]
        S = W_enc_DS.shape[1]
        gs = []
        for g_N, vals_N in zip(grads[0::3], vals):
            # ReLU's derivative: zero where the selected value was not positive.
            gs.append(torch.zeros_like(vals_N) if g_N is None else g_N.to(vals_N) * (vals_N > 0))
        cat = lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts)
        g_N, rows_N, cols_N = cat(gs), cat(rows), cat(cols)
        g_S = g_N.new_zeros(S).index_add_(0, cols_N, g_N)
        g_x = g_W = g_b_dec = None
        if ctx.needs_input_grad[0]:  # rows are sorted within each group, not across groups
            W_SD = W_enc_DS.T.contiguous()
            g_x = sparse_mm(rows_N, cols_N, g_N, ctx.B, W_SD, rows_sorted=n == 1)
        if ctx.needs_input_grad[1]:
            g_W = sparse_mm(cols_N, rows_N, g_N, S, xc_BD).T.to(W_enc_DS.dtype)
        if ctx.needs_input_grad[3]:
            g_b_dec = -(W_enc_DS @ g_S)
        return g_x, g_W, g_S, g_b_dec, None


def sparse_encode(
    x_BD: Tensor, W_enc_DS: Tensor, b_enc_S: Tensor, b_dec_D: Tensor, select: Selector
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Groups of (vals_N, rows_N, cols_N) chosen by `select` from the encoder pre-activations;
    only vals_N carries gradient (to x, W_enc, b_enc and b_dec)."""
    flat = _SparseEncode.apply(x_BD, W_enc_DS, b_enc_S, b_dec_D, select)
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


class _SparseDecode(torch.autograd.Function):
    """sum_n vals_N[n] * W_dec[cols_N[n]] into row rows_N[n], by `embedding_bag`; the backward
    computes W_dec's gradient as a sparse [S, B] x [B, D] product (the dense embedding_bag weight
    backward is ~10x slower on CPU) and the values' gradient with embedding_bag's own kernel."""

    @staticmethod
    def forward(ctx, vals_N, rows_N, cols_N, offsets_B, W_dec_SD):
        ctx.save_for_backward(vals_N, rows_N, cols_N, offsets_B, W_dec_SD)
        ctx.device_type = W_dec_SD.device.type
        return torch.nn.functional.embedding_bag(
            cols_N, W_dec_SD, offsets_B, mode="sum", per_sample_weights=vals_N.to(W_dec_SD.dtype)
        )

    @staticmethod
    @_exact
    def backward(ctx, g_BD):
        vals_N, rows_N, cols_N, offsets_B, W_dec_SD = ctx.saved_tensors
        g_BD = g_BD.to(W_dec_SD.dtype).contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            # The per-entry dot products g_BD[rows] . W_dec[cols], without an [N, D] gather.
            g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_BD, W_dec_SD, cols_N, offsets_B, rows_N, 0, -1
            ).to(vals_N.dtype)
        if ctx.needs_input_grad[4]:
            g_W = sparse_mm(cols_N, rows_N, vals_N, W_dec_SD.shape[0], g_BD)
        return g_vals, None, None, None, g_W


def sparse_decode(latents: Latents, W_dec_SD: Tensor, vals_N: Tensor | None = None) -> Tensor:
    """[B, D] = latents @ W_dec from the active rows only (`vals_N` replaces the values, e.g.
    masked to a Matryoshka prefix)."""
    vals_N = latents.vals_N if vals_N is None else vals_N
    offsets_B = latents.offsets_B()
    return _SparseDecode.apply(vals_N, latents.rows_N, latents.cols_N, offsets_B, W_dec_SD)


# -- selections --------------------------------------------------------------------------------
def topk_rows(pre_BS: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest pre-activations of each example as (raw, rows, cols), rows sorted."""
    B = pre_BS.shape[0]
    raw_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
    rows_N = torch.arange(B, device=pre_BS.device).repeat_interleave(k)
    return raw_BK.flatten(), rows_N, idx_BK.flatten()


def topk_batch(
    pre_BS: Tensor, n_keep: int, per_row: int, inplace: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The n_keep largest ReLU'd pre-activations of the whole batch (BatchTopK), rows sorted.

    One flat top-k over B*S values is ~5x slower than a per-row top-k on CPU, so the candidates
    are each row's `per_row` largest. Where all of a row's candidates are kept (and positive),
    more of that row may belong to the batch's largest: such a *saturated* row is then taken
    whole, and the top-k runs again over the other rows' candidates and those rows. One round
    is exact: a row that was not saturated has a candidate below the first threshold, which the
    second can only raise, so its other values stay out. The per-row top-k's cost grows with
    per_row (here 42, 67, 105 ms for 32, 64, 128 of 8192 latents, B = 4096), so per_row can be
    small (2k) and the rare rows with many active latents pay for themselves.
    """
    B, S = pre_BS.shape
    per_row = min(max(per_row, -(-n_keep // B)), S)
    # inplace: the caller drops pre_BS afterwards (a [B, S] copy less: fresh memory on CPU).
    pos_BS = pre_BS.clamp_min_(0) if inplace else pre_BS.clamp_min(0)
    if per_row == S:
        raw_N, flat_N = pos_BS.flatten().topk(n_keep, sorted=False)
        flat_N = flat_N.sort().values
        return pos_BS.flatten()[flat_N], flat_N // S, flat_N % S
    cand_BC, cidx_BC = pos_BS.topk(per_row, dim=-1, sorted=False)
    flat_N = cand_BC.flatten().topk(n_keep, sorted=False).indices
    full_B = torch.bincount(flat_N // per_row, minlength=B) >= per_row
    # A row whose candidates were all kept may hold more above the batch threshold, unless its
    # smallest candidate is already 0 (then the rest are 0 too).
    saturated_B = full_B & (cand_BC.min(-1).values > 0)
    if not bool(saturated_B.any()):  # one host sync
        flat_N = flat_N.sort().values
        return cand_BC.flatten()[flat_N], flat_N // per_row, cidx_BC.flatten()[flat_N]
    rows_R = saturated_B.nonzero().squeeze(1)
    others_O = (~saturated_B).nonzero().squeeze(1)
    n_cand = len(others_O) * per_row
    vals = torch.cat([cand_BC[others_O].flatten(), pos_BS[rows_R].flatten()])
    pick_N = vals.topk(n_keep, sorted=False).indices
    # Entry ids: others' candidates first, then the saturated rows whole.
    whole_N = (pick_N - n_cand).clamp_min(0)
    rows_N, cols_N = rows_R[whole_N // S], whole_N % S
    if n_cand:  # (else every row was saturated)
        is_cand_N, cand_N = pick_N < n_cand, pick_N.clamp_max(n_cand - 1)
        rows_N = torch.where(is_cand_N, others_O[cand_N // per_row], rows_N)
        cols_N = torch.where(is_cand_N, cidx_BC[others_O].flatten()[cand_N], cols_N)
    order_N = torch.argsort(rows_N * S + cols_N)  # rows sorted
    return vals[pick_N[order_N]], rows_N[order_N], cols_N[order_N]


def topk_among(pre_BS: Tensor, cols_M: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per example, the k largest pre-activations among the columns `cols_M` (AuxK's dead
    latents): an index_select of M columns, not a masked copy of all S."""
    raw_N, rows_N, j_N = topk_rows(pre_BS.index_select(1, cols_M), min(k, len(cols_M)))
    return raw_N, rows_N, cols_M[j_N]

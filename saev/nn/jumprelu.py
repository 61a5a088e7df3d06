"""JumpReLU's straight-through estimators (Rajamanoharan et al. 2024): the threshold gets a
pseudo-derivative through a rectangle kernel of width `bandwidth`. Shapes: B batch, S d_sae, `...`
leading dims (N SAEs of a batched group).

`jumprelu_l0` is the training path: the activation and the L0 term as one autograd Function.
Differentiated apart (`JumpReLU` and an L0 `Step`, each with its rectangle kernel) they make about
fifteen fresh [B, S] tensors a step; the fused backward makes one and returns it as the gradient
(docs/training.md, "The ReLU and JumpReLU steps"). `JumpReLU` stays for `SAE.activate`
(inference, a custom loop).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """z * H(z - theta); the threshold's gradient uses a rectangle-kernel pseudo-derivative
    (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx, z_BS, theta_S, bandwidth):
        ctx.save_for_backward(z_BS, theta_S)
        ctx.bandwidth = bandwidth
        return z_BS * (z_BS > theta_S)

    @staticmethod
    def backward(ctx, g_BS):
        z_BS, theta_S = ctx.saved_tensors
        bw = ctx.bandwidth
        g_z = g_BS * (z_BS > theta_S)
        g_theta = (-(theta_S / bw) * _rect((z_BS - theta_S) / bw) * g_BS).sum(0)
        return g_z, g_theta, None


def jumprelu_l0(pre: Tensor, theta: Tensor, bandwidth: float | Tensor) -> tuple[Tensor, Tensor]:
    """(f, l0) of pre-activations [..., B, S]: f = pre * H(pre - theta), in place on `pre` (the
    caller must not read it again), and l0 = sum_s H(pre - theta) ([..., B], float32 or wider),
    with the paper's pseudo-derivatives for `theta` ([..., S], positive) through both (eq. 11
    and 12) and none for pre through the L0. `bandwidth`: a float, or one per leading index."""
    bw = torch.as_tensor(bandwidth, dtype=pre.dtype, device=pre.device)
    return _JumpReLUL0.apply(pre, theta, bw.reshape(bw.shape + (1, 1)))


class _JumpReLUL0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, bw):
        th = theta.unsqueeze(-2)  # [..., 1, S]: over the batch
        u = (z - th).div_(bw).abs_()  # |(z - theta) / bw|, as _rect's argument
        near = u < 0.5  # where the rectangle kernel is 1
        del u
        keep = z > th
        exact = torch.promote_types(z.dtype, torch.float32)
        l0 = keep.sum(-1, dtype=exact)
        f = z.mul_(keep)  # as JumpReLU: z * H(z - theta)
        ctx.mark_dirty(z)
        # f > 0 exactly where z > theta (theta > 0), so f stands in for the kept mask.
        ctx.save_for_backward(f, near, theta, bw)
        return f, l0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_f, g_l0):
        f, near, theta, bw = ctx.saved_tensors
        # d theta_s = -(1 / bw) sum_b near_bs (theta_s g_f,bs + g_l0,b): eq. 11 for f, 12 for l0.
        t = g_f * theta.unsqueeze(-2)
        t.add_(g_l0.to(t.dtype).unsqueeze(-1)).mul_(near)
        g_theta = t.sum(-2).div_(-bw.squeeze(-1))
        # The activation's derivative, 1 where z > theta (f > 0) else 0, into t's buffer (ours:
        # g_f itself may be another branch's gradient too).
        g = torch.ops.aten.threshold_backward.grad_input(g_f, f, 0, grad_input=t)
        return g, g_theta, None

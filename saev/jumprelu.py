"""JumpReLU's straight-through estimators (Rajamanoharan et al. 2024): the threshold gets a
pseudo-derivative through a rectangle kernel of width `bandwidth`. Shapes: B batch, S d_sae."""

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


class Step(torch.autograd.Function):
    """H(z - theta) with the same pseudo-derivative for theta and none for z (paper, eq. 12)."""

    @staticmethod
    def forward(ctx, z_BS, theta_S, bandwidth):
        ctx.save_for_backward(z_BS, theta_S)
        ctx.bandwidth = bandwidth
        return (z_BS > theta_S).to(z_BS.dtype)

    @staticmethod
    def backward(ctx, g_BS):
        z_BS, theta_S = ctx.saved_tensors
        bw = ctx.bandwidth
        g_theta = (-(1.0 / bw) * _rect((z_BS - theta_S) / bw) * g_BS).sum(0)
        return None, g_theta, None  # no gradient for z (eq. 12)

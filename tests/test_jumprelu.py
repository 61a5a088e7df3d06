"""saev.nn.jumprelu.jumprelu_l0: the fused JumpReLU + L0 Function equals the paper's two
straight-through estimators (Rajamanoharan et al. 2024, eqs. 11 and 12) differentiated apart."""

import pytest
import torch

from saev.nn.jumprelu import JumpReLU, _rect, jumprelu_l0


class Step(torch.autograd.Function):
    """The reference L0: H(z - theta), the rectangle-kernel pseudo-derivative for theta (eq. 12)
    and none for z."""

    @staticmethod
    def forward(ctx, z, theta, bw):
        ctx.save_for_backward(z, theta, bw)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta, bw = ctx.saved_tensors
        return None, (-(1.0 / bw) * _rect((z - theta) / bw) * g).sum(-2, keepdim=True), None


def reference(z, theta, bw):
    """The unfused pair; leading dims are moved behind the batch for JumpReLU's sum over dim 0."""
    th, bw_ = theta.unsqueeze(-2), bw.reshape(bw.shape + (1, 1))
    if z.dim() == 2:
        f = JumpReLU.apply(z, theta, bw_.squeeze(-1))
    else:
        f = JumpReLU.apply(z.transpose(0, 1), theta, bw_.squeeze(-1)).transpose(0, 1)
    return f, Step.apply(z, th, bw_).sum(-1)


@pytest.mark.parametrize("n", [None, 3])
@pytest.mark.parametrize("use", ["both", "l0 only", "f only"])
def test_values_and_gradients_equal_the_unfused_estimators(n, use):
    gen = torch.Generator().manual_seed(0)
    lead = () if n is None else (n,)
    B, S = 64, 9
    theta0 = 0.05 + torch.rand(lead + (S,), generator=gen, dtype=torch.float64)
    bw = torch.full(lead, 0.2, dtype=torch.float64)
    if n is not None:
        bw = torch.tensor([0.2, 0.05, 0.5], dtype=torch.float64)  # one per SAE
    z0 = theta0.unsqueeze(-2) + 0.4 * torch.randn(lead + (B, S), generator=gen, dtype=torch.float64)
    z0[..., 0, :] = theta0  # exactly at the threshold: not kept, inside the kernel
    W_dec = torch.randn(S, 4, generator=gen, dtype=torch.float64)
    coeff = torch.rand(lead + (B,), generator=gen, dtype=torch.float64)

    def run(fn):
        z = z0.clone().requires_grad_()
        theta = theta0.clone().requires_grad_()
        f, l0 = fn(z * 1.0, theta, bw)  # a non-leaf input (jumprelu_l0 writes it in place)
        terms = []
        if use != "l0 only":
            terms.append(((f @ W_dec) ** 2).sum())
        if use != "f only":
            terms.append((coeff * l0).sum())
        sum(terms).backward()
        return f.detach(), l0.detach(), z.grad, theta.grad

    got, want = run(jumprelu_l0), run(reference)
    assert bool((want[3] != 0).any())  # the kernel saw entries near the thresholds
    for g, r in zip(got, want):
        if r is None:  # z's gradient when only the L0 is used: none, materialized as zeros
            r = torch.zeros_like(g)
        torch.testing.assert_close(g, r)


def test_the_activation_is_in_place_and_the_l0_counts_kept_latents():
    z = torch.tensor([[0.5, 0.1, 2.0], [-1.0, 0.3, 0.31]])
    theta = torch.tensor([0.2, 0.2, 0.3])
    f, l0 = jumprelu_l0(z, theta, 0.001)
    assert f.data_ptr() == z.data_ptr()
    torch.testing.assert_close(f, torch.tensor([[0.5, 0.0, 2.0], [0.0, 0.3, 0.31]]))
    torch.testing.assert_close(l0, torch.tensor([2.0, 2.0]))


def test_an_incoming_gradient_that_another_branch_shares_is_not_written():
    gen = torch.Generator().manual_seed(1)
    z0, y0 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    theta0, bw = torch.full((5,), 0.1), torch.tensor(0.5)
    W = torch.randn(5, 3, generator=gen)

    def grads(fn):
        z, y_leaf = z0.clone().requires_grad_(), y0.clone().requires_grad_()
        theta = theta0.clone().requires_grad_()
        y = y_leaf * 2.0  # made before f: autograd runs its backward after jumprelu_l0's
        f, l0 = fn(z * 1.0, theta, bw)
        ((((f + y) @ W) ** 2).sum() + l0.sum()).backward()  # f and y share a gradient
        return z.grad, y_leaf.grad, theta.grad

    for got, want in zip(grads(jumprelu_l0), grads(reference)):
        torch.testing.assert_close(got, want)

"""saev.nn.relu_l1: the fused ReLU + L1 Function equals relu and its L1 differentiated apart."""

import pytest
import torch

from saev.nn.relu_l1 import relu_l1


def reference(pre, w):
    f = pre.relu()
    l1 = f.sum(-1) if w is None else (f * w.unsqueeze(-2)).sum(-1)
    return f, l1


@pytest.mark.parametrize("shape", [(7, 11), (3, 7, 11)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("use", ["both", "l1 only", "f only"])
def test_values_and_gradients_equal_the_unfused_reference(shape, weighted, use):
    gen = torch.Generator().manual_seed(0)
    pre0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    pre0[..., 0] = 0.0  # relu's derivative at 0 is 0 in torch: the same here
    w0 = (
        torch.rand(shape[:-2] + shape[-1:], generator=gen, dtype=torch.float64)
        if weighted
        else None
    )
    W_dec = torch.randn(shape[-1], 5, generator=gen, dtype=torch.float64)
    coeff = torch.rand(shape[:-1], generator=gen, dtype=torch.float64)

    def loss(fn):
        pre = pre0.clone().requires_grad_()
        w = None if w0 is None else w0.clone().requires_grad_()
        # A non-leaf input, as the encoder's output is (relu_l1 writes it in place).
        f, l1 = fn(pre * 1.0, w)
        terms = []
        if use != "l1 only":
            terms.append(((f @ W_dec) ** 2).sum())  # as the decoder uses f
        if use != "f only":
            terms.append((coeff * l1).sum())
        sum(terms).backward()
        return f.detach(), l1.detach(), pre.grad, None if w is None else w.grad

    got, want = loss(relu_l1), loss(reference)
    for g, r in zip(got, want):
        if r is None and g is not None:  # an unused output's gradient, materialized as zeros
            r = torch.zeros_like(g)
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r)


def test_relu_is_in_place_and_the_l1_float32():
    pre = torch.randn(4, 6, dtype=torch.bfloat16)
    f, l1 = relu_l1(pre)
    assert f.data_ptr() == pre.data_ptr() and bool((pre >= 0).all())
    assert l1.dtype == torch.float32
    torch.testing.assert_close(l1, f.float().sum(-1))


def test_an_incoming_gradient_that_another_branch_shares_is_not_written():
    # `f + y` hands f and y one gradient tensor; y's branch reads it after relu_l1's backward.
    gen = torch.Generator().manual_seed(1)
    pre0, y0 = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    W = torch.randn(5, 3, generator=gen)

    def grads(fn):
        pre, y_leaf = pre0.clone().requires_grad_(), y0.clone().requires_grad_()
        y = y_leaf * 2.0  # made before f: autograd runs its backward after relu_l1's
        f, l1 = fn(pre * 1.0)
        ((((f + y) @ W) ** 2).sum() + l1.sum()).backward()
        return pre.grad, y_leaf.grad

    for got, want in zip(grads(relu_l1), grads(reference_unweighted)):
        torch.testing.assert_close(got, want)


def reference_unweighted(pre):
    return reference(pre, None)

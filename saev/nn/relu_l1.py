"""The ReLU SAE's activation and its L1 penalty as one autograd Function.

Differentiated apart, `f = relu(pre)` and `l1 = f.sum(-1)` cost a training step three fresh
[B, S] tensors after the decoder's gradient: the L1 term's gradient, its sum with the decoder's
(autograd accumulates the two), and the ReLU's masked copy; a batched group ([N, B, S]) paid one
more, stacking the per-SAE L1 gradients. Fresh memory is faulted in page by page on CPU, and each
of them is 1 GiB at B = S = 16384 on a GPU. Here the backward adds the L1 term's gradient to the
decoder's and masks it in one buffer of its own. (Not in the incoming gradient itself: autograd
may give that tensor to another branch too, e.g. both operands of `f + y`.)

Shapes: leading dims `...` (B, or N SAEs by B), S d_sae. Only torch is imported here, like
`saev.nn`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relu_l1(pre: Tensor, w_S: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(f, l1): f = relu(pre), computed in place on `pre` (the caller must not read `pre`
    again), and l1 = sum_s w_s f_s over the last dim, in float32 or wider ([...]); `w_S` ([S],
    or [N, S] for N SAEs' [N, B, S] latents) weights each latent, e.g. by its decoder row norm;
    None: 1."""
    return _ReluL1.apply(pre, w_S)


class _ReluL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, w_S):
        f = pre.relu_()
        ctx.mark_dirty(pre)
        exact = torch.promote_types(f.dtype, torch.float32)  # a bf16 f's sum in float32
        if w_S is None:
            l1 = f.sum(-1, dtype=exact)
        else:  # [..., S] @ [..., S, 1]: one product per SAE
            l1 = torch.matmul(f, w_S.to(f.dtype).unsqueeze(-1)).squeeze(-1).to(exact)
        ctx.save_for_backward(f, w_S)
        ctx.device_type = pre.device.type
        return f, l1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_f, g_l1):
        f, w_S = ctx.saved_tensors
        with torch.autocast(ctx.device_type, enabled=False):
            # Into a buffer of our own, never into g_f: autograd may hand the same tensor to
            # another branch (`f + y` gives f and y one gradient), which would read it later.
            g = torch.empty_like(f, memory_format=torch.contiguous_format)
            c = g_l1.to(f.dtype).unsqueeze(-1)  # [..., 1]
            g_w = None
            if w_S is None:
                torch.add(g_f, c, out=g)
            else:
                torch.addcmul(g_f, c, w_S.to(f.dtype).unsqueeze(-2), out=g)  # w over the batch
                if ctx.needs_input_grad[1]:  # d l1_b / d w_s = f_bs
                    g_w = torch.matmul(g_l1.to(f.dtype).unsqueeze(-2), f).squeeze(-2)
                    g_w = g_w.to(w_S.dtype)
            # ReLU's derivative (0 where f = relu(pre) is 0, as torch's relu), in place on g.
            g = torch.ops.aten.threshold_backward.grad_input(g, f, 0, grad_input=g)
        return g, g_w

"""Evaluation metrics of an SAE as torchmetrics, accumulated in float64.

Reconstruction metrics are invariant to the affine normalization an SAE folds in, so they may be
fed raw or normalized activations (as long as inputs and reconstructions agree). Shapes: B batch,
D d_model, S d_sae.
"""

from __future__ import annotations

import torch
import torchmetrics
from torch import Tensor

DENSE_FREQ = 0.01
"""A latent firing on more than this fraction of tokens is dense."""
COUNT_ELEMENTS = 2**22
"""Latent activity is counted in row chunks of about this many [B, S] elements: summing a bool
tensor makes an int64 copy of it (1 GiB at B = S = 16384), a chunk's copy is 32 MiB."""


class SAEMetrics(torchmetrics.Metric):
    """Normalized MSE, explained variance, L0, dead and dense fractions, firing frequencies.

    - nmse: sum of squared errors over the total variance of the inputs about their mean.
    - explained_variance: 1 - (variance of the residual about its own mean) / (input variance),
      as sklearn's `explained_variance_score` with variance-weighted outputs; it differs from
      1 - nmse by the residual's mean (a constant bias the SAE fails to remove).
    - l0: mean number of active latents per token.
    - dead: fraction of latents that never fired on the tokens seen since the last reset.
    - dense: fraction of latents firing on more than `DENSE_FREQ` of those tokens.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, d_model: int, d_sae: int, **kwargs):
        super().__init__(**kwargs)
        f64 = dict(dtype=torch.float64)
        self.add_state("n", torch.zeros((), **f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("sse", torch.zeros((), **f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("sum_xsq", torch.zeros((), **f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("sum_x", torch.zeros(d_model, **f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("sum_r", torch.zeros(d_model, **f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("l0", torch.zeros((), **f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("fired", torch.zeros(d_sae, **f64), dist_reduce_fx="sum", persistent=True)

    def update(self, x_BD: Tensor, x_hat_BD: Tensor, f_BS: Tensor) -> None:
        x_BD, r_BD = x_BD.double(), (x_BD.double() - x_hat_BD.double())
        self.n += x_BD.shape[0]
        self.sse += r_BD.pow(2).sum()
        self.sum_xsq += x_BD.pow(2).sum()
        self.sum_x += x_BD.sum(0)
        self.sum_r += r_BD.sum(0)
        rows = max(1, COUNT_ELEMENTS // max(1, f_BS.shape[-1]))
        for f_bS in f_BS.split(rows):
            fired_S = (f_bS != 0).sum(0)
            self.fired += fired_S
            self.l0 += fired_S.sum()

    def compute(self) -> dict[str, Tensor]:
        """Scalars, plus `freqs`: each latent's firing frequency [S]."""
        n = self.n.clamp_min(1)
        total_var = (self.sum_xsq - self.sum_x.pow(2).sum() / n).clamp_min(1e-30)
        resid_var = self.sse - self.sum_r.pow(2).sum() / n
        freqs_S = self.fired / n
        return {
            "nmse": self.sse / total_var,
            "explained_variance": 1 - resid_var / total_var,
            "l0": self.l0 / n,
            "dead": (self.fired == 0).double().mean(),
            "dense": (freqs_S > DENSE_FREQ).double().mean(),
            "freqs": freqs_S,
        }


def dead_fraction(tokens_since_fired_S: Tensor, window: int) -> Tensor:
    """Fraction of latents that have not fired in the last `window` training tokens."""
    return (tokens_since_fired_S >= window).double().mean()

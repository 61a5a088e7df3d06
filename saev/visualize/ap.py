"""Average precision (AP) of F non-negative scores for every label, in bounded memory.

Exact AP needs every score, sorted: d_sae x tokens numbers. Instead each feature keeps counts per
(bin, label) over bins of its positive scores (`Histogram`: int32 [F, n_bins, n_labels]); scores
equal to 0 (a latent that does not fire) need no bin: they are the tokens left over, one tie at
the bottom.

Bins are float32 exponents plus the top `m` mantissa bits (`grid`): 2^m bins per octave, each
at most 2^-m wide relative to its value, with no scale to choose. Each feature keeps the
`n_bins` grid cells ending at its largest score so far; when that rises, its counts shift down
by whole cells and the cells falling off the bottom merge into bin 0 (everything further below).
So the final counts are exactly those of binning every score with the final maximum (`quantize`),
whatever the order the scores came in.

From the counts (`curves`): `average_precision` is scikit-learn's `average_precision_score` of
the quantized scores (a bin is one tie: one threshold), and `bounds` the AP of the worst and best
order of the scores inside each bin: the AP of the true scores lies in [lo, hi] (ties among true
scores included), and so does the quantized AP.
"""

from __future__ import annotations

import numpy as np
import torch

UNSEEN = -(2**62)
"""Grid cell of a feature's maximum before it has a positive score."""
MIN_OCTAVES = 10
"""Span of a feature's bins below its maximum that fixes the mantissa bits (a factor 1024)."""


def mantissa_bits(n_bins: int) -> int:
    """The most mantissa bits (finest bins, at most 7) whose n_bins still span MIN_OCTAVES."""
    m = 0
    while m < 7 and (n_bins >> (m + 1)) >= MIN_OCTAVES:
        m += 1
    return m


def grid(values_N: torch.Tensor, m: int) -> torch.Tensor:
    """Grid cell of positive float32 scores: monotone in the value (IEEE 754 bit order)."""
    return (values_N.float().contiguous().view(torch.int32) >> (23 - m)).long()


def lower_edge(cell: int, m: int) -> float:
    """Smallest float32 in a grid cell."""
    return float(np.array([cell << (23 - m)], dtype=np.int32).view(np.float32)[0])


def quantize(values_N: np.ndarray, n_bins: int, m: int) -> np.ndarray:
    """The bin `Histogram` puts each score in, given all of them: -1 for 0, else 0..n_bins-1
    (for brute-force checks with scikit-learn)."""
    v = torch.as_tensor(np.asarray(values_N, np.float32))
    out = torch.full(v.shape, -1, dtype=torch.int64)
    pos = v > 0
    if pos.any():
        g = grid(v[pos], m)
        out[pos] = (g - (g.max() - n_bins + 1)).clamp(min=0)
    return out.numpy()


class Histogram:
    """Per feature, counts of its positive scores per (bin, label); `add` as scores stream in."""

    def __init__(self, n_features: int, n_labels: int, n_bins: int, m: int, device):
        self.n_bins, self.n_labels, self.m = n_bins, n_labels, m
        self.count_FBL = torch.zeros(n_features, n_bins, n_labels, dtype=torch.int32, device=device)
        self.top_F = torch.full((n_features,), UNSEEN, dtype=torch.int64, device=device)
        self.n_L = torch.zeros(n_labels, dtype=torch.int64, device=device)
        """Units of each label, scored or not (the positives of each class)."""

    def add(self, scores_NF: torch.Tensor, labels_N: torch.Tensor) -> None:
        """Scores (>= 0) of N units, each with its label."""
        self.n_L += torch.bincount(labels_N, minlength=self.n_labels)
        rows, cols = scores_NF.nonzero(as_tuple=True)
        if not len(rows):
            return
        cell = grid(scores_NF[rows, cols], self.m)
        top_F = torch.full_like(self.top_F, UNSEEN).scatter_reduce_(0, cols, cell, "amax")
        self._raise(top_F)
        nb, L = self.n_bins, self.n_labels
        bin_ = (cell - (self.top_F - nb + 1)[cols]).clamp_(min=0)
        flat = (cols * nb + bin_) * L + labels_N[rows]
        ones = torch.ones(1, dtype=torch.int32, device=flat.device).expand(len(flat))
        self.count_FBL.view(-1).index_add_(0, flat, ones)

    def _raise(self, top_F: torch.Tensor) -> None:
        """Move the window of each feature whose maximum rose (rare once the stream settles)."""
        up = torch.nonzero(top_F > self.top_F).squeeze(1)
        if not len(up):
            return
        old, new = self.top_F[up], top_F[up]
        had = old != UNSEEN
        moved = up[had]
        if len(moved):
            rows_nBL = self.count_FBL[moved]
            shift_n = new[had] - old[had]
            arange = torch.arange(self.n_bins, device=up.device)
            dest_nB = (arange - shift_n[:, None]).clamp_(min=0)
            out = torch.zeros_like(rows_nBL)
            out.scatter_add_(1, dest_nB[..., None].expand_as(rows_nBL), rows_nBL)
            self.count_FBL[moved] = out
        self.top_F[up] = new


def curves(count_fBL: torch.Tensor, n_L: torch.Tensor, classes_C: torch.Tensor):
    """Per (feature, class), the positives of each tie group, highest first: the bins from the
    top down, then the zero group. Returns pos_fGC and all_fG (float64, G = n_bins + 1)."""
    count = count_fBL.flip(1).double()
    n = n_L.double()
    pos_fBC = count[..., classes_C]
    all_fB = count.sum(-1)
    pos_zero_fC = n[classes_C] - pos_fBC.sum(1)
    all_zero_f = n.sum() - all_fB.sum(1)
    pos_fGC = torch.cat([pos_fBC, pos_zero_fC[:, None]], dim=1)
    all_fG = torch.cat([all_fB, all_zero_f[:, None]], dim=1)
    return pos_fGC, all_fG


def average_precision(count_FBL, n_L, classes_C, chunk: int = 512) -> torch.Tensor:
    """AP [F, C] of the quantized scores, as scikit-learn's average_precision_score: the sum over
    thresholds of (recall step) x precision, a tie group being one threshold. Counts and their
    running sums are exact integers; precision and the sum are float32 (relative error ~1e-6),
    which halves the memory traffic of this, the probe's one-off cost at the end of a pass."""
    # A slice of labels, not a gather (3x slower on CPU); the absent classes inside it are
    # dropped from the small [f, C] result.
    lo, hi = int(classes_C.min()), int(classes_C.max()) + 1
    n = n_L.double()
    n_pos_C = n[lo:hi].float()
    prior_C = (n[lo:hi] / n.sum().clamp(min=1)).float()
    keep_C = classes_C - lo
    out = []
    for start in range(0, len(count_FBL), chunk):
        count_fBL = count_FBL[start : start + chunk]
        pos_fBC = count_fBL[..., lo:hi].flip(1)
        tp_fBC = pos_fBC.cumsum(1, dtype=torch.int32)
        all_fB = count_fBL.sum(-1, dtype=torch.int32).flip(1).cumsum(1, dtype=torch.int32)
        prec_fBC = tp_fBC.float() / all_fB.clamp(min=1).float()[..., None]
        binned_fC = (pos_fBC.float() * prec_fBC).sum(1)
        # The zero group keeps every unit: precision there is the class's prior.
        zero_fC = (n_pos_C - tp_fBC[:, -1].float()) * prior_C
        out.append(((binned_fC + zero_fC) / n_pos_C.clamp(min=1))[:, keep_C])
    return torch.cat(out)


def _harmonic_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """H(a) - H(b) of harmonic numbers, H(x) = digamma(x + 1) + Euler's gamma."""
    return torch.digamma(a + 1) - torch.digamma(b + 1)


def bounds(pos_G: torch.Tensor, all_G: torch.Tensor) -> tuple[float, float]:
    """AP of one (feature, class) with every bin's positives last (lo) or first (hi); the zero
    group is a true tie, scored as scikit-learn scores a tie.

    A bin with p positives and q negatives after A positives of B units: the j-th positive has
    precision (A + j) / (B + q + j) (last) or (A + j) / (B + j) (first), and
    sum_j (A + j) / (C + j) = p - (C - A) (H(C + p) - H(C)).
    """
    p, total = pos_G, all_G
    A = torch.cumsum(p, 0) - p
    B = torch.cumsum(total, 0) - total
    q = total - p
    lo_G = p - (B + q - A) * _harmonic_diff(B + q + p, B + q)
    hi_G = p - (B - A) * _harmonic_diff(B + p, B)
    tie = p[-1] * (A[-1] + p[-1]) / (B[-1] + total[-1]).clamp(min=1)
    lo_G[-1] = hi_G[-1] = tie
    n_pos = p.sum()
    return float(lo_G.sum() / n_pos), float(hi_G.sum() / n_pos)


def best_f1(pos_G: torch.Tensor, all_G: torch.Tensor) -> tuple[float, int]:
    """Largest F1 over the thresholds between groups, and the group it keeps down to."""
    tp_G = pos_G.cumsum(0)
    f1_G = 2 * tp_G / (all_G.cumsum(0) + pos_G.sum())
    g = int(f1_G.argmax())
    return float(f1_G[g]), g

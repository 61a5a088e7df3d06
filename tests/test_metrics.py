"""SAEMetrics against direct float64 recomputation."""

import numpy as np
import pytest
import torch

from saev.train import metrics
from saev.train.metrics import SAEMetrics, dead_fraction


@pytest.mark.parametrize("count_elements", [2**22, 45])  # 45: rows counted 2 at a time
def test_metrics_match_direct_computation(monkeypatch, count_elements):
    monkeypatch.setattr(metrics, "COUNT_ELEMENTS", count_elements)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen) * 3 + 5
    x_hat = x + 0.3 * torch.randn(300, 8, generator=gen) + 0.1
    f = torch.relu(torch.randn(300, 20, generator=gen) - 1.0)
    f[:, :3] = 0  # three dead latents
    f[:, 3] = 1.0  # one dense latent
    m = SAEMetrics(8, 20)
    for chunk in range(0, 300, 70):  # accumulation over uneven batches
        m.update(x[chunk : chunk + 70], x_hat[chunk : chunk + 70], f[chunk : chunk + 70])
    got = m.compute()
    xn, rn = x.double().numpy(), (x - x_hat).double().numpy()
    sst = ((xn - xn.mean(0)) ** 2).sum()
    assert np.isclose(got["nmse"].item(), (rn**2).sum() / sst, rtol=1e-9)
    assert np.isclose(
        got["explained_variance"].item(), 1 - ((rn - rn.mean(0)) ** 2).sum() / sst, rtol=1e-9
    )
    assert got["explained_variance"] > 1 - got["nmse"]  # the 0.1 bias counts only against nmse
    fn = f.numpy()
    assert np.isclose(got["l0"].item(), (fn != 0).sum(-1).mean())
    freqs = (fn != 0).mean(0)
    assert np.allclose(got["freqs"].numpy(), freqs)
    assert np.isclose(got["dead"].item(), 3 / 20)
    assert np.isclose(got["dense"].item(), (freqs > 0.01).mean())
    assert got["dense"] > 1 / 20 - 1e-9


def test_float64_accumulation_survives_large_offsets():
    # float32 sums of squares about a mean of 1e4 would lose the unit variance entirely.
    x = torch.randn(10_000, 4, generator=torch.Generator().manual_seed(1)) + 1e4
    m = SAEMetrics(4, 2)
    m.update(x, torch.full_like(x, 1e4), torch.ones(10_000, 2))
    assert abs(m.compute()["nmse"].item() - 1.0) < 0.01


def test_reset_and_dead_fraction():
    m = SAEMetrics(2, 3)
    m.update(torch.ones(4, 2), torch.zeros(4, 2), torch.tensor([[1.0, 0, 0]] * 4))
    m.reset()
    m.update(torch.randn(4, 2), torch.zeros(4, 2), torch.zeros(4, 3))
    assert m.compute()["dead"] == 1.0
    assert dead_fraction(torch.tensor([0, 5, 10]), 5).item() == 2 / 3

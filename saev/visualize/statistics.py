"""The pass behind `visualize.py ckpt=...`: per-latent statistics, top tokens, metrics, cached.

One pass over the shards in disk order through the SAE keeps, per latent, the `top_k` largest
activations and where they occurred (memory bounded by d_sae x top_k, never d_sae x tokens),
firing counts, sums and maxima, and feeds `SAEMetrics` (the training metrics, same definitions).
Dense `[B, d_sae]` latents never leave the device. Outputs in `out_dir`:

- `metrics.json`: nmse, explained_variance, l0, dead, dense (and what they were computed on);
- `latents.csv`: per latent: firing frequency, mean value when firing, max;
- `cache/pass.npz` (+ `cache/key.json`): everything rendering needs, so that changing filters or
  rendering settings never reads the activations again. The key is the checkpoint's weights
  (sha256), the shard set (its metadata.json and shards.json), layer, tokens and top_k; another
  key recomputes (as does `force=true`).

Rendering (`render`, `browser`) builds on this; `job` runs it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import typing

import numpy as np
import torch

from saev import shards
from saev.visualize.config import VisualizeConfig

if typing.TYPE_CHECKING:
    from saev.visualize.job import PassInputs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LatentSummary:
    """What one pass over the activations learned about each of the S latents."""

    n_tokens: int
    """Tokens seen."""
    count_S: np.ndarray
    """Tokens on which each latent fired (activation != 0, as SAEMetrics counts; activations
    of every SAE kind are non-negative, so this is activation > 0)."""
    sum_S: np.ndarray
    """Sum of each latent's activations."""
    max_S: np.ndarray
    """Largest activation of each latent (0 if it never fired)."""
    values_SK: np.ndarray
    """The K largest activations of each latent, descending; 0 in slots it did not fill."""
    example_idx_SK: np.ndarray
    """Example of each top activation; -1 in empty slots (a latent that fired on < K tokens)."""
    token_idx_SK: np.ndarray
    """Token of each top activation within its stored example (CLS is 0 if recorded); -1 empty."""

    @property
    def freq_S(self) -> np.ndarray:
        return self.count_S / max(self.n_tokens, 1)

    @property
    def mean_S(self) -> np.ndarray:
        """Mean activation when firing (0 for dead latents)."""
        return self.sum_S / np.maximum(self.count_S, 1)


@torch.no_grad()
def summarize(
    sae, batches, top_k: int, device, probe=None
) -> tuple[LatentSummary, dict[str, float]]:
    """Stream `batches` (dicts with `act`, `example_idx`, `token_idx`) through `sae` once; returns
    the per-latent summary and the SAE's metrics. `probe` (a `saev.visualize.probe.Probe`) sees
    every batch's activations and latents too."""
    from saev.train.metrics import SAEMetrics

    S = sae.cfg.d_sae
    metric = SAEMetrics(sae.cfg.d_model, S).to(device)
    sum_S = torch.zeros(S, dtype=torch.float64, device=device)
    max_S = torch.zeros(S, device=device)
    top_SK = torch.full((S, top_k), -torch.inf, device=device)
    where_SK2 = torch.full((S, top_k, 2), -1, dtype=torch.int64, device=device)
    n_tokens = 0
    for batch in batches:
        x_BD = batch["act"].to(device, non_blocking=True)
        f_BS = sae.encode(x_BD).float()
        metric.update(x_BD, sae.decode(f_BS), f_BS)  # also counts each latent's firings
        n_tokens += len(f_BS)
        # A float32 sum per batch (a float64 reduction over [B, S] is ~10x slower on CPU).
        sum_S += f_BS.sum(0)
        # Latents as contiguous rows: top-k along rows is ~2.5x faster on CPU than down columns.
        # Top-k of the batch first, so the merge is [S, 2K], never [S, B + K].
        vals_Sk, rows_Sk = f_BS.T.contiguous().topk(min(top_k, len(f_BS)), dim=1)
        max_S = torch.maximum(max_S, vals_Sk[:, 0])
        ex_B = batch["example_idx"].to(device, non_blocking=True)
        tok_B = batch["token_idx"].to(device, non_blocking=True)
        where_Sk2 = torch.stack([ex_B[rows_Sk], tok_B[rows_Sk]], dim=-1)
        top_SK, pick_SK = torch.cat([top_SK, vals_Sk], dim=1).topk(top_k, dim=1)
        where_SM2 = torch.cat([where_SK2, where_Sk2], dim=1)
        where_SK2 = torch.gather(where_SM2, 1, pick_SK[..., None].expand(-1, -1, 2))
        if probe is not None:
            probe.update(batch, x_BD, f_BS)
    # A slot holding a token on which the latent did not fire (or none) is empty: it must not
    # point at an example, or the browser would show images that do not activate the latent.
    empty_SK = ~(top_SK > 0)
    top_SK[empty_SK] = 0.0
    where_SK2[empty_SK] = -1
    values = metric.compute()
    metrics = {k: float(v) for k, v in values.items() if k != "freqs"}
    summary = LatentSummary(
        n_tokens,
        metric.fired.cpu().numpy(),
        sum_S.cpu().numpy(),
        max_S.cpu().numpy(),
        top_SK.cpu().numpy(),
        where_SK2[..., 0].contiguous().cpu().numpy(),
        where_SK2[..., 1].contiguous().cpu().numpy(),
    )
    return summary, metrics


def cache_dir(out_dir: pathlib.Path) -> pathlib.Path:
    return out_dir / "cache"


def load_cached(out_dir: pathlib.Path, key: dict) -> LatentSummary | None:
    """The cached summary for `key`, or None if there is none or it is for something else."""
    path = cache_dir(out_dir)
    try:
        if json.loads((path / "key.json").read_text()) != key:
            return None
        with np.load(path / "pass.npz") as z:
            return LatentSummary(int(z["n_tokens"]), *(z[f] for f in _ARRAYS))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError):
        return None


_ARRAYS = ("count_S", "sum_S", "max_S", "values_SK", "example_idx_SK", "token_idx_SK")


def save(out_dir: pathlib.Path, key: dict, summary: LatentSummary, metrics: dict, src: PassInputs):
    """Write metrics.json, latents.csv and the cache; the key goes last, so an interrupted save
    is never taken for a complete one."""
    import shutil

    path = cache_dir(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "key.json").unlink(missing_ok=True)
    # Heatmaps and crops belong to the previous pass's checkpoint and shards.
    for stale in (path / "heat", out_dir / "images"):
        shutil.rmtree(stale, ignore_errors=True)
    arrays = {f: getattr(summary, f) for f in _ARRAYS}
    np.savez(path / "pass.npz", n_tokens=summary.n_tokens, **arrays)
    record = {
        **metrics,
        "n_tokens": summary.n_tokens,
        "ckpt": str(src.ckpt),
        "shard_root": str(src.shard_root),
        "layer": src.layer,
        "tokens": src.tokens,
    }
    shards.write_json_atomic(out_dir / "metrics.json", record)
    write_latents(out_dir, summary)
    shards.write_json_atomic(path / "key.json", key)


def write_latents(out_dir: pathlib.Path, summary: LatentSummary, effects: dict | None = None):
    """latents.csv: per latent, firing frequency, mean value when firing and max; with
    `effects` ({latent: faithfulness.Effect}, the spliced evaluation's), what zeroing it does
    (`zero_drop`, blank for latents not shown) beside its matched random latent's."""
    freq_S, mean_S = summary.freq_S, summary.mean_S
    header = ["latent", "freq", "mean_when_firing", "max"]
    if effects is not None:
        header += ["zero_drop", "zero_drop_baseline", "baseline_latent"]
    tmp = out_dir / "latents.csv.tmp"
    with open(tmp, "w", newline="") as fd:
        w = csv.writer(fd)
        w.writerow(header)
        for i in range(len(freq_S)):
            row = [i, f"{freq_S[i]:.6g}", f"{mean_S[i]:.6g}", f"{summary.max_S[i]:.6g}"]
            if effects is not None:
                e = effects.get(i)
                row += ["", "", ""] if e is None else [
                    f"{e.drop:.6g}",
                    "" if e.baseline_drop is None else f"{e.baseline_drop:.6g}",
                    "" if e.baseline_latent is None else e.baseline_latent,
                ]  # fmt: skip
            w.writerow(row)
    tmp.replace(out_dir / "latents.csv")


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available here; use device=cpu.")
    return torch.device(name)


def run_pass(
    src: PassInputs, cfg: VisualizeConfig, sae, device, probe=None
) -> tuple[LatentSummary, dict]:
    from saev.data.loaders import OrderedLoader

    loader = OrderedLoader(
        str(src.shard_root), src.layer, cfg.data.batch_size, src.tokens,
        n_workers=cfg.data.n_workers,
    )  # fmt: skip
    try:
        if loader.d_model != sae.cfg.d_model:
            raise ValueError(
                f"{src.shard_root} holds d_model={loader.d_model} but the SAE takes "
                f"{sae.cfg.d_model}."
            )
        from saev import cli

        with cli.progress(total=len(loader), unit="batch", desc="pass") as bar:
            return summarize(sae, _counted(loader, bar), cfg.top_k, device, probe)
    finally:
        loader.close()


def _counted(batches, bar):
    for batch in batches:
        yield batch
        bar.update()

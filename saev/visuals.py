"""Per-latent statistics and top-activating tokens of a trained SAE (DESIGN.md, "Visualization").

One pass over the shards in disk order through the SAE keeps, per latent, the `top_k` largest
activations and where they occurred (memory bounded by d_sae x top_k, never d_sae x tokens), plus
firing counts, sums and maxima. `python visualize.py ckpt=<sae dir>` writes them to
`<out>/latents.csv` (one row per latent: frequency, mean value when firing, max value) and
`<out>/top.npz` (`values_SK`, `example_idx_SK`, `token_idx_SK`, rows sorted by value, descending).
Rendering images with heatmaps and the HTML browser build on these files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np
import torch


@dataclasses.dataclass
class VisualizeData:
    shard_root: str | None = None
    """Shard directory; None: the one the SAE was trained on (from its config.json)."""
    layer: int | None = None
    """Recorded layer; None: the one the SAE was trained on."""
    tokens: str = "patches"
    """patches | cls | all."""
    batch_size: int = 4096


@dataclasses.dataclass
class VisualizeConfig:
    ckpt: str = "???"
    """An SAE checkpoint directory (`<runs_root>/<run_id>/<sae>`)."""
    data: VisualizeData = dataclasses.field(default_factory=VisualizeData)
    top_k: int = 16
    """Top-activating tokens kept per latent."""
    out: str | None = None
    """Output directory; None: `<ckpt>/visuals`."""
    device: str = "cpu"

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1.")
        if self.data.batch_size < 1:
            raise ValueError(f"data.batch_size={self.data.batch_size} must be at least 1.")


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="visualize_schema", node=VisualizeConfig)


@dataclasses.dataclass
class LatentSummary:
    """What one pass over the activations learned about each of the S latents."""

    n_tokens: int
    count_S: np.ndarray
    """Tokens on which each latent fired (activation > 0)."""
    sum_S: np.ndarray
    max_S: np.ndarray
    values_SK: np.ndarray
    """The K largest activations of each latent, descending (0 where it fired on fewer tokens)."""
    example_idx_SK: np.ndarray
    token_idx_SK: np.ndarray


@torch.no_grad()
def summarize(sae, batches, top_k: int, device: str = "cpu") -> LatentSummary:
    """Stream `batches` (dicts with `act`, `example_idx`, `token_idx`) through `sae` once."""
    S = sae.cfg.d_sae
    count_S = torch.zeros(S, dtype=torch.float64)
    sum_S = torch.zeros(S, dtype=torch.float64)
    max_S = torch.zeros(S)
    top_KS = torch.full((top_k, S), -torch.inf)
    where_KS2 = torch.full((top_k, S, 2), -1, dtype=torch.int64)
    n_tokens = 0
    for batch in batches:
        f_BS = sae.encode(batch["act"].to(device)).float().cpu()
        n_tokens += len(f_BS)
        count_S += (f_BS > 0).sum(0)
        sum_S += f_BS.sum(0, dtype=torch.float64)
        max_S = torch.maximum(max_S, f_BS.max(0).values)
        # Top-k of the batch first, so the merge is [2K, S], never [B + K, S].
        k = min(top_k, len(f_BS))
        vals_kS, rows_kS = f_BS.topk(k, dim=0)
        where_B2 = torch.stack([batch["example_idx"], batch["token_idx"]], dim=1)
        vals_MS = torch.cat([top_KS, vals_kS])
        where_MS2 = torch.cat([where_KS2, where_B2[rows_kS]])
        top_KS, pick_KS = vals_MS.topk(top_k, dim=0)
        where_KS2 = torch.gather(where_MS2, 0, pick_KS[..., None].expand(-1, -1, 2))
    unfilled_KS = top_KS == -torch.inf
    top_KS[unfilled_KS] = 0.0
    where_KS2[unfilled_KS] = -1
    return LatentSummary(
        n_tokens,
        count_S.numpy(),
        sum_S.numpy(),
        max_S.numpy(),
        top_KS.T.contiguous().numpy(),
        where_KS2[..., 0].T.contiguous().numpy(),
        where_KS2[..., 1].T.contiguous().numpy(),
    )


def write(summary: LatentSummary, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    freq_S = summary.count_S / max(summary.n_tokens, 1)
    mean_S = summary.sum_S / np.maximum(summary.count_S, 1)
    with open(out / "latents.csv", "w", newline="") as fd:
        w = csv.writer(fd)
        w.writerow(["latent", "freq", "mean_when_firing", "max"])
        for i in range(len(freq_S)):
            w.writerow([i, f"{freq_S[i]:.6g}", f"{mean_S[i]:.6g}", f"{summary.max_S[i]:.6g}"])
    np.savez(
        out / "top.npz",
        values_SK=summary.values_SK,
        example_idx_SK=summary.example_idx_SK,
        token_idx_SK=summary.token_idx_SK,
    )


def main(cfg: VisualizeConfig) -> pathlib.Path:
    from saev import nn
    from saev.data import OrderedLoader

    ckpt = pathlib.Path(cfg.ckpt)
    sae = nn.load(ckpt, cfg.device)
    trained = json.loads((ckpt / nn.CONFIG_NAME).read_text()).get("train", {}).get("data", {})
    shard_root = cfg.data.shard_root or trained.get("shard_root")
    layer = cfg.data.layer if cfg.data.layer is not None else trained.get("layer")
    if shard_root is None or layer is None:
        raise ValueError(
            f"{ckpt} does not say which shards it was trained on; set data.shard_root, data.layer."
        )
    loader = OrderedLoader(shard_root, layer, cfg.data.batch_size, tokens=cfg.data.tokens)
    if loader.d_model != sae.cfg.d_model:
        loader.close()
        raise ValueError(
            f"{shard_root} holds d_model={loader.d_model} but the SAE takes {sae.cfg.d_model}."
        )
    try:
        summary = summarize(sae, loader, cfg.top_k, cfg.device)
    finally:
        loader.close()
    out = pathlib.Path(cfg.out) if cfg.out else ckpt / "visuals"
    write(summary, out)
    return out

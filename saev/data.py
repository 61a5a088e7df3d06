"""The training data: `DataConfig` (the Hydra node `data`), `ShardDataModule`, normalization.

The loaders themselves live in `saev.loaders` (re-exported here); reading foreign shard
directories lives in `saev.foreign_shards`.

Normalization: `normalized = (raw - mean_D) * scale`, where `mean_D` is the train split's mean
activation (zeros unless `scale_mean`) and `scale = sqrt(d_model / E||raw - mean_D||^2)` (1.0
unless `scale_norm`), so normalized activations have mean squared norm `d_model` (unit variance
per dimension on average). The loaders always serve raw activations; the SAE applies `NormStats`
itself and folds them into its checkpoint, so a saved SAE takes raw activations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
from typing import NamedTuple

import lightning as L
import numpy as np
import torch

from saev import shards
from saev.foreign_shards import open_shard_set
from saev.loaders import TOKENS, NonFiniteError, OrderedLoader, ShuffledLoader, select

__all__ = [
    "DataConfig",
    "NonFiniteError",
    "NormStats",
    "OrderedLoader",
    "ShardDataModule",
    "ShuffledLoader",
    "open_shard_set",
]

logger = logging.getLogger(__name__)

# The train/val split must not move when data.seed changes (seed is an SAE-side sweep axis).
SPLIT_SEED = 0x5AE5
STATS_SEED = 0x57A7
STATS_DIR = "norm-stats"


@dataclasses.dataclass
class DataConfig:
    """What to read and how (`conf/train.yaml`, node `data`)."""

    shard_root: str
    """Shard directory (the one holding metadata.json), ours or the public saev's."""
    layer: int
    """Layer to train on, as recorded (negative allowed, as in metadata.json)."""
    tokens: str = "patches"
    """"patches", "cls" or "all" (CLS plus patches)."""
    batch_size: int = 16384
    """Global batch size in tokens; each of N DDP ranks gets batch_size // N."""
    seed: int = 0
    """Seed of the shuffle order (epoch e uses (seed, e)); the split does not depend on it."""
    n_workers: int = 2
    """Reader processes filling the shuffle buffer; 0 reads in the main process."""
    buffer_mb: int = 1024
    """Shuffle buffer size (float32); a batch draws from ~buffer_mb / (n_workers + 2) of tokens."""
    val_fraction: float = 0.01
    """Fraction of examples (images) held out for validation, chosen at random; 0 for none."""
    n_stats_examples: int = 1024
    """Train examples sampled to estimate the normalization statistics."""
    scale_mean: bool = False
    """Subtract the train mean activation."""
    scale_norm: bool = False
    """Scale so normalized activations have mean squared norm d_model."""
    skip_nonfinite: bool = False
    """Drop (and count) NaN/inf activations instead of stopping with an error."""

    def __post_init__(self):
        if self.tokens not in TOKENS:
            raise ValueError(f"data.tokens={self.tokens!r} must be one of {TOKENS}.")
        if (
            self.batch_size < 1
            or self.buffer_mb < 1
            or self.n_workers < 0
            or self.n_stats_examples < 1
        ):
            raise ValueError(
                f"data.batch_size ({self.batch_size}), data.buffer_mb ({self.buffer_mb}) and "
                f"data.n_stats_examples ({self.n_stats_examples}) must be >= 1 and data.n_workers "
                f"({self.n_workers}) >= 0."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1).")


class NormStats(NamedTuple):
    """How the SAE normalizes raw activations: `(raw - mean_D) * scale`."""

    mean_D: torch.Tensor
    """float32 [d_model]; the train mean with scale_mean, else zeros."""
    scale: float
    """sqrt(d_model / E||raw - mean_D||^2) with scale_norm, else 1.0."""

    def apply(self, acts_BD: torch.Tensor) -> torch.Tensor:
        return (acts_BD - self.mean_D.to(acts_BD.device)) * self.scale


def split_examples(n_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) example indices, sorted and disjoint; val is a seeded random subset."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_examples))
    if n_val >= n_examples:
        raise ValueError(
            f"data.val_fraction={val_fraction} leaves no train examples out of {n_examples}."
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_examples)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def estimate_moments(
    shard_set: shards.ShardSet, layer: int, tokens: str, examples: np.ndarray, skip_nonfinite: bool
) -> dict:
    """Mean activation and mean squared norm over `examples`, accumulated in float64."""
    loader = OrderedLoader(
        shard_set,
        layer,
        65536,
        tokens,
        examples=examples,
        n_workers=0,
        buffer_mb=64,
        skip_nonfinite=skip_nonfinite,
        pin_memory=False,
    )
    sum_D = torch.zeros(shard_set.metadata.d_model, dtype=torch.float64)
    sum_sq, n = 0.0, 0
    for batch in loader:
        acts_BD = batch["act"]
        sum_D += acts_BD.sum(0, dtype=torch.float64)
        sum_sq += float(acts_BD.pow(2).sum(dtype=torch.float64))
        n += len(acts_BD)
    loader.close()
    if n == 0:
        raise shards.ShardError(
            f"{shard_set.root}: no finite activations to estimate normalization from."
        )
    return {"mean": (sum_D / n).tolist(), "mean_sq_norm": sum_sq / n, "n_rows": n}


def stats_from_moments(
    moments: dict, d_model: int, scale_mean: bool, scale_norm: bool
) -> NormStats:
    mean_D = torch.tensor(moments["mean"], dtype=torch.float64)
    sq = moments["mean_sq_norm"]
    if scale_mean:
        sq -= float(mean_D.pow(2).sum())  # E||x - mu||^2 = E||x||^2 - ||mu||^2
    else:
        mean_D = torch.zeros_like(mean_D)
    scale = math.sqrt(d_model / sq) if scale_norm else 1.0
    return NormStats(mean_D.to(torch.float32), float(scale))


def cache_dir() -> pathlib.Path:
    """Fallback for statistics of read-only shard directories ($SAEV_CACHE or ~/.cache/saev)."""
    return pathlib.Path(os.environ.get("SAEV_CACHE", pathlib.Path.home() / ".cache" / "saev"))


def load_or_estimate_moments(
    cfg: DataConfig, shard_set: shards.ShardSet, train: np.ndarray
) -> dict:
    """Moments of a seeded sample of the train split, cached as JSON keyed by layer and tokens.

    The cache lives in `<shard_root>/norm-stats/`; if that is not writable, in
    `cache_dir()/norm-stats/<sha of shard_root>/` (logged). A cached file is reused only if it was
    computed from the same sample.
    """
    n = min(cfg.n_stats_examples, len(train))
    sample = np.sort(np.random.default_rng(STATS_SEED).choice(train, size=n, replace=False))
    key = {
        "layer": cfg.layer,
        "tokens": cfg.tokens,
        "sample_sha256": hashlib.sha256(sample.astype("<i8").tobytes()).hexdigest(),
    }
    name = f"layer{cfg.layer}-{cfg.tokens}.json"
    root = pathlib.Path(shard_set.root).resolve()
    fallback = cache_dir() / STATS_DIR / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    for path in (root / STATS_DIR / name, fallback / name):
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if cached.get("key") == key:
                return cached["moments"]
    moments = estimate_moments(shard_set, cfg.layer, cfg.tokens, sample, cfg.skip_nonfinite)
    record = {"key": key, "moments": moments}
    try:
        _write_json(root / STATS_DIR / name, record)
    except OSError as err:
        logger.warning(
            "Shard directory %s is not writable (%s); caching statistics in %s.",
            root,
            err.strerror,
            fallback,
        )
        _write_json(fallback / name, record)
    return moments


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shards.write_json_atomic(path, obj)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(L.LightningDataModule):
    """Train/val loaders over one layer of a shard directory, plus normalization statistics.

    Run Lightning with `use_distributed_sampler=False`: under DDP each rank reads its own part of
    the stream (rank and world size from torch.distributed) with batch_size // world_size.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DataConfig) else DataConfig(**dict(cfg))
        self.shard_set: shards.ShardSet | None = None
        self.norm_stats: NormStats | None = None
        self._train_loader = self._val_loader = None

    def setup(self, stage: str | None = None) -> None:
        if self.shard_set is not None:
            return
        cfg = self.cfg
        shard_set = open_shard_set(cfg.shard_root)
        select(shard_set.metadata, cfg.layer, cfg.tokens)  # bad layer/tokens fail here, not mid-fit
        self.rank, self.world_size = _dist()
        if cfg.batch_size % self.world_size:
            raise ValueError(
                f"data.batch_size={cfg.batch_size} is not divisible by the {self.world_size} ranks."
            )
        self.batch_size = cfg.batch_size // self.world_size
        self.train_examples, self.val_examples = split_examples(
            shard_set.metadata.n_examples, cfg.val_fraction
        )
        if len(self.train_examples) < self.world_size:
            raise ValueError(
                f"{len(self.train_examples)} train examples cannot be split over "
                f"{self.world_size} ranks; lower data.val_fraction."
            )
        if cfg.scale_mean or cfg.scale_norm:
            moments = load_or_estimate_moments(cfg, shard_set, self.train_examples)
            self.norm_stats = stats_from_moments(
                moments, shard_set.metadata.d_model, cfg.scale_mean, cfg.scale_norm
            )
        else:
            self.norm_stats = NormStats(torch.zeros(shard_set.metadata.d_model), 1.0)
        self.shard_set = shard_set

    @property
    def metadata(self) -> shards.Metadata:
        self._require_setup()
        return self.shard_set.metadata

    @property
    def d_model(self) -> int:
        return self.metadata.d_model

    def _require_setup(self) -> None:
        if self.shard_set is None:
            raise RuntimeError("call ShardDataModule.setup() first.")

    def _common(self) -> dict:
        cfg = self.cfg
        return dict(
            layer=cfg.layer, batch_size=self.batch_size, tokens=cfg.tokens, n_workers=cfg.n_workers,
            rank=self.rank, world_size=self.world_size, skip_nonfinite=cfg.skip_nonfinite,
        )  # fmt: skip

    def train_dataloader(self) -> ShuffledLoader:
        """Raw activations, one epoch per iteration; the same loader (and workers) every epoch."""
        self._require_setup()
        if self._train_loader is None:
            self._train_loader = ShuffledLoader(
                self.shard_set,
                seed=self.cfg.seed,
                examples=self.train_examples,
                buffer_mb=self.cfg.buffer_mb,
                **self._common(),
            )
        return self._train_loader

    def val_dataloader(self) -> OrderedLoader | list:
        """Ordered batches over the held-out examples only ([] when val_fraction is 0)."""
        self._require_setup()
        if len(self.val_examples) == 0:
            return []
        if self._val_loader is None:
            buffer_mb = min(self.cfg.buffer_mb, 256)
            self._val_loader = OrderedLoader(
                self.shard_set, examples=self.val_examples, buffer_mb=buffer_mb, **self._common()
            )
        return self._val_loader

    def teardown(self, stage: str | None = None) -> None:
        for loader in (self._train_loader, self._val_loader):
            if loader is not None:
                loader.close()

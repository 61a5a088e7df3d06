"""Normalization statistics: estimated once from a sample of the train split, cached as JSON.

Normalization: `normalized = (raw - mean_D) * scale`, where `mean_D` is the train split's mean
activation (zeros unless `scale_mean`) and `scale = sqrt(d_model / E||raw - mean_D||^2)` (1.0
unless `scale_norm`), so normalized activations have mean squared norm `d_model` (unit variance
per dimension on average). The loaders always serve raw activations; the SAE applies `NormStats`
itself and folds them into its checkpoint, so a saved SAE takes raw activations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch

from saev import shards

logger = logging.getLogger(__name__)

STATS_SEED = 0x57A7
STATS_DIR = "norm-stats"


class NormStats(NamedTuple):
    """How the SAE normalizes raw activations: `(raw - mean_D) * scale`."""

    mean_D: torch.Tensor
    """float32 [d_model]; the train mean with scale_mean, else zeros."""
    scale: float
    """sqrt(d_model / E||raw - mean_D||^2) with scale_norm, else 1.0."""

    def apply(self, acts_BD: torch.Tensor) -> torch.Tensor:
        return (acts_BD - self.mean_D.to(acts_BD.device)) * self.scale


def estimate_moments(batches: Iterable[dict], d_model: int) -> dict:
    """Mean activation and mean squared norm over all batches, accumulated in float64."""
    sum_D = torch.zeros(d_model, dtype=torch.float64)
    sum_sq, n = 0.0, 0
    for batch in batches:
        acts_BD = batch["act"]
        sum_D += acts_BD.sum(0, dtype=torch.float64)
        sum_sq += float(acts_BD.pow(2).sum(dtype=torch.float64))
        n += len(acts_BD)
    if n == 0:
        raise shards.ShardError("no finite activations to estimate normalization from.")
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


FINGERPRINT_BYTES = 4096
"""Bytes read from each end of every shard file to tell re-recorded content from the old."""


def content_fingerprint(shard_set: shards.ShardSet) -> str:
    """sha256 of what decides the activations' values without reading them all: metadata, the
    shard listing, each file's size and modification time, and its first and last 4 KiB (a
    re-recording in place with other weights or images changes the values there)."""
    h = hashlib.sha256()
    h.update(json.dumps(shard_set.metadata.to_json(), sort_keys=True).encode())
    for f in shard_set.files:
        st = f.path.stat()
        h.update(f"{f.path.name}:{f.n_examples}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f.path, "rb") as fd:
            h.update(fd.read(FINGERPRINT_BYTES))
            fd.seek(max(0, st.st_size - FINGERPRINT_BYTES))
            h.update(fd.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def load_or_estimate_moments(
    shard_set: shards.ShardSet,
    layer: int,
    tokens: str,
    train: np.ndarray,
    n_sample: int,
    read: Callable[[np.ndarray], Iterable[dict]],
    d_model: int,
) -> dict:
    """Moments of a seeded sample of `n_sample` train examples (read with `read(examples)`),
    cached as JSON named by layer and tokens.

    The cache lives in `<shard_root>/norm-stats/`; if that is not writable, in
    `cache_dir()/norm-stats/<sha of shard_root>/` (logged). A cached file is reused only if it was
    computed from the same sample of the same content (`content_fingerprint`), so statistics of a
    directory re-recorded in place, or of another directory at the same path, are not reused.
    """
    root = shard_set.root
    n = min(n_sample, len(train))
    sample = np.sort(np.random.default_rng(STATS_SEED).choice(train, size=n, replace=False))
    key = {
        "layer": layer,
        "tokens": tokens,
        "sample_sha256": hashlib.sha256(sample.astype("<i8").tobytes()).hexdigest(),
        "content_sha256": content_fingerprint(shard_set),
    }
    name = f"layer{layer}-{tokens}.json"
    root = pathlib.Path(root).resolve()
    fallback = cache_dir() / STATS_DIR / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    for path in (root / STATS_DIR / name, fallback / name):
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if cached.get("key") == key:
                return cached["moments"]
    moments = estimate_moments(read(sample), d_model)
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

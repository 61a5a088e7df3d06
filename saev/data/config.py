"""`DataConfig`: what a training job reads and how (the Hydra node `data` of `conf/train.yaml`).

Imports nothing heavy, so a bad value fails before torch or Lightning load.
"""

from __future__ import annotations

import dataclasses

TOKENS = ("patches", "cls", "all")
"""Which tokens of each example a job reads: patches only, CLS only, or CLS then patches."""
READS = ("auto", "mmap", "pread")
"""How reader threads copy from the shard files (`DataConfig.read`)."""


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
    """Global batch size in tokens; under DDP each of N ranks trains on its ~batch_size / N share
    of the same global batch a one-process run trains on."""
    seed: int = 0
    """Seed of the shuffle order (epoch e uses (seed, e)); the split does not depend on it."""
    n_workers: int = 2
    """Reader threads filling the shuffle buffer; 0 reads in the main thread. At most (CPUs - 1)
    threads start; the buffer layout (and so the order) follows n_workers regardless."""
    buffer_mb: int = 512
    """Shuffle buffer (MiB, storage dtype): a batch mixes ~buffer_mb / (n_workers + 2) of it (~890
    images per batch for ViT-B/16 float32 at 512 MiB; see saev.data.pipeline)."""
    val_fraction: float = 0.01
    """Fraction of examples (images) held out for validation, chosen at random; 0 for none."""
    n_stats_examples: int = 1024
    """Train examples sampled to estimate the normalization statistics."""
    scale_mean: bool = False
    """Subtract the train mean activation."""
    scale_norm: bool = True
    """Scale so normalized activations have mean squared norm d_model (unit variance per dimension
    on average), the scale at which published sparsity coefficients apply (docs/training.md)."""
    skip_nonfinite: bool = False
    """Drop (and count) NaN/inf activations instead of stopping with an error."""
    read: str = "auto"
    """How reader threads copy from the shard files: "mmap" (fastest when the files stay in the
    page cache), "pread" (streams larger-than-memory sets without mapping them) or "auto" (mmap
    when the files fit in half the job's memory). Both prefetch each fill (saev.data.pipeline)."""

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
        if self.read not in READS:
            raise ValueError(f"data.read={self.read!r} must be one of {READS}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1).")

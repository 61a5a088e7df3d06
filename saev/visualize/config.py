"""Typed schema of `conf/visualize.yaml`, registered in Hydra's ConfigStore (`visualize_schema`).

Two modes: `ckpt=<sae dir>` (one pass over the shards, cached, then the latent browser) and
`sweep=<dir>` or `wandb.project=<name>` (the L0 vs normalized-MSE Pareto plot of many SAEs).
"""

from __future__ import annotations

import dataclasses
import pathlib

SORTS = ("frequency", "value", "random")


@dataclasses.dataclass
class VisualizeData:
    """Which activations the pass reads; None takes what the SAE was trained on (config.json)."""

    shard_root: str | None = None
    """Shard directory (any shard set with the SAE's d_model, e.g. a held-out dataset)."""
    layer: int | None = None
    """Recorded layer."""
    tokens: str | None = None
    """patches | cls | all."""
    batch_size: int = 4096
    """Tokens per SAE forward pass; the dense [batch_size, d_sae] latents stay on the device."""
    n_workers: int = 2
    """Reader threads of the ordered loader (0 reads in the main thread)."""
    root: str | None = None
    """The image dataset's root (record.py's data.root) if it moved since recording; None: the
    root in the shards' metadata.json. Images are found through their examples.jsonl."""


@dataclasses.dataclass
class HeatmapConfig:
    """How a latent's per-patch activation is drawn over an image."""

    colormap: str = "inferno"
    """Any matplotlib colormap name."""
    opacity: float = 0.6
    """Weight of the heatmap over the image, in [0, 1]."""


@dataclasses.dataclass
class SpliceConfig:
    """The spliced evaluation (`splice=true`): the recording's ViT run with the SAE in place of
    its layer (saev.visualize.faithfulness)."""

    enabled: bool = False
    """Run it (`splice=true`): metrics.json's splice section, each shown latent zeroed."""
    n_images: int = 1024
    """Recorded images (a seeded sample, the same every run) that the evaluation runs."""
    batch_size: int = 32
    """Images per forward; the blocks above the layer see 4x as many rows."""
    intervention_images: int = 8
    """Top images of each shown latent on which zeroing it is measured."""


@dataclasses.dataclass
class WandbSource:
    """Read sweep metrics from W&B instead of local metrics.json files (needs the network)."""

    project: str | None = None
    """W&B project the SAEs were logged to (train.py's wandb.project); None: read local files."""
    entity: str | None = None
    """W&B entity (user or team); None: the API key's default entity."""


@dataclasses.dataclass
class ProbeConfig:
    """Label probes (`probe=true`): which latents detect which class, against the ViT's neurons."""

    enabled: bool = False
    """Score every (latent, class) pair by average precision in the pass (needs labels.bin or
    labels in examples.jsonl); writes probe.csv and metrics.json's probe section."""
    memory_mb: int = 1024
    """Budget of the per-(latent, bin, label) count histograms; sets the number of bins."""
    latents_per_class: int = 3
    """Best latents listed (and rendered) on each class's page."""
    classes_per_latent: int = 3
    """Best classes listed on each latent's page."""


@dataclasses.dataclass
class VisualizeConfig:
    ckpt: str | None = None
    """An SAE checkpoint directory (`<runs_root>/<run_id>/<sae>`): pass, metrics and browser."""
    sweep: str | None = None
    """A sweep or runs directory: the Pareto plot of every SAE found under it (any depth)."""
    data: VisualizeData = dataclasses.field(default_factory=VisualizeData)
    out: str | None = None
    """Output directory; None: `<ckpt>/visuals`, or the sweep directory for `sweep=`."""
    top_k: int = 128
    """Top-activating tokens kept per latent by the pass."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda, cuda:<i>."""
    force: bool = False
    """Recompute the pass even when `out` holds one for the same checkpoint and shards."""
    render: bool = True
    """false: stop after the pass (statistics and metrics.json; to evaluate a checkpoint)."""
    splice: SpliceConfig = dataclasses.field(default_factory=SpliceConfig)
    n_latents: int = 100
    """Latents chosen by the filters and `sort`, shown in addition to `include_latents`."""
    include_latents: list[int] = dataclasses.field(default_factory=list)
    """Latent ids always shown (even dead or outside the ranges), first."""
    log_freq_range: list[float] | None = None
    """[lo, hi] of log10 firing frequency (fraction of tokens); None: no bound."""
    log_value_range: list[float] | None = None
    """[lo, hi] of log10 mean activation when firing; None: no bound."""
    sort: str = "frequency"
    """Order of the chosen latents: frequency or value (descending), or random (`seed`)."""
    seed: int = 0
    """Seed of sort=random."""
    n_images: int = 25
    """Most distinct images shown per latent (taken from its top_k tokens)."""
    skip_missing_images: bool = False
    """Skip (and count) images that no longer exist instead of stopping at the first."""
    heatmap: HeatmapConfig = dataclasses.field(default_factory=HeatmapConfig)
    wandb: WandbSource = dataclasses.field(default_factory=WandbSource)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

    def __post_init__(self):
        pareto = self.sweep is not None or self.wandb.project is not None
        if pareto == (self.ckpt is not None):
            raise ValueError(
                "give ckpt=<sae dir> (one SAE), or sweep=<dir> / wandb.project=<name> (a sweep)."
            )
        positive = {"top_k": self.top_k, "n_images": self.n_images}
        positive["data.batch_size"] = self.data.batch_size
        for name in ("n_images", "batch_size", "intervention_images"):
            positive[f"splice.{name}"] = getattr(self.splice, name)
        positive["probe.memory_mb"] = self.probe.memory_mb
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1.")
        if self.n_latents < 0 or self.data.n_workers < 0:
            raise ValueError("n_latents and data.n_workers must be 0 or more.")
        if self.probe.latents_per_class < 0 or self.probe.classes_per_latent < 0:
            raise ValueError("probe.latents_per_class and probe.classes_per_latent must be >= 0.")
        if self.sort not in SORTS:
            raise ValueError(f"sort={self.sort!r} must be one of {list(SORTS)}.")
        for name in ("log_freq_range", "log_value_range"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"{name}={list(value)} must be [lo, hi] with lo <= hi.")
        if not 0.0 <= self.heatmap.opacity <= 1.0:
            raise ValueError(f"heatmap.opacity={self.heatmap.opacity} must be in [0, 1].")
        if self.data.tokens not in (None, "patches", "cls", "all"):
            raise ValueError(f"data.tokens={self.data.tokens!r} must be patches, cls or all.")


def sae_dir(ckpt: str) -> pathlib.Path:
    """The SAE checkpoint directory `ckpt=` names (absolute); FileNotFoundError if it is not one."""
    from saev.nn.config import CONFIG_NAME, WEIGHTS_NAME

    path = pathlib.Path(ckpt).absolute()
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{path} lacks {CONFIG_NAME} or {WEIGHTS_NAME}; is it an SAE directory?"
        )
    return path


def check_paths(cfg) -> None:
    """What `check_command_line` can check of a composed visualize config before Hydra runs the
    job: that `ckpt=` is an SAE directory."""
    if cfg.get("ckpt") is not None:
        sae_dir(cfg.ckpt)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="visualize_schema", node=VisualizeConfig)


def print_help() -> None:
    """`python visualize.py --help`."""
    from saev import cli

    cli.print_help(
        """
usage: python visualize.py ckpt=<sae dir> [data.shard_root=... data.layer=...] [key=value ...]
       python visualize.py sweep=<sweep or runs dir>     L0 vs normalized MSE of every SAE
       splice=true (short for splice.enabled=true): the SAE inside the ViT; probe=true: label probes
       the last line printed is the output directory (index.html, metrics.json; pareto.png)""",
        {},
        [("Options", cli.options(VisualizeConfig))],
    )

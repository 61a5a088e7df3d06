"""Typed configuration of `record.py`, registered in Hydra's ConfigStore.

`conf/record.yaml` starts from `record_schema`; every `conf/data/<name>.yaml` starts from its own
`<name>_schema`, so each dataset has only the settings it uses. Hydra checks types while composing;
`__post_init__` checks values when `saev.record.job` turns the composed config into these objects.
Every default is written here once (conf/ only chooses groups and sets what differs). Imports
nothing heavy, so a bad setting fails before torch loads.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

FAMILIES = ("clip", "siglip", "dinov2", "dinov3", "timm", "tiny")
DTYPES = ("float32", "float16", "bfloat16")
TINY_SPEC = re.compile(r"img(\d+)-patch(\d+)-dim(\d+)-depth(\d+)-heads(\d+)(?:-reg(\d+))?")


@dataclasses.dataclass
class ModelConfig:
    family: str = "tiny"
    """clip, siglip, dinov2, dinov3, timm or tiny: picks the library that builds `ckpt`."""
    ckpt: str = "img32-patch8-dim64-depth4-heads4"
    """open_clip `name/tag` or `hf-hub:org/repo`, a timm name (`vit_base_patch16_224.augreg_in1k`),
    or for `tiny` an architecture `img<px>-patch<px>-dim<d>-depth<n>-heads<h>[-reg<r>]`."""
    pretrained: bool = False
    """Load the checkpoint's published weights (needs the network or a warm cache); false builds
    the same architecture with random weights drawn from `seed`."""
    weights: str | None = None
    """Local weights (safetensors or a torch state dict) to load instead; nothing is downloaded."""
    seed: int = 0
    """Seed of the random initialization, so random-weight recordings are reproducible."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not one of {', '.join(FAMILIES)}.")
        if self.family == "tiny":
            if not TINY_SPEC.fullmatch(self.ckpt):
                raise ValueError(
                    f"model.ckpt={self.ckpt!r} is not a tiny architecture; write it like "
                    "img32-patch8-dim64-depth4-heads4 (optionally -reg4 for register tokens)."
                )
            if self.pretrained and self.weights is None:
                raise ValueError("model=tiny has no published weights; set model.pretrained=false.")


@dataclasses.dataclass
class ImageFolderConfig:
    name: str = "image_folder"
    root: str = MISSING
    """Any folder tree of images; the first-level subfolder of an image is its label."""
    skip_bad_images: bool = False
    """Skip (and count) unreadable images instead of stopping at the first one."""


@dataclasses.dataclass
class ImageNetConfig:
    name: str = "imagenet"
    root: str = MISSING
    """One split's folder of synset folders, e.g. /data/imagenet/train (n01440764/*.JPEG, ...)."""
    skip_bad_images: bool = False


@dataclasses.dataclass
class Inat21Config:
    name: str = "inat21"
    root: str = MISSING
    """One split's folder of category folders: /data/inat21/train_mini (00000_Animalia_.../)."""
    skip_bad_images: bool = False


@dataclasses.dataclass
class Ade20kConfig:
    name: str = "ade20k"
    root: str = MISSING
    """The ADEChallengeData2016 folder (images/<split>/*.jpg, annotations/<split>/*.png)."""
    split: str = "training"
    skip_bad_images: bool = False

    def __post_init__(self):
        if self.split not in ("training", "validation"):
            raise ValueError(f"data.split={self.split!r}: ade20k has 'training' and 'validation'.")


@dataclasses.dataclass
class SyntheticImagesConfig:
    name: str = "synthetic"
    n_images: int = 1024
    """Number of procedurally drawn images (deterministic in `seed` and the image index)."""
    seed: int = 0

    def __post_init__(self):
        if self.n_images < 1:
            raise ValueError(f"data.n_images={self.n_images} must be at least 1.")


DATA_SCHEMAS = {
    "image_folder": ImageFolderConfig,
    "imagenet": ImageNetConfig,
    "inat21": Inat21Config,
    "ade20k": Ade20kConfig,
    "synthetic": SyntheticImagesConfig,
}


@dataclasses.dataclass
class RecordConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: Any = MISSING
    """One of the `DATA_SCHEMAS`, chosen with `data=<name>`."""
    layers: list[int] = dataclasses.field(default_factory=lambda: [-1])
    """Blocks whose output (the residual stream) is recorded; negative ones count from the end."""
    cls_token: bool | None = None
    """Record the CLS token as token 0; null records it exactly when the model has one."""
    dtype: str = "float32"
    """Storage dtype of the activations: float32, float16 or bfloat16."""
    max_patches_per_shard: int = 1_000_000
    """Most token vectors (examples x layers x tokens) per shard file: ~3 GB at d_model 768 in
    float32, big enough for fast sequential reads, small enough that a crash loses little."""
    batch_size: int = 64
    n_workers: int = 4
    """DataLoader processes decoding images, capped at the CPUs available; 0 decodes in the
    main process."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, cuda:<i> or mps."""
    tf32: bool = True
    """TF32 matmuls in the ViT's float32 forward on Ampere+ GPUs (relative error ~1e-3, 2-3x
    faster); false for exact float32."""
    dump_to: str = "shards"
    """Parent folder of the shard directory `<dump_to>/<content hash>/`."""
    debug: bool = False
    """Show full tracebacks instead of one-line errors."""

    def __post_init__(self):
        if not self.layers:
            raise ValueError("layers=[] records nothing; give at least one block index.")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers={list(self.layers)} repeats a layer.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}.")
        for name in ("max_patches_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.n_workers < 0:
            raise ValueError(f"n_workers={self.n_workers} must be 0 or more.")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda, cuda:<index> or mps.")


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="record_schema", node=RecordConfig)
    for name, schema in DATA_SCHEMAS.items():
        cs.store(group="data", name=f"{name}_schema", node=schema)


register()


def print_help(conf_dir: pathlib.Path) -> None:
    """`python record.py --help`."""
    from saev import cli

    sections = [("Options", cli.options(RecordConfig, skip=("data",)))]
    for name in ("image_folder", "synthetic"):
        sections.append((f"data={name} options", cli.options(DATA_SCHEMAS[name], "data.")))
    cli.print_help(
        """
usage: python record.py [model=<family>] [data=<dataset>] [key=value ...]
       with no arguments: the offline demo (a tiny random ViT over synthetic images); the last
       line printed is the shard directory; the same command again resumes a killed run""",
        {
            "model": cli.group_choices(conf_dir, "model"),
            "data": cli.group_choices(conf_dir, "data") + " (options: conf/data/<name>.yaml)",
            "hydra/launcher": "basic (default), " + cli.group_choices(conf_dir, "hydra/launcher"),
        },
        sections,
    )

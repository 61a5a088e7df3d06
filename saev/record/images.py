"""Image datasets for recording: image_folder, imagenet, inat21, ade20k and synthetic.

A dataset lists its candidate images up front (so a bad `data.root` fails before any model loads),
describes itself for `metadata.json`, and gives each example's source record for `examples.jsonl`.
Decoding happens in DataLoader workers through `Decoded`, which reports an unreadable image as a
value instead of raising, so the main process can stop with one clear line or skip and count it.
Nothing here imports torch: the model's transform is handed in.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from saev.record.config import (
    Ade20kConfig,
    ImageFolderConfig,
    ImageNetConfig,
    Inat21Config,
    SyntheticImagesConfig,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
PATCH_LABELS_DTYPE = np.uint8
"""ADE20K SceneParsing classes are 0-150 (0 = unlabeled), so a byte per patch suffices."""
SYNTHETIC_SIZE = 224
"""Side of a synthetic image before the model's own transform resizes it."""


class DataError(ValueError):
    """The dataset on disk is missing, empty or not in the expected layout."""


@dataclasses.dataclass
class FileDataset:
    """Images listed by path relative to `root`, with optional labels and segmentation masks."""

    name: str
    root: pathlib.Path
    paths: list[str]
    labels: list | None = None
    masks: list[str] | None = None
    """For ade20k: mask paths relative to `root`, one per image."""
    split: str | None = None
    _index: dict[str, int] | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_patch_labels(self) -> bool:
        return self.masks is not None

    def describe(self) -> dict:
        desc = {"name": self.name, "root": str(self.root), "n_images": len(self.paths)}
        if self.split is not None:
            desc["split"] = self.split
        if self.masks is not None:
            desc["patch_labels"] = "labels.bin: uint8 [n_examples, n_patches_per_example]"
        return desc

    def source(self, i: int) -> dict:
        record = {"path": self.paths[i]}
        if self.labels is not None and self.labels[i] is not None:
            record["label"] = self.labels[i]
        return record

    def find(self, record: dict) -> int:
        """Candidate index of an `examples.jsonl` record (to resume after it)."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths)}
        return self._index[record["path"]]

    def load(self, i: int) -> Image.Image:
        with Image.open(self.root / self.paths[i]) as img:
            return img.convert("RGB")

    def load_mask(self, i: int) -> Image.Image:
        with Image.open(self.root / self.masks[i]) as img:
            img.load()
            return img


@dataclasses.dataclass
class SyntheticDataset:
    """Shapes of one kind (the label: 0 ellipses, 1 rectangles, 2 triangles) on a color gradient."""

    n_images: int
    seed: int
    has_patch_labels = False

    def __len__(self) -> int:
        return self.n_images

    def describe(self) -> dict:
        return {
            "name": "synthetic",
            "n_images": self.n_images,
            "seed": self.seed,
            "generator": "shapes-v1",
        }

    def source(self, i: int) -> dict:
        return {"index": i, "label": self._label(i)}

    def find(self, record: dict) -> int:
        return int(record["index"])

    def _label(self, i: int) -> int:
        return int(np.random.default_rng([self.seed, i]).integers(3))

    def load(self, i: int) -> Image.Image:
        # One generator per (seed, index): images do not depend on order, batching or workers.
        rng = np.random.default_rng([self.seed, i])
        kind = int(rng.integers(3))
        s = SYNTHETIC_SIZE
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(0, 1, s, dtype=np.float32)
        t_HW = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None] + 1) / 2
        pixels_HWC = c0 + (c1 - c0) * t_HW[..., None]
        img = Image.fromarray(pixels_HWC.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            color = tuple(int(v) for v in rng.integers(0, 256, size=3))
            x0, y0 = rng.uniform(0, 0.7 * s, size=2)
            w, h = rng.uniform(0.15 * s, 0.45 * s, size=2)
            box = [x0, y0, x0 + w, y0 + h]
            if kind == 0:
                draw.ellipse(box, fill=color)
            elif kind == 1:
                draw.rectangle(box, fill=color)
            else:
                draw.polygon([(x0, y0 + h), (x0 + w / 2, y0), (x0 + w, y0 + h)], fill=color)
        return img


Dataset = FileDataset | SyntheticDataset


def build(cfg) -> Dataset:
    """The dataset a `saev.record.config` data config describes; raises `DataError` if unusable."""
    if isinstance(cfg, SyntheticImagesConfig):
        return SyntheticDataset(cfg.n_images, cfg.seed)
    root = _existing_root(cfg.root)
    if isinstance(cfg, ImageFolderConfig):
        return _image_folder(root)
    if isinstance(cfg, ImageNetConfig):
        return _imagenet(root)
    if isinstance(cfg, Inat21Config):
        return _inat21(root)
    if isinstance(cfg, Ade20kConfig):
        return _ade20k(root, cfg.split)
    raise DataError(f"unknown dataset config {type(cfg).__name__}.")


def _existing_root(root: str) -> pathlib.Path:
    path = pathlib.Path(root).expanduser().absolute()
    if not path.is_dir():
        raise DataError(f"data.root={root} is not a directory.")
    return path


def _list_images(folder: pathlib.Path) -> list[str]:
    """Image files under `folder`, relative to it, sorted by path (the order never depends on
    the file system)."""
    found = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        rel = pathlib.Path(dirpath).relative_to(folder)
        found.extend(
            str(rel / f) for f in filenames if pathlib.Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    return sorted(found)


def _require_images(paths: list[str], root: pathlib.Path, what: str = "image files") -> None:
    if not paths:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"data.root={root} holds no {what} ({suffixes}).")


def _image_folder(root: pathlib.Path) -> FileDataset:
    paths = _list_images(root)
    _require_images(paths, root)
    labels = [p.split("/", 1)[0] if "/" in p else None for p in paths]
    return FileDataset("image_folder", root, paths, labels if any(labels) else None)


def _class_folders(root: pathlib.Path, pattern: str) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and re.fullmatch(pattern, d.name))


def _imagenet(root: pathlib.Path) -> FileDataset:
    synsets = _class_folders(root, r"n\d{8}")
    if not synsets:
        # The raw validation split is one flat folder; its labels live outside it.
        paths = [p for p in _list_images(root) if "/" not in p]
        _require_images(paths, root, "synset folders (n01440764/, ...) or images")
        return FileDataset("imagenet", root, paths, None, split=root.name)
    paths, labels = [], []
    for label, synset in enumerate(synsets):
        found = _list_images(root / synset)
        paths.extend(f"{synset}/{p}" for p in found)
        labels.extend([label] * len(found))
    _require_images(paths, root)
    return FileDataset("imagenet", root, paths, labels, split=root.name)


def _inat21(root: pathlib.Path) -> FileDataset:
    categories = _class_folders(root, r"\d{5}_.+")
    if not categories:
        raise DataError(f"data.root={root} has no iNat21 category folders (00000_Animalia_...).")
    paths, labels = [], []
    for category in categories:
        found = _list_images(root / category)
        paths.extend(f"{category}/{p}" for p in found)
        labels.extend([int(category[:5])] * len(found))
    _require_images(paths, root)
    return FileDataset("inat21", root, paths, labels, split=root.name)


def _ade20k(root: pathlib.Path, split: str) -> FileDataset:
    image_dir, mask_dir = root / "images" / split, root / "annotations" / split
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DataError(
                f"data.root={root} lacks {d.relative_to(root)}/; point it at ADEChallengeData2016."
            )
    paths = [f"images/{split}/{p}" for p in _list_images(image_dir) if "/" not in p]
    _require_images(paths, image_dir)
    masks = [f"annotations/{split}/{pathlib.Path(p).stem}.png" for p in paths]
    for path, mask in zip(paths, masks):
        if not (root / mask).is_file():
            raise DataError(f"{root / path} has no segmentation mask {root / mask}.")
    return FileDataset("ade20k", root, paths, None, masks, split=split)


def patch_majority(mask_HW: np.ndarray, patch_size: tuple[int, int]) -> np.ndarray:
    """Most frequent class of each patch in row-major patch order (ties: the smaller class)."""
    ph, pw = patch_size
    gh, gw = mask_HW.shape[0] // ph, mask_HW.shape[1] // pw
    blocks = mask_HW[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw).transpose(0, 2, 1, 3)
    values_PK = blocks.reshape(gh * gw, ph * pw).astype(np.int64)
    counts = np.bincount(
        (np.arange(gh * gw)[:, None] * 256 + values_PK).ravel(), minlength=gh * gw * 256
    )
    return counts.reshape(gh * gw, 256).argmax(axis=1).astype(PATCH_LABELS_DTYPE)


def geometric_steps(transform) -> list[Callable]:
    """The steps of a torchvision `Compose` that move pixels, redone with nearest interpolation
    so a segmentation mask lands exactly where its image does."""
    import copy

    from torchvision.transforms import InterpolationMode

    steps = []
    for step in getattr(transform, "transforms", [transform]):
        name = type(step).__name__
        if (
            any(k in name for k in ("ToTensor", "Normalize", "Convert", "ToDtype"))
            or name == "function"
        ):
            continue  # color and tensor conversions do not move pixels
        if not hasattr(step, "size"):
            raise DataError(f"cannot align ade20k masks with the model's transform step {step!r}.")
        step = copy.copy(step)
        if hasattr(step, "interpolation"):
            step.interpolation = InterpolationMode.NEAREST
        steps.append(step)
    return steps


@dataclasses.dataclass
class Decoded:
    """Map-style dataset for the DataLoader.

    Item i is `(x_CHW, i, patch_labels_P or None, None)`, or `(None, i, None, error message)`.
    """

    dataset: Dataset
    transform: Callable
    patch_size: tuple[int, int]
    n_patches: int

    def __post_init__(self):
        self._mask_steps = (
            geometric_steps(self.transform) if self.dataset.has_patch_labels else None
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            x_CHW = self.transform(self.dataset.load(i))
            labels_P = self._patch_labels(i) if self._mask_steps is not None else None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            # PIL raises all of these for truncated or corrupt files.
            where = (
                self.dataset.root / self.dataset.paths[i]
                if isinstance(self.dataset, FileDataset)
                else i
            )
            return None, i, None, f"cannot read image {where}: {err}"
        return x_CHW, i, labels_P, None

    def _patch_labels(self, i: int) -> np.ndarray:
        mask = self.dataset.load_mask(i)
        for step in self._mask_steps:
            mask = step(mask)
        labels_P = patch_majority(np.asarray(mask), self.patch_size)
        if labels_P.shape != (self.n_patches,):
            raise ValueError(f"mask became {np.asarray(mask).shape}, not the model's patch grid")
        return labels_P

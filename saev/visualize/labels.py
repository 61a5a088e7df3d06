"""The labels a probe scores latents against, and their class names, read before the pass.

Two levels, each an integer label per unit with 0 meaning "no class" and classes 1..C:

- patch: `labels.bin` (ADE20K recordings; `saev.synthetic` with labels), one uint8 per patch.
  ADE20K's classes are the 150 of the SceneParsing benchmark (0 = unlabeled, as in its masks).
- image: the `label` of each example in `examples.jsonl` (image_folder: the class folder's name;
  imagenet and inat21: an int, named after its folder). Examples without one get 0.

A recording with neither, or labels outside the dataset's class table, is a ValueError whose
message says how to fix it (one line through `saev.cli.run_or_exit`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from saev import shards

# objectInfo150 of the MIT SceneParsing benchmark (ADEChallengeData2016), first name of each.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
assert len(ADE20K_CLASSES) == 150


@dataclasses.dataclass
class Level:
    """One level's labels: names[0] is "no class", names[c] class c's name."""

    level: str
    """"patch" or "image"."""
    names: list[str]
    labels: np.ndarray
    """patch: uint8 [n_examples, n_patches]; image: int64 [n_examples]; values in 0..C."""

    @property
    def n_labels(self) -> int:
        return len(self.names)


def read(root: pathlib.Path, tokens: str) -> list[Level]:
    """The labelled levels of the shard directory `root` for a pass over `tokens`."""
    md = shards.read_metadata(root)
    levels = []
    patch_NP = shards.read_patch_labels(root, md)
    # CLS tokens have no patch label: with tokens=cls only the image level can apply.
    if patch_NP is not None and tokens != "cls":
        if len(patch_NP) < md.n_examples:
            raise ValueError(
                f"{root / shards.PATCH_LABELS_NAME} holds {len(patch_NP)} examples' labels but "
                f"the shards hold {md.n_examples}; re-record (record.py resumes)."
            )
        levels.append(Level("patch", _patch_names(root, md.data, patch_NP), patch_NP))
    image = _image_level(root)
    if image is not None:
        levels.append(image)
    if not levels:
        cls = " with data.tokens=cls" if patch_NP is not None else ""
        raise ValueError(
            f"probe=true needs labels, but {root}{cls} has neither patch labels "
            f"({shards.PATCH_LABELS_NAME}: data=ade20k) nor a label per example in "
            f"{shards.EXAMPLES_NAME} (data=image_folder with class folders, imagenet, inat21); "
            "record a labelled dataset or drop probe=true."
        )
    return levels


def _patch_names(root: pathlib.Path, data: dict, patch_NP: np.ndarray) -> list[str]:
    name = data.get("name")
    if name == "ade20k":
        names = ["unlabeled", *ADE20K_CLASSES]
    elif name == "synthetic-sparse-dictionary":
        names = ["none", *(f"feature {f}" for f in range(int(data["n_features"])))]
    else:
        names = None
    # One pass over the labels (a byte per patch: ~330 MB for ImageNet-sized recordings).
    top = int(patch_NP.max()) if patch_NP.size else 0
    if names is None:
        return ["unlabeled", *(f"class {c}" for c in range(1, top + 1))]
    if top >= len(names):
        raise ValueError(
            f"{root / shards.PATCH_LABELS_NAME} holds label {top}, outside {name}'s classes "
            f"0-{len(names) - 1}; the file belongs to another dataset: re-record these shards."
        )
    return names


def _image_level(root: pathlib.Path) -> Level | None:
    try:
        lines = shards.example_records(root)
    except FileNotFoundError:
        return None
    raw, first_path = [], {}
    for line in lines:
        rec = json.loads(line)
        label = rec.get("label")
        if isinstance(label, bool) or (label is not None and not isinstance(label, int | str)):
            raise ValueError(
                f"{root / shards.EXAMPLES_NAME} has label {label!r}; a label must be an int or "
                "a string (class folder name). Re-record with a supported dataset."
            )
        raw.append(label)
        if label is not None and "/" in rec.get("path", ""):
            first_path.setdefault(label, rec["path"].split("/", 1)[0])
    found = {x for x in raw if x is not None}
    if not found:
        return None
    if len({type(x) for x in found}) > 1:
        raise ValueError(
            f"{root / shards.EXAMPLES_NAME} mixes int and string labels; re-record the shards."
        )
    classes = sorted(found)
    index = {x: c for c, x in enumerate(classes, start=1)}
    labels_N = np.array([index.get(x, 0) for x in raw], dtype=np.int64)
    # ints (imagenet, inat21) are named after their folder (n01440764, 00000_Animalia_...).
    names = ["unlabeled", *(str(first_path.get(x, x)) for x in classes)]
    return Level("image", names, labels_N)

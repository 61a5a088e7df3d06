"""Each image as the model saw it: the eval transform's resize and crop, recorded and redone.

Recording stores `describe(vit.transform)` in `metadata.json` (`transform`): the steps of the
transform that move pixels, as plain JSON. Visualize redoes exactly those steps on the PIL image
(`reproduce`), so a patch cell of the crop is the patch the ViT embedded. Shards recorded before the
steps were stored fall back to the transform of the same architecture built offline with random
weights (the geometry does not depend on weights), else to a plain square center crop.
"""

from __future__ import annotations

import logging

from PIL import Image

logger = logging.getLogger(__name__)

# Transform steps that only convert or normalize colors or tensors: they move no pixels.
_PIXEL_PRESERVING = ("ToTensor", "Normalize", "Convert", "ToDtype", "ToImage", "ToRGB")
FALLBACK_SIZE = 224
"""Crop side when nothing says how the model resized (older shards of an unknown model)."""


def describe(transform) -> list[dict] | None:
    """The pixel-moving steps of a torchvision `Compose` as JSON; None when a step is not one we
    can redo exactly (then visualize falls back, see the module docstring)."""
    from torchvision import transforms as T

    steps = []
    for step in getattr(transform, "transforms", [transform]):
        name = type(step).__name__
        if any(k in name for k in _PIXEL_PRESERVING) or name == "function":
            continue
        if isinstance(step, T.Resize):
            size = step.size if isinstance(step.size, int) else list(step.size)
            steps.append(
                {
                    "op": "resize",
                    "size": size,
                    "interpolation": step.interpolation.value,
                    "max_size": step.max_size,
                    "antialias": step.antialias,
                }
            )
        elif isinstance(step, T.CenterCrop):
            steps.append({"op": "center_crop", "size": list(step.size)})
        else:
            return None
    return steps


def reproduce(img: Image.Image, steps: list[dict]) -> Image.Image:
    """`img` (RGB) after the recorded steps: the pixels the model's transform produced."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    for step in steps:
        if step["op"] == "resize":
            img = F.resize(
                img,
                step["size"],
                interpolation=InterpolationMode(step["interpolation"]),
                max_size=step.get("max_size"),
                antialias=step.get("antialias", True),
            )
        elif step["op"] == "center_crop":
            img = F.center_crop(img, step["size"])
        else:
            raise ValueError(f"unknown crop step {step!r} in metadata.json.")
    return img


def fallback_steps(model: dict) -> list[dict]:
    """Steps for shards that did not record them: the same architecture's transform, built offline
    with random weights; failing that a square center crop to `FALLBACK_SIZE`."""
    from saev.record.config import ModelConfig

    try:
        from saev.record import vit

        cfg = ModelConfig(family=model["family"], ckpt=model["ckpt"], pretrained=False)
        steps = describe(vit.load(cfg).transform)
        if steps is not None:
            return steps
    except Exception as err:  # no network for hf-hub configs, an unknown family, ...
        logger.warning("cannot rebuild %s's transform offline (%s)", model.get("ckpt"), err)
    logger.warning("crops approximate the model's view: resize %d and center crop", FALLBACK_SIZE)
    return [
        {"op": "resize", "size": FALLBACK_SIZE, "interpolation": "bicubic"},
        {"op": "center_crop", "size": [FALLBACK_SIZE, FALLBACK_SIZE]},
    ]

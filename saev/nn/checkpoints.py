"""`saev.nn.load`: any SAE checkpoint this saev reads, by what is on disk.

- our directory: `config.json` + `sae.safetensors` (`saev.nn.sae`);
- SAELens's directory: `cfg.json` + `sae_weights.safetensors` (`saev.nn.saelens`);
- the public saev's single file: a JSON header line, then a torch-saved state dict
  (`saev.nn.public`).

A file of a directory (e.g. `.../sae.safetensors`) names its directory. Nothing is unpickled
beyond tensors, and what is neither format is a ValueError saying so.
"""

from __future__ import annotations

import os
import pathlib

import torch

from saev.nn import public, saelens
from saev.nn import sae as ours
from saev.nn.config import CONFIG_NAME, WEIGHTS_NAME

DIRECTORY_FILES = {CONFIG_NAME, WEIGHTS_NAME, saelens.CFG_NAME, saelens.WEIGHTS_NAME}


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> ours.SAE:
    """Load an SAE checkpoint of any format above, in eval mode; it takes raw activations."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE checkpoint at {path}.")
    if path.is_file() and path.name in DIRECTORY_FILES:
        path = path.parent
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            return ours.load(path, device)
        if saelens.is_saelens_dir(path):
            return saelens.load(path).to(device)
        raise FileNotFoundError(
            f"{path} holds neither {CONFIG_NAME} + {WEIGHTS_NAME} (ours) nor "
            f"{saelens.CFG_NAME} + {saelens.WEIGHTS_NAME} (SAELens); is it an SAE checkpoint?"
        )
    return public.load(path).to(device)

"""The SAE maths, torch only: `SAEConfig` (`config`), the `SAE` module and checkpoints (`sae`),
any checkpoint format we read (`checkpoints`: ours, SAELens's `saelens`, the public saev's
`public`), the TopK family's sparse step (`sparse`), the fused ReLU and JumpReLU activations
(`relu_l1`, `jumprelu`), and same-shape SAEs as batched products (`batched`).

    sae = saev.nn.load("runs/<id>/<sae>")   # takes raw activations; also SAELens, public saev

The names below are loaded on first use, so that `saev.nn.config` (which the training schema
nests) imports without torch.
"""

import importlib

_PUBLIC = {
    "SAEConfig": "saev.nn.config",
    "ACTIVATIONS": "saev.nn.config",
    "TOPK_FAMILY": "saev.nn.config",
    "CONFIG_NAME": "saev.nn.config",
    "WEIGHTS_NAME": "saev.nn.config",
    "SAE": "saev.nn.sae",
    "Output": "saev.nn.sae",
    "load": "saev.nn.checkpoints",
    "from_pretrained": "saev.nn.sae",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'saev.nn' has no attribute {name!r}")

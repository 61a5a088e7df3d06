"""SAELens's on-disk layout (github.com/decoderesearch/SAELens, version 6): a directory with
`cfg.json` and `sae_weights.safetensors`, written from our SAE and read back into one.

SAELens's inference SAEs compute f = act((x - b_dec) @ W_enc + b_enc), x_hat = f @ W_dec + b_dec
on raw inputs (`apply_b_dec_to_input`, `normalize_activations: "none"`), with `W_enc` [D, S],
`W_dec` [S, D]; act is ReLU ("standard"), ReLU of the k largest ("topk", field `k`) or
`relu(z) * (z > threshold)` with a per-latent `threshold` [S] ("jumprelu"; its BatchTopK SAEs are
saved for inference this way too). Ours normalizes first, n = (x - mean) * scale, so exporting
folds that in:

    W_enc' = scale W_enc      b_dec' = mean + b_dec / scale      W_dec' = W_dec / scale

which leaves the pre-activations, and so b_enc and the thresholds, unchanged. The fold is exact
in real arithmetic; in float32 it moves the outputs by a few ulps (none when scale is 1 and mean
0). `cfg.json` also carries a `saev` entry (our config and statistics) that SAELens ignores, so
reading our own export back unfolds to our weights (within float rounding) and our config.
A SAELens directory without it imports with identity normalization.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import torch
from torch import Tensor

from saev.nn.config import SAEConfig
from saev.nn.sae import SAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
LAYOUT_VERSION = "6.0.0"
"""The SAELens version whose layout we write (its cfg.json records the writer's version)."""
SAEV_KEY = "saev"
"""cfg.json's entry for what SAELens does not hold (our config, normalization statistics)."""

ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
"""SAELens's inference architecture for each of our activations."""

# What an SAE imported from a plain SAELens directory gets for our kind-specific fields (our
# schema's defaults, conf/sae/*.yaml); they matter only if it is trained on.
IMPORT_DEFAULTS = {
    "standard": {"sparsity_coeff": 0.3, "sparsity_warmup_steps": 0, "l1_decoder_norm": False},
    "topk": {"aux_k": 512, "aux_coeff": 1 / 32},
    "jumprelu": {
        "sparsity_coeff": 0.8,
        "sparsity_warmup_steps": 0,
        "bandwidth": 0.001,
        "init_threshold": 0.001,
    },
}
TINY = torch.finfo(torch.float32).tiny
"""A threshold of 0 (a plain ReLU) as our log-threshold can hold it."""


def folded(sae: SAE) -> dict[str, Tensor]:
    """SAELens's weights of `sae`, normalization folded in (see the module docstring)."""
    s, m_D = float(sae.norm_scale), sae.norm_mean.detach().float().cpu()
    W_enc_DS, b_enc_S = sae.W_enc.detach().float().cpu(), sae.b_enc.detach().float().cpu()
    W_dec_SD, b_dec_D = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()
    out = {
        "W_enc": (W_enc_DS * s).contiguous(),
        "b_enc": b_enc_S.clone(),
        "W_dec": (W_dec_SD / s).contiguous(),
        "b_dec": (m_D + b_dec_D / s).contiguous(),
    }
    act = sae.cfg.activation
    if act == "jumprelu":
        out["threshold"] = sae.log_threshold.detach().float().cpu().exp()
    elif act == "batchtopk":
        # Ours is a ReLU until a threshold is set (NaN), SAELens's JumpReLU one at 0.
        thr = torch.nan_to_num(sae.threshold.detach().float().cpu(), nan=0.0).clamp_min(0)
        out["threshold"] = thr.expand(sae.cfg.d_sae).contiguous()
    return out


def config_json(sae: SAE, meta: dict | None = None) -> dict:
    """cfg.json for `sae`: SAELens's inference config, `meta` (model and hook names) and ours."""
    cfg = sae.cfg
    out = {
        "architecture": ARCHITECTURE[cfg.activation],
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # SAELens 6.x reads the model and hook names from "metadata" (6.54 does) or, in its
        # first 6.x releases, "meta"; each ignores the other key. Without a sae_lens_version
        # of 6 or more, SAELens reads the file as its pre-6 layout and moves these fields.
        "metadata": {**(meta or {}), "sae_lens_version": LAYOUT_VERSION},
        "meta": {**(meta or {}), "sae_lens_version": LAYOUT_VERSION},
    }
    if cfg.activation == "topk":
        out["k"] = cfg.k
    thr = float(sae.threshold) if cfg.activation == "batchtopk" else None
    out[SAEV_KEY] = {
        "sae": dataclasses.asdict(cfg),
        "normalization": {"mean": sae.norm_mean.tolist(), "scale": float(sae.norm_scale)},
        "batchtopk_threshold": None if thr is None or math.isnan(thr) else thr,
    }
    return out


def save(sae: SAE, directory: str | os.PathLike, meta: dict | None = None) -> pathlib.Path:
    """Write `sae` into `directory` as SAELens's cfg.json and sae_weights.safetensors."""
    import safetensors.torch

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(folded(sae), directory / WEIGHTS_NAME)
    with open(directory / CFG_NAME, "w") as fd:
        json.dump(config_json(sae, meta), fd, indent=2)
    return directory


def is_saelens_dir(path: pathlib.Path) -> bool:
    return (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _our_config(cfg_json: dict, path: pathlib.Path) -> SAEConfig:
    """Our config for a SAELens cfg.json: the `saev` entry's when we wrote it, else built from
    SAELens's architecture with our defaults."""
    ours = (cfg_json.get(SAEV_KEY) or {}).get("sae")
    if ours is not None:
        return SAEConfig(**ours)
    arch, D, S = cfg_json.get("architecture"), cfg_json.get("d_in"), cfg_json.get("d_sae")
    if arch not in IMPORT_DEFAULTS:
        raise ValueError(
            f"{path}: SAELens architecture {arch!r} has no equivalent here; this saev imports "
            f"{sorted(IMPORT_DEFAULTS)}."
        )
    if cfg_json.get("apply_b_dec_to_input", True) is not True or cfg_json.get(
        "normalize_activations", "none"
    ) not in ("none", None):
        raise ValueError(
            f"{path}: apply_b_dec_to_input=false and normalize_activations other than none are "
            "not imported; fold them into the weights with SAELens first."
        )
    if not isinstance(D, int) or not isinstance(S, int):
        raise ValueError(f"{path}: cfg.json lacks integer d_in and d_sae.")
    kind = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    extra = dict(IMPORT_DEFAULTS[arch])
    if kind == "topk":
        extra["k"] = int(cfg_json.get("k", 0)) or None
    return SAEConfig(activation=kind, d_model=D, d_sae=S, b_dec_init="zeros", **extra)


def _check_shapes(w: dict[str, Tensor], cfg: SAEConfig, path: pathlib.Path) -> None:
    D, S = cfg.d_model, cfg.d_sae
    want = {"W_enc": (D, S), "b_enc": (S,), "W_dec": (S, D), "b_dec": (D,)}
    if ARCHITECTURE[cfg.activation] == "jumprelu":
        want["threshold"] = (S,)
    for name, shape in want.items():
        if name not in w:
            raise ValueError(f"{path}: {WEIGHTS_NAME} lacks {name}.")
        if tuple(w[name].shape) != shape:
            raise ValueError(
                f"{path}: {name} has shape {list(w[name].shape)} but cfg.json says d_in={D}, "
                f"d_sae={S} ({list(shape)}); the config and weights disagree."
            )


def load(directory: str | os.PathLike) -> SAE:
    """Read a SAELens directory into our SAE (eval mode, on the CPU)."""
    import safetensors.torch

    path = pathlib.Path(directory)
    try:
        cfg_json = json.loads((path / CFG_NAME).read_text())
        w = safetensors.torch.load_file(path / WEIGHTS_NAME, device="cpu")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable SAELens directory ({err}).") from None
    cfg = _our_config(cfg_json, path)
    _check_shapes(w, cfg, path)
    norm = (cfg_json.get(SAEV_KEY) or {}).get("normalization") or {"mean": [0.0] * cfg.d_model}
    m_D = torch.tensor(norm["mean"], dtype=torch.float32)
    s = float(norm.get("scale", 1.0))
    sae = SAE(cfg)
    with torch.no_grad():
        # The inverse of `folded`.
        sae.W_enc.copy_(w["W_enc"].float() / s)
        sae.b_enc.copy_(w["b_enc"].float())
        sae.W_dec.copy_(w["W_dec"].float() * s)
        sae.b_dec.copy_((w["b_dec"].float() - m_D) * s)
        sae.set_norm(m_D, s)
        sae.b_dec_pending.fill_(False)  # trained weights: no first-batch b_dec
        if cfg.activation == "jumprelu":
            sae.log_threshold.copy_(w["threshold"].float().clamp_min(TINY).log())
        elif cfg.activation == "batchtopk":
            thr = cfg_json[SAEV_KEY].get("batchtopk_threshold")
            sae.threshold.fill_(float("nan") if thr is None else thr)
    return sae.eval()

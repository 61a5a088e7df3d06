"""Checkpoints written by the public saev project (github.com/OSU-NLP-Group/saev), read into our
`SAE` without executing any pickled code.

Its `nn.modeling.dump` writes one file: a first line of JSON (the header), then `torch.save` of the
SAE's state dict (`W_enc` [D, S], `b_enc` [S], `W_dec` [S, D], `b_dec` [D], and for its thresholded
BatchTopK `activation.threshold` []). The header changed over time; these are read:

- no `schema` (its first releases): the config's fields themselves (`d_vit`, `exp_factor`, ...);
  always ReLU, and the encoder saw `x - b_dec`.
- schema 1, `cls` naming the activation config (`Relu`, `TopK`, `BatchTopK`), fields flat in `cfg`
  (`d_vit`, `exp_factor`, `top_k`); or `cls` "SparseAutoencoderConfig" with `cfg.activation` as
  `{"cls", "params"}`.
- schemas 2 to 5: `cfg` with `d_vit`/`exp_factor` or `d_model`/`d_sae`, and `cfg.activation` as
  `{"cls", "params"}` (schema 5's params also carry `kind` or `key`, `sparsity`, `aux`).

Facts this mapping rests on (read from the public project's source, every version above):

- Its `encode` is `act(x @ W_enc + b_enc)` from schema 1's later writers on; the first writers
  (no schema, and schema 1 while the configs lived in `saev.config`) encoded `x - b_dec`. Ours
  always subtracts b_dec, so where theirs did not, `b_enc + b_dec @ W_enc` is folded into our
  b_enc (exact up to float rounding). Schema-1 headers do not say which writer made them; we read
  them as its later writers and its own loader today do (`centered=False`); pass `centered=True`
  for a file from the earlier code.
- Its TopK keeps the k largest pre-activations as they are; ours keeps them through a ReLU. The
  two agree wherever the k largest are positive (a trained SAE's case).
- Its BatchTopK with a stored `activation.threshold` (the EMA of the smallest kept activation)
  encodes `x > threshold` at inference, a ReLU while the threshold is <= 0: our batchtopk with that
  threshold. Without one (schemas 2-3), its inference was a per-example top-k: our topk. Schema 1's
  BatchTopK kept top_k entries of the whole batch, at inference too; it has no per-example
  equivalent, so it becomes our batchtopk without a threshold (a ReLU until one is calibrated).
- Matryoshka is one of its training objectives, not recorded in the checkpoint; a Matryoshka SAE
  loads as its activation kind (prefixes matter only to the training loss).
- It normalizes activations in its data loader (scale_mean, scale_norm), outside the checkpoint;
  the imported SAE takes exactly the inputs the public SAE took (our normalization: identity).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import pickle
import warnings

import torch
from torch import Tensor

from saev.nn.config import SAEConfig
from saev.nn.sae import SAE

MAX_HEADER_BYTES = 1 << 20
"""A header is a config of a few hundred bytes; a longer first line is not one."""

SCHEMAS = (None, 1, 2, 3, 4, 5)
"""The header versions read (None: the first, unversioned header)."""

KINDS = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}
"""The public activation classes and our kinds."""

# Our kind-specific fields for an import: the header's value where it has one, else our schema's
# defaults for the kind (conf/sae/*.yaml); they matter only if the imported SAE is trained on.
RELU_DEFAULTS = {"sparsity_coeff": 0.3, "sparsity_warmup_steps": 0, "l1_decoder_norm": False}
TOPK_DEFAULTS = {"aux_k": 512, "aux_coeff": 1 / 32}


@dataclasses.dataclass(frozen=True)
class Header:
    """What a public header says, in our terms."""

    schema: int | None
    cfg: SAEConfig
    centered: bool
    """Whether the writer's encoder subtracted b_dec from its input."""
    batch_coupled: bool = False
    """Schema 1's BatchTopK: top_k of the whole batch, with no inference threshold."""


def looks_public(path: pathlib.Path) -> bool:
    """Whether `path` is a file whose first line is a JSON object (cheap: reads one line)."""
    try:
        with open(path, "rb") as fd:
            first = fd.readline(MAX_HEADER_BYTES)
        return first.startswith(b"{") and isinstance(json.loads(first), dict)
    except (OSError, ValueError):
        return False


def read_header(path: pathlib.Path) -> tuple[dict, bytes]:
    """The header (parsed) and the bytes after it; ValueError if the first line is not JSON."""
    data = path.read_bytes()
    end = data.find(b"\n", 0, MAX_HEADER_BYTES)
    try:
        header = json.loads(data[:end]) if end > 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path} is not an SAE checkpoint: not our directory (config.json + sae.safetensors), "
            "not SAELens's (cfg.json + sae_weights.safetensors), and its first line is not the "
            "public saev's JSON header; give one of those."
        )
    return header, data[end + 1 :]


def parse_header(header: dict, path: pathlib.Path, centered: bool | None = None) -> Header:
    """Our config for a public header of a schema in `SCHEMAS`; ValueError naming what is wrong."""
    schema = header.get("schema")
    if schema not in SCHEMAS:
        raise ValueError(
            f"{path}: public saev header schema {schema!r} is not one this saev reads "
            f"({[s for s in SCHEMAS if s is not None]} and unversioned); load it with the public "
            "saev and write its W_enc, b_enc, W_dec, b_dec in SAELens's layout, which this reads."
        )
    if schema is None:
        fields, act, early = header, {"cls": "Relu", "params": {}}, True
    elif schema == 1 and header.get("cls", "SparseAutoencoderConfig") != "SparseAutoencoderConfig":
        fields = dict(header.get("cfg") or {})
        act = {"cls": header["cls"], "params": {"top_k": fields.get("top_k", 32)}}
        early = False
    else:
        fields = dict(header.get("cfg") or {})
        act, early = fields.get("activation"), False
    if not isinstance(act, dict) or act.get("cls") not in KINDS:
        name = act.get("cls") if isinstance(act, dict) else act
        raise ValueError(
            f"{path}: the public saev activation {name!r} has no equivalent here; this saev "
            f"imports {sorted(KINDS)}."
        )
    d_model, d_sae = _widths(fields, path)
    kind, params = KINDS[act["cls"]], act.get("params") or {}
    cfg = _config(kind, params, fields, d_model, d_sae)
    return Header(
        schema,
        cfg,
        centered=early if centered is None else centered,
        batch_coupled=kind == "batchtopk" and schema == 1,
    )


def _widths(fields: dict, path: pathlib.Path) -> tuple[int, int]:
    d_model = fields.get("d_model", fields.get("d_vit"))
    d_sae = fields.get("d_sae")
    if d_sae is None and d_model is not None and fields.get("exp_factor") is not None:
        d_sae = int(d_model * fields["exp_factor"])
    if not isinstance(d_model, int) or not isinstance(d_sae, int) or d_model <= 0 or d_sae <= 0:
        raise ValueError(
            f"{path}: the public saev header gives no positive d_model/d_vit and d_sae/exp_factor "
            f"(got {d_model!r}, {d_sae!r}); the file is damaged or not an SAE checkpoint."
        )
    return d_model, d_sae


def _config(kind: str, params: dict, fields: dict, d_model: int, d_sae: int) -> SAEConfig:
    extra: dict = {}
    if kind == "relu":
        sparsity = params.get("sparsity")
        coeff = (
            (sparsity or {}).get("params", {}).get("coeff") if isinstance(sparsity, dict) else None
        )
        coeff = coeff if coeff is not None else fields.get("sparsity_coeff", fields.get("l1_coeff"))
        extra = {**RELU_DEFAULTS, **({"sparsity_coeff": float(coeff)} if coeff is not None else {})}
    else:
        aux = (params.get("aux") or {}).get("params", {})
        extra = {
            "k": int(params.get("top_k", 32)),
            "aux_k": int(aux.get("k_aux", TOPK_DEFAULTS["aux_k"])),
            "aux_coeff": float(aux.get("alpha", TOPK_DEFAULTS["aux_coeff"])),
        }
        if kind == "batchtopk":
            extra["threshold_momentum"] = float(params.get("momentum", 0.1))
    try:
        return SAEConfig(
            activation=kind,
            d_model=d_model,
            d_sae=d_sae,
            normalize_decoder=bool(fields.get("normalize_w_dec", True)),
            # The weights are trained: a first training batch must not overwrite b_dec.
            b_dec_init="zeros",
            **extra,
        )
    except ValueError as err:
        raise ValueError(f"the public saev header does not make a valid SAE: {err}") from None


def read_state(rest: bytes, path: pathlib.Path) -> dict[str, Tensor]:
    """The torch-saved state dict after the header, read with `weights_only=True`: tensors and
    plain containers only; a pickle that names any other class or function is refused unrun."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error says it
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(rest), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as err:
        raise ValueError(
            f"{path}: the weights after the public saev header are not a plain torch state dict "
            f"(refused without running any of it: {_reason(err)}); re-save them from the public "
            "saev with its dump()."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: the weights after the header are not a dict of tensors.")
    return state


def _reason(err: BaseException) -> str:
    """The part of torch's refusal that names what the pickle asked for (its message goes on to
    suggest weights_only=False, which is exactly what must not be done with an unknown file)."""
    text = " ".join(str(err).split())
    for marker in ("Unsupported global:", "Unsupported operand", "WeightsUnpickler error:"):
        if marker in text:
            return text[text.index(marker) :].split(". ")[0].split(" Check the doc")[0][:200]
    return text.split(". ")[0][:200] or type(err).__name__


def check_shapes(state: dict[str, Tensor], cfg: SAEConfig, path: pathlib.Path) -> None:
    D, S = cfg.d_model, cfg.d_sae
    want = {"W_enc": (D, S), "b_enc": (S,), "W_dec": (S, D), "b_dec": (D,)}
    missing = sorted(set(want) - state.keys())
    if missing:
        raise ValueError(f"{path}: the state dict lacks {missing}; it is not a public saev SAE.")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"{path}: {name} has shape {list(state[name].shape)} but the header says "
                f"d_model={D}, d_sae={S} ({list(shape)}); the header and weights disagree."
            )
    thr = state.get("activation.threshold")
    if thr is not None and thr.numel() != 1:
        raise ValueError(f"{path}: activation.threshold should be one number, got {thr.shape}.")


def to_sae(header: Header, state: dict[str, Tensor]) -> SAE:
    """Our SAE computing what the public one computed (see the module docstring)."""
    cfg = header.cfg
    thr = state.get("activation.threshold")
    if cfg.activation == "batchtopk" and thr is None and not header.batch_coupled:
        # Schemas 2-3: a per-example top-k at inference, which is our TopK.
        cfg = dataclasses.replace(cfg, activation="topk", threshold_momentum=None)
    sae = SAE(cfg)
    W_enc_DS, b_enc_S = state["W_enc"].float(), state["b_enc"].float()
    W_dec_SD, b_dec_D = state["W_dec"].float(), state["b_dec"].float()
    if not header.centered:
        # Theirs: act(x W_enc + b_enc); ours: act((x - b_dec) W_enc + b_enc').
        b_enc_S = b_enc_S + b_dec_D @ W_enc_DS
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DS)
        sae.b_enc.copy_(b_enc_S)
        sae.W_dec.copy_(W_dec_SD)
        sae.b_dec.copy_(b_dec_D)
        if cfg.activation == "batchtopk" and thr is not None:
            # Theirs is a ReLU while the threshold is <= 0; ours is one at threshold 0.
            sae.threshold.fill_(max(float(thr), 0.0))
    return sae.eval()


def load(path: str | os.PathLike, centered: bool | None = None) -> SAE:
    """Read a public saev checkpoint file into our SAE (eval mode, on the CPU). `centered`
    overrides whether its encoder subtracted b_dec (see the module docstring)."""
    path = pathlib.Path(path)
    raw, rest = read_header(path)
    header = parse_header(raw, path, centered)
    state = read_state(rest, path)
    check_shapes(state, header.cfg, path)
    return to_sae(header, state)

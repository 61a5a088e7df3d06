"""ViT wrappers: build a supported ViT and read its residual stream after chosen blocks.

Every family ends up as a `ViT`: a trunk module, its list of transformer blocks, the forward call
that runs them, the call that runs the whole model to its output (for the spliced evaluation),
and facts taken from the model itself (d_model, patch grid, image size, prefix tokens, eval
transform). One mechanism, forward hooks on the blocks, records all of them. `config_of`
turns a recording's `metadata.json` model description back into the `ModelConfig` that built it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from saev.record.config import TINY_SPEC, ModelConfig

OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclasses.dataclass
class ViT:
    module: nn.Module
    """The vision trunk (what `forward` runs); moved to the device and set to eval."""
    blocks: Sequence[nn.Module]
    """Transformer blocks in order; block i's output is the residual stream after layer i."""
    forward: Callable[[torch.Tensor], object]
    transform: Callable
    """The model's own eval preprocessing: PIL image -> float tensor [3, H, W]."""
    d_model: int
    grid: tuple[int, int]
    """Patch rows and columns."""
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    n_prefix_tokens: int
    """Tokens before the patches: CLS (if any, always first) then register/storage tokens."""
    has_cls: bool
    batch_first: bool
    """False when blocks see [tokens, batch, d_model] (older open_clip towers)."""
    description: dict
    """`{"family", "ckpt", "weights"}` for metadata.json; decides the shard directory's hash."""
    output: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    """The whole model on images: `(embedding [B, E], logits [B, C] or None)`. The embedding is
    what the model hands on: a timm model's pooled pre-logits features (what its classifier
    consumes), an open_clip tower's projected image embedding; logits only where the model has
    a classifier head (`load(..., head=True)` with weights that include one)."""

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Block indices for `layers` as the user wrote them (negative counts from the end)."""
        n = len(self.blocks)
        out = []
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(
                    f"layer {layer} is out of range: {self.description['ckpt']} has {n} blocks, "
                    f"so layers must be in {-n}..{n - 1}."
                )
            out.append(layer % n)
        if len(set(out)) != len(out):
            raise ValueError(f"layers={list(layers)} name the same block twice (of {n} blocks).")
        return out


class _StopForward(Exception):
    """Raised by the last needed block's hook: the blocks after it would be wasted work."""


class Recorder:
    """Records `[batch, layers, tokens, d_model]` activations from forward hooks on `vit.blocks`.

    Tokens are CLS (if `cls_token`) then the patches in row-major order; register and storage
    tokens are dropped. The forward pass stops right after the deepest recorded block.
    """

    def __init__(self, vit: ViT, blocks: Sequence[int], cls_token: bool):
        if cls_token and not vit.has_cls:
            raise ValueError(f"{vit.description['ckpt']} has no CLS token; set cls_token=false.")
        self.vit, self.blocks, self.cls_token = vit, list(blocks), cls_token
        self._last = max(self.blocks)
        self._acts: dict[int, torch.Tensor] = {}
        self._handles = [
            vit.blocks[i].register_forward_hook(self._hook(i)) for i in sorted(set(self.blocks))
        ]

    def _hook(self, i: int):
        def fn(module, args, output):
            acts = output[0] if isinstance(output, tuple) else output
            self._acts[i] = acts if self.vit.batch_first else acts.transpose(0, 1)
            if i == self._last:
                raise _StopForward

        return fn

    @torch.inference_mode()
    def __call__(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        self._acts.clear()
        try:
            self.vit.forward(x_BCHW)
        except _StopForward:
            pass
        p, c = self.vit.n_prefix_tokens, int(self.cls_token)
        first = self._acts[self.blocks[0]]
        shape = (len(first), len(self.blocks), self.vit.n_patches + c, self.vit.d_model)
        out_BLTD = torch.empty(shape, dtype=first.dtype, device=first.device)
        for j, i in enumerate(self.blocks):  # one copy per layer, straight into place
            acts_BTD = self._acts[i]
            if self.cls_token:
                out_BLTD[:, j, 0] = acts_BTD[:, 0]
            out_BLTD[:, j, c:] = acts_BTD[:, p:]
        self._acts.clear()  # the full block outputs can go now
        return out_BLTD

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def load(cfg: ModelConfig, device: str | torch.device = "cpu", head: bool = False) -> ViT:
    """Build the ViT that `cfg` names, on `device`, in eval mode. `head=True` keeps a timm
    model's classifier where its weights (pretrained or `weights`) have one; random weights
    never get one, since a head built first would change the trunk's random draw."""
    # Random initialization must be the same on every run: a resumed recording has to continue
    # with the very weights it started with.
    torch.manual_seed(cfg.seed)
    vit = _open_clip(cfg) if _uses_open_clip(cfg) else _timm(cfg, head)
    vit.module.to(device).eval()
    return vit


RANDOM_WEIGHTS = re.compile(r"random\(seed=(-?\d+)\)")


def config_of(description: dict) -> ModelConfig:
    """The `ModelConfig` that recorded shards whose metadata.json says `model: description`
    (`ViT.description`); ValueError if it names no model this saev builds."""
    family, ckpt = description.get("family"), description.get("ckpt")
    weights = str(description.get("weights", ""))
    if family is None or ckpt is None:
        raise ValueError(f"the recording's model {description} names no family and ckpt.")
    if weights == "pretrained":
        return ModelConfig(family=family, ckpt=ckpt, pretrained=True)
    if m := RANDOM_WEIGHTS.fullmatch(weights):
        return ModelConfig(family=family, ckpt=ckpt, seed=int(m.group(1)))
    if not pathlib.Path(weights).is_file():
        raise ValueError(
            f"the recording's weights file {weights} is gone; put it back at that path to "
            "rebuild the model."
        )
    return ModelConfig(family=family, ckpt=ckpt, weights=weights)


def _weights_description(cfg: ModelConfig) -> str:
    if cfg.weights is not None:
        return str(pathlib.Path(cfg.weights).expanduser().absolute())
    return "pretrained" if cfg.pretrained else f"random(seed={cfg.seed})"


def _uses_open_clip(cfg: ModelConfig) -> bool:
    """clip and siglip go through open_clip unless `ckpt` is a timm model name."""
    if cfg.family not in ("clip", "siglip"):
        return False
    import timm

    name = cfg.ckpt.removeprefix("hf-hub:").split("/")[-1]
    return not timm.is_model(name.split(".")[0])


def _timm(cfg: ModelConfig, head: bool = False) -> ViT:
    import timm

    name, kwargs = cfg.ckpt, {}
    if cfg.family == "tiny":
        img, patch, dim, depth, heads, reg = TINY_SPEC.fullmatch(cfg.ckpt).groups()
        name = "vit_tiny_patch16_224"
        kwargs = dict(
            img_size=int(img), patch_size=int(patch), embed_dim=int(dim), depth=int(depth)
        )
        kwargs.update(num_heads=int(heads), reg_tokens=int(reg or 0))
    elif not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        raise ValueError(f"model.ckpt={name!r} is not a timm model (see timm.list_models()).")
    pretrained = cfg.pretrained and cfg.weights is None
    if not (head and pretrained):  # published weights bring their own head, or none
        kwargs["num_classes"] = 0
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:
        raise _build_error(cfg, err) from err
    if cfg.weights is not None:
        filter_fn = getattr(
            importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None
        )
        load_weights(model, cfg.weights, filter_fn=filter_fn, head=head)
    data_cfg = timm.data.resolve_model_data_config(model)
    # pretrained_cfg keeps the registered input size even when img_size was overridden.
    data_cfg["input_size"] = (3, *model.patch_embed.img_size)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    return _timm_trunk(model, transform, cfg)


def _timm_output(model: nn.Module):
    def output(x_BCHW: torch.Tensor):
        emb_BE = model.forward_head(model.forward_features(x_BCHW), pre_logits=True)
        return emb_BE, (model.get_classifier()(emb_BE) if model.num_classes else None)

    return output


def _timm_trunk(model: nn.Module, transform: Callable, cfg: ModelConfig) -> ViT:
    if not all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens")):
        raise ValueError(f"{cfg.ckpt} is a {type(model).__name__}, not a ViT with patch tokens.")
    return ViT(
        module=model,
        blocks=model.blocks,
        forward=model.forward_features,
        transform=transform,
        d_model=model.embed_dim,
        grid=tuple(model.patch_embed.grid_size),
        patch_size=tuple(model.patch_embed.patch_size),
        img_size=tuple(model.patch_embed.img_size),
        n_prefix_tokens=model.num_prefix_tokens,
        has_cls=getattr(model, "cls_token", None) is not None,
        batch_first=True,
        description={"family": cfg.family, "ckpt": cfg.ckpt, "weights": _weights_description(cfg)},
        output=_timm_output(model),
    )


def _open_clip(cfg: ModelConfig) -> ViT:
    import open_clip
    from open_clip.timm_model import TimmModel
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip.transformer import VisionTransformer

    name, tag = cfg.ckpt, None
    if not name.startswith(OPEN_CLIP_SCHEMAS):
        name, _, tag = name.partition("/")
        if cfg.pretrained and cfg.weights is None and not tag:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"model.ckpt={cfg.ckpt!r} needs a pretrained tag: {name}/<one of {tags}>."
            )
    pretrained = cfg.pretrained and cfg.weights is None
    try:
        model = open_clip.create_model(
            name, pretrained=tag if pretrained else None, load_weights=pretrained
        )
    except Exception as err:
        raise _build_error(cfg, err) from err
    visual = model.visual
    transform = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    if cfg.weights is not None:
        load_weights(visual, cfg.weights, prefix="visual.")
    if isinstance(visual, TimmModel):
        vit = _timm_trunk(visual.trunk, transform, cfg)
        # The tower's own head projects the trunk's pooled features into the joint space.
        return dataclasses.replace(vit, module=visual, output=lambda x: (visual(x), None))
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{cfg.ckpt}'s image tower is a {type(visual).__name__}, not a ViT.")
    return ViT(
        module=visual,
        blocks=visual.transformer.resblocks,
        forward=visual,
        transform=transform,
        d_model=visual.transformer.width,
        grid=tuple(visual.grid_size),
        patch_size=tuple(visual.patch_size),
        img_size=tuple(visual.image_size),
        n_prefix_tokens=1,  # open_clip always prepends its class embedding
        has_cls=True,
        batch_first=getattr(visual.transformer, "batch_first", True),
        description={"family": cfg.family, "ckpt": cfg.ckpt, "weights": _weights_description(cfg)},
        output=lambda x: (visual(x), None),
    )


def _build_error(cfg: ModelConfig, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = ""
    if cfg.pretrained and cfg.weights is None:
        hint = (
            " Without network access, pass model.weights=/path/to/file or model.pretrained=false."
        )
    return ValueError(f"cannot build model.ckpt={cfg.ckpt!r} ({first}).{hint}")


def load_weights(
    module: nn.Module,
    path: str,
    prefix: str = "",
    filter_fn: Callable | None = None,
    head: bool = False,
) -> None:
    """Load a safetensors file or torch state dict into `module`; every parameter must be covered.

    Accepts checkpoints wrapped in `state_dict`/`model`, keys prefixed `module.` (DDP) or `prefix`
    (e.g. a full CLIP checkpoint's `visual.`), and timm's own converters via `filter_fn`. With
    `head`, a headless timm `module` gets the file's classifier (`head.weight` [C, E]), if any.
    """
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model.weights={path} is not a file.")
    try:
        if file.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"model.weights={path} is neither safetensors nor a torch state dict ({err})."
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if filter_fn is not None:
        state = filter_fn(state, module)
    if head and "head.weight" in state and getattr(module, "num_classes", None) == 0:
        module.reset_classifier(state["head.weight"].shape[0])
    own = module.state_dict()
    # A classifier head in the file is fine: recording never uses it (models are built headless).
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head.")}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"model.weights={path} does not fit this architecture: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}."
        )
    module.load_state_dict(state)

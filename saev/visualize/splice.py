"""The SAE inside the ViT: the recorded block's output, on the tokens the SAE was trained on,
replaced by the SAE's reconstruction (docs/guide.md, "Does the model still work with the SAE
inside it?").

    from saev.visualize import splice
    vit = splice.load_vit(shard_root)        # the recording's model, rebuilt from metadata.json
    sae = saev.nn.load("runs/<id>/<sae>")
    with splice.spliced(vit, sae, layer=-2, tokens="patches"):
        emb_BE, logits_BC = vit.output(x_BCHW)
    # zero latent 7 and keep the SAE's error term, so that only the latent's part changes:
    with splice.spliced(vit, sae, -2, "patches", add_error=True, edit=splice.zero([7])):
        ...

Tokens the SAE was not trained on (registers, CLS for a patch SAE) pass through untouched. The
SAE takes and returns raw activations (its normalization is folded into the checkpoint), so the
splice is exactly the computation training saw. `replacing` is the general form: any function
from the block's output `[B, T, D]` to `[M, T, D]`, so that one forward of the lower blocks can
feed several variants (rows) to the upper ones.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable

import torch
from torch import Tensor

from saev import shards
from saev.record import vit as vitlib

TOKENS = ("patches", "cls", "all")
ENCODE_ROWS = 4096
"""Tokens per SAE call inside a splice: bounds the dense [rows, d_sae] latents."""


def load_vit(shard_root: str | pathlib.Path, device="cpu", head: bool = True) -> vitlib.ViT:
    """The ViT that recorded `shard_root`, rebuilt from its metadata.json (family, checkpoint,
    weights; with its classifier head where the weights have one); ValueError if it cannot be."""
    md = shards.read_metadata(pathlib.Path(shard_root))
    return vitlib.load(vitlib.config_of(md.model), device, head=head)


def positions(vit: vitlib.ViT, tokens: str) -> Tensor:
    """Indices, in a block's output sequence, of the tokens an SAE trained on `tokens` reads:
    CLS (position 0) then the patches, as the shards store them; registers never."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens={tokens!r} must be one of {list(TOKENS)}.")
    if tokens != "patches" and not vit.has_cls:
        raise ValueError(f"{vit.description['ckpt']} has no CLS token; the SAE cannot read it.")
    cls = [0] if tokens != "patches" else []
    patches = (
        [] if tokens == "cls" else range(vit.n_prefix_tokens, vit.n_prefix_tokens + vit.n_patches)
    )
    return torch.tensor([*cls, *patches], dtype=torch.long)


def zero(latents) -> Callable[[Tensor], Tensor]:
    """An `edit` that sets the given latents to 0 on every token."""
    idx = torch.as_tensor(list(latents), dtype=torch.long)

    def edit(f_BTS: Tensor) -> Tensor:
        return f_BTS.index_fill(-1, idx.to(f_BTS.device), 0.0)

    return edit


def reconstruct(
    sae, x_BTD: Tensor, add_error: bool = False, edit: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The SAE's reconstruction of raw activations `x_BTD` (`edit`ed latents, plus the error
    term `x - decode(f)` with `add_error`), in `x_BTD`'s dtype; the SAE computes in float32."""
    out = []
    # Whole images per SAE call, so that `edit` sees [images, tokens, d_sae].
    for x_bTD in x_BTD.float().split(max(1, ENCODE_ROWS // x_BTD.shape[1])):
        b, T, D = x_bTD.shape
        f_bTS = sae.encode(x_bTD.reshape(b * T, D)).view(b, T, -1)
        x_hat_bTD = sae.decode(f_bTS if edit is None else edit(f_bTS))
        if add_error:
            x_hat_bTD = x_hat_bTD + (x_bTD - sae.decode(f_bTS))
        out.append(x_hat_bTD)
    return torch.cat(out).to(x_BTD.dtype)


@contextlib.contextmanager
def replacing(vit: vitlib.ViT, layer: int, rows: Callable[[Tensor], Tensor]):
    """While active, block `layer`'s output `[B, T, D]` (batch first, whatever the model's own
    layout) is replaced by `rows(output)`, `[M, T, D]`: the blocks above see M images."""
    (block,) = vit.resolve_layers([layer])

    def hook(module, args, output):
        acts = output[0] if isinstance(output, tuple) else output
        h_BTD = acts if vit.batch_first else acts.transpose(0, 1)
        new = rows(h_BTD)
        new = new if vit.batch_first else new.transpose(0, 1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = vit.blocks[block].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def spliced(
    vit: vitlib.ViT,
    sae,
    layer: int,
    tokens: str = "patches",
    add_error: bool = False,
    edit: Callable[[Tensor], Tensor] | None = None,
):
    """Context manager: the ViT with `sae` in place of block `layer`'s output on `tokens`
    (`edit(f_BTS) -> f'_BTS` on the latents before decoding; `add_error` keeps the SAE's
    error term, so with `edit=None` the model is unchanged up to rounding)."""
    check_fits(vit, sae, layer)
    pos_T = positions(vit, tokens)

    def rows(h_BTD: Tensor) -> Tensor:
        out = h_BTD.clone()
        idx = pos_T.to(h_BTD.device)
        out[:, idx] = reconstruct(sae, h_BTD[:, idx], add_error, edit)
        return out

    return replacing(vit, layer, rows)


def check_fits(vit: vitlib.ViT, sae, layer: int) -> None:
    """ValueError naming the problem if `sae` cannot read block `layer` of `vit`."""
    vit.resolve_layers([layer])
    if sae.cfg.d_model != vit.d_model:
        raise ValueError(
            f"the SAE takes d_model={sae.cfg.d_model} but {vit.description['ckpt']}'s blocks "
            f"output {vit.d_model}; pass the SAE trained on this model (ckpt=)."
        )

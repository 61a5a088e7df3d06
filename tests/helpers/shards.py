"""Shard directories written for tests: ours (`make_shards`) and the public saev's layout
(`write_public_saev`), with what the loader tests read from them."""

import base64
import json

import numpy as np
import torch

from saev import shards
from saev.data import normalization
from saev.data.config import DataConfig


def make_shards(
    tmp_path,
    *,
    n_examples=23,
    layers=(3, -1),
    cls_token=True,
    n_patches=5,
    d_model=8,
    dtype="float32",
    per_shard=7,
    seed=0,
):
    """Write our format; returns (root, float32 [N, L, T, D] exactly as stored)."""
    md = shards.Metadata(
        model={"family": "test", "ckpt": "none"}, layers=layers, cls_token=cls_token,
        n_patches_per_example=n_patches, d_model=d_model, dtype=dtype, n_examples=n_examples,
        examples_per_shard=per_shard, data={"name": "synthetic", "seed": seed},
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    acts_NLTD = rng.normal(size=(n_examples, len(layers), md.n_tokens_per_example, d_model)).astype(
        np.float32
    )
    with shards.ShardWriter(tmp_path, md) as writer:
        writer.add(acts_NLTD, [{"index": i} for i in range(n_examples)])
    stored = shards.to_float32(shards.from_float32(acts_NLTD, dtype), dtype)
    return writer.root, stored


def collect(loader):
    batches = list(loader)
    cat = lambda k: torch.cat([b[k] for b in batches])
    return batches, cat("act").float().numpy(), cat("example_idx").numpy(), cat("token_idx").numpy()


def cfg_for(root, **kw):
    base = dict(
        shard_root=str(root), layer=-1, batch_size=16, n_workers=1, buffer_mb=1, val_fraction=0.2
    )
    return DataConfig(**{**base, **kw})


def write_public_saev(
    root, *, n_examples=(4, 4, 2, 0), layers=(6, 11), content=3, cls_token=True, d_model=8
):
    """A protocol-2.1 directory: full-size .bin files padded with NaN, a trailing empty shard."""
    root.mkdir(parents=True)
    T, L = content + int(cls_token), len(layers)
    per_shard = max(n_examples)
    payload = b"cno_such_module\nThing\n."  # GLOBAL opcode: unpickling imports a missing module
    md = {
        "family": "clip", "ckpt": "ViT-B-16/openai", "layers": list(layers),
        "content_tokens_per_example": content, "cls_token": cls_token, "d_model": d_model,
        "n_examples": sum(n_examples), "max_tokens_per_shard": per_shard * T * L + T - 1,
        "data": base64.b64encode(payload).decode(), "dataset": "/data/imgs", "pixel_agg": None,
        "dtype": "float32", "protocol": "2.1",
    }  # fmt: skip
    (root / "metadata.json").write_text(json.dumps(md))
    rng = np.random.default_rng(0)
    acts_NLTD = rng.normal(size=(sum(n_examples), L, T, d_model)).astype(np.float32)
    listing, start = [], 0
    for i, n in enumerate(n_examples):
        full = np.full((per_shard, L, T, d_model), np.nan, dtype=np.float32)
        full[:n] = acts_NLTD[start : start + n]
        full.tofile(root / f"acts{i:06d}.bin")
        listing.append({"name": f"acts{i:06d}.bin", "n_examples": n})
        start += n
    (root / "shards.json").write_text(json.dumps(listing))
    return root, acts_NLTD


def make_read_only(root, monkeypatch) -> None:
    """Statistics cannot be written under `root` (tests run as root: chmod would not stop it)."""
    real = normalization._write_json

    def read_only(path, obj):
        if str(path).startswith(str(root)):
            raise PermissionError(13, "Permission denied")
        real(path, obj)

    monkeypatch.setattr(normalization, "_write_json", read_only)

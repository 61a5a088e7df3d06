"""Synthetic activations with a known sparse dictionary, for testing SAE training end to end.

Each token is a sparse non-negative combination of `n_features` random unit vectors (the true
dictionary) plus Gaussian noise and an optional constant offset, written as a shard directory in
our format, with the true dictionary next to the shards (`true_dictionary.npy`, [F, D]).

    python -m saev.synthetic --dump-to shards --d-model 64 --n-features 256 --active 4

The last line printed is the shard directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import numpy as np
import torch

from saev import shards

DICTIONARY_NAME = "true_dictionary.npy"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    d_model: int = 64
    """Width of the activations."""
    n_features: int = 256
    """Number of true features (rows of the dictionary)."""
    active: int = 4
    """Features active per token, chosen uniformly at random without replacement."""
    noise: float = 0.01
    """Standard deviation of isotropic Gaussian noise added to every token."""
    offset: float = 0.0
    """Norm of a constant random vector added to every token (ViT activations have big means)."""
    n_examples: int = 512
    """Examples ("images") to write."""
    n_patches: int = 16
    """Tokens per example."""
    examples_per_shard: int = 128
    seed: int = 0
    dtype: str = "float32"
    """Storage dtype of the shards: float32, float16 or bfloat16."""
    children: int = 0
    """A hierarchy: with children > 0 the first n_features / (1 + children) features are parents,
    `active` of which fire per token, and each has `children` child features (independent random
    directions) that fire only with it: one of them on half of its parent's tokens. The kind of
    data where Matryoshka SAEs should keep parents whole (no absorption of a parent into its
    children's latents). 0: a flat dictionary, every feature equally likely."""
    labels: bool = False
    """Patch labels (labels.bin, for label probes): each token's label is 1 + its strongest
    true feature, whose coefficient is raised by 1.5 (into [2, 3]) so that it stands out of the
    others ([0.5, 1.5]). Needs n_features <= 255 (a byte per label)."""

    def __post_init__(self):
        if self.dtype not in shards.DTYPE_ITEMSIZE:
            raise ValueError(f"dtype={self.dtype!r} must be one of {list(shards.DTYPE_ITEMSIZE)}.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("dtype", "labels"):
                continue
            if f.name in ("noise", "offset", "seed", "children"):
                if value < 0:
                    raise ValueError(f"{f.name} must be non-negative, got {value}.")
            elif value <= 0:
                raise ValueError(f"{f.name} must be positive, got {value}.")
        if self.n_features % (1 + self.children):
            raise ValueError(
                f"n_features={self.n_features} is not a multiple of 1 + children={self.children}."
            )
        if self.labels and self.n_features > 255:
            raise ValueError(f"labels=True needs n_features <= 255, got {self.n_features}.")
        if self.active > self.n_parents:
            raise ValueError(f"active={self.active} exceeds the {self.n_parents} parent features.")

    @property
    def n_parents(self) -> int:
        """Features that fire on their own: all of them in a flat dictionary."""
        return self.n_features // (1 + self.children)

    def children_of(self, parent: int) -> range:
        """Indices of a parent feature's children in the dictionary."""
        first = self.n_parents + parent * self.children
        return range(first, first + self.children)


def make_dictionary(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The true dictionary [F, D] (unit rows) and the constant offset [D]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dict_FD = torch.randn(cfg.n_features, cfg.d_model, generator=gen)
    dict_FD /= dict_FD.norm(dim=-1, keepdim=True)
    offset_D = torch.randn(cfg.d_model, generator=gen)
    offset_D *= cfg.offset / offset_D.norm()
    return dict_FD, offset_D


def sample(cfg: SyntheticConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` tokens [n, D]: the true features' coefficients (`coefficients`) times the dictionary,
    plus the offset and isotropic Gaussian noise."""
    return sample_labelled(cfg, n, gen)[0]


def sample_labelled(cfg: SyntheticConfig, n: int, gen: torch.Generator):
    """`sample`'s tokens [n, D] and, with `labels`, each token's label [n] (1 + its strongest
    feature, raised to stand out); labels None otherwise."""
    dict_FD, offset_D = make_dictionary(cfg)
    coef_NF = coefficients(cfg, n, gen)
    labels_N = None
    if cfg.labels:
        labels_N = coef_NF.argmax(dim=-1)
        coef_NF[torch.arange(n), labels_N] += 1.5
        labels_N = labels_N + 1
    noise_ND = cfg.noise * torch.randn(n, cfg.d_model, generator=gen)
    return coef_NF @ dict_FD + offset_D + noise_ND, labels_N


def coefficients(cfg: SyntheticConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, F]: coefficients uniform in [0.5, 1.5] on `active` random parent features per token
    (every feature of a flat dictionary), so every active feature is well above the noise; with
    `children`, one child of each active parent on half of the tokens, likewise."""
    P = cfg.n_parents
    idx_NA = torch.rand(n, P, generator=gen).topk(cfg.active, dim=-1).indices
    coef_NA = 0.5 + torch.rand(n, cfg.active, generator=gen)
    coef_NF = torch.zeros(n, cfg.n_features).scatter(-1, idx_NA, coef_NA)
    if cfg.children:
        child_NA = P + idx_NA * cfg.children
        child_NA += torch.randint(cfg.children, (n, cfg.active), generator=gen)
        on_NA = torch.rand(n, cfg.active, generator=gen) < 0.5
        child_coef_NA = (0.5 + torch.rand(n, cfg.active, generator=gen)) * on_NA
        coef_NF.scatter_(-1, child_NA, child_coef_NA)
    return coef_NF


def write(dump_to: str | pathlib.Path, cfg: SyntheticConfig) -> pathlib.Path:
    """Write the shard directory (idempotent: same settings, same directory) and return it."""
    md = shards.Metadata(
        model={"family": "synthetic", "ckpt": "sparse-dictionary"},
        layers=(0,),
        cls_token=False,
        n_patches_per_example=cfg.n_patches,
        d_model=cfg.d_model,
        dtype=cfg.dtype,
        n_examples=cfg.n_examples,
        examples_per_shard=cfg.examples_per_shard,
        # A flat, unlabelled dictionary keeps the description (and so the directory) it had
        # before hierarchies and labels existed.
        data={
            "name": "synthetic-sparse-dictionary",
            **{
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in ("children", "labels") or v
            },
            **({"patch_labels": "labels.bin: 1 + strongest true feature"} if cfg.labels else {}),
        },
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with shards.ShardWriter(dump_to, md, patch_labels=cfg.labels) as writer:
        # Regenerate from the start so a resumed write produces the same bytes.
        for start in range(0, cfg.n_examples, cfg.examples_per_shard):
            n = min(cfg.examples_per_shard, cfg.n_examples - start)
            acts_ND, labels_N = sample_labelled(cfg, n * cfg.n_patches, gen)
            if start < writer.n_done:
                continue
            acts_NLTD = acts_ND.view(n, 1, cfg.n_patches, cfg.d_model).numpy()
            labels_NP = None
            if labels_N is not None:
                labels_NP = labels_N.view(n, cfg.n_patches).numpy().astype(np.uint8)
            writer.add(acts_NLTD, [{"index": i} for i in range(start, start + n)], labels_NP)
        root = writer.root
    np.save(root / DICTIONARY_NAME, make_dictionary(cfg)[0].numpy())
    return root


def load_dictionary(root: str | pathlib.Path) -> torch.Tensor:
    """The true dictionary [F, D] saved next to a synthetic shard directory."""
    return torch.from_numpy(np.load(pathlib.Path(root) / DICTIONARY_NAME, allow_pickle=False))


def recovery(W_dec_SD: torch.Tensor, dict_FD: torch.Tensor, threshold: float = 0.9) -> dict:
    """How well SAE decoder rows recover the true features: for each true feature, the best
    cosine similarity with any decoder row; `recovered` is the fraction above `threshold`."""
    W = torch.nn.functional.normalize(W_dec_SD.float(), dim=-1)
    F = torch.nn.functional.normalize(dict_FD.float(), dim=-1)
    best_F = (F @ W.T).max(dim=-1).values
    return {
        "recovered": (best_F > threshold).float().mean().item(),
        "mean_best_cos": best_F.mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m saev.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dump-to", required=True, help="parent directory of the shard directory")
    for f in dataclasses.fields(SyntheticConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f"default {f.default}")
            continue
        parser.add_argument(
            flag, type=type(f.default), default=f.default, help=f"default {f.default}"
        )
    args = vars(parser.parse_args(argv))
    dump_to = args.pop("dump_to")
    try:
        root = write(dump_to, SyntheticConfig(**args))
    except (ValueError, shards.ShardError) as err:
        parser.exit(2, f"error: {err}\n")
    print(root)


if __name__ == "__main__":
    main()

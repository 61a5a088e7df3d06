"""`SAEConfig`: one SAE's architecture and objective (the Hydra node `sae`, `conf/sae/<kind>.yaml`).

Imports nothing heavy (no torch), so a bad value fails before torch loads, and the training and
visualize schemas can nest it.
"""

from __future__ import annotations

import dataclasses

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_FAMILY = ("topk", "batchtopk")
PENALIZED = ("relu", "jumprelu")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"

# Which kind-specific fields each activation uses; every other kind must leave them None, so a
# setting that would be ignored is an error instead.
KIND_FIELDS = {
    "sparsity_coeff": PENALIZED,
    "sparsity_warmup_steps": PENALIZED,
    "l1_decoder_norm": ("relu",),
    "k": TOPK_FAMILY,
    "aux_k": TOPK_FAMILY,
    "aux_coeff": TOPK_FAMILY,
    "threshold_momentum": ("batchtopk",),
    "bandwidth": ("jumprelu",),
    "init_threshold": ("jumprelu",),
}


DEAD_AFTER_TOKENS = 10_000_000
"""Gao et al. 2024's dead window (sec. A.2), the most `dead_after` gives."""
DEAD_AFTER_FRACTION = 20
"""`dead_after(n_train)` is a 1/20 of the run: 50k of 1M tokens revived the latents that a
1x-wide TopK dictionary had lost (docs/training.md, "BatchTopK and Matryoshka defaults")."""


def dead_after(n_train: int) -> int:
    """The default dead window of a run of `n_train` tokens: a twentieth of the run, at most
    10M, so that AuxK has most of a short run to revive latents that died early."""
    return max(1, min(DEAD_AFTER_TOKENS, n_train // DEAD_AFTER_FRACTION))


@dataclasses.dataclass
class SAEConfig:
    """Architecture and objective of one SAE. Kind-specific fields are None for other kinds."""

    activation: str = "relu"
    """One of relu, topk, batchtopk, jumprelu."""
    d_model: int | None = None
    """Input width; None takes it from the shards (a value that disagrees with them is an error)."""
    d_sae: int | None = None
    """Number of latents. When None, it is exp_factor * d_model."""
    exp_factor: float | None = 16.0
    """Width as a multiple of d_model, used only when d_sae is None."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm, removing the gradient component parallel to each row."""
    dec_init_norm: float = 1.0
    """Initial decoder row norm (Conerly et al. 2024: 0.1 without the unit-norm constraint)."""
    enc_init: str = "transpose"
    """"transpose": encoder = decoder transpose (Gao et al. 2024, sec. 2.2); or "random"."""
    b_dec_init: str = "mean"
    """"mean": decoder bias = mean of the first training batch (normalized); "zeros"."""
    matryoshka: list[float] = dataclasses.field(default_factory=list)
    """Nested prefixes as fractions of d_sae, increasing, each below 1; every prefix (and the whole
    dictionary) reconstructs the input (Bussmann et al. 2025). Empty: ordinary objective."""
    matryoshka_weights: str = "size"
    """How the prefix losses are weighted: "size", each by its share of the summed prefix sizes
    (the whole dictionary weighs most); "equal", their mean (Bussmann et al. 2025). With equal
    weights the small prefixes' coarse latents take the features of flat data (docs/training.md)."""
    dead_after_tokens: int | None = None
    """A latent that has not fired in this many tokens is dead, and AuxK trains it (Gao et al.
    2024, sec. A.2: 10M, in runs of billions of tokens). None: `dead_after(n_train)`, a twentieth
    of the run and at most 10M, resolved by the training job (recorded in job.json)."""
    sparsity_coeff: float | None = None
    """relu: L1 coefficient; jumprelu: L0 coefficient (Rajamanoharan et al. 2024)."""
    sparsity_warmup_steps: int | None = None
    """Steps over which the sparsity coefficient rises linearly from 0 (Conerly et al. 2024)."""
    l1_decoder_norm: bool | None = None
    """relu: weight each latent's L1 term by its decoder row norm (Conerly et al. 2024)."""
    k: int | None = None
    """topk: active latents per example; batchtopk: mean active latents per example."""
    aux_k: int | None = None
    """AuxK: dead latents used to model the residual; 0 disables (Gao et al. 2024: 512)."""
    aux_coeff: float | None = None
    """AuxK loss weight (Gao et al. 2024: 1/32)."""
    threshold_momentum: float | None = None
    """batchtopk: EMA momentum of the inference threshold (Bussmann et al. 2024)."""
    topk_warmup_steps: int = 0
    """batchtopk: training steps that select each example's k largest (TopK) before the batch's
    k*B largest: from a random dictionary, batch selection lets latents fall below the batch's
    threshold for good in the first few hundred steps (docs/training.md). 0: none."""
    bandwidth: float | None = None
    """jumprelu: width of the rectangle kernel of the straight-through estimator (paper: 0.001)."""
    init_threshold: float | None = None
    """jumprelu: initial threshold of every latent (Rajamanoharan et al. 2024: 0.001)."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown SAE activation '{self.activation}'; choose one of {list(ACTIVATIONS)}."
            )
        for name, kinds in KIND_FIELDS.items():
            value = getattr(self, name)
            if self.activation in kinds and value is None:
                raise ValueError(f"sae.{name} must be set for activation '{self.activation}'.")
            if self.activation not in kinds and value is not None:
                raise ValueError(
                    f"sae.{name} applies only to {list(kinds)}, not '{self.activation}'; remove it."
                )
        self.matryoshka = [float(f) for f in self.matryoshka]
        self._check_values()
        if self.d_model is not None and self.d_sae is not None:
            self._check_widths()

    def _check_values(self) -> None:
        positive = {
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "exp_factor": self.exp_factor,
            "k": self.k,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"sae.{name} must be positive, got {value}.")
        if self.d_sae is None and self.exp_factor is None:
            raise ValueError("set sae.d_sae or sae.exp_factor.")
        nonneg = {
            "sparsity_coeff": self.sparsity_coeff,
            "aux_k": self.aux_k,
            "aux_coeff": self.aux_coeff,
            "sparsity_warmup_steps": self.sparsity_warmup_steps,
        }
        for name, value in nonneg.items():
            if value is not None and value < 0:
                raise ValueError(f"sae.{name} must be non-negative, got {value}.")
        if self.topk_warmup_steps < 0 or (
            self.topk_warmup_steps and self.activation != "batchtopk"
        ):
            raise ValueError("sae.topk_warmup_steps must be >= 0 and applies only to batchtopk.")
        if (self.dead_after_tokens is not None and self.dead_after_tokens <= 0) or (
            self.dec_init_norm <= 0
        ):
            raise ValueError("sae.dead_after_tokens and sae.dec_init_norm must be positive.")
        if self.normalize_decoder and self.dec_init_norm != 1.0:
            raise ValueError(
                "sae.dec_init_norm has no effect with normalize_decoder=true; leave it at 1.0."
            )
        if self.l1_decoder_norm and self.normalize_decoder:
            raise ValueError(
                "sae.l1_decoder_norm has no effect with unit-norm decoder rows; "
                "set sae.normalize_decoder=false to use it."
            )
        if self.enc_init not in ("transpose", "random") or self.b_dec_init not in ("mean", "zeros"):
            raise ValueError("sae.enc_init must be transpose|random and sae.b_dec_init mean|zeros.")
        if self.threshold_momentum is not None and not 0 < self.threshold_momentum <= 1:
            raise ValueError("sae.threshold_momentum must be in (0, 1].")
        for name in ("bandwidth", "init_threshold"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"sae.{name} must be positive.")
        if self.matryoshka_weights not in ("size", "equal"):
            raise ValueError("sae.matryoshka_weights must be size|equal.")
        fracs = self.matryoshka
        if any(not 0 < f < 1 for f in fracs) or any(a >= b for a, b in zip(fracs, fracs[1:])):
            raise ValueError(f"sae.matryoshka must be increasing fractions in (0, 1), got {fracs}.")

    def _check_widths(self) -> None:
        if self.k is not None and self.k > self.d_sae:
            raise ValueError(f"sae.k={self.k} is larger than d_sae={self.d_sae}.")
        sizes = self.prefix_sizes
        if len(set(sizes)) != len(sizes) or sizes[0] < 1:
            raise ValueError(
                f"sae.matryoshka {self.matryoshka} gives empty or repeated prefixes "
                f"for d_sae={self.d_sae}."
            )

    def resolve(self, d_model: int) -> SAEConfig:
        """This config with d_model (from the shards) and d_sae filled in; checks they agree."""
        if self.d_model is not None and self.d_model != d_model:
            raise ValueError(f"sae.d_model={self.d_model} but the shards hold d_model={d_model}.")
        d_sae = self.d_sae if self.d_sae is not None else int(round(self.exp_factor * d_model))
        return dataclasses.replace(self, d_model=d_model, d_sae=d_sae)

    @property
    def dead_window(self) -> int:
        """`dead_after_tokens`, or Gao et al.'s 10M where nothing resolved it (an SAE built outside
        a training job)."""
        return DEAD_AFTER_TOKENS if self.dead_after_tokens is None else self.dead_after_tokens

    @property
    def prefix_sizes(self) -> list[int]:
        """Ends of the nested prefixes, the whole dictionary last."""
        return [int(round(f * self.d_sae)) for f in self.matryoshka] + [self.d_sae]

    @property
    def prefix_weights(self) -> list[float]:
        """Weight of each prefix's loss (`matryoshka_weights`), summing to 1."""
        sizes = self.prefix_sizes
        if self.matryoshka_weights == "equal":
            return [1 / len(sizes)] * len(sizes)
        return [n / sum(sizes) for n in sizes]

    @property
    def kind(self) -> str:
        return f"matryoshka-{self.activation}" if self.matryoshka else self.activation

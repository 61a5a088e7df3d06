"""Sparse autoencoders: configuration, activations, losses, and loading checkpoints.

This module imports only torch and safetensors, so `saev.nn.load(path)` works in code that has
neither Hydra nor Lightning. Shapes: B batch, D d_model, S d_sae.

An SAE holds the normalization statistics it was trained with as buffers: `encode`, `decode` and
`forward` take and return raw activations; losses are computed in normalized space.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import typing

import torch
from torch import Tensor, nn

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
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired in this many tokens is dead (Gao et al. 2024, sec. A.2)."""
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
        if self.dead_after_tokens <= 0 or self.dec_init_norm <= 0:
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
    def prefix_sizes(self) -> list[int]:
        """Ends of the nested prefixes, the whole dictionary last."""
        return [int(round(f * self.d_sae)) for f in self.matryoshka] + [self.d_sae]

    @property
    def kind(self) -> str:
        return f"matryoshka-{self.activation}" if self.matryoshka else self.activation


class Output(typing.NamedTuple):
    """What `SAE.forward` returns."""

    x_hat: Tensor
    """Reconstruction in raw activation space, [B, D]."""
    f_x: Tensor
    """Latent activations, [B, S]."""
    loss: Tensor
    """Total training loss: mse + sparsity + aux (scalar)."""
    mse: Tensor
    """Squared error per element, normalized space, averaged over Matryoshka prefixes (scalar)."""
    sparsity: Tensor
    """Sparsity penalty including its (warmed-up) coefficient; zero for the TopK family (scalar)."""
    aux: Tensor
    """AuxK loss including aux_coeff; zero when unused or in eval mode (scalar)."""


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); the threshold's gradient uses a rectangle-kernel pseudo-derivative
    (Rajamanoharan et al. 2024, eq. 11)."""

    @staticmethod
    def forward(ctx, z_BS, theta_S, bandwidth):
        ctx.save_for_backward(z_BS, theta_S)
        ctx.bandwidth = bandwidth
        return z_BS * (z_BS > theta_S)

    @staticmethod
    def backward(ctx, g_BS):
        z_BS, theta_S = ctx.saved_tensors
        bw = ctx.bandwidth
        g_z = g_BS * (z_BS > theta_S)
        g_theta = (-(theta_S / bw) * _rect((z_BS - theta_S) / bw) * g_BS).sum(0)
        return g_z, g_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta) with the same pseudo-derivative for theta and none for z (paper, eq. 12)."""

    @staticmethod
    def forward(ctx, z_BS, theta_S, bandwidth):
        ctx.save_for_backward(z_BS, theta_S)
        ctx.bandwidth = bandwidth
        return (z_BS > theta_S).to(z_BS.dtype)

    @staticmethod
    def backward(ctx, g_BS):
        z_BS, theta_S = ctx.saved_tensors
        bw = ctx.bandwidth
        g_theta = (-(1.0 / bw) * _rect((z_BS - theta_S) / bw) * g_BS).sum(0)
        return torch.zeros_like(z_BS), g_theta, None


def _scatter_topk(pre_BS: Tensor, k: int) -> Tensor:
    vals_BK, idx_BK = pre_BS.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_BS).scatter(-1, idx_BK, vals_BK.relu())


class SAE(nn.Module):
    """One sparse autoencoder: f = act(W_enc^T (x - b_dec) + b_enc), x_hat = W_dec^T f + b_dec,
    with x the normalized input (Bricken et al. 2023; Gao et al. 2024)."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        if cfg.d_model is None or cfg.d_sae is None:
            raise ValueError("SAE needs a resolved config; call cfg.resolve(d_model) first.")
        self.cfg = cfg
        D, S = cfg.d_model, cfg.d_sae
        gen = torch.Generator().manual_seed(seed)
        W_dec_SD = torch.randn(S, D, generator=gen)
        W_dec_SD *= cfg.dec_init_norm / W_dec_SD.norm(dim=-1, keepdim=True)
        if cfg.enc_init == "transpose":
            W_enc_DS = W_dec_SD.T.clone()
        else:
            bound = 1 / math.sqrt(D)
            W_enc_DS = torch.empty(D, S).uniform_(-bound, bound, generator=gen)
        self.W_enc = nn.Parameter(W_enc_DS)
        self.b_enc = nn.Parameter(torch.zeros(S))
        self.W_dec = nn.Parameter(W_dec_SD)
        self.b_dec = nn.Parameter(torch.zeros(D))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((S,), math.log(cfg.init_threshold)))
        # Normalization folded into the SAE: normalized = (raw - norm_mean) * norm_scale.
        self.register_buffer("norm_mean", torch.zeros(D))
        self.register_buffer("norm_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(S, dtype=torch.long))
        self.register_buffer("b_dec_pending", torch.tensor(cfg.b_dec_init == "mean"))
        if cfg.activation == "batchtopk":
            # NaN until the first training batch sets it; inference falls back to ReLU meanwhile.
            self.register_buffer("threshold", torch.tensor(float("nan")))

    # -- normalization -------------------------------------------------------------------------
    def set_norm(self, mean_D: Tensor, scale: float) -> None:
        self.norm_mean.copy_(torch.as_tensor(mean_D, dtype=torch.float32))
        self.norm_scale.fill_(float(scale))

    def normalize(self, x_BD: Tensor) -> Tensor:
        return (x_BD - self.norm_mean) * self.norm_scale

    def denormalize(self, x_BD: Tensor) -> Tensor:
        return x_BD / self.norm_scale + self.norm_mean

    # -- encode / decode -----------------------------------------------------------------------
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations of normalized inputs, W_enc^T (x - b_dec) + b_enc."""
        # Folding b_dec into the bias keeps the big GEMM's input free of gradients: b_dec's
        # gradient through the encoder costs a [D]x[D,S] product, not a B x S x D GEMM.
        return x_BD @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)

    def activate(self, pre_BS: Tensor) -> Tensor:
        act = self.cfg.activation
        if act == "relu":
            return pre_BS.relu()
        if act == "topk":
            return _scatter_topk(pre_BS, self.cfg.k)
        if act == "jumprelu":
            return _JumpReLU.apply(pre_BS, self.log_threshold.exp(), self.cfg.bandwidth)
        return self._batchtopk(pre_BS)

    def _batchtopk(self, pre_BS: Tensor) -> Tensor:
        """Training: keep the k*B largest activations of the whole batch (Bussmann et al. 2024).
        Inference: a learned threshold, so each example is encoded on its own."""
        if not self.training:
            thr = torch.nan_to_num(self.threshold, nan=0.0)
            return torch.where(pre_BS > thr, pre_BS, torch.zeros_like(pre_BS))
        pos_BS = pre_BS.relu()
        n_keep = min(self.cfg.k * pos_BS.shape[0], pos_BS.numel())
        vals, idx = pos_BS.flatten().topk(n_keep, sorted=False)
        f_BS = torch.zeros_like(pos_BS).flatten().scatter(0, idx, vals).view_as(pos_BS)
        with torch.no_grad():
            # The threshold estimate is the smallest kept positive activation, averaged (EMA).
            kept = torch.where(vals > 0, vals, torch.full_like(vals, float("inf")))
            smallest = kept.min().float()
            m, old = self.cfg.threshold_momentum, self.threshold
            new = torch.where(old.isnan(), smallest, (1 - m) * old + m * smallest)
            # Branch-free (no host sync, compilable): a batch with nothing positive keeps the old.
            self.threshold.copy_(torch.where(torch.isfinite(smallest), new, old))
        return f_BS

    def encode(self, x_BD: Tensor) -> Tensor:
        """Latent activations [B, S] of raw activations [B, D]."""
        return self.activate(self.pre_acts(self.normalize(x_BD)))

    def decode(self, f_BS: Tensor) -> Tensor:
        """Raw-space reconstruction [B, D] of latents [B, S]."""
        return self.denormalize(f_BS @ self.W_dec + self.b_dec)

    def forward(
        self, x_BD: Tensor, sparsity_scale: float | Tensor = 1.0, may_be_dead: bool = True
    ) -> Output:
        """Encode, decode and compute losses; `sparsity_scale` is the warmup factor in [0, 1].
        `may_be_dead=False` (fewer than dead_after_tokens tokens trained) skips AuxK's top-k."""
        x_norm_BD = self.normalize(x_BD)
        pre_BS = self.pre_acts(x_norm_BD)
        if self.cfg.activation == "topk" and not self.cfg.matryoshka:
            f_BS, x_hat_BD = self._topk_sparse_decode(pre_BS)
        else:
            f_BS, x_hat_BD = self.activate(pre_BS), None
        return self.losses(
            x_norm_BD, pre_BS, f_BS, sparsity_scale, x_hat_BD=x_hat_BD, may_be_dead=may_be_dead
        )

    def _topk_sparse_decode(self, pre_BS: Tensor) -> tuple[Tensor, Tensor]:
        """TopK latents and their normalized-space reconstruction from only the k active decoder
        rows: B*k*D work instead of B*S*D for the decoder's forward and both its gradients (the
        sparse decoder of Gao et al. 2024, sec. 5.3, here as `embedding_bag`)."""
        vals_BK, idx_BK = pre_BS.topk(self.cfg.k, dim=-1, sorted=False)
        vals_BK = vals_BK.relu()
        f_BS = torch.zeros_like(pre_BS).scatter(-1, idx_BK, vals_BK)
        W_dec = self.W_dec
        x_hat_BD = nn.functional.embedding_bag(
            idx_BK, W_dec, per_sample_weights=vals_BK.to(W_dec.dtype), mode="sum"
        )
        return f_BS, x_hat_BD + self.b_dec

    # -- losses --------------------------------------------------------------------------------
    def losses(
        self,
        x_BD: Tensor,
        pre_BS: Tensor,
        f_BS: Tensor,
        sparsity_scale=1.0,
        x_hat_BD: Tensor | None = None,
        may_be_dead: bool = True,
    ) -> Output:
        """Losses of normalized inputs given their pre-activations and latents (x_hat_BD, in
        normalized space, may be passed in when already computed for the whole dictionary)."""
        cfg = self.cfg
        if cfg.matryoshka:
            x_hat_BD, mse = self._matryoshka_mse(x_BD, f_BS)
        else:
            if x_hat_BD is None:
                x_hat_BD = f_BS @ self.W_dec + self.b_dec
            mse = (x_hat_BD - x_BD).pow(2).mean()
        zero = mse.new_zeros(())
        sparsity = zero
        if cfg.activation == "relu":
            w_S = self.W_dec.norm(dim=-1) if cfg.l1_decoder_norm else None
            l1_B = f_BS.sum(-1) if w_S is None else f_BS @ w_S
            sparsity = cfg.sparsity_coeff * sparsity_scale * l1_B.mean()
        elif cfg.activation == "jumprelu":
            l0_BS = _Step.apply(pre_BS, self.log_threshold.exp(), cfg.bandwidth)
            sparsity = cfg.sparsity_coeff * sparsity_scale * l0_BS.sum(-1).mean()
        aux = zero
        if self.training:
            if cfg.activation in TOPK_FAMILY and cfg.aux_k > 0 and may_be_dead:
                aux = self._auxk(x_BD - x_hat_BD, pre_BS)
            self._update_fired(f_BS)
        loss = mse + sparsity + aux
        return Output(self.denormalize(x_hat_BD), f_BS, loss, mse, sparsity, aux)

    def _matryoshka_mse(self, x_BD: Tensor, f_BS: Tensor) -> tuple[Tensor, Tensor]:
        """Each nested prefix of the dictionary reconstructs the input on its own (Bussmann et al.
        2025); the prefix losses are averaged so lr and coefficients keep their scale."""
        x_hat_BD = self.b_dec.expand_as(x_BD)
        total, start = 0.0, 0
        sizes = self.cfg.prefix_sizes
        for end in sizes:
            x_hat_BD = x_hat_BD + f_BS[:, start:end] @ self.W_dec[start:end]
            total = total + (x_hat_BD - x_BD).pow(2).mean()
            start = end
        return x_hat_BD, total / len(sizes)

    def _auxk(self, e_BD: Tensor, pre_BS: Tensor) -> Tensor:
        """AuxK: the top-k_aux dead latents reconstruct the main residual (Gao et al. 2024, sec.
        A.2, k_aux=512, alpha=1/32). Scaled down when fewer than k_aux latents are dead; no host
        sync, so it stays compilable."""
        k_aux = min(self.cfg.aux_k, self.cfg.d_sae)
        dead_S = self.tokens_since_fired >= self.cfg.dead_after_tokens
        pre_dead_BS = pre_BS.masked_fill(~dead_S, float("-inf"))
        f_aux_BS = _scatter_topk(pre_dead_BS, k_aux).nan_to_num(0.0)
        e_BD = e_BD.detach()
        e_hat_BD = f_aux_BS @ self.W_dec
        var = (e_BD - e_BD.mean(0)).pow(2).mean().clamp_min(1e-12)
        scale = (dead_S.sum().float() / k_aux).clamp(max=1.0)
        return self.cfg.aux_coeff * scale * (e_hat_BD - e_BD).pow(2).mean() / var

    @torch.no_grad()
    def _update_fired(self, f_BS: Tensor) -> None:
        fired_S = (f_BS > 0).any(0)
        grown = self.tokens_since_fired + f_BS.shape[0]
        self.tokens_since_fired.copy_(torch.where(fired_S, torch.zeros_like(grown), grown))

    # -- training-time constraints -------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec_(self, x_BD: Tensor) -> None:
        """Decoder bias = mean of a batch of raw inputs (normalized), once, if configured."""
        if bool(self.b_dec_pending):
            self.b_dec.copy_(self.normalize(x_BD.float()).mean(0))
            self.b_dec_pending.fill_(False)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of each decoder row's gradient that would only change its norm."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # -- saving --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> pathlib.Path:
        """Write `sae.safetensors` and `config.json` (the SAE config plus `extra`, e.g. training
        settings and shard metadata) into `directory`; `load` reads them back."""
        import safetensors.torch

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(state, directory / WEIGHTS_NAME)
        config = {
            "sae": dataclasses.asdict(self.cfg),
            "normalization": {"mean": self.norm_mean.tolist(), "scale": float(self.norm_scale)},
            **(extra or {}),
        }
        with open(directory / CONFIG_NAME, "w") as fd:
            json.dump(config, fd, indent=2)
        return directory

    save_pretrained = save


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load a saved SAE (a directory with `config.json` and `sae.safetensors`) in eval mode."""
    import safetensors.torch

    path = pathlib.Path(path)
    if path.is_file():
        path = path.parent
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{path} lacks {CONFIG_NAME} or {WEIGHTS_NAME}; is it an SAE checkpoint directory?"
        )
    with open(config_path) as fd:
        config = json.load(fd)
    sae = SAE(SAEConfig(**config["sae"]))
    sae.load_state_dict(safetensors.torch.load_file(weights_path, device="cpu"))
    return sae.to(device).eval()


def from_pretrained(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """Load from a local directory or a Hugging Face Hub repo holding `config.json` and
    `sae.safetensors` (optionally in `subfolder`, for repos that hold several SAEs)."""
    local = pathlib.Path(name_or_path)
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        return load(local, device)
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    root = snapshot_download(
        str(name_or_path),
        revision=revision,
        allow_patterns=[prefix + CONFIG_NAME, prefix + WEIGHTS_NAME],
    )
    return load(pathlib.Path(root) / (subfolder or ""), device)

"""The SAE module: encode, decode, training losses, saving and loading checkpoints.

Imports only torch and safetensors, so `saev.nn.load(path)` works in code that has neither Hydra
nor Lightning. Shapes: B batch, D d_model, S d_sae.

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

from saev.nn import sparse
from saev.nn.config import CONFIG_NAME, PENALIZED, WEIGHTS_NAME, SAEConfig
from saev.nn.jumprelu import JumpReLU, jumprelu_l0
from saev.nn.relu_l1 import relu_l1
from saev.nn.sparse import Latents


class Output(typing.NamedTuple):
    """What `SAE.forward` returns."""

    x_hat: Tensor
    """Reconstruction in raw activation space, [B, D]."""
    latents: Latents
    """Latent activations: sparse entries for the TopK family in training, else dense."""
    loss: Tensor
    """Total training loss: mse + sparsity + aux (scalar)."""
    mse: Tensor
    """Squared error summed over D and averaged over the batch, in normalized space, weighted
    over Matryoshka prefixes (`SAEConfig.prefix_weights`; scalar)."""
    sparsity: Tensor
    """Sparsity penalty including its (warmed-up) coefficient; zero for the TopK family (scalar)."""
    aux: Tensor
    """AuxK loss including aux_coeff; zero when unused, nothing is dead, or in eval mode."""

    @property
    def f_x(self) -> Tensor:
        """Latent activations, [B, S], made dense on first use (the training step never asks)."""
        return self.latents.dense()


def _sq_error(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    """Squared error summed over D, averaged over the batch: the ||x - x_hat||^2 of Conerly et
    al. 2024 and Rajamanoharan et al. 2024, so that with data.scale_norm (E||x||^2 = d_model)
    their sparsity coefficients mean the same here (docs/training.md)."""
    return (x_hat_BD - x_BD).pow(2).sum(-1).mean()


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
        if cfg.topk_warmup_steps:
            self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))
        self._warm = not cfg.topk_warmup_steps
        """Past the TopK warm-up (a host-side copy, so the check costs no sync once true)."""

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
        if self.cfg.activation == "jumprelu":
            # The rectangle kernel's bandwidth (paper: 0.001) is below bf16's resolution near 1
            # (2^-8), so JumpReLU's pre-activations stay float32 under autocast.
            with torch.autocast(x_BD.device.type, enabled=False):
                return sparse.encoder_pre_acts(x_BD.float(), self.W_enc, self.b_enc, self.b_dec)
        return sparse.encoder_pre_acts(x_BD, self.W_enc, self.b_enc, self.b_dec)

    def activate(self, pre_BS: Tensor) -> Tensor:
        """Dense latents [B, S] of pre-activations (inference; the dense reference in tests)."""
        act = self.cfg.activation
        if act == "relu":
            return pre_BS.relu()
        if act == "topk":
            return _scatter_topk(pre_BS, self.cfg.k)
        if act == "jumprelu":
            return JumpReLU.apply(pre_BS, self.log_threshold.exp(), self.cfg.bandwidth)
        if not self.training:
            # BatchTopK at inference: a learned threshold, so each example is encoded on its own.
            thr = torch.nan_to_num(self.threshold, nan=0.0)
            return torch.where(pre_BS > thr, pre_BS, torch.zeros_like(pre_BS))
        # Training: keep the k*B largest activations of the whole batch (Bussmann et al. 2024).
        if self.per_example_selection():
            vals_N, rows_N, cols_N = sparse.topk_rows(pre_BS, self.cfg.k)
        else:
            vals_N, rows_N, cols_N = sparse.topk_batch(
                pre_BS, self._n_keep(len(pre_BS)), 2 * self.cfg.k
            )
        self._update_threshold(vals_N)
        return Latents(tuple(pre_BS.shape), vals_N.clamp_min(0), rows_N, cols_N).dense()

    def per_example_selection(self) -> bool:
        """Whether this training step selects each example's k largest: TopK, and BatchTopK
        during its `topk_warmup_steps` (one host sync per step until the warm-up ends)."""
        if self.cfg.activation == "topk":
            return True
        if not self._warm:
            self._warm = int(self.steps_trained) >= self.cfg.topk_warmup_steps
        return not self._warm

    def _n_keep(self, B: int) -> int:
        return min(self.cfg.k * B, B * self.cfg.d_sae)

    @torch.no_grad()
    def _update_threshold(self, vals_N: Tensor) -> None:
        """The inference threshold: EMA of the smallest kept positive activation per batch."""
        if self.cfg.topk_warmup_steps:
            self.steps_trained += 1
        kept = torch.where(vals_N > 0, vals_N, torch.full_like(vals_N, float("inf")))
        smallest = kept.min().float()
        m, old = self.cfg.threshold_momentum, self.threshold
        new = torch.where(old.isnan(), smallest, (1 - m) * old + m * smallest)
        # Branch-free (no host sync): a batch with nothing positive keeps the old value.
        self.threshold.copy_(torch.where(torch.isfinite(smallest), new, old))

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
        `may_be_dead=False` (fewer than dead_after_tokens tokens trained) skips AuxK."""
        x_norm_BD = self.normalize(x_BD)
        act = self.cfg.activation
        if act == "topk" or (act == "batchtopk" and self.training):
            return self._sparse_forward(x_norm_BD, may_be_dead)
        pre_BS = self.pre_acts(x_norm_BD)
        # ReLU and JumpReLU: in place on pre_BS (nothing else reads it), the penalty fused.
        if act == "relu":
            f_BS, penalty_B = relu_l1(pre_BS, self.l1_weights_S())
        elif act == "jumprelu":
            f_BS, penalty_B = jumprelu_l0(pre_BS, self.log_threshold.exp(), self.cfg.bandwidth)
        else:  # BatchTopK at inference
            f_BS, penalty_B = self.activate(pre_BS), None
        return self.losses(x_norm_BD, Latents.from_dense(f_BS), sparsity_scale, penalty_B=penalty_B)

    def _sparse_forward(self, x_BD: Tensor, may_be_dead: bool) -> Output:
        """TopK family: one dense encoder product, then only the selected entries (saev.nn.sparse):
        the decoder reads k rows per example, the backward writes only the selected latents'
        encoder columns; AuxK reads only the dead latents' columns."""
        dead_M = self.dead_latents(may_be_dead)
        select = self.selector(len(x_BD), dead_M)
        groups = sparse.sparse_encode(x_BD, self.W_enc, self.b_enc, self.b_dec, select)
        return self.sparse_losses(x_BD, groups, dead_M)

    def dead_latents(self, may_be_dead: bool = True) -> Tensor | None:
        """Indices of the dead latents AuxK trains, or None when AuxK is off or none is dead."""
        cfg = self.cfg
        if not (self.training and cfg.aux_k > 0 and may_be_dead):
            return None
        # One host sync: AuxK is skipped outright when nothing is dead.
        dead_M = (self.tokens_since_fired >= cfg.dead_window).nonzero().squeeze(1)
        return dead_M if len(dead_M) else None

    def selector(self, B: int, dead_M: Tensor | None) -> sparse.Selector:
        """The TopK family's selection from [B, S] pre-activations: the kept entries, then (if
        `dead_M`) AuxK's entries among the dead latents."""
        cfg = self.cfg
        per_example = self.per_example_selection()

        def select(pre_BS: Tensor) -> list:
            # AuxK first: BatchTopK then clamps pre_BS in place (its caller drops it after this).
            aux = [] if dead_M is None else [sparse.topk_among(pre_BS, dead_M, cfg.aux_k)]
            if per_example:
                return [sparse.topk_rows(pre_BS, cfg.k), *aux]
            # Rows of a batch share k*B slots: 2k candidates per row, rarer rows taken whole.
            return [sparse.topk_batch(pre_BS, self._n_keep(B), 2 * cfg.k, inplace=True), *aux]

        return select

    def sparse_losses(
        self, x_BD: Tensor, groups: list, dead_M: Tensor | None, decoded_BD: Tensor | None = None
    ) -> Output:
        """Losses of the entries `selector(B, dead_M)` chose (`groups`, with gradient)."""
        latents = Latents((x_BD.shape[0], self.cfg.d_sae), *groups[0])
        if self.cfg.activation == "batchtopk":
            self._update_threshold(latents.vals_N.detach())
        aux = None
        if dead_M is not None:
            aux = (Latents(latents.shape, *groups[1]), len(dead_M))
        return self.losses(x_BD, latents, aux=aux, decoded_BD=decoded_BD)

    # -- losses --------------------------------------------------------------------------------
    def losses(
        self,
        x_BD: Tensor,
        latents: Latents,
        sparsity_scale=1.0,
        penalty_B: Tensor | None = None,
        aux: tuple[Latents, int] | None = None,
        decoded_BD: Tensor | None = None,
    ) -> Output:
        """Losses of normalized inputs given their latents (`penalty_B`, the per-example sparsity
        term of ReLU (L1, `relu_l1`) and JumpReLU (L0, `jumprelu_l0`), the Functions that fuse
        its gradient with the activation's; `aux`, AuxK's dead-latent entries and the number of
        dead latents; `decoded_BD`, latents @ W_dec when a batched group computed it)."""
        cfg = self.cfg
        if cfg.matryoshka:
            x_hat_BD, mse = self._matryoshka_mse(x_BD, latents)
        else:
            if decoded_BD is None:
                decoded_BD = self._decode_norm(latents)
            x_hat_BD = decoded_BD + self.b_dec
            mse = _sq_error(x_hat_BD, x_BD)
        zero = mse.new_zeros(())
        sparsity = zero
        if cfg.activation in PENALIZED:
            if penalty_B is None:
                raise ValueError(f"a {cfg.activation} SAE's losses need its penalty_B.")
            sparsity = cfg.sparsity_coeff * sparsity_scale * penalty_B.mean()
        aux_loss = zero
        if self.training:
            if aux is not None:
                aux_loss = self._auxk(x_BD - x_hat_BD, *aux)
            self._update_fired(latents)
        loss = mse + sparsity + aux_loss
        return Output(self.denormalize(x_hat_BD), latents, loss, mse, sparsity, aux_loss)

    def l1_weights_S(self) -> Tensor | None:
        """Each latent's weight in ReLU's L1 term: its decoder row norm with l1_decoder_norm
        (Conerly et al. 2024), else None (all 1)."""
        return self.W_dec.norm(dim=-1) if self.cfg.l1_decoder_norm else None

    def _decode_norm(self, latents: Latents, vals_N: Tensor | None = None) -> Tensor:
        """Normalized-space latents @ W_dec (no b_dec): sparse when the latents are."""
        if latents.is_sparse:
            return sparse.sparse_decode(latents, self.W_dec, vals_N)
        return latents.dense() @ self.W_dec

    def _matryoshka_mse(self, x_BD: Tensor, latents: Latents) -> tuple[Tensor, Tensor]:
        """Each nested prefix of the dictionary reconstructs the input on its own (Bussmann et al.
        2025); the prefix losses' weights sum to 1 so lr and coefficients keep their scale."""
        x_hat_BD = self.b_dec.expand_as(x_BD)
        total, start = 0.0, 0
        sizes = self.cfg.prefix_sizes
        for end, weight in zip(sizes, self.cfg.prefix_weights):
            if latents.is_sparse:
                cols_N = latents.cols_N
                part_N = latents.vals_N * ((cols_N >= start) & (cols_N < end))
                x_hat_BD = x_hat_BD + self._decode_norm(latents, part_N)
            else:
                x_hat_BD = x_hat_BD + latents.dense()[:, start:end] @ self.W_dec[start:end]
            total = total + weight * _sq_error(x_hat_BD, x_BD)
            start = end
        return x_hat_BD, total

    def _auxk(self, e_BD: Tensor, aux: Latents, n_dead: int) -> Tensor:
        """AuxK: the top-k_aux dead latents reconstruct the main residual (Gao et al. 2024, sec.
        A.2, k_aux=512, alpha=1/32), scaled down when fewer than k_aux latents are dead."""
        k_aux = min(self.cfg.aux_k, self.cfg.d_sae)
        e_BD = e_BD.detach()
        e_hat_BD = self._decode_norm(aux)
        var = (e_BD - e_BD.mean(0)).pow(2).mean().clamp_min(1e-12)
        scale = min(n_dead / k_aux, 1.0)
        return self.cfg.aux_coeff * scale * _sq_error(e_hat_BD, e_BD) / var

    @torch.no_grad()
    def _update_fired(self, latents: Latents) -> None:
        fired_S = latents.fired_S()
        grown = self.tokens_since_fired + latents.shape[0]
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
            # In place, without an [S, D] temporary: g -= <g, W> W per row.
            g.addcmul_(torch.linalg.vecdot(g, W).unsqueeze(-1), W, value=-1)

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

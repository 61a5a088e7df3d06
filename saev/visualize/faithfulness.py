"""`visualize.py ... splice=true`: what the SAE does to the model it was trained on.

The recording's ViT is rebuilt from the shard directory's metadata.json (`splice.load_vit`) and
checked against the recorded activations. A seeded sample of the recorded images
(`splice.n_images`) runs once through the blocks up to the SAE's layer; the blocks above then run
four variants at once, as rows of one batch (`splice.replacing`): clean, the SAE spliced in, the
SAE plus its error term (the model itself, up to rounding), and the SAE's tokens replaced by
their mean over the sample (mean ablation). `metrics.json`'s `splice` section:

- `cos`: mean cosine between the clean and the spliced final embedding (`ViT.output`);
- `cos_mean_ablation`, and `recovered = (cos - cos_mean_ablation) / (1 - cos_mean_ablation)`;
- with a classifier head: `top1_agreement` and `kl` (mean KL(clean || spliced)), and the same
  for the mean ablation;
- `cos_with_error`: 1 up to float rounding, the check that the splice touches nothing else.

Interventions (`effects`): for each latent the browser shows, the mean drop `1 - cos(clean,
edited)` of the final embedding when that latent alone is zeroed (error term kept, so nothing
else changes) on its top images; the baseline is the same for a random live latent of similar
frequency on its own top images. Results are cached beside the pass (`cache/splice.json`,
`cache/interventions.json`) under the pass's key plus the sample, so re-rendering runs no model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from saev import shards
from saev.record import vit as vitlib
from saev.record.config import ModelConfig
from saev.visualize import render, splice
from saev.visualize.config import VisualizeConfig

logger = logging.getLogger(__name__)
SAMPLE_SEED = 0
VERSION = 1
"""Part of the cache keys: raise it when the figures change meaning."""
MATCH_WINDOW = 10
"""A baseline latent is drawn from the live latents this close in frequency rank."""
MIN_GAP = 1e-6
"""Below this 1 - cos_mean_ablation, `recovered` is undefined (None in metrics.json)."""
MAX_RECORDED_ERROR = 0.02
"""Largest relative error between rebuilt and recorded activations (16-bit storage and TF32
differ by ~1e-3; other weights differ by ~1)."""


@dataclasses.dataclass
class Prepared:
    """What the spliced evaluation reads, checked before anything is written. The model is
    built on first use (`vit`), so that a fully cached evaluation never builds it."""

    model: ModelConfig
    """The recording's model, from its metadata.json."""
    images: render.Images
    sample_N: np.ndarray
    """Example indices of the evaluated images, ascending."""
    layer: int
    tokens: str
    sae: object
    device: torch.device
    n_patches: int
    _vit: object = None

    def key(self, pass_key: dict) -> dict:
        return {**pass_key, "splice_version": VERSION, "sample_N": self.sample_N.tolist()}

    @property
    def vit(self):
        """The recording's ViT (`saev.record.vit.ViT`), on the device, with its head if any."""
        if self._vit is None:
            vit = vitlib.load(self.model, self.device, head=True)
            splice.check_fits(vit, self.sae, self.layer)
            splice.positions(vit, self.tokens)
            if vit.n_patches != self.n_patches:
                raise ValueError(
                    f"{vit.description['ckpt']} rebuilt has {vit.n_patches} patches but the "
                    f"recording has {self.n_patches}; the shards were recorded by another model."
                )
            self._vit = vit
        return self._vit


def sample(n_examples: int, n_images: int) -> np.ndarray:
    """A seeded sample of `n_images` recorded examples (all of them if fewer), ascending."""
    n = min(n_images, n_examples)
    rng = np.random.default_rng(SAMPLE_SEED)
    return np.sort(rng.choice(n_examples, size=n, replace=False)).astype(np.int64)


def prepare(cfg: VisualizeConfig, src, sae, device) -> Prepared:
    """Rebuild the recording's model and check that the SAE, the layer and the images fit; a
    ValueError (or FileNotFoundError, ShardError) names what does not and the option to set."""
    recorded = render.RecordedExamples(src.shard_root, src.layer)
    md = recorded.metadata
    md.layer_index(src.layer)  # ShardError: the layer was not recorded
    if sae.cfg.d_model != md.d_model:
        raise ValueError(
            f"the SAE takes d_model={sae.cfg.d_model} but {src.shard_root} holds "
            f"d_model={md.d_model}; set data.shard_root to the SAE's recording."
        )
    try:
        model = vitlib.config_of(md.model)
    except ValueError as err:
        raise ValueError(f"cannot rebuild the recording's model {md.model}: {err}") from None
    images = render.Images(recorded, cfg.data.root, skip_missing=False)
    sample_N = sample(md.n_examples, cfg.splice.n_images)
    for e in sample_N:
        images.check(int(e))  # a missing image fails now, before the model loads
    return Prepared(
        model, images, sample_N, src.layer, src.tokens, sae, device, md.n_patches_per_example
    )


def cached(out_dir: pathlib.Path, key: dict) -> dict | None:
    """The cached `splice` figures for `key`, or None."""
    try:
        saved = json.loads((out_dir / "cache" / "splice.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved["splice"] if saved.get("key") == key else None


def pixels(prep: Prepared, examples, device) -> torch.Tensor:
    """The model's input `[B, 3, H, W]` for `examples`, through its own eval transform."""
    return torch.stack([prep.vit.transform(prep.images.image(int(e))) for e in examples]).to(device)


def recorded_mean(prep: Prepared, src, first: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean recorded activation over the sample's SAE tokens `[D]` (what mean ablation puts
    in their place), and the recorded tokens of the `first` examples `[len(first), T, D]`."""
    from saev.data.loaders import OrderedLoader

    loader = OrderedLoader(
        str(src.shard_root), src.layer, 4096, src.tokens, examples=prep.sample_N, n_workers=0,
        pin_memory=False,
    )  # fmt: skip
    sum_D, n, kept = None, 0, []
    wanted = set(int(e) for e in first)
    with loader:
        for batch in loader:
            act_ND = batch["act"].float()
            sum_D = act_ND.sum(0, dtype=torch.float64) + (0 if sum_D is None else sum_D)
            n += len(act_ND)
            keep = torch.tensor([int(e) in wanted for e in batch["example_idx"]], dtype=torch.bool)
            kept.append(act_ND[keep])
    first_NTD = torch.cat(kept).view(len(first), -1, act_ND.shape[-1])
    return (sum_D / n).float(), first_NTD


def check_recorded(clean_BTD: torch.Tensor, recorded_BTD: torch.Tensor, prep: Prepared) -> None:
    err = float((clean_BTD.float().cpu() - recorded_BTD).norm() / recorded_BTD.norm())
    if not err <= MAX_RECORDED_ERROR:
        raise ValueError(
            f"{prep.vit.description['ckpt']} rebuilt from metadata.json does not reproduce the "
            f"recorded activations (relative error {err:.3g}); its weights changed since "
            "recording: re-record, or restore the weights the recording names."
        )


@torch.inference_mode()
def evaluate(prep: Prepared, src, sae, cfg: VisualizeConfig, device) -> dict:
    """The `splice` section of metrics.json (module docstring)."""
    vit, pos_T = prep.vit, splice.positions(prep.vit, prep.tokens).to(device)
    chunks = np.array_split(prep.sample_N, max(1, -(-len(prep.sample_N) // cfg.splice.batch_size)))
    mean_D, first_NTD = recorded_mean(prep, src, chunks[0])
    mean_D = mean_D.to(device)
    sums = dict.fromkeys(
        ("cos", "cos_with_error", "cos_mean_ablation", "top1_agreement", "kl",
         "top1_agreement_mean_ablation", "kl_mean_ablation"), 0.0,
    )  # fmt: skip
    has_head = False
    from saev import cli

    with cli.progress(total=len(prep.sample_N), unit="img", desc="splice") as bar:
        for i, chunk in enumerate(chunks):
            seen = {}
            rows = functools.partial(_variants, sae=sae, pos_T=pos_T, mean_D=mean_D, seen=seen)
            with splice.replacing(vit, prep.layer, rows):
                emb_ME, logits_MC = vit.output(pixels(prep, chunk, device))
            if i == 0:
                check_recorded(seen["clean"], first_NTD, prep)
            clean, spliced, with_error, ablated = emb_ME.float().chunk(4)
            sums["cos"] += float(F.cosine_similarity(clean, spliced).sum())
            sums["cos_with_error"] += float(F.cosine_similarity(clean, with_error).sum())
            sums["cos_mean_ablation"] += float(F.cosine_similarity(clean, ablated).sum())
            if logits_MC is not None:
                has_head = True
                logp = logits_MC.float().log_softmax(-1).chunk(4)
                for name, other in (("", logp[1]), ("_mean_ablation", logp[3])):
                    agree = logp[0].argmax(-1) == other.argmax(-1)
                    sums[f"top1_agreement{name}"] += float(agree.sum())
                    kl = F.kl_div(other, logp[0], log_target=True, reduction="none").sum(-1)
                    sums[f"kl{name}"] += float(kl.sum())
            bar.update(len(chunk))
    n = len(prep.sample_N)
    out = {k: v / n for k, v in sums.items() if has_head or not k.startswith(("top1", "kl"))}
    out["recovered"] = recovered(out["cos"], out["cos_mean_ablation"])
    out["n_images"] = n
    return out


def _variants(h_BTD, sae, pos_T, mean_D, seen: dict):
    """Block output rows: clean, spliced, spliced plus error, mean-ablated (`seen["clean"]`:
    the clean SAE tokens, for the check against the recording)."""
    tok_BTD = h_BTD[:, pos_T]
    seen["clean"] = tok_BTD
    x_hat_BTD = splice.reconstruct(sae, tok_BTD)
    variants = [h_BTD]
    for new_BTD in (x_hat_BTD, x_hat_BTD + (tok_BTD - x_hat_BTD), mean_D.to(h_BTD.dtype)):
        h = h_BTD.clone()
        h[:, pos_T] = new_BTD
        variants.append(h)
    return torch.cat(variants)


def recovered(cos: float, cos_mean_ablation: float) -> float | None:
    """How much of the way from mean ablation to the clean model the SAE goes (1: all of it);
    None when even mean ablation leaves the output unchanged: the SAE's tokens do not reach it
    (e.g. the last block's patches under a CLS-pooled output), so there is nothing to recover."""
    gap = 1.0 - cos_mean_ablation
    if gap <= MIN_GAP:
        logger.warning(
            "replacing the SAE's tokens by their mean leaves the model's output unchanged "
            "(cos %.6f): those tokens do not reach it, so cos and recovered say nothing about "
            "this SAE; splice an SAE of an earlier layer, or one trained on CLS",
            cos_mean_ablation,
        )
        return None
    return (cos - cos_mean_ablation) / gap


def matched_latent(summary, latent: int) -> int | None:
    """A random live latent (seeded by `latent`) among the `MATCH_WINDOW` closest in firing
    frequency, other than `latent`; None if no other latent is live."""
    live = np.flatnonzero(summary.count_S > 0)
    live = live[np.argsort(summary.freq_S[live], kind="stable")]
    others = live[live != latent]
    if not len(others):
        return None
    rank = np.searchsorted(summary.freq_S[others], summary.freq_S[latent])
    lo = max(0, rank - MATCH_WINDOW // 2)
    window = others[lo : lo + MATCH_WINDOW]
    return int(np.random.default_rng(latent).choice(window))


@dataclasses.dataclass
class Effect:
    """What zeroing one latent does (module docstring)."""

    drop: float
    """Mean 1 - cos(clean, zeroed) of the final embedding over the latent's top images."""
    n_images: int
    baseline_latent: int | None
    baseline_drop: float | None


def effects(
    prep: Prepared, src, sae, summary, latents: list[int], cfg: VisualizeConfig, device,
    cache: pathlib.Path, key: dict,
) -> dict[int, Effect]:  # fmt: skip
    """{latent: Effect} for `latents`, from `cache` where it has them."""
    baseline = {s: matched_latent(summary, s) for s in latents}
    wanted = set(latents) | {r for r in baseline.values() if r is not None}
    drops = _load_drops(cache, key)
    missing = sorted(s for s in wanted if str(s) not in drops)
    if missing:
        drops.update(_zero_drops(prep, sae, summary, missing, cfg, device))
        shards.write_json_atomic(cache, {"key": key, "drops": drops})
    out = {}
    for s in latents:
        drop, n = drops[str(s)]
        r = baseline[s]
        out[s] = Effect(drop, n, r, None if r is None else drops[str(r)][0])
    return out


def _load_drops(cache: pathlib.Path, key: dict) -> dict:
    try:
        saved = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return saved["drops"] if saved.get("key") == key else {}


@torch.inference_mode()
def _zero_drops(prep, sae, summary, latents, cfg: VisualizeConfig, device) -> dict:
    """{str(latent): [mean drop, n images]}: each latent zeroed on its own top images."""
    pairs = []  # (example, latent)
    for s in latents:
        top = render.top_images(summary, s, cfg.splice.intervention_images)
        pairs += [(x.example, s) for x in top]
    pairs.sort()
    pos_T = splice.positions(prep.vit, prep.tokens).to(device)
    total = {s: [0.0, 0] for s in latents}
    examples = sorted({e for e, _ in pairs})
    step = cfg.splice.batch_size
    for start in range(0, len(examples), step):
        chunk = examples[start : start + step]
        row_of = {e: i for i, e in enumerate(chunk)}
        todo = [(e, s) for e, s in pairs if e in row_of]

        rows = functools.partial(_zeroed, sae=sae, pos_T=pos_T, todo=todo, row_of=row_of)
        with splice.replacing(prep.vit, prep.layer, rows):
            emb_ME, _ = prep.vit.output(pixels(prep, chunk, device))
        emb_ME = emb_ME.float()
        clean_BE, edited_PE = emb_ME[: len(chunk)], emb_ME[len(chunk) :]
        ref_PE = clean_BE[[row_of[e] for e, _ in todo]]
        drop_P = 1.0 - F.cosine_similarity(ref_PE, edited_PE)
        for (_, s), d in zip(todo, drop_P.tolist()):
            total[s][0] += d
            total[s][1] += 1
    return {str(s): [t / max(n, 1), n] for s, (t, n) in total.items()}


def _zeroed(h_BTD, sae, pos_T, todo, row_of):
    """Block output rows: the clean images, then one per (example, latent) in `todo` with that
    latent zeroed (error term kept)."""
    edited = []
    for e, s in todo:
        h = h_BTD[row_of[e]].clone()[None]
        h[:, pos_T] = splice.reconstruct(sae, h[:, pos_T], add_error=True, edit=splice.zero([s]))
        edited.append(h)
    return torch.cat([h_BTD, *edited])


def run(cfg: VisualizeConfig, src, prep: Prepared, sae, device, out_dir: pathlib.Path, key):
    """The spliced evaluation, from the cache when it holds it; merged into metrics.json."""
    figures = None if cfg.force else cached(out_dir, key)
    if figures is None:
        figures = evaluate(prep, src, sae, cfg, device)
        path = out_dir / "cache" / "splice.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        shards.write_json_atomic(path, {"key": key, "splice": figures})
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file():  # a sweep's SAE may have no pass of its own yet
        metrics = json.loads(metrics_path.read_text())
        metrics["splice"] = figures
        shards.write_json_atomic(metrics_path, metrics)
    return figures

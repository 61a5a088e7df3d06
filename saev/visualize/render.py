"""Rendering from a cached pass: choose latents, find their images, draw heatmaps
(docs/architecture.md, "Visualize").

For each chosen latent, its images are the distinct examples among its top tokens (in order of
their best token, at most `n_images`). A heatmap needs that latent's activation on every patch of
an image, which the pass did not keep (it would cost d_sae x images x patches): it is computed
after the pass, for the chosen latents' images only, by reading just those examples, and cached
per latent in `cache/heat/`. So re-rendering with other rendering settings, or any selection of
latents already drawn once, reads no activations at all.

Outputs: `images/<example>.png` (each crop once, shared by all latents), `heatmaps/<latent>/
<example>.png` (redrawn on every render: they depend on colormap and opacity), then the HTML
(`saev.visualize.browser`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import shutil

import numpy as np

from saev import shards
from saev.record import crops
from saev.visualize.config import VisualizeConfig

logger = logging.getLogger(__name__)


def choose(summary, cfg: VisualizeConfig) -> list[int]:
    """`include_latents` first, then up to `n_latents` live latents inside both log10 ranges,
    in `sort` order. Dead latents (never fired) are never chosen by the filters."""
    S = len(summary.count_S)
    bad = [i for i in cfg.include_latents if not 0 <= i < S]
    if bad:
        raise ValueError(f"include_latents {bad} are not latent ids of this SAE (0..{S - 1}).")
    freq_S, mean_S = summary.freq_S, summary.mean_S
    ok_S = summary.count_S > 0
    with np.errstate(divide="ignore"):
        logs = {"log_freq_range": np.log10(freq_S), "log_value_range": np.log10(mean_S)}
    for name, log_S in logs.items():
        bounds = getattr(cfg, name)
        if bounds is not None:
            ok_S &= (log_S >= bounds[0]) & (log_S <= bounds[1])
    candidates = np.flatnonzero(ok_S)
    if cfg.sort == "frequency":
        candidates = candidates[np.argsort(-freq_S[candidates], kind="stable")]
    elif cfg.sort == "value":
        candidates = candidates[np.argsort(-mean_S[candidates], kind="stable")]
    else:
        candidates = np.random.default_rng(cfg.seed).permutation(candidates)
    included = list(dict.fromkeys(int(i) for i in cfg.include_latents))
    rest = [int(i) for i in candidates if int(i) not in set(included)]
    return included + rest[: cfg.n_latents]


@dataclasses.dataclass
class Shown:
    """One image of a latent: its example, best token and that token's activation."""

    example: int
    token: int
    value: float


def top_images(summary, latent: int, n_images: int) -> list[Shown]:
    """Distinct examples among the latent's top tokens, by their best token (at most n_images)."""
    out: dict[int, Shown] = {}
    row = zip(
        summary.example_idx_SK[latent],
        summary.token_idx_SK[latent],
        summary.values_SK[latent],
    )
    for ex, tok, value in row:
        if ex < 0:  # empty slots come last
            break
        if int(ex) not in out:
            out[int(ex)] = Shown(int(ex), int(tok), float(value))
            if len(out) == n_images:
                break
    return list(out.values())


class RecordedExamples:
    """What rendering needs from the shard directory without reading activations (its metadata and
    patch labels, through `saev.shards`), plus `heatmaps`, which reads the activations of chosen
    examples only."""

    def __init__(self, root: pathlib.Path, layer: int):
        self.root, self.layer = root, layer
        self.metadata = shards.read_metadata(root)
        self.cls = self.metadata.cls_token
        self.n_patches = self.metadata.n_patches_per_example
        self.labels_NP = shards.read_patch_labels(root, self.metadata)

    def token_name(self, token: int) -> str:
        """A stored token position as a reader knows it: CLS, or the patch's row-major index."""
        return "CLS" if self.cls and token == 0 else f"patch {token - int(self.cls)}"

    def patch_labels(self, summary, latent: int) -> list[tuple[int, int]]:
        """(label, count) of the latent's top tokens that are patches, most frequent first."""
        if self.labels_NP is None:
            return []
        ex_K, tok_K = summary.example_idx_SK[latent], summary.token_idx_SK[latent]
        keep = (ex_K >= 0) & (tok_K >= int(self.cls))
        labels = self.labels_NP[ex_K[keep], tok_K[keep] - int(self.cls)]
        return collections.Counter(int(x) for x in labels).most_common()

    def heatmaps(self, wanted: dict[int, list[int]], sae, device, cache: pathlib.Path):
        """{latent: {example: activation on each patch [P]}} for `wanted` {latent: examples},
        from `cache` where it holds them, else read from the shards (those examples only)."""
        cache.mkdir(parents=True, exist_ok=True)
        out, missing = {}, {}
        for s, examples in wanted.items():
            out[s] = _load_heat(cache / f"{s}.npz")
            need = [e for e in examples if e not in out[s]]
            if need:
                missing[s] = need
        if missing:
            for (s, e), heat_P in self._read(missing, sae, device).items():
                out[s][e] = heat_P
            for s in missing:
                examples = sorted(out[s])
                np.savez(
                    cache / f"{s}.npz",
                    examples_N=np.array(examples, dtype=np.int64),
                    heat_NP=np.stack([out[s][e] for e in examples]),
                )
        return out

    def _read(self, missing: dict[int, list[int]], sae, device) -> dict:
        import torch

        from saev.data.loaders import OrderedLoader

        latents = sorted(missing)
        col = {s: j for j, s in enumerate(latents)}
        needs = collections.defaultdict(list)  # example -> latents that show it
        for s, examples in missing.items():
            for e in examples:
                needs[e].append(s)
        heat = {(s, e): np.zeros(self.n_patches, np.float32) for e, ss in needs.items() for s in ss}
        loader = OrderedLoader(
            str(self.root), self.layer, 4096, "patches", examples=sorted(needs), n_workers=0,
            pin_memory=False,
        )  # fmt: skip
        latents_t = torch.tensor(latents, device=device)
        with torch.no_grad(), loader:
            for batch in loader:
                f_BL = sae.encode(batch["act"].to(device))[:, latents_t].float().cpu().numpy()
                ex_B = batch["example_idx"].numpy()
                patch_B = batch["token_idx"].numpy() - int(self.cls)
                for e in np.unique(ex_B):
                    rows = np.flatnonzero(ex_B == e)
                    for s in needs[int(e)]:
                        heat[(s, int(e))][patch_B[rows]] = f_BL[rows, col[s]]
        return heat


def _load_heat(path: pathlib.Path) -> dict[int, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path) as z:
        return {int(e): h for e, h in zip(z["examples_N"], z["heat_NP"])}


class Images:
    """Each example's image, found through `examples.jsonl`, cropped as the model saw it."""

    def __init__(self, sh: RecordedExamples, root_override: str | None, skip_missing: bool):
        self.sh, self.skip_missing = sh, skip_missing
        self.lines = shards.example_records(sh.root)  # parsed on demand
        self.data = sh.metadata.data
        self.root = pathlib.Path(root_override or self.data.get("root") or ".")
        self.steps = sh.metadata.transform or crops.fallback_steps(sh.metadata.model)
        self.n_missing = 0

    def record(self, e: int) -> dict:
        return json.loads(self.lines[e])

    def crop(self, e: int):
        """The crop (PIL RGB) of example `e`, or None if its file is missing and skipped."""
        img = self.image(e)
        return None if img is None else crops.reproduce(img, self.steps)

    def image(self, e: int):
        """The image (PIL RGB) of example `e` as recorded, before the model's transform, or None
        if its file is missing and skipped."""
        from saev.record import images

        path = self.check(e)
        if path is None:
            return None
        if path == "synthetic":
            index = self.record(e)["index"]
            return images.SyntheticDataset(self.data["n_images"], self.data["seed"]).load(index)
        with images.Image.open(path) as img:
            return img.convert("RGB")

    def check(self, e: int):
        """Where example `e`'s image is: its file, "synthetic" (drawn from its index), or None
        if the file is missing and skipped; FileNotFoundError if missing, ValueError if the
        example names no image."""
        rec = self.record(e)
        if "path" in rec:
            path = self.root / rec["path"]
            if path.is_file():
                return path
            if self.skip_missing:
                self.n_missing += 1
                return None
            raise FileNotFoundError(
                f"image {path} (example {e}) does not exist; set data.root=<where the dataset "
                "is now> or skip_missing_images=true."
            )
        if self.data.get("name") == "synthetic" and "index" in rec:
            return "synthetic"
        raise ValueError(
            f"example {e} of {self.sh.root} ({rec}) names no image to show; render=false "
            "computes statistics and metrics without images."
        )


def grid_shape(n_patches: int, height: int, width: int) -> tuple[int, int]:
    """Patch rows and columns of a crop: n_patches cells with the crop's aspect ratio."""
    rows = max(1, round((n_patches * height / width) ** 0.5))
    if n_patches % rows:
        raise ValueError(f"{n_patches} patches do not tile a {height}x{width} crop.")
    return rows, n_patches // rows


def overlay(crop_HW3: np.ndarray, heat_P: np.ndarray, vmax: float, cmap, opacity: float):
    """The crop with the heatmap over it: each patch's cell colored by its value / vmax."""
    H, W = crop_HW3.shape[:2]
    gh, gw = grid_shape(len(heat_P), H, W)
    # Pixel row y lies in patch row y * gh // H: cells match the ViT's patches exactly.
    heat_HW = heat_P.reshape(gh, gw)[np.arange(H) * gh // H][:, np.arange(W) * gw // W]
    color_HW3 = cmap(np.clip(heat_HW / vmax, 0, 1))[..., :3] * 255
    out = (1 - opacity) * crop_HW3.astype(np.float32) + opacity * color_HW3
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_crops(imgs: Images, examples: set[int], out: pathlib.Path) -> dict[int, pathlib.Path]:
    """{example: its crop file} for every example whose image exists; each written only once,
    then referenced by every latent that shows it."""
    out.mkdir(exist_ok=True)
    found = {}
    for e in sorted(examples):
        path = out / f"{e}.png"
        if not path.is_file():
            crop = imgs.crop(e)
            if crop is None:  # missing, and skip_missing_images=true
                continue
            crop.save(path)
        found[e] = path
    return found


def draw_heatmaps(latent: int, shown: list[Shown], heat: dict, crop_files, cfg, cmap, out_dir):
    """One heatmap file per image of `latent`, on a scale shared by all its images; returns
    their paths relative to out_dir."""
    from PIL import Image

    vmax = max(float(heat[x.example].max()) for x in shown) or 1.0
    rels = []
    for x in shown:
        crop_HW3 = np.asarray(Image.open(crop_files[x.example]).convert("RGB"))
        arr = overlay(crop_HW3, heat[x.example], vmax, cmap, cfg.heatmap.opacity)
        rel = f"heatmaps/{latent}/{x.example}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(out_dir / rel)
        rels.append(rel)
    return rels


def render(
    cfg: VisualizeConfig, src, summary, sae, device, out_dir: pathlib.Path, effects=None
) -> None:
    """Draw the chosen latents and write the browser; reads activations only for heatmaps of
    (latent, image) pairs not drawn before. `effects`: {latent: faithfulness.Effect}, shown
    where given (splice=true)."""
    import matplotlib

    from saev.visualize import browser

    try:
        cmap = matplotlib.colormaps[cfg.heatmap.colormap]
    except KeyError:
        name = cfg.heatmap.colormap
        raise ValueError(f"heatmap.colormap={name!r} is not a matplotlib colormap.") from None
    from saev.visualize import probe

    sh = RecordedExamples(src.shard_root, src.layer)
    chosen = choose(summary, cfg)
    probed = probe.load(out_dir) if cfg.probe.enabled else None
    if probed:  # each class's best latents get pages too
        chosen += [
            s for s in probe.featured(probed, cfg.probe.latents_per_class) if s not in chosen
        ]
    imgs = Images(sh, cfg.data.root, cfg.skip_missing_images)
    tops = {s: top_images(summary, s, cfg.n_images) for s in chosen}
    crop_files = write_crops(
        imgs, {x.example for t in tops.values() for x in t}, out_dir / "images"
    )
    tops = {s: [x for x in shown if x.example in crop_files] for s, shown in tops.items()}
    heat = {}
    if src.tokens != "cls":  # CLS latents have no per-patch map: plain images
        wanted = {s: [x.example for x in shown] for s, shown in tops.items() if shown}
        heat = sh.heatmaps(wanted, sae, device, out_dir / "cache" / "heat")
    shutil.rmtree(out_dir / "heatmaps", ignore_errors=True)  # they depend on colormap, opacity
    views = []
    for s in chosen:
        rels = [None] * len(tops[s])
        if s in heat:
            rels = draw_heatmaps(s, tops[s], heat[s], crop_files, cfg, cmap, out_dir)
        shown = [
            browser.ImageView(
                x.example, sh.token_name(x.token), x.value, imgs.record(x.example), rel
            )
            for x, rel in zip(tops[s], rels)
        ]
        views.append(
            browser.LatentView(
                s, float(summary.freq_S[s]), float(summary.mean_S[s]), float(summary.max_S[s]),
                shown, sh.patch_labels(summary, s),
                probe.top_classes(probed, s, cfg.probe.classes_per_latent) if probed else [],
                (effects or {}).get(s),
            )
        )  # fmt: skip
    if imgs.n_missing:
        print(f"skipped {imgs.n_missing} missing images (skip_missing_images=true)")
    browser.write(out_dir, views, summary, src, cfg)
    if probed:
        from saev.visualize import probe_pages

        probe_pages.write(out_dir, probed, views, cfg.probe.latents_per_class)

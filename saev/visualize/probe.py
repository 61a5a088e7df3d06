"""Label probes (`visualize.py ckpt=<sae> probe=true`): which latents detect which class.

In the pass over the shards (`statistics.summarize` hands every batch to `Probe.update`), for each
labelled level (`saev.visualize.labels`: patch labels, image labels):

- latents: each latent's activation scores "this patch is class c" (patch level), or its maximum
  over the example's tokens in the pass (image level: patches, plus CLS with tokens=all; the CLS
  activation alone with tokens=cls);
- neurons, the baseline: every ViT dimension after the SAE's own normalization (`sae.normalize`),
  as two one-sided detectors, relu(x) ("+d") and relu(-x) ("-d"), scored like latents (what lies
  on the other side of 0 is one tie at the bottom, as a latent's zeros are).

Average precision of every (feature, class) pair comes from bounded histograms (`saev.visualize.
ap`, whose docstring gives the exactness bound). Outputs in `out_dir`: `probe.csv` (per class: best
latent, its AP with the bounds [ap_lo, ap_hi] of the true scores' AP, F1 at the best threshold,
best neuron and its AP); the `probe` section of `metrics.json` (per level: mean over classes of
the best latent's AP, the same for neurons, classes where a latent beats every neuron); and
`cache/probe.npz` + `cache/probe.json` (every pair's AP and the rows) for the browser.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib

import numpy as np
import torch

from saev import shards
from saev.visualize import ap
from saev.visualize.labels import Level

logger = logging.getLogger(__name__)
MAX_BINS = 512
MIN_BINS = 8
COLUMNS = [
    "level", "label", "name", "n_positive", "best_latent", "ap", "ap_lo", "ap_hi", "f1",
    "threshold", "best_neuron", "neuron_ap", "neuron_ap_lo", "neuron_ap_hi", "latent_wins",
]  # fmt: skip


def n_bins_for(memory_mb: int, n_features: int, n_labels: int) -> int:
    """Bins per feature that fit the histograms (int32 [features, bins, labels]) in memory_mb."""
    nb = memory_mb * 2**20 // (4 * n_features * n_labels)
    if nb < MIN_BINS:
        need = -(-MIN_BINS * 4 * n_features * n_labels // 2**20)
        raise ValueError(
            f"probe.memory_mb={memory_mb} leaves {nb} bins per feature for {n_features} features "
            f"and {n_labels} labels; set probe.memory_mb={need} or more."
        )
    return min(nb, MAX_BINS)


class _LevelState:
    """The latents' and neurons' histograms of one level, and the image level's running max."""

    def __init__(self, level: Level, n_latents: int, n_neurons: int, nb: int, m: int, device):
        self.level = level
        L = level.n_labels
        self.latents = ap.Histogram(n_latents, L, nb, m, device)
        self.neurons = ap.Histogram(n_neurons, L, nb, m, device)
        self.pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        """Image level: the last example of the previous batch, which may go on in the next."""

    def add(self, f_BS, n_BN, labels_B) -> None:
        self.latents.add(f_BS, labels_B)
        self.neurons.add(n_BN, labels_B)


def for_pass(src, cfg, sae, device) -> Probe:
    """The probe of a pass over `src` (job.PassInputs): its labels read and checked first, so bad
    labels stop the run before any activation is read."""
    from saev.visualize import labels

    levels = labels.read(src.shard_root, src.tokens)
    cls_token = shards.read_metadata(src.shard_root).cls_token
    return Probe(levels, sae, cls_token, cfg.probe.memory_mb, device)


class Probe:
    """Streams a pass's batches into each level's histograms; `finish` scores every pair."""

    def __init__(self, levels: list[Level], sae, cls_token: bool, memory_mb: int, device):
        self.sae, self.cls, self.device = sae, cls_token, device
        S, N = sae.cfg.d_sae, 2 * sae.cfg.d_model
        n_labels = sum(lv.n_labels for lv in levels)
        self.n_bins = n_bins_for(memory_mb, S + N, n_labels)
        self.m = ap.mantissa_bits(self.n_bins)
        self.levels = [_LevelState(lv, S, N, self.n_bins, self.m, device) for lv in levels]
        self._labels = {lv.level: lv.labels for lv in levels}  # numpy (labels.bin is a memmap)

    def update(self, batch: dict, x_BD: torch.Tensor, f_BS: torch.Tensor) -> None:
        if not len(f_BS):
            return
        xn_BD = self.sae.normalize(x_BD).float()
        n_BN = torch.cat([xn_BD.clamp(min=0), (-xn_BD).clamp(min=0)], dim=1)
        ex_B, tok_B = batch["example_idx"].cpu(), batch["token_idx"].cpu()
        for st in self.levels:
            if st.level.level == "patch":
                st.add(f_BS, n_BN, self._patch_labels(ex_B, tok_B).to(self.device))
            else:
                self._image_update(st, ex_B, f_BS, n_BN)

    def _patch_labels(self, ex_B, tok_B) -> torch.Tensor:
        ex_B, patch_B = ex_B.numpy(), tok_B.numpy() - int(self.cls)
        lab_B = np.zeros(len(ex_B), dtype=np.int64)
        is_patch = patch_B >= 0  # CLS tokens have no patch label: label 0, in no class
        lab_B[is_patch] = self._labels["patch"][ex_B[is_patch], patch_B[is_patch]]
        return torch.from_numpy(lab_B)

    def _image_update(self, st: _LevelState, ex_B, f_BS, n_BN) -> None:
        # Disk order: an example's tokens are consecutive, and only the last example of a batch
        # can continue into the next one.
        ids_E, counts_E = torch.unique_consecutive(ex_B, return_counts=True)
        if len(ids_E) == len(ex_B):
            fmax_ES, nmax_EN = f_BS, n_BN
        else:
            inv_B = torch.repeat_interleave(torch.arange(len(ids_E)), counts_E).to(self.device)
            fmax_ES = f_BS.new_zeros(len(ids_E), f_BS.shape[1]).index_reduce_(
                0, inv_B, f_BS, "amax"
            )
            nmax_EN = n_BN.new_zeros(len(ids_E), n_BN.shape[1]).index_reduce_(
                0, inv_B, n_BN, "amax"
            )
        if st.pending is not None and st.pending[0] == int(ids_E[0]):
            if fmax_ES is f_BS:  # never write into the caller's latents
                fmax_ES, nmax_EN = f_BS.clone(), n_BN.clone()
            fmax_ES[0] = torch.maximum(fmax_ES[0], st.pending[1])
            nmax_EN[0] = torch.maximum(nmax_EN[0], st.pending[2])
        elif st.pending is not None:
            self._flush(st)
        st.pending = (int(ids_E[-1]), fmax_ES[-1].clone(), nmax_EN[-1].clone())
        if len(ids_E) > 1:
            labels_E = torch.from_numpy(self._labels["image"][ids_E[:-1].numpy()])
            labels_E = labels_E.to(self.device)
            st.add(fmax_ES[:-1], nmax_EN[:-1], labels_E)

    def _flush(self, st: _LevelState) -> None:
        e, f_S, n_N = st.pending
        st.add(f_S[None], n_N[None], torch.from_numpy(self._labels["image"][[e]]).to(self.device))
        st.pending = None

    def finish(self) -> list[LevelResult]:
        for st in self.levels:
            if st.pending is not None:
                self._flush(st)
        return [score(st, self.n_bins, self.m) for st in self.levels]


@dataclasses.dataclass
class LevelResult:
    level: str
    names: list[str]
    """Every label's name (index = label; 0 is no class)."""
    classes_C: np.ndarray
    """The labels scored: classes that occur in the pass."""
    ap_SC: np.ndarray
    """AP of every latent for every scored class (float32, quantized scores)."""
    rows: list[dict]
    """probe.csv's rows, one per scored class."""
    n_bins: int
    mantissa_bits: int

    def section(self) -> dict:
        """This level's summary in metrics.json."""
        gaps = [r["ap_hi"] - r["ap_lo"] for r in self.rows]
        gaps += [r["neuron_ap_hi"] - r["neuron_ap_lo"] for r in self.rows]
        mean = lambda k: float(np.mean([r[k] for r in self.rows])) if self.rows else 0.0  # noqa: E731
        return {
            "n_classes": len(self.rows),
            "map": mean("ap"),
            "map_neurons": mean("neuron_ap"),
            "n_latent_wins": sum(r["latent_wins"] for r in self.rows),
            "ap_gap_max": max(gaps, default=0.0),
            "n_bins": self.n_bins,
            "bins_per_octave": 2**self.mantissa_bits,
        }


def _neuron_name(j: int, d_model: int) -> str:
    return f"+{j}" if j < d_model else f"-{j - d_model}"


def score(st: _LevelState, n_bins: int, m: int) -> LevelResult:
    lv = st.level
    n_L = st.latents.n_L
    occurs = (n_L > 0).cpu().numpy()
    absent = [lv.names[c] for c in range(1, lv.n_labels) if not occurs[c]]
    if absent:
        shown = ", ".join(absent[:10]) + (", ..." if len(absent) > 10 else "")
        logger.warning(
            "probe: %d %s classes never occur in these shards and get no row: %s",
            len(absent), lv.level, shown,
        )  # fmt: skip
    classes_C = torch.tensor([c for c in range(1, lv.n_labels) if occurs[c]], dtype=torch.int64)
    rows, ap_SC = [], np.zeros((st.latents.count_FBL.shape[0], 0), np.float32)
    if len(classes_C):
        ap_SC_t = ap.average_precision(st.latents.count_FBL, n_L, classes_C.to(n_L.device))
        ap_NC_t = ap.average_precision(
            st.neurons.count_FBL, st.neurons.n_L, classes_C.to(n_L.device)
        )
        ap_SC = ap_SC_t.cpu().numpy()
        d_model = len(ap_NC_t) // 2
        for j, c in enumerate(classes_C.tolist()):
            rows.append(_row(st, lv, c, j, ap_SC[:, j], ap_NC_t[:, j].cpu().numpy(), d_model, m))
    return LevelResult(lv.level, lv.names, classes_C.numpy(), ap_SC, rows, n_bins, m)


def _row(st, lv, c, j, ap_S, ap_N, d_model, m) -> dict:
    """probe.csv's row of class c (column j of the scored classes)."""
    cls = torch.tensor([c], device=st.latents.n_L.device)
    s, n = int(np.argmax(ap_S)), int(np.argmax(ap_N))
    pos, all_ = ap.curves(st.latents.count_FBL[s : s + 1], st.latents.n_L, cls)
    lo, hi = ap.bounds(pos[0, :, 0], all_[0])
    f1, g = ap.best_f1(pos[0, :, 0], all_[0])
    top = int(st.latents.top_F[s])
    # Group g keeps the top g + 1 bins: activation >= that bin's lower edge. The lowest bin holds
    # everything down to the smallest positive float; the zero group keeps every unit.
    nb = st.latents.n_bins
    if g == nb:
        threshold = 0.0
    elif g == nb - 1:
        threshold = float(np.finfo(np.float32).smallest_subnormal)
    else:
        threshold = ap.lower_edge(top - g, m)
    npos, nall = ap.curves(st.neurons.count_FBL[n : n + 1], st.neurons.n_L, cls)
    nlo, nhi = ap.bounds(npos[0, :, 0], nall[0])
    return {
        "level": lv.level, "label": c, "name": lv.names[c],
        "n_positive": int(st.latents.n_L[c]), "best_latent": s, "ap": float(ap_S[s]),
        "ap_lo": lo, "ap_hi": hi, "f1": f1, "threshold": threshold,
        "best_neuron": _neuron_name(n, d_model), "neuron_ap": float(ap_N[n]),
        "neuron_ap_lo": nlo, "neuron_ap_hi": nhi, "latent_wins": bool(ap_S[s] > ap_N[n]),
    }  # fmt: skip


def probe_dir(out_dir: pathlib.Path) -> pathlib.Path:
    return out_dir / "cache"


def write(out_dir: pathlib.Path, results: list[LevelResult]) -> dict:
    """probe.csv and the browser's cache; returns metrics.json's `probe` section."""
    with open(out_dir / "probe.csv", "w", newline="") as fd:
        w = csv.DictWriter(fd, COLUMNS)
        w.writeheader()
        for r in (r for res in results for r in res.rows):
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
    path = probe_dir(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "probe.npz", **{f"{r.level}_ap_SC": r.ap_SC for r in results})
    small = [
        {"level": r.level, "names": r.names, "classes": r.classes_C.tolist(), "rows": r.rows,
         "n_bins": r.n_bins, "mantissa_bits": r.mantissa_bits}
        for r in results
    ]  # fmt: skip
    shards.write_json_atomic(path / "probe.json", small)
    return {r.level: r.section() for r in results}


def load(out_dir: pathlib.Path) -> list[LevelResult] | None:
    """The probe results a pass cached in out_dir, or None."""
    path = probe_dir(out_dir)
    try:
        small = json.loads((path / "probe.json").read_text())
        with np.load(path / "probe.npz") as z:
            return [
                LevelResult(
                    s["level"], s["names"], np.array(s["classes"], dtype=np.int64),
                    z[f"{s['level']}_ap_SC"], s["rows"], s["n_bins"], s["mantissa_bits"],
                )
                for s in small
            ]  # fmt: skip
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError):
        return None


def clear(out_dir: pathlib.Path) -> None:
    """Remove a previous pass's probe files (a pass without probe=true replaced it)."""
    for p in (out_dir / "probe.csv", probe_dir(out_dir) / "probe.npz"):
        p.unlink(missing_ok=True)
    (probe_dir(out_dir) / "probe.json").unlink(missing_ok=True)


def top_classes(results: list[LevelResult], latent: int, n: int) -> list[tuple]:
    """(level, label, class name, AP) of the latent's n best classes per level, best first."""
    out = []
    for r in results:
        if r.ap_SC.shape[1] == 0:
            continue
        ap_C = r.ap_SC[latent]
        for j in np.argsort(-ap_C, kind="stable")[:n]:
            c = int(r.classes_C[j])
            out.append((r.level, c, r.names[c], float(ap_C[j])))
    return out


def featured(results: list[LevelResult], n: int) -> list[int]:
    """The n best latents of every scored class (their pages and images are rendered)."""
    out = {}
    for r in results:
        for j in range(len(r.classes_C)):
            out.update((s, None) for s, _ in best_latents(r, j, n))
    return list(out)


def best_latents(result: LevelResult, j: int, n: int) -> list[tuple[int, float]]:
    """(latent, AP) of the n best latents for scored class column j."""
    ap_S = result.ap_SC[:, j]
    return [(int(s), float(ap_S[s])) for s in np.argsort(-ap_S, kind="stable")[:n]]


def pareto_panel(root: pathlib.Path | None, points) -> tuple[str, dict[str, float]]:
    """`sweep=<dir> probe=true`: each SAE's probe mAP (patch level where there is one), read from
    its browser's metrics.json (`<sae>/visuals`, written by `ckpt=<sae> probe=true`)."""
    values, missing = {}, []
    for p in points:
        path = root / p.name / "visuals" / "metrics.json" if root is not None else None
        section = json.loads(path.read_text()).get("probe", {}) if path and path.is_file() else {}
        level = section.get("patch") or section.get("image")
        if level is None:
            missing.append(p.name)
        else:
            values[p.name] = float(level["map"])
    if missing:
        logger.warning(
            "probe: %d SAEs have no probe results (visualize.py ckpt=<sae> probe=true): %s",
            len(missing), ", ".join(missing[:5]),
        )  # fmt: skip
    return "label probe mAP (best latent per class)", values

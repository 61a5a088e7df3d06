"""`python visualize.py sweep=<dir>`: L0 against normalized MSE of every SAE of a sweep.

SAEs are the directories under `<dir>` (any depth: a runs directory `<run_id>/<sae>/`, or a
multirun sweep directory `<job run dir>/<sae>/`) holding `config.json` and `metrics.json`. Each
point uses the SAE's validation metrics (`metrics.json["val"]`), else its train metrics. Its label
is the `train` settings that differ across the SAEs found (the swept ones). Writes `pareto.csv`
(one row per SAE), `pareto.png`, and `pareto.svg`, whose points link to each SAE's browser
(`<sae>/visuals/index.html`) where one exists.

With `splice=true`, each SAE is also run inside the model (`saev.visualize.faithfulness`, cached
in `<sae>/visuals/cache/`): a second panel plots L0 against `recovered` (1: the model as if the
SAE were not there, 0: no better than mean ablation), and pareto.csv gains `cos` and `recovered`.

`wandb.project=<name>` reads the same metrics (`val/nmse`, `val/l0`, ...: what training logs) and
configs from the W&B public API instead; that needs the network and a W&B login.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pathlib

logger = logging.getLogger(__name__)

BOOKKEEPING = {"name", "run_id", "runs_root", "ckpt_path", "sweep"}
"""Train settings that differ between SAEs without being a swept hyperparameter."""


@dataclasses.dataclass
class Point:
    """One SAE of the sweep."""

    name: str
    """Its directory relative to the sweep directory, or its W&B run name (`<run_id>/<sae>`)."""
    kind: str
    """The SAE kind (relu, topk, ..., matryoshka-<activation>)."""
    l0: float
    nmse: float
    split: str
    """Which metrics these are: "val", or "train" for an SAE trained without validation."""
    settings: dict
    """Its train config, flattened to dotted keys."""
    browser: pathlib.Path | None = None
    """Its latent browser's index.html, if one was written."""
    on_front: bool = False
    """On the Pareto front: no other SAE has both lower-or-equal L0 and normalized MSE."""
    directory: pathlib.Path | None = None
    """Its checkpoint directory, for SAEs found on disk."""
    splice: dict | None = None
    """Its spliced evaluation (metrics.json's `splice` section), with splice=true."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else v
    return out


def kind_of(sae: dict) -> str:
    act = sae.get("activation", "?")
    return f"matryoshka-{act}" if sae.get("matryoshka") else act


def pick_split(metrics: dict) -> tuple[str, dict] | None:
    for split in ("val", "train"):
        values = metrics.get(split)
        if isinstance(values, dict) and "l0" in values and "nmse" in values:
            return split, values
    return None


def discover(root: pathlib.Path) -> list[Point]:
    """Every SAE directory under `root` (config.json with an `sae` entry, plus metrics.json)."""
    points = []
    for config_path in sorted(root.rglob("config.json")):
        sae_dir = config_path.parent
        if not (sae_dir / "metrics.json").is_file():
            continue
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or "sae" not in config:
            continue
        picked = pick_split(json.loads((sae_dir / "metrics.json").read_text()))
        if picked is None:
            logger.warning("%s has no val or train l0/nmse; left out", sae_dir)
            continue
        split, values = picked
        browser = sae_dir / "visuals" / "index.html"
        points.append(
            Point(
                name=str(sae_dir.relative_to(root)), kind=kind_of(config["sae"]),
                l0=float(values["l0"]), nmse=float(values["nmse"]), split=split,
                settings=flatten(config.get("train", {})),
                browser=browser if browser.is_file() else None, directory=sae_dir,
            )
        )  # fmt: skip
    return points


def from_wandb(runs, browsers: dict[str, pathlib.Path] | None = None) -> list[Point]:
    """Points from W&B runs (objects with `name`, `config` and `summary`, as `wandb.Api().runs`
    returns): training logs `<split>/<metric>` and the TrainConfig as the run's config."""
    points = []
    for run in runs:
        # W&B adds its own bookkeeping ("_wandb", ...) to the config; it is no setting of ours.
        config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        summary = dict(run.summary)
        for split in ("val", "train"):
            if f"{split}/l0" in summary and f"{split}/nmse" in summary:
                break
        else:
            logger.warning("W&B run %s logged no l0/nmse; left out", run.name)
            continue
        points.append(
            Point(
                name=run.name, kind=kind_of(config.get("sae", {})),
                l0=float(summary[f"{split}/l0"]), nmse=float(summary[f"{split}/nmse"]),
                split=split, settings=flatten(config), browser=(browsers or {}).get(run.name),
            )
        )  # fmt: skip
    return points


def mark_front(points: list[Point]) -> None:
    for p in points:
        p.on_front = not any(
            q.l0 <= p.l0 and q.nmse <= p.nmse and (q.l0 < p.l0 or q.nmse < p.nmse) for q in points
        )


def swept_keys(points: list[Point]) -> list[str]:
    """Train settings whose values differ across the points, less the SAE settings that only
    follow the kind (sae.k exists for topk, sae.sparsity_coeff for relu: the legend says that)."""
    keys = sorted({k for p in points for k in p.settings} - BOOKKEEPING)

    def varies(k: str, among: list[Point]) -> bool:
        return len({repr(p.settings.get(k)) for p in among}) > 1

    by_kind = [[p for p in points if p.kind == kind] for kind in {p.kind for p in points}]
    return [
        k
        for k in keys
        if varies(k, points)
        and (not k.startswith("sae.") or any(varies(k, mine) for mine in by_kind))
    ]


def label(p: Point, keys: list[str]) -> str:
    """`k=8`, `sparsity_coeff=1.0, lr=0.001`: the swept settings this SAE has."""
    parts = [
        f"{k.removeprefix('sae.')}={p.settings[k]}" for k in keys if p.settings.get(k) is not None
    ]
    return ", ".join(parts) or p.name


def write_csv(path: pathlib.Path, points: list[Point], keys: list[str]) -> None:
    with open(path, "w", newline="") as fd:
        w = csv.writer(fd)
        spliced = any(p.splice for p in points)
        extra = ["cos", "recovered"] if spliced else []
        w.writerow(["name", "kind", "l0", "nmse", *extra, "on_front", "split", *keys, "browser"])
        for p in points:
            browser = os.path.relpath(p.browser, path.parent) if p.browser else ""
            row = [p.name, p.kind, f"{p.l0:.6g}", f"{p.nmse:.6g}"]
            if spliced:
                row += [
                    f"{p.splice[k]:.6g}" if p.splice and p.splice[k] is not None else ""
                    for k in extra
                ]
            row += [p.on_front, p.split]
            w.writerow([*row, *(p.settings.get(k, "") for k in keys), browser])


def plot(out: pathlib.Path, points: list[Point], keys: list[str], panels=()) -> None:
    """pareto.png, and pareto.svg with each point linking to its browser; `panels` adds plots of
    L0 against other metrics ((y label, {point name: value}), e.g. the label probe's mAP)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # labels stay text in the SVG (searchable)
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(7 * (1 + len(panels)), 5), dpi=120)
    ax = axes[0] if panels else axes
    for extra, (ylabel, values) in zip(axes[1:] if panels else [], panels):
        for kind in sorted({p.kind for p in points}):
            mine = [p for p in points if p.kind == kind and p.name in values]
            extra.scatter([p.l0 for p in mine], [values[p.name] for p in mine], label=kind)
        for p in (p for p in points if p.name in values):
            extra.annotate(label(p, keys), (p.l0, values[p.name]), fontsize=7, xytext=(4, 4),
                           textcoords="offset points")  # fmt: skip
        extra.set_xlabel("L0 (active latents per token)")
        extra.set_ylabel(ylabel)
        extra.grid(alpha=0.3)
    for kind in sorted({p.kind for p in points}):
        mine = [p for p in points if p.kind == kind]
        sc = ax.scatter([p.l0 for p in mine], [p.nmse for p in mine], label=kind, zorder=3)
        sc.set_urls([os.path.relpath(p.browser, out) if p.browser else None for p in mine])
    front = sorted((p for p in points if p.on_front), key=lambda p: p.l0)
    ax.plot([p.l0 for p in front], [p.nmse for p in front], "k--", lw=1, label="Pareto front")
    for p in points:
        ax.annotate(label(p, keys), (p.l0, p.nmse), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("normalized MSE")
    splits = sorted({p.split for p in points})
    ax.set_title(f"{len(points)} SAEs ({'/'.join(splits)} metrics)")
    fig.tight_layout()
    fig.savefig(out / "pareto.png")
    fig.savefig(out / "pareto.svg")
    plt.close(fig)


def wandb_runs(project: str, entity: str | None):
    """Runs of a W&B project through the public API (needs the network and a W&B login)."""
    import wandb

    return wandb.Api().runs(f"{entity}/{project}" if entity else project)


def main(cfg, splice_of=None) -> pathlib.Path:
    """The plot of `cfg.sweep` (or its W&B project); `splice_of(sae_dir) -> dict`, if given,
    runs the spliced evaluation of each SAE found on disk."""
    root = pathlib.Path(cfg.sweep).absolute() if cfg.sweep else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"sweep={cfg.sweep} is not a directory.")
    local = discover(root) if root is not None else []
    if cfg.wandb.project:
        # Browsers live next to the local SAE directories: match them by W&B run name.
        browsers = {}
        for config_path in root.rglob("config.json") if root is not None else []:
            config = json.loads(config_path.read_text())
            name = f"{config.get('run_id')}/{config.get('train', {}).get('name')}"
            index = config_path.parent / "visuals" / "index.html"
            if index.is_file():
                browsers[name] = index
        points = from_wandb(wandb_runs(cfg.wandb.project, cfg.wandb.entity), browsers)
        where = f"W&B project {cfg.wandb.project}"
    else:
        points, where = local, str(root)
    if not points:
        raise ValueError(f"no SAE with metrics found in {where} (config.json + metrics.json).")
    out = pathlib.Path(cfg.out) if cfg.out else root or pathlib.Path("pareto").absolute()
    out.mkdir(parents=True, exist_ok=True)
    if splice_of is not None:
        for p in points:
            if p.directory is not None:
                p.splice = splice_of(p.directory)
    mark_front(points)
    keys = swept_keys(points)
    write_csv(out / "pareto.csv", points, keys)
    panels = []
    if any(p.splice for p in points):
        recovered = {
            p.name: p.splice["recovered"]
            for p in points
            if p.splice and p.splice["recovered"] is not None
        }
        panels.append(
            ("recovered (SAE inside the model; 1 = unchanged, 0 = mean ablation)", recovered)
        )
    if cfg.probe.enabled:
        from saev.visualize import probe

        panels.append(probe.pareto_panel(root, points))
    plot(out, points, keys, panels)
    return out

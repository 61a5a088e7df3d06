"""The static latent browser: `<out_dir>/index.html` plus one page per chosen latent.

Plain HTML with a small inline script (sorting and filtering the table); it opens straight from
disk with no server and no network. Images are files written once by `saev.visualize.render` and
referenced by relative paths, never inlined. The plot of log10 frequency against log10 mean value
of every live latent is inline SVG, so the chosen latents' points can link to their pages.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import pathlib

import numpy as np

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; }
th { cursor: pointer; user-select: none; background: #eee; } tr:hover { background: #f6f6ff; }
img.thumb { width: 48px; height: 48px; image-rendering: pixelated; vertical-align: middle; }
.pair img { width: 160px; height: 160px; image-rendering: pixelated; margin-right: 2px; }
figure { display: inline-block; margin: 6px; font-size: 12px; }
.controls input { width: 5em; } .meta { color: #555; font-size: 14px; }
"""

SCRIPT = """
const body = document.querySelector('#latents tbody');
const rows = Array.from(body.rows);
let sortKey = null, sortDir = 1;
const headers = document.querySelectorAll('#latents th[data-key]');
headers.forEach(th => th.addEventListener('click', () => {
  const key = th.dataset.key;
  sortDir = key === sortKey ? -sortDir : (key === 'id' ? 1 : -1);
  sortKey = key;
  rows.sort((a, b) => sortDir * (Number(a.dataset[key]) - Number(b.dataset[key])));
  rows.forEach(r => body.appendChild(r));
}));
function bound(id, fallback) {
  const v = document.getElementById(id).value;
  return v === '' ? fallback : Number(v);
}
function applyFilter() {
  const f0 = bound('freq-lo', -Infinity), f1 = bound('freq-hi', Infinity);
  const m0 = bound('mean-lo', -Infinity), m1 = bound('mean-hi', Infinity);
  const ids = document.getElementById('ids').value.split(/[\\s,]+/).filter(s => s !== '');
  const box = document.getElementById('class'), cl = box ? box.value.toLowerCase() : '';
  let n = 0;
  rows.forEach(r => {
    const lf = Math.log10(Number(r.dataset.freq)), lm = Math.log10(Number(r.dataset.mean));
    const ok = lf >= f0 && lf <= f1 && lm >= m0 && lm <= m1 &&
      (ids.length === 0 || ids.includes(r.dataset.id)) &&
      (cl === '' || (r.dataset.class || '').toLowerCase().includes(cl));
    r.style.display = ok ? '' : 'none';
    n += ok;
  });
  document.getElementById('count').textContent = n + ' of ' + rows.length + ' latents shown';
}
document.querySelectorAll('.controls input').forEach(i => i.addEventListener('input', applyFilter));
applyFilter();
"""


@dataclasses.dataclass
class ImageView:
    """One image shown for a latent."""

    example: int
    token: str
    """Its best token for the latent: "CLS" or "patch <i>" (row-major, as the ViT orders them)."""
    value: float
    """The latent's activation on that token."""
    record: dict
    """The example's line of examples.jsonl (path or index, label)."""
    heatmap: str | None
    """Heatmap file relative to out_dir; None for CLS latents (plain images)."""


@dataclasses.dataclass
class LatentView:
    """One chosen latent: statistics, images and the patch labels of its top tokens."""

    latent: int
    freq: float
    mean: float
    max: float
    images: list[ImageView]
    labels: list[tuple[int, int]]
    """(label, count) of its top patches where the shards carry per-patch labels (ADE20K)."""
    classes: list[tuple[str, int, str, float]] = dataclasses.field(default_factory=list)
    """(level, label, class name, AP) of its best classes by label probe (probe=true)."""
    effect: object | None = None
    """What zeroing it does inside the model (`faithfulness.Effect`), with splice=true."""


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n{tail}</body></html>\n"
    )


def _describe(rec: dict) -> str:
    where = rec.get("path", f"index {rec.get('index')}")
    label = f" · label {rec['label']}" if "label" in rec else ""
    return html.escape(f"{where}{label}")


def latent_page(view: LatentView, prev_id: int | None, next_id: int | None) -> str:
    nav = ['<a href="../index.html">all latents</a>']
    if prev_id is not None:
        nav.append(f'<a href="{prev_id}.html">previous ({prev_id})</a>')
    if next_id is not None:
        nav.append(f'<a href="{next_id}.html">next ({next_id})</a>')
    parts = [
        f"<p>{' · '.join(nav)}</p>",
        f"<h1>Latent {view.latent}</h1>",
        f'<p class="meta">frequency {view.freq:.4g} · mean when firing {view.mean:.4g} · '
        f"max {view.max:.4g} · {len(view.images)} images</p>",
    ]
    if view.effect is not None:
        parts.append(f'<p id="effect">{_effect_sentence(view.effect)}</p>')
    if view.labels:
        labels = ", ".join(f'<span class="label">{lab}</span> ({n})' for lab, n in view.labels)
        parts.append(f'<p id="labels">Patch labels of its top tokens: {labels}</p>')
    if view.classes:
        best = ", ".join(
            f'<a class="class" href="../classes/{lv}/{label}.html">{html.escape(name)}</a> '
            f"(AP {a:.3f}, {lv})"
            for lv, label, name, a in view.classes
        )
        parts.append(f'<p id="classes">Classes it detects best (label probe): {best}</p>')
    if not view.images:
        parts.append("<p>No images: this latent never fired on these shards.</p>")
    for im in view.images:
        pics = f'<img class="crop" src="../images/{im.example}.png" alt="example {im.example}">'
        if im.heatmap is not None:
            pics += f'<img class="heatmap" src="../{im.heatmap}" alt="heatmap">'
        parts.append(
            f'<figure data-example="{im.example}"><div class="pair">{pics}</div>'
            f"<figcaption>{im.value:.4g} at {im.token} · example {im.example}<br>"
            f"{_describe(im.record)}</figcaption></figure>"
        )
    return _page(f"latent {view.latent}", "\n".join(parts))


def _effect_sentence(e) -> str:
    base = "no other latent is live"
    if e.baseline_latent is not None:
        base = (
            f"latent {e.baseline_latent}, of similar frequency, on its top images: "
            f"{e.baseline_drop:.4g}"
        )
    return (
        f"Zeroing this latent inside the model (the SAE's error kept) lowers the cosine of the "
        f"model's output to the clean output by {e.drop:.4g} on average over its top "
        f"{e.n_images} images (a random latent, {base})."
    )


def scatter_svg(summary, chosen: list[int], width=640, height=360) -> str:
    """log10 frequency (x) against log10 mean value (y) of every live latent; chosen ones are red
    and link to their pages."""
    live = np.flatnonzero(summary.count_S > 0)
    if len(live) == 0:
        return "<p>No latent fired.</p>"
    x_L, y_L = np.log10(summary.freq_S[live]), np.log10(summary.mean_S[live])
    x0, x1 = math.floor(x_L.min()), max(math.ceil(x_L.max()), math.floor(x_L.min()) + 1)
    y0, y1 = math.floor(y_L.min()), max(math.ceil(y_L.max()), math.floor(y_L.min()) + 1)
    pad = 40

    def px(x, y):
        return (
            pad + (x - x0) / (x1 - x0) * (width - 2 * pad),
            height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad),
        )

    out = [f'<svg id="scatter" width="{width}" height="{height}" style="border:1px solid #ccc">']
    for t in range(x0, x1 + 1):
        X, _ = px(t, y0)
        out.append(f'<text x="{X:.0f}" y="{height - pad + 15}" font-size="11">1e{t}</text>')
    for t in range(y0, y1 + 1):
        _, Y = px(x0, t)
        out.append(f'<text x="2" y="{Y:.0f}" font-size="11">1e{t}</text>')
    out.append(
        f'<text x="{width / 2 - 60:.0f}" y="{height - 5}" font-size="12">firing frequency</text>'
        f'<text x="12" y="14" font-size="12">mean value when firing</text>'
    )
    for x, y in zip(x_L, y_L):
        X, Y = px(x, y)
        out.append(f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="1.5" fill="#999"/>')
    pos = {int(s): i for i, s in enumerate(live)}
    for s in chosen:
        if s in pos:
            X, Y = px(x_L[pos[s]], y_L[pos[s]])
            out.append(
                f'<a href="latents/{s}.html"><circle class="chosen" cx="{X:.1f}" cy="{Y:.1f}" '
                f'r="3.5" fill="#d22"><title>latent {s}</title></circle></a>'
            )
    out.append("</svg>")
    return "\n".join(out)


def index_page(views: list[LatentView], summary, src, metrics: dict) -> str:
    probed = any(v.classes for v in views)
    shown = ", ".join(
        f"{k} {metrics[k]:.4g}"
        for k in ("nmse", "explained_variance", "l0", "dead", "dense")
        if k in metrics
    )
    if "splice" in metrics:
        sp = metrics["splice"]
        shown += "<br>spliced into the model: " + ", ".join(
            f"{k} {sp[k]:.4g}"
            for k in ("cos", "cos_mean_ablation", "recovered", "top1_agreement", "kl")
            if sp.get(k) is not None
        )
    effects = any(v.effect is not None for v in views)
    head = [
        "<h1>SAE latents</h1>",
        f'<p class="meta">checkpoint {html.escape(str(src.ckpt))}<br>shards '
        f"{html.escape(str(src.shard_root))} · layer {src.layer} · tokens {src.tokens} · "
        f"{summary.n_tokens} tokens<br>{shown}</p>",
        scatter_svg(summary, [v.latent for v in views]),
        '<p class="controls">log10 frequency <input id="freq-lo"> to <input id="freq-hi"> · '
        'log10 mean <input id="mean-lo"> to <input id="mean-hi"> · ids '
        '<input id="ids" style="width:10em">'
        + (' · best class <input id="class">' if probed else "")
        + ' <span id="count"></span></p>',
        '<table id="latents"><thead><tr><th data-key="id">latent</th>'
        '<th data-key="freq">frequency</th><th data-key="mean">mean</th>'
        '<th data-key="max">max</th>'
        + ('<th data-key="ap">best class</th>' if probed else "")
        + ('<th data-key="drop">zero drop</th><th data-key="base">baseline</th>' if effects else "")
        + "<th>top image</th></tr></thead><tbody>",
    ]
    if probed:
        head.insert(-2, '<p><a href="classes/index.html">classes: best latents per class</a></p>')
    rows = []
    for v in views:
        thumb = ""
        if v.images:
            im = v.images[0]
            src_rel = im.heatmap or f"images/{im.example}.png"
            thumb = f'<img class="thumb" src="{src_rel}" alt="">'
        data, cells = "", ""
        if probed:
            _, _, name, a = v.classes[0] if v.classes else ("", 0, "", 0.0)
            data += f' data-class="{html.escape(name)}" data-ap="{a:.6g}"'
            cells += f'<td class="best-class">{html.escape(name)} ({a:.3f})</td>'
        if effects:
            e = v.effect
            drop = "" if e is None else f"{e.drop:.6g}"
            base = "" if e is None or e.baseline_drop is None else f"{e.baseline_drop:.6g}"
            data += f' data-drop="{drop}" data-base="{base}"'
            cells += (
                f"<td>{drop and f'{e.drop:.4g}'}</td><td>{base and f'{e.baseline_drop:.4g}'}</td>"
            )
        rows.append(
            f'<tr data-id="{v.latent}" data-freq="{v.freq:.6g}" data-mean="{v.mean:.6g}" '
            f'data-max="{v.max:.6g}"{data}><td><a class="latent" href="latents/{v.latent}.html">'
            f"{v.latent}</a></td><td>{v.freq:.4g}</td><td>{v.mean:.4g}</td><td>{v.max:.4g}</td>"
            f"{cells}<td>{thumb}</td></tr>"
        )
    body = "\n".join(head + rows + ["</tbody></table>"])
    return _page("SAE latents", body, SCRIPT)


def write(out_dir: pathlib.Path, views: list[LatentView], summary, src, cfg) -> None:
    pages = out_dir / "latents"
    if pages.exists():  # pages of latents no longer chosen would linger
        for old in pages.glob("*.html"):
            old.unlink()
    pages.mkdir(exist_ok=True)
    ids = [v.latent for v in views]
    for i, v in enumerate(views):
        prev_id = ids[i - 1] if i > 0 else None
        next_id = ids[i + 1] if i + 1 < len(ids) else None
        (pages / f"{v.latent}.html").write_text(latent_page(v, prev_id, next_id))
    metrics_path = out_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    (out_dir / "index.html").write_text(index_page(views, summary, src, metrics))

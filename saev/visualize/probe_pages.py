"""The label probe's pages in the browser: `classes/index.html` (every scored class, its best
latent's and best neuron's AP) and `classes/<level>/<label>.html` (the class's best latents, each
with its top images and a link to its page). Written by `render` when probe=true."""

from __future__ import annotations

import html
import pathlib

from saev.visualize import browser, probe


def class_page(result: probe.LevelResult, row: dict, j: int, views: dict, n: int) -> str:
    name = html.escape(row["name"])
    parts = [
        '<p><a href="../../index.html">all latents</a> · '
        '<a href="../index.html">all classes</a></p>',
        f"<h1>{name} <small>({result.level} level, label {row['label']})</small></h1>",
        f'<p class="meta">{row["n_positive"]} positive {result.level}es · best neuron '
        f"{row['best_neuron']} AP {row['neuron_ap']:.3f}</p>",
    ]
    for s, a in probe.best_latents(result, j, n):
        view = views.get(s)
        parts.append(
            f'<h2 class="best-latent" data-latent="{s}"><a href="../../latents/{s}.html">latent '
            f"{s}</a> · AP {a:.3f}</h2>"
        )
        for im in view.images if view is not None else []:
            src = f"../../{im.heatmap}" if im.heatmap else f"../../images/{im.example}.png"
            parts.append(
                f'<figure data-example="{im.example}"><div class="pair"><img src="{src}" '
                f'alt="example {im.example}"></div><figcaption>{im.value:.4g} at {im.token}'
                "</figcaption></figure>"
            )
    return browser._page(f"class {row['name']}", "\n".join(parts))


def index(results: list[probe.LevelResult]) -> str:
    head = (
        "<tr><th>level</th><th>class</th><th>positives</th><th>best latent</th><th>AP</th>"
        "<th>F1</th><th>best neuron</th><th>neuron AP</th></tr>"
    )
    rows = []
    for r in results:
        for row in r.rows:
            rows.append(
                f'<tr><td>{r.level}</td><td><a href="{r.level}/{row["label"]}.html">'
                f"{html.escape(row['name'])}</a></td><td>{row['n_positive']}</td>"
                f'<td><a href="../latents/{row["best_latent"]}.html">{row["best_latent"]}</a></td>'
                f"<td>{row['ap']:.3f}</td><td>{row['f1']:.3f}</td><td>{row['best_neuron']}</td>"
                f"<td>{row['neuron_ap']:.3f}</td></tr>"
            )
    body = (
        '<p><a href="../index.html">all latents</a></p><h1>Classes</h1>'
        f'<table id="classes"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    )
    return browser._page("classes", body)


def write(out_dir: pathlib.Path, results: list[probe.LevelResult], views, n: int) -> None:
    by_id = {v.latent: v for v in views}
    root = out_dir / "classes"
    for r in results:
        folder = root / r.level
        if folder.exists():  # classes of an earlier pass would linger
            for old in folder.glob("*.html"):
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for j, row in enumerate(r.rows):
            (folder / f"{row['label']}.html").write_text(class_page(r, row, j, by_id, n))
    (root / "index.html").write_text(index(results))

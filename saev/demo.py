"""The whole workflow on the built-in offline demo: `python -m saev.demo`.

It runs the real entry points, one after another, exactly as a user would:

1. `python record.py dump_to=<out>/shards layers=[-2]` records a tiny random ViT (`model=tiny`,
   its block 2 of 4) over synthetic images (`data=synthetic`); no download, no GPU;
2. `python train.py -m +experiment=demo data.shard_root=<shards> runs_root=<out>/runs` trains the
   demo sweep (`conf/experiment/demo.yaml`: 2 ReLU and 2 TopK SAEs) in one job;
3. `python visualize.py ckpt=<best SAE> splice=true` evaluates the SAE with the lowest validation
   normalized MSE among those with L0 <= `--max-l0` (32), also inside the ViT (the SAE spliced
   into the recorded block: how much of the model's output it keeps, and what zeroing each shown
   latent does), and builds its latent browser next to it (`<sae>/visuals/index.html`);
4. `python visualize.py sweep=<sweep dir> splice=true` draws the sweep's L0 against normalized
   MSE and against `recovered` (`<sweep dir>/pareto.png`), linking each point to a browser where
   one exists.

The last two lines printed are the browser's `index.html` and the Pareto plot. `--n-images` and
`--n-train` shrink it (the tests run it on tiny settings).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
"""The checkout holding record.py, train.py and visualize.py (the package is installed in place)."""
SPLICE_SAMPLE = "splice.n_images=256"
"""Images of the spliced evaluation: a quarter of the recording keeps the demo under 2 minutes."""


class DemoError(RuntimeError):
    """A step failed; its own one-line error was printed above."""


def step(title: str, script: str, args: list[str]) -> str:
    """Run one entry point, its progress bars and messages passing through; returns the last line
    it printed (each entry point prints its output directory last)."""
    print(f"== {title}: python {script} {' '.join(args)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise DemoError(f"{script} failed (exit code {res.returncode}); its error is above.")
    print(f"   done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return lines[-1]


def best_sae(sweep_dir: pathlib.Path, max_l0: float) -> tuple[pathlib.Path, dict]:
    """The SAE with the lowest validation normalized MSE among those that trained with an L0 of
    at most `max_l0` (the sparsity a researcher asks for; all of them if none is that sparse)."""
    with open(sweep_dir / "summary.csv", newline="") as fd:
        rows = [r for r in csv.DictReader(fd) if r["status"] == "done" and r["nmse"]]
    if not rows:
        raise DemoError(f"no SAE of {sweep_dir} finished; see {sweep_dir / 'summary.csv'}.")
    sparse = [r for r in rows if float(r["l0"]) <= max_l0] or rows
    row = min(sparse, key=lambda r: float(r["nmse"]))
    return sweep_dir / row["job"] / row["name"], row


def run(
    out: pathlib.Path, n_images: int, n_train: int, max_l0: float
) -> tuple[pathlib.Path, pathlib.Path]:
    if not (ROOT / "record.py").is_file():
        raise DemoError(f"{ROOT} holds no record.py: run the demo from a checkout of saev.")
    out = out.absolute()
    shards = step(
        "1/4 record",
        "record.py",
        [f"dump_to={out / 'shards'}", f"data.n_images={n_images}", "layers=[-2]"],
    )
    sweep_dir = pathlib.Path(
        step(
            "2/4 train a sweep",
            "train.py",
            ["-m", "+experiment=demo", f"data.shard_root={shards}", f"runs_root={out / 'runs'}"]
            + [f"n_train={n_train}"],
        )
    )
    sae_dir, row = best_sae(sweep_dir, max_l0)
    print(
        f"   best SAE: {sae_dir.name} (val nmse {float(row['nmse']):.3f}, l0 {row['l0']})",
        file=sys.stderr,
    )
    # Quoted: SAE directory names hold '=' (e.g. 02-topk-k=8), which Hydra would split on.
    browser = pathlib.Path(
        step(
            "3/4 visualize the best SAE",
            "visualize.py",
            [f"ckpt='{sae_dir}'", "splice=true", SPLICE_SAMPLE],
        )
    )
    sp = json.loads((browser / "metrics.json").read_text())["splice"]
    recovered = "n/a" if sp["recovered"] is None else f"{sp['recovered']:.3f}"
    print(
        f"   inside the ViT: output cosine {sp['cos']:.3f} (mean ablation "
        f"{sp['cos_mean_ablation']:.3f}), recovered {recovered}",
        file=sys.stderr,
    )
    plot_dir = pathlib.Path(
        step(
            "4/4 compare the sweep",
            "visualize.py",
            [f"sweep='{sweep_dir}'", "splice=true", SPLICE_SAMPLE],
        )
    )
    return browser / "index.html", plot_dir / "pareto.png"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saev.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo", help="output directory (default: ./demo)")
    ap.add_argument("--n-images", type=int, default=1024, help="synthetic images to record")
    ap.add_argument("--n-train", type=int, default=1_000_000, help="activations to train on")
    ap.add_argument("--max-l0", type=float, default=32, help="sparsity of the SAE to visualize")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        index, plot = run(pathlib.Path(args.out), args.n_images, args.n_train, args.max_l0)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(index)
    print(plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

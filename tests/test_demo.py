"""`python -m saev.demo`, the README's first command, end to end on tiny settings: the real
record.py, train.py -m and visualize.py, with clean output."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOISE = ("Tip:", "LeafSpec", "srun", "wandb:", "GPU available", "UserWarning", "Traceback")


@pytest.mark.slow
def test_demo_runs_the_whole_workflow(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)  # the demo must be quiet on its own
    cmd = [sys.executable, "-m", "saev.demo", f"--out={tmp_path}", "--n-images=96"]
    res = subprocess.run(
        cmd + ["--n-train=60000"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    *_, index, plot = res.stdout.strip().splitlines()
    index, plot = pathlib.Path(index), pathlib.Path(plot)
    assert index.name == "index.html" and plot.name == "pareto.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep_dir = plot.parent
    with open(sweep_dir / "summary.csv", newline="") as fd:
        rows = list(csv.DictReader(fd))
    assert sorted(r["sae"] for r in rows) == ["relu", "relu", "topk", "topk"]
    assert all(r["status"] == "done" for r in rows)
    jobs = {r["job"] for r in rows}
    assert jobs == {"job-0"}  # all four SAEs shared one data stream
    for r in rows:
        assert (sweep_dir / r["job"] / r["name"] / "sae.safetensors").is_file()
    with open(sweep_dir / "pareto.csv", newline="") as fd:
        points = list(csv.DictReader(fd))
    # Every SAE was also run inside the ViT (block 2 of 4: the blocks above see its output),
    # and the splice itself is exact.
    assert len(points) == 4 and all(-math.inf < float(p["recovered"]) <= 1 for p in points)
    assert all(float(p["cos"]) < 1 for p in points)
    spliced = json.loads((index.parent / "metrics.json").read_text())["splice"]
    assert abs(spliced["cos_with_error"] - 1) < 1e-5
    html = index.read_text()
    assert html.count("<tr") > 1 and 'src="heatmaps/' in html and "zero drop" in html
    assert "inside the ViT: output cosine" in res.stderr
    assert index.parent.parent.name in {r["name"] for r in rows}  # the browser of one of them
    for noise in NOISE:
        assert noise not in res.stderr, noise

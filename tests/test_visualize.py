"""`python visualize.py` end to end on a tiny recorded dataset: the pass against brute force, the
metrics against a recomputation, every filter, heatmaps and crops, the cache, missing images,
patch labels, the sweep's Pareto plot, and one-line errors.

Shards come from `python record.py` (the tiny random ViT over synthetic images, or over a small
image folder); SAEs are crafted so that latents fire at varied, known rates.
"""

import csv
import json
import pathlib
import re
import shutil
import types

import numpy as np
import pytest
import torch
from helpers.visualize import (
    DEAD,
    N_IMAGES,
    N_TOKENS,
    TWO_TOKENS,
    D,
    all_tokens,
    crafted_sae,
    last_line,
    one_line_error,
    run,
)
from PIL import Image

from saev import nn


def read_latents(out):
    with open(out / "latents.csv") as fd:
        rows = list(csv.DictReader(fd))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("freq", "mean_when_firing", "max")}


def table_ids(out) -> list[int]:
    return [int(m) for m in re.findall(r'<tr data-id="(\d+)"', (out / "index.html").read_text())]


def page_examples(out, latent) -> list[int]:
    text = (out / "latents" / f"{latent}.html").read_text()
    return [int(m) for m in re.findall(r'<figure data-example="(\d+)"', text)]


@pytest.mark.slow
def test_pass_equals_brute_force_and_metrics_equal_recomputation(
    recorded_shards, crafted_ckpt, rendered
):
    out = rendered
    x_ND, ex_N, tok_N = all_tokens(recorded_shards)
    assert len(x_ND) == N_IMAGES * N_TOKENS
    sae = nn.load(crafted_ckpt)
    with torch.no_grad():
        f_NS = sae.encode(x_ND)
        x_hat_ND = sae.decode(f_NS)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens"] == "all" and metrics["n_tokens"] == N_IMAGES * N_TOKENS
    x, r = x_ND.double().numpy(), (x_ND - x_hat_ND).double().numpy()
    total_var = ((x - x.mean(0)) ** 2).sum()
    fired_S = (f_NS > 0).numpy().sum(0)
    expected = {
        "nmse": (r**2).sum() / total_var,
        "explained_variance": 1 - ((r - r.mean(0)) ** 2).sum() / total_var,
        "l0": (f_NS > 0).numpy().sum(1).mean(),
        "dead": (fired_S == 0).mean(),
        "dense": (fired_S / len(f_NS) > 0.01).mean(),
    }
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, rel=1e-4), k
    assert 0 < metrics["dead"] < metrics["dense"] < 1

    stats = read_latents(out)
    freq_S = (f_NS > 0).double().mean(0).numpy()
    np.testing.assert_allclose(stats["freq"], freq_S, rtol=1e-5)
    np.testing.assert_allclose(stats["max"], f_NS.max(0).values.numpy(), rtol=1e-5)
    mean_S = f_NS.sum(0).numpy() / np.maximum(fired_S, 1)
    np.testing.assert_allclose(stats["mean_when_firing"], mean_S, rtol=1e-5)
    assert 0 < freq_S[freq_S > 0].min() < freq_S.max() < 1  # varied rates: a non-trivial case

    top = np.load(out / "cache" / "pass.npz")
    vals_KS = f_NS.topk(6, dim=0).values
    np.testing.assert_allclose(top["values_SK"], vals_KS.T.numpy(), rtol=1e-5, atol=1e-6)
    for s in range(f_NS.shape[1]):
        for j in range(6):
            e, t = top["example_idx_SK"][s, j], top["token_idx_SK"][s, j]
            if vals_KS[j, s] > 0:
                assert f_NS[(ex_N == e) & (tok_N == t), s].item() == pytest.approx(
                    vals_KS[j, s].item()
                )
            else:  # an empty slot names no example (the first fault of the old pass)
                assert e == -1 and t == -1
    assert (top["example_idx_SK"][TWO_TOKENS] >= 0).sum() == 2
    assert (top["example_idx_SK"][DEAD] == -1).all()


@pytest.mark.slow
def test_render_heatmaps_and_crops(recorded_shards, rendered):
    out, top = rendered, np.load(rendered / "cache" / "pass.npz")
    live = [s for s in range(24) if top["example_idx_SK"][s, 0] >= 0]
    assert table_ids(out) == sorted(live, key=lambda s: -read_latents(out)["freq"][s])
    assert DEAD not in table_ids(out)
    from saev.record import vit
    from saev.record.config import ModelConfig

    transform = vit.load(ModelConfig()).transform  # the recording's model and transform
    from saev.record.images import SyntheticDataset

    for s in live:
        # Its images: the distinct examples of its top tokens, by best token, at most n_images.
        expected = list(dict.fromkeys(e for e in top["example_idx_SK"][s] if e >= 0))[:3]
        assert page_examples(out, s) == expected
        e, t = int(top["example_idx_SK"][s, 0]), int(top["token_idx_SK"][s, 0])
        heat_HW3 = np.asarray(Image.open(out / "heatmaps" / str(s) / f"{e}.png"))
        cells_44 = heat_HW3.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3, 4))
        if t >= 1:  # its top token is a patch: the heatmap peaks on that patch's cell
            assert cells_44.argmax() == t - 1, (s, e, t)
            assert cells_44.max() == 255  # the latent's shared scale ends at its top token
    # A crop is exactly the image as the model's transform saw it.
    for e in {int(top["example_idx_SK"][s, 0]) for s in live}:
        x_CHW = transform(SyntheticDataset(N_IMAGES, 0).load(e))
        seen_HW3 = ((x_CHW * 0.5 + 0.5) * 255).permute(1, 2, 0).numpy()
        crop_HW3 = np.asarray(Image.open(out / "images" / f"{e}.png"), dtype=np.float32)
        assert crop_HW3.shape == (32, 32, 3)
        np.testing.assert_allclose(crop_HW3, seen_HW3, atol=0.51)
    page = (out / "latents" / f"{TWO_TOKENS}.html").read_text()
    assert len(page_examples(out, TWO_TOKENS)) <= 2 and "heatmaps/" in page


@pytest.mark.slow
def test_filters_rerender_from_cache_without_activations(
    recorded_shards, crafted_ckpt, rendered, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(rendered, out)
    stats = read_latents(out)
    freq_S, mean_S = stats["freq"], stats["mean_when_firing"]
    live = np.flatnonzero(freq_S > 0)
    lf_S = np.log10(np.where(freq_S > 0, freq_S, 1))
    lv_S = np.log10(np.where(mean_S > 0, mean_S, 1))
    lo_f, hi_f = np.quantile(lf_S[live], [0.2, 0.9])
    lo_v, hi_v = np.quantile(lv_S[live], [0.1, 0.8])
    inside = [s for s in live if lo_f <= lf_S[s] <= hi_f and lo_v <= lv_S[s] <= hi_v]
    assert 4 <= len(inside) < len(live)
    # Without the activation files a pass is impossible: anything that read them would fail.
    acts = sorted(recorded_shards.glob("acts*.bin"))
    for p in acts:
        p.rename(p.with_name("moved-" + p.name))
    try:
        base = [f"ckpt={crafted_ckpt}", f"out={out}", "top_k=6", "n_images=2"]
        ranges = [f"log_freq_range=[{lo_f},{hi_f}]", f"log_value_range=[{lo_v},{hi_v}]"]
        by_value = base + ranges + ["sort=value", "n_latents=3", f"include_latents=[{DEAD}]"]
        assert last_line(run("visualize.py", *by_value, "heatmap.colormap=viridis")) == out
        expected = [DEAD] + sorted(inside, key=lambda s: -mean_S[s])[:3]
        assert table_ids(out) == expected
        assert (
            page_examples(out, DEAD) == []
            and "never fired" in (out / "latents" / f"{DEAD}.html").read_text()
        )
        assert sorted(int(p.stem) for p in (out / "latents").glob("*.html")) == sorted(expected)
        assert len(page_examples(out, expected[1])) <= 2
        last_line(run("visualize.py", *base, *ranges, "sort=frequency", "n_latents=100"))
        assert table_ids(out) == sorted(inside, key=lambda s: -freq_S[s])
        last_line(run("visualize.py", *base, "sort=random", "seed=3", "n_latents=5"))
        assert table_ids(out) == [int(s) for s in np.random.default_rng(3).permutation(live)[:5]]
        only = run("visualize.py", *base, "n_latents=0", "include_latents=[5,3]")
        last_line(only)
        assert table_ids(out) == [5, 3]
    finally:
        for p in acts:
            p.with_name("moved-" + p.name).rename(p)
    # force=true recomputes the pass (reading the activations again); render=false stops there.
    before = (out / "cache" / "pass.npz").stat().st_mtime_ns
    evaluated = last_line(run("visualize.py", *base, "force=true", "render=false"))
    assert evaluated == out and (out / "cache" / "pass.npz").stat().st_mtime_ns > before
    assert not (out / "cache" / "heat").exists()  # heatmaps of the old pass are dropped
    metrics = json.loads((out / "metrics.json").read_text())
    # The same numbers up to rounding, not to the bit: this pass cuts batches of the default size
    # (the first one's were 50), so its float32 products and the order of its float64 sums
    # differ, as they do with the thread count, CPU or GPU. Re-renders read the cached numbers.
    want = json.loads((rendered / "metrics.json").read_text())
    assert metrics.keys() == want.keys()
    for k, v in want.items():
        assert metrics[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k
    fresh = tmp_path / "eval"
    last_line(run("visualize.py", f"ckpt={crafted_ckpt}", f"out={fresh}", "render=false"))
    assert sorted(p.name for p in fresh.iterdir()) == ["cache", "latents.csv", "metrics.json"]


@pytest.mark.slow
def test_cls_tokens_show_plain_images_and_patch_labels(recorded_shards, crafted_ckpt, tmp_path):
    # A copy of the shards with per-patch labels (as ADE20K recordings carry): label = 10 + patch.
    shards_copy = tmp_path / "shards"
    shutil.copytree(recorded_shards, shards_copy)
    labels_NP = np.tile(np.arange(10, 26, dtype=np.uint8), (N_IMAGES, 1))
    labels_NP.tofile(shards_copy / "labels.bin")
    out = tmp_path / "out"
    common = [f"ckpt={crafted_ckpt}", f"data.shard_root={shards_copy}", "top_k=6", "n_latents=1000"]
    last_line(run("visualize.py", *common, f"out={out}", "data.tokens=patches"))
    top = np.load(out / "cache" / "pass.npz")
    assert (top["token_idx_SK"][top["example_idx_SK"] >= 0] >= 1).all()  # patches only
    for s in table_ids(out):
        toks = top["token_idx_SK"][s][top["example_idx_SK"][s] >= 0]
        counts = {}
        for t in toks:
            counts[int(t) + 9] = counts.get(int(t) + 9, 0) + 1
        text = (out / "latents" / f"{s}.html").read_text()
        shown = re.findall(r'<span class="label">(\d+)</span> \((\d+)\)', text)
        assert {int(a): int(b) for a, b in shown} == counts

    cls_out = tmp_path / "cls"
    last_line(run("visualize.py", *common, f"out={cls_out}", "data.tokens=cls"))
    top = np.load(cls_out / "cache" / "pass.npz")
    assert (top["token_idx_SK"][top["example_idx_SK"] >= 0] == 0).all()
    assert not any((cls_out / "heatmaps").rglob("*.png"))
    s = table_ids(cls_out)[0]
    tops = [int(e) for e in top["example_idx_SK"][s] if e >= 0]
    assert page_examples(cls_out, s) == list(dict.fromkeys(tops))[:25]
    assert 'class="heatmap"' not in (cls_out / "latents" / f"{s}.html").read_text()


@pytest.mark.slow
def test_image_folder_moved_and_missing_images(tmp_path):
    from saev.record.images import SyntheticDataset

    photos = tmp_path / "photos"
    for i in range(6):
        (photos / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        SyntheticDataset(6, 1).load(i).resize((40, 48)).save(photos / f"c{i % 2}" / f"{i}.png")
    shards_dir = last_line(
        run("record.py", "data=image_folder", f"data.root={photos}", "n_workers=0",
            f"dump_to={tmp_path / 'shards'}", cwd=tmp_path)
    )  # fmt: skip
    x_ND, _, _ = all_tokens(shards_dir, "patches")
    crafted_ckpt = crafted_sae(x_ND, d_sae=8).save(tmp_path / "sae")
    moved = tmp_path / "moved"
    photos.rename(moved)
    args = [f"ckpt={crafted_ckpt}", f"data.shard_root={shards_dir}", "data.layer=-1", "top_k=4"]
    err = one_line_error(run("visualize.py", *args))
    out = last_line(run("visualize.py", *args, f"data.root={moved}"))
    pages = lambda: list((out / "latents").glob("*.html"))  # noqa: E731
    shown = sorted({e for p in pages() for e in page_examples(out, p.stem)})
    assert sorted(int(p.stem) for p in (out / "images").glob("*.png")) == shown
    assert len(shown) >= 3
    records = [json.loads(x) for x in (shards_dir / "examples.jsonl").read_text().splitlines()]
    # The error names the first image it looked for, where metadata.json said it would be.
    assert f"image {photos / records[shown[0]]['path']} (example {shown[0]})" in err
    assert "data.root=" in err
    # Non-square photos (40x48): resized on the short side and center-cropped as the model did.
    from saev.record import vit
    from saev.record.config import ModelConfig

    transform = vit.load(ModelConfig()).transform
    seen = transform(Image.open(moved / records[shown[0]]["path"]).convert("RGB"))
    seen_HW3 = ((seen * 0.5 + 0.5) * 255).permute(1, 2, 0).numpy()
    crop_HW3 = np.asarray(Image.open(out / "images" / f"{shown[0]}.png"), dtype=np.float32)
    np.testing.assert_allclose(crop_HW3, seen_HW3, atol=0.51)
    shutil.rmtree(out / "images")
    victim = shown[1]
    (moved / records[victim]["path"]).unlink()
    res = run("visualize.py", *args, f"data.root={moved}", "skip_missing_images=true")
    assert last_line(res) == out and "skipped 1 missing images" in res.stdout
    kept = sorted(int(p.stem) for p in (out / "images").glob("*.png"))
    assert kept == [e for e in shown if e != victim]
    assert victim not in {e for p in pages() for e in page_examples(out, p.stem)}


def fake_sae(dir_: pathlib.Path, train: dict, metrics: dict, activation="topk"):
    dir_.mkdir(parents=True)
    (dir_ / "config.json").write_text(json.dumps({"sae": {"activation": activation}, **train}))
    (dir_ / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.slow
def test_sweep_pareto(tmp_path):
    sweep = tmp_path / "sweep"
    # l0, nmse: a, b and d are on the front; c is dominated by b.
    saes = {
        "0/run0/a": (4.0, 0.5, {"lr": 1e-3, "sae": {"k": 4}}, "val"),
        "0/run0/b": (8.0, 0.3, {"lr": 1e-3, "sae": {"k": 8}}, "val"),
        "1/run1/c": (9.0, 0.4, {"lr": 3e-4, "sae": {"k": 8}}, "val"),
        "1/run1/d": (16.0, 0.1, {"lr": 3e-4, "sae": {"k": 16}}, "train"),  # no val: train used
    }
    for name, (l0, nmse, train, split) in saes.items():
        metrics = {"step": 10, split: {"l0": l0, "nmse": nmse}}
        if split == "val":
            metrics["train"] = {"l0": 99.0, "nmse": 9.0}
        train = {**train, "name": name[-1], "run_id": name.split("/")[1], "n_train": 100}
        fake_sae(sweep / name, {"train": train, "run_id": train["run_id"]}, metrics)
    (sweep / "0/run0/b/visuals").mkdir()
    (sweep / "0/run0/b/visuals/index.html").write_text("<html></html>")
    (sweep / "summary.csv").write_text("name\n")
    assert last_line(run("visualize.py", f"sweep={sweep}")) == sweep
    with open(sweep / "pareto.csv") as fd:
        rows = {r["name"]: r for r in csv.DictReader(fd)}
    assert set(rows) == set(saes)
    base = ["name", "kind", "l0", "nmse", "on_front", "split"]
    assert list(next(iter(rows.values())))[:6] == base
    assert {n for n, r in rows.items() if r["on_front"] == "True"} == {
        "0/run0/a",
        "0/run0/b",
        "1/run1/d",
    }
    assert rows["1/run1/d"]["split"] == "train" and float(rows["1/run1/d"]["nmse"]) == 0.1
    assert float(rows["0/run0/a"]["l0"]) == 4.0 and rows["0/run0/a"]["kind"] == "topk"
    # Swept settings: what differs across the SAEs (not name/run_id, not the shared n_train).
    assert set(rows["0/run0/a"]) == {*base, "lr", "sae.k", "browser"}
    assert rows["0/run0/b"]["browser"] == "0/run0/b/visuals/index.html"
    assert rows["0/run0/a"]["browser"] == ""
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (sweep / "pareto.svg").read_text()
    assert 'href="0/run0/b/visuals/index.html"' in svg and "k=16" in svg


def test_wandb_runs_map_to_points(tmp_path, monkeypatch):
    """The W&B path on stubbed runs (the real API needs the network): what training logs (`val/l0`,
    `val/nmse`, TrainConfig as config) becomes the same points and CSV as local files."""
    from saev.visualize import pareto
    from saev.visualize.config import VisualizeConfig, WandbSource

    def stub(name, summary, config):
        return types.SimpleNamespace(name=name, summary=summary, config=config)

    runs = [
        stub("r/a", {"val/l0": 4, "val/nmse": 0.5, "train/l0": 1, "train/nmse": 9},
             {"lr": 1e-3, "sae": {"activation": "relu", "matryoshka": [0.5]}, "name": "a",
              "_wandb": {"runtime": 3}}),
        stub("r/b", {"train/l0": 8, "train/nmse": 0.6},
             {"lr": 3e-4, "sae": {"activation": "topk", "matryoshka": []}, "name": "b"}),
        stub("r/c", {"loss": 1.0}, {"lr": 1e-4}),  # never logged metrics: left out
    ]  # fmt: skip
    asked = []
    monkeypatch.setattr(pareto, "wandb_runs", lambda p, e: asked.append((p, e)) or runs)
    cfg = VisualizeConfig(out=str(tmp_path), wandb=WandbSource(project="saev", entity="me"))
    assert pareto.main(cfg) == tmp_path and asked == [("saev", "me")]
    with open(tmp_path / "pareto.csv") as fd:
        rows = {r["name"]: r for r in csv.DictReader(fd)}
    assert set(rows) == {"r/a", "r/b"}
    assert (rows["r/a"]["kind"], rows["r/a"]["split"], rows["r/a"]["l0"]) == (
        "matryoshka-relu", "val", "4",
    )  # fmt: skip
    assert (rows["r/b"]["kind"], rows["r/b"]["split"], rows["r/b"]["nmse"]) == (
        "topk",
        "train",
        "0.6",
    )
    assert (rows["r/a"]["on_front"], rows["r/b"]["on_front"]) == (
        "True",
        "False",
    )  # b: more of both
    # lr is swept; sae.activation only follows the kind (the legend shows it), so it is no column.
    assert rows["r/a"]["lr"] == "0.001" and "sae.activation" not in rows["r/a"]
    assert not any(k.startswith("_wandb") for k in rows["r/a"])


def test_crop_steps_are_the_models_transform():
    from saev.record import crops, vit
    from saev.record.config import ModelConfig
    from saev.record.images import SyntheticDataset

    transform = vit.load(ModelConfig()).transform
    steps = crops.describe(transform)
    assert [s["op"] for s in steps] == ["resize", "center_crop"]
    assert crops.fallback_steps({"family": "tiny", "ckpt": ModelConfig().ckpt}) == steps
    img = SyntheticDataset(4, 0).load(1)
    seen = ((transform(img) * 0.5 + 0.5) * 255).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(crops.reproduce(img, steps), np.float32), seen, atol=0.51)


def test_metadata_without_transform_reads_and_writes_as_before():
    from saev import shards

    md = shards.Metadata(
        model={"family": "x", "ckpt": "y"}, layers=(0,), cls_token=False,
        n_patches_per_example=4, d_model=8, dtype="float32", n_examples=1,
        examples_per_shard=1, data={"name": "z"},
    )  # fmt: skip
    assert "transform" not in md.to_json()
    assert shards.Metadata.from_json(md.to_json()) == md
    steps = [{"op": "center_crop", "size": [2, 2]}]
    with_steps = shards.Metadata(**{**md.__dict__, "transform": steps})
    assert shards.Metadata.from_json(with_steps.to_json()).transform == steps
    assert with_steps.content_hash() == md.content_hash()  # same directory as before


@pytest.mark.slow
def test_bad_ckpt_and_bad_settings_are_one_line(tmp_path, crafted_ckpt):
    err = one_line_error(run("visualize.py", f"ckpt={tmp_path / 'nothing'}"))
    assert "config.json" in err
    err = one_line_error(run("visualize.py", f"ckpt={crafted_ckpt}", "sort=size"))
    assert "sort=" in err
    err = one_line_error(run("visualize.py", f"ckpt={crafted_ckpt}", f"sweep={tmp_path}"))
    assert "ckpt=" in err
    err = one_line_error(run("visualize.py", f"sweep={tmp_path}"))
    assert "no SAE" in err


@pytest.mark.gpu
def test_pass_on_cuda_equals_cpu():
    from saev.visualize import statistics as visuals

    torch.manual_seed(0)
    sae = crafted_sae(torch.randn(500, D), d_sae=48)
    batches = [
        {"act": torch.randn(100, D), "example_idx": torch.arange(100) // 10 + 10 * i,
         "token_idx": torch.arange(100) % 10}
        for i in range(5)
    ]  # fmt: skip
    cpu, cpu_metrics = visuals.summarize(sae, batches, 8, torch.device("cpu"))
    gpu, gpu_metrics = visuals.summarize(sae.cuda(), batches, 8, torch.device("cuda"))
    for field in ("count_S", "example_idx_SK", "token_idx_SK"):
        np.testing.assert_array_equal(getattr(gpu, field), getattr(cpu, field))
    np.testing.assert_allclose(gpu.values_SK, cpu.values_SK, rtol=1e-4, atol=1e-5)
    for k, v in cpu_metrics.items():
        assert gpu_metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_trained_sweep_visualize_and_pareto(recorded_shards, tmp_path):
    """Real train.py output: visualize finds shards, layer and tokens in config.json, writes to
    <ckpt>/visuals, and the sweep plot links that SAE's browser."""
    runs = tmp_path / "runs"
    args = [
        f"data.shard_root={recorded_shards}", "data.layer=-1", "data.batch_size=64",
        "data.val_fraction=0.125", "data.buffer_mb=4", "data.n_workers=0", "n_train=320",
        f"runs_root={runs}", "sae=topk", "sae.exp_factor=2", "lr_warmup_steps=1", "log_every=1",
        "wandb.enabled=false", "sweep={sae.k: [4, 16]}",
    ]  # fmt: skip
    run_dir = last_line(run("train.py", *args))
    saes = sorted(p.parent for p in run_dir.glob("*/sae.safetensors"))
    assert len(saes) == 2
    # Swept SAE names hold '=' (00-topk-k=4): Hydra needs the value quoted.
    out = last_line(run("visualize.py", f"ckpt='{saes[0]}'", "top_k=8", "n_latents=5"))
    assert out == saes[0] / "visuals"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["shard_root"], metrics["layer"], metrics["tokens"]) == (
        str(recorded_shards), -1, "patches",
    )  # fmt: skip
    assert metrics["n_tokens"] == N_IMAGES * (N_TOKENS - 1) and len(table_ids(out)) == 5
    assert last_line(run("visualize.py", f"sweep={runs}")) == runs
    with open(runs / "pareto.csv") as fd:
        rows = {r["name"]: r for r in csv.DictReader(fd)}
    names = [str(p.relative_to(runs)) for p in saes]
    assert sorted(rows) == names and [rows[n]["sae.k"] for n in names] == ["4", "16"]
    assert rows[names[0]]["browser"] == f"{names[0]}/visuals/index.html"
    assert rows[names[1]]["browser"] == "" and {r["split"] for r in rows.values()} == {"val"}
    for n in names:
        logged = json.loads((runs / n / "metrics.json").read_text())["val"]
        assert float(rows[n]["l0"]) == pytest.approx(logged["l0"], rel=1e-5)

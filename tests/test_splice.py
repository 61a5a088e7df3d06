"""The SAE inside the ViT: the Python hook on a random-weight model of every family, and
`visualize.py ... splice=true` on a tiny recording whose weights file has a classifier head,
checked against a plain implementation (one full forward per variant, a forward hook each)."""

import csv
import json
import pathlib
import shutil

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers.visualize import last_line, one_line_error, run

from saev import nn
from saev.data.loaders import OrderedLoader
from saev.record import vit as vitlib
from saev.record.config import ModelConfig
from saev.visualize import render, splice

TINY = "img32-patch8-dim64-depth4-heads4-reg2"
LAYER, N_IMAGES, N_CLASSES = 1, 40, 10
FAMILIES = [
    ("tiny", TINY),
    ("timm", "vit_tiny_patch16_224"),
    ("clip", "ViT-B-32"),  # open_clip's own VisionTransformer
    ("siglip", "ViT-B-16-SigLIP"),  # open_clip over a timm trunk; no CLS token
    ("dinov2", "vit_small_patch14_reg4_dinov2"),  # 4 registers
    ("dinov3", "vit_small_patch16_dinov3"),  # 4 storage tokens, rotary embeddings
]


def random_sae(d_model: int, d_sae: int = 128, seed: int = 0) -> nn.SAE:
    cfg = nn.SAEConfig(
        activation="topk", k=8, aux_k=0, aux_coeff=0.0, d_model=d_model, d_sae=d_sae,
        dead_after_tokens=10**6,
    )  # fmt: skip
    return nn.SAE(cfg, seed=seed).eval()


def block_output(vit, layer: int, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
    """The model's output embedding, after recording block `layer`'s output [B, T, D] (as the
    blocks above see it, hooks before this one included)."""
    seen = []

    def hook(module, args, output):
        acts = output[0] if isinstance(output, tuple) else output
        seen.append(acts if vit.batch_first else acts.transpose(0, 1))

    handle = vit.blocks[layer].register_forward_hook(hook)
    try:
        emb_BE, _ = vit.output(x_BCHW)
    finally:
        handle.remove()
    return [emb_BE, seen[0]]


@pytest.mark.parametrize(("family", "ckpt"), FAMILIES, ids=[f for f, _ in FAMILIES])
@torch.inference_mode()
def test_the_splice_replaces_only_the_sae_tokens_and_with_its_error_is_the_model(family, ckpt):
    vit = vitlib.load(ModelConfig(family=family, ckpt=ckpt, seed=3), head=True)
    layer = len(vit.blocks) // 2
    torch.manual_seed(0)
    x = torch.randn(2, 3, *vit.img_size)
    clean_BE, h_BTD = block_output(vit, layer, x)
    sae = random_sae(vit.d_model)
    sae.set_norm(h_BTD.reshape(-1, vit.d_model).mean(0), 1.0 / float(h_BTD.norm(dim=-1).mean()))
    with splice.spliced(vit, sae, layer, "patches", add_error=True):
        same_BE, _ = block_output(vit, layer, x)
    assert F.cosine_similarity(clean_BE, same_BE).min() > 1 - 1e-5
    tokens = "all" if vit.has_cls else "patches"
    with splice.spliced(vit, sae, layer, tokens):
        spliced_BE, new_BTD = block_output(vit, layer, x)
    sae_T = splice.positions(vit, tokens)
    other_T = torch.ones(h_BTD.shape[1], dtype=torch.bool)
    other_T[sae_T] = False
    # Registers (and anything else the SAE was not trained on) pass through bit for bit.
    assert other_T.sum() == vit.n_prefix_tokens - int(vit.has_cls)
    assert torch.equal(new_BTD[:, other_T], h_BTD[:, other_T])
    expected = sae.decode(sae.encode(h_BTD[:, sae_T].reshape(-1, vit.d_model)))
    torch.testing.assert_close(new_BTD[:, sae_T].reshape(-1, vit.d_model), expected)
    assert F.cosine_similarity(clean_BE, spliced_BE).max() < 1 - 1e-4  # the SAE is not exact


@torch.inference_mode()
def test_an_edit_that_returns_its_input_changes_nothing_and_zeroing_changes_only_that_latent():
    vit = vitlib.load(ModelConfig(ckpt=TINY, seed=3))
    x = torch.randn(3, 3, 32, 32)
    _, h_BTD = block_output(vit, LAYER, x)
    sae = random_sae(vit.d_model)
    with splice.spliced(vit, sae, LAYER):
        plain_BE, plain_BTD = block_output(vit, LAYER, x)
    with splice.spliced(vit, sae, LAYER, edit=lambda f: f):
        same_BE, same_BTD = block_output(vit, LAYER, x)
    assert torch.equal(plain_BE, same_BE) and torch.equal(plain_BTD, same_BTD)
    pos_T = splice.positions(vit, "patches")
    f_NS = sae.encode(h_BTD[:, pos_T].reshape(-1, 64))
    latent = int(f_NS.count_nonzero(0).argmax())
    with splice.spliced(vit, sae, LAYER, add_error=True, edit=splice.zero([latent])):
        _, zeroed_BTD = block_output(vit, LAYER, x)
    # Zeroing one latent with the error kept moves each token by exactly its decoder row.
    moved_ND = h_BTD[:, pos_T].reshape(-1, 64) - zeroed_BTD[:, pos_T].reshape(-1, 64)
    row_D = sae.W_dec[latent] / sae.norm_scale
    torch.testing.assert_close(moved_ND, f_NS[:, latent, None] * row_D, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="the SAE takes d_model=32"):
        splice.spliced(vit, random_sae(32), LAYER)


# -- visualize.py splice=true on a recording -----------------------------------------------------


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A tiny ViT recorded at block 1 from a weights file that carries a 10-class head."""
    work = tmp_path_factory.mktemp("splice")
    torch.manual_seed(1)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
        depth=4, num_heads=4, reg_tokens=2, num_classes=N_CLASSES,
    )  # fmt: skip
    weights = work / "weights.pt"
    torch.save(model.state_dict(), weights)
    args = [f"model.ckpt={TINY}", f"model.weights={weights}", f"layers=[{LAYER}]"]
    args += [f"data.n_images={N_IMAGES}", "n_workers=0", f"dump_to={work}"]
    return last_line(run("record.py", *args, cwd=work)), weights


def recorded_patches(shards: pathlib.Path) -> torch.Tensor:
    return torch.cat(
        [b["act"] for b in OrderedLoader(shards, LAYER, 10**6, "patches", n_workers=0)]
    )


def save(sae: nn.SAE, path: pathlib.Path, shards: pathlib.Path) -> pathlib.Path:
    train = {"data": {"shard_root": str(shards), "layer": LAYER, "tokens": "patches"}}
    return sae.save(path, {"train": train})


@pytest.fixture(scope="module")
def trained(recording, tmp_path_factory) -> pathlib.Path:
    """A TopK SAE trained briefly on the recorded patches: good, but not exact."""
    shards, _ = recording
    x_ND = recorded_patches(shards)
    torch.manual_seed(0)
    sae = random_sae(64, 256)
    mu_D = x_ND.mean(0)
    sae.set_norm(mu_D, float((64 / (x_ND - mu_D).pow(2).sum(-1).mean()) ** 0.5))
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), 3e-3)
    for _ in range(200):
        out = sae(x_ND[torch.randint(len(x_ND), (256,))])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return save(sae.eval(), tmp_path_factory.mktemp("trained") / "sae", shards)


def spliced_metrics(ckpt: pathlib.Path, out: pathlib.Path, *args) -> dict:
    res = run("visualize.py", f"ckpt={ckpt}", f"out={out}", "splice=true", *args)
    assert last_line(res) == out
    return json.loads((out / "metrics.json").read_text())["splice"]


@torch.inference_mode()
def plain_figures(shards: pathlib.Path, ckpt: pathlib.Path) -> dict:
    """The spliced evaluation without sharing anything: a full forward per variant, each with
    its own forward hook, on every recorded image, one image at a time."""
    vit = splice.load_vit(shards)
    sae = nn.load(ckpt)
    mean_D = recorded_patches(shards).mean(0)
    recorded = render.RecordedExamples(shards, LAYER)
    images = render.Images(recorded, None, skip_missing=False)
    p = vit.n_prefix_tokens

    def run_with(replace, x):
        def hook(module, args, output):
            out = output.clone()
            out[:, p:] = replace(output[:, p:])
            return out

        handle = vit.blocks[LAYER].register_forward_hook(hook)
        try:
            return vit.output(x)
        finally:
            handle.remove()

    def with_error(t):
        x_hat = sae.decode(sae.encode(t[0]))[None]
        return x_hat + (t - x_hat)

    sums = dict.fromkeys(["cos", "cos_with_error", "cos_mean_ablation", "top1", "kl"], 0.0)
    for e in range(N_IMAGES):
        x = vit.transform(images.image(e))[None]
        emb, logits = vit.output(x)
        sp_emb, sp_logits = run_with(lambda t: sae.decode(sae.encode(t[0]))[None], x)
        err_emb, _ = run_with(with_error, x)
        ab_emb, _ = run_with(lambda t: mean_D.expand_as(t), x)
        sums["cos"] += float(F.cosine_similarity(emb, sp_emb))
        sums["cos_with_error"] += float(F.cosine_similarity(emb, err_emb))
        sums["cos_mean_ablation"] += float(F.cosine_similarity(emb, ab_emb))
        sums["top1"] += float(logits.argmax() == sp_logits.argmax())
        p_C, q_C = logits.log_softmax(-1), sp_logits.log_softmax(-1)
        sums["kl"] += float((p_C.exp() * (p_C - q_C)).sum())
    return {k: v / N_IMAGES for k, v in sums.items()}


def test_the_spliced_evaluation_equals_a_plain_one_and_lies_between_ablation_and_the_model(
    recording, trained, tmp_path
):
    shards, _ = recording
    got = spliced_metrics(trained, tmp_path / "out", "render=false", "splice.batch_size=16")
    assert got["n_images"] == N_IMAGES  # splice.n_images (1024) is more than were recorded
    assert abs(got["cos_with_error"] - 1) < 1e-5
    assert got["cos_mean_ablation"] < got["cos"] < 1
    assert 0 < got["recovered"] < 1
    want = plain_figures(shards, trained)
    for key in ("cos", "cos_with_error", "cos_mean_ablation", "kl"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert got["top1_agreement"] == pytest.approx(want["top1"])
    assert 0 <= got["top1_agreement_mean_ablation"] <= 1 and got["kl_mean_ablation"] > got["kl"]
    expected = (got["cos"] - got["cos_mean_ablation"]) / (1 - got["cos_mean_ablation"])
    assert got["recovered"] == pytest.approx(expected)


def test_an_sae_that_outputs_the_mean_reproduces_mean_ablation(recording, tmp_path):
    shards, _ = recording
    sae = random_sae(64)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(recorded_patches(shards).mean(0))  # normalization is the identity here
    ckpt = save(sae, tmp_path / "mean", shards)
    got = spliced_metrics(ckpt, tmp_path / "out", "render=false")
    assert got["cos"] == pytest.approx(got["cos_mean_ablation"], abs=1e-6)
    assert got["kl"] == pytest.approx(got["kl_mean_ablation"], abs=1e-6)
    assert got["top1_agreement"] == got["top1_agreement_mean_ablation"]
    assert abs(got["recovered"]) < 1e-5


def test_zeroing_each_shown_latent_is_measured_cached_and_browsable(recording, trained, tmp_path):
    shards, weights = recording
    out = tmp_path / "out"
    args = ["n_latents=3", "splice.intervention_images=3", "n_images=3"]
    spliced_metrics(trained, out, *args)
    rows = [r.split(",") for r in (out / "latents.csv").read_text().splitlines()]
    assert rows[0][4:] == ["zero_drop", "zero_drop_baseline", "baseline_latent"]
    shown = {int(r[0]): r for r in rows[1:] if r[4]}
    assert len(shown) == 3 and all(float(r[4]) > 0 and r[5] and r[6] for r in shown.values())
    index = (out / "index.html").read_text()
    assert '<th data-key="drop">zero drop</th>' in index and "recovered" in index
    latent = min(shown)
    page = (out / "latents" / f"{latent}.html").read_text()
    assert 'id="effect">Zeroing this latent' in page
    examples = [int(s.split('"')[0]) for s in page.split('data-example="')[1:]]
    assert float(shown[latent][4]) == pytest.approx(
        plain_zero_drop(shards, trained, latent, examples), abs=1e-5
    )

    # Re-rendering takes the model's results from the cache: it builds no model (the weights
    # file is unreadable meanwhile) and gives the same numbers.
    saved = weights.read_bytes()
    weights.write_bytes(b"not weights")
    try:
        spliced_metrics(trained, out, *args, "heatmap.opacity=0.3")
    finally:
        weights.write_bytes(saved)
    again = [r.split(",") for r in (out / "latents.csv").read_text().splitlines()]
    assert again == rows


@torch.inference_mode()
def plain_zero_drop(shards, ckpt, latent: int, examples: list[int]) -> float:
    """Mean 1 - cos(clean, latent zeroed) over `examples`, each its own two forwards; the token
    moves by the latent's activation times its (denormalized) decoder row."""
    vit, sae = splice.load_vit(shards), nn.load(ckpt)
    images = render.Images(render.RecordedExamples(shards, LAYER), None, skip_missing=False)
    p = vit.n_prefix_tokens

    def hook(module, args, output):
        out = output.clone()
        f_TS = sae.encode(output[0, p:])
        out[0, p:] -= f_TS[:, latent, None] * sae.W_dec[latent] / sae.norm_scale
        return out

    drops = []
    for e in examples:
        x = vit.transform(images.image(e))[None]
        clean, _ = vit.output(x)
        handle = vit.blocks[LAYER].register_forward_hook(hook)
        zeroed, _ = vit.output(x)
        handle.remove()
        drops.append(1 - float(F.cosine_similarity(clean, zeroed)))
    return float(np.mean(drops))


def test_what_cannot_be_spliced_is_one_line_and_writes_nothing(recording, trained, tmp_path):
    shards, _ = recording

    def edited_copy(name: str, **model) -> pathlib.Path:
        copy = tmp_path / name
        shutil.copytree(shards, copy)
        md = json.loads((copy / "metadata.json").read_text())
        md["model"].update(model)
        (copy / "metadata.json").write_text(json.dumps(md))
        return copy

    cases = [
        (edited_copy("gone", weights="/nowhere/w.pt"), "weights file /nowhere/w.pt is gone"),
        (edited_copy("family", family="resnet"), "cannot rebuild the recording's model"),
    ]
    for root, fragment in cases:
        out = tmp_path / f"out-{root.name}"
        res = run("visualize.py", f"ckpt={trained}", f"out={out}", "splice=true",
                  f"data.shard_root={root}", f"data.layer={LAYER}")  # fmt: skip
        assert fragment in one_line_error(res) and not out.exists()
    narrow = save(random_sae(32), tmp_path / "narrow", shards)
    res = run("visualize.py", f"ckpt={narrow}", f"out={tmp_path / 'o'}", "splice=true")
    assert "the SAE takes d_model=32" in one_line_error(res) and not (tmp_path / "o").exists()
    res = run("visualize.py", f"ckpt={trained}", f"out={tmp_path / 'o'}", "splice=maybe")
    assert "splice=true or splice=false" in one_line_error(res)


def test_missing_images_are_named_and_moved_images_found_with_data_root(tmp_path):
    from PIL import Image

    root = tmp_path / "photos"
    for i in range(6):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / f"class{i % 2}/{i}.png")
    args = ["data=image_folder", f"data.root={root}", f"model.ckpt={TINY}", f"layers=[{LAYER}]"]
    shards = last_line(run("record.py", *args, "n_workers=0", f"dump_to={tmp_path}", cwd=tmp_path))
    ckpt = save(random_sae(64), tmp_path / "sae", shards)
    moved = tmp_path / "moved"
    root.rename(moved)
    out = tmp_path / "out"
    res = run("visualize.py", f"ckpt={ckpt}", f"out={out}", "splice=true", "render=false")
    assert "does not exist; set data.root=" in one_line_error(res) and not out.exists()
    figures = spliced_metrics(ckpt, out, "render=false", f"data.root={moved}")
    assert figures["n_images"] == 6 and "top1_agreement" not in figures  # headless model


def test_a_sweep_with_splice_plots_l0_against_recovered(recording, trained, tmp_path):
    shards, _ = recording
    sweep = tmp_path / "sweep"
    mean = random_sae(64)
    with torch.no_grad():
        mean.W_dec.zero_()
        mean.b_dec.copy_(recorded_patches(shards).mean(0))
    shutil.copytree(trained, sweep / "job-0" / "good")
    save(mean, sweep / "job-0" / "mean", shards)
    for name, l0 in (("good", 8.0), ("mean", 1.0)):
        metrics = {"val": {"l0": l0, "nmse": 0.1 if name == "good" else 1.0}}
        (sweep / "job-0" / name / "metrics.json").write_text(json.dumps(metrics))
    res = run("visualize.py", f"sweep={sweep}", "splice=true")
    assert last_line(res) == sweep and (sweep / "pareto.png").is_file()
    rows = {r["name"]: r for r in csv.DictReader(open(sweep / "pareto.csv"))}
    assert float(rows["job-0/mean"]["recovered"]) == pytest.approx(0, abs=1e-5)
    assert 0 < float(rows["job-0/good"]["recovered"]) < 1
    cached = json.loads(
        (sweep / "job-0" / "good" / "visuals" / "cache" / "splice.json").read_text()
    )
    assert cached["splice"]["n_images"] == N_IMAGES
    assert float(rows["job-0/good"]["cos"]) == pytest.approx(cached["splice"]["cos"], abs=1e-6)


def test_recovered_is_undefined_where_mean_ablation_changes_nothing():
    from saev.visualize import faithfulness

    assert faithfulness.recovered(0.95, 0.8) == pytest.approx(0.75)
    assert faithfulness.recovered(1.0, 1.0) is None  # the SAE's tokens never reach the output

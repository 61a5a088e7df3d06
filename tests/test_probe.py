"""Label probes (`visualize.py probe=true`): AP from bounded histograms against scikit-learn, a
synthetic case with a known answer, an ADE20K-shaped recording, image labels, bad input."""

import csv
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch
from helpers.train import common, run_api
from helpers.visualize import crafted_sae, last_line, one_line_error, run
from sklearn.metrics import average_precision_score, precision_recall_curve

from saev import nn, synthetic
from saev.data.loaders import OrderedLoader
from saev.visualize import ap

SKIMAGE = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse"]


def test_histogram_ap_is_sklearn_ap_of_binned_scores_and_bounds_the_true_ap():
    rng = np.random.default_rng(0)
    N, F, L = 3000, 6, 4
    scores_NF = rng.exponential(1.0, (N, F)).astype(np.float32) * (rng.random((N, F)) < 0.4)
    scores_NF[:, 0] = np.round(scores_NF[:, 0], 1)  # true ties
    labels_N = rng.integers(0, L, N)
    scores_NF[:, 1] += (labels_N == 2) * 2.0
    scores_NF[:, 2] = 0.0  # never fires: one tie, AP = prevalence
    scores_NF[:, 3] *= 1e6  # scale-free
    classes = torch.tensor([1, 2, 3])
    for n_bins in (12, 40):
        m = ap.mantissa_bits(n_bins)
        h = ap.Histogram(F, L, n_bins, m, "cpu")
        order = rng.permutation(N)  # counts do not depend on the order of arrival
        for s in range(0, N, 97):
            rows = order[s : s + 97]
            h.add(torch.tensor(scores_NF[rows]), torch.tensor(labels_N[rows]))
        ap_FC = ap.average_precision(h.count_FBL, h.n_L, classes, chunk=4)
        for f in range(F):
            q_N = ap.quantize(scores_NF[:, f], n_bins, m)
            pos_GC, all_G = (x[0] for x in ap.curves(h.count_FBL[f : f + 1], h.n_L, classes))
            for j, c in enumerate(classes.tolist()):
                y = labels_N == c
                assert ap_FC[f, j] == pytest.approx(average_precision_score(y, q_N), abs=1e-6)
                lo, hi = ap.bounds(pos_GC[:, j], all_G)
                true = average_precision_score(y, scores_NF[:, f])
                assert lo - 1e-9 <= true <= hi + 1e-9 and lo - 1e-9 <= ap_FC[f, j] <= hi + 1e-6
                f1, _ = ap.best_f1(pos_GC[:, j], all_G)
                assert f1 == pytest.approx(best_f1(y, q_N), abs=1e-9)
    assert ap_FC[2].tolist() == pytest.approx((np.bincount(labels_N)[1:] / N).tolist())


def best_f1(y, score) -> float:
    p, r, _ = precision_recall_curve(y, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nan_to_num(2 * p * r / (p + r)).max())


def scores_of(sae, shard_root, layer, tokens, batch_size=4096):
    fs, ns, exs, toks = [], [], [], []
    loader = OrderedLoader(str(shard_root), layer, batch_size, tokens, n_workers=0)
    with torch.no_grad(), loader:
        for b in loader:
            fs.append(sae.encode(b["act"]).float())
            xn = sae.normalize(b["act"]).float()
            ns.append(torch.cat([xn.clamp(min=0), (-xn).clamp(min=0)], 1))
            exs.append(b["example_idx"])
            toks.append(b["token_idx"])
    return [torch.cat(x).numpy() for x in (fs, ns, exs, toks)]


def image_max(scores_UF, ex_U):
    ids = np.unique(ex_U)
    return np.stack([scores_UF[ex_U == e].max(0) for e in ids]), ids


def read_csv(out):
    with open(out / "probe.csv") as fd:
        return list(csv.DictReader(fd))


def check_rows(rows, f_UF, n_UF, labels_U, n_bins, m, section):
    """Every number of probe.csv's rows against scikit-learn on the pass's own scores."""
    q = lambda x: ap.quantize(x, n_bins, m)  # noqa: E731
    qf = np.stack([q(f_UF[:, s]) for s in range(f_UF.shape[1])], 1)
    qn = np.stack([q(n_UF[:, j]) for j in range(n_UF.shape[1])], 1)
    d_model = n_UF.shape[1] // 2
    assert len(rows) == section["n_classes"]
    for r in rows:
        y = labels_U == int(r["label"])
        assert int(r["n_positive"]) == y.sum() > 0
        ap_S = np.array([average_precision_score(y, qf[:, s]) for s in range(qf.shape[1])])
        s = int(r["best_latent"])
        assert float(r["ap"]) == pytest.approx(ap_S.max(), rel=1e-5)
        assert ap_S[s] == pytest.approx(ap_S.max(), rel=1e-5)
        true = average_precision_score(y, f_UF[:, s])
        assert float(r["ap_lo"]) - 1e-5 <= true <= float(r["ap_hi"]) + 1e-5
        assert float(r["f1"]) == pytest.approx(best_f1(y, qf[:, s]), rel=1e-5)
        pred = f_UF[:, s] >= np.float32(r["threshold"])
        f1 = 2 * (pred & y).sum() / (pred.sum() + y.sum())
        assert f1 == pytest.approx(float(r["f1"]), rel=1e-4)
        ap_N = np.array([average_precision_score(y, qn[:, j]) for j in range(qn.shape[1])])
        sign, j = r["best_neuron"][0], int(r["best_neuron"][1:])
        jj = j if sign == "+" else j + d_model
        assert float(r["neuron_ap"]) == pytest.approx(ap_N.max(), rel=1e-5)
        assert ap_N[jj] == pytest.approx(ap_N.max(), rel=1e-5)
        true = average_precision_score(y, n_UF[:, jj])
        assert float(r["neuron_ap_lo"]) - 1e-5 <= true <= float(r["neuron_ap_hi"]) + 1e-5
        assert r["latent_wins"] == str(float(r["ap"]) > float(r["neuron_ap"]))
    assert section["map"] == pytest.approx(np.mean([float(r["ap"]) for r in rows]), rel=1e-5)
    neurons = np.mean([float(r["neuron_ap"]) for r in rows])
    assert section["map_neurons"] == pytest.approx(neurons, rel=1e-5)
    assert section["n_latent_wins"] == sum(r["latent_wins"] == "True" for r in rows)


@pytest.mark.slow
def test_synthetic_labels_best_latent_is_the_matching_feature(tmp_path):
    cfg = synthetic.SyntheticConfig(
        d_model=32, n_features=32, active=2, n_examples=1024, n_patches=64,
        examples_per_shard=256, labels=True,
    )  # fmt: skip
    root = synthetic.write(tmp_path / "shards", cfg)
    run_dir = run_api(
        common(root, tmp_path / "runs")
        + ["sae=topk", "sae.k=2", "sae.d_sae=64", "n_train=120000", "data.batch_size=256"]
    )
    ckpt = sorted(p.parent for p in run_dir.rglob("sae.safetensors"))[0]
    sae = nn.load(ckpt, "cpu")
    dict_FD = synthetic.load_dictionary(root)
    assert synthetic.recovery(sae.W_dec, dict_FD)["recovered"] == 1.0
    match_F = (dict_FD @ torch.nn.functional.normalize(sae.W_dec, dim=-1).T).argmax(1)
    out = tmp_path / "vis"
    last_line(run("visualize.py", f"ckpt={ckpt}", "probe=true", "render=false", f"out={out}"))
    rows = read_csv(out)
    section = json.loads((out / "metrics.json").read_text())["probe"]["patch"]
    assert len(rows) == cfg.n_features
    for r in rows:
        assert int(r["best_latent"]) == int(match_F[int(r["label"]) - 1]), r
        assert float(r["ap"]) >= 0.9
    assert section["n_latent_wins"] > cfg.n_features / 2
    f_UF, n_UF, ex_U, tok_U = scores_of(sae, root, 0, "patches")
    labels_NP = np.fromfile(root / "labels.bin", np.uint8).reshape(cfg.n_examples, -1)
    check_rows(rows, f_UF, n_UF, labels_NP[ex_U, tok_U], section["n_bins"],
               int(np.log2(section["bins_per_octave"])), section)  # fmt: skip


def ade20k_tree(root: pathlib.Path):
    """Six images with masks: left half class 1 + i % 3 (wall, building, sky), right half 13
    (person) on the even images, 21 (car) on the odd ones; a 16x16 block of 0 (unlabeled)."""
    from PIL import Image
    from skimage import data as samples

    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    masks = []
    for i, name in enumerate(SKIMAGE):
        img = np.asarray(Image.fromarray(getattr(samples, name)()).convert("RGB").resize((64, 64)))
        Image.fromarray(img).save(root / "images" / "training" / f"{i}.png")
        mask_HW = np.full((64, 64), 1 + i % 3, np.uint8)
        mask_HW[:, 32:] = 13 if i % 2 == 0 else 21
        mask_HW[:16, :16] = 0
        Image.fromarray(mask_HW).save(root / "annotations" / "training" / f"{i}.png")
        masks.append(mask_HW)
    return masks


@pytest.fixture(scope="module")
def ade20k(tmp_path_factory):
    work = tmp_path_factory.mktemp("ade")
    masks = ade20k_tree(work / "ADEChallengeData2016")
    args = ["data=ade20k", f"data.root={work / 'ADEChallengeData2016'}", "n_workers=0"]
    shards = last_line(run("record.py", *args, f"dump_to={work / 'shards'}", cwd=work))
    x_ND = torch.cat(
        [b["act"] for b in OrderedLoader(str(shards), -1, 10_000, "patches", n_workers=0)]
    )
    train = {"data": {"shard_root": str(shards), "layer": -1, "tokens": "patches"}}
    ckpt = crafted_sae(x_ND).save(work / "sae", {"train": train})
    return shards, masks, ckpt


@pytest.mark.slow
def test_ade20k_recording_flows_through_probe_and_browser(ade20k, tmp_path):
    shards, masks, ckpt = ade20k
    labels_NP = np.fromfile(shards / "labels.bin", np.uint8).reshape(len(SKIMAGE), 16)
    for mask_HW, labels_P in zip(masks, labels_NP):
        # The tiny ViT sees 32x32 (resized) as a 4x4 grid of 8 px: a patch is 16x16 of the mask.
        want = mask_HW[8::16, 8::16].reshape(-1)
        assert labels_P.tolist() == want.tolist()
    out = tmp_path / "vis"
    res = run("visualize.py", f"ckpt={ckpt}", "probe=true", f"out={out}", "n_latents=4",
              "n_images=2", "data.batch_size=40")  # fmt: skip
    assert last_line(res) == out
    assert "145 patch classes never occur" in res.stdout + res.stderr, res.stdout[-2000:]
    rows = read_csv(out)
    assert [r["name"] for r in rows] == ["wall", "building", "sky", "person", "car"]
    section = json.loads((out / "metrics.json").read_text())["probe"]["patch"]
    sae = nn.load(ckpt, "cpu")
    f_UF, n_UF, ex_U, tok_U = scores_of(sae, shards, -1, "patches", batch_size=40)
    check_rows(rows, f_UF, n_UF, labels_NP[ex_U, tok_U - 1], section["n_bins"],
               int(np.log2(section["bins_per_octave"])), section)  # fmt: skip
    # Browser: each class's page lists its best latents, each rendered with its images.
    index = (out / "index.html").read_text()
    assert 'id="class"' in index and "best class" in index
    for r in rows:
        page = (out / "classes" / "patch" / f"{r['label']}.html").read_text()
        listed = [int(s) for s in re.findall(r'data-latent="(\d+)"', page)]
        assert listed[0] == int(r["best_latent"]) and len(listed) == 3
        for s in listed:
            latent = (out / "latents" / f"{s}.html").read_text()
            assert 'id="classes"' in latent
            assert f'data-id="{s}"' in index
    assert "person" in (out / "classes" / "index.html").read_text()
    # Re-rendering reads the cached probe: no second pass.
    again = run("visualize.py", f"ckpt={ckpt}", "probe=true", f"out={out}", "n_latents=2")
    assert last_line(again) == out and "never occur" not in again.stdout + again.stderr

    # Labels outside ADE20K's table: one line, exit 2, before the pass writes anything.
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    wrong = labels_NP.copy()
    wrong[0, 0] = 200
    wrong.tofile(bad / "labels.bin")
    out_bad = tmp_path / "vis-bad"
    err = one_line_error(
        run(
            "visualize.py", f"ckpt={ckpt}", f"data.shard_root={bad}", "probe=true", f"out={out_bad}"
        )  # fmt: skip
    )
    assert "label 200" in err and "0-150" in err
    assert not (out_bad / "metrics.json").exists()


@pytest.mark.slow
def test_image_labels_score_each_images_max(recorded_shards, crafted_ckpt, tmp_path):
    out = tmp_path / "vis"
    last_line(
        run(
            "visualize.py",
            f"ckpt={crafted_ckpt}",
            "probe=true",
            "render=false",
            f"out={out}",
            "data.batch_size=50",
        )  # fmt: skip
    )
    rows = read_csv(out)
    assert {r["level"] for r in rows} == {"image"} and len(rows) == 3
    section = json.loads((out / "metrics.json").read_text())["probe"]["image"]
    sae = nn.load(crafted_ckpt, "cpu")
    f_UF, n_UF, ex_U, _ = scores_of(sae, recorded_shards, -1, "all", batch_size=50)
    f_EF, ids = image_max(f_UF, ex_U)
    n_EF, _ = image_max(n_UF, ex_U)
    records = (recorded_shards / "examples.jsonl").read_text().splitlines()
    labels_E = np.array([json.loads(records[e])["label"] + 1 for e in ids])  # sorted ints 0..2
    check_rows(rows, f_EF, n_EF, labels_E, section["n_bins"],
               int(np.log2(section["bins_per_octave"])), section)  # fmt: skip


@pytest.mark.slow
def test_probe_without_labels_is_one_line(shard_root, tmp_path):
    cfg = nn.SAEConfig(activation="topk", d_model=16, d_sae=8, k=2, aux_k=0, aux_coeff=0.0)
    train = {"data": {"shard_root": str(shard_root), "layer": 0, "tokens": "patches"}}
    ckpt = nn.SAE(cfg).save(tmp_path / "sae", {"train": train})
    err = one_line_error(run("visualize.py", f"ckpt={ckpt}", "probe=true", f"out={tmp_path}/o"))
    assert "probe=true needs labels" in err and "drop probe=true" in err


def test_sweep_probe_adds_l0_against_probe_map(tmp_path):
    for i, (k, found) in enumerate([(4, True), (8, False)]):
        sae_dir = tmp_path / "sweep" / f"run{i}" / "00-topk"
        (sae_dir / "visuals").mkdir(parents=True)
        config = {"sae": {"activation": "topk", "k": k}, "train": {"sae": {"k": k}}}
        (sae_dir / "config.json").write_text(json.dumps(config))
        (sae_dir / "metrics.json").write_text(json.dumps({"val": {"l0": k, "nmse": 1 / k}}))
        if found:
            probe = {"probe": {"patch": {"map": 0.75}}}
            (sae_dir / "visuals" / "metrics.json").write_text(json.dumps(probe))
    res = run("visualize.py", f"sweep={tmp_path / 'sweep'}", "probe=true")
    out = last_line(res)
    assert "1 SAEs have no probe results" in res.stdout + res.stderr
    assert (out / "pareto.png").is_file() and "label probe mAP" in (out / "pareto.svg").read_text()

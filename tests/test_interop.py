"""Checkpoints that travel: the public saev's files in (every header version its dump wrote),
SAELens's layout out and back, through `saev.nn.load` and `python -m saev.export`; and bad input
refused in one line with nothing executed."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.public_sae import dump, header, reference, weights

from saev import nn as saev_nn
from saev.nn import SAE, SAEConfig, public, saelens

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
D, E, K = 8, 4, 4
X_BD = torch.randn(16, D, generator=torch.Generator().manual_seed(1)) * 2

# (header version, activation, what its inference was): every pair the public saev wrote.
PUBLIC = [
    ("v0", "Relu", None),
    ("1a", "Relu", None),
    ("1a", "TopK", None),
    ("1b", "Relu", None),
    ("1b", "TopK", None),
    ("2", "Relu", None),
    ("2", "TopK", None),
    ("2", "BatchTopK", "per-example"),
    ("3", "TopK", None),
    ("4", "Relu", None),
    ("4", "BatchTopK", "threshold"),
    ("5", "Relu", None),
    ("5", "TopK", None),
    ("5", "BatchTopK", "threshold"),
]


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saev.export", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("version,kind,inference", PUBLIC)
def test_public_checkpoint_imports_with_its_outputs(tmp_path, version, kind, inference):
    state = weights(D, D * E, threshold=0.05 if inference == "threshold" else None)
    path = tmp_path / "sae.pt"
    dump(path, header(version, kind, D, E, K), state)
    sae = saev_nn.load(path)
    want = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}[kind]
    if inference == "per-example":
        want = "topk"  # schemas 2-3: BatchTopK's inference was a per-example top-k
    assert sae.cfg.activation == want and (sae.cfg.d_model, sae.cfg.d_sae) == (D, D * E)
    f_want, x_want = reference(state, kind, K, version == "v0", X_BD, inference == "per-example")
    with torch.no_grad():
        f_BS = sae.encode(X_BD)
        assert torch.allclose(f_BS, f_want, atol=1e-5)
        assert torch.allclose(sae.decode(f_BS), x_want, atol=1e-5)
    if inference == "threshold":
        assert float(sae.threshold) == pytest.approx(0.05)


def test_schema_one_centered_override_and_batch_topk(tmp_path):
    """Schema-1 headers do not say whether the encoder subtracted b_dec: `centered=True` reads a
    file from the public saev's earliest schema-1 code; its batch-coupled BatchTopK has no
    threshold, so it imports as ours without one."""
    state = weights(D, D * E)
    path = tmp_path / "sae.pt"
    dump(path, header("1a", "Relu", D, E), state)
    f_want, _ = reference(state, "Relu", K, True, X_BD, False)
    with torch.no_grad():
        assert torch.allclose(public.load(path, centered=True).encode(X_BD), f_want, atol=1e-5)
    dump(path, header("1a", "BatchTopK", D, E, K), state)
    sae = saev_nn.load(path)
    assert sae.cfg.activation == "batchtopk" and torch.isnan(sae.threshold)


# -- bad input ---------------------------------------------------------------------------------
class Payload:
    """Unpickling it would call open(marker, "w"): the marker appears if pickled code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_files(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (file, a phrase its error must hold)."""
    state = weights(D, D * E)
    files = {}
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(64).replace(b"\n", b"x"))
    files["neither format"] = (junk, "not an SAE checkpoint")
    abs_head = header("4", "TopK", D, E)
    abs_head["cfg"]["activation"]["cls"] = "AbsBatchTopK"
    dump(tmp_path / "abs.pt", abs_head, state)
    files["unknown activation"] = (tmp_path / "abs.pt", "'AbsBatchTopK' has no equivalent")
    dump(tmp_path / "future.pt", {**header("5", "TopK", D, E), "schema": 9}, state)
    files["unknown schema"] = (tmp_path / "future.pt", "schema 9")
    wide = header("2", "Relu", D, E)
    wide["cfg"]["exp_factor"] = E * 2
    dump(tmp_path / "shape.pt", wide, state)
    files["shapes disagree"] = (tmp_path / "shape.pt", "the header and weights disagree")
    dump(
        tmp_path / "evil.pt",
        header("5", "Relu", D, E),
        {**state, "W_enc": Payload(tmp_path / "RAN")},
    )
    files["pickled code"] = (tmp_path / "evil.pt", "refused without running any of it")
    raw = tmp_path / "evil-raw.pt"  # a bare (non-zip) pickle after a valid header
    import pickle

    raw.write_bytes(
        (json.dumps(header("2", "Relu", D, E)) + "\n").encode()
        + pickle.dumps(Payload(tmp_path / "RAN"))
    )
    files["bare pickle"] = (raw, "refused without running any of it")
    return files


def test_bad_input_is_one_value_error_and_nothing_runs(tmp_path):
    for name, (path, phrase) in bad_files(tmp_path).items():
        with pytest.raises(ValueError) as err:
            saev_nn.load(path)
        message = str(err.value)
        assert phrase in message and "\n" not in message, (name, message)
    assert not (tmp_path / "RAN").exists(), "a pickled payload ran"


@pytest.mark.slow
def test_export_of_bad_input_is_one_line_exit_2(tmp_path):
    for name, (path, phrase) in bad_files(tmp_path).items():
        res = export(f"ckpt={path}", f"to={tmp_path / 'out'}", "format=saelens")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and phrase in lines[0], (name, res.stderr)
        assert lines[0].startswith("error: "), lines
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "out").exists()
    res = export("ckpt=x", "to=y", "format=onnx")
    assert res.returncode == 2 and "choose one of ['saelens', 'saev']" in res.stderr


# -- ours -> SAELens -> ours -------------------------------------------------------------------
def our_sae(kind: str, seed: int = 0) -> SAE:
    """An SAE of conf/sae/<kind>.yaml with random weights and normalization statistics."""
    fields = yaml.safe_load((ROOT / "conf" / "sae" / f"{kind}.yaml").read_text())
    sae = SAE(SAEConfig(**fields, d_model=D, d_sae=D * E), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, D * E, generator=gen) / D**0.5)
        sae.b_enc.copy_(torch.randn(D * E, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(D, generator=gen) * 0.1)
        sae.set_norm(torch.randn(D, generator=gen), 0.37)
        if sae.cfg.activation == "jumprelu":
            sae.log_threshold.copy_(torch.rand(D * E, generator=gen).mul(0.3).add(0.01).log())
        if sae.cfg.activation == "batchtopk":
            sae.threshold.fill_(0.2)
        sae.b_dec_pending.fill_(False)
    return sae.eval()


KINDS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]


@pytest.mark.parametrize("kind", KINDS)
def test_saelens_round_trip_keeps_weights_config_and_outputs(tmp_path, kind):
    sae = our_sae(kind)
    saelens.save(sae, tmp_path / "lens", {"hook_name": "blocks.3.hook_resid_post"})
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}.get(kind, "jumprelu")
    assert cfg["architecture"] == arch and (cfg["d_in"], cfg["d_sae"]) == (D, D * E)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg.get("k") == (sae.cfg.k if kind == "topk" else None)
    back = saev_nn.load(tmp_path / "lens")
    assert back.cfg == sae.cfg
    # Folding and unfolding divide and multiply by the scale: equal within float rounding.
    for name, value in sae.state_dict().items():
        assert torch.allclose(back.state_dict()[name].float(), value.float(), atol=1e-6), name
    with torch.no_grad():
        f_BS = sae.encode(X_BD)
        assert torch.allclose(back.encode(X_BD), f_BS, atol=1e-5)
        assert torch.allclose(back.decode(f_BS), sae.decode(f_BS), atol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu", "batchtopk"])
def test_folded_weights_are_saelens_inference(tmp_path, kind):
    """The exported tensors alone, as SAELens's inference SAEs use them, give our numbers."""
    sae = our_sae(kind)
    w = saelens.folded(sae)
    h_BS = (X_BD - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if kind == "relu":
        f_BS = h_BS.relu()
    elif kind == "topk":
        top = h_BS.topk(sae.cfg.k, dim=-1)
        f_BS = torch.zeros_like(h_BS).scatter(-1, top.indices, top.values.relu())
    else:
        f_BS = h_BS.relu() * (h_BS > w["threshold"])
    with torch.no_grad():
        assert torch.allclose(f_BS, sae.encode(X_BD), atol=1e-5)
        assert torch.allclose(f_BS @ w["W_dec"] + w["b_dec"], sae.decode(f_BS), atol=1e-5)


def test_plain_saelens_directory_imports(tmp_path):
    """A SAELens directory we did not write (no `saev` entry): identity normalization."""
    sae = our_sae("topk")
    saelens.save(sae, tmp_path / "lens")
    cfg_path = tmp_path / "lens" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["saev"]
    cfg_path.write_text(json.dumps(cfg))
    back = saev_nn.load(tmp_path / "lens" / "cfg.json")
    assert back.cfg.activation == "topk" and back.cfg.k == sae.cfg.k
    assert float(back.norm_scale) == 1.0 and not back.norm_mean.any()
    with torch.no_grad():
        assert torch.allclose(back.encode(X_BD), sae.encode(X_BD), atol=1e-5)
    cfg["architecture"] = "gated"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gated' has no equivalent"):
        saev_nn.load(tmp_path / "lens")


# -- the entry point ---------------------------------------------------------------------------
def trained_dir(tmp_path: pathlib.Path, kind: str = "topk") -> pathlib.Path:
    """Our SAE directory as train.py leaves it (config.json with train.data and shards)."""
    shards_md = {"model": {"family": "timm", "ckpt": "vit_tiny_patch16_224"}, "layers": [3]}
    extra = {
        "train": {"data": {"shard_root": str(tmp_path / "gone"), "layer": 3}},
        "shards": shards_md,
    }
    return our_sae(kind).save(tmp_path / "sae", extra)


@pytest.mark.slow
def test_export_entry_point_writes_saelens_and_saev(tmp_path):
    sae_dir = trained_dir(tmp_path)
    res = export(f"ckpt={sae_dir}", f"to={tmp_path / 'lens'}", "format=saelens")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["metadata"] == {
        "model_name": "vit_tiny_patch16_224",
        "model_class_name": "timm",
        "hook_name": "blocks.3.hook_resid_post",
        "sae_lens_version": "6.0.0",
    }
    assert cfg["architecture"] == "topk" and cfg["k"] == 32
    import safetensors.torch

    w = safetensors.torch.load_file(tmp_path / "lens" / "sae_weights.safetensors")
    assert {n: list(t.shape) for n, t in w.items()} == {
        "W_enc": [D, D * E],
        "b_enc": [D * E],
        "W_dec": [D * E, D],
        "b_dec": [D],
    }
    # A public saev file into our directory, with the shards it reads recorded for visualize.py.
    state = weights(D, D * E, threshold=0.05)
    dump(tmp_path / "public.pt", header("5", "BatchTopK", D, E, K), state)
    res = export(
        f"ckpt={tmp_path / 'public.pt'}",
        f"to={tmp_path / 'ours'}",
        "format=saev",
        f"data.shard_root={tmp_path / 'shards'}",
        "data.layer=-2",
    )
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["train"]["data"] == {"shard_root": str(tmp_path / "shards"), "layer": -2}
    imported = saev_nn.load(tmp_path / "ours")
    f_want, _ = reference(state, "BatchTopK", K, False, X_BD, False)
    with torch.no_grad():
        assert torch.allclose(imported.encode(X_BD), f_want, atol=1e-5)


# -- SAELens itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_saelens_loads_our_export_with_our_numbers(tmp_path, kind):
    try:
        import sae_lens
    except ImportError:
        pytest.skip("sae_lens is not installed (pip install -e '.[saelens]' in its own venv)")
    sae = our_sae(kind)
    saelens.save(sae, tmp_path / "lens", {"hook_name": "blocks.3.hook_resid_post"})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "lens"), device="cpu")
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    with torch.no_grad():
        f_BS = sae.encode(X_BD)
        assert torch.allclose(theirs.encode(X_BD), f_BS, atol=1e-5)
        assert torch.allclose(theirs.decode(f_BS), sae.decode(f_BS), atol=1e-5)
    assert dataclasses.asdict(saev_nn.load(tmp_path / "lens").cfg) == dataclasses.asdict(sae.cfg)

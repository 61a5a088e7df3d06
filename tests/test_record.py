"""`record.py` end to end: subprocess runs on tiny random timm and open_clip ViTs over photos
shipped in the scikit-image wheel, kill -9 and resume, the lock, and every one-line error.

Each subprocess pays several seconds of imports, so each run checks many things at once.
"""

import fcntl
import importlib.util
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from saev import shards

REPO = pathlib.Path(__file__).resolve().parents[1]
SKIMAGE_DATA = pathlib.Path(importlib.util.find_spec("skimage").origin).parent / "data"
TINY_REG = "img32-patch8-dim64-depth4-heads4-reg4"
PHOTOS = {
    "retina.jpg": "retina.jpg",  # no subfolder: no label
    "a/astronaut.png": "astronaut.png",
    "a/coffee.png": "coffee.png",
    "a/rocket.jpg": "rocket.jpg",
    "b/camera.png": "camera.png",  # grayscale
    "b/chelsea.png": "chelsea.png",
    "b/hubble_deep_field.jpg": "hubble_deep_field.jpg",
}


def record(*overrides, cwd, wait=True, preexec_fn=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(REPO / "record.py"), *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def shard_dir(result) -> pathlib.Path:
    assert result.returncode == 0, result.stderr[-3000:]
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("photos")
    for rel, name in PHOTOS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SKIMAGE_DATA / name, root / rel)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def tiny_timm_model():
    """The tiny timm ViT (4 register tokens) whose weights the record runs load from a file."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        reg_tokens=4,
    )


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> pathlib.Path:
    import safetensors.torch

    torch.manual_seed(123)
    model = tiny_timm_model()
    state = dict(model.state_dict())
    state["head.weight"], state["head.bias"] = torch.zeros(10, 64), torch.zeros(10)  # ignored
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    safetensors.torch.save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, photos, tiny_weights):
    work = tmp_path_factory.mktemp("tiny_run")
    args = [
        "model=tiny",
        f"model.ckpt={TINY_REG}",
        f"model.weights={tiny_weights}",
        "data=image_folder",
        f"data.root={photos}",
        "data.skip_bad_images=true",
        "layers=[1,-1]",
        "cls_token=true",
        "max_patches_per_shard=80",  # 80 // (2 layers * 17 tokens) = 2 examples per shard
        "batch_size=3",  # batches straddle shards
        "n_workers=1",
        f"dump_to={work / 'shards'}",
    ]
    return args, work, record(*args, cwd=work)


@pytest.mark.slow
def test_tiny_timm_run_writes_format_v1(tiny_run, photos):
    _, _, result = tiny_run
    root = shard_dir(result)
    md = json.loads((root / "metadata.json").read_text())
    assert md["format"] == "saev-shards" and md["version"] == 1
    assert md["model"] == {"family": "tiny", "ckpt": TINY_REG, "weights": md["model"]["weights"]}
    assert md["layers"] == [1, -1] and md["cls_token"] is True
    assert (md["n_patches_per_example"], md["n_tokens_per_example"], md["d_model"]) == (16, 17, 64)
    assert md["dtype"] == "float32" and md["examples_per_shard"] == 2
    assert md["n_examples"] == len(PHOTOS)  # the broken file was skipped
    assert md["data"] == {"name": "image_folder", "root": str(photos), "n_images": len(PHOTOS) + 1}
    assert root.name == shards.Metadata.from_json(md).content_hash()

    listing = json.loads((root / "shards.json").read_text())
    assert [e["n_examples"] for e in listing] == [2, 2, 2, 1]
    for i, entry in enumerate(listing):
        assert entry["name"] == f"acts{i:06d}.bin"
        assert (root / entry["name"]).stat().st_size == entry["n_examples"] * 2 * 17 * 64 * 4
    examples = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
    assert examples == [
        {"path": p, "label": p.split("/")[0]} if "/" in p else {"path": p} for p in sorted(PHOTOS)
    ]
    assert "skipped 1 unreadable images" in result.stderr and "broken.jpg" in result.stderr
    assert "img/s" not in result.stderr  # no progress bar when stderr is no terminal (a log)
    assert not list(root.glob(".*.tmp*"))


@pytest.mark.slow
def test_tiny_timm_activations_equal_direct_forward(tiny_run, photos, tiny_weights):
    import safetensors.torch
    import timm
    from PIL import Image

    root = shard_dir(tiny_run[2])
    model = tiny_timm_model()
    state = safetensors.torch.load_file(str(tiny_weights))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    model.eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    data_cfg["input_size"] = (3, 32, 32)
    transform = timm.data.create_transform(**data_cfg)
    i = sorted(PHOTOS).index("b/chelsea.png")
    x = transform(Image.open(photos / "b/chelsea.png").convert("RGB"))[None]
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        per_block = []
        for block in model.blocks:
            h = block(h)
            per_block.append(h[0])
    # Token 0 is CLS, then the 16 patches; the 4 register tokens (1..4) are not recorded.
    expected_LTD = torch.stack(
        [torch.cat([b[:1], b[5:]]) for b in (per_block[1], per_block[-1])]
    ).numpy()
    stored = shards.open_shards(root).memmap(i // 2)[i % 2]  # 2 examples per shard
    np.testing.assert_allclose(stored, expected_LTD, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lock_stops_a_second_writer(tiny_run):
    args, work, result = tiny_run
    root = shard_dir(result)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with open(root / ".lock", "a+") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = record(*args, cwd=work)
    assert_one_line_error(second, "another process is writing to", str(root))
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


@pytest.mark.slow
def test_open_clip_vit_bfloat16_without_cls(tmp_path, photos):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    result = record(
        "model=clip",
        "model.ckpt=ViT-S-32",
        "model.pretrained=false",
        "model.seed=3",
        "data=image_folder",
        f"data.root={photos}",
        "data.skip_bad_images=true",
        "layers=[-3]",
        "cls_token=false",
        "dtype=bfloat16",
        "batch_size=4",
        "n_workers=0",
        f"dump_to={tmp_path / 'shards'}",
        cwd=tmp_path,
    )
    root = shard_dir(result)
    md = json.loads((root / "metadata.json").read_text())
    assert md["model"] == {"family": "clip", "ckpt": "ViT-S-32", "weights": "random(seed=3)"}
    assert (md["cls_token"], md["n_patches_per_example"], md["n_tokens_per_example"]) == (
        False,
        49,
        49,
    )
    assert (md["d_model"], md["dtype"], md["n_examples"]) == (384, "bfloat16", len(PHOTOS))
    (entry,) = json.loads((root / "shards.json").read_text())
    assert (root / entry["name"]).stat().st_size == len(PHOTOS) * 1 * 49 * 384 * 2

    torch.manual_seed(3)
    visual = open_clip.create_model("ViT-S-32", pretrained=None).visual.eval()
    transform = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    i = sorted(PHOTOS).index("b/camera.png")  # grayscale, so the RGB conversion is exercised too
    x = transform(Image.open(photos / "b/camera.png").convert("RGB"))[None]
    with torch.no_grad():
        h = visual._embeds(x)
        for block in visual.transformer.resblocks[:10]:  # layer -3 of 12 is block 9
            h = block(h)
    stored = shards.to_float32(shards.open_shards(root).memmap(0)[i], "bfloat16")
    np.testing.assert_allclose(stored[0], h[0, 1:].numpy(), rtol=1e-2, atol=1e-2)  # no CLS


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(tmp_path):
    args = [
        "data.n_images=400",
        "max_patches_per_shard=680",  # 40 examples per shard
        "batch_size=32",  # not a divisor of 40: resuming has to realign batches
        "n_workers=1",
    ]
    killed_to = tmp_path / "killed"
    proc = record(*args, f"dump_to={killed_to}", cwd=tmp_path, wait=False)
    deadline = time.time() + 120
    listing = []
    while time.time() < deadline and proc.poll() is None:
        found = list(killed_to.glob("*/shards.json"))
        if found and (listing := json.loads(found[0].read_text())):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 1 <= len(listing) < 10, "the run was not killed midway; make it longer"

    proc = record(*args, f"dump_to={killed_to}", cwd=tmp_path, wait=False)
    # Meanwhile the uninterrupted run, in this process: the same code without another startup.
    from saev.record import job as recording
    from saev.record.config import RecordConfig, SyntheticImagesConfig

    clean_cfg = RecordConfig(
        data=SyntheticImagesConfig(n_images=400),
        max_patches_per_shard=680,
        batch_size=32,
        n_workers=1,
        dump_to=str(tmp_path / "clean"),
    )
    clean_dir = recording.record(clean_cfg)
    out, err = proc.communicate(timeout=300)
    resumed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    resumed_dir = shard_dir(resumed)
    assert f"after {40 * len(listing)} recorded examples" in resumed.stderr
    assert resumed_dir.name == clean_dir.name
    names = sorted(p.name for p in clean_dir.iterdir())
    assert sorted(p.name for p in resumed_dir.iterdir()) == names
    assert len([n for n in names if n.endswith(".bin")]) == 10
    for name in names:
        assert (resumed_dir / name).read_bytes() == (clean_dir / name).read_bytes(), name


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            ["data=image_folder", "data.root=/nonexistent/photos"],
            ["data.root=/nonexistent/photos", "not a directory"],
        ),
        (["data=image_folder", "data.root={empty}"], ["holds no image files"]),
        (["data=inat21", "data.root={empty}"], ["no iNat21 category folders"]),
        (["dump_to={file}/shards"], ["cannot create dump_to="]),
        (["dtype=float64"], ["dtype='float64'", "float32, float16, bfloat16"]),
        (["data=image_folder"], ["data.root is required"]),
    ],
)
def test_input_errors_are_one_line(tmp_path, overrides, fragments):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    subs = {"empty": tmp_path / "empty", "file": tmp_path / "file"}
    result = record(*[o.format(**subs) for o in overrides], cwd=tmp_path)
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_errors_after_the_model_loads(tmp_path):
    def limit_file_size():
        # A 20 kB cap on any file this process writes: the first shard (278 kB) hits it
        # exactly as it would hit a full disk (EFBIG instead of ENOSPC, same code path).
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    runs = {
        "layer": record("layers=[2,4]", cwd=tmp_path, wait=False),
        "disk": record(
            f"dump_to={tmp_path / 'full'}",
            "data.n_images=100",
            "max_patches_per_shard=1088",  # 64 examples (about 280 kB) per shard
            "n_workers=0",
            cwd=tmp_path,
            wait=False,
            preexec_fn=limit_file_size,
        ),
    }
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(results["layer"], "layer 4 is out of range", "4 blocks", "-4..3")
    assert_one_line_error(
        results["disk"], "could not write", "acts000000.bin", "re-run the same command"
    )
    (full,) = (tmp_path / "full").iterdir()
    assert (full / "metadata.json").is_file()
    # Nothing half-written is registered or left behind.
    assert (
        not (full / "shards.json").exists() or json.loads((full / "shards.json").read_text()) == []
    )
    assert sorted(p.name for p in full.iterdir()) == [".lock", "examples.jsonl", "metadata.json"]


# In process: the same `saev.record.job.record` that record.py calls, without import overhead.


@pytest.mark.slow
def test_rerun_of_a_finished_run_with_skipped_images_changes_nothing(
    tiny_run, photos, tiny_weights
):
    from saev.record import job as recording
    from saev.record.config import ImageFolderConfig, ModelConfig, RecordConfig

    root = shard_dir(tiny_run[2])
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    cfg = RecordConfig(
        model=ModelConfig(ckpt=TINY_REG, weights=str(tiny_weights)),
        data=ImageFolderConfig(root=str(photos), skip_bad_images=True),
        layers=[1, -1],
        cls_token=True,
        max_patches_per_shard=80,
        batch_size=3,
        n_workers=0,
        dump_to=str(root.parent),
    )
    assert recording.record(cfg) == root
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


@pytest.mark.slow
def test_ade20k_records_patch_labels_and_resumes_them(tmp_path):
    from saev.record import job as recording
    from saev.record.config import Ade20kConfig, RecordConfig

    ade = tmp_path / "ADEChallengeData2016"
    (ade / "annotations" / "training").mkdir(parents=True)
    (ade / "images" / "training").mkdir(parents=True)
    for i, name in enumerate(["astronaut.png", "chelsea.png", "coffee.png"]):
        from PIL import Image

        Image.open(SKIMAGE_DATA / name).convert("RGB").save(
            ade / "images" / "training" / f"{i}.jpg"
        )
        mask_HW = np.full((64, 64), 10 * i + 1, np.uint8)
        mask_HW[:, 32:] = 10 * i + 2
        Image.fromarray(mask_HW).save(ade / "annotations" / "training" / f"{i}.png")
    cfg = RecordConfig(
        data=Ade20kConfig(root=str(ade)),
        max_patches_per_shard=34,  # 2 examples per shard
        batch_size=2,
        n_workers=0,
        dump_to=str(tmp_path / "shards"),
    )
    root = recording.record(cfg)
    md = json.loads((root / "metadata.json").read_text())
    assert md["data"]["name"] == "ade20k" and md["data"]["patch_labels"].startswith("labels.bin")
    labels = np.fromfile(root / shards.PATCH_LABELS_NAME, np.uint8).reshape(3, 16)
    expected = [[10 * i + 1, 10 * i + 1, 10 * i + 2, 10 * i + 2] * 4 for i in range(3)]
    assert labels.tolist() == expected  # left half, right half of each 4x4 patch grid
    clean = {p.name: p.read_bytes() for p in root.iterdir()}

    # Undo the last shard as a kill after its labels but before shards.json would leave it.
    (root / "shards.json").write_text(
        json.dumps(json.loads((root / "shards.json").read_text())[:1])
    )
    assert recording.record(cfg) == root
    assert {p.name: p.read_bytes() for p in root.iterdir()} == clean


def test_every_config_file_composes_into_the_typed_schema(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saev.record.config import DATA_SCHEMAS, ModelConfig, RecordConfig

    conf = REPO / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        default = OmegaConf.to_object(compose("record"))
        assert isinstance(default, RecordConfig)
        assert (default.model.family, default.data.name) == ("tiny", "synthetic")
        for path in sorted((conf / "model").glob("*.yaml")):
            cfg = OmegaConf.to_object(compose("record", [f"model={path.stem}"]))
            assert isinstance(cfg.model, ModelConfig) and cfg.model.family == path.stem
        for path in sorted((conf / "data").glob("*.yaml")):
            root = [] if path.stem == "synthetic" else [f"data.root={tmp_path}"]
            cfg = OmegaConf.to_object(compose("record", [f"data={path.stem}", *root]))
            assert isinstance(cfg.data, DATA_SCHEMAS[path.stem])
        launcher = compose("record", ["hydra/launcher=slurm"], return_hydra_config=True)
        slurm = launcher.hydra.launcher
        assert slurm._target_.endswith("SlurmLauncher")
        assert (slurm.gpus_per_node, slurm.cpus_per_task) == (1, 16)
        assert slurm.timeout_min > 0 and "account" in slurm and "partition" in slurm


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_device_narrowing_matches_the_shard_format_bytes(device, dtype):
    from saev.record.job import host_array, to_host

    acts = torch.randn(3, 2, 5, 7) * 50
    acts[0, 0, 0, :3] = torch.tensor([1.00390625, 1.01171875, -(2.0**-140)])  # ties, subnormal
    stored = host_array(*to_host(acts.to(device), dtype), dtype)
    expected = shards.from_float32(acts.numpy(), dtype)
    assert stored.dtype == expected.dtype and stored.tobytes() == expected.tobytes()


def test_an_unreadable_image_stops_the_run_naming_the_file(tmp_path, photos):
    from saev.record import job as recording
    from saev.record.config import ImageFolderConfig, RecordConfig

    cfg = RecordConfig(
        data=ImageFolderConfig(root=str(photos)), n_workers=0, dump_to=str(tmp_path / "shards")
    )
    with pytest.raises(recording.RecordError) as err:
        recording.record(cfg)
    message = str(err.value)
    assert "b/broken.jpg" in message and "data.skip_bad_images=true" in message
    assert "\n" not in message


def test_record_batches_are_pinned_by_the_data_loader():
    """DataLoader(pin_memory=True) pins only types it knows or that define `pin_memory`; a
    pageable batch would make the host-to-device copy synchronous."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from saev.record.job import Batch

    class Pinnable:
        def pin_memory(self):
            return "pinned"

    batch = Batch(Pinnable(), [0], None, [])
    assert pin_memory(batch).x_BCHW == "pinned"
    empty = Batch(None, [], None, [(0, "unreadable")])
    assert pin_memory(empty) is empty


@pytest.mark.gpu
def test_record_loop_pins_batches_and_enables_tf32(tmp_path, monkeypatch):
    import saev.record.vit as vitlib
    from saev.record import job as recording
    from saev.record.config import RecordConfig

    seen = []

    class Spy(vitlib.Recorder):
        def __call__(self, x_BCHW):
            seen.append((x_BCHW.device.type, torch.backends.cuda.matmul.allow_tf32))
            return super().__call__(x_BCHW)

    monkeypatch.setattr(vitlib, "Recorder", Spy)
    pinned = []
    real_pin = recording.Batch.pin_memory

    def pin(self):
        out = real_pin(self)
        pinned.append(out.x_BCHW is None or out.x_BCHW.is_pinned())
        return out

    monkeypatch.setattr(recording.Batch, "pin_memory", pin)
    cfg = RecordConfig(n_workers=0, device="cuda", dump_to=str(tmp_path / "shards"))
    recording.record(cfg)
    assert seen and all(dev == "cuda" and tf32 for dev, tf32 in seen)
    assert pinned and all(pinned)

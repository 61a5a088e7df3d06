"""Image datasets: layouts, labels, source records, unreadable files, ADE20K patch labels."""

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from saev.record import images
from saev.record.config import (
    Ade20kConfig,
    ImageFolderConfig,
    ImageNetConfig,
    Inat21Config,
    SyntheticImagesConfig,
)


def write_image(path, size=(40, 30), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_labels_come_from_first_level_subfolders(tmp_path):
    for rel in ["z.png", "cats/a.jpg", "cats/deep/b.png", "dogs/c.JPEG", "dogs/notes.txt"]:
        write_image(tmp_path / rel) if not rel.endswith(".txt") else (tmp_path / rel).write_text(
            "x"
        )
    ds = images.build(ImageFolderConfig(root=str(tmp_path)))
    assert ds.paths == ["cats/a.jpg", "cats/deep/b.png", "dogs/c.JPEG", "z.png"]
    assert [ds.source(i) for i in range(len(ds))] == [
        {"path": "cats/a.jpg", "label": "cats"},
        {"path": "cats/deep/b.png", "label": "cats"},
        {"path": "dogs/c.JPEG", "label": "dogs"},
        {"path": "z.png"},
    ]
    assert ds.find({"path": "dogs/c.JPEG"}) == 2
    assert ds.describe() == {"name": "image_folder", "root": str(tmp_path), "n_images": 4}
    assert ds.load(0).mode == "RGB"


def test_imagenet_and_inat21_labels(tmp_path):
    for rel in ["n01440764/x.JPEG", "n01443537/y.JPEG", "n01443537/z.JPEG", "README/r.png"]:
        write_image(tmp_path / "train" / rel)
    ds = images.build(ImageNetConfig(root=str(tmp_path / "train")))
    assert [ds.source(i)["label"] for i in range(len(ds))] == [0, 1, 1]  # README/ is no synset
    assert ds.describe()["split"] == "train"

    for rel in ["00000_Animalia_a/1.jpg", "00007_Plantae_b/2.jpg"]:
        write_image(tmp_path / "train_mini" / rel)
    ds = images.build(Inat21Config(root=str(tmp_path / "train_mini")))
    assert [ds.source(i) for i in range(2)] == [
        {"path": "00000_Animalia_a/1.jpg", "label": 0},
        {"path": "00007_Plantae_b/2.jpg", "label": 7},
    ]


def test_bad_roots_raise_data_errors(tmp_path):
    with pytest.raises(images.DataError, match="not a directory"):
        images.build(ImageFolderConfig(root=str(tmp_path / "missing")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(images.DataError, match="holds no image files"):
        images.build(ImageFolderConfig(root=str(tmp_path / "empty")))
    write_image(tmp_path / "ade" / "images" / "training" / "a.jpg")
    (tmp_path / "ade" / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(images.DataError, match="has no segmentation mask"):
        images.build(Ade20kConfig(root=str(tmp_path / "ade")))


def test_synthetic_images_are_deterministic_and_varied():
    a, b = images.SyntheticDataset(8, seed=0), images.SyntheticDataset(8, seed=0)
    assert np.array_equal(np.asarray(a.load(5)), np.asarray(b.load(5)))
    assert not np.array_equal(np.asarray(a.load(5)), np.asarray(a.load(6)))
    other = images.SyntheticDataset(8, seed=1)
    assert not np.array_equal(np.asarray(a.load(5)), np.asarray(other.load(5)))
    assert a.load(0).size == (images.SYNTHETIC_SIZE, images.SYNTHETIC_SIZE)
    assert {a.source(i)["label"] for i in range(8)} <= {0, 1, 2}
    assert a.source(3) == {"index": 3, "label": a._label(3)} and a.find({"index": 3}) == 3
    assert isinstance(images.build(SyntheticImagesConfig(n_images=3)), images.SyntheticDataset)


def test_decoded_reports_unreadable_images_instead_of_raising(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = images.build(ImageFolderConfig(root=str(tmp_path)))
    decoded = images.Decoded(ds, transforms.ToTensor(), (8, 8), 1)
    x, i, labels, error = decoded[0]
    assert x is None and i == 0 and labels is None and "bad.png" in error
    x, i, labels, error = decoded[1]
    assert x.shape == (3, 30, 40) and error is None


def test_patch_majority_picks_the_most_frequent_class_per_patch():
    mask = np.zeros((4, 6), np.uint8)
    mask[:2, :3] = 5  # patch (0, 0): all 5
    mask[0, 3] = 9  # patch (0, 1): one 9 against three 0
    mask[2:, 3:] = [[1, 1, 2], [2, 2, 1]]  # patch (1, 1): 1 1 2 2 2 1 -> tie 3:3, the smaller wins
    assert images.patch_majority(mask, (2, 3)).tolist() == [5, 0, 0, 1]


def test_ade20k_patch_labels_follow_the_image_through_resize_and_crop(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_image(root / "images" / "validation" / "ADE_val_1.jpg", size=(96, 64))
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 48:] = 7  # right half
    mask[:32, :48] = 3  # top-left quarter
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(mask).save(root / "annotations" / "validation" / "ADE_val_1.png")
    ds = images.build(Ade20kConfig(root=str(root), split="validation"))
    assert ds.describe()["patch_labels"].startswith("labels.bin: uint8")
    # Shortest side to 35, center crop 32x32 (what timm builds for a 32 px model).
    transform = transforms.Compose(
        [
            transforms.Resize(35, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
        ]
    )
    x, _, labels_P, error = images.Decoded(ds, transform, (8, 8), 16)[0]
    assert error is None and x.shape == (3, 32, 32)
    # The crop keeps the middle of the 52x35 resized image: columns 0-1 lie left of the halfway
    # line, 2-3 right of it; rows 0-1 top, 2-3 bottom.
    assert labels_P.reshape(4, 4).tolist() == [
        [3, 3, 7, 7],
        [3, 3, 7, 7],
        [0, 0, 7, 7],
        [0, 0, 7, 7],
    ]

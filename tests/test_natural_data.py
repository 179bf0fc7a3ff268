"""ADE20K / Cityscapes readers on fake trees (incl. bad inputs), the synthetic set, the 2D augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glam3d.data.natural import (ADE20K_CLASSES, CITYSCAPES_CLASSES, ADE20KDataset, CityscapesDataset, Normalize,
                                 Pad, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomResize, Resize,
                                 build_2d_datasets, make_synthetic_ade20k)
from glam3d.errors import UserError


def _save_img(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _save_lab(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


def fake_ade(root, split="training", n=2, h=12, w=16):
    base = root / "ADEChallengeData2016"
    for i in range(n):
        stem = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
        _save_img(base / "images" / split / f"{stem}.jpg", h, w, i)
        lab = np.zeros((h, w), np.uint8)
        lab[:, : w // 2] = 1
        lab[:, w // 2:] = 150
        lab[0, 0] = 0
        _save_lab(base / "annotations" / split / f"{stem}.png", lab)
    return base


def fake_cityscapes(root, split="train", h=8, w=10):
    for city, name in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        _save_img(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", h, w)
        lab = np.full((h, w), 7, np.uint8)  # road
        lab[0] = 26  # car
        lab[1] = 0   # unlabeled
        lab[2] = 33  # bicycle
        _save_lab(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", lab)
    return root


# ------------------------------------------------------------------------------------------ ADE20K
def test_ade20k_reader_reduce_zero_label(tmp_path):
    fake_ade(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = ADE20KDataset(root, "train")
        assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names == ADE20K_CLASSES
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    item = ds[0]
    assert item["image"].shape == (3, 12, 16) and item["image"].dtype == torch.float32
    lab = item["label"]
    assert lab.dtype == torch.int64 and lab[0, 0] == 255 and lab[1, 0] == 0 and lab[1, -1] == 149
    assert item["id"] == "ADE_train_00000001"
    assert ds.verify() == 2


def test_ade20k_bad_inputs(tmp_path):
    base = fake_ade(tmp_path)
    # image without annotation
    _save_img(base / "images/training/ADE_train_00000009.jpg", 12, 16)
    with pytest.raises(UserError, match=r"ADE_train_00000009\.jpg: image has no annotation") as e:
        ADE20KDataset(tmp_path, "training")
    assert "\n" not in str(e.value)
    (base / "images/training/ADE_train_00000009.jpg").unlink()
    # annotation without image
    _save_lab(base / "annotations/training/ADE_train_00000008.png", np.ones((12, 16)))
    with pytest.raises(UserError, match=r"ADE_train_00000008\.png: annotation has no image"):
        ADE20KDataset(tmp_path, "training")
    (base / "annotations/training/ADE_train_00000008.png").unlink()
    # size mismatch
    _save_lab(base / "annotations/training/ADE_train_00000001.png", np.ones((12, 15)))
    ds = ADE20KDataset(tmp_path, "training")
    with pytest.raises(UserError, match=r"ADE_train_00000001\.png: annotation is 15x12 .* is 16x12"):
        ds[0]
    with pytest.raises(UserError, match="ADE_train_00000001"):
        ds.verify()
    # unknown label id
    _save_lab(base / "annotations/training/ADE_train_00000001.png", np.full((12, 16), 151))
    with pytest.raises(UserError, match=r"ADE_train_00000001\.png: unknown label id 151 \(expected 0\.\.150\)"):
        ds[0]
    # RGB annotation
    _save_img(base / "annotations/training/ADE_train_00000001.png", 12, 16)
    with pytest.raises(UserError, match="single-channel PNG"):
        ds[0]
    # corrupt PNG and corrupt JPEG
    (base / "annotations/training/ADE_train_00000001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=r"ADE_train_00000001\.png: cannot read annotation PNG"):
        ds[0]
    good = (base / "images/training/ADE_train_00000002.jpg").read_bytes()
    (base / "images/training/ADE_train_00000002.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(UserError, match=r"ADE_train_00000002\.jpg: cannot read image"):
        ds[1]
    # not an ADE20K folder / bad split
    with pytest.raises(UserError, match="not an ADE20K folder"):
        ADE20KDataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown ADE20K split"):
        ADE20KDataset(tmp_path, "test")
    with pytest.raises(UserError, match="folder missing"):
        ADE20KDataset(tmp_path, "validation")


# ------------------------------------------------------------------------------------------ Cityscapes
def test_cityscapes_reader_train_ids(tmp_path):
    fake_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.class_names == CITYSCAPES_CLASSES
    item = ds[0]
    lab = item["label"]
    assert item["id"] == "aachen_000000_000019"
    assert lab[0].unique().tolist() == [13] and lab[1].unique().tolist() == [255]
    assert lab[2].unique().tolist() == [18] and lab[3].unique().tolist() == [0]


def test_cityscapes_bad_inputs(tmp_path):
    fake_cityscapes(tmp_path)
    (tmp_path / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"bremen_000001_000019_leftImg8bit\.png: image has no annotation"):
        CityscapesDataset(tmp_path, "train")
    _save_lab(tmp_path / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png", np.full((8, 10), 34))
    ds = CityscapesDataset(tmp_path, "train")
    with pytest.raises(UserError, match=r"_gtFine_labelIds\.png: unknown Cityscapes label id 34"):
        ds[1]
    _save_lab(tmp_path / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png", np.full((9, 10), 7))
    with pytest.raises(UserError, match="annotation is 10x9"):
        ds[1]
    with pytest.raises(UserError, match="folder missing from the Cityscapes layout"):
        CityscapesDataset(tmp_path, "val")


# ------------------------------------------------------------------------------------------ synthetic set
def test_synthetic_set_in_ade_layout(tmp_path):
    base = make_synthetic_ade20k(tmp_path, num_train=3, num_val=2, size=(32, 40), num_classes=4, seed=3)
    assert (base / "images/training/ADE_train_00000003.jpg").is_file()
    a = np.asarray(Image.open(base / "annotations/validation/ADE_val_00000002.png"))
    assert a.shape == (32, 40) and a.max() <= 4 and (a == 0).any()
    ds = ADE20KDataset(tmp_path, "validation")
    assert ds.class_names == ("background", "shape1", "shape2", "shape3") and ds.verify() == 2
    before = (base / "annotations/training/ADE_train_00000001.png").read_bytes()
    make_synthetic_ade20k(tmp_path / "again", num_train=3, num_val=2, size=(32, 40), num_classes=4, seed=3)
    assert (tmp_path / "again/ADEChallengeData2016/annotations/training/ADE_train_00000001.png").read_bytes() == before


# ------------------------------------------------------------------------------------------ transforms
def test_transforms_geometry_and_label_alignment():
    torch.manual_seed(0)
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = np.arange(60)[None, :]
    lab = np.tile((np.arange(60) // 6).astype(np.uint8)[None, :], (40, 1))
    for _ in range(5):
        i2, l2 = RandomResize((120, 40), (0.5, 2.0))(img, lab)
        assert i2.shape[:2] == l2.shape and abs(i2.shape[1] / i2.shape[0] - 1.5) < 0.1
    i3, l3 = RandomFlip(1.0)(img, lab)
    assert (i3[..., 0] == img[:, ::-1, 0]).all() and (l3 == lab[:, ::-1]).all()
    i4, l4 = RandomCrop((16, 16))(img, lab)
    assert i4.shape == (16, 16, 3) and (l4 == (i4[..., 0] // 6)).all()
    # image smaller than the crop: cropped to itself, then padded (image 0, label 255)
    i5, l5 = RandomCrop((50, 70))(img, lab)
    x, y = Pad((50, 70))(*Normalize()(i5, l5))
    assert x.shape == (3, 50, 70) and y.shape == (50, 70) and (y[40:] == 255).all() and (x[:, 40:] == 0).all()
    # test-time resize keeps the label
    i6, l6 = Resize((2048, 20))(img, lab)
    assert i6.shape[:2] == (20, 30) and l6.shape == (40, 60)


def test_cat_max_ratio_avoids_single_class_crops():
    torch.manual_seed(0)
    lab = np.zeros((100, 100), np.uint8)
    lab[:, 50:] = 1
    img = np.zeros((100, 100, 3), np.uint8)

    def mixed(ratio):
        hits = 0
        for _ in range(40):
            _, l = RandomCrop((50, 50), cat_max_ratio=ratio)(img, lab)
            vals, cnt = np.unique(l, return_counts=True)
            hits += bool(len(vals) > 1 and cnt.max() / cnt.sum() < 0.75)
        return hits

    # a plain crop is "mixed enough" about half the time; with up to 10 retries nearly always
    assert mixed(0.75) >= 38 and mixed(1.0) <= 32


def test_photometric_distortion_changes_colours_not_labels():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    lab = rng.integers(0, 5, (16, 16), dtype=np.uint8)
    changed = 0
    for _ in range(10):
        out, l2 = PhotoMetricDistortion()(img, lab)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 255 and (l2 == lab).all()
        changed += not np.allclose(out, img)
    assert changed >= 5
    # HSV round trip is exact when no step fires
    from glam3d.data.natural import _hsv_to_rgb, _rgb_to_hsv

    f = img.astype(np.float64)
    assert np.allclose(_hsv_to_rgb(_rgb_to_hsv(f)), f, atol=1e-6)


def test_normalize_imagenet():
    x, y = Normalize()(np.full((2, 2, 3), [123.675, 116.28, 103.53], np.float32), np.zeros((2, 2), np.uint8))
    assert torch.allclose(x, torch.zeros(3, 2, 2), atol=1e-5) and y.dtype == torch.int64


# ------------------------------------------------------------------------------------------ builder
def test_build_2d_datasets(tmp_path):
    fake_ade(tmp_path / "ade", "training", n=2, h=40, w=60)
    fake_ade(tmp_path / "ade", "validation", n=1, h=40, w=60)
    torch.manual_seed(0)
    tr, va, names = build_2d_datasets({"dataset": "ade20k", "root": str(tmp_path / "ade"), "crop_size": 32,
                                       "img_scale": [120, 40]})
    assert len(names) == 150 and len(tr) == 2 and len(va) == 1
    batch = next(iter(torch.utils.data.DataLoader(tr, batch_size=2)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)
    v = va[0]
    # mmseg test resize (2048, 512) keeps the ratio, upscaling too; the label keeps its original size
    assert v["image"].shape == (3, 512, 768) and v["label"].shape == (40, 60)
    fake_cityscapes(tmp_path / "cs", "train")
    fake_cityscapes(tmp_path / "cs", "val")
    tr, va, names = build_2d_datasets({"dataset": "cityscapes", "root": str(tmp_path / "cs"), "crop_size": [8, 8],
                                       "num_classes": 19})
    assert names == list(CITYSCAPES_CLASSES) and tr[0]["image"].shape == (3, 8, 8)
    with pytest.raises(UserError, match=r"unknown data option\(s\) data\.crop"):
        build_2d_datasets({"dataset": "ade20k", "root": "x", "crop": 3})
    with pytest.raises(UserError, match="data.dataset must be one of"):
        build_2d_datasets({"dataset": "coco", "root": "x"})
    with pytest.raises(UserError, match="data.num_classes is 150 but"):
        build_2d_datasets({"dataset": "cityscapes", "root": str(tmp_path / "cs"), "num_classes": 150})
    with pytest.raises(UserError, match="data.root is required"):
        build_2d_datasets({"dataset": "synthetic"})


# ------------------------------------------------------------------------------------------ paper configs
def test_paper_table1_configs_resolve_and_build():
    from pathlib import Path

    from glam3d.config import load_yaml_with_base
    from glam3d.data.natural import resolve_2d_data_config
    from glam3d.models import build_model

    root = Path(__file__).resolve().parents[1] / "glam3d" / "configs"
    rows = {f"ade20k_{g}swin_unet_{s}" for g in ("", "glam_") for s in ("tiny", "base")}
    rows |= {f"ade20k_{g}swin_upernet_{s}" for g in ("", "glam_") for s in ("tiny", "small", "base")}
    rows |= {f"cityscapes_{g}swin_upernet_{s}" for g in ("", "glam_") for s in ("tiny", "base")}
    rows |= {f"cityscapes_{g}swin_unet_tiny" for g in ("", "glam_")}
    assert len(rows) == 16
    for row in sorted(rows) + ["ade20k_synthetic_glam_swin_unet_demo"]:
        raw = load_yaml_with_base(root / f"{row}.yaml")
        data = resolve_2d_data_config(raw["data"])
        city = row.startswith("cityscapes")
        assert data["crop_size"] == ([769, 769] if city else [512, 512]) or "demo" in row
        assert raw["optim"]["lr"] == 6e-5 or "demo" in row
        assert raw["optim"]["weight_decay"] == 0.01 and raw["optim"]["poly_power"] == 1.0
        assert raw["train"]["epochs"] * raw["train"]["iters_per_epoch"] == 160_000 or "demo" in row
        assert raw["data"]["batch_size"] * 8 == 16 or "demo" in row
        name = raw["model"]["name"]
        assert "demo" in row or row.split("_", 1)[1] == name
        assert ("upernet" in name) == (raw["train"]["deep_supervision"] == [1.0, 0.4])
        with torch.device("meta"):
            m = build_model(name, **raw["model"]["overrides"])
        assert m.num_classes == (19 if city else 150) or "demo" in row

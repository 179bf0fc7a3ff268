"""MONAI transform chains for 3D training patches.

Cached (deterministic) part, run once per case::

    LoadCased            cases/<id>.npz -> {"image": float32 (C, D, H, W), "label": uint8 (1, D, H, W)}
    ForegroundLocationsd {"fg": {class: flat voxel indices (<= 10,000 per class)}}

Random part, run per draw (seeded per draw by the dataset, so the result never depends on worker count)::

    RandPosNegCropd      roi crop centred on a foreground voxel with probability pos / (pos + neg), else uniform
    flips, quarter turns, affine (rotation + zoom), intensity scale/shift, Gaussian noise, gamma  (config)
    Finalized            plain contiguous tensors: image float32 (C, *roi), label uint8 (1, *roi)
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import zipfile

import torch
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd,
                              RandGaussianNoised, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd,
                              Randomizable, Transform)

from ..errors import UserError

MAX_FG_LOCATIONS = 10_000  # per class, as nnU-Net samples its class locations


def _count_non_finite(image: np.ndarray) -> int:
    """NaN/inf voxels of ``(C, D, H, W)`` float32, counted plane by plane (no whole-volume boolean temporary)."""
    bad = 0
    for c in range(image.shape[0]):
        for d in range(image.shape[1]):
            plane = image[c, d]
            if not np.isfinite(plane).all():
                bad += int(plane.size - np.isfinite(plane).sum())
    return bad


def load_case_arrays(image_path, label_path=None):
    """Read one preprocessed case: image float32 (C, D, H, W), label uint8 (D, H, W) or None.

    Refused (one-line :class:`UserError` naming the file): unreadable or pickled content, voxels that are not real
    numbers (complex, object), NaN/inf image voxels (they would make the loss and then the weights NaN), a label
    map that is not whole numbers in 0..255, shapes that do not fit."""
    def array(z, key, path):
        a = z[key]
        if a.dtype.kind not in ("biu" if key == "label" else "biuf"):
            what = "whole numbers" if key == "label" else "real numbers"
            raise UserError(f"preprocessed {key} has voxel type {a.dtype}, not {what}", path)
        if key == "label" and a.size and a.dtype.kind != "b" and (int(a.min()) < 0 or int(a.max()) > 255):
            raise UserError(f"preprocessed label values {int(a.min())}..{int(a.max())} are outside 0..255", path)
        return np.asarray(a, dtype=np.float32 if key == "image" else np.uint8)

    try:
        with np.load(image_path, allow_pickle=False) as z:
            image = array(z, "image", image_path)
            label = array(z, "label", image_path) if (label_path in (None, image_path) and
                                                      "label" in z.files) else None
        if label is None and label_path not in (None, image_path):
            with np.load(label_path, allow_pickle=False) as z:
                label = array(z, "label", label_path)
    except FileNotFoundError:
        raise UserError("case file not found (re-run glam3d-preprocess?)", image_path) from None
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # incl. pickled objects refused
        raise UserError(f"cannot read preprocessed case ({' '.join(str(err).split())})", image_path) from None
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise UserError(f"image must be (C, D, H, W), got shape {image.shape}", image_path)
    if label is not None and label.shape != image.shape[1:]:
        raise UserError(f"label shape {label.shape} does not match image {image.shape[1:]}", image_path)
    bad = _count_non_finite(image)
    if bad:
        raise UserError(f"{bad} NaN/inf voxel(s) in the preprocessed image: refused (re-run glam3d-preprocess on "
                        f"this case)", image_path)
    return image, label


class LoadCased(Transform):
    """``{"id", "image": path, "label": path}`` -> ``{"id", "image": Tensor (C,D,H,W), "label": Tensor (1,D,H,W)}``."""

    def __call__(self, data):
        image, label = load_case_arrays(data["image"], data.get("label"))
        want = data.get("channels")
        if want is not None and image.shape[0] != int(want):
            raise UserError(f"has {image.shape[0]} channel(s) but dataset.json field 'modality' declares {want}",
                            data["image"])
        out = {"id": data["id"], "image": torch.from_numpy(image)}
        if label is not None:
            out["label"] = torch.from_numpy(label[None])
        return out


class ForegroundLocationsd(Transform):
    """Add ``"fg"``: ``{class index: int64 array of flat voxel indices}`` (at most ``max_per_class`` each, taken
    at regular strides so the result is deterministic)."""

    def __init__(self, max_per_class: int = MAX_FG_LOCATIONS):
        self.max_per_class = max_per_class

    def __call__(self, data):
        label = np.asarray(data["label"][0]).reshape(-1)
        fg: Dict[int, np.ndarray] = {}
        for c in np.unique(label):
            if c == 0:
                continue
            idx = np.flatnonzero(label == c)
            if len(idx) > self.max_per_class:
                idx = idx[np.linspace(0, len(idx) - 1, self.max_per_class).astype(np.int64)]
            fg[int(c)] = idx.astype(np.int64)
        out = dict(data)
        out["fg"] = fg
        return out


class RandPosNegCropd(Randomizable, Transform):
    """Crop ``roi_size`` from image and label: with probability ``pos / (pos + neg)`` centred on a foreground voxel
    (a present class chosen uniformly when ``class_balanced``), else anywhere. Volumes smaller than the ROI are
    zero-padded. Returns new (cloned) tensors, never views of the cached volume. Equivalent to MONAI's
    ``RandCropByPosNegLabeld`` with precomputed indices, without storing every background index."""

    def __init__(self, roi_size: Sequence[int], pos: float = 1.0, neg: float = 1.0, class_balanced: bool = True):
        self.roi_size = tuple(int(s) for s in roi_size)
        self.pos_ratio = pos / (pos + neg)
        self.class_balanced = class_balanced

    def randomize(self, data=None):
        pass

    def _center(self, shape, fg):
        if fg and self.R.rand() < self.pos_ratio:
            classes = sorted(fg)
            if self.class_balanced:
                locs = fg[classes[self.R.randint(len(classes))]]
                flat = locs[self.R.randint(len(locs))]
            else:
                sizes = np.array([len(fg[c]) for c in classes], dtype=np.int64)
                k = self.R.randint(int(sizes.sum()))
                ci = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
                flat = fg[classes[ci]][k - (int(np.cumsum(sizes)[ci - 1]) if ci else 0)]
            center = np.unravel_index(int(flat), shape)
            return [int(c) - r // 2 for c, r in zip(center, self.roi_size)]
        return [self.R.randint(0, max(0, s - r) + 1) for s, r in zip(shape, self.roi_size)]

    def __call__(self, data):
        image, label = data["image"], data["label"]
        shape = tuple(image.shape[1:])
        starts = self._center(shape, data.get("fg"))
        starts = [min(max(0, st), max(0, s - r)) for st, s, r in zip(starts, shape, self.roi_size)]
        sl = tuple(slice(st, st + r) for st, r in zip(starts, self.roi_size))
        img = torch.as_tensor(image)[(slice(None),) + sl].clone()
        lab = torch.as_tensor(label)[(slice(None),) + sl].clone()
        if tuple(img.shape[1:]) != self.roi_size:
            pad = []
            for got, want in zip(reversed(img.shape[1:]), reversed(self.roi_size)):
                extra = want - got
                pad += [extra // 2, extra - extra // 2]
            img = torch.nn.functional.pad(img, pad)
            lab = torch.nn.functional.pad(lab, pad)
        return {"image": img, "label": lab}


class Finalized(Transform):
    """Plain contiguous tensors (no MONAI metadata): image float32, label uint8."""

    def __call__(self, data):
        img = data["image"]
        lab = data["label"]
        img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
        lab = lab.as_tensor() if hasattr(lab, "as_tensor") else torch.as_tensor(lab)
        if lab.dtype != torch.uint8:
            lab = torch.round(lab.float()).to(torch.uint8)
        return {"image": img.float().contiguous(), "label": lab.contiguous()}


def cached_transforms(with_label_locations: bool = True) -> Compose:
    ts = [LoadCased()]
    if with_label_locations:
        ts.append(ForegroundLocationsd())
    return Compose(ts)


def train_transforms(data_cfg) -> Compose:
    """The random per-draw chain from ``cfg.data`` (crop, then ``cfg.data.augment``)."""
    a = data_cfg.augment
    roi = list(data_cfg.roi_size)
    keys = ["image", "label"]
    ts = [RandPosNegCropd(roi, data_cfg.pos, data_cfg.neg, data_cfg.class_balanced)]
    if a.affine_prob > 0:
        ts.append(RandAffined(keys, prob=a.affine_prob,
                              rotate_range=[math.radians(d) for d in a.rotate_deg],
                              scale_range=[a.scale_range] * 3 if a.scale_range > 0 else None,
                              mode=("bilinear", "nearest"), padding_mode="zeros", cache_grid=True,
                              spatial_size=roi))
    if a.flip_prob > 0:
        for ax in a.flip_axes:
            if ax not in (0, 1, 2):
                raise UserError(f"config key 'data.augment.flip_axes' must hold spatial axes 0, 1, 2, got {ax}")
            ts.append(RandFlipd(keys, prob=a.flip_prob, spatial_axis=ax))
    if a.rotate90_prob > 0:
        if roi[1] != roi[2]:
            raise UserError(f"config key 'data.augment.rotate90_prob' needs a square H x W crop, "
                            f"data.roi_size is {roi}")
        ts.append(RandRotate90d(keys, prob=a.rotate90_prob, max_k=3, spatial_axes=(1, 2)))
    if a.intensity_scale_prob > 0:
        ts.append(RandScaleIntensityd("image", factors=a.intensity_scale, prob=a.intensity_scale_prob))
    if a.intensity_shift_prob > 0:
        ts.append(RandShiftIntensityd("image", offsets=a.intensity_shift, prob=a.intensity_shift_prob))
    if a.noise_prob > 0:
        ts.append(RandGaussianNoised("image", prob=a.noise_prob, std=a.noise_std))
    if a.gamma_prob > 0:
        ts.append(RandAdjustContrastd("image", prob=a.gamma_prob, gamma=tuple(a.gamma_range)))
    ts.append(Finalized())
    return Compose(ts)


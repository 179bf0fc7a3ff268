"""2D natural-image segmentation data: ADE20K and Cityscapes readers, a synthetic set, the paper's augmentation.

Folder layouts (the official downloads, unpacked as they come):

ADE20K (SceneParsing ``ADEChallengeData2016.zip``)::

    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_*.png    (uint8 PNG, 0 = unlabelled, 1..150)

``root`` may be ``ROOT`` or the ``ADEChallengeData2016`` folder itself. Labels are shifted by -1 with 0 → 255
(mmseg's ``reduce_zero_label``): training ids 0..149, 255 ignored. A ``classes.json`` (a list of names) beside
``images/`` overrides the 150 ADE20K class names and class count (the synthetic set writes one).

Cityscapes (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``)::

    ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png        (label ids 0..33)

The 34 label ids are mapped to the 19 training ids (road … bicycle), every other id to 255 (ignored).

Pairs are matched by name. A missing partner, an image and annotation of different sizes, a label id outside
the dataset's range, an annotation that is not a single-channel PNG, or a file that cannot be decoded raises
:class:`glam3d.errors.UserError` with one line naming the file. Pairing is checked when the dataset is built;
the per-file checks when an item is read (``dataset.verify()`` reads every pair up front).

Items are ``{"image": float32 (3, H, W) normalised, "label": int64 (H, W) with 255 = ignore, "id": str}``.

Augmentation (the mmseg recipe of Swin / GLAM, written with numpy + PIL only): random rescale keeping the aspect
ratio (``img_scale`` × ratio in 0.5–2.0), random crop (512² ADE20K, 769² Cityscapes) with ``cat_max_ratio``
(retry up to 10 times while one class covers more than that fraction of the crop), horizontal flip, photometric
distortion (brightness, contrast, saturation, hue), ImageNet normalisation, padding to the crop size (image 0,
label 255). Validation: resize keeping the ratio to ``test_scale`` (ADE20K: (2048, 512), i.e. short side 512)
and normalise; the label keeps its original size (the metrics resize the logits to it). Randomness comes from
``torch`` so every DataLoader worker draws different augmentations and ``torch.manual_seed`` reproduces them.

Example::

    train_ds, val_ds, names = build_2d_datasets({"dataset": "ade20k", "root": "/data/ade"})
    make_synthetic_ade20k("/tmp/synth", num_train=16, num_val=4, size=(64, 64), num_classes=4)
    train_ds, val_ds, names = build_2d_datasets({"dataset": "synthetic", "root": "/tmp/synth",
                                                "crop_size": [64, 64]})
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import UserError

__all__ = [
    "ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_ID_TO_TRAINID", "IMAGENET_MEAN", "IMAGENET_STD",
    "ADE20KDataset", "CityscapesDataset", "make_synthetic_ade20k",
    "Compose", "RandomResize", "Resize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion", "Normalize", "Pad",
    "build_2d_transforms", "build_2d_datasets", "DATA_DEFAULTS",
]

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# cityscapesScripts labels.py: label id -> train id (ids 0..33; those not listed are ignored)
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NUM_IDS = 34

# mmseg's ImageNet normalisation, on 0..255 RGB
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

IGNORE_INDEX = 255
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------- file reading


def read_rgb(path) -> np.ndarray:
    """An image file as uint8 ``(H, W, 3)`` RGB; UserError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError("image file not found", path) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image (corrupt or not an image file): {e}", path) from None


def read_label_png(path) -> np.ndarray:
    """A single-channel label PNG (mode ``L``, ``P`` or 16-bit ``I;16``/``I``) as an int32 ``(H, W)`` array of
    the stored values (palette indices for ``P``)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise UserError(f"annotation must be a single-channel PNG of class ids, got a {mode} image", path)
            return np.asarray(im, dtype=np.int32) if mode != "P" else np.asarray(im).astype(np.int32)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError("annotation file not found", path) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read annotation PNG (corrupt or not a PNG): {e}", path) from None


# --------------------------------------------------------------------------------------------- datasets


class _PairedSegmentation(torch.utils.data.Dataset):
    """Image/annotation pairs plus a label mapping; subclasses fill ``self.pairs`` and ``_map_label``."""

    num_classes: int
    class_names: Tuple[str, ...]
    ignore_index = IGNORE_INDEX

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform
        self.pairs: List[Tuple[Path, Path, str]] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw pair: uint8 RGB ``(H, W, 3)`` and uint8 training label ``(H, W)`` (255 = ignore)."""
        img_path, ann_path, _ = self.pairs[index]
        img = read_rgb(img_path)
        raw = read_label_png(ann_path)
        if raw.shape != img.shape[:2]:
            raise UserError(f"annotation is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {img_path.name} is "
                            f"{img.shape[1]}x{img.shape[0]}", ann_path)
        return img, self._map_label(raw, ann_path)

    def __getitem__(self, index: int) -> dict:
        img, label = self.load(index)
        if self.transform is not None:
            img, label = self.transform(img, label)
        if not isinstance(img, torch.Tensor):
            img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        if not isinstance(label, torch.Tensor):
            label = torch.from_numpy(np.array(label, dtype=np.int64))
        return {"image": img, "label": label, "id": self.pairs[index][2]}

    def verify(self) -> int:
        """Read every pair (raising the first problem as a UserError); returns the number of pairs."""
        for i in range(len(self)):
            self.load(i)
        return len(self)


def _split_name(split: str, aliases: dict, allowed: Sequence[str], what: str) -> str:
    split = aliases.get(split, split)
    if split not in allowed:
        raise UserError(f"unknown {what} split {split!r}; expected one of {', '.join(allowed)}")
    return split


def _check_pairs(images: dict, anns: dict, image_pattern: Path, ann_pattern: Path, empty: str) -> None:
    """Every image has its annotation and vice versa (keyed by name; ``*_pattern`` format the expected partner's
    path from a key); raise a one-line :class:`UserError` naming the orphan file."""
    for key, p in images.items():
        if key not in anns:
            raise UserError(f"image has no annotation (expected {str(ann_pattern).format(key)})", p)
    for key, p in anns.items():
        if key not in images:
            raise UserError(f"annotation has no image (expected {str(image_pattern).format(key)})", p)
    if not images:
        raise UserError(empty, image_pattern.parent)


class ADE20KDataset(_PairedSegmentation):
    """ADE20K (SceneParsing, 150 classes) in the ``ADEChallengeData2016`` layout; see the module docstring.

    ``split``: ``"training"``/``"train"`` or ``"validation"``/``"val"``. ``reduce_zero_label`` (default True):
    file value 0 → 255, v → v-1.
    """

    def __init__(self, root, split: str = "training", transform: Optional[Callable] = None,
                 reduce_zero_label: bool = True):
        super().__init__(transform)
        split = _split_name(split, {"train": "training", "val": "validation"}, ("training", "validation"), "ADE20K")
        base = self.find_root(root)
        self.root = base
        names_file = base / "classes.json"
        if names_file.is_file():
            try:
                names = json.loads(names_file.read_text())
                assert isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            except Exception:
                raise UserError("classes.json must be a non-empty JSON list of class names", names_file) from None
            self.class_names = tuple(names)
        else:
            self.class_names = ADE20K_CLASSES
        self.num_classes = len(self.class_names)
        self.reduce_zero_label = reduce_zero_label
        img_dir, ann_dir = base / "images" / split, base / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise UserError("folder missing from the ADE20K layout (expected images/<split> and "
                                "annotations/<split>)", d)
        images = {p.stem: p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in _IMAGE_EXTS}
        anns = {p.stem: p for p in sorted(ann_dir.iterdir()) if p.suffix.lower() == ".png"}
        _check_pairs(images, anns, img_dir / "{}.jpg", ann_dir / "{}.png", "no images (*.jpg) found")
        self.pairs = [(images[s], anns[s], s) for s in sorted(images)]
        lut = np.full(256, -1, dtype=np.int32)
        if reduce_zero_label:
            lut[0] = IGNORE_INDEX
            lut[1:self.num_classes + 1] = np.arange(self.num_classes)
        else:
            lut[:self.num_classes] = np.arange(self.num_classes)
            lut[IGNORE_INDEX] = IGNORE_INDEX
        self._lut = lut

    @staticmethod
    def find_root(root) -> Path:
        root = Path(root)
        for cand in (root / "ADEChallengeData2016", root):
            if (cand / "images").is_dir() and (cand / "annotations").is_dir():
                return cand
        raise UserError("not an ADE20K folder: expected ADEChallengeData2016/images/{training,validation} and "
                        "ADEChallengeData2016/annotations/{training,validation}", root)

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        bad = (raw < 0) | (raw > 255)
        if not bad.any():
            mapped = self._lut[raw]
            bad = mapped < 0
        if bad.any():
            v = int(raw[bad].flat[0])
            hi = self.num_classes if self.reduce_zero_label else self.num_classes - 1
            raise UserError(f"unknown label id {v} (expected 0..{hi}"
                            f"{'' if self.reduce_zero_label else ' or 255'})", path)
        return mapped.astype(np.uint8)


class CityscapesDataset(_PairedSegmentation):
    """Cityscapes fine annotations (19 training classes); see the module docstring. ``split``: train/val/test."""

    class_names = CITYSCAPES_CLASSES
    num_classes = len(CITYSCAPES_CLASSES)

    def __init__(self, root, split: str = "train", transform: Optional[Callable] = None):
        super().__init__(transform)
        split = _split_name(split, {"training": "train", "validation": "val"}, ("train", "val", "test"),
                            "Cityscapes")
        root = Path(root)
        self.root = root
        img_dir, ann_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise UserError("folder missing from the Cityscapes layout (expected leftImg8bit/<split>/<city> "
                                "and gtFine/<split>/<city>)", d)
        images = {str(p.relative_to(img_dir))[:-len("_leftImg8bit.png")]: p
                  for p in sorted(img_dir.glob("*/*_leftImg8bit.png"))}
        anns = {str(p.relative_to(ann_dir))[:-len("_gtFine_labelIds.png")]: p
                for p in sorted(ann_dir.glob("*/*_gtFine_labelIds.png"))}
        _check_pairs(images, anns, img_dir / "{}_leftImg8bit.png", ann_dir / "{}_gtFine_labelIds.png",
                     "no <city>/*_leftImg8bit.png images found")
        self.pairs = [(images[k], anns[k], Path(k).name) for k in sorted(images)]
        lut = np.full(256, -1, dtype=np.int32)
        lut[:CITYSCAPES_NUM_IDS] = IGNORE_INDEX
        for i, t in CITYSCAPES_ID_TO_TRAINID.items():
            lut[i] = t
        self._lut = lut

    def _map_label(self, raw: np.ndarray, path: Path) -> np.ndarray:
        bad = (raw < 0) | (raw > 255)
        if not bad.any():
            mapped = self._lut[raw]
            bad = mapped < 0
        if bad.any():
            raise UserError(f"unknown Cityscapes label id {int(raw[bad].flat[0])} (expected 0..33)", path)
        return mapped.astype(np.uint8)


# --------------------------------------------------------------------------------------------- synthetic set


def _synthetic_pair(rng: np.random.Generator, size: Tuple[int, int], num_classes: int, palette: np.ndarray,
                    periods: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One image (uint8 H×W×3) and its annotation in ADE20K file values (0 unlabelled, 1..K)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    label = np.ones((h, w), np.uint8)  # file value 1 = class 0 ("background" texture)
    # textured background: random oriented stripes + noise
    ang = rng.uniform(0, math.pi)
    freq = rng.uniform(0.15, 0.4)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * math.cos(ang) + yy * math.sin(ang)))
    img = palette[0][None, None, :] * (0.6 + 0.4 * stripes[..., None])
    boundary = np.zeros((h, w), bool)
    n_shapes = int(rng.integers(2, 5))
    for _ in range(n_shapes):
        c = int(rng.integers(1, num_classes))  # training class c, file value c+1
        kind = int(rng.integers(0, 3))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
        if kind == 0:  # ellipse
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            inside, edge = d <= 1.0, (d > 0.8) & (d <= 1.25)
        elif kind == 1:  # rectangle
            d = np.maximum(np.abs(yy - cy) / ry, np.abs(xx - cx) / rx)
            inside, edge = d <= 1.0, (d > 0.9) & (d <= 1.1)
        else:  # triangle (apex up)
            t = (yy - (cy - ry)) / (2 * ry)  # 0 at apex, 1 at base
            half = t * rx
            inside = (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= half)
            grown = (t >= -0.08) & (t <= 1.08) & (np.abs(xx - cx) <= half + 1.5)
            edge = grown & ~((t >= 0.06) & (t <= 0.94) & (np.abs(xx - cx) <= half - 1.5))
        # class texture: checker of a class-specific period on the class colour
        p = periods[c]
        checker = ((np.floor(yy / p) + np.floor(xx / p)) % 2)[..., None]
        tex = palette[c][None, None, :] * (0.75 + 0.25 * checker)
        img = np.where(inside[..., None], tex, img)
        label[inside] = c + 1
        boundary = (boundary & ~inside) | edge
    label[boundary] = 0  # unlabelled rim around shapes (ADE20K's "other", ignored after reduce_zero_label)
    img = img + rng.normal(0, 8.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_synthetic_ade20k(root, num_train: int = 32, num_val: int = 8, size: Sequence[int] = (96, 128),
                          num_classes: int = 5, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a small synthetic segmentation set in the ADE20K layout and return its ``ADEChallengeData2016`` path.

    ``num_classes`` training classes (2..150): class 0 is a striped background, classes 1..K-1 are ellipses,
    rectangles and triangles, each class with its own colour and checker period (so a network must look at
    texture, not only shape). Annotation file values: 0 = unlabelled rim around each shape (ignored), c+1 for
    training class c. Images are JPEG like ADE20K's; ``classes.json`` holds the class names. Deterministic given
    ``seed``. An existing complete set with the same parameters is reused unless ``overwrite``.
    """
    if not 2 <= int(num_classes) <= 150:
        raise ValueError(f"num_classes must be in 2..150, got {num_classes}")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    base = Path(root) / "ADEChallengeData2016"
    params = {"num_train": int(num_train), "num_val": int(num_val), "size": [h, w],
              "num_classes": int(num_classes), "seed": int(seed)}
    stamp = base / "synthetic.json"
    if stamp.is_file() and not overwrite:
        try:
            if json.loads(stamp.read_text()) == params:
                return base
        except json.JSONDecodeError:
            pass
    rng = np.random.default_rng(seed)
    palette = np.concatenate([[[110.0, 110.0, 110.0]], rng.uniform(30, 235, size=(num_classes - 1, 3))], 0)
    periods = np.concatenate([[1e9], rng.integers(2, 7, size=num_classes - 1).astype(np.float64)])
    names = ["background"] + [f"shape{c}" for c in range(1, num_classes)]
    for split, n, prefix in (("training", num_train, "ADE_train"), ("validation", num_val, "ADE_val")):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(int(n)):
            img, lab = _synthetic_pair(rng, (h, w), num_classes, palette, periods)
            stem = f"{prefix}_{i + 1:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(lab, mode="L").save(base / "annotations" / split / f"{stem}.png")
    (base / "classes.json").write_text(json.dumps(names) + "\n")
    stamp.write_text(json.dumps(params) + "\n")
    return base


# --------------------------------------------------------------------------------------------- transforms
# Each transform maps (image uint8/float (H, W, 3) numpy, label uint8 (H, W) numpy) -> the same pair, except
# Normalize (-> float32 (3, H, W) tensor) and Pad (works on either). Randomness from torch (per-worker seeds).


def _rand() -> float:
    return float(torch.rand(()))


def _uniform(a: float, b: float) -> float:
    return a + (b - a) * _rand()


def _randint(lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, ()))


def _pair2(v, name: str) -> Tuple[int, int]:
    if isinstance(v, (int, float)):
        return int(v), int(v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _rescale_size(h: int, w: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    long_s, short_s = max(scale), min(scale)
    f = min(long_s / max(h, w), short_s / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def _resize(img: np.ndarray, label: Optional[np.ndarray], size: Tuple[int, int]):
    h, w = size
    if img.shape[:2] == (h, w):
        return img, label
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return img, label


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img, label):
        for t in self.transforms:
            img, label = t(img, label)
        return img, label

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


class RandomResize:
    """Keep-ratio rescale to ``img_scale × r``, ``r ~ U(ratio_range)`` (image bilinear, label nearest)."""

    def __init__(self, img_scale=(2048, 512), ratio_range=(0.5, 2.0)):
        self.img_scale = _pair2(img_scale, "img_scale")
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def __call__(self, img, label):
        r = _uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
        return _resize(img, label, _rescale_size(img.shape[0], img.shape[1], scale))


class Resize:
    """Deterministic keep-ratio rescale to ``img_scale``; ``resize_label=False`` (testing) keeps the label."""

    def __init__(self, img_scale=(2048, 512), resize_label: bool = False):
        self.img_scale = _pair2(img_scale, "img_scale")
        self.resize_label = resize_label

    def __call__(self, img, label):
        size = _rescale_size(img.shape[0], img.shape[1], self.img_scale)
        new_img, new_label = _resize(img, label if self.resize_label else None, size)
        return new_img, (new_label if self.resize_label else label)


class RandomCrop:
    """Random ``crop_size`` (H, W) crop (smaller images are cropped to themselves; :class:`Pad` fills up).

    ``cat_max_ratio < 1``: up to 10 draws until no single class (255 excluded) covers ``>= cat_max_ratio`` of the
    crop (mmseg's rule; the last draw is kept otherwise).
    """

    def __init__(self, crop_size=(512, 512), cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX):
        self.crop_size = _pair2(crop_size, "crop_size")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index

    def _bbox(self, h, w):
        ch, cw = self.crop_size
        y0 = _randint(0, max(h - ch, 0))
        x0 = _randint(0, max(w - cw, 0))
        return y0, min(y0 + ch, h), x0, min(x0 + cw, w)

    def __call__(self, img, label):
        h, w = img.shape[:2]
        box = self._bbox(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = label[box[0]:box[1], box[2]:box[3]]
                vals, cnt = np.unique(crop, return_counts=True)
                cnt = cnt[vals != self.ignore_index]
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
                box = self._bbox(h, w)
        y0, y1, x0, x1 = box
        return img[y0:y1, x0:x1], label[y0:y1, x0:x1]


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = float(prob)

    def __call__(self, img, label):
        if _rand() < self.prob:
            return img[:, ::-1], label[:, ::-1]
        return img, label


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 255] -> H in degrees [0, 360), S in [0, 1], V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    mn = rgb.min(-1)
    d = v - mn
    s = np.where(v > 0, d / np.maximum(v, 1e-12), 0.0)
    dd = np.maximum(d, 1e-12)
    h = np.where(v == r, (g - b) / dd, np.where(v == g, 2.0 + (b - r) / dd, 4.0 + (r - g) / dd))
    h = np.where(d > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    c = v * s
    hp = h / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    z = np.zeros_like(c)
    i = np.floor(hp).astype(np.int64) % 6
    r = np.choose(i, [c, x, z, z, x, c])
    g = np.choose(i, [x, c, c, x, z, z])
    b = np.choose(i, [z, z, x, c, c, x])
    m = v - c
    return np.stack([r + m, g + m, b + m], -1)


class PhotoMetricDistortion:
    """mmseg's photometric distortion, each step with probability 0.5: brightness ``+U(-32, 32)``; contrast
    ``×U(0.5, 1.5)`` (before or after the colour steps, chosen at random); saturation ``×U(0.5, 1.5)``; hue
    ``+U{-18..18}`` in OpenCV units (2°). Values are clipped to [0, 255] after every step."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, img, label):
        x = img.astype(np.float32)
        if _rand() < 0.5:
            x = np.clip(x + _uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = _rand() < 0.5
        if contrast_first and _rand() < 0.5:
            x = np.clip(x * _uniform(*self.contrast_range), 0, 255)
        do_sat, do_hue = _rand() < 0.5, _rand() < 0.5
        if do_sat or do_hue:
            hsv = _rgb_to_hsv(x)
            if do_sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * _uniform(*self.saturation_range), 0, 1)
            if do_hue:
                hsv[..., 0] = (hsv[..., 0] + 2.0 * _randint(-self.hue_delta, self.hue_delta)) % 360.0
            x = np.clip(_hsv_to_rgb(hsv), 0, 255)
        if not contrast_first and _rand() < 0.5:
            x = np.clip(x * _uniform(*self.contrast_range), 0, 255)
        return x.astype(np.float32), label


class Normalize:
    """``(x - mean) / std`` on 0..255 RGB; returns a float32 ``(3, H, W)`` tensor and an int64 label tensor."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img, label):
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32).transpose(2, 0, 1))
        x = (x - self.mean) / self.std
        label = torch.from_numpy(np.array(label, dtype=np.int64))  # a copy: PIL-backed arrays are read-only
        return x, label


class Pad:
    """Pad bottom/right up to ``size`` (H, W): image with ``pad_val`` (0 = the mean colour after Normalize),
    label with ``seg_pad_val`` (255)."""

    def __init__(self, size, pad_val: float = 0.0, seg_pad_val: int = IGNORE_INDEX):
        self.size = _pair2(size, "size")
        self.pad_val = pad_val
        self.seg_pad_val = seg_pad_val

    def __call__(self, img, label):
        if isinstance(img, torch.Tensor):
            h, w = img.shape[-2:]
            ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
            if ph or pw:
                img = torch.nn.functional.pad(img, (0, pw, 0, ph), value=self.pad_val)
                label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=self.seg_pad_val)
            return img, label
        h, w = img.shape[:2]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_val)
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.seg_pad_val)
        return img, label


# --------------------------------------------------------------------------------------------- configs

#: per-dataset defaults for :func:`build_2d_datasets` (``img_scale`` = (long, short) side bounds, ``crop_size``
#: and sizes (H, W)). ``test_scale`` None: validation images are not resized.
DATA_DEFAULTS = {
    "ade20k": {"img_scale": [2048, 512], "crop_size": [512, 512], "test_scale": [2048, 512],
               "cat_max_ratio": 0.75},
    "cityscapes": {"img_scale": [2048, 1024], "crop_size": [769, 769], "test_scale": None,
                   "cat_max_ratio": 0.75},
    "synthetic": {"img_scale": None, "crop_size": [96, 96], "test_scale": None, "cat_max_ratio": 1.0},
}
_COMMON_DEFAULTS = {"root": None, "ratio_range": [0.5, 2.0], "flip_prob": 0.5, "photometric": True,
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": None,
                    "train_split": None, "val_split": None, "reduce_zero_label": True,
                    "synthetic": {},
                    # consumed by the engine's DataLoader, accepted here so one `data:` section serves both
                    "batch_size": 2, "workers": 0}
_SYNTH_DEFAULTS = {"num_train": 32, "num_val": 8, "size": [96, 128], "num_classes": 5, "seed": 0}


def build_2d_transforms(cfg: dict, train: bool) -> Compose:
    """The train or validation transform for a fully resolved data config (see :func:`build_2d_datasets`)."""
    if train:
        ts: List[Callable] = []
        if cfg["img_scale"] is not None:
            ts.append(RandomResize(cfg["img_scale"], cfg["ratio_range"]))
        ts += [RandomCrop(cfg["crop_size"], cfg["cat_max_ratio"]), RandomFlip(cfg["flip_prob"])]
        if cfg["photometric"]:
            ts.append(PhotoMetricDistortion())
        ts += [Normalize(cfg["mean"], cfg["std"]), Pad(cfg["crop_size"])]
        return Compose(ts)
    ts = []
    if cfg["test_scale"] is not None:
        ts.append(Resize(cfg["test_scale"], resize_label=False))
    ts.append(Normalize(cfg["mean"], cfg["std"]))
    return Compose(ts)


def resolve_2d_data_config(cfg_data: dict) -> dict:
    """Fill defaults and check keys; UserError naming the option for a bad one."""
    if not isinstance(cfg_data, dict):
        raise UserError(f"data config must be a mapping, got {type(cfg_data).__name__}")
    name = str(cfg_data.get("dataset", "")).lower()
    if name not in DATA_DEFAULTS:
        raise UserError(f"data.dataset must be one of {', '.join(DATA_DEFAULTS)}, got {cfg_data.get('dataset')!r}")
    cfg = {"dataset": name, **_COMMON_DEFAULTS, **DATA_DEFAULTS[name]}
    unknown = sorted(set(cfg_data) - set(cfg))
    if unknown:
        raise UserError(f"unknown data option(s) {', '.join('data.' + k for k in unknown)}; known: "
                        f"{', '.join(sorted(cfg))}")
    cfg.update(cfg_data)
    cfg["dataset"] = name
    if not cfg["root"]:
        raise UserError("data.root is required (the dataset folder)")
    if name == "synthetic":
        bad = sorted(set(cfg["synthetic"] or {}) - set(_SYNTH_DEFAULTS))
        if bad:
            raise UserError(f"unknown data.synthetic option(s) {', '.join(bad)}; known: "
                            f"{', '.join(_SYNTH_DEFAULTS)}")
        cfg["synthetic"] = {**_SYNTH_DEFAULTS, **(cfg["synthetic"] or {})}
    for key in ("crop_size",):
        try:
            cfg[key] = list(_pair2(cfg[key], key))
        except (TypeError, ValueError):
            raise UserError(f"data.{key} must be an int or [H, W], got {cfg[key]!r}") from None
    for key in ("img_scale", "test_scale"):
        if cfg[key] is not None:
            try:
                cfg[key] = list(_pair2(cfg[key], key))
            except (TypeError, ValueError):
                raise UserError(f"data.{key} must be null or [long, short], got {cfg[key]!r}") from None
    rr = cfg["ratio_range"]
    if not (isinstance(rr, (list, tuple)) and len(rr) == 2 and 0 < float(rr[0]) <= float(rr[1])):
        raise UserError(f"data.ratio_range must be [low, high] with 0 < low <= high, got {rr!r}")
    if not 0 < float(cfg["cat_max_ratio"]) <= 1:
        raise UserError(f"data.cat_max_ratio must be in (0, 1], got {cfg['cat_max_ratio']!r}")
    for key in ("mean", "std"):
        if len(cfg[key]) != 3:
            raise UserError(f"data.{key} must have 3 values (RGB), got {cfg[key]!r}")
    return cfg


def build_2d_datasets(cfg_data: dict):
    """``(train_ds, val_ds, class_names)`` from the ``data:`` section of a 2D experiment config.

    Keys (defaults per dataset in :data:`DATA_DEFAULTS`):
    ``dataset`` (ade20k | cityscapes | synthetic), ``root`` (the dataset folder; for ``synthetic`` the set is
    generated there first if missing), ``crop_size`` [H, W], ``img_scale`` [long, short] (train rescale base,
    null = none), ``ratio_range`` [0.5, 2.0], ``cat_max_ratio``, ``flip_prob``, ``photometric``, ``mean``,
    ``std`` (0..255 RGB), ``test_scale`` [long, short] or null, ``num_classes`` (optional check against the
    dataset), ``train_split``/``val_split`` (default training/validation, train/val), ``reduce_zero_label``
    (ADE20K layout only), ``synthetic`` {num_train, num_val, size [H, W], num_classes, seed}; ``batch_size``
    and ``workers`` are accepted and left to the engine's DataLoader.
    """
    cfg = resolve_2d_data_config(cfg_data)
    train_tf, val_tf = build_2d_transforms(cfg, True), build_2d_transforms(cfg, False)
    name = cfg["dataset"]
    if name == "cityscapes":
        tr = CityscapesDataset(cfg["root"], cfg["train_split"] or "train", train_tf)
        va = CityscapesDataset(cfg["root"], cfg["val_split"] or "val", val_tf)
    else:
        root = cfg["root"]
        if name == "synthetic":
            s = cfg["synthetic"]
            root = make_synthetic_ade20k(root, s["num_train"], s["num_val"], s["size"], s["num_classes"], s["seed"])
        tr = ADE20KDataset(root, cfg["train_split"] or "training", train_tf, cfg["reduce_zero_label"])
        va = ADE20KDataset(root, cfg["val_split"] or "validation", val_tf, cfg["reduce_zero_label"])
    if cfg["num_classes"] is not None and int(cfg["num_classes"]) != tr.num_classes:
        raise UserError(f"data.num_classes is {cfg['num_classes']} but the {name} data at {cfg['root']} has "
                        f"{tr.num_classes} classes")
    return tr, va, list(tr.class_names)

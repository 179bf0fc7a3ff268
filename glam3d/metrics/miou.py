"""Semantic-segmentation metrics for 2D natural images: confusion matrix, per-class IoU, mIoU, pixel accuracy.

The conventions are mmseg's (the codebase the GLAM paper's ADE20K / Cityscapes numbers come from):

- one confusion matrix is accumulated over the whole evaluation set (rows: ground truth, columns: prediction),
  pixels whose ground truth is ``ignore_index`` (255) are skipped;
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; a class absent from both the ground truth and the predictions of the
  whole set has IoU ``nan`` and is left out of the mean (``mIoU = nanmean``);
- ``Acc_c = TP_c / (TP_c + FN_c)`` (``nan`` when the class never occurs), ``mAcc = nanmean``;
  ``aAcc = sum TP / number of non-ignored pixels`` (pixel accuracy).

Inference: :func:`predict_logits` runs a network on one normalised image ``(3, H, W)`` either on the whole image
(``mode="whole"``) or by sliding windows (``mode="slide"``, MONAI's ``sliding_window_inference``, constant blend,
mmseg's ``crop_size``/``stride`` parameters), and resizes the logits to the label's size (bilinear), which is how
mmseg scores images that were resized for testing. :func:`evaluate_segmentation` loops over a dataset of
``{"image": (3, H, W) float, "label": (H', W') int}`` items and returns the filled :class:`ConfusionMatrix`.

Example::

    cm = evaluate_segmentation(model, val_ds, num_classes=150, mode="slide", crop_size=512, stride=341)
    metrics = cm.metrics(class_names)
    write_miou_report("runs/ade/eval", metrics)       # miou.json, miou.csv, miou.md + printed table
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.io import atomic_write_json, atomic_write_text

__all__ = ["ConfusionMatrix", "metrics_from_confusion", "predict_logits", "evaluate_segmentation",
           "format_miou_table", "write_miou_report"]


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix, rows = ground truth, columns = prediction.

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 255]))
    >>> cm.matrix.tolist()
    [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred, target) -> None:
        """Add a prediction / ground-truth pair of label maps of the same shape (numpy or torch, any shape).

        Ground-truth values equal to ``ignore_index`` are skipped; any other ground-truth value outside
        ``[0, K)`` or a predicted value outside ``[0, K)`` raises ``ValueError``.
        """
        pred = _to_numpy(pred).astype(np.int64, copy=False).ravel()
        target = _to_numpy(target).astype(np.int64, copy=False).ravel()
        if pred.shape != target.shape:
            raise ValueError(f"prediction has {pred.size} pixels, ground truth {target.size}")
        keep = target != self.ignore_index if self.ignore_index is not None else np.ones_like(target, bool)
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        if target.size and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"ground-truth label {int(target.max() if target.max() >= k else target.min())} "
                             f"outside [0, {k}) and not the ignore index {self.ignore_index}")
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predicted label outside [0, {k})")
        self.matrix += np.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add another matrix (e.g. one gathered from another process)."""
        self.matrix += other.matrix

    def metrics(self, class_names: Optional[Sequence[str]] = None) -> dict:
        return metrics_from_confusion(self.matrix, class_names)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def metrics_from_confusion(matrix, class_names: Optional[Sequence[str]] = None) -> dict:
    """Scores from a ``(K, K)`` confusion matrix (rows ground truth, columns prediction).

    Returns ``{"mIoU", "mAcc", "aAcc", "num_pixels", "per_class": [{"class", "name", "IoU", "Acc",
    "gt_pixels", "pred_pixels"}], "confusion_matrix"}``; scores are fractions in [0, 1], ``nan`` as described in
    the module docstring (written as ``null`` in JSON).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    k = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    tp = np.diag(m)
    gt = m.sum(1)
    pr = m.sum(0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
    total = m.sum()
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "num_pixels": int(total),
        "per_class": [{"class": i, "name": names[i], "IoU": float(iou[i]), "Acc": float(acc[i]),
                       "gt_pixels": int(gt[i]), "pred_pixels": int(pr[i])} for i in range(k)],
        "confusion_matrix": np.asarray(matrix, dtype=np.int64).tolist(),
    }


# --------------------------------------------------------------------------------------------- inference


def _main_logits(out):
    """A model may return ``(main, aux)`` in training mode; evaluation always uses the first output."""
    return out[0] if isinstance(out, (list, tuple)) else out


@torch.no_grad()
def predict_logits(model: Callable, image: torch.Tensor, *, out_size: Optional[Sequence[int]] = None,
                   mode: str = "whole", crop_size: int | Sequence[int] = 512,
                   stride: int | Sequence[int] | None = None, sw_batch_size: int = 1,
                   flip: bool = False, device: str | torch.device | None = None) -> torch.Tensor:
    """Logits ``(K, *out_size)`` (float32, on the CPU) for one normalised image ``(3, H, W)``.

    ``mode="whole"``: one forward pass on the full image (the networks pad internally to multiples of their
    patch × window). ``mode="slide"``: windows of ``crop_size`` every ``stride`` (default ``2/3·crop``, mmseg's
    512/341 for ADE20K and 769/513 for Cityscapes), averaged where they overlap (MONAI
    ``sliding_window_inference``, constant weights; images smaller than the crop are padded with 0, i.e. the
    mean colour after normalisation). ``flip=True`` adds the horizontally flipped prediction.
    ``out_size`` (default ``(H, W)``): the logits are resized bilinearly to it (the label's size when the image
    was resized for testing).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if device is None:
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
    x = image.unsqueeze(0).to(device, torch.float32)

    def run(inp: torch.Tensor) -> torch.Tensor:
        if mode == "whole":
            return _main_logits(model(inp)).float()
        from monai.inferers import sliding_window_inference

        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        st = stride if stride is not None else tuple(max(1, int(round(c * 2 / 3))) for c in crop)
        st = (st, st) if isinstance(st, int) else tuple(st)
        overlap = tuple(1.0 - s / c for s, c in zip(st, crop))
        return sliding_window_inference(inp, crop, sw_batch_size, lambda t: _main_logits(model(t)).float(),
                                        overlap=overlap, mode="constant", padding_mode="constant", cval=0.0)

    logits = run(x)
    if flip:
        logits = logits + run(x.flip(-1)).flip(-1)
        logits = logits / 2
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[-2:])
    if tuple(logits.shape[-2:]) != out_size:
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits[0].cpu()


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, dataset: Iterable, num_classes: int, *,
                          ignore_index: int = 255, mode: str = "whole", crop_size=512, stride=None,
                          flip: bool = False, device=None, max_items: Optional[int] = None,
                          progress: Optional[Callable[[int], None]] = None) -> ConfusionMatrix:
    """Fill a :class:`ConfusionMatrix` over ``dataset`` (items ``{"image": (3, H, W), "label": (H', W')}``).

    The model is put in eval mode (and restored afterwards). Logits are resized to the label's size before the
    argmax, so a validation transform may resize the image (ADE20K: short side 512) and keep the original label.
    """
    cm = ConfusionMatrix(num_classes, ignore_index)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for i, item in enumerate(dataset):
            if max_items is not None and i >= max_items:
                break
            label = item["label"]
            label = label if isinstance(label, torch.Tensor) else torch.as_tensor(np.asarray(label))
            logits = predict_logits(model, item["image"], out_size=tuple(label.shape[-2:]), mode=mode,
                                    crop_size=crop_size, stride=stride, flip=flip, device=device)
            cm.update(logits.argmax(0), label)
            if progress is not None:
                progress(i + 1)
    finally:
        model.train(was_training)
    return cm


# --------------------------------------------------------------------------------------------- reports


def _pct(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def format_miou_table(metrics: dict, title: str = "") -> str:
    """A Markdown table of per-class IoU / Acc (in %) followed by the summary line."""
    rows = [f"## {title}", ""] if title else []
    rows += ["| class | name | IoU | Acc |", "|---:|---|---:|---:|"]
    for c in metrics["per_class"]:
        rows.append(f"| {c['class']} | {c['name']} | {_pct(c['IoU'])} | {_pct(c['Acc'])} |")
    rows += ["", f"**mIoU {_pct(metrics['mIoU'])}**, mAcc {_pct(metrics['mAcc'])}, aAcc {_pct(metrics['aAcc'])} "
                 f"({metrics['num_pixels']} pixels)", ""]
    return "\n".join(rows)


def _jsonable(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def write_miou_report(out_dir, metrics_or_matrix, class_names: Optional[Sequence[str]] = None, *,
                      name: str = "miou", title: str = "", extra: Optional[dict] = None,
                      print_table: bool = True) -> dict:
    """Write ``<name>.json`` (everything, incl. the confusion matrix; nan → null), ``<name>.csv`` (one row per
    class plus a ``mean`` row), ``<name>.md`` (the table) into ``out_dir`` and print the table.

    ``metrics_or_matrix``: a dict from :func:`metrics_from_confusion`, a :class:`ConfusionMatrix` or a raw
    ``(K, K)`` matrix. ``extra`` (e.g. model name, checkpoint, inference mode) is stored under ``"meta"``.
    Returns ``{"json": path, "csv": path, "md": path}``.
    """
    if isinstance(metrics_or_matrix, ConfusionMatrix):
        metrics = metrics_or_matrix.metrics(class_names)
    elif isinstance(metrics_or_matrix, dict):
        metrics = metrics_or_matrix
    else:
        metrics = metrics_from_confusion(metrics_or_matrix, class_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(metrics)
    if extra:
        doc["meta"] = dict(extra)
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv", "md": out / f"{name}.md"}
    atomic_write_json(paths["json"], _jsonable(doc))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "name", "IoU", "Acc", "gt_pixels", "pred_pixels"])
    for c in metrics["per_class"]:
        w.writerow([c["class"], c["name"], _pct(c["IoU"]), _pct(c["Acc"]), c["gt_pixels"], c["pred_pixels"]])
    w.writerow(["mean", "", _pct(metrics["mIoU"]), _pct(metrics["mAcc"]), metrics["num_pixels"], ""])
    atomic_write_text(paths["csv"], buf.getvalue())
    table = format_miou_table(metrics, title)
    atomic_write_text(paths["md"], table)
    if print_table:
        print(table)
    return {k: str(v) for k, v in paths.items()}

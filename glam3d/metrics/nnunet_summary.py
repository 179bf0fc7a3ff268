"""``summary.json`` in nnU-Net v2's schema (``nnunetv2.evaluation.evaluate_predictions``), beside glam3d's report.

Per case and label value (keys are the values as strings): ``Dice`` = 2TP / (2TP + FP + FN), ``IoU`` =
TP / (TP + FP + FN) (both NaN, written ``null``, when the label is in neither map), ``TP``, ``FP``, ``FN``, ``TN``,
``n_pred``, ``n_ref``. ``mean``: per label, the mean over cases of each metric, NaN excluded (nnU-Net's
``np.nanmean``); ``foreground_mean``: the mean of those over labels (``np.mean``, as nnU-Net: NaN if a label is
absent from every case). Voxels of an nnU-Net ignore label are in
no count.
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def label_metrics(n_pred: int, n_ref: int, tp: int, n_voxels: int) -> dict:
    fp, fn = n_pred - tp, n_ref - tp
    denom = tp + fp + fn
    return {"Dice": 2 * tp / (2 * tp + fp + fn) if denom else float("nan"),
            "IoU": tp / denom if denom else float("nan"),
            "FP": fp, "TP": tp, "FN": fn, "TN": n_voxels - denom, "n_pred": n_pred, "n_ref": n_ref}


def _nanmean(v) -> float:
    v = [float(x) for x in v if not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def nnunet_summary(cases: dict, values: list) -> dict:
    """``cases``: ``{case: {"prediction", "truth", "counts": {value: (n_pred, n_ref, tp)}, "n_voxels"}}``;
    ``values``: the scored label values in report order."""
    per_case = []
    for c in cases.values():
        per_case.append({
            "metrics": {str(v): label_metrics(*c["counts"][v], c["n_voxels"]) for v in values},
            "prediction_file": c["prediction"], "reference_file": c["truth"]})
    mean = {str(v): {m: _nanmean([pc["metrics"][str(v)][m] for pc in per_case]) for m in METRICS} for v in values}
    fg = {m: float(np.mean([mean[str(v)][m] for v in values])) for m in METRICS}  # NaN if a label has no value
    return {"foreground_mean": fg, "mean": mean, "metric_per_case": per_case}

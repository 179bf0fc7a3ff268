"""Per-organ Dice and HD95 under three documented conventions.

``glam3d`` (ours, the default)
    Dice = 2|P∩G| / (|P|+|G|). HD95 in **millimetres** from the voxel spacing, computed with MONAI's
    ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th-percentile surface
    distances. Edge cases: organ absent from both truth and prediction → Dice and HD95 are NaN (*excluded* from
    means, and counted); absent from truth but predicted (false positive) → Dice 0, HD95 NaN (excluded); present
    in truth but not predicted (missed) → Dice 0, HD95 = the scan's diagonal in mm (the largest distance possible
    in the image, so a miss is never rewarded).
``nnformer`` (``nnformer/inference_synapse.py`` of 282857341/nnFormer)
    Dice = 1 when both are empty, else the formula (0 for a miss or a false positive). HD95 = medpy's ``hd95`` in
    **voxels** (no spacing) when both are non-empty, else 0.
``transunet`` (``utils.calculate_metric_percase`` of Beckschen/TransUNet)
    Both non-empty → (medpy ``dc``, medpy ``hd95`` in voxels); predicted but absent from truth → (1, 0); otherwise
    (a miss, or absent from both) → (0, 0).

NSD (normalised surface Dice at a tolerance τ in mm, Nikolov et al.): the fraction of both surfaces (voxels of the
mask XOR its erosion) lying within τ of the other surface, computed with MONAI's ``compute_surface_dice`` and the
voxel spacing. It is not part of the nnFormer / TransUNet protocols, so it follows glam3d's rules in every
convention: always in mm; absent from both → NaN (excluded); a miss or a false positive → 0.

medpy's ``hd95`` is the 95th percentile of the *union* of both directed surface-distance sets; it is reproduced
here with scipy (surface = mask XOR its erosion by the 6-connected cross, Euclidean distance transform), so medpy
is not needed. All masks are numpy arrays of any dimension; ``spacing`` is given per array axis.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

CONVENTIONS = ("glam3d", "nnformer", "transunet")

CONVENTION_NOTES = {
    "glam3d": ("glam3d convention: HD95 in mm (voxel spacing; MONAI compute_hausdorff_distance, max of the two "
               "directed 95th percentiles). Organ absent from truth and prediction: excluded (—), counted. "
               "Absent from truth but predicted: Dice 0, HD95 excluded. Present in truth but not predicted: "
               "Dice 0, HD95 = scan diagonal (mm). Means are over the non-excluded cases (counts shown)."),
    "nnformer": ("nnFormer convention (inference_synapse.py): HD95 in voxels (medpy hd95, no spacing). Organ "
                 "absent from truth and prediction: Dice 1. HD95 is 0 unless both masks are non-empty."),
    "transunet": ("TransUNet convention (utils.calculate_metric_percase): HD95 in voxels (medpy hd95, no "
                  "spacing). Both non-empty: (Dice, HD95); predicted but absent from truth: (1, 0); otherwise "
                  "(missed, or absent from both): (0, 0)."),
}

HD_UNITS = {"glam3d": "mm", "nnformer": "voxels", "transunet": "voxels"}


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}; got {convention!r}")
    return convention


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|) on boolean masks; NaN when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, gt).sum()) / denom


def _crop_pair(a: np.ndarray, b: np.ndarray):
    """Crop two masks to the bounding box of their union plus a one-voxel zero margin (distances, erosions and
    surfaces are unchanged: outside the box both masks are empty)."""
    union = a | b
    idx = np.nonzero(union)
    sl = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    a, b = a[sl], b[sl]
    return np.pad(a, 1), np.pad(b, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=struct, iterations=1)


def directed_surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None):
    """Distances from every surface voxel of ``pred`` to the surface of ``gt`` and back: ``(d_pg, d_gp)``.
    Both masks must be non-empty."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    pred, gt = _crop_pair(pred, gt)
    sp = None if spacing is None else tuple(float(s) for s in spacing)
    sp_, sg = _surface(pred), _surface(gt)
    d_pg = ndimage.distance_transform_edt(~sg, sampling=sp)[sp_]
    d_gp = ndimage.distance_transform_edt(~sp_, sampling=sp)[sg]
    return d_pg, d_gp


def hd95_medpy(pred, gt, spacing=None) -> float:
    """medpy.metric.binary.hd95: 95th percentile of the union of both directed distance sets."""
    d_pg, d_gp = directed_surface_distances(pred, gt, spacing)
    return float(np.percentile(np.hstack((d_pg, d_gp)), 95))


def hd95_monai(pred, gt, spacing=None) -> float:
    """MONAI ``compute_hausdorff_distance(percentile=95)`` (symmetric: the larger directed 95th percentile)."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    # crop first (exact, see _crop_pair): MONAI then works on a small box, not the whole scan
    pred, gt = _crop_pair(pred, gt)
    y_pred = torch.from_numpy(pred)[None, None]
    y = torch.from_numpy(gt)[None, None]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                            spacing=None if spacing is None else [float(s) for s in spacing])
    except RuntimeError as err:
        if "too large" not in str(err):
            raise
        # torch.quantile takes at most 2**24 values: surfaces that large (a noisy prediction on a long scan)
        # get the same definition computed with numpy
        return hd95_directed_max(pred, gt, spacing)
    return float(hd.reshape(-1)[0])


def hd95_directed_max(pred, gt, spacing=None) -> float:
    """MONAI's HD95 definition (the larger of the two directed 95th percentiles, linear interpolation) with
    scipy / numpy, for any number of surface voxels."""
    d_pg, d_gp = directed_surface_distances(pred, gt, spacing)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def nsd_monai(pred, gt, tolerance_mm: float, spacing=None) -> float:
    """Normalised surface Dice of two non-empty 3D masks at ``tolerance_mm`` (MONAI ``compute_surface_dice``,
    surface voxels counted, distances in mm from ``spacing``; 1 voxel = 1 mm without it). The masks are cropped
    to their union's bounding box plus a one-voxel margin first (surfaces and distances unchanged)."""
    import torch
    from monai.metrics import compute_surface_dice

    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if not pred.any() or not gt.any():
        raise ValueError("NSD here needs two non-empty masks (the edge cases are the caller's)")
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"the NSD tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    pred, gt = _crop_pair(pred, gt)
    sp = None if spacing is None else [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = compute_surface_dice(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None],
                                 [float(tolerance_mm)], include_background=True, spacing=sp)
    return float(v.reshape(-1)[0])


def overlap_counts(pred_labels: np.ndarray, gt_labels: np.ndarray, values: Sequence[int]) -> dict:
    """``{value: (n_pred, n_ref, tp)}``: voxels of each value in the prediction, in the truth, and in both, from
    three ``bincount`` passes over the non-negative integer maps."""
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and truth {gt_labels.shape} differ in shape")
    top = max([int(v) for v in values] + [0]) + 1
    p = pred_labels.ravel()
    g = gt_labels.ravel()
    n_pred = np.bincount(p, minlength=top)
    n_ref = np.bincount(g, minlength=top)
    tp = np.bincount(p[p == g], minlength=top)
    return {int(v): (int(n_pred[v]), int(n_ref[v]), int(tp[v])) for v in values}


def dice_from_counts(n_pred: int, n_ref: int, tp: int) -> float:
    """2·TP / (|P| + |G|); NaN when both are empty."""
    return float("nan") if n_pred + n_ref == 0 else 2.0 * tp / (n_pred + n_ref)


def scan_diagonal(shape, spacing=None) -> float:
    sp = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=float)
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=float) * sp) ** 2)))


def organ_metrics(pred: np.ndarray, gt: np.ndarray, spacing=None, convention: str = "glam3d",
                  nsd_tolerance: Optional[float] = None) -> dict:
    """Dice and HD95 of one organ (boolean masks) under ``convention``, and NSD at ``nsd_tolerance`` mm if given.

    Returns ``{"dice", "hd95", "status"}`` (+ ``"nsd"``) with status one of ``ok`` (both non-empty), ``absent``
    (empty in both), ``false_positive`` (predicted, absent from truth), ``missed`` (in truth, not predicted).
    NaN = excluded. ``spacing`` (mm per array axis) is used by the glam3d HD95 and by NSD; the nnformer and
    transunet HD95 are in voxels whatever it is.
    """
    out = _organ_dice_hd95(pred, gt, spacing, convention)
    if nsd_tolerance is not None:
        st = out["status"]
        out["nsd"] = (nsd_monai(pred, gt, nsd_tolerance, spacing) if st == "ok"
                      else float("nan") if st == "absent" else 0.0)
    return out


def _organ_dice_hd95(pred: np.ndarray, gt: np.ndarray, spacing, convention: str) -> dict:
    check_convention(convention)
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and truth {gt.shape} differ in shape")
    p, g = bool(pred.any()), bool(gt.any())
    status = "ok" if (p and g) else "absent" if not (p or g) else "false_positive" if p else "missed"
    nan = float("nan")
    if convention == "glam3d":
        if status == "ok":
            return {"dice": dice(pred, gt), "hd95": hd95_monai(pred, gt, spacing), "status": status}
        if status == "absent":
            return {"dice": nan, "hd95": nan, "status": status}
        if status == "false_positive":
            return {"dice": 0.0, "hd95": nan, "status": status}
        return {"dice": 0.0, "hd95": scan_diagonal(gt.shape, spacing), "status": status}
    if convention == "nnformer":
        d = 1.0 if status == "absent" else dice(pred, gt)
        h = hd95_medpy(pred, gt) if status == "ok" else 0.0
        return {"dice": d, "hd95": h, "status": status}
    # transunet
    if status == "ok":
        return {"dice": dice(pred, gt), "hd95": hd95_medpy(pred, gt), "status": status}
    if status == "false_positive":
        return {"dice": 1.0, "hd95": 0.0, "status": status}
    return {"dice": 0.0, "hd95": 0.0, "status": status}


def case_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray, organs: Sequence[tuple], spacing=None,
                 convention: str = "glam3d", nsd_tolerance=None) -> dict:
    """Metrics of every organ of one case: ``organs`` = ``[(name, label_value), …]``; returns
    ``{name: organ_metrics(...)}`` in the given order. ``nsd_tolerance``: ``None`` (no NSD), one number of mm,
    or ``{name: mm}``."""
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction {pred_labels.shape} and truth {gt_labels.shape} differ in shape")
    out = {}
    for name, value in organs:
        tol = nsd_tolerance.get(name) if isinstance(nsd_tolerance, dict) else nsd_tolerance
        out[name] = organ_metrics(pred_labels == value, gt_labels == value, spacing, convention, tol)
    return out


def nan_mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std, count) of the non-NaN values; (nan, nan, 0) when there are none — never a silent NaN:
    the count says how many values went in."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std, int(v.size)

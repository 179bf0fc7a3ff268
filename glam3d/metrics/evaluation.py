"""Scoring prediction folders against their truths: reading, checking and measuring every case.

:func:`evaluate_folders` pairs the files (:mod:`glam3d.metrics.layouts`), reads each pair
(:mod:`glam3d.metrics.label_io`), checks shape, geometry and label values, and computes per organ Dice, HD95 and
NSD (:mod:`glam3d.metrics.segmentation`) plus the voxel counts nnU-Net's ``summary.json`` needs. With
``postprocessing=True`` it also measures each case's Dice after the largest-component steps
(:func:`glam3d.postprocessing.case_variants`) so the caller can decide the postprocessing without reading the
files again.

Label values (the same rule for every source of labels, see :mod:`glam3d.metrics.labels`):

* a **prediction** holding a value outside the label set (the dataset's declared set, or background plus the
  scored values when only those are known) is an error naming the file and the values: a network trained on that
  label set cannot have written it, so the map does not belong to this evaluation;
* a **truth** holding a value outside the dataset's declared label set is a warning naming the file (the value is
  scored as background); values that are declared but not scored (Synapse scores 8 of BTCV's 13 organs) are
  normal and silent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import UserError
from .label_io import read_label_map
from .labels import LabelSet, load_label_set
from .layouts import collect_predictions, find_truths, pair_predictions
from .segmentation import case_metrics, check_convention, dice_from_counts
from .tolerance import resolve_tolerances

_SLAB_VOXELS = 1 << 21  # bincount slabs: the int64 copy bincount makes stays ~16 MB on any scan


def voxel_spacing(affine: np.ndarray) -> tuple:
    """Spacing of the array axes in mm (column norms of the affine's 3×3 part; right for oblique scans too)."""
    return tuple(float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _slabs(*arrays):
    """The arrays cut into matching slabs along their last axis, flattened."""
    shape = arrays[0].shape
    per = max(1, int(np.prod(shape[:-1])))
    step = max(1, _SLAB_VOXELS // per)
    for k in range(0, shape[-1], step):
        yield [a[..., k:k + step].ravel() for a in arrays]


def value_counts(labels: np.ndarray) -> np.ndarray:
    """``bincount`` of a non-negative integer map, slab by slab (bounded temporary memory)."""
    top = int(labels.max()) + 1 if labels.size else 1
    out = np.zeros(top, dtype=np.int64)
    for (s,) in _slabs(labels):
        out += np.bincount(s, minlength=top)
    return out


def organ_counts(pred: np.ndarray, gt: np.ndarray, values: Sequence[int]) -> dict:
    """``{value: (n_pred, n_ref, tp)}`` (voxels in the prediction, in the truth, in both)."""
    top = max([int(v) for v in values] + [0]) + 1
    n_pred = np.zeros(top, np.int64)
    n_ref = np.zeros(top, np.int64)
    tp = np.zeros(top, np.int64)
    for p, g in _slabs(pred, gt):
        p = np.minimum(p, top)  # values above the scored ones fall into one spare bin
        g = np.minimum(g, top)
        n_pred += np.bincount(p, minlength=top + 1)[:top]
        n_ref += np.bincount(g, minlength=top + 1)[:top]
        tp += np.bincount(p[p == g], minlength=top + 1)[:top]
    return {int(v): (int(n_pred[v]), int(n_ref[v]), int(tp[v])) for v in values}


def _dice_fn(organs):
    values = [v for _, v in organs]

    def fn(pred, gt):
        c = organ_counts(pred, gt, values)
        return {n: dice_from_counts(*c[v]) for n, v in organs}
    return fn


def _shown(values) -> str:
    values = sorted(int(v) for v in values)
    return ", ".join(map(str, values[:12])) + (f" … ({len(values)} values)" if len(values) > 12 else "")


def check_label_values(pred: np.ndarray, gt: np.ndarray, label_set: LabelSet, case: str, pred_path, gt_path,
                       warn: Callable[[str], None]) -> None:
    """The label-value rule of this module's docstring: an error for the prediction, a warning for the truth."""
    allowed = label_set.allowed_in_prediction()
    pv = np.flatnonzero(value_counts(pred))
    bad = [v for v in pv if int(v) not in allowed]
    if bad:
        raise UserError(f"case {case}: the prediction holds label values not in the label set: {_shown(bad)} "
                        f"(label set of {label_set.source}: {_shown(allowed)})", pred_path)
    if label_set.declared is not None:
        gv = np.flatnonzero(value_counts(gt))
        bad = [v for v in gv if int(v) not in label_set.declared]
        if bad:
            warn(f"{gt_path}: case {case}: the truth holds label values outside the declared label set of "
                 f"{label_set.source}: {_shown(bad)} (scored as background)")


def evaluate_case(case: str, pred_path, gt_path, label_set: LabelSet, convention: str = "glam3d", *,
                  nsd_tolerance: Union[dict, float, None] = None, atol_mm: float = 1e-3, postprocessing: bool = False,
                  warn: Callable[[str], None] = lambda m: None) -> dict:
    """One pair: ``{"prediction", "truth", "shape", "spacing", "n_voxels", "organs": {name: {"dice", "hd95",
    "nsd"?, "status", "n_pred", "n_ref", "tp"}}}`` (+ ``"postprocessing_dice"`` with ``postprocessing``)."""
    from ..postprocessing import case_variants

    gt, gaff = read_label_map(gt_path, case, "truth")
    pred, paff = read_label_map(pred_path, case, "prediction")
    pname, gname = Path(pred_path).name, Path(gt_path).name
    if pred.shape != gt.shape:
        raise UserError(f"case {case}: prediction {pname} has shape {pred.shape}, truth {gname} has {gt.shape}",
                        pred_path)
    if not np.allclose(paff, gaff, atol=atol_mm, rtol=0):
        worst = float(np.abs(paff - gaff).max())
        raise UserError(f"case {case}: prediction {pname} and truth {gname} differ in geometry (affines differ by up "
                        f"to {worst:.4g})", pred_path)
    check_label_values(pred, gt, label_set, case, pred_path, gt_path, warn)
    n_voxels = int(gt.size)
    if label_set.ignore is not None:  # nnU-Net's ignore label: those voxels count nowhere
        ign = gt == label_set.ignore
        if ign.any():
            n_voxels -= int(ign.sum())
            gt = np.where(ign, 0, gt)
            pred = np.where(ign, 0, pred)
    spacing = voxel_spacing(gaff)
    organs = label_set.organs
    metrics = case_metrics(pred, gt, organs, spacing, convention, nsd_tolerance)
    counts = organ_counts(pred, gt, [v for _, v in organs])
    for name, value in organs:
        n_pred, n_ref, tp = counts[value]
        metrics[name].update({"n_pred": n_pred, "n_ref": n_ref, "tp": tp})
    out = {"prediction": str(pred_path), "truth": str(gt_path), "shape": list(gt.shape), "spacing": list(spacing),
           "n_voxels": n_voxels, "organs": metrics}
    if postprocessing:
        out["postprocessing_dice"] = case_variants(pred, gt, organs, _dice_fn(organs))
    return out


def evaluate_folders(pred_dir, gt_dir, labels="synapse", convention: str = "glam3d", progress: bool = False,
                     atol_mm: float = 1e-3, *, only_predicted: bool = False, nsd_tolerance=None,
                     postprocessing: bool = False, warn: Optional[Callable[[str], None]] = None) -> dict:
    """Per case: :func:`evaluate_case`'s dict plus ``"fold"`` (the prediction folder) and ``"case_name"`` (the name
    the prediction was written under).

    ``pred_dir``: one folder or a list (the folds' validation outputs; a case in two is an error). ``gt_dir``: a
    folder or a preprocessed dataset.json. ``labels``: anything :func:`~glam3d.metrics.labels.load_label_set`
    takes. ``nsd_tolerance``: ``None`` (the default per-organ tolerances), ``False`` (no NSD), a number of mm, a
    ``{name: mm}`` dict (the organs it leaves out keep their default) or a list of ``--nsd-tolerance`` items.
    Every truth needs a prediction (else a
    :class:`UserError` naming the case) unless ``only_predicted``, which leaves those truths out and lists them.

    Besides the cases the dict holds (keys starting with ``__``, read by :func:`~glam3d.metrics.report.write_report`):
    ``__unmatched__`` (predictions that match no truth, only when some), ``__left_out__`` (truths without a
    prediction), ``__warnings__``, ``__pred_dirs__``, ``__gt__``, ``__nsd_tolerance_mm__`` and ``__label_set__``.
    """
    convention = check_convention(convention)
    label_set = load_label_set(labels)
    pred_dirs = [Path(d) for d in (pred_dir if isinstance(pred_dir, (list, tuple)) else [pred_dir])]
    if not pred_dirs:
        raise UserError("no prediction folder given")
    seen = {}
    for d in pred_dirs:
        r = d.resolve()
        if r in seen:
            raise UserError(f"the prediction folder is given twice ({seen[r]} and {d})", d)
        seen[r] = d
    names = label_set.names
    if nsd_tolerance is False:
        tol = None
    elif isinstance(nsd_tolerance, dict):
        unknown = [n for n in nsd_tolerance if n not in names]
        if unknown:
            raise ValueError(f"nsd_tolerance names organs that are not scored: {unknown} (scored: {names})")
        tol = {**resolve_tolerances(names), **{n: float(v) for n, v in nsd_tolerance.items()}}
    elif isinstance(nsd_tolerance, (int, float)):
        tol = {n: float(nsd_tolerance) for n in names}
    else:
        tol = resolve_tolerances(names, nsd_tolerance)
    preds = collect_predictions(pred_dirs)
    truths, gt_desc = find_truths(gt_dir)
    pairing = pair_predictions(truths, preds, pred_dirs, only_predicted)
    warnings: list[str] = []

    def _warn(msg):
        warnings.append(msg)
        if warn is not None:
            warn(msg)

    iterator = pairing.pairs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="evaluate", unit="case", leave=False, disable=None)  # off when not a TTY
    per_case = {}
    for case, pred, gt_path in iterator:
        entry = evaluate_case(case, pred.path, gt_path, label_set, convention, nsd_tolerance=tol, atol_mm=atol_mm,
                              postprocessing=postprocessing, warn=_warn)
        entry["fold"] = str(pred.folder)
        entry["case_name"] = pred.case
        per_case[case] = entry
    if pairing.unmatched:
        per_case["__unmatched__"] = [str(p.path) for p in pairing.unmatched]
    per_case["__left_out__"] = [{"case": c, "truth": str(g)} for c, g in pairing.left_out]
    per_case["__warnings__"] = warnings
    per_case["__pred_dirs__"] = [str(d) for d in pred_dirs]
    per_case["__gt__"] = gt_desc
    per_case["__nsd_tolerance_mm__"] = tol
    per_case["__label_set__"] = {"source": label_set.source, "organs": [[n, v] for n, v in label_set.organs],
                                 "declared": None if label_set.declared is None else sorted(label_set.declared),
                                 "ignore": label_set.ignore}
    return per_case

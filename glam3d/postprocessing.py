"""Connected-component postprocessing of label maps, and deciding it on validation cases as nnU-Net does.

Cleaning (any array shape, integer label values, 0 = background; connectivity is full: 26 neighbours in 3D, as
nnU-Net's and MONAI's ``KeepLargestConnectedComponent`` defaults):

* :func:`keep_largest_component` keeps, per class, its largest connected component (other voxels of the class
  become background);
* :func:`keep_largest_foreground_component` keeps the largest component of all foreground classes taken as one
  mask (what nnU-Net tries first);
* :func:`apply_postprocessing` applies a decision (a ``postprocessing.json`` loaded with :func:`load_decision`, or
  ``"all"``) to one label map and returns the cleaned copy: the API ``glam3d predict`` and ``glam3d postprocess
  apply`` call.

Memory: each class is labelled inside its own bounding box (one ``find_objects`` pass gives every box), so the
work arrays are the size of an organ, not of the scan; the output is one copy of the input.

Deciding (:func:`decide_postprocessing`, from per-case Dice computed by ``glam3d evaluate --decide-postprocessing``),
nnU-Net v2's ``determine_postprocessing`` rule: first the foreground-as-one step is kept if it raises the mean Dice
over classes and lowers no class's mean Dice; then, on top of that, each class's own step is kept if it raises that
class's mean Dice. A step that changes nothing (equal Dice) is not kept. Means are over cases, a case where the
class is absent from truth and prediction excluded (NaN).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
from scipy import ndimage

from .errors import UserError

DECISION_FORMAT = "glam3d-postprocessing-v1"


def _structure(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, ndim)  # full connectivity


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative (0 = background)")
    return labels


def _boxes(labels: np.ndarray) -> list:
    """``find_objects`` of the label map: entry ``v - 1`` is the bounding box of value ``v`` (``None`` if absent)."""
    if not labels.size:
        return []
    return ndimage.find_objects(labels if labels.dtype.itemsize <= 4 else labels.astype(np.int64))


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (the first in raster order on a tie)."""
    lab, n = ndimage.label(mask, structure=_structure(mask.ndim))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _classes(labels: np.ndarray, boxes: list, classes) -> list[int]:
    present = [i + 1 for i, b in enumerate(boxes) if b is not None]
    if classes is None:
        return present
    want = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c <= 0:
            raise ValueError(f"classes must be positive label values, got {c!r}")
        want.append(int(c))
    return [c for c in dict.fromkeys(want) if c in present]


def keep_largest_component(labels: np.ndarray, classes: Optional[Iterable[int]] = None, *,
                           inplace: bool = False) -> np.ndarray:
    """For each class in ``classes`` (label values; ``None``: every value present but 0), keep only its largest
    connected component; the class's other voxels become background (0). ``labels``: integer array of any shape
    (3D: (X, Y, Z)). Returns the cleaned array (``labels`` itself with ``inplace``, else a copy)."""
    labels = _check_labels(labels)
    out = labels if inplace else labels.copy()
    boxes = _boxes(labels)
    for c in _classes(labels, boxes, classes):
        box = boxes[c - 1]
        sub = out[box]
        mask = sub == c
        keep = _largest(mask)
        sub[mask & ~keep] = 0
    return out


def keep_largest_foreground_component(labels: np.ndarray, classes: Optional[Iterable[int]] = None, *,
                                      inplace: bool = False) -> np.ndarray:
    """Take the voxels of ``classes`` (``None``: all foreground) as one mask and keep its largest connected
    component; the voxels of those classes outside it become background. Other values are left alone."""
    labels = _check_labels(labels)
    out = labels if inplace else labels.copy()
    boxes = _boxes(labels)
    cls = _classes(labels, boxes, classes)
    if not cls:
        return out
    lo = np.min([[s.start for s in boxes[c - 1]] for c in cls], axis=0)
    hi = np.max([[s.stop for s in boxes[c - 1]] for c in cls], axis=0)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = out[box]
    mask = sub > 0 if classes is None else np.isin(sub, cls)
    keep = _largest(mask)
    sub[mask & ~keep] = 0
    return out


# ------------------------------------------------------------------------------------------------ decisions
def apply_postprocessing(labels: np.ndarray, decision: Union[dict, str, None], *,
                         inplace: bool = False) -> np.ndarray:
    """``labels`` cleaned as ``decision`` says, as a new array (``labels`` untouched) — or, with ``inplace``,
    ``labels`` itself cleaned (e.g. a label map mapped from a file: no second copy of it in memory).

    ``decision``: a dict as written by :func:`write_decision` (``foreground_largest_component`` then
    ``classes_largest_component``), ``"all"`` (the largest component of every class present, no foreground step),
    or ``None`` (a copy, unchanged)."""
    labels = _check_labels(labels)
    if decision is None:
        return labels if inplace else labels.copy()
    if isinstance(decision, str):
        if decision != "all":
            raise ValueError(f"decision must be a postprocessing dict, 'all' or None, got {decision!r}")
        return keep_largest_component(labels, inplace=inplace)
    check_decision(decision)
    out = labels if inplace else labels.copy()
    if decision["foreground_largest_component"]["apply"]:
        fg = decision["foreground_largest_component"].get("classes")
        keep_largest_foreground_component(out, fg, inplace=True)
    cls = decision["classes_largest_component"]
    if cls:
        keep_largest_component(out, cls, inplace=True)
    return out


def check_decision(decision, where=None) -> dict:
    """Validate a decision dict (its keys and types); a :class:`UserError` naming ``where`` otherwise."""
    if not isinstance(decision, dict) or decision.get("format") != DECISION_FORMAT:
        raise UserError(f"not a glam3d postprocessing decision (format {DECISION_FORMAT!r} expected)", where)
    fg = decision.get("foreground_largest_component")
    cls = decision.get("classes_largest_component")
    if not isinstance(fg, dict) or not isinstance(fg.get("apply"), bool):
        raise UserError("postprocessing decision: 'foreground_largest_component.apply' must be true or false", where)
    if fg.get("classes") is not None and not _int_list(fg["classes"]):
        raise UserError("postprocessing decision: 'foreground_largest_component.classes' must list label values",
                        where)
    if not _int_list(cls):
        raise UserError("postprocessing decision: 'classes_largest_component' must list label values", where)
    return decision


def _int_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in x)


def load_decision(path) -> dict:
    """Read and check a ``postprocessing.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the postprocessing decision ({err})", path) from None
    return check_decision(data, path)


def _nanmean(values) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _gt(a: float, b: float) -> bool:
    """``a > b`` where NaN (no case counted) is never better nor worse."""
    return not (math.isnan(a) or math.isnan(b)) and a > b


def _lt(a: float, b: float) -> bool:
    return not (math.isnan(a) or math.isnan(b)) and a < b


def decide_postprocessing(per_case: dict, organs: list) -> dict:
    """The decision from per-case Dice of four variants of each prediction.

    ``per_case``: ``{case: {"raw": {name: dice}, "fg": {…}, "cls": {…}, "fg_cls": {…}}}`` where ``fg`` is after
    the foreground-as-one step, ``cls`` after every class's own step on the raw map, ``fg_cls`` after both. (A
    class's own step changes only that class's voxels, so one pass over all classes gives each class's Dice as if
    it were applied alone.) ``organs``: ``[(name, value)]``. Returns the decision dict (see :func:`write_decision`).
    """
    names = [n for n, _ in organs]
    mean = {v: {n: _nanmean([c[v][n] for c in per_case.values()]) for n in names}
            for v in ("raw", "fg", "cls", "fg_cls")}

    def overall(d):
        return _nanmean([d[n] for n in names])

    worse = [n for n in names if _lt(mean["fg"][n], mean["raw"][n])]
    fg_apply = _gt(overall(mean["fg"]), overall(mean["raw"])) and not worse
    base, cls_variant = ("fg", "fg_cls") if fg_apply else ("raw", "cls")
    per_class = []
    for name, value in organs:
        before, after = mean[base][name], mean[cls_variant][name]
        per_class.append({"name": name, "value": int(value), "apply": _gt(after, before),
                          "dice_without": before, "dice_with": after})
    final = {n: (e["dice_with"] if e["apply"] else e["dice_without"]) for n, e in zip(names, per_class)}
    return {
        "format": DECISION_FORMAT,
        "rule": ("nnU-Net v2 determine_postprocessing: the foreground-as-one largest component is kept if it raises "
                 "the mean Dice over classes and lowers no class; then each class's largest component is kept if "
                 "it raises that class's mean Dice (ties are not kept). Connectivity: full (26 neighbours in 3D)."),
        "cases": len(per_case),
        "labels": [[n, int(v)] for n, v in organs],
        "foreground_largest_component": {
            "apply": fg_apply, "classes": [int(v) for _, v in organs],
            "mean_dice_without": overall(mean["raw"]), "mean_dice_with": overall(mean["fg"]),
            "dice_without": mean["raw"], "dice_with": mean["fg"], "classes_worse": worse,
        },
        "per_class": per_class,
        "classes_largest_component": [e["value"] for e in per_class if e["apply"]],
        "mean_dice": {"without": overall(mean["raw"]), "with": overall(final)},
        "dice_per_class": {"without": mean["raw"], "with": final},
    }


def case_variants(pred: np.ndarray, gt: np.ndarray, organs: list, dice_fn) -> dict:
    """Per-organ Dice of the four variants :func:`decide_postprocessing` needs, for one case. ``dice_fn(pred, gt)``
    returns ``{name: dice}``; the raw Dice are computed here too so the four come from one function."""
    values = [int(v) for _, v in organs]
    fg = keep_largest_foreground_component(pred, values)
    return {"raw": dice_fn(pred, gt), "fg": dice_fn(fg, gt),
            "cls": dice_fn(keep_largest_component(pred, values), gt),
            "fg_cls": dice_fn(keep_largest_component(fg, values, inplace=True), gt)}

"""Where predictions and truths live, and which prediction belongs to which truth.

Prediction folders (one or several: the folds' validation outputs), in any mix of

flat / nnU-Net
    ``case.nii.gz`` (any ending of :data:`~glam3d.metrics.label_io.LABEL_EXTENSIONS`). nnU-Net's side files
    (``summary.json``, ``plans.json``, ``dataset.json``, ``*.npz``, ``*.pkl``) and glam3d's
    ``<case>_probabilities.nii.gz`` are not label maps and are passed over.
MONAI ``SaveImage``
    ``<case>/<case>_<postfix>.nii.gz`` (``separate_folder=True``, the default; ``output_postfix`` defaults to
    ``trans``, MONAI's tutorials use ``seg``) or ``<case>/<case>.nii.gz``.

Truths: a flat folder, a folder holding ``labelsTr`` / ``labelsTs`` (MSD, nnU-Net) or ``label`` (BTCV:
``label0001.nii.gz``), a preprocessed glam3d ``dataset.json`` (each case's ``source_label``) or a raw MSD v1
``dataset.json`` (its ``training`` list).

Pairing, for each truth: a prediction with the same file stem, else one whose normalised key matches (``img0001``,
``label0001`` and ``0001`` are case ``0001``; a glam3d channel suffix ``_0000`` and a MONAI postfix are dropped from
prediction names). A case predicted in two folders, or two predictions for one truth, is an error naming them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from .label_io import is_label_file, split_ext

_PREFIX = re.compile(r"^(label|labels|img|image|images|seg|pred|prediction|mask|gt)[_\-]?", re.IGNORECASE)
SAVEIMAGE_POSTFIXES = ("seg", "trans")  # MONAI SaveImage's default output_postfix is "trans"; tutorials use "seg"
SIDE_SUFFIXES = ("_probabilities",)     # glam3d predict --probabilities writes <case>_probabilities.nii.gz
TRUTH_SUBFOLDERS = ("label", "labels", "labelsTr", "labelsTs")


def file_stem(path) -> str:
    """``case`` of ``case.nii.gz`` / ``case.mha`` / …"""
    name = Path(path).name
    se = split_ext(name)
    return se[0] if se else Path(path).stem


def truth_id(stem: str) -> str:
    """A truth's case id: its stem without a leading label/img/seg/gt… word (``label0001`` → ``0001``)."""
    return _PREFIX.sub("", stem) or stem


def prediction_key(stem: str) -> str:
    """A prediction's pairing key: without a channel suffix ``_0000``, a MONAI postfix and a leading word."""
    m = re.fullmatch(r"(.+)_0000", stem)
    if m:
        stem = m.group(1)
    m = re.fullmatch(r"(.+)_(?:%s)" % "|".join(SAVEIMAGE_POSTFIXES), stem)
    if m:
        stem = m.group(1)
    return truth_id(stem)


def case_key(path) -> str:
    """Case id used to pair files (``img0001`` and ``label0001`` → ``0001``; ``case_7_0000`` → ``case_7``)."""
    return prediction_key(file_stem(path))


@dataclass(frozen=True)
class Prediction:
    """One predicted label map: ``case`` (the name it was written under), its ``path``, the ``folder`` given as
    ``--pred`` it was found in, and the ``layout`` (``flat`` or ``monai``)."""

    case: str
    path: Path
    folder: Path
    layout: str


def _side_file(stem: str) -> bool:
    return stem.endswith(SIDE_SUFFIXES)


def _saveimage_file(sub: Path) -> Optional[Path]:
    """The label map of a MONAI ``SaveImage`` case folder ``<case>/``, ``None`` when it holds none."""
    name = sub.name
    cands = []
    for p in sorted(sub.iterdir()):
        if not is_label_file(p):
            continue
        stem = file_stem(p)
        if _side_file(stem):
            continue
        if stem == name or stem.startswith(name + "_"):
            cands.append(p)
    if len(cands) > 1:  # e.g. case_seg and case_prob: the usual label postfixes win
        pref = [p for p in cands if file_stem(p)[len(name) + 1:] in SAVEIMAGE_POSTFIXES or file_stem(p) == name]
        if len(pref) != 1:
            raise UserError(f"several label maps for case {name} ({', '.join(p.name for p in cands)})", sub)
        cands = pref
    return cands[0] if cands else None


def find_predictions(folder) -> dict[str, Prediction]:
    """``{case: Prediction}`` of one prediction folder (flat, nnU-Net or MONAI ``SaveImage`` layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("prediction folder not found", folder)
    found: dict[str, Prediction] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            try:
                f = _saveimage_file(p)
            except PermissionError:
                continue
            if f is None:
                continue
            pred = Prediction(p.name, f, folder, "monai")
        elif is_label_file(p) and not _side_file(file_stem(p)):
            pred = Prediction(file_stem(p), p, folder, "flat")
        else:
            continue
        if pred.case in found:
            raise UserError(f"case {pred.case} has two predictions ({found[pred.case].path.relative_to(folder)} and "
                            f"{pred.path.relative_to(folder)})", folder)
        found[pred.case] = pred
    return found


def _label_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if is_label_file(p)]


def find_truth_folder(gt_dir) -> Path:
    """The folder holding the truth files: ``gt_dir`` itself, or its ``label``/``labels``/``labelsTr``/``labelsTs``."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise UserError("truth folder not found", gt_dir)
    if _label_files(gt_dir):
        return gt_dir
    for sub in TRUTH_SUBFOLDERS:
        if (gt_dir / sub).is_dir() and _label_files(gt_dir / sub):
            return gt_dir / sub
    raise UserError("no label files (.nii.gz, .nii, .mha, .nrrd, …) in this folder or its label/, labelsTr/",
                    gt_dir)


def truths_from_dataset_json(path) -> dict[str, Path]:
    """``{case id: truth file}`` of a preprocessed glam3d ``dataset.json`` (every case with a ``source_label``;
    relative paths are taken from the current folder, then from the dataset.json's folder), or of a raw MSD v1
    dataset.json (its ``training`` list's ``label`` files, relative to the dataset.json)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the dataset ({err})", path) from None
    cases = data.get("cases") if isinstance(data, dict) else None
    training = data.get("training") if isinstance(data, dict) else None
    if not isinstance(cases, dict) and isinstance(training, list):  # a raw MSD v1 dataset.json: its training list
        cases = {}
        for e in training:
            lab = e.get("label") if isinstance(e, dict) else None
            if isinstance(lab, str) and lab:
                p = (path.parent / lab).resolve() if not Path(lab).is_absolute() else Path(lab)
                cases[file_stem(p)] = {"source_label": str(p)}
    if not isinstance(cases, dict):
        raise UserError("--gt: a dataset.json without cases (neither a preprocessed glam3d one with 'cases' nor an "
                        "MSD one with a 'training' list); give the folder of truth label maps instead", path)
    out = {}
    for cid, meta in cases.items():
        src = meta.get("source_label") if isinstance(meta, dict) else None
        if not src:
            continue
        p = Path(src)
        if not p.is_absolute():
            p = next((c for c in (Path.cwd() / p, path.parent / p) if c.is_file()), Path.cwd() / p)
        if not p.is_file():
            raise UserError(f"case {cid}: its truth {src} (source_label in the dataset.json) is not found", path)
        out[str(cid)] = p
    if not out:
        raise UserError("the dataset.json lists no case with a label (source_label)", path)
    return out


def find_truths(gt) -> tuple[dict[str, Path], str]:
    """``({case id: truth file}, description)`` for ``--gt``: a folder (flat, labelsTr, BTCV label/) or a
    preprocessed glam3d dataset.json. Case ids are the stems without a leading label/img… word, or the full stems
    where that would make two cases one."""
    gt = Path(gt)
    if gt.is_file() and gt.name.lower().endswith(".json"):
        return truths_from_dataset_json(gt), f"{gt} (source_label of each case)"
    folder = find_truth_folder(gt)
    files = _label_files(folder)
    ids = [truth_id(file_stem(p)) for p in files]
    if len(set(ids)) != len(ids):
        ids = [file_stem(p) for p in files]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"two truth files for case {dup} (the same name with two endings?)", folder)
    return dict(zip(ids, files)), str(folder)


@dataclass
class Pairing:
    pairs: list            # [(case id, Prediction, truth Path)]
    unmatched: list        # [Prediction] that match no truth
    left_out: list         # [(case id, truth Path)] without a prediction (only with only_predicted)


def collect_predictions(pred_dirs: Sequence) -> dict[str, Prediction]:
    """The predictions of every folder; a case in two folders is an error naming both."""
    allp: dict[str, Prediction] = {}
    for d in pred_dirs:
        for case, p in find_predictions(d).items():
            if case in allp:
                raise UserError(f"case {case} is predicted in two folders: {allp[case].folder} and {p.folder} "
                                f"(each case belongs to one fold's validation set)")
            allp[case] = p
    return allp


def pair_predictions(truths: dict[str, Path], preds: dict[str, Prediction], pred_dirs: Sequence,
                     only_predicted: bool = False) -> Pairing:
    """Pair every truth with its prediction. A truth without one is an error, or with ``only_predicted`` left out
    (and listed); predictions that match no truth are listed."""
    by_key: dict[str, list[Prediction]] = {}
    for p in preds.values():
        by_key.setdefault(prediction_key(p.case), []).append(p)
    where = Path(pred_dirs[0]) if len(pred_dirs) == 1 else None
    pairs, used, left_out = [], {}, []
    missing = []
    for cid, g in truths.items():
        stem = file_stem(g)
        p = preds.get(stem) or preds.get(cid)
        if p is None:
            cands = {id(x): x for k in (cid, truth_id(stem)) for x in by_key.get(k, [])}
            cands = list(cands.values())
            if len(cands) > 1:
                raise UserError(f"case {cid}: several predictions match ({', '.join(str(x.path) for x in cands)})",
                                where)
            p = cands[0] if cands else None
        if p is None:
            missing.append((cid, g))
            continue
        if p.path in used:
            raise UserError(f"case {cid}: prediction {p.path.name} matches several truth files ({used[p.path]} and "
                            f"{g.name})", where)
        used[p.path] = g.name
        pairs.append((cid, p, g))
    if missing and not only_predicted:
        cid, g = missing[0]
        n = len(missing)
        more = (f" ({n} truth{'s' if n > 1 else ''} {'have' if n > 1 else 'has'} none; --only-predicted scores "
                f"only the cases with predictions)")
        raise UserError(f"case {cid}: no prediction for truth {g.name}{more}", where)
    left_out = missing
    if not pairs:
        raise UserError("no prediction matches any truth file (" + ", ".join(map(str, pred_dirs)) + ")", where)
    unmatched = [p for p in preds.values() if p.path not in used]
    return Pairing(pairs, unmatched, left_out)

"""``glam3d-preprocess inspect DIR``: one table row per case and a list of warnings; reads, never writes.

The layouts and the image reader are preprocessing's own (:mod:`preprocessing.raw_dataset`,
:mod:`preprocessing.imageio`): what inspect shows is what ``glam3d-preprocess`` will read. A dataset.json that is
malformed or inconsistent with its files stops inspect with one error line (exit 2); problems of single cases
(unreadable files, NaN voxels, a degenerate affine, a label map off the image's grid) are warnings naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from glam3d.errors import UserError

from . import datasets as D
from .imageio import IMAGE_ENDINGS, read_header, strip_ending
from .raw_dataset import discover, list_images


def _cases(folder: Path):
    """``(layout, cases, declared label values or None, warnings)`` for a BTCV, nnU-Net v2 / MSD or flat folder."""
    if (folder / "dataset.json").is_file() and ((folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir()):
        raw, cases, warnings = discover(folder)
        return raw.layout, cases, sorted(raw.labels), warnings
    try:
        _, cases, warnings = D.discover_synapse(folder, unlisted="train")
        for c in cases:
            if c.id not in D.SYNAPSE_TRAIN + D.SYNAPSE_TEST:
                c.split = "-"
        return "btcv", cases, list(range(14)), warnings
    except UserError:
        pass
    files = list_images(folder, IMAGE_ENDINGS)
    if not files:
        raise UserError("no images found (expected img/ + label/, an nnU-Net / MSD folder with dataset.json, or "
                        f"image files: {', '.join(IMAGE_ENDINGS)})", folder)
    return "flat", [D.Case(strip_ending(p.name), [p], None, "-") for p in files], None, []


def _fmt_labels(vals):
    vals = [int(v) for v in vals if v != 0]
    if not vals:
        return "-"
    runs, start, prev = [], vals[0], vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(runs)


def inspect_folder(folder, out=print) -> dict:
    """Print the table and warnings; returns ``{"rows": [...], "warnings": [...]}``."""
    import nibabel as nib

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("is not a folder", folder)
    layout, cases, declared, warnings = _cases(folder)
    warnings = list(warnings)
    rows = []
    for c in cases:
        row = {"id": c.id, "split": c.split, "shape": "?", "spacing": "?", "orient": "?", "range": "?",
               "labels": "-"}
        rows.append(row)
        if c.error and "no label file" not in c.error:
            warnings.append(c.error)
        elif c.error:
            warnings.append(c.error)
        if not c.images:
            continue
        try:
            img, data = D.read_image(c, allow_channels=layout != "btcv")
        except UserError as exc:
            # still try to show the header
            warnings.append(str(exc))
            try:
                shape, affine = read_header(c.images[0])
                row["shape"] = "x".join(map(str, shape))
                row["orient"] = "".join(nib.aff2axcodes(affine))
            except Exception:
                pass
            continue
        zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
        row["shape"] = "x".join(map(str, data.shape[:3])) + (f"x{data.shape[3]}" if data.shape[3] > 1 else "")
        row["spacing"] = "x".join(f"{z:.2f}" for z in zooms)
        row["orient"] = "".join(nib.aff2axcodes(img.affine))
        rot = np.asarray(img.affine)[:3, :3] / zooms
        if np.abs(np.abs(rot) - np.round(np.abs(rot))).max() > 1e-3:
            row["orient"] += "*"   # oblique
        row["range"] = f"[{data.min():.0f}, {data.max():.0f}]"
        if c.label is not None:
            try:
                lab = D.read_label(c.label, img, c.images[0], declared if declared is not None else range(256))
                row["labels"] = _fmt_labels(np.unique(lab).tolist())
            except UserError as exc:
                warnings.append(str(exc))
                try:
                    lab = np.asarray(D.load_image(c.label).dataobj)
                    row["labels"] = _fmt_labels(np.unique(lab[np.isfinite(lab)]).astype(int).tolist()) + "!"
                except Exception:
                    row["labels"] = "?"
    cols = [("id", "case"), ("split", "split"), ("shape", "shape"), ("spacing", "spacing x*y*z mm"),
            ("orient", "orient"), ("range", "intensity range"), ("labels", "labels")]
    widths = [max(len(h), *(len(str(r[k])) for r in rows)) for k, h in cols]
    out(f"{folder} ({layout} layout, {len(rows)} cases; * = oblique affine)")
    out("  ".join(h.ljust(w) for (k, h), w in zip(cols, widths)))
    for r in rows:
        out("  ".join(str(r[k]).ljust(w) for (k, _), w in zip(cols, widths)))
    if warnings:
        out(f"{len(warnings)} warning(s):")
        for w in warnings:
            out(f"warning: {w}")
    else:
        out("no warnings")
    return {"rows": rows, "warnings": warnings, "layout": layout}

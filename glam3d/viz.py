"""Figures: segmentation overlays on axial CT slices and GLAM global-attention maps (matplotlib, Agg backend).

All images are first brought to RAS+ voxel order (``nib.as_closest_canonical``) and shown in the radiological
convention: axial slices seen from the feet, patient's right on the left of the picture, anterior at the top, with
the true in-plane pixel aspect ratio.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# BTCV / Synapse label values → names (used when no other names are given)
BTCV_NAMES = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
              7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal/splenic vein", 11: "pancreas",
              12: "right adrenal", 13: "left adrenal"}

_PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
            "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
            "#808000", "#ffd8b1", "#000075", "#808080"]


def label_color(value: int):
    from matplotlib.colors import to_rgb

    return to_rgb(_PALETTE[(int(value) - 1) % len(_PALETTE)])


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def canonical(img):
    """(data in RAS+ voxel order, spacing (sx, sy, sz) mm) of a nibabel image."""
    import nibabel as nib

    c = nib.as_closest_canonical(img)
    data = np.asanyarray(c.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    sp = np.sqrt((c.affine[:3, :3] ** 2).sum(axis=0))
    return data, tuple(float(s) for s in sp)


def axial(vol: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS+ volume ``(X, Y, Z)`` as a picture: rows anterior→posterior, columns patient
    right→left (radiological)."""
    return vol[::-1, ::-1, k].T


def ct_window(slice2d: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Abdominal soft-tissue window to [0, 1]; images that do not look like HU (range within [-5, 5]) are
    min–max scaled instead."""
    s = slice2d.astype(np.float32)
    lo, hi = float(np.nanmin(s)), float(np.nanmax(s))
    if lo >= -5 and hi <= 5:  # already normalised
        return (s - lo) / (hi - lo + 1e-6)
    return np.clip((s - (level - width / 2)) / width, 0, 1)


def choose_slices(labels: np.ndarray, n: int, fallback_depth: Optional[int] = None) -> list[int]:
    """Up to ``n`` axial indices through organ centroids (largest organs first, no two closer than ~2 % of the
    depth); filled evenly through the labelled z-range (or the whole volume) when there are fewer organs."""
    depth = labels.shape[2] if labels is not None else fallback_depth
    if labels is None or not labels.any():
        return sorted({int(round(x)) for x in np.linspace(0.2 * depth, 0.8 * depth, n)})[:n]
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    order = values[np.argsort(-counts)]
    zsum = {}
    for v in order:
        zs = np.nonzero(np.any(labels == v, axis=(0, 1)))[0]
        w = (labels == v).sum(axis=(0, 1))[zs]
        zsum[int(v)] = int(round(float((zs * w).sum() / w.sum())))
    gap = max(1, int(0.02 * depth))
    chosen: list[int] = []
    for v in order:
        z = zsum[int(v)]
        if all(abs(z - c) > gap for c in chosen):
            chosen.append(z)
        if len(chosen) == n:
            break
    if len(chosen) < n:
        zs = np.nonzero(labels.any(axis=(0, 1)))[0]
        for z in np.linspace(zs.min(), zs.max(), n + 2)[1:-1]:
            z = int(round(z))
            if len(chosen) < n and all(abs(z - c) > gap for c in chosen):
                chosen.append(z)
    return sorted(chosen)


def _overlay_rgb(gray: np.ndarray, lab: Optional[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if lab is None:
        return rgb
    for v in np.unique(lab):
        if v == 0:
            continue
        m = lab == v
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(label_color(v))
    return rgb


def _contours(ax, lab, **kw):
    for v in np.unique(lab):
        if v == 0:
            continue
        ax.contour((lab == v).astype(float), levels=[0.5], colors=[label_color(v)], linewidths=1.0, **kw)


def _dice(a, b):
    s = a.sum() + b.sum()
    return float("nan") if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def render_overlay(image, pred, gt=None, out: str | Path = "overlay.png", slices: int | Sequence[int] = 4,
                   names: Optional[dict] = None, dpi: int = 110) -> list[int]:
    """Write a PNG: one row per axial slice; columns CT, prediction (filled) with truth contours, truth (filled).

    ``image``, ``pred``, ``gt``: nibabel images on the same grid. ``slices``: a count (chosen through organ
    centroids of the truth, else the prediction) or explicit axial indices of the RAS+ volume.
    Returns the slice indices drawn."""
    plt = _mpl()
    from matplotlib.patches import Patch

    names = names or BTCV_NAMES
    img, sp = canonical(image)
    prd, _ = canonical(pred)
    tru = canonical(gt)[0] if gt is not None else None
    prd = prd.astype(np.int32)
    tru = tru.astype(np.int32) if tru is not None else None
    if isinstance(slices, int):
        ks = choose_slices(tru if tru is not None else prd, slices, img.shape[2])
    else:
        ks = [int(k) for k in slices]
    ks = [k for k in ks if 0 <= k < img.shape[2]]
    if not ks:
        raise ValueError(f"no axial slice in range 0..{img.shape[2] - 1}")
    ncol = 3 if tru is not None else 2
    aspect = sp[1] / sp[0]  # picture rows are y, columns x
    h, w = img.shape[1] * sp[1], img.shape[0] * sp[0]
    panel = 3.2
    fig, axes = plt.subplots(len(ks), ncol, figsize=(panel * ncol, panel * len(ks) * h / w + 0.9), dpi=dpi,
                             squeeze=False)
    present = set()
    for r, k in enumerate(ks):
        gray = ct_window(axial(img, k))
        p2 = axial(prd, k)
        t2 = axial(tru, k) if tru is not None else None
        present |= set(np.unique(p2).tolist()) | (set(np.unique(t2).tolist()) if t2 is not None else set())
        axes[r, 0].imshow(gray, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
        axes[r, 0].set_ylabel(f"slice {k}", fontsize=9)
        axes[r, 1].imshow(_overlay_rgb(gray, p2), aspect=aspect, interpolation="nearest")
        if t2 is not None:
            _contours(axes[r, 1], t2)
            axes[r, 2].imshow(_overlay_rgb(gray, t2), aspect=aspect, interpolation="nearest")
            vals = [v for v in np.union1d(np.unique(p2), np.unique(t2)) if v != 0]
            d = [_dice(p2 == v, t2 == v) for v in vals]
            d = [x for x in d if not np.isnan(x)]
            if d:
                axes[r, 1].text(0.02, 0.02, f"slice Dice {100 * np.mean(d):.1f}", transform=axes[r, 1].transAxes,
                                color="w", fontsize=8, va="bottom")
        for c in range(ncol):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            for s in axes[r, c].spines.values():
                s.set_visible(False)
        axes[r, 0].text(0.02, 0.5, "R", transform=axes[r, 0].transAxes, color="y", fontsize=9, va="center")
        axes[r, 0].text(0.96, 0.5, "L", transform=axes[r, 0].transAxes, color="y", fontsize=9, va="center")
    titles = ["CT", "prediction" + (" (contours: truth)" if tru is not None else ""), "truth"]
    for c in range(ncol):
        axes[0, c].set_title(titles[c], fontsize=10)
    present.discard(0)
    handles = [Patch(color=label_color(v), label=names.get(int(v), str(int(v)))) for v in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    _save(fig, out, dpi)
    return ks


def to_ras(vol_dhw: np.ndarray, axcodes=("S", "A", "R")) -> np.ndarray:
    """A ``(D, H, W)`` array whose axes point to ``axcodes`` (e.g. ``("S", "A", "R")`` for a plan in RAS) →
    RAS+ ``(X, Y, Z)`` (an exact permutation/flip)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    xyz = np.asarray(vol_dhw).transpose(2, 1, 0)
    tr = ornt_transform(axcodes2ornt(tuple(axcodes)[::-1]), axcodes2ornt(("R", "A", "S")))
    return apply_orientation(xyz, tr)


def render_attention(image_vol: np.ndarray, attn: np.ndarray, voxel: Sequence[int], out: str | Path,
                     spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "", dpi: int = 110,
                     axcodes=("S", "A", "R"), labels: Optional[np.ndarray] = None) -> None:
    """Draw an attention map over a scan: ``image_vol``, ``attn`` (and optional ``labels``) are ``(D, H, W)``
    arrays on the same grid with axes pointing to ``axcodes``; ``spacing`` (sd, sh, sw) mm; ``voxel`` the query
    ``(d, h, w)``. Axial, coronal and sagittal planes through the query (radiological view), query marked ×."""
    plt = _mpl()
    marker = np.zeros(np.asarray(image_vol).shape, dtype=np.uint8)
    marker[tuple(int(v) for v in voxel)] = 1
    img, att, mk = to_ras(image_vol, axcodes), to_ras(attn, axcodes).astype(np.float32), to_ras(marker, axcodes)
    lab = to_ras(labels, axcodes) if labels is not None else None
    x, y, z = (int(v) for v in np.argwhere(mk)[0])
    from nibabel.orientations import axcodes2ornt, ornt_transform

    perm = ornt_transform(axcodes2ornt(tuple(axcodes)[::-1]), axcodes2ornt(("R", "A", "S")))[:, 0].astype(int)
    sp_xyz = np.empty(3)
    sp_xyz[perm] = np.asarray(spacing, float)[::-1]
    sx, sy, sz = sp_xyz
    lo, hi = float(np.nanmin(att)), float(np.nanmax(att))
    att = (att - lo) / (hi - lo + 1e-12)
    X, Y, Z = img.shape

    def planes(v):
        return {"axial": v[::-1, ::-1, z].T, "coronal": v[::-1, y, ::-1].T, "sagittal": v[x, ::-1, ::-1].T}

    pos = {"axial": (X - 1 - x, Y - 1 - y), "coronal": (X - 1 - x, Z - 1 - z), "sagittal": (Y - 1 - y, Z - 1 - z)}
    aspect = {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}
    pi, pa = planes(img), planes(att)
    pl = planes(lab) if lab is not None else None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=dpi)
    hm = None
    for ax, name in zip(axes, ("axial", "coronal", "sagittal")):
        ax.imshow(ct_window(pi[name]), cmap="gray", aspect=aspect[name], interpolation="bilinear")
        hm = ax.imshow(pa[name], cmap="jet", alpha=0.38, aspect=aspect[name], vmin=0, vmax=1,
                       interpolation="bilinear")
        if pl is not None and pl[name].any():
            ax.contour((pl[name] > 0).astype(float), levels=[0.5], colors="w", linewidths=0.6)
        px, py = pos[name]
        ax.plot([px], [py], marker="x", color="w", markersize=11, mew=3)
        ax.plot([px], [py], marker="x", color="k", markersize=9, mew=1.3)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(hm, ax=list(axes), fraction=0.02, pad=0.01, label="attention (min-max normalised)")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, out, dpi)


def _save(fig, out, dpi):
    from .utils.io import atomic_path

    plt = _mpl()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    with atomic_path(Path(out), suffix=".png") as tmp:
        tmp.write_bytes(buf.getvalue())

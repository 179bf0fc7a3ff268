"""Per-scan preprocessing and its inverse: the functions training, inference and the CLI share.

Steps of :func:`preprocess_scan` (the same for training cases and for a new scan at inference):

1. read the voxels (``float32``; NIfTI scaling applied), reject NaN/inf and unexpected dimensionality;
2. reorient to ``plan["orientation"]`` (nearest axis code, nibabel orientation utilities: a permutation and flips,
   exact), then transpose to ``(C, D, H, W) = (C, z, y, x)``;
3. crop to the body (voxels above ``plan["body_threshold"]`` HU, or non-zero voxels when it is ``None``) with a
   margin of ``plan["crop_margin_mm"]``;
4. normalise intensities (``plan["intensity"]``: ``transunet`` clip [-125, 275] -> [0, 1]; ``nnunet`` clip to the
   dataset's foreground 0.5/99.5 percentiles, z-score with the dataset's foreground mean/std; ``zscore`` per-case
   z-score over non-zero voxels, for MRI);
5. resample to ``plan["target_spacing"]`` (SimpleITK; images linear or B-spline; labels nearest neighbour or
   nnU-Net style per-label linear + argmax, ``plan["interpolation"]["label"]``). The output
   shape is ``round(cropped_shape * spacing / target_spacing)`` and the grids share their outer extent, so the
   inverse mapping is the same operation backwards.

:func:`restore_labels` undoes 5, 3, 2 for a label map and maps training indices back to the original label values.

Example::

    plan = json.load(open("out/dataset.json"))["plan"]
    x, meta = preprocess_scan(nib.load("scan.nii.gz"), plan)        # (1, D, H, W) float32
    seg = model_predict(x)                                           # (D, H, W) uint8 training indices
    restore_labels(seg, meta, plan).to_filename("scan_seg.nii.gz")  # scan's exact geometry, original label ids
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from glam3d.errors import UserError

PLAN_VERSION = 1
INTENSITY_SCHEMES = ("transunet", "nnunet", "zscore")
TRANSUNET_WINDOW = (-125.0, 275.0)


# --------------------------------------------------------------------------------------------- plan
def make_plan(target_spacing, intensity: dict, label_values: dict, *, orientation: str = "RAS",
              crop_to_body: bool = True, body_threshold=-500.0, crop_margin_mm: float = 10.0,
              num_channels: int = 1, image_interpolation: str = "linear",
              label_interpolation: str = "linear") -> dict:
    """Build a plan dict (JSON-serialisable). ``label_values``: training index -> original label value."""
    if intensity.get("scheme") not in INTENSITY_SCHEMES:
        raise UserError(f"--intensity: unknown scheme {intensity.get('scheme')!r}; choose one of "
                        f"{', '.join(INTENSITY_SCHEMES)}")
    if image_interpolation not in ("linear", "bspline"):
        raise UserError(f"--interpolation must be linear or bspline, got {image_interpolation!r}")
    if label_interpolation not in ("linear", "nearest"):
        raise UserError(f"--label-interpolation must be linear or nearest, got {label_interpolation!r}")
    try:
        axcodes2ornt(tuple(orientation))
        assert len(orientation) == 3 and len(set(orientation.upper())) == 3
    except Exception:
        raise UserError(f"--orientation: {orientation!r} is not a 3-letter axis code such as RAS or LPS") from None
    ts = [float(v) for v in target_spacing]
    if len(ts) != 3 or not all(v > 0 and math.isfinite(v) for v in ts):
        raise UserError(f"--spacing needs three positive numbers (sz sy sx), got {target_spacing}")
    return {
        "version": PLAN_VERSION,
        "orientation": orientation.upper(),
        "target_spacing": ts,
        "intensity": intensity,
        "label_values": {str(int(k)): int(v) for k, v in label_values.items()},
        "crop_to_body": bool(crop_to_body),
        "body_threshold": None if body_threshold is None else float(body_threshold),
        "crop_margin_mm": float(crop_margin_mm),
        "num_channels": int(num_channels),
        "interpolation": {"image": image_interpolation, "label": label_interpolation},
    }


# --------------------------------------------------------------------------------------------- helpers
def read_voxels(image: nib.Nifti1Image, name=None, allow_channels: bool = True) -> np.ndarray:
    """Voxel array ``(X, Y, Z, C)`` float32 of a NIfTI image; one-line :class:`UserError` for unreadable data."""
    name = name or image.get_filename() or "image"
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip, short file, ...
        raise UserError(f"cannot read the voxel data ({type(exc).__name__}: {exc})", name) from None
    if data.ndim == 5 and data.shape[3] == 1:     # (X, Y, Z, 1, C) NIfTI vector layout
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise UserError(f"expected a 3D image, got {data.ndim}D shape {data.shape}", name)
    if data.shape[3] > 1 and not allow_channels:
        raise UserError(f"expected a 3D image, got 4D shape {data.shape} ({data.shape[3]} volumes)", name)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise UserError(f"{bad} NaN/inf voxels", name)
    return data


def _orientation_transform(affine, orientation):
    start = io_orientation(affine)
    return ornt_transform(start, axcodes2ornt(tuple(orientation))), start


def reorient(data: np.ndarray, affine, orientation: str):
    """``data`` (X, Y, Z[, C]) -> (array in ``orientation``, its affine); a permutation and flips, exact."""
    tr, _ = _orientation_transform(affine, orientation)
    out = apply_orientation(data, tr)
    new_affine = np.asarray(affine, float) @ nib.orientations.inv_ornt_aff(tr, data.shape[:3])
    return out, new_affine


def voxel_sizes(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def resize(arr: np.ndarray, out_shape, mode: str = "linear") -> np.ndarray:
    """Resample a 3D array to ``out_shape`` (SimpleITK); the input and output grids share their outer extent
    (voxel i of the output is centred on input coordinate ``(i + 0.5) * n_in / n_out - 0.5``)."""
    import SimpleITK as sitk

    out_shape = tuple(int(v) for v in out_shape)
    if tuple(arr.shape) == out_shape:
        return arr.copy()
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}[mode]
    src = np.ascontiguousarray(arr)
    if mode == "nearest":
        src = src.astype(np.uint16 if src.max(initial=0) > 255 else np.uint8)
        pixel = sitk.sitkUInt16 if src.dtype == np.uint16 else sitk.sitkUInt8
    else:
        src = src.astype(np.float32)
        pixel = sitk.sitkFloat32
    img = sitk.GetImageFromArray(src)               # numpy (d, h, w) -> ITK size (w, h, d), spacing 1
    size = list(out_shape[::-1])
    spacing = [ni / no for ni, no in zip(src.shape[::-1], size)]
    origin = [0.5 * (s - 1.0) for s in spacing]
    res = sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing,
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 0.0, pixel)
    out = sitk.GetArrayFromImage(res)
    return out.astype(arr.dtype if mode == "nearest" else np.float32, copy=False)


def resize_labels(lab: np.ndarray, out_shape, mode: str = "linear") -> np.ndarray:
    """Resample an integer label map. ``nearest``; or ``linear`` (nnU-Net's order-1 segmentation resampling):
    each label's one-hot mask is resampled linearly and every voxel takes the label with the largest value, which
    keeps thin structures and organ volumes much better than nearest neighbour."""
    out_shape = tuple(int(v) for v in out_shape)
    if mode == "nearest" or tuple(lab.shape) == out_shape:
        return resize(lab, out_shape, "nearest")
    if mode != "linear":
        raise UserError(f"label interpolation must be nearest or linear, got {mode!r}")
    values = np.unique(lab)
    out = np.full(out_shape, values[0], dtype=lab.dtype)
    if len(values) == 1:
        return out
    best = resize((lab == values[0]).astype(np.float32), out_shape, "linear")
    for v in values[1:]:
        p = resize((lab == v).astype(np.float32), out_shape, "linear")
        m = p > best
        out[m] = v
        np.maximum(best, p, out=best)
    return out


def body_bbox(arr: np.ndarray, spacing, plan) -> list:
    """``[[d0, d1], [h0, h1], [w0, w1]]`` (half-open) of the body in a ``(C, D, H, W)`` array."""
    shape = arr.shape[1:]
    if not plan.get("crop_to_body", True):
        return [[0, int(n)] for n in shape]
    from monai.transforms.utils import generate_spatial_bounding_box

    thr = plan.get("body_threshold", -500.0)
    margin = [int(math.ceil(plan.get("crop_margin_mm", 10.0) / s)) for s in spacing]
    if thr is None:
        select = lambda x: x != 0  # noqa: E731
        src = arr
    else:
        select = lambda x: x > thr  # noqa: E731
        src = arr[:1]
    start, end = generate_spatial_bounding_box(src, select_fn=select, channel_indices=None, margin=margin,
                                               allow_smaller=True)
    if any(e <= s for s, e in zip(start, end)):   # nothing above the threshold: keep everything
        return [[0, int(n)] for n in shape]
    return [[max(int(s), 0), min(int(e), int(n))] for s, e, n in zip(start, end, shape)]


def normalise(arr: np.ndarray, intensity: dict) -> np.ndarray:
    """Intensity normalisation of a ``(C, D, H, W)`` float32 array (MONAI intensity transforms)."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    scheme = intensity["scheme"]
    if scheme == "transunet":
        lo, hi = intensity.get("window", TRANSUNET_WINDOW)
        t = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        return np.asarray(t(arr), dtype=np.float32)
    out = np.empty_like(arr, dtype=np.float32)
    if scheme == "nnunet":
        chans = intensity["channels"]
        if len(chans) != arr.shape[0]:
            raise UserError(f"plan intensity statistics are for {len(chans)} channels, the scan has {arr.shape[0]}")
        for c, st in enumerate(chans):
            x = np.clip(arr[c], st["lower"], st["upper"])
            t = NormalizeIntensity(subtrahend=st["mean"], divisor=max(st["std"], 1e-8))
            out[c] = np.asarray(t(x), dtype=np.float32)
        return out
    if scheme == "zscore":
        t = NormalizeIntensity(nonzero=True, channel_wise=True)
        return np.asarray(t(arr), dtype=np.float32)
    raise UserError(f"plan: unknown intensity scheme {scheme!r}")


def _oriented_channels_first(data_xyzc, affine, plan):
    oriented, new_affine = reorient(data_xyzc, affine, plan["orientation"])
    arr = np.ascontiguousarray(oriented.transpose(3, 2, 1, 0))    # (C, z, y, x)
    spacing = voxel_sizes(new_affine)[::-1].tolist()               # (sz, sy, sx)
    return arr, spacing


def _target_shape(shape, spacing, target):
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]


# voxel sizes outside this range (mm) are header errors (pixdim 0, or metres/microns mistaken for mm), not scans
SPACING_RANGE_MM = (1e-3, 1e3)
MAX_RESAMPLED_VOXELS = 2 ** 30   # 4 GiB of float32 per channel


def check_stored_pixdims(path) -> None:
    """nibabel silently turns a stored pixdim of 0 into 1 mm when it reads a header; when the affine comes from
    the pixdims (sform_code 0), such a file would be processed with a made-up voxel size. Read the stored header
    unchecked and refuse it (one-line :class:`UserError`)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path), "rb") as fh:
            raw = fh.read(348)
        if len(raw) < 348:
            return  # nibabel's own reader reports short files
        hdr = nib.Nifti1Header(raw, check=False) if raw[344:348] in (b"n+1\0", b"ni1\0") else None
    except Exception:
        return
    if hdr is None:
        return
    if int(hdr["sform_code"]) == 0:
        pix = [float(v) for v in hdr["pixdim"][1:4]]
        if not all(math.isfinite(v) and v != 0 for v in pix):
            raise UserError(f"the header's voxel size (pixdim) is {' x '.join(f'{v:g}' for v in pix)} mm and "
                            f"there is no sform: the scan's geometry is unknown", path)


def check_spacing(spacing, name=None) -> None:
    """One-line :class:`UserError` for absurd voxel sizes (0, negative, NaN, > 1 m, < 1 µm)."""
    lo, hi = SPACING_RANGE_MM
    sp = [float(v) for v in spacing]
    if not all(math.isfinite(v) and lo <= v <= hi for v in sp):
        raise UserError(f"implausible voxel size {' x '.join(f'{v:.4g}' for v in sp)} mm in the header "
                        f"(expected {lo:g}..{hi:g} mm per axis; check pixdim / the affine)", name)


# --------------------------------------------------------------------------------------------- public API
def preprocess_scan(image: nib.Nifti1Image, plan: dict, *, _data=None):
    """Preprocess one scan as the plan says.

    Returns ``(array float32 (C, D, H, W), meta)``; ``meta`` (JSON-serialisable) is what :func:`restore_labels`
    needs: ``source_image``, ``source_label``, ``original_shape`` (X, Y, Z as stored), ``original_affine``,
    ``orientation`` (stored axis code), ``spacing`` (sz, sy, sx after reorientation), ``oriented_shape``,
    ``bbox`` (half-open ``[[d0, d1], [h0, h1], [w0, w1]]`` in the oriented grid), ``cropped_shape``,
    ``resampled_shape``, ``resampled_spacing``, ``num_channels``.
    """
    name = image.get_filename()
    data = read_voxels(image, name) if _data is None else _data
    nch = int(plan.get("num_channels", 1))
    if data.shape[3] != nch:
        raise UserError(f"the plan expects {nch} channel(s), the image has {data.shape[3]}", name)
    affine = np.asarray(image.affine, float)
    if not np.all(np.isfinite(affine)):
        raise UserError("the NIfTI header has a non-finite affine", name)
    check_spacing(voxel_sizes(affine), name)
    arr, spacing = _oriented_channels_first(data, affine, plan)
    tshape = _target_shape(arr.shape[1:], spacing, plan["target_spacing"])
    if math.prod(tshape) > MAX_RESAMPLED_VOXELS:
        raise UserError(f"resampling to {plan['target_spacing']} mm would give {tshape} voxels (more than "
                        f"{MAX_RESAMPLED_VOXELS}); check the header's voxel size", name)
    bbox = body_bbox(arr, spacing, plan)
    crop = arr[(slice(None),) + tuple(slice(a, b) for a, b in bbox)]
    crop = normalise(np.ascontiguousarray(crop), plan["intensity"])
    tshape = _target_shape(crop.shape[1:], spacing, plan["target_spacing"])
    mode = plan.get("interpolation", {}).get("image", "linear")
    out = np.stack([resize(c, tshape, mode) for c in crop]).astype(np.float32)
    meta = {
        "source_image": name,
        "source_label": None,
        "original_shape": [int(v) for v in data.shape[:3]],
        "original_affine": affine.tolist(),
        "orientation": "".join(aff2axcodes(affine)),
        "spacing": [float(v) for v in spacing],
        "oriented_shape": [int(v) for v in arr.shape[1:]],
        "bbox": bbox,
        "cropped_shape": [int(v) for v in crop.shape[1:]],
        "resampled_shape": [int(v) for v in tshape],
        "resampled_spacing": [float(n * s / m) for n, s, m in zip(crop.shape[1:], spacing, tshape)],
        "num_channels": nch,
    }
    return out, meta


def preprocess_label(label_xyz: np.ndarray, affine, meta: dict, plan: dict) -> np.ndarray:
    """A label map in the scan's stored geometry -> training indices ``(D, H, W)`` uint8 on the preprocessed grid.

    ``label_xyz`` holds original label values; values not in ``plan["label_values"]`` become background.
    """
    lut = _forward_lut(plan, int(label_xyz.max(initial=0)))
    lab = lut[label_xyz.astype(np.int64)]
    oriented, _ = reorient(lab, affine, plan["orientation"])
    lab = oriented.transpose(2, 1, 0)
    (d0, d1), (h0, h1), (w0, w1) = meta["bbox"]
    lab = np.ascontiguousarray(lab[d0:d1, h0:h1, w0:w1])
    mode = plan.get("interpolation", {}).get("label", "linear")
    return resize_labels(lab, meta["resampled_shape"], mode).astype(np.uint8)


def _forward_lut(plan, max_value):
    lv = {int(k): int(v) for k, v in plan["label_values"].items()}
    lut = np.zeros(max(max_value, max(lv.values(), default=0)) + 1, dtype=np.uint8)
    for idx, val in lv.items():
        lut[val] = idx
    return lut


def _check_meta(arr_shape, meta, what):
    if list(arr_shape) != list(meta["resampled_shape"]):
        raise UserError(f"{what} has shape {tuple(arr_shape)} but the preprocessed scan was "
                        f"{tuple(meta['resampled_shape'])}")


def _to_original(vol_dhw: np.ndarray, meta: dict, plan: dict, mode: str, fill=0):
    """(D', H', W') on the preprocessed grid -> (X, Y, Z) in the stored geometry."""
    if mode == "label":
        vol = resize_labels(vol_dhw, meta["cropped_shape"], plan.get("interpolation", {}).get("label", "linear"))
    else:
        vol = resize(vol_dhw, meta["cropped_shape"], mode)
    full = np.full(meta["oriented_shape"], fill, dtype=vol.dtype)
    (d0, d1), (h0, h1), (w0, w1) = meta["bbox"]
    full[d0:d1, h0:h1, w0:w1] = vol
    xyz = full.transpose(2, 1, 0)
    affine = np.asarray(meta["original_affine"], float)
    start = io_orientation(affine)
    back = ornt_transform(axcodes2ornt(tuple(plan["orientation"])), start)
    out = apply_orientation(xyz, back)
    if list(out.shape) != list(meta["original_shape"]):   # cannot happen unless meta was edited
        raise UserError(f"meta does not match: restored shape {out.shape} != original {meta['original_shape']}")
    return np.ascontiguousarray(out)


def restore_labels(labels: np.ndarray, meta: dict, plan: dict) -> nib.Nifti1Image:
    """Training-index labels ``(D, H, W)`` on the preprocessed grid -> NIfTI in the scan's exact shape and affine,
    with the original label values (``plan["label_values"]``; resampled as ``plan["interpolation"]["label"]``:
    nearest neighbour, or per-label linear + argmax)."""
    labels = np.asarray(labels)
    _check_meta(labels.shape, meta, "labels")
    lv = {int(k): int(v) for k, v in plan["label_values"].items()}
    n = max(lv, default=0)
    if labels.size and (labels.min() < 0 or labels.max() > n):
        raise UserError(f"labels contain values outside 0..{n} (the plan's training indices)")
    lut = np.zeros(n + 1, dtype=np.int32)
    for idx, val in lv.items():
        lut[idx] = val
    out = _to_original(labels.astype(np.uint8), meta, plan, "label")
    vals = lut[out]
    dtype = np.uint8 if vals.max(initial=0) <= 255 else np.int16
    affine = np.asarray(meta["original_affine"], float)
    nii = nib.Nifti1Image(vals.astype(dtype), affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    return nii


def restore_probabilities(probs: np.ndarray, meta: dict, plan: dict) -> np.ndarray:
    """Class probabilities ``(K, D, H, W)`` on the preprocessed grid -> ``(K, X, Y, Z)`` float32 in the scan's
    stored geometry (linear). Outside the body crop, background (class 0) gets 1 and the others 0."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4:
        raise UserError(f"probabilities must be (K, D, H, W), got shape {probs.shape}")
    _check_meta(probs.shape[1:], meta, "probabilities")
    return np.stack([_to_original(p, meta, plan, "linear", fill=1.0 if k == 0 else 0.0)
                     for k, p in enumerate(probs)]).astype(np.float32)

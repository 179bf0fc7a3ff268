"""Per-scan preprocessing and its inverse: the functions training, inference and the CLI share.

Steps of :func:`preprocess_scan` (the same for training cases and for a new scan at inference):

1. read the voxels (NIfTI scaling applied: ``float32``; integers stored unscaled, as most CTs are, stay in their
   stored dtype), reject NaN/inf and unexpected dimensionality;
2. reorient to ``plan["orientation"]`` (nearest axis code, nibabel orientation utilities: a permutation and flips,
   exact), then transpose to ``(C, D, H, W) = (C, z, y, x)``;
3. crop to the body (voxels above ``plan["body_threshold"]`` HU, or non-zero voxels when it is ``None``) with a
   margin of ``plan["crop_margin_mm"]``;
4. normalise intensities, channel by channel (``plan["intensity"]``, :func:`channel_normalisations`: ``transunet``
   clip [-125, 275] -> [0, 1]; ``nnunet`` clip to the dataset's foreground 0.5/99.5 percentiles, z-score with the
   dataset's foreground mean/std; ``zscore`` per-case z-score over non-zero voxels, for MRI; ``per_channel`` one of
   nnU-Net's schemes per channel, picked by the channel's name: ``ct``, ``zscore``, ``nonorm``,
   ``rescale_to_0_1``, ``rgb_to_0_1``). Per-case statistics (z-score, min/max) are measured on the cropped scan
   first, slab by slab; then every scheme is an elementwise function of the voxels;
5. resample to ``plan["target_spacing"]`` (SimpleITK; images linear or B-spline; labels nearest neighbour or
   nnU-Net style per-label linear + argmax, ``plan["interpolation"]["label"]``). The output
   shape is ``round(cropped_shape * spacing / target_spacing)`` and the grids share their outer extent, so the
   inverse mapping is the same operation backwards.

:func:`restore_labels` undoes 5, 3, 2 for a label map and maps training indices back to the original label values.

Memory: besides the scan as read and the result, only slabs of about :data:`SLAB_BYTES` exist — the body box,
the normalisation and the resampling (fused: each output slab normalises and resamples the input rows it needs)
and the restoration all run slab by slab along D (a 512×512×1,000 int16 CT: 0.52 GB read + the output; before,
four float32 copies of the scan). Slabbed linear resampling equals one whole-volume SimpleITK call up to one
float32 rounding of the input values (the slab's output origin is one rounding away from the whole grid's);
nearest neighbour is exact (per-axis index maps over the whole grid); B-spline, whose prefilter spans the input,
resamples the whole volume. ``preprocess_scan(..., lazy=True)`` (what ``glam3d predict`` uses) does not even make
the output: it returns a :class:`LazyScan`, whose rows are normalised and resampled when the sliding window reads
them (one span of window rows at a time), so at a fine plan the float32 network input — about the size of the
scan, twice the int16 scan — never exists as a whole; with ``spill_dir`` the scan itself is decoded into an
unlinked file there and mapped (:func:`spill_stored`), its pages dropped from the process after every read
(:func:`release_pages`): then the process holds the rows being read, not the scan.

Example::

    plan = json.load(open("out/dataset.json"))["plan"]
    x, meta = preprocess_scan(nib.load("scan.nii.gz"), plan)        # (1, D, H, W) float32
    seg = model_predict(x)                                           # (D, H, W) uint8 training indices
    restore_labels(seg, meta, plan).to_filename("scan_seg.nii.gz")  # scan's exact geometry, original label ids
"""
from __future__ import annotations

import math
import mmap
import os
import tempfile
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from glam3d.errors import UserError

from .imageio import check_affine, check_voxel_type

PLAN_VERSION = 1
INTENSITY_SCHEMES = ("transunet", "nnunet", "zscore", "per_channel")
TRANSUNET_WINDOW = (-125.0, 275.0)
#: nnU-Net v2's normalisation schemes, named by a channel's name (case-insensitive); any other name -> ``zscore``
CHANNEL_SCHEMES = ("ct", "zscore", "nonorm", "rescale_to_0_1", "rgb_to_0_1")
CT_STATISTICS = ("lower", "upper", "mean", "std")


def channel_scheme(name: str) -> str:
    """nnU-Net's normalisation for a channel named ``name`` (dataset.json ``channel_names`` / ``modality``):
    ``CT`` -> ``ct`` (dataset-wide foreground statistics), ``noNorm``, ``zscore``, ``rescale_to_0_1``,
    ``rgb_to_0_1`` as named, anything else (``T1``, ``FLAIR``, ``MRI``, ``PET``, ...) -> ``zscore`` (per case)."""
    n = str(name).strip().casefold()
    return n if n in CHANNEL_SCHEMES else "zscore"


# --------------------------------------------------------------------------------------------- plan
def make_plan(target_spacing, intensity: dict, label_values: dict, *, orientation: str = "RAS",
              crop_to_body: bool = True, body_threshold=-500.0, crop_margin_mm: float = 10.0,
              num_channels: int = 1, image_interpolation: str = "linear",
              label_interpolation: str = "linear") -> dict:
    """Build a plan dict (JSON-serialisable). ``label_values``: training index -> original label value."""
    if intensity.get("scheme") not in INTENSITY_SCHEMES:
        raise UserError(f"--intensity: unknown scheme {intensity.get('scheme')!r}; choose one of "
                        f"{', '.join(INTENSITY_SCHEMES)}")
    if intensity["scheme"] in ("nnunet", "per_channel"):
        channel_normalisations(intensity, int(num_channels))   # checked now, not at the first scan
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
def read_voxels(image: nib.Nifti1Image, name=None, allow_channels: bool = True,
                keep_integers: bool = False, spill_dir=None) -> np.ndarray:
    """Voxel array ``(X, Y, Z, C)`` float32 of a NIfTI image; one-line :class:`UserError` for unreadable data.

    ``keep_integers``: integer voxels stored without scaling (slope 1, intercept 0: most CTs) come back in their
    stored dtype (int16: half the memory of float32; the values are the same numbers). With ``spill_dir`` too,
    such voxels are decoded into a file there and come back mapped from it (:func:`spill_stored`): the scan is
    then not held in memory, only the pages read since the last :func:`release_pages`."""
    name = name or image.get_filename() or "image"
    check_voxel_type(image.get_data_dtype(), name)
    try:
        if keep_integers and stored_unscaled_integers(image):
            data = spill_stored(image, spill_dir) if spill_dir is not None else None
            data = _read_stored(image) if data is None else data
        else:
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
    if data.dtype.kind == "f" and not _all_finite(data):
        bad = int((~np.isfinite(data)).sum())
        raise UserError(f"{bad} NaN/inf voxels", name)
    return data


def _read_stored(image: nib.Nifti1Image) -> np.ndarray:
    """The stored voxels of a NIfTI file, read straight into their array (``readinto``: nibabel's own read of a
    ``.nii.gz`` holds the decompressed bytes and the array, twice the volume). Images without a plain file behind
    them (in memory, other proxies) are read by nibabel."""
    proxy = _plain_file_proxy(image)
    if proxy is None:
        return np.asanyarray(image.dataobj)
    out = np.empty(proxy.shape, dtype=proxy.dtype, order=proxy.order)
    buf = memoryview(out.reshape(-1, order="A")).cast("B")
    for _ in _stored_pieces(proxy, lambda got, n: buf[got:got + n]):
        pass
    return out


def _stored_bytes(proxy) -> int:
    return int(np.prod(proxy.shape, dtype=np.int64)) * proxy.dtype.itemsize


def _stored_pieces(proxy, into):
    """Read the stored voxel bytes of a plain-file ``proxy`` (:func:`_plain_file_proxy`) in pieces of at most
    :data:`SLAB_BYTES` (gzip's ``readinto`` reads into a temporary of the request's size): ``into(got, n)`` gives
    the writable buffer of ``n`` bytes for the piece starting at byte ``got``; yields each piece as read. A file
    that ends early raises ``EOFError``."""
    from nibabel.openers import ImageOpener

    total = _stored_bytes(proxy)
    with ImageOpener(proxy.file_like, "rb") as fh:
        fh.seek(proxy.offset)
        got = 0
        while got < total:
            view = into(got, min(SLAB_BYTES, total - got))
            n = fh.readinto(view)
            if not n:
                raise EOFError(f"the file ends after {got} of {total} voxel bytes")
            yield view[:n]
            got += n


def _plain_file_proxy(image: nib.Nifti1Image):
    """The image's ``ArrayProxy`` when its voxels come from a plain file nibabel opens by name, else None."""
    from nibabel.arrayproxy import ArrayProxy

    proxy = image.dataobj
    fname = getattr(image.file_map.get("image"), "filename", None)
    if type(proxy) is not ArrayProxy or not isinstance(proxy.file_like, str) or fname != proxy.file_like:
        return None
    return proxy


def spill_stored(image: nib.Nifti1Image, folder) -> np.ndarray | None:
    """The stored voxels decoded (a ``.nii.gz`` decompressed) into a temporary file in ``folder``, mapped read-only
    (``np.memmap`` of the stored shape, dtype and order). The file is unlinked as soon as it is created and
    written and mapped through its descriptor: nothing is left behind, even by a killed process, and the disk
    space goes with the mapping. The scan then lives in the page cache, not in the process: only the pages
    touched since the last :func:`release_pages` count in its resident memory. None when the voxels cannot be
    mapped there (not a plain file; a folder that cannot take the file: not writable, less than twice the scan's
    size free, a write that fails): the caller reads them into memory instead. Errors of the input itself (a
    short or corrupt file) are raised."""
    from glam3d.utils.io import has_room

    proxy = _plain_file_proxy(image)
    if proxy is None:
        return None
    total = _stored_bytes(proxy)
    try:
        if total == 0 or not has_room(folder, total):
            return None
        fd, path = tempfile.mkstemp(prefix=".glam3d-scan-", suffix=".raw", dir=folder)
        os.unlink(path)   # from now on only the descriptor (and then the mapping) holds the file
    except OSError:
        return None
    with os.fdopen(fd, "w+b") as out:
        bounce = memoryview(bytearray(min(SLAB_BYTES, total)))
        for piece in _stored_pieces(proxy, lambda got, n: bounce[:n]):   # input errors propagate
            try:
                out.write(piece)
            except OSError:   # disk full, quota: read into memory instead
                return None
        try:
            out.flush()
            os.fsync(out.fileno())   # a write error the filesystem reports late shows up here, not as bad pages
        except OSError:
            return None
        return np.memmap(out, dtype=proxy.dtype, mode="r", shape=tuple(proxy.shape), order=proxy.order)


def release_pages(arr) -> None:
    """Drop the pages of a file mapping (``arr``: a :func:`spill_stored` array or a view of it) from the process's
    resident memory (``madvise(MADV_DONTNEED)``: they stay in the page cache and are mapped again when touched).
    Nothing for an in-memory array."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def stored_unscaled_integers(image) -> bool:
    """The image stores integers without scaling (slope 1, intercept 0; nibabel maps an unset slope to 1, 0):
    its voxels are their stored values, readable in the stored dtype by :func:`_read_stored`."""
    proxy = image.dataobj
    return (getattr(proxy, "dtype", np.dtype(np.float32)).kind in "iu"
            and (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))) == (1.0, 0.0))


def _all_finite(data: np.ndarray) -> bool:
    """``np.isfinite(data).all()`` for ``(X, Y, Z[, C])`` without a whole-volume boolean temporary (Z slabs)."""
    return all(np.isfinite(data[:, :, z0:z1]).all() for z0, z1 in z_slabs(data.shape, data.itemsize))


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


#: output slab size (bytes of float32) of the resampling functions: their temporaries are one slab, not a volume
SLAB_BYTES = 1 << 24


def _slabs(out_shape, itemsize: int = 4, in_shape=None, rows=None):
    """Half-open ranges along axis 0 of an ``out_shape`` array of about :data:`SLAB_BYTES` each — and, when
    resampling from ``in_shape``, such that the input rows a range reads are about that size too. ``rows =
    (o0, o1)``: ranges covering those rows only (default: all)."""
    plane = max(1, math.prod(out_shape[1:]) * itemsize)
    if in_shape is not None:
        plane = max(plane, math.ceil(math.prod(in_shape[1:]) * 4 * in_shape[0] / max(1, out_shape[0])))
    step = max(1, SLAB_BYTES // plane)
    o0, o1 = (0, out_shape[0]) if rows is None else rows
    return [(a, min(a + step, o1)) for a in range(o0, o1, step)]


def z_slabs(shape_xyz, itemsize: int):
    """:func:`_slabs` along axis 2 of an ``(X, Y, Z[, C])`` array (a NIfTI volume as stored)."""
    return _slabs((shape_xyz[2], *shape_xyz[:2], *shape_xyz[3:]), itemsize)


def _source_rows(o0: int, o1: int, n_in: int, n_out: int, margin: int = 3):
    """Rows ``[k0, k1)`` of the input that output rows ``[o0, o1)`` interpolate from (+ ``margin``)."""
    scale = n_in / n_out
    lo = math.floor((o0 + 0.5) * scale - 0.5) - margin
    hi = math.floor((o1 - 0.5) * scale - 0.5) + 1 + margin
    return max(0, lo), min(n_in, hi)


def _resample(src: np.ndarray, in_shape, out_shape, mode: str, rows=None, src_row0: int = 0) -> np.ndarray:
    """SimpleITK resampling of ``src`` (rows ``src_row0 ...`` of an ``in_shape`` volume) onto output rows
    ``rows = (o0, o1)`` of the ``out_shape`` grid (all rows when None); grids share their outer extent (voxel i
    of the output is centred on input coordinate ``(i + 0.5) * n_in / n_out - 0.5``). A sub-range of rows is
    the same computation as the whole volume's: the input keeps its index coordinates (origin ``src_row0``)."""
    import SimpleITK as sitk

    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}[mode]
    pixel = {np.dtype(np.uint8): sitk.sitkUInt8, np.dtype(np.uint16): sitk.sitkUInt16,
             np.dtype(np.float32): sitk.sitkFloat32}[src.dtype]
    o0, o1 = (0, out_shape[0]) if rows is None else rows
    img = sitk.GetImageFromArray(np.ascontiguousarray(src))   # numpy (d, h, w) -> ITK size (w, h, d), spacing 1
    img.SetOrigin((0.0, 0.0, float(src_row0)))
    size = [int(out_shape[2]), int(out_shape[1]), int(o1 - o0)]
    spacing = [ni / no for ni, no in zip(in_shape[::-1], out_shape[::-1])]
    origin = [0.5 * (s - 1.0) for s in spacing]
    origin[2] += o0 * spacing[2]
    res = sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing,
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 0.0, pixel)
    return sitk.GetArrayFromImage(res)


def _nearest_index(n_in: int, n_out: int, axis: int) -> np.ndarray:
    """Input index of every output position along ``axis`` for nearest-neighbour resampling ``n_in -> n_out``:
    SimpleITK's nearest neighbour on a ramp, over the axis's whole grid (slabbed output origins would round
    positions exactly halfway between two rows the other way)."""
    ins, outs = [1, 1, 1], [1, 1, 1]
    ins[axis], outs[axis] = n_in, n_out
    ramp = np.arange(n_in, dtype=np.float32).reshape(ins)   # exact integers below 2**24
    return _resample(ramp, tuple(ins), tuple(outs), "nearest").reshape(-1).astype(np.intp)


def resize(arr: np.ndarray, out_shape, mode: str = "linear", out: np.ndarray | None = None,
           transform=None, rows=None) -> np.ndarray:
    """Resample a 3D array to ``out_shape`` (SimpleITK); the input and output grids share their outer extent
    (voxel i of the output is centred on input coordinate ``(i + 0.5) * n_in / n_out - 0.5``).

    ``linear`` works in output slabs of about :data:`SLAB_BYTES`, each from the input rows it needs (temporaries:
    one slab); ``nearest`` gathers slab by slab through one index map per axis (exactly the whole-volume result);
    ``bspline`` (whose prefilter spans the whole input) resamples the volume at once.
    ``out``: write the result there (an array or view of the result's shape) instead of a new array.
    ``transform``: an elementwise function applied to the input (as float32 rows, a fresh copy it may change in
    place) before resampling — an intensity normalisation fused into the resampling, so that the normalised
    input never exists as a whole volume. ``rows = (o0, o1)``: only those rows of the result along axis 0
    (``(o1 - o0, *out_shape[1:])``; not for ``bspline``), computed from the input rows they need: the same values
    as those rows of the whole result (linear: up to one float32 rounding, see the module's notes).
    Output dtype: the input's for ``nearest``, float32 otherwise."""
    out_shape = tuple(int(v) for v in out_shape)
    if mode not in ("linear", "nearest", "bspline"):
        raise UserError(f"unknown interpolation {mode!r} (linear, nearest, bspline)")
    if transform is not None and mode == "nearest":
        raise ValueError("transform needs a float interpolation (linear or bspline)")
    o0, o1 = (0, out_shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= o0 <= o1 <= out_shape[0]:
        raise ValueError(f"rows {rows} outside the {out_shape[0]} output rows")
    res_shape = (o1 - o0,) + out_shape[1:]
    dtype = arr.dtype if mode == "nearest" else np.dtype(np.float32)
    if out is None:
        out = np.empty(res_shape, dtype=dtype)
    elif tuple(out.shape) != res_shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {res_shape}")

    def source(k0, k1, cast):
        if transform is None:
            return arr[k0:k1].astype(cast, copy=False)
        return transform(np.array(arr[k0:k1], dtype=np.float32))

    if tuple(arr.shape) == out_shape:
        for a, b in _slabs(out_shape, rows=(o0, o1)):
            out[a - o0:b - o0] = source(a, b, out.dtype)
        return out
    if mode == "nearest":  # separable: one index map per axis, rounded as the whole-volume resampling rounds
        iz, iy, ix = (_nearest_index(arr.shape[a], out_shape[a], a) for a in range(3))
        for a, b in _slabs(out_shape, out.itemsize, rows=(o0, o1)):
            out[a - o0:b - o0] = arr[np.ix_(iz[a:b], iy, ix)]
        return out
    if mode == "bspline":
        if (o0, o1) != (0, out_shape[0]):
            raise ValueError("bspline resamples the whole volume (its prefilter spans the input): no rows=")
        out[...] = _resample(source(0, arr.shape[0], np.float32), arr.shape, out_shape, mode)
        return out
    for a, b in _slabs(out_shape, in_shape=arr.shape, rows=(o0, o1)):
        k0, k1 = _source_rows(a, b, arr.shape[0], out_shape[0])
        out[a - o0:b - o0] = _resample(source(k0, k1, np.float32), arr.shape, out_shape, mode, (a, b), k0)
    return out


class LazyScan:
    """A preprocessed scan that exists only as the rows asked for: ``(C, D, H, W)`` float32, where
    ``scan[:, d0:d1]`` normalises and resamples just the input rows those output rows need (the same values as
    :func:`preprocess_scan`'s array, linear resampling up to one float32 rounding of the inputs). A *lazy source*
    for :func:`glam3d.inference.sliding_window.predict_volume`, which reads one ``D``-span of window rows at a time: the
    float32 network input of a whole scan never exists (at a fine plan it is about the scan's size, twice the
    int16 scan). ``np.asarray(scan)`` makes the whole array.

    Args:
        crop: ``(C, d, h, w)`` the cropped scan as read (any real dtype; a view is fine: it is kept, not copied).
        shape: the resampled ``(D, H, W)``.
        mode: ``"linear"`` (``bspline`` needs the whole volume: use the array).
        transforms: one elementwise normalisation per channel (:func:`intensity_transforms`) or None.
        release: called after each read (a scan mapped from a file, :func:`spill_stored`, drops the pages it
            read: the process then holds neither the scan nor its float32 copy, only the rows of one read).
    """

    def __init__(self, crop: np.ndarray, shape, mode: str, transforms=None, release=None):
        if mode != "linear":
            raise ValueError(f"LazyScan resamples linearly, not {mode!r} (bspline needs the whole volume)")
        self.crop, self.mode = crop, mode
        self.transforms = list(transforms) if transforms is not None else [None] * crop.shape[0]
        self.shape = (crop.shape[0],) + tuple(int(v) for v in shape)
        self.release = release
        self.dtype = np.dtype(np.float32)
        self.ndim = 4

    def __repr__(self):
        return f"LazyScan(shape={self.shape}, from {tuple(self.crop.shape)} {self.crop.dtype}, {self.mode})"

    def __len__(self):
        return self.shape[0]

    def read(self, d0: int, d1: int) -> np.ndarray:
        """Rows ``d0:d1`` of every channel: ``(C, d1 - d0, H, W)`` float32."""
        out = np.empty((self.shape[0], d1 - d0) + self.shape[2:], dtype=np.float32)
        for c, f in enumerate(self.transforms):
            resize(self.crop[c], self.shape[1:], self.mode, out=out[c], transform=f, rows=(d0, d1))
        if self.release is not None:
            self.release()
        return out

    def __getitem__(self, key):
        """``scan[:, d0:d1]`` reads those rows; any other index is applied to the whole array (made for it)."""
        key = key if isinstance(key, tuple) else (key,)

        def whole(k):
            return isinstance(k, slice) and k == slice(None)
        if (len(key) >= 2 and whole(key[0]) and isinstance(key[1], slice) and key[1].step in (None, 1)
                and all(whole(k) for k in key[2:])):
            d0, d1, _ = key[1].indices(self.shape[1])
            return self.read(d0, max(d0, d1))
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        a = self.read(0, self.shape[1])
        return a if dtype is None else a.astype(dtype, copy=False)


def resize_labels(lab: np.ndarray, out_shape, mode: str = "linear", out: np.ndarray | None = None,
                  rows=None) -> np.ndarray:
    """Resample an integer label map. ``nearest``; or ``linear`` (nnU-Net's order-1 segmentation resampling):
    each label's one-hot mask is resampled linearly and every voxel takes the label with the largest value, which
    keeps thin structures and organ volumes much better than nearest neighbour. Output slabs of about
    :data:`SLAB_BYTES` (temporaries: two float32 slabs); ``out``: write there (an array or view of ``out_shape``,
    or of its ``rows``). ``rows = (o0, o1)``: only those rows along axis 0, as :func:`resize` (the whole result's
    where they are one of its slabs, :func:`resample_partition`)."""
    out_shape = tuple(int(v) for v in out_shape)
    if mode == "nearest" or tuple(lab.shape) == out_shape:
        return resize(lab, out_shape, "nearest", out=out, rows=rows)
    if mode != "linear":
        raise UserError(f"label interpolation must be nearest or linear, got {mode!r}")
    r0, r1 = (0, out_shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 <= r1 <= out_shape[0]:
        raise ValueError(f"rows {rows} outside the {out_shape[0]} output rows")
    res_shape = (r1 - r0,) + out_shape[1:]
    if out is None:
        out = np.empty(res_shape, dtype=lab.dtype)
    elif tuple(out.shape) != res_shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {res_shape}")
    for o0, o1 in _slabs(out_shape, in_shape=lab.shape, rows=(r0, r1)):
        k0, k1 = _source_rows(o0, o1, lab.shape[0], out_shape[0])
        sub = lab[k0:k1]
        part = out[o0 - r0:o1 - r0]
        # only the labels in the rows read: an absent label interpolates to 0 here and never beats the
        # others (the interpolated one-hots sum to 1), so the result is the whole map's rule, at a fraction of
        # the work where organs span part of the scan
        values = np.unique(sub)
        part[...] = values[0]
        if len(values) == 1:
            continue

        def onehot(v):  # called within this iteration only
            return _resample((sub == v).astype(np.float32), lab.shape, out_shape, "linear", (o0, o1), k0)  # noqa: B023

        best = onehot(values[0])
        for v in values[1:]:
            p = onehot(v)
            m = p > best
            part[m] = v
            np.maximum(best, p, out=best)
    return out


def body_bbox(arr: np.ndarray, spacing, plan, release=None) -> list:
    """``[[d0, d1], [h0, h1], [w0, w1]]`` (half-open) of the body in a ``(C, D, H, W)`` array (or view).

    The box of the voxels above ``plan["body_threshold"]`` in channel 0 (non-zero voxels in any channel when it
    is ``None``) grown by ``crop_margin_mm`` and clipped to the array — MONAI's
    ``generate_spatial_bounding_box(..., allow_smaller=True)`` — computed slab by slab along D (temporaries: one
    slab's mask, not a volume's). ``release()``, if given, is called after each slab (a mapped scan drops the
    pages it read)."""
    shape = arr.shape[1:]
    if not plan.get("crop_to_body", True):
        return [[0, int(n)] for n in shape]
    thr = plan.get("body_threshold", -500.0)
    margin = [int(math.ceil(plan.get("crop_margin_mm", 10.0) / s)) for s in spacing]
    src = arr if thr is None else arr[:1]
    hit = [np.zeros(n, dtype=bool) for n in shape]
    for d0, d1 in _slabs(shape, arr.itemsize * src.shape[0]):
        sel = (src[:, d0:d1] != 0) if thr is None else (src[:, d0:d1] > thr)
        sel = sel.any(0)                                               # (d, H, W)
        hit[0][d0:d1] = sel.any(axis=(1, 2))
        hit[1] |= sel.any(axis=(0, 2))
        hit[2] |= sel.any(axis=(0, 1))
        if release is not None:
            release()
    if not hit[0].any():   # nothing above the threshold: keep everything
        return [[0, int(n)] for n in shape]
    box = []
    for h, m, n in zip(hit, margin, shape):
        idx = np.flatnonzero(h)
        box.append([max(int(idx[0]) - m, 0), min(int(idx[-1]) + m + 1, int(n))])
    return box


def channel_normalisations(intensity: dict, num_channels: int) -> list:
    """The plan's intensity normalisation as one spec per channel: ``{"scheme": "window", "window": [lo, hi]}``
    (``transunet``), ``{"scheme": "ct", "lower", "upper", "mean", "std"}`` (``nnunet``, or a CT channel of
    ``per_channel``), ``{"scheme": "zscore" | "nonorm" | "rescale_to_0_1" | "rgb_to_0_1"}``. One-line
    :class:`UserError` for a plan that does not fit ``num_channels`` or names an unknown scheme."""
    scheme = intensity.get("scheme")
    if scheme == "transunet":
        lo, hi = intensity.get("window", TRANSUNET_WINDOW)
        return [{"scheme": "window", "window": [float(lo), float(hi)]}] * num_channels
    if scheme == "zscore":
        return [{"scheme": "zscore"}] * num_channels
    if scheme in ("nnunet", "per_channel"):
        chans = intensity.get("channels")
        if not isinstance(chans, list) or len(chans) != num_channels:
            got = len(chans) if isinstance(chans, list) else "no"
            raise UserError(f"plan intensity statistics are for {got} channel(s), the scan has {num_channels}")
        out = []
        for i, st in enumerate(chans):
            st = dict(st) if isinstance(st, dict) else {}
            st.setdefault("scheme", "ct" if scheme == "nnunet" else None)
            if st["scheme"] not in CHANNEL_SCHEMES:
                raise UserError(f"plan intensity: channel {i} has the unknown scheme {st['scheme']!r} "
                                f"(one of {', '.join(CHANNEL_SCHEMES)})")
            if st["scheme"] == "ct" and not all(isinstance(st.get(k), (int, float)) and math.isfinite(st[k])
                                                for k in CT_STATISTICS):
                raise UserError(f"plan intensity: CT channel {i} needs finite {', '.join(CT_STATISTICS)}")
            out.append(st)
        return out
    raise UserError(f"plan: unknown intensity scheme {scheme!r}")


#: schemes whose statistics are the case's own (measured on the cropped scan before normalising)
PER_CASE_SCHEMES = ("zscore", "rescale_to_0_1", "rgb_to_0_1")


def case_statistics(channel: np.ndarray, scheme: str, release=None) -> dict:
    """Per-case statistics of one channel ``(D, H, W)`` (any real dtype; a view is fine), slab by slab along D in
    float64: ``zscore``: mean and (population) std of the non-zero voxels (Chan et al.'s pairwise combination
    of the slabs' moments); ``rescale_to_0_1`` / ``rgb_to_0_1``: min and max. ``release()`` after each slab."""
    n, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for d0, d1 in _slabs(channel.shape, 8):
        x = np.asarray(channel[d0:d1], dtype=np.float64)
        if scheme == "zscore":
            v = x[x != 0]
            if v.size:
                nb, mb = v.size, float(v.mean())
                m2b = float(((v - mb) ** 2).sum())
                delta = mb - mean
                tot = n + nb
                mean += delta * nb / tot
                m2 += m2b + delta * delta * n * nb / tot
                n = tot
        elif x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        if release is not None:
            release()
    if scheme == "zscore":
        return {"count": n, "mean": mean, "std": math.sqrt(m2 / n) if n else 0.0}
    return {"min": lo, "max": hi}


def _channel_transform(spec: dict, stats: dict | None, name=None):
    """The elementwise normalisation ``f(x float32 array) -> float32 array`` of one channel (``x`` may be changed
    in place): MONAI's intensity transforms where they are the definition (window, CT), numpy otherwise."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    scheme = spec["scheme"]
    if scheme == "window":
        lo, hi = spec["window"]
        t = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        return lambda x: np.asarray(t(x), dtype=np.float32)
    if scheme == "ct":   # nnU-Net's CTNormalization: clip to the foreground percentiles, then z-score
        t = NormalizeIntensity(subtrahend=spec["mean"], divisor=max(spec["std"], 1e-8))

        def ct(x):
            np.clip(x, spec["lower"], spec["upper"], out=x)
            return np.asarray(t(x), dtype=np.float32)
        return ct
    if scheme == "nonorm":
        return lambda x: np.asarray(x, dtype=np.float32)
    if scheme == "zscore":  # MONAI NormalizeIntensity(nonzero=True): the non-zero voxels, a zero std taken as 1
        mean, std = float(stats["mean"]), float(stats["std"]) or 1.0

        def zscore(x):
            if stats["count"]:
                m = x != 0
                np.subtract(x, mean, out=x, where=m)
                np.divide(x, std, out=x, where=m)
            return x
        return zscore
    if scheme == "rescale_to_0_1":   # nnU-Net's RescaleTo01Normalization: (x - min) / (max - min)
        lo, span = float(stats["min"]), max(float(stats["max"]) - float(stats["min"]), 1e-8)

        def rescale(x):
            np.subtract(x, lo, out=x)
            np.divide(x, span, out=x)
            return x
        return rescale
    if scheme == "rgb_to_0_1":   # nnU-Net's RGBTo01Normalization: 8-bit values / 255
        if stats["min"] < 0 or stats["max"] > 255:
            raise UserError(f"channel normalisation rgb_to_0_1 expects values in [0, 255], the scan has "
                            f"[{stats['min']:g}, {stats['max']:g}]", name)

        def rgb(x):
            np.divide(x, 255.0, out=x)
            return x
        return rgb
    raise UserError(f"plan: unknown channel normalisation {scheme!r}")


def intensity_transforms(intensity: dict, num_channels: int, scan=None, release=None, name=None):
    """Per-channel elementwise normalisation functions ``f(x float32 array) -> float32 array`` (``x`` may be
    changed in place), one per channel of :func:`channel_normalisations`. Schemes with per-case statistics
    (z-score, rescaling) measure them on ``scan`` ``(C, D, H, W)`` (the cropped scan as read,
    :func:`case_statistics`); without ``scan`` such a plan gives None."""
    specs = channel_normalisations(intensity, num_channels)
    if scan is not None and scan.shape[0] != num_channels:
        raise UserError(f"the plan expects {num_channels} channel(s), the scan has {scan.shape[0]}")
    out = []
    for c, spec in enumerate(specs):
        stats = None
        if spec["scheme"] in PER_CASE_SCHEMES:
            if scan is None:
                return None
            stats = case_statistics(scan[c], "zscore" if spec["scheme"] == "zscore" else "range", release)
        out.append(_channel_transform(spec, stats, name))
    return out


def normalise(arr: np.ndarray, intensity: dict) -> np.ndarray:
    """Intensity normalisation of a ``(C, D, H, W)`` array (:func:`intensity_transforms`) -> a new contiguous
    float32 array. ``arr`` may be a view (a crop) of any real dtype; the work runs slab by slab (temporaries: one
    slab)."""
    out = np.empty(arr.shape, dtype=np.float32)
    fs = intensity_transforms(intensity, arr.shape[0], arr)
    for c, f in enumerate(fs):
        for d0, d1 in _slabs(arr.shape[1:]):
            out[c, d0:d1] = f(np.array(arr[c, d0:d1], dtype=np.float32))
    return out


def _oriented_channels_first(data_xyzc, affine, plan):
    oriented, new_affine = reorient(data_xyzc, affine, plan["orientation"])
    arr = oriented.transpose(3, 2, 1, 0)                            # (C, z, y, x), a view
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
def preprocess_scan(image: nib.Nifti1Image, plan: dict, *, lazy: bool = False, spill_dir=None, _data=None):
    """Preprocess one scan as the plan says.

    Returns ``(array float32 (C, D, H, W), meta)``; with ``lazy`` (and linear image interpolation) the array is a
    :class:`LazyScan` instead: rows normalised and resampled when they are read (what ``glam3d predict`` hands
    the sliding window). ``spill_dir`` (with ``lazy``): a CT stored as unscaled integers is decoded into a file
    there and mapped (:func:`spill_stored`), so the process holds only the pages of the rows being read, not the
    scan. ``meta`` (JSON-serialisable) is what :func:`restore_labels`
    needs: ``source_image``, ``source_label``, ``original_shape`` (X, Y, Z as stored), ``original_affine``,
    ``orientation`` (stored axis code), ``spacing`` (sz, sy, sx after reorientation), ``oriented_shape``,
    ``bbox`` (half-open ``[[d0, d1], [h0, h1], [w0, w1]]`` in the oriented grid), ``cropped_shape``,
    ``resampled_shape``, ``resampled_spacing``, ``num_channels``.
    """
    name = image.get_filename()
    lazy = lazy and plan.get("interpolation", {}).get("image", "linear") == "linear"
    data = read_voxels(image, name, keep_integers=True, spill_dir=spill_dir if lazy else None) \
        if _data is None else _data
    release = (lambda: release_pages(data)) if isinstance(data, np.memmap) else None
    nch = int(plan.get("num_channels", 1))
    if data.shape[3] != nch:
        raise UserError(f"the plan expects {nch} channel(s), the image has {data.shape[3]}", name)
    affine = np.asarray(image.affine, float)
    check_affine(affine, name)
    check_spacing(voxel_sizes(affine), name)
    arr, spacing = _oriented_channels_first(data, affine, plan)
    tshape = _target_shape(arr.shape[1:], spacing, plan["target_spacing"])
    if math.prod(tshape) > MAX_RESAMPLED_VOXELS:
        raise UserError(f"resampling to {plan['target_spacing']} mm would give {tshape} voxels (more than "
                        f"{MAX_RESAMPLED_VOXELS}); check the header's voxel size", name)
    bbox = body_bbox(arr, spacing, plan, release)
    crop_shape = [b - a for a, b in bbox]
    crop = arr[(slice(None),) + tuple(slice(a, b) for a, b in bbox)]   # a view of the scan as read
    tshape = _target_shape(crop_shape, spacing, plan["target_spacing"])
    mode = plan.get("interpolation", {}).get("image", "linear")
    norm = intensity_transforms(plan["intensity"], nch, crop, release, name)   # per-case statistics measured here
    if lazy:
        out = LazyScan(crop, tshape, mode, norm, release)
    else:  # normalised and resampled slab by slab: the scan as read + the output are the only volumes held
        out = np.empty((nch, *tshape), dtype=np.float32)
        for c in range(nch):
            resize(crop[c], tshape, mode, out=out[c], transform=norm[c])
    meta = {
        "source_image": name,
        "source_label": None,
        "original_shape": [int(v) for v in data.shape[:3]],
        "original_affine": affine.tolist(),
        "orientation": "".join(aff2axcodes(affine)),
        "spacing": [float(v) for v in spacing],
        "oriented_shape": [int(v) for v in arr.shape[1:]],
        "bbox": bbox,
        "cropped_shape": [int(v) for v in crop_shape],
        "resampled_shape": [int(v) for v in tshape],
        "resampled_spacing": [float(n * s / m) for n, s, m in zip(crop_shape, spacing, tshape)],
        "num_channels": nch,
    }
    return out, meta


def preprocess_label(label_xyz: np.ndarray, affine, meta: dict, plan: dict) -> np.ndarray:
    """A label map in the scan's stored geometry -> training indices ``(D, H, W)`` uint8 on the preprocessed grid.

    ``label_xyz`` holds original label values; values not in ``plan["label_values"]`` become background.
    """
    lut = _forward_lut(plan, int(label_xyz.max(initial=0)))
    lab = np.empty(label_xyz.shape, dtype=np.uint8)
    for z0, z1 in z_slabs(label_xyz.shape, 8):  # slabs: the lookup's (intp) index temporaries stay slab-sized
        lab[:, :, z0:z1] = lut[label_xyz[:, :, z0:z1]]
    oriented, _ = reorient(lab, affine, plan["orientation"])
    lab = oriented.transpose(2, 1, 0)
    (d0, d1), (h0, h1), (w0, w1) = meta["bbox"]
    lab = np.ascontiguousarray(lab[d0:d1, h0:h1, w0:w1])
    mode = plan.get("interpolation", {}).get("label", "linear")
    return resize_labels(lab, meta["resampled_shape"], mode).astype(np.uint8, copy=False)


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


def _to_original(vol_dhw: np.ndarray, meta: dict, plan: dict, mode: str, fill=0, lut=None):
    """(D', H', W') on the preprocessed grid -> (X, Y, Z) in the stored geometry, resampled straight into the
    crop box of the full array (slabs: no whole-volume temporaries beyond the result, returned as a view).
    ``lut``: label values for training indices (``mode="label"``), applied slab by slab."""
    if mode == "label":
        dtype = vol_dhw.dtype if lut is None else lut.dtype
    else:
        dtype = np.float32
    full = np.full(meta["oriented_shape"], fill, dtype=dtype)
    (d0, d1), (h0, h1), (w0, w1) = meta["bbox"]
    box = full[d0:d1, h0:h1, w0:w1]
    if mode == "label":  # the indices go into the box (any integer dtype holds them), then become values
        resize_labels(vol_dhw, meta["cropped_shape"], plan.get("interpolation", {}).get("label", "linear"),
                      out=box)
        if lut is not None:
            for a0, a1 in _slabs(box.shape, box.itemsize):
                box[a0:a1] = lut[box[a0:a1]]
    else:
        resize(vol_dhw, meta["cropped_shape"], mode, out=box)
    out = apply_orientation(full.transpose(2, 1, 0), _back_to_stored(meta, plan))
    if list(out.shape) != list(meta["original_shape"]):   # cannot happen unless meta was edited
        raise UserError(f"meta does not match: restored shape {out.shape} != original {meta['original_shape']}")
    return out  # a view (transposed / flipped) of the full array: NIfTI writers take it as it is, no copy


def _back_to_stored(meta: dict, plan: dict) -> np.ndarray:
    """The orientation transform (nibabel ``ornt``) from the plan's ``(X, Y, Z)`` axes back to the scan's stored
    ones."""
    return ornt_transform(axcodes2ornt(tuple(plan["orientation"])),
                          io_orientation(np.asarray(meta["original_affine"], float)))


def _released(slabs, source):
    """``slabs`` as they come, the pages of ``source`` (a file mapping, else nothing) released after each: the
    rows a slab read leave the process's resident memory."""
    for slab in slabs:
        yield slab
        release_pages(source)


def _label_lookup(labels, meta: dict, plan: dict) -> np.ndarray:
    """Check training-index ``labels`` against ``meta`` and the plan; the lookup table index -> original label
    value, in the smallest integer dtype holding the values (uint8, int16 or int32)."""
    _check_meta(tuple(labels.shape), meta, "labels")
    lv = {int(k): int(v) for k, v in plan["label_values"].items()}
    n = max(lv, default=0)
    if labels.size:
        lo_i, hi_i = 255, 0
        for a0, a1 in _slabs(labels.shape, labels.itemsize):  # slabs: a mapped label file is read once, in order
            lo_i, hi_i = min(lo_i, int(labels[a0:a1].min())), max(hi_i, int(labels[a0:a1].max()))
        release_pages(labels)
        if lo_i < 0 or hi_i > n:
            raise UserError(f"labels contain values outside 0..{n} (the plan's training indices)")
    lo, hi = min([0, *lv.values()]), max([0, *lv.values()])
    dtype = np.uint8 if lo >= 0 and hi <= 255 else np.int16 if -32768 <= lo and hi <= 32767 else np.int32
    lut = np.zeros(max(n + 1, 256), dtype=dtype)
    for idx, val in lv.items():
        lut[idx] = val
    return lut


def restore_labels(labels: np.ndarray, meta: dict, plan: dict) -> nib.Nifti1Image:
    """Training-index labels ``(D, H, W)`` on the preprocessed grid -> NIfTI in the scan's exact shape and affine,
    with the original label values (``plan["label_values"]``; resampled as ``plan["interpolation"]["label"]``:
    nearest neighbour, or per-label linear + argmax)."""
    labels = np.asarray(labels)
    lut = _label_lookup(labels, meta, plan)
    vals = _to_original(labels.astype(np.uint8, copy=False), meta, plan, "label", lut=lut)
    affine = np.asarray(meta["original_affine"], float)
    nii = nib.Nifti1Image(vals, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    return nii


def resample_partition(in_shape, out_shape) -> list:
    """The output row ranges :func:`resize` (linear) and :func:`resize_labels` compute one at a time when they
    resample ``in_shape`` to the whole ``out_shape``. A linear result depends on them at the float32-rounding level
    (each slab's grid origin), so computing exactly these rows (``rows=``) gives the whole result's values bit for
    bit; copies and nearest neighbour are exact whatever the rows."""
    return _slabs(tuple(out_shape), in_shape=tuple(in_shape))


def _to_original_slabs(vol_dhw: np.ndarray, meta: dict, plan: dict, mode: str, fill=0,
                       lut=None) -> Iterator[np.ndarray]:
    """:func:`_to_original` as ``(X, Y, dz)`` slabs along the stored volume's last axis, in order, equal to it bit
    for bit: the body box's rows are resampled in :func:`resample_partition`'s ranges (``rows=``; ``lut`` applied
    per slab for labels), the rows outside it are ``fill``, so the map is never whole. Where the plan's orientation
    moves the stored slice axis (a sagittal scan for an axial plan), the map is made whole and then cut."""
    back = _back_to_stored(meta, plan)
    if int(back[2, 0]) != 2:
        whole = _to_original(vol_dhw, meta, plan, mode, fill=fill, lut=lut)
        for z0, z1 in z_slabs(whole.shape, whole.itemsize):
            yield whole[:, :, z0:z1]
        return
    D, H, W = (int(v) for v in meta["oriented_shape"])
    (d0, d1), (h0, h1), (w0, w1) = meta["bbox"]
    cropped = tuple(int(v) for v in meta["cropped_shape"])
    dtype = np.dtype(np.float32) if mode != "label" else (lut.dtype if lut is not None else vol_dhw.dtype)
    label_mode = plan.get("interpolation", {}).get("label", "linear")
    pieces = ([(a, b, False) for a, b in _slabs((d0, H, W), dtype.itemsize)]
              + [(d0 + a, d0 + b, True) for a, b in resample_partition(vol_dhw.shape, cropped)]
              + [(d1 + a, d1 + b, False) for a, b in _slabs((D - d1, H, W), dtype.itemsize)])
    for a, b, in_box in (reversed(pieces) if int(back[2, 1]) == -1 else pieces):
        chunk = np.full((b - a, H, W), fill, dtype=dtype)
        if in_box:
            box = chunk[:, h0:h1, w0:w1]
            if mode == "label":
                resize_labels(vol_dhw, cropped, label_mode, out=box, rows=(a - d0, b - d0))
                if lut is not None:
                    box[...] = lut[box]
            else:
                resize(vol_dhw, cropped, mode, out=box, rows=(a - d0, b - d0))
        yield apply_orientation(chunk.transpose(2, 1, 0), back)  # a flipped Z comes out in stored order


def restored_label_slabs(labels, meta: dict, plan: dict):
    """Training-index labels ``(D, H, W)`` (an array or a file mapping) -> ``(dtype, slabs)``: the restored label
    values' dtype and an iterator of ``(X, Y, dz)`` slabs of them in the scan's stored geometry along ``Z`` in
    order — :func:`restore_labels`' voxels bit for bit, never a whole volume (see :func:`_to_original_slabs`).
    Checks happen at the call."""
    lut = _label_lookup(labels, meta, plan)
    return lut.dtype, _released(_to_original_slabs(labels, meta, plan, "label", lut=lut), labels)


def restored_probabilities(probs, meta: dict, plan: dict) -> Iterator[Iterator[np.ndarray]]:
    """Class probabilities ``(K, D, H, W)`` on the preprocessed grid (an array, or a file mapping such as a
    :func:`numpy.memmap`, read one class at a time) -> for each of the ``K`` classes, in order, an iterator of
    ``(X, Y, dz)`` float32 slabs of its map in the scan's stored geometry (linear), along ``Z`` in order, equal to
    the whole map bit for bit: a long CT's class maps are never whole in memory. Outside the body crop,
    background (class 0) gets 1 and the others 0. Consume each class's slabs before asking for the next class.
    The shapes are checked at the call."""
    if getattr(probs, "ndim", None) != 4:
        raise UserError(f"probabilities must be (K, D, H, W), got shape {tuple(getattr(probs, 'shape', ()))}")
    _check_meta(tuple(probs.shape[1:]), meta, "probabilities")
    return (_released(_to_original_slabs(np.asarray(probs[k], dtype=np.float32), meta, plan, "linear",
                                         fill=1.0 if k == 0 else 0.0), probs) for k in range(probs.shape[0]))


def restore_probabilities(probs: np.ndarray, meta: dict, plan: dict) -> np.ndarray:
    """:func:`restored_probabilities` gathered into one ``(K, X, Y, Z)`` float32 array (K whole volumes in memory:
    for a long CT write the slabs as they come instead, as ``glam3d predict --probabilities`` does)."""
    probs = np.asarray(probs, dtype=np.float32)
    out = np.empty((probs.shape[0], *meta["original_shape"]), dtype=np.float32) if probs.ndim == 4 else None
    for k, slabs in enumerate(restored_probabilities(probs, meta, plan)):
        z = 0
        for slab in slabs:
            out[k, :, :, z:z + slab.shape[2]] = slab
            z += slab.shape[2]
    return out

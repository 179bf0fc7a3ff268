"""Reading medical images: one reader for every format, the same nibabel image for all of them.

NIfTI (``.nii``, ``.nii.gz``) is read by nibabel (lazily: the voxels stay on disk until asked for, and the stored
integers can be read in their own dtype). Anything else SimpleITK reads (``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``,
``.gipl``, ... — what nnU-Net v2's ``file_ending`` allows) is read by SimpleITK and returned as an in-memory
``nibabel.Nifti1Image`` with the equivalent RAS affine: ITK's geometry is LPS (``point = origin + direction @
diag(spacing) @ index``), NIfTI's is RAS, so the affine is ``diag(-1, -1, 1, 1) @ [[direction @ diag(spacing),
origin], [0, 1]]`` with the voxel axes in ITK's index order ``(x, y, z)``. ``image.get_filename()`` is the file
read, whatever its format.

Every image read here has been checked: the file exists (a broken link or a symbolic-link loop is named as such),
the voxels are real numbers (complex or structured voxel types are refused), and the affine is finite and of full
rank (:func:`check_affine`). The problems are one-line :class:`~glam3d.errors.UserError` s naming the file.

Usage::

    img = load_image("case_0000.mha")            # nibabel image: .affine (RAS), .shape (X, Y, Z[, C]), .dataobj
    shape, affine = read_header("case_0000.nrrd")  # without reading the voxels
    img = load_channels(["c_0000.nii.gz", "c_0001.nii.gz"])   # channels stacked: (X, Y, Z, 2), one geometry
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from glam3d.errors import UserError

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: file endings recognised when a folder is listed without a dataset.json naming one (SimpleITK reads them all)
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: |det| of the affine's unit voxel axes below which they are taken as dependent (a 60-degree shear still gives 0.5)
MIN_AXIS_VOLUME = 1e-3


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


def strip_ending(name: str, endings=IMAGE_ENDINGS) -> str:
    """``name`` without the first of ``endings`` it ends with (case-insensitive), or unchanged."""
    low = name.lower()
    for e in endings:
        if e and low.endswith(e.lower()):
            return name[: len(name) - len(e)]
    return name


def check_input_file(path) -> Path:
    """``path`` is a readable regular file (or a link to one); one-line UserError saying what it is otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UserError("is a symbolic-link loop (it never reaches a file)", path) from None
            raise UserError(f"is a broken symbolic link (its target {os.readlink(path)} does not exist)",
                            path) from None
    if path.is_dir():
        raise UserError("is a folder, not an image file", path)
    if path.exists():
        raise UserError("is not a regular file", path)
    raise UserError("file not found", path)


def check_affine(affine, name=None) -> None:
    """One-line UserError unless ``affine`` (4x4) is finite and its voxel axes are independent (full rank): a NaN
    or rank-deficient affine leaves the scan's orientation unknown. The check is on the unit axes (scale-free):
    the voxel sizes are :func:`preprocessing.pipeline.check_spacing`'s business."""
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise UserError("the header has a non-finite (NaN/inf) affine: the scan's orientation is unknown", name)
    cols = a[:3, :3]
    norms = np.sqrt((cols ** 2).sum(axis=0))
    if not np.all(norms > 0) or abs(float(np.linalg.det(cols / norms))) < MIN_AXIS_VOLUME:
        raise UserError("the header's affine is degenerate (rank-deficient: its voxel axes are not independent): "
                        "the scan's orientation is unknown", name)


def check_voxel_type(dtype, name=None) -> None:
    """Real numbers only: complex voxels (their imaginary part would be dropped) and structured (RGB) voxels are
    refused."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise UserError(f"complex voxel type ({dtype}): glam3d reads real-valued images (store the magnitude, "
                        f"or the real and imaginary parts as channels)", name)
    if dtype.kind not in "biuf":
        raise UserError(f"unsupported voxel type ({dtype}): glam3d reads real-valued scalar images", name)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK's messages start with the source location; the description is the line that says what went wrong
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()[:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        _ = img.affine
    except Exception as exc:
        raise UserError(f"not a readable NIfTI file ({_first_line(exc)})", path) from None
    from .pipeline import check_stored_pixdims

    check_stored_pixdims(path)
    return img


def _sitk_geometry(image):
    """``(spacing (3,), origin (3,), direction (3, 3))`` of a SimpleITK image of 2 to 4 dimensions: the spatial
    part (a 2D image gets a unit third axis; the fourth axis of a 4D image is not spatial)."""
    dim = image.GetDimension()
    n = min(dim, 3)
    sp, org = np.ones(3), np.zeros(3)
    sp[:n] = image.GetSpacing()[:n]
    org[:n] = image.GetOrigin()[:n]
    d = np.eye(3)
    d[:n, :n] = np.asarray(image.GetDirection(), float).reshape(dim, dim)[:n, :n]
    return sp, org, d


def sitk_affine(spacing, origin, direction) -> np.ndarray:
    """The RAS affine (nibabel's convention) of an ITK geometry (LPS)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    lps[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ lps


def _load_sitk(path: Path) -> nib.Nifti1Image:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"not an image SimpleITK can read ({_first_line(exc)})", path) from None
    dim, ncomp = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dim not in (2, 3, 4) or (dim == 4 and ncomp > 1):
        raise UserError(f"expected a 3D image, got a {dim}D image of {ncomp} component(s) per voxel", path)
    try:
        arr = sitk.GetArrayFromImage(image)           # (z, y, x[, c]) / (t, z, y, x): ITK's index order reversed
    except RuntimeError as exc:
        raise UserError(f"cannot read the voxel data ({_first_line(exc)})", path) from None
    check_voxel_type(arr.dtype, path)
    spatial = arr.ndim - (1 if ncomp > 1 else 0)
    axes = list(range(spatial))[::-1] + ([spatial] if ncomp > 1 else [])
    arr = np.ascontiguousarray(arr.transpose(axes))   # (x, y, z[, c]) / (x, y, z, t)
    affine = sitk_affine(*_sitk_geometry(image))
    img = nib.Nifti1Image(arr, affine, dtype=arr.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.file_map["image"].filename = str(path)       # get_filename(): the file read, whatever its format
    return img


def load_image(path) -> nib.Nifti1Image:
    """The image at ``path`` as a nibabel image (see the module doc), checked: file, voxel type, affine."""
    path = check_input_file(path)
    img = _load_nifti(path) if is_nifti(path) else _load_sitk(path)
    check_voxel_type(img.get_data_dtype(), path)
    check_affine(img.affine, path)
    return img


def read_header(path):
    """``(shape, affine)`` of an image without reading its voxels (nibabel's header; SimpleITK's
    ``ReadImageInformation``). Unchecked: for summaries such as the median spacing and ``inspect``'s table."""
    path = check_input_file(path)
    if is_nifti(path):
        img = _load_nifti(path)
        return tuple(int(v) for v in img.shape), np.asarray(img.affine, float)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"not an image SimpleITK can read ({_first_line(exc)})", path) from None
    size = list(reader.GetSize())
    dim = len(size)
    n = min(dim, 3)
    sp, org, d = np.ones(3), np.zeros(3), np.eye(3)
    sp[:n] = reader.GetSpacing()[:n]
    org[:n] = reader.GetOrigin()[:n]
    d[:n, :n] = np.asarray(reader.GetDirection(), float).reshape(dim, dim)[:n, :n]
    ncomp = reader.GetNumberOfComponents()
    shape = tuple(size) + ((ncomp,) if ncomp > 1 else ())
    return shape, sitk_affine(sp, org, d)


def check_geometry(img, other, img_path, other_path) -> None:
    """``other`` (a channel or a label map) has ``img``'s grid: the same shape and affine (1e-3 mm)."""
    if tuple(img.shape[:3]) != tuple(other.shape[:3]):
        raise UserError(f"shape {tuple(other.shape[:3])} does not match the image's {tuple(img.shape[:3])} "
                        f"({Path(img_path).name})", other_path)
    if not np.allclose(img.affine, other.affine, rtol=1e-4, atol=1e-3):
        d = float(np.abs(np.asarray(img.affine) - np.asarray(other.affine)).max())
        raise UserError(f"affine differs from the image's ({Path(img_path).name}) by up to {d:.4g} mm",
                        other_path)


def load_channels(paths) -> nib.Nifti1Image:
    """The channel files of one case (nnU-Net's ``<case>_0000``, ``<case>_0001``, ...) as one image ``(X, Y, Z,
    C)``, in memory, in the first file's geometry (every file must share it, :func:`check_geometry`). One path:
    that image as :func:`load_image` returns it (lazy for NIfTI). The voxels keep a common dtype (the channels'
    ``numpy.result_type``; scaled NIfTI data is read as float32)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_channels needs at least one file")
    first = load_image(paths[0])
    if len(paths) == 1:
        return first
    from .pipeline import read_voxels

    vols = [read_voxels(first, paths[0], allow_channels=False, keep_integers=True)]
    for p in paths[1:]:
        img = load_image(p)
        check_geometry(first, img, paths[0], p)
        vols.append(read_voxels(img, p, allow_channels=False, keep_integers=True))
    data = np.concatenate(vols, axis=3)
    out = nib.Nifti1Image(data, first.affine, dtype=data.dtype)
    out.set_qform(first.affine, code=1)
    out.set_sform(first.affine, code=1)
    out.file_map["image"].filename = str(paths[0])
    return out


def voxel_spacing(affine) -> np.ndarray:
    """Voxel sizes (mm) along the image's three axes: the lengths of the affine's columns."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


__all__ = ["IMAGE_ENDINGS", "NIFTI_ENDINGS", "check_affine", "check_geometry", "check_input_file",
           "check_voxel_type", "is_nifti", "load_channels", "load_image", "read_header", "sitk_affine",
           "strip_ending", "voxel_spacing"]

"""Reading and writing 3D label maps in any format SimpleITK reads (NIfTI through nibabel).

Every reader returns the voxels in nibabel's array order (i, j, k) with a RAS affine, whatever the format, so a
prediction in ``.nii.gz`` and a truth in ``.mha`` of the same grid compare equal. SimpleITK images (LPS world,
arrays in (k, j, i)) are transposed and their direction/spacing/origin turned into the same RAS affine nibabel
would give.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError

# label-map file endings, longest first (".nii.gz" before ".nii"); NIfTI is read with nibabel, the rest with SimpleITK
LABEL_EXTENSIONS = (".nii.gz", ".gipl.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
DETACHED_HEADERS = (".mhd", ".nhdr")  # a header beside a separate data file: read, never written (see write_ext)


def write_ext(ext: str) -> str:
    """The ending a written copy of an ``ext`` file gets: the same, except detached headers become single files
    (``.mhd`` → ``.mha``, ``.nhdr`` → ``.nrrd``), which an atomic rename can publish whole."""
    return {".mhd": ".mha", ".nhdr": ".nrrd"}.get(ext.lower(), ext)


def split_ext(name: str) -> Optional[tuple[str, str]]:
    """``("case", ".nii.gz")`` for a label-map file name, ``None`` for anything else (case-insensitive ending)."""
    low = name.lower()
    for ext in LABEL_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return None


def is_label_file(path) -> bool:
    p = Path(path)
    return not p.name.startswith(".") and split_ext(p.name) is not None and p.is_file()


def ras_affine_from_sitk(img) -> np.ndarray:
    """4×4 RAS affine of a 3D SimpleITK image for the (i, j, k) array order."""
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_label_map(path, case: str = "", what: str = "label map") -> tuple[np.ndarray, np.ndarray]:
    """``(labels, affine)``: a 3D integer array in (i, j, k) order (stored integer dtype kept; float-stored maps
    become int32 when every value is a whole number) and its 4×4 RAS affine. A 4D map with one volume is squeezed.
    Anything else is a :class:`UserError` naming the file: unreadable, not 3D, non-integer, negative or > 65535."""
    path = Path(path)
    who = f"case {case}: " if case else ""
    try:
        if path.name.lower().endswith(NIFTI_EXTENSIONS):
            import nibabel as nib

            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=float)
        else:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            if img.GetNumberOfComponentsPerPixel() != 1:
                raise UserError(f"{who}{what} has {img.GetNumberOfComponentsPerPixel()} components per voxel, "
                                f"not a label map", path)
            if img.GetDimension() == 4 and img.GetSize()[3] == 1:
                img = img[:, :, :, 0]
            if img.GetDimension() != 3:
                raise UserError(f"{who}{what} is not a 3D label map ({img.GetDimension()}D)", path)
            data = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
            affine = ras_affine_from_sitk(img)
    except UserError:
        raise
    except Exception as err:  # nibabel and SimpleITK raise many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{who}cannot read {what} ({first[:200]})", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{who}{what} is not a 3D label map (shape {data.shape})", path)
    if not np.issubdtype(data.dtype, np.integer):
        if np.iscomplexobj(data) or not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise UserError(f"{who}{what} holds non-integer values, not a label map", path)
    if data.size and (data.min() < 0 or data.max() > 65535):
        raise UserError(f"{who}{what} label values out of range ({data.min()}..{data.max()})", path)
    if not np.all(np.isfinite(affine)):
        raise UserError(f"{who}{what} has a non-finite affine", path)
    # integer maps keep their stored dtype (uint8: a quarter of int32 on a long CT); float-stored ones become int32
    return (data if np.issubdtype(data.dtype, np.integer) else data.astype(np.int32)), affine


def write_label_map_like(path, labels: np.ndarray, reference) -> None:
    """Write ``labels`` ((i, j, k), as returned by :func:`read_label_map`) to ``path`` atomically with the header,
    geometry and voxel type of the ``reference`` file (the map it was computed from), in the format ``path``'s
    ending names."""
    from ..utils.io import atomic_path

    path, reference = Path(path), Path(reference)
    ext = split_ext(path.name)
    if ext is None or ext[1].lower() in DETACHED_HEADERS:
        raise UserError("not a single-file label-map ending (" + ", ".join(e for e in LABEL_EXTENSIONS
                                                                        if e not in DETACHED_HEADERS) + ")", path)
    if reference.name.lower().endswith(NIFTI_EXTENSIONS) and path.name.lower().endswith(NIFTI_EXTENSIONS):
        import nibabel as nib

        ref = nib.load(str(reference))
        dtype = ref.get_data_dtype()
        out = labels.astype(dtype if np.issubdtype(dtype, np.integer) else np.int32, copy=False)
        header = ref.header.copy()
        header.set_data_dtype(out.dtype)
        img = nib.Nifti1Image(out, ref.affine, header) if isinstance(ref, nib.Nifti1Image) else \
            nib.Nifti2Image(out, ref.affine, header)
        with atomic_path(path, suffix=ext[1]) as tmp:
            nib.save(img, str(tmp))
        return
    import SimpleITK as sitk

    ref_img = None
    if not reference.name.lower().endswith(NIFTI_EXTENSIONS):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(reference))
        reader.ReadImageInformation()
        ref_img = reader
    arr = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))
    img = sitk.GetImageFromArray(arr)
    if ref_img is not None:
        img.SetOrigin(ref_img.GetOrigin())
        img.SetSpacing(ref_img.GetSpacing())
        img.SetDirection(ref_img.GetDirection())
    else:  # a NIfTI reference written in another format: geometry from its RAS affine
        import nibabel as nib

        aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(nib.load(str(reference)).affine, dtype=float)
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        img.SetOrigin(tuple(float(x) for x in aff[:3, 3]))
        img.SetSpacing(tuple(float(s) for s in spacing))
        img.SetDirection(tuple(float(x) for x in (aff[:3, :3] / spacing).ravel()))
    with atomic_path(path, suffix=ext[1]) as tmp:
        sitk.WriteImage(img, str(tmp), True)

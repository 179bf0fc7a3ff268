"""Writing a case's label map: in the input's geometry and format, postprocessed first on request.

:func:`write_label_map` takes the restored label map as ``(X, Y, dz)`` slabs along ``Z`` (what
:func:`preprocessing.pipeline.restored_label_slabs` yields) and writes it to one file, atomically:

* NIfTI (``.nii.gz``, ``.nii``) without postprocessing: streamed slab by slab
  (:func:`glam3d.utils.nifti.write_volumes`): the label map is never whole in memory;
* otherwise the map is first assembled whole — in an unlinked file of the scratch folder, mapped, whose written
  pages leave the process as it fills (:class:`LabelVolume`; in memory without a scratch folder): 1 byte a voxel for
  label values below 256. The largest-component postprocessing then cleans it in place a slab of planes at a time
  (:func:`glam3d.inference.components.apply_in_slabs`: :func:`glam3d.postprocessing.apply_postprocessing`'s result,
  voxel for voxel, in memory that does not grow with the scan). Other formats go through SimpleITK, which writes
  whole images: it holds one copy of the map (SimpleITK's buffer).

Geometry: a NIfTI gets the input's affine as its qform and sform; a SimpleITK format gets the input file's own
origin, spacing and direction when the input is a SimpleITK image (copied, not recomputed: bit for bit), else those
of the input's affine (RAS → ITK's LPS: ``diag(-1, -1, 1) @ affine``).

Usage::

    present = write_label_map("preds/case.mha", slabs, shape, affine, np.uint8, reference=Path("case.mha"),
                              postprocessing="all", scratch=Path("preds"))
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ..utils.ooc import release_pages

__all__ = ["LabelVolume", "write_label_map", "sitk_geometry", "is_nifti"]

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: pages of an assembled label map released from the process after this many bytes are written
RELEASE_BYTES = 32 << 20


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


class LabelVolume:
    """A label map ``(X, Y, Z)`` assembled from ``Z``-slabs: Fortran order (each ``Z`` plane one block; the array
    transposed is the ``(Z, Y, X)`` C-order array SimpleITK takes without a copy), in an unlinked file of ``folder``
    (mapped; pages released every :data:`RELEASE_BYTES` written) or in memory (``folder`` None, or no room there).
    ``.array`` is the map."""

    def __init__(self, shape, dtype, folder: Optional[Path] = None):
        from ..utils.io import has_room

        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        self.array = None
        if folder is not None:
            with contextlib.suppress(OSError):
                if has_room(folder, nbytes):
                    self.array = _mapped(folder, self.shape, self.dtype, nbytes)
        if self.array is None:
            self.array = np.empty(self.shape, self.dtype, order="F")
        self._since = 0

    @property
    def mapped(self) -> bool:
        return isinstance(self.array, np.memmap)

    def fill(self, slabs: Iterable[np.ndarray], source=None) -> None:
        """Put the ``(X, Y, dz)`` slabs into the map along ``Z``, in order; ValueError naming ``source`` when they
        do not make it."""
        z, X, Y, Z = 0, *self.shape
        for slab in slabs:
            dz = slab.shape[2]
            if tuple(slab.shape[:2]) != (X, Y) or z + dz > Z:
                raise ValueError(f"{source}: the restored slabs do not make an image of {self.shape}")
            self.array[:, :, z:z + dz] = slab
            z += dz
            self._written(X * Y * dz)
        if z != Z:
            raise ValueError(f"{source}: the restored slabs cover {z} of {Z} planes")
        self.release()

    def slabs(self, planes: int = 0):
        """The map as ``(X, Y, dz)`` slabs along ``Z`` (each read from the mapping, pages released as they go)."""
        X, Y, Z = self.shape
        step = planes or max(1, (8 << 20) // max(1, X * Y * self.dtype.itemsize))
        for z0 in range(0, Z, step):
            yield np.asarray(self.array[:, :, z0:z0 + step])
            self._written(X * Y * min(step, Z - z0))
        self.release()

    def values(self) -> set:
        """The label values present (read in slabs)."""
        from .components import present_values

        seen: set = set()
        for s in self.slabs():
            seen.update(present_values(s))
        return seen

    def _written(self, voxels: int) -> None:
        self._since += voxels * self.dtype.itemsize
        if self._since >= RELEASE_BYTES:
            self.release()

    def release(self) -> None:
        release_pages(self.array)
        self._since = 0


def _mapped(folder: Path, shape, dtype, nbytes: int) -> np.memmap:
    fd, path = tempfile.mkstemp(dir=folder, prefix=".labels.", suffix=".map")
    try:
        if hasattr(os, "posix_fallocate"):   # the blocks reserved now: a full disk fails here, not as SIGBUS later
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        else:
            os.ftruncate(fd, max(nbytes, 1))
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape, order="F")
    finally:
        os.close(fd)
        os.unlink(path)


def sitk_geometry(affine, reference: Optional[Path] = None) -> tuple:
    """``(origin, spacing, direction)`` for a SimpleITK image of the grid ``affine`` (RAS): those of ``reference``
    (a SimpleITK-format image of that grid, read from its header: the very numbers it holds) when given, else
    computed from ``affine`` (ITK's LPS world: x and y negated)."""
    if reference is not None and not is_nifti(reference):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(reference))
        reader.ReadImageInformation()
        dim = reader.GetDimension()
        n = min(dim, 3)
        if n == 3:
            direction = np.asarray(reader.GetDirection(), float).reshape(dim, dim)[:3, :3]
            return (tuple(reader.GetOrigin()[:3]), tuple(reader.GetSpacing()[:3]),
                    tuple(float(v) for v in direction.ravel()))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    return (tuple(float(v) for v in lps[:3, 3]), tuple(float(v) for v in spacing),
            tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))


def write_label_map(path, slabs: Iterable[np.ndarray], shape, affine, dtype, *, reference: Optional[Path] = None,
                    postprocessing: Union[dict, str, None] = None, scratch: Optional[Path] = None,
                    source=None) -> set:
    """Write the label map given as ``(X, Y, dz)`` slabs along ``Z`` to ``path`` (its ending picks the format)
    atomically, with ``affine`` (RAS; the input's), after ``postprocessing`` (a decision, ``"all"`` or None, see
    :func:`glam3d.postprocessing.apply_postprocessing`). ``reference``: the input file, whose SimpleITK geometry a
    SimpleITK-format output copies. ``scratch``: where the assembled map is mapped (None: memory). Returns the
    label values present in what was written."""
    from ..utils.io import atomic_path
    from ..utils.nifti import write_volumes

    path, shape = Path(path), tuple(int(s) for s in shape)
    ending = next((e for e in NIFTI_ENDINGS if path.name.lower().endswith(e)), None) or "".join(path.suffixes[-1:])
    if path.name.lower().endswith(".gipl.gz"):
        ending = ".gipl.gz"
    if is_nifti(path) and postprocessing is None:  # streamed: never whole in memory
        seen: set = set()
        from .components import present_values

        counted = (seen.update(present_values(s)) or s for s in slabs)
        with atomic_path(path, suffix=ending) as tmp:
            write_volumes(tmp, [counted], None, shape, affine, dtype)
        return seen
    vol = LabelVolume(shape, dtype, scratch)
    vol.fill(slabs, source or path)
    if postprocessing is not None:   # apply_postprocessing's cleaning, a slab of planes at a time
        from .components import apply_in_slabs

        apply_in_slabs(vol.array, postprocessing, release=vol.release)
    present = vol.values()
    with atomic_path(path, suffix=ending) as tmp:
        if is_nifti(path):
            write_volumes(tmp, [vol.slabs()], None, shape, affine, dtype)
        else:
            import SimpleITK as sitk

            origin, spacing, direction = sitk_geometry(affine, reference)
            image = sitk.GetImageFromArray(vol.array.T)   # (Z, Y, X) C order: the mapping read once, no copy of ours
            vol.release()
            image.SetOrigin(origin)
            image.SetSpacing(spacing)
            image.SetDirection(direction)
            try:
                sitk.WriteImage(image, str(tmp), True)
            except RuntimeError as err:
                raise OSError(f"SimpleITK cannot write {path.name}: {str(err).strip().splitlines()[-1][:200]}") \
                    from None
            del image
            _check_written_geometry(tmp, path, origin, spacing, direction)
    del vol
    return present


def _check_written_geometry(tmp: Path, path: Path, origin, spacing, direction) -> None:
    """:class:`~glam3d.errors.UserError` naming ``path`` when the file written at ``tmp`` does not hold the grid it
    was given (a format that stores no direction or origin, such as GIPL for an oblique or flipped scan): a label
    map must lie where its scan lies."""
    import SimpleITK as sitk

    from ..errors import UserError

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    reader.ReadImageInformation()
    got = (reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())
    for what, a, b in zip(("origin", "spacing", "direction"), got, (origin, spacing, direction)):
        if not np.allclose(a, b, rtol=1e-6, atol=1e-6):
            raise UserError(f"the {''.join(path.suffixes[-2:]) if path.name.endswith('.gz') else path.suffix} format "
                            f"cannot hold this scan's geometry (its {what} would be {tuple(round(v, 6) for v in a)}, "
                            f"not {tuple(round(v, 6) for v in b)}): choose --format nii.gz, mha or nrrd", path)

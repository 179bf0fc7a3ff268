"""Writing a NIfTI-1 file piece by piece, so that a large image is never held whole.

A single-file NIfTI (``.nii`` / ``.nii.gz``) is a 348-byte header, a 4-byte extension flag and the voxels in
Fortran order (the first axis fastest): for an ``(X, Y, Z, K)`` image, each ``(X, Y, Z)`` volume is one block
of the file, and each volume's ``Z`` planes follow one another. :func:`write_nifti_streamed` writes the header,
then whatever blocks it is given, in file order (a slab ``(X, Y, dz)`` of a volume is ``slab.tobytes(order="F")``);
:func:`write_volumes` does it for volumes given as slabs along ``Z``.

Usage::

    hdr = nifti_header((X, Y, Z, K), np.float32, affine)
    write_nifti_streamed("probs.nii.gz", hdr, (slab.tobytes(order="F") for vol in volumes for slab in slabs(vol)))
"""
from __future__ import annotations

import contextlib
import gzip
import os
from typing import Iterable, Optional

import numpy as np

#: nibabel's own gzip level for ``.nii.gz`` (``nibabel.openers.Opener.default_compresslevel``)
GZIP_LEVEL = 1


def nifti_header(shape, dtype, affine):
    """A ``nibabel.Nifti1Header`` for a single-file image of ``shape`` and ``dtype``, with ``affine`` as both its
    qform and sform (code 1, scanner), no intensity scaling, millimetres, voxels at offset 352."""
    import nibabel as nib

    affine = np.asarray(affine, float)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(int(s) for s in shape))
    hdr.set_data_dtype(np.dtype(dtype))
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm")
    hdr.set_data_offset(352)
    return hdr


def write_nifti_streamed(path, header, chunks: Iterable[bytes]) -> int:
    """Write ``header`` then ``chunks`` (the voxel bytes, in file order, already in the header's dtype and byte
    order) to ``path`` (gzip-compressed when it ends in ``.gz``). Raises ``ValueError`` naming the file when the
    chunks are not exactly the header's data size (the file is then incomplete: write to a temporary name, e.g.
    :func:`glam3d.utils.io.atomic_path`). Returns the number of voxel bytes written."""
    path = os.fspath(path)
    want = int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    offset = int(header.get_data_offset())
    if offset < 352:
        raise ValueError(f"{path}: a single-file NIfTI needs its voxels at offset 352 or later, not {offset}")
    written = 0
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path, "wb"))
        if path.endswith(".gz"):  # as nibabel writes it: no file name, no time stamp (the same bytes every time)
            f = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=GZIP_LEVEL,
                                                  mtime=0))
        f.write(header.binaryblock)
        f.write(b"\0" * (offset - len(header.binaryblock)))  # extension flag (none) and padding
        for chunk in chunks:
            written += len(chunk)
            if written > want:
                break
            f.write(chunk)
    if written != want:
        raise ValueError(f"{path}: {written} bytes of voxels given for an image of {want}")
    return written


def write_volumes(path, volumes, count: Optional[int], shape, affine, dtype,
                  intent: Optional[str] = None) -> None:
    """Write a NIfTI at ``path`` with ``affine``, streamed (:func:`write_nifti_streamed`): ``count`` volumes of
    ``shape`` ``(X, Y, Z)`` as one 4D image ``(X, Y, Z, count)`` (``count=None``: one volume, a 3D image).
    ``volumes`` yields, volume after volume, an iterable of ``(X, Y, dz)`` slabs of it along ``Z`` in order (e.g.
    :func:`preprocessing.pipeline.restored_probabilities`), cast to ``dtype``: at most one slab is in memory.
    ``intent``: a vector intent with that name (e.g. "class probabilities"). ``ValueError`` (naming ``path``) when
    the slabs do not make the volumes."""
    shape = tuple(int(v) for v in shape)
    k = 1 if count is None else int(count)
    hdr = nifti_header(shape if count is None else (*shape, k), dtype, affine)
    if intent:
        hdr.set_intent("vector", (), name=intent)

    def chunks():
        for i, slabs in enumerate(volumes):
            z = 0
            for slab in slabs:
                if i >= k or tuple(slab.shape[:2]) != shape[:2] or z + slab.shape[2] > shape[2]:
                    break
                z += slab.shape[2]
                yield np.asarray(slab, dtype=hdr.get_data_dtype()).tobytes(order="F")
            if i >= k or z != shape[2]:
                raise ValueError(f"{path}: volume {i} does not make an image of {shape} (of {k})")
    write_nifti_streamed(path, hdr, chunks())

"""Writing a NIfTI-1 file piece by piece, so that a large image is never held whole.

A single-file NIfTI (``.nii`` / ``.nii.gz``) is a 348-byte header, a 4-byte extension flag and the voxels in
Fortran order (the first axis fastest): for an ``(X, Y, Z, K)`` image, each ``(X, Y, Z)`` volume is one block
of the file, and each volume's ``Z`` planes follow one another. :func:`write_nifti_streamed` writes the header,
then whatever blocks it is given, in file order (a slab ``(X, Y, dz)`` of a volume is ``slab.tobytes(order="F")``).

Usage::

    hdr = nifti_header((X, Y, Z, K), np.float32, affine)
    write_nifti_streamed("probs.nii.gz", hdr, (slab.tobytes(order="F") for vol in volumes for slab in slabs(vol)))
"""
from __future__ import annotations

import contextlib
import gzip
import os
from typing import Iterable

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

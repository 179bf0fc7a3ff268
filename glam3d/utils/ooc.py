"""Disk-backed arrays: the out-of-core pieces of inference, in one place.

A long CT at a fine plan makes arrays of several GB (the network input, the blended class sums, the labels, the
probabilities). These classes keep them on disk and hold only the part being read or written:

* :class:`NpySlabReader` / :class:`NpySlabWriter`: a C-order ``.npy`` read or written one ``D``-range of planes
  at a time (seek + read/write, no memory map: what was read is freed when dropped). The writer builds the file
  under a temporary name and renames it into place when every plane was written.
* :class:`BlendSpill`: the sliding window's cell accumulators parked in one unlinked temporary file between the
  two rows of windows that add to them.
* :class:`ScratchArray`: a float32 array in an unlinked, mapped file whose written pages are dropped from the
  process every 32 MB (:func:`release_pages`), e.g. the class probabilities of a long CT.

Example::

    with NpySlabWriter("labels.npy", (d, h, w)) as out:
        for d0 in range(0, d, 8):
            out[d0:d0 + 8] = planes(d0)             # (<= 8, h, w) uint8
    x = NpySlabReader("ct.npy")[:, 40:56]           # (C, 16, H, W) in the stored dtype

(:class:`preprocessing.pipeline.LazyScan` is not one of them: it is a preprocessed scan computed from the scan
as read when rows are asked for, a view of the preprocessing, not storage.)
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
from collections import defaultdict

import numpy as np
import torch

__all__ = ["NpySlabReader", "NpySlabWriter", "BlendSpill", "ScratchArray", "release_pages"]


def release_pages(arr) -> None:
    """Drop the pages of a file mapping (``arr``: an ``np.memmap`` or a view of one) from the process's resident
    memory (``madvise(MADV_DONTNEED)``: they stay in the page cache and are mapped again when touched). Nothing
    for an in-memory array."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


# ---------------------------------------------------------------------------------------------------------------
# .npy slab reader / writer (no mmap: pages read with seek + fromfile never stay in this process's RSS)
# ---------------------------------------------------------------------------------------------------------------
def _read_npy_header(path: str):
    """``(shape, dtype, data offset)`` of a C-order ``.npy``; a one-line ValueError naming ``path`` otherwise."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            if major == 1:
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif major == 2:
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {major}")
            offset = f.tell()
    except OSError:
        raise
    except Exception as err:  # numpy raises ValueError with multi-line messages for bad headers
        raise ValueError(f"{path}: not a readable .npy file ({' '.join(str(err).split())})") from None
    if fortran:
        raise ValueError(f"{path}: a Fortran-order .npy; write it in C order")
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"{path}: dtype {dtype} is not a numeric array")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = os.path.getsize(path)
    if have < need:
        raise ValueError(f"{path}: truncated .npy ({have} bytes, the header promises {need})")
    return tuple(int(s) for s in shape), dtype, offset


class NpySlabReader:
    """Read-only view of a C-order ``.npy`` holding ``(C, D, H, W)`` or ``(D, H, W)`` (seen as ``(1, D, H, W)``),
    read one ``D``-range at a time with seek + :func:`numpy.fromfile` (no memory map: what was read is freed when
    dropped, so a long scan never counts in the resident set).

    ``reader[:, d0:d1]`` (or ``reader.read(d0, d1)``) returns a fresh ``(C, d1 - d0, H, W)`` array in the stored
    dtype (native byte order). ``.shape``, ``.dtype``, ``.ndim`` as for an array. A bad file raises a one-line
    ``ValueError`` naming the path.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        shape, dtype, self._offset = _read_npy_header(self.path)
        if len(shape) == 3:
            shape = (1,) + shape
        elif len(shape) != 4:
            raise ValueError(f"{self.path}: expected a (C, D, H, W) or (D, H, W) array, got shape {shape}")
        self.shape = shape
        self._stored = dtype
        self.dtype = dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype
        self.ndim = 4
        self._plane = int(np.prod(shape[2:], dtype=np.int64))

    def __repr__(self):
        return f"NpySlabReader({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def __len__(self):
        return self.shape[0]

    def read(self, d0: int, d1: int) -> np.ndarray:
        c, d = self.shape[:2]
        if not 0 <= d0 <= d1 <= d:
            raise IndexError(f"{self.path}: D-range [{d0}, {d1}) outside [0, {d})")
        n = (d1 - d0) * self._plane
        out = np.empty((c, d1 - d0) + self.shape[2:], dtype=self.dtype)
        if n == 0:
            return out
        with open(self.path, "rb") as f:
            for ch in range(c):
                f.seek(self._offset + (ch * d + d0) * self._plane * self._stored.itemsize)
                a = np.fromfile(f, dtype=self._stored, count=n)
                if a.size != n:
                    raise ValueError(f"{self.path}: file ended while reading planes [{d0}, {d1})")
                out[ch].reshape(-1)[:] = a  # converts the byte order if the file's is not native
        return out

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if (len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice) and key[1].step in (None, 1)):
            d0, d1, _ = key[1].indices(self.shape[1])
            return self.read(d0, max(d0, d1))
        raise IndexError(f"NpySlabReader supports reader[:, d0:d1] only, got {key!r}")


class NpySlabWriter:
    """Write a C-order ``.npy`` of ``shape`` (``D`` first) slab by slab: ``writer[d0:d1] = array`` seeks and
    writes those planes. The file is built under a temporary name beside ``path`` and renamed onto ``path`` by
    :meth:`close` (atomic, :func:`glam3d.utils.io.atomic_path`), which refuses (``ValueError``) if some planes
    were never written. Use as a context manager: an exception inside discards the temporary file.
    """

    def __init__(self, path, shape, dtype=np.uint8):
        from .io import atomic_path

        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or min(self.shape) < 0:
            raise ValueError(f"{self.path}: bad shape {shape}")
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._plane = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._written = np.zeros(self.shape[0], dtype=bool)
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path, suffix=".npy"))
        try:
            self._fh = open(tmp, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_1_0(self._fh, header)
            self._offset = self._fh.tell()
            self._fh.truncate(self._offset + self._plane * self.shape[0])
        except BaseException as err:
            self._abort(err)
            raise

    def __repr__(self):
        return f"NpySlabWriter({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    @property
    def complete(self) -> bool:
        return bool(self._written.all())

    def __setitem__(self, key, value):
        if self._fh is None:
            raise ValueError(f"{self.path}: writer is closed")
        if isinstance(key, (int, np.integer)):
            d0, d1 = int(key), int(key) + 1
            value = np.asarray(value)[None]
        elif isinstance(key, slice) and key.step in (None, 1):
            d0, d1, _ = key.indices(self.shape[0])
            d1 = max(d0, d1)
        else:
            raise IndexError(f"NpySlabWriter supports writer[d0:d1] = planes only, got {key!r}")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.ascontiguousarray(value, dtype=self.dtype)
        if value.shape != (d1 - d0,) + self.shape[1:]:
            raise ValueError(f"{self.path}: planes [{d0}, {d1}) need shape {(d1 - d0,) + self.shape[1:]}, "
                             f"got {value.shape}")
        self._fh.seek(self._offset + d0 * self._plane)
        self._fh.write(value.tobytes())  # C-order bytes
        self._written[d0:d1] = True

    def close(self) -> None:
        """Finish the file and rename it onto ``path``; ``ValueError`` (and no file) if planes are missing."""
        if self._fh is None:
            return
        if not self.complete:
            missing = int((~self._written).sum())
            err = ValueError(f"{self.path}: {missing} of {self.shape[0]} planes were never written; file discarded")
            self._abort(err)
            raise err
        self._fh.close()
        self._fh = None
        self._stack.close()  # fsync + os.replace

    def abort(self) -> None:
        """Discard the temporary file (nothing is written at ``path``)."""
        self._abort(RuntimeError("aborted"))

    def _abort(self, err: BaseException) -> None:
        fh, self._fh = getattr(self, "_fh", None), None
        try:
            if fh is not None:
                fh.close()  # may fail again (a full disk on flush): the temporary file goes all the same
        finally:
            self._stack.__exit__(type(err), err, err.__traceback__)  # atomic_path deletes its temporary file

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        elif self._fh is not None:
            self._abort(ev)
        return False



class BlendSpill:
    """Cell accumulators parked in one temporary file between the rows of windows that add to them.

    ``put`` writes a ``(K, *cell)`` float32 tensor at a free slot of the file (slots of a size are reused, so
    the file stays about one shared layer of cells), ``take`` reads it back into a fresh tensor and frees the slot.
    The file is unlinked from the start (:func:`tempfile.TemporaryFile`), so nothing is left behind. Before
    the first write the folder must have room for twice the cells held in memory at that moment (a bound on
    one layer); otherwise, and after a failed write, ``put`` declines (returns ``False``) and the caller keeps
    the cell in memory. ``state`` says which."""

    def __init__(self, folder):
        self.folder = folder
        self.file = None
        self.state = "unused"
        self.parked: dict = {}
        self.free: dict = defaultdict(list)
        self.end = self.bytes = self.peak = self.count = 0

    def __contains__(self, c) -> bool:
        return c in self.parked

    def _open(self, nbytes: int) -> bool:
        if self.state == "unused":
            from .io import has_room
            try:
                if has_room(self.folder, nbytes):
                    self.file = tempfile.TemporaryFile(dir=self.folder, prefix=".glam3d-blend-")
                    self.state = "on"
                else:
                    self.state = "off: no room"
            except OSError as err:
                self.state = f"off: {err.strerror or err}"
        return self.state == "on"

    def put(self, c, s: torch.Tensor, seen: list, live_bytes: int) -> bool:
        """Park cell ``c``'s sums ``s`` and the windows that added to them; ``False``: not parked, keep it."""
        if not self._open(live_bytes):
            return False
        a = s.detach().to("cpu").contiguous().numpy()
        n = a.nbytes
        off = self.free[n].pop() if self.free[n] else self.end
        view, done = memoryview(a.reshape(-1)).cast("B"), 0
        try:
            while done < n:
                done += os.pwrite(self.file.fileno(), view[done:], off + done)
        except OSError as err:  # e.g. the disk filled up: what is parked stays readable, no more parking
            self.state = f"stopped: {err.strerror or err}"
            return False
        self.end = max(self.end, off + n)
        self.parked[c] = (off, tuple(s.shape), seen)
        self.bytes += n
        self.peak = max(self.peak, self.bytes)
        self.count += 1
        return True

    def take(self, c, device) -> tuple:
        """Cell ``c`` back: ``(sums on device, windows that added to them)``; its slot becomes free."""
        off, shape, seen = self.parked.pop(c)
        t = torch.empty(shape, dtype=torch.float32)
        n = t.numel() * 4
        view, done = memoryview(t.numpy().reshape(-1)).cast("B"), 0
        while done < n:
            got = os.preadv(self.file.fileno(), [view[done:]], off + done)
            if got <= 0:
                raise OSError(f"the blending's spill file ended early at byte {off + done}")
            done += got
        self.free[n].append(off)
        self.bytes -= n
        return t.to(device), seen

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ScratchArray:
    """A float32 array of ``shape`` in a file of ``folder`` that is unlinked as soon as it is mapped (nothing is
    left behind, even by a killed run): ``target[key] = value`` writes through the mapping, and about every
    32 MB of pages written they leave the process's resident memory (they stay in the page cache, dirty ones
    are written back), so a long CT's probabilities cost disk, not memory. ``np.asarray(target)`` is the mapped
    array."""

    RELEASE_BYTES = 32 << 20

    def __init__(self, folder, shape):
        fd, path = tempfile.mkstemp(dir=folder, prefix=".probabilities.", suffix=".f32")
        try:
            # the blocks reserved now: a disk filling up later would kill the process (SIGBUS) through the
            # mapping instead of failing here with an OSError (the caller then keeps the maps in memory)
            nbytes = math.prod(shape) * 4
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
            self.array = np.memmap(path, dtype=np.float32, mode="r+", shape=tuple(shape))
        finally:
            os.close(fd)
            os.unlink(path)
        self.shape, self.ndim, self._since = tuple(shape), len(shape), 0

    def __setitem__(self, key, value):
        value = np.asarray(value)
        if isinstance(key, tuple) and key and key[0] == slice(None) and value.ndim == self.ndim:
            for k in range(value.shape[0]):  # one leading index (a class) at a time: pages released in between
                self._write((k,) + key[1:], value[k])
        else:
            self._write(key, value)

    def _write(self, key, value):
        self.array[key] = value
        # the pages touched: a part of a row of the last axis faults in the pages under it; count whole rows
        rows = value.size // value.shape[-1] if value.ndim and value.shape[-1] else 1
        self._since += rows * self.shape[-1] * 4
        if self._since >= self.RELEASE_BYTES:
            release_pages(self.array)
            self._since = 0

    def __getitem__(self, key):
        return self.array[key]

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self.array, dtype=dtype)
        return self.array if dtype is None else self.array.astype(dtype)

"""Sliding-window inference whose memory does not grow with the scan's length.

:func:`predict_volume` runs a segmentation network over a whole preprocessed scan ``(C, D, H, W)`` window by
window (MONAI's window grid and Gaussian importance map, 50 % overlap by default, nnFormer's protocol) and returns
the label map ``(D, H, W)`` (uint8).

A plain implementation (``monai.inferers.sliding_window_inference``) keeps a float32 ``K × D × H × W``
probability volume plus a count map until the end: for a 14-class model on a 512×512 CT of 1,000 slices that is
about 15 GB. Here the (padded) volume is split into *cells*: the boxes of the arrangement cut by every window's
start and stop along every axis. Windows are visited in MONAI's order (sorted by start, ``D`` first, then ``H``,
then ``W``); a cell's float32 accumulator (``K × cell``) is allocated when the first window touching it is
processed and finalised (divided by its count map — the sum of the windows' weights, recomputed then in the same
order, so no count map stays alive — reduced to labels by argmax, probabilities kept if asked) and freed as soon
as the last window covering it is done. With overlap 0 only one window's worth of accumulator is ever alive;
with overlap 0.5 about half of a ``roi_d``-deep full-width slab (0.54 GB for 14 classes on 512×512 planes: the
class sums of the ``roi_d / 2``-deep layer two window rows share). Every voxel receives the same float32
additions in the same order as in MONAI's full-volume aggregation, so the labels (and probabilities) are equal
bit for bit (``tests/test_inference.py`` checks it).

With ``spill=`` a folder, cells that the next row of windows will add to again are parked there between the
two rows (written when their row is done with them, read back when the next row reaches them): then only the
cells of the current row are held (a Synapse-size long CT at overlap 0.5: accumulator peak 0.54 -> 0.15 GB), and
the sums stay float32, so the labels are the same.

Neither the input nor the output has to live in memory: ``image`` may be a tensor or array of any numeric dtype
(e.g. int16 Hounsfield units, kept as they are and cast to float32 one window at a time, with an optional
elementwise ``normalize``) or a *lazy source* such as :class:`NpySlabReader`, read one ``D``-range of window
rows at a time; ``out=`` (e.g. :class:`NpySlabWriter`) receives the labels one finished ``D``-range at a time.

Example::

    labels = predict_volume(model, image, roi_size=(64, 128, 128), overlap=0.5, mirror=True, device="cuda")

    # a long CT on disk, int16 HU, labels straight to disk:
    with NpySlabWriter("labels.npy", shape) as out:
        predict_volume(model, NpySlabReader("ct.npy"), (64, 128, 128), overlap=0,
                       normalize=lambda x: x.clamp_(-125, 275).add_(125).div_(400), out=out)

Everything N-D: ``image`` may also be ``(C, H, W)`` with a 2D ``roi_size``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import tempfile
from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

__all__ = ["predict_volume", "window_grid", "resolve_amp", "cpu_bf16_native", "inference_weights", "SlabStats",
           "NpySlabReader", "NpySlabWriter", "BlendSpill"]

#: a finished cell is reduced to labels this many int64 argmax elements at a time (16 MB): a whole cell (at most
#: one window, 64x128x128 = 1 M voxels) in one call — one argmax, cast and copy per cell instead of per 4 planes
#: (128x256x256 at overlap 0.5: ≈ 2,230 -> ≈ 850 kernel-launching ops in the stitching; change 31)
_ARGMAX_ELEMENTS = 1 << 21


class SlabStats(dict):
    """Filled by :func:`predict_volume` when passed as ``stats=``: sizes of what inference held.

    Keys: ``windows``; ``image_shape`` (padded); ``cells`` (cells per axis); ``peak_accumulator_bytes`` (the
    largest total size of the live cell accumulators, summed from the tensors actually allocated; a cell's count
    map exists only while it is finalised);
    ``peak_live_cells``; ``slab_shape`` / ``slab_bytes`` (for comparison: the ``roi_d``-deep full-width slab
    ``(K, roi_d, H, W)`` + count map a plane-slab aggregator would hold); ``input_block_bytes`` (largest
    ``D``-range of the input read at once when the input is a lazy source or needed converting, else 0);
    ``labels_bytes`` (the whole-volume label tensor; 0 with ``out=``); ``labels_buffer_bytes`` (largest total
    of finished planes waiting for the ``out=`` write); ``probs_bytes`` (the probability tensor: 0 unless
    ``return_probs``, or with ``probs_out``);
    ``full_volume_bytes`` (what a full-volume aggregator would have held: ``(K + 1) × D × H × W`` floats).
    """


def window_grid(image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float]):
    """MONAI's window grid for a (padded) ``image_size``: a list of tuples of slices, sorted by their start along
    the first axis (MONAI's ``dense_patch_slices`` order, ``indexing="ij"``). ``overlap`` in ``[0, 1)``."""
    nd = len(image_size)
    overlap = tuple(overlap) if isinstance(overlap, (tuple, list)) else (float(overlap),) * nd
    interval = []
    for i in range(nd):
        if roi_size[i] == image_size[i]:
            interval.append(int(roi_size[i]))
        else:
            step = int(roi_size[i] * (1 - overlap[i]))
            interval.append(step if step > 0 else 1)
    return dense_patch_slices(tuple(image_size), tuple(roi_size), tuple(interval))


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively in oneDNN (AVX512-BF16 or AMX: Intel Cooper Lake / Sapphire Rapids
    and later, AMD Zen 4 and later). Elsewhere bf16 autocast on the CPU is emulated and slower than float32."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None and torch.backends.mkldnn.is_available() else False
    except RuntimeError:
        return False


def autocast_to(device, amp: Optional[torch.dtype], cache: bool = True):
    """``torch.autocast`` on ``device``'s type to ``amp`` (None: float32 — autocast switched *off*, also when the
    caller had it on). ``cache=False``: no weight-cast cache (required inside a CUDA-graph capture, whose casts
    would be freed after it)."""
    return torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None,
                          cache_enabled=cache)


#: layers whose weights ``torch.autocast`` casts at every call, and :func:`inference_weights` casts once
_CAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def inference_weights(model: torch.nn.Module, amp: Optional[torch.dtype]) -> torch.nn.Module:
    """Store the weights and biases of ``model``'s linear and convolution layers in ``amp``'s dtype, in place,
    for inference under ``torch.autocast`` to ``amp`` (None or float32: nothing changes). Returns ``model``.

    Autocast casts those weights at every call: 150 M parameters per forward of a Synapse-size network, after
    which oneDNN copies every 3D convolution weight to the channels-last layout of its input again (3D weights
    are stored in that layout here). Casting once is the same rounding, so the outputs are bit-identical to
    autocast's, the weights take half the memory, and a bf16 forward on a CPU with AMX runs 10-25 % faster
    (``experiments/PERFORMANCE.md``, change 35). Other parameters (norms, position-bias tables, global tokens)
    stay float32, as autocast uses them. The float32 weights are gone: the model is for inference under
    autocast only (a forward without it fails on the dtype mismatch).

    Example::

        model = inference_weights(build_model_spec("glam_nnformer_synapse").eval(), torch.bfloat16)
        labels = predict_volume(model, ct, (64, 128, 128), amp="bf16")
    """
    if amp is None or amp == torch.float32:
        return model
    for mod in model.modules():
        if not isinstance(mod, _CAST_LAYERS):
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if p is None or not p.is_floating_point() or p.dtype == amp:
                continue
            t = p.detach().to(amp)
            if t.ndim == 5:
                t = t.contiguous(memory_format=torch.channels_last_3d)
            p.data = t
    return model


def resolve_amp(amp, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``amp`` on ``device`` (``None``: float32).

    ``None``/``"auto"``/``True``: bf16 on a CUDA GPU that supports it, else fp16; float32 on CPU (bf16 on a CPU
    is the user's choice: faster where :func:`cpu_bf16_native`, never bit-equal to float32).
    ``False``/``"off"``/``"none"``/``"fp32"``: float32. ``"bf16"``/``"bfloat16"``: bf16 on any device.
    ``"fp16"``/``"float16"``: CUDA only (ValueError on CPU, where fp16 autocast is slow and unscaled).
    """
    device = torch.device(device)
    if amp is None or amp is True or (isinstance(amp, str) and amp.lower() == "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is False or (isinstance(amp, str) and amp.lower() in ("off", "none", "false", "no", "fp32")):
        return None
    key = str(amp).lower().replace("torch.", "")
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}.get(key)
    if dtype is None:
        raise ValueError(f"amp must be one of auto, off, bf16, fp16; got {amp!r}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 autocast is a GPU path; on a CPU use bf16 (fast where the CPU has AVX512-BF16 or "
                         "AMX) or off")
    return dtype


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
        from ..utils.io import atomic_path

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


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------
_TORCH_UNSUPPORTED = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.float64}


def _as_torch(a) -> torch.Tensor:
    """A block read from the image as a tensor (no copy where possible), in its own dtype."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in _TORCH_UNSUPPORTED:
        a = a.astype(_TORCH_UNSUPPORTED[a.dtype])
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


def _check_args(image, roi_size, overlap, sw_batch_size, mode):
    shape = getattr(image, "shape", None)
    if shape is None or not hasattr(image, "__getitem__") or len(shape) not in (3, 4):
        raise ValueError(f"image must be (C, D, H, W) or (C, H, W): a tensor, an array or a lazy source with "
                         f".shape and [:, d0:d1]; got "
                         f"{tuple(shape) if shape is not None else type(image).__name__}")
    dtype = getattr(image, "dtype", None)
    if dtype is not None and (dtype in (torch.complex64, torch.complex128, torch.complex32)
                              or (isinstance(dtype, np.dtype) and dtype.kind not in "biuf")):
        raise ValueError(f"image must hold real numbers, got dtype {dtype}")
    nd = len(shape) - 1
    roi = (int(roi_size),) * nd if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != nd:
        raise ValueError(f"roi_size {tuple(roi_size)} has {len(roi)} axes but the image has {nd} spatial axes")
    if any(r <= 0 for r in roi):
        raise ValueError(f"roi_size must be positive, got {roi}")
    ov = overlap if isinstance(overlap, (tuple, list)) else (overlap,) * nd
    if len(ov) != nd or any(not (0 <= o < 1) for o in ov):
        raise ValueError(f"overlap must be in [0, 1) (one value or one per axis), got {overlap}")
    if int(sw_batch_size) < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    return nd, roi


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _visit_order(windows, roi):
    """The windows in the order they are processed, and the groups of consecutive windows that share one read of
    the input (their ``D``-span).

    MONAI's order (``D``-major) — except where the windows are pairwise disjoint across ``H`` and ``W`` (overlap 0
    there, sizes multiples of the window or a single window): then consecutive ``D``-rows that overlap (the last
    row, shifted back to end at the volume's edge) are visited column by column, each ``(h, w)`` column in ``D``
    order. Windows that share a voxel keep their relative order, so every voxel receives the same additions in
    the same order; but the planes shared by the two rows no longer stay alive for a whole row.
    """
    rows = []
    for w in windows:
        if rows and rows[-1][0][0] == w[0]:
            rows[-1].append(w)
        else:
            rows.append([w])
    nd = len(roi)

    def disjoint(k):
        spans = sorted({(w[k].start, w[k].stop) for w in rows[0]})
        return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))

    interleave = all(disjoint(k) for k in range(1, nd))
    groups = []  # lists of rows
    for row in rows:
        g = groups[-1] if groups else None
        if (interleave and g is not None and row[0][0].start < g[-1][0][0].stop
                and row[0][0].stop - g[0][0][0].start <= 2 * roi[0]):
            g.append(row)
        else:
            groups.append([row])
    order, spans = [], []
    for g in groups:
        ws = g[0] if len(g) == 1 else [w for col in zip(*g) for w in col]
        order.extend(ws)
        span = (g[0][0][0].start, max(r[0][0].stop for r in g))
        spans.extend([span] * len(ws))
    return order, spans


@torch.no_grad()
def predict_volume(model: Callable, image, roi_size, overlap: float = 0.5, sw_batch_size: int = 2,
                   mode: str = "gaussian", mirror: bool | Sequence[int] = False, device=None, amp=None,
                   return_probs: bool = False, stitch_device=None, progress=False, stats: dict | None = None,
                   sigma_scale: float = 0.125, normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                   out=None, probs_out: Optional[Callable[[tuple], object]] = None, spill=None):
    """Segment one preprocessed scan by sliding windows, keeping only the live cells of the aggregation.

    The padded volume is cut into cells by every window's start and stop along every axis; a cell's float32
    accumulator (``K × cell``) exists from the first window touching it to the last one, then it is
    normalised, reduced to labels and freed. Labels and probabilities equal MONAI's full-volume
    ``sliding_window_inference`` aggregation bit for bit. ``stats["peak_accumulator_bytes"]`` reports the most
    accumulator memory alive at once (one window's worth at overlap 0, whatever the scan length).

    Args:
        model: network (or any callable) mapping ``(B, C, *roi)`` to logits ``(B, K, *roi)``; a list/tuple output
            (deep supervision) uses its first, full-resolution element. Put in ``eval()`` mode here.
        image: ``(C, D, H, W)`` (or ``(C, H, W)``): a tensor (any device) or numpy array of any real dtype (e.g.
            int16 HU; kept in its dtype, each window is cast to float32 when it is cut out), or a *lazy source*:
            any object with ``.shape`` and ``source[:, d0:d1]`` returning that ``D``-range as an array/tensor,
            e.g. :class:`NpySlabReader` (a file on disk), an h5py/zarr dataset. A source is read one
            ``D``-range of window rows at a time (the only part of the input held).
        roi_size: window size per spatial axis (e.g. the training crop ``(64, 128, 128)``). Volumes smaller than
            the window are zero-padded symmetrically (as MONAI does) and the result cropped back; the padding
            is applied to each window after ``normalize``, the volume itself is never padded.
        overlap: fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        mode: ``"gaussian"`` (nnU-Net / nnFormer weights, sigma = 0.125 × window) or ``"constant"``.
        mirror: test-time augmentation: ``True`` averages the softmax over all flips of all spatial axes
            (8 passes in 3D), or a sequence of spatial axes (0 = D) to flip.
        device: where the network runs (default: the model's parameters' device).
        amp: mixed precision, see :func:`resolve_amp` (default: bf16/fp16 on CUDA, off on CPU). bf16 on a CPU:
            cast the weights once first (:func:`inference_weights`, what ``glam3d predict`` does): faster, less
            memory, the same labels.
        return_probs: also return the blended softmax ``(K, D, H, W)`` float32 (in memory unless ``probs_out``
            puts it elsewhere: it grows with ``D``).
        stitch_device: where the cell accumulators, labels (and probabilities) live (default ``device``);
            ``"cpu"`` keeps the GPU's memory to the network and one batch of windows.
        progress: ``True`` for a tqdm bar over windows, a string for a bar with that description, or a callable
            ``progress(done, total)``.
        stats: a dict to fill with memory accounting (see :class:`SlabStats`).
        sigma_scale: Gaussian sigma as a fraction of the window.
        normalize: optional preprocessing applied to every window right after the float32 cast (e.g. CT
            clip + scale). It is applied window by window (to the image's part of a window, before zero
            padding), so it must be **elementwise** — a function of each voxel's value alone, returning a tensor
            of the same shape (it may work in place). Statistics over the volume must be computed beforehand.
        out: where the labels go instead of a whole-volume tensor: any object of shape ``(D, H, W)`` accepting
            ``out[d0:d1] = planes`` (e.g. :class:`NpySlabWriter`, a numpy array or a tensor; a tensor receives
            a tensor, anything else a uint8 numpy array). Each ``D``-range is written as soon as all its cells are
            final (in increasing ``D``), so no whole-volume label map is allocated.
        probs_out: with ``return_probs``, where the probabilities go instead of a tensor on ``stitch_device``:
            called once with their shape ``(K, D, H, W)`` when ``K`` is known, it returns the target (e.g. a
            :class:`numpy.memmap` on disk), which receives each finished cell as ``target[:, d, h, w] = cell``
            (a tensor for a tensor target, a float32 numpy array otherwise) and is returned as ``probs``.
        spill: a folder where cells shared by two rows of windows wait between the rows (see
            :class:`BlendSpill`; one unlinked temporary file holding the layer two consecutive rows share, of
            float32 class sums: ``roi_d * overlap`` planes, 0.47 GB for 14 classes on 512×512 planes at overlap
            0.5; more where the last row is shifted back to end at the volume's edge, at most ``roi_d - 1``
            planes: 56, 0.82 GB, for 200 planes). Only that layer leaves
            memory; the additions and the labels are unchanged. Where the folder lacks room for twice what would
            be parked, the cells stay in memory (``stats["spill"]`` says which).

    Returns:
        labels ``(D, H, W)`` uint8 on ``stitch_device`` (or ``out`` when given) — or ``(labels, probs)`` with
        ``return_probs``.
    """
    nd, roi = _check_args(image, roi_size, overlap, sw_batch_size, mode)
    device = torch.device(device) if device is not None else _model_device(model)
    stitch = torch.device(stitch_device) if stitch_device is not None else device
    amp_dtype = resolve_amp(amp, device)
    if hasattr(model, "eval"):
        model.eval()
    chans = int(image.shape[0])
    size0 = tuple(int(s) for s in image.shape[1:])
    if out is not None and tuple(getattr(out, "shape", size0)) != size0:
        raise ValueError(f"out has shape {tuple(out.shape)}, the labels are {size0}")

    # --- geometry: symmetric zero padding to at least one window (MONAI's), windows, cells -----------------
    lo = tuple(max(roi[k] - size0[k], 0) // 2 for k in range(nd))
    size = tuple(max(roi[k], size0[k]) for k in range(nd))
    padded = size != size0
    windows, spans = _visit_order(window_grid(size, roi, overlap), roi)
    bounds = [sorted({0, size[k]} | {w[k].start for w in windows} | {w[k].stop for w in windows})
              for k in range(nd)]
    where = [{c: i for i, c in enumerate(b)} for b in bounds]
    ncells = tuple(len(b) - 1 for b in bounds)
    cell_ranges = [tuple(range(where[k][w[k].start], where[k][w[k].stop]) for k in range(nd)) for w in windows]
    last = np.full(ncells, -1, dtype=np.int64)  # the last window (in visiting order) covering each cell
    for i, r in enumerate(cell_ranges):
        last[tuple(slice(rk[0], rk[-1] + 1) for rk in r)] = i
    left_in_row = [int(np.prod(ncells[1:]))] * ncells[0]  # cells not yet final, per D-interval of cells
    if spill is not None:
        touchers = defaultdict(list)  # cell -> the windows adding to it, in visiting order
        for i, r in enumerate(cell_ranges):
            for c in itertools.product(*r):
                touchers[c].append(i)
        parked = BlendSpill(spill)

    weight = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device=stitch,
                                    dtype=torch.float32)[None]  # (1, *roi)
    flips = _mirror_axes(mirror, nd)

    # --- outputs ------------------------------------------------------------------------------------------
    labels = None if out is not None else torch.empty(size0, dtype=torch.uint8, device=stitch)
    probs = None
    k_classes = None
    live: dict = {}          # cell index -> accumulator (K, *cell)
    acc = {"live": 0, "peak": 0, "cells": 0, "peak_cells": 0, "block": 0, "buf": 0, "peak_buf": 0}
    row_buffers: dict = {}   # D-interval of cells -> (planes d0, d1 of the labels, uint8 buffer) (out= only)

    def row_range(a):
        """Planes of the (cropped) labels in D-interval ``a`` of the cells: ``(d0, d1)``, possibly empty."""
        d0 = max(bounds[0][a], lo[0]) - lo[0]
        d1 = min(bounds[0][a + 1], lo[0] + size0[0]) - lo[0]
        return d0, max(d0, d1)

    def row_target(a):
        if labels is not None:
            d0, d1 = row_range(a)
            return d0, labels[d0:d1]
        if a not in row_buffers:
            d0, d1 = row_range(a)
            buf = torch.empty((d1 - d0,) + size0[1:], dtype=torch.uint8, device=stitch)
            row_buffers[a] = (d0, d1, buf)
            acc["buf"] += buf.numel()
            acc["peak_buf"] = max(acc["peak_buf"], acc["buf"])
        d0, _, buf = row_buffers[a]
        return d0, buf

    def row_done(a):
        if labels is not None or a not in row_buffers:
            return
        d0, d1, buf = row_buffers.pop(a)
        if d1 > d0:
            out[d0:d1] = buf if isinstance(out, torch.Tensor) else buf.cpu().numpy()
        acc["buf"] -= buf.numel()

    def local(c, w):
        """Cell ``c`` inside window ``w``: slices of the window's ``(K, *roi)`` output."""
        return (slice(None),) + tuple(slice(bounds[k][c[k]] - w[k].start, bounds[k][c[k] + 1] - w[k].start)
                                      for k in range(nd))

    def release(c):
        """Cell ``c``'s entry ``(sums, windows)`` out of the live set, its bytes no longer counted."""
        entry = live.pop(c)
        acc["live"] -= entry[0].numel() * entry[0].element_size()
        return entry

    def finalise(c):
        s, seen = release(c)
        n = torch.zeros((1,) + s.shape[1:], dtype=torch.float32, device=stitch)  # the count map, summed now in
        for i in seen:                                                           # the windows' order, as MONAI
            n.add_(weight[local(c, windows[i])])
        s.div_(n)  # the blended probabilities: the same division as MONAI's `output / count_map`
        src, dst = [slice(None)], []
        for k in range(nd):
            c0, c1 = bounds[k][c[k]], bounds[k][c[k] + 1]
            i0, i1 = max(c0, lo[k]), min(c1, lo[k] + size0[k])
            if i1 <= i0:
                break
            src.append(slice(i0 - c0, i1 - c0))
            dst.append(slice(i0 - lo[k], i1 - lo[k]))
        else:  # the cell holds part of the unpadded volume
            p = s[tuple(src)]
            d0, target = row_target(c[0])
            rel = dst[0].start - d0
            step = max(1, _ARGMAX_ELEMENTS // max(1, math.prod(p.shape[2:])))  # planes per argmax (int64 temporary)
            for i in range(0, p.shape[1], step):
                j = min(i + step, p.shape[1])
                target[(slice(rel + i, rel + j),) + tuple(dst[1:])] = torch.argmax(p[:, i:j], dim=0).to(torch.uint8)
            if probs is not None:
                probs[(slice(None),) + tuple(dst)] = p if isinstance(probs, torch.Tensor) else p.cpu().numpy()
        del s, n
        left_in_row[c[0]] -= 1
        if left_in_row[c[0]] == 0:
            row_done(c[0])

    # --- input: one D-span of window rows at a time, each window cast to float32 (+ normalize) ---------------
    x_device = image.device if isinstance(image, torch.Tensor) else torch.device("cpu")
    block = {"span": None, "data": None, "d0": 0}

    def load(span):
        a, b = max(span[0] - lo[0], 0), min(span[1] - lo[0], size0[0])
        block["data"] = None  # drop the previous block before reading the next one
        if isinstance(image, torch.Tensor):
            data = image[:, a:b]
        else:
            data = _as_torch(image[:, a:b])
            if tuple(data.shape) != (chans, b - a) + size0[1:]:
                raise ValueError(f"image[:, {a}:{b}] returned shape {tuple(data.shape)}, expected "
                                 f"{(chans, b - a) + size0[1:]}")
            if not isinstance(image, np.ndarray) or not np.shares_memory(np.asarray(data), image):
                acc["block"] = max(acc["block"], data.numel() * data.element_size())
        block.update(span=span, data=data, d0=a)

    def cut(xb_j, w, span):
        if block["span"] != span:
            load(span)
        src, dst = [slice(None)], [slice(None)]
        for k in range(nd):
            o0, o1 = max(w[k].start - lo[k], 0), min(w[k].stop - lo[k], size0[k])
            base = block["d0"] if k == 0 else 0
            src.append(slice(o0 - base, o1 - base))
            dst.append(slice(o0 + lo[k] - w[k].start, o1 + lo[k] - w[k].start))
        v = xb_j[tuple(dst)]
        v.copy_(block["data"][tuple(src)])  # the float32 cast
        if normalize is not None:
            r = normalize(v)
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != tuple(v.shape):
                raise ValueError(f"normalize must be elementwise: it returned "
                                 f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__} "
                                 f"for a window of shape {tuple(v.shape)}")
            if r is not v:
                v.copy_(r)

    bar = _make_progress(progress, len(windows))
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for start in range(0, len(windows), sw_batch_size):
        batch_w = windows[start:start + sw_batch_size]
        alloc = torch.zeros if padded else torch.empty
        xb = alloc((len(batch_w), chans) + roi, dtype=torch.float32, device=x_device)
        for j, w in enumerate(batch_w):
            cut(xb[j], w, spans[start + j])
        x = xb.to(device=device)
        del xb
        with autocast:
            res = _softmax_tta(model, x, flips)
        del x
        if tuple(res.shape[2:]) != roi or res.shape[0] != len(batch_w):
            raise ValueError(f"model output {tuple(res.shape)} does not match the window batch "
                             f"({len(batch_w)}, K, {', '.join(map(str, roi))})")
        res = res.to(device=stitch, dtype=torch.float32)
        res *= weight  # (B, K, *roi) * (1, *roi): same product as MONAI's `seg_prob *= w_t`
        if k_classes is None:
            k_classes = res.shape[1]
            if k_classes > 256:
                raise ValueError(f"{k_classes} classes do not fit uint8 labels")
            if return_probs:
                probs = (probs_out((k_classes,) + size0) if probs_out is not None
                         else torch.empty((k_classes,) + size0, dtype=torch.float32, device=stitch))
        for j, (w, o) in enumerate(zip(batch_w, res)):
            i = start + j
            cells = list(itertools.product(*cell_ranges[i]))
            for c in cells:
                entry = live.get(c)
                if entry is None:
                    if spill is not None and c in parked:  # back from disk for this row
                        entry = parked.take(c, stitch)
                    else:
                        shape = tuple(bounds[k][c[k] + 1] - bounds[k][c[k]] for k in range(nd))
                        entry = (torch.zeros((k_classes,) + shape, dtype=torch.float32, device=stitch), [])
                    live[c] = entry
                    acc["live"] += entry[0].numel() * entry[0].element_size()
                entry[0].add_(o[local(c, w)])  # `+=` on the cell: the same float32 sum, voxel by voxel, as MONAI's
                entry[1].append(i)  # the windows that touched it: the count map is their weights' sum
            if acc["live"] > acc["peak"]:
                acc["peak"] = acc["live"]
            acc["peak_cells"] = max(acc["peak_cells"], len(live))
            for c in cells:
                if last[c] == i:
                    finalise(c)
                elif (spill is not None and _parks(touchers[c], i, windows)
                      and parked.put(c, *live[c], acc["live"])):
                    release(c)
        del res, o
        if bar is not None:
            bar(start + len(batch_w), len(windows))
    block["data"] = None
    if bar is not None:
        bar(None, None)
    assert not live and not row_buffers, "internal error: cells left unfinalised"
    if spill is not None:
        parked.close()

    if stats is not None:
        k = k_classes or 0
        plane = int(np.prod(size[1:]))
        stats.update({
            "windows": len(windows),
            "image_shape": tuple(size),
            "cells": ncells,
            "peak_accumulator_bytes": acc["peak"],
            "peak_live_cells": acc["peak_cells"],
            "slab_shape": (k, roi[0]) + tuple(size[1:]),
            "slab_bytes": (k + 1) * roi[0] * plane * 4,
            "input_block_bytes": acc["block"],
            "labels_bytes": 0 if labels is None else labels.numel(),
            "labels_buffer_bytes": acc["peak_buf"],
            "probs_bytes": probs.numel() * probs.element_size() if isinstance(probs, torch.Tensor) else 0,
            "full_volume_bytes": (k + 1) * int(np.prod(size)) * 4,
        })
        if spill is not None:
            stats.update(spill=parked.state, spilled_cells=parked.count, peak_spilled_bytes=parked.peak,
                         spill_file_bytes=parked.end)
    result = labels if labels is not None else out
    return (result, probs) if return_probs else result


def _parks(touchers: Sequence[int], i: int, windows) -> bool:
    """Whether a cell window ``i`` has just added to should wait on disk: the next window adding to it lies in
    another row (another ``D`` start) and does not come right after ``i`` (as it does where the last two rows
    are visited column by column, see :func:`_visit_order`). Cells shared along ``H`` or ``W`` inside a row stay
    in memory."""
    k = touchers.index(i)
    if k + 1 == len(touchers):
        return False
    j = touchers[k + 1]
    return windows[j][0].start != windows[i][0].start and j - i > 1


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
            from glam3d.utils.io import has_room
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


def _mirror_axes(mirror, nd):
    """List of flip-axis tuples (over the batch tensor's axes), the identity first."""
    if mirror is False or mirror is None:
        return [()]
    axes = list(range(nd)) if mirror is True else [int(a) for a in mirror]
    if any(a < 0 or a >= nd for a in axes):
        raise ValueError(f"mirror axes must be spatial axes in [0, {nd}), got {mirror}")
    combos = []
    for r in range(len(axes) + 1):
        combos.extend(itertools.combinations(axes, r))
    return [tuple(a + 2 for a in c) for c in combos]


def _forward(model, x):
    out = model(x)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out


def _softmax_tta(model, x, flips):
    """Softmax over classes, averaged over the flips (identity only without mirroring); float32."""
    total = None
    for axes in flips:
        xi = torch.flip(x, axes) if axes else x
        p = torch.softmax(_forward(model, xi).float(), dim=1)
        if axes:
            p = torch.flip(p, axes)
        total = p if total is None else total + p
    if len(flips) > 1:
        total = total / len(flips)
    return total


def _make_progress(progress, total):
    if not progress:
        return None
    if callable(progress) and not isinstance(progress, str):
        def cb(done, tot):
            if done is not None:
                progress(done, tot)
        return cb
    from tqdm import tqdm

    bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "windows", unit="win", leave=False,
               dynamic_ncols=True, disable=None)  # disable=None: off when stderr is not a terminal
    state = {"n": 0}

    def cb(done, tot):
        if done is None:
            bar.close()
            return
        bar.update(done - state["n"])
        state["n"] = done
    return cb


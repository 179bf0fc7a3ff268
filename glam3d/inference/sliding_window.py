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
elementwise ``normalize``) or a *lazy source* such as :class:`~glam3d.utils.ooc.NpySlabReader`, read one
``D``-range of window rows at a time; ``out=`` (e.g. :class:`~glam3d.utils.ooc.NpySlabWriter`) receives the labels one
finished ``D``-range at a time.

Example::

    labels = predict_volume(model, image, roi_size=(64, 128, 128), overlap=0.5, mirror=True, device="cuda")

    # an ensemble (e.g. the 5 folds of a cross-validation): each window through every network, softmax averaged
    labels = predict_volume([fold0, fold1, fold2, fold3, fold4], image, roi_size=(64, 128, 128))

    # a long CT on disk, int16 HU, labels straight to disk (glam3d.utils.ooc):
    with NpySlabWriter("labels.npy", shape) as out:
        predict_volume(model, NpySlabReader("ct.npy"), (64, 128, 128), overlap=0,
                       normalize=lambda x: x.clamp_(-125, 275).add_(125).div_(400), out=out)

Everything N-D: ``image`` may also be ``(C, H, W)`` with a 2D ``roi_size``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from ..utils.ooc import BlendSpill
from .precision import resolve_amp

__all__ = ["predict_volume", "window_grid", "SlabStats"]

#: a finished cell is reduced to labels this many int64 argmax elements at a time (16 MB): a whole cell (at most
#: one window, 64x128x128 = 1 M voxels) in one call — one argmax, cast and copy per cell instead of per 4 planes
#: (128x256x256 at overlap 0.5: ≈ 2,230 -> ≈ 850 kernel-launching ops in the stitching)
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
            (deep supervision) uses its first, full-resolution element. Put in ``eval()`` mode here. A list or
            tuple of networks is an ensemble: every batch of windows goes through each of them and their softmax
            (each averaged over the mirrorings first) is averaged before the windows are blended, so the blending
            and its memory are those of one network; blending being linear, the probabilities equal the average
            of the networks' separately blended ones up to float32 rounding. They must predict the same classes.
        image: ``(C, D, H, W)`` (or ``(C, H, W)``): a tensor (any device) or numpy array of any real dtype (e.g.
            int16 HU; kept in its dtype, each window is cast to float32 when it is cut out), or a *lazy source*:
            any object with ``.shape`` and ``source[:, d0:d1]`` returning that ``D``-range as an array/tensor,
            e.g. :class:`~glam3d.utils.ooc.NpySlabReader` (a file on disk), an h5py/zarr dataset. A source is read one
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
        amp: mixed precision, see :func:`~glam3d.inference.precision.resolve_amp` (default: bf16/fp16 on CUDA,
            off on CPU). bf16 on a CPU: cast the weights once first
            (:func:`~glam3d.inference.precision.inference_weights`, what ``glam3d predict`` does): faster, less
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
            ``out[d0:d1] = planes`` (e.g. :class:`~glam3d.utils.ooc.NpySlabWriter`, a numpy array or a tensor;
            a tensor receives a tensor, anything else a uint8 numpy array). Each ``D``-range is written as soon as
            all its cells are final (in increasing ``D``), so no whole-volume label map is allocated.
        probs_out: with ``return_probs``, where the probabilities go instead of a tensor on ``stitch_device``:
            called once with their shape ``(K, D, H, W)`` when ``K`` is known, it returns the target (e.g. a
            :class:`numpy.memmap` on disk), which receives each finished cell as ``target[:, d, h, w] = cell``
            (a tensor for a tensor target, a float32 numpy array otherwise) and is returned as ``probs``.
        spill: a folder where cells shared by two rows of windows wait between the rows (see
            :class:`~glam3d.utils.ooc.BlendSpill`; one unlinked temporary file holding the layer two consecutive
            rows share, of float32 class sums: ``roi_d * overlap`` planes, 0.47 GB for 14 classes on 512×512
            planes at overlap 0.5; more where the last row is shifted back to end at the volume's edge, at most
            ``roi_d - 1`` planes: 56, 0.82 GB, for 200 planes). Only that layer leaves memory; the additions and
            the labels are unchanged. Where the folder lacks room for twice what would
            be parked, the cells stay in memory (``stats["spill"]`` says which).

    Returns:
        labels ``(D, H, W)`` uint8 on ``stitch_device`` (or ``out`` when given) — or ``(labels, probs)`` with
        ``return_probs``.
    """
    nd, roi = _check_args(image, roi_size, overlap, sw_batch_size, mode)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("model: an empty list of networks")
    device = torch.device(device) if device is not None else _model_device(models[0])
    stitch = torch.device(stitch_device) if stitch_device is not None else device
    amp_dtype = resolve_amp(amp, device)
    for m in models:
        if hasattr(m, "eval"):
            m.eval()
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
            res = _ensemble_softmax(models, x, flips)
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


def _ensemble_softmax(models, x, flips):
    """The networks' softmax (each averaged over the flips, :func:`_softmax_tta`) averaged over the networks; one
    network: its own, untouched (bit for bit what a single network gives)."""
    total = _softmax_tta(models[0], x, flips)
    if len(models) == 1:
        return total
    for m in models[1:]:
        p = _softmax_tta(m, x, flips)
        if p.shape != total.shape:
            raise ValueError(f"the ensemble's networks disagree: {tuple(total.shape)} vs {tuple(p.shape)} "
                             f"(classes per window)")
        total = total + p
        del p
    return total / len(models)


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


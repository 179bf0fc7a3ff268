"""Sliding-window inference whose memory does not grow with the scan's length.

:func:`predict_volume` runs a segmentation network over a whole preprocessed scan ``(C, D, H, W)`` window by
window (MONAI's window grid and Gaussian importance map, 50 % overlap by default, nnFormer's protocol) and returns
the label map ``(D, H, W)`` (uint8).

A plain implementation (``monai.inferers.sliding_window_inference``) keeps a float32 ``K × D × H × W``
probability volume plus a count map until the end: for a 14-class model on a 512×512 CT of 1,000 slices that is
about 15 GB. Here windows are visited in MONAI's order, which is sorted by their start along the first spatial
axis ``D``; the moment the next window starts at plane ``s``, no later window touches the planes before ``s``, so
those planes are normalised, reduced to labels (argmax) and dropped. Only a *slab* of ``roi_d`` planes is ever
held (``K × roi_d × H × W`` floats), whatever ``D`` is. The per-voxel sums are accumulated in exactly MONAI's order,
so the labels equal MONAI's full-volume aggregation bit for bit (``tests/test_inference.py`` checks it).

Example::

    labels = predict_volume(model, image, roi_size=(64, 128, 128), overlap=0.5, mirror=True, device="cuda")

Everything N-D: ``image`` may also be ``(C, H, W)`` with a 2D ``roi_size``.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

__all__ = ["predict_volume", "window_grid", "resolve_amp", "SlabStats"]

_PLANES_PER_STEP = 4


class SlabStats(dict):
    """Filled by :func:`predict_volume` when passed as ``stats=``: sizes of what inference held.

    Keys: ``windows``, ``image_shape`` (padded), ``slab_shape`` (the accumulator, ``(K, planes, H, W)``),
    ``slab_bytes`` (accumulator + count map), ``labels_bytes``, ``probs_bytes`` (0 unless ``return_probs``),
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


def resolve_amp(amp, device: torch.device) -> Optional[torch.dtype]:
    """``amp``: ``None``/``"auto"`` (bf16 on a CUDA GPU that supports it, else fp16; off on CPU), ``True``
    (same as auto), ``False``/``"off"``/``"none"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``."""
    if amp is None or amp is True or (isinstance(amp, str) and amp.lower() == "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is False or (isinstance(amp, str) and amp.lower() in ("off", "none", "false", "no", "fp32")):
        return None
    if isinstance(amp, torch.dtype):
        return amp
    key = str(amp).lower()
    if key in ("bf16", "bfloat16"):
        return torch.bfloat16
    if key in ("fp16", "float16", "half"):
        return torch.float16
    raise ValueError(f"amp must be one of auto, off, bf16, fp16; got {amp!r}")


def _check_args(image, roi_size, overlap, sw_batch_size, mode):
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"image must be a tensor (C, D, H, W) or (C, H, W); got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    nd = image.ndim - 1
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


@torch.no_grad()
def predict_volume(model: Callable, image: torch.Tensor, roi_size, overlap: float = 0.5, sw_batch_size: int = 2,
                   mode: str = "gaussian", mirror: bool | Sequence[int] = False, device=None, amp=None,
                   return_probs: bool = False, stitch_device=None, progress=False, stats: dict | None = None,
                   sigma_scale: float = 0.125):
    """Segment one preprocessed scan by sliding windows, streaming slabs along ``D``.

    Args:
        model: network (or any callable) mapping ``(B, C, *roi)`` to logits ``(B, K, *roi)``; a list/tuple output
            (deep supervision) uses its first, full-resolution element. Put in ``eval()`` mode here.
        image: ``(C, D, H, W)`` (or ``(C, H, W)``) float tensor, any device (stays where it is; windows are copied
            to ``device`` one batch at a time).
        roi_size: window size per spatial axis (e.g. the training crop ``(64, 128, 128)``). Volumes smaller than
            the window are zero-padded symmetrically (as MONAI does) and the result cropped back.
        overlap: fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        mode: ``"gaussian"`` (nnU-Net / nnFormer weights, sigma = 0.125 × window) or ``"constant"``.
        mirror: test-time augmentation: ``True`` averages the softmax over all flips of all spatial axes
            (8 passes in 3D), or a sequence of spatial axes (0 = D) to flip.
        device: where the network runs (default: the model's parameters' device).
        amp: mixed precision, see :func:`resolve_amp` (default: bf16/fp16 on CUDA, off on CPU).
        return_probs: also return the blended softmax ``(K, D, H, W)`` float32 (this one *does* grow with ``D``).
        stitch_device: where the slab accumulator, labels (and probabilities) live (default ``device``);
            ``"cpu"`` keeps the GPU's memory to the network and one batch of windows.
        progress: ``True`` for a tqdm bar over windows, a string for a bar with that description, or a callable
            ``progress(done, total)``.
        stats: a dict to fill with memory accounting (see :class:`SlabStats`).

    Returns:
        labels ``(D, H, W)`` uint8 on ``stitch_device`` — or ``(labels, probs)`` with ``return_probs``.
    """
    nd, roi = _check_args(image, roi_size, overlap, sw_batch_size, mode)
    device = torch.device(device) if device is not None else _model_device(model)
    stitch = torch.device(stitch_device) if stitch_device is not None else device
    amp_dtype = resolve_amp(amp, device)
    if hasattr(model, "eval"):
        model.eval()

    # --- pad to at least one window (symmetric, zeros: exactly MONAI's padding) ------------------------------
    size0 = tuple(image.shape[1:])
    pad = []  # F.pad order: last axis first
    for k in range(nd - 1, -1, -1):
        diff = max(roi[k] - size0[k], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        image = F.pad(image, pad)
    size = tuple(image.shape[1:])
    crop = tuple(slice(pad[2 * (nd - 1 - k)], pad[2 * (nd - 1 - k)] + size0[k]) for k in range(nd))

    windows = window_grid(size, roi, overlap)
    weight = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device=stitch,
                                    dtype=torch.float32)[None]  # (1, *roi)
    flips = _mirror_axes(mirror, nd)

    labels = torch.empty(size, dtype=torch.uint8, device=stitch)
    probs = None
    slab = count = None  # allocated on the first output, once K is known
    base = 0  # plane of the padded volume held at slab[:, 0]
    depth = roi[0]

    def flush(upto: int):
        """Finalise planes [base, upto): normalise, argmax, (keep probs), drop them from the slab."""
        nonlocal base, slab, count
        n = upto - base
        if n <= 0:
            return
        for i in range(0, n, _PLANES_PER_STEP):  # a few planes at a time: no slab-sized temporary
            j = min(i + _PLANES_PER_STEP, n)
            p = slab[:, i:j] / count[:, i:j]
            labels[base + i:base + j] = torch.argmax(p, dim=0).to(torch.uint8)
            if probs is not None:
                probs[:, base + i:base + j] = p
            del p
        # shift the slab by n planes in place (plane by plane, front to back: sources lie ahead of their
        # destinations, so nothing is overwritten before it is read; no second slab is ever allocated)
        for i in range(depth - n):
            slab[:, i].copy_(slab[:, i + n])
            count[:, i].copy_(count[:, i + n])
        slab[:, depth - n:].zero_()
        count[:, depth - n:].zero_()
        base = upto

    bar = _make_progress(progress, len(windows))
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    done = 0
    for start in range(0, len(windows), sw_batch_size):
        batch_w = windows[start:start + sw_batch_size]
        x = torch.stack([image[(slice(None),) + w] for w in batch_w]).to(device=device, dtype=torch.float32)
        with autocast:
            out = _softmax_tta(model, x, flips)
        if tuple(out.shape[2:]) != roi or out.shape[0] != len(batch_w):
            raise ValueError(f"model output {tuple(out.shape)} does not match the window batch "
                             f"({len(batch_w)}, K, {', '.join(map(str, roi))})")
        out = out.to(device=stitch, dtype=torch.float32)
        out *= weight  # (B, K, *roi) * (1, *roi): same product as MONAI's `seg_prob *= w_t`
        if slab is None:
            k = out.shape[1]
            if k > 256:
                raise ValueError(f"{k} classes do not fit uint8 labels")
            slab = torch.zeros((k, depth) + size[1:], dtype=torch.float32, device=stitch)
            count = torch.zeros((1, depth) + size[1:], dtype=torch.float32, device=stitch)
            if return_probs:
                probs = torch.empty((k,) + size, dtype=torch.float32, device=stitch)
            if stats is not None:
                _fill_stats(stats, windows, size, slab, count, labels, probs, k)
        for w, o in zip(batch_w, out):
            flush(w[0].start)  # windows are sorted by D start: planes before it are final
            loc = (slice(None), slice(w[0].start - base, w[0].stop - base)) + tuple(w[1:])
            slab[loc] += o
            count[loc] += weight
        done += len(batch_w)
        if bar is not None:
            bar(done, len(windows))
    flush(size[0])
    if bar is not None:
        bar(None, None)

    labels = labels[crop]
    if return_probs:
        return labels, probs[(slice(None),) + crop]
    return labels


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


def _fill_stats(stats, windows, size, slab, count, labels, probs, k):
    nbytes = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
    stats.update({
        "windows": len(windows),
        "image_shape": tuple(size),
        "slab_shape": tuple(slab.shape),
        "slab_bytes": nbytes(slab) + nbytes(count),
        "labels_bytes": nbytes(labels),
        "probs_bytes": nbytes(probs),
        "full_volume_bytes": (k + 1) * int(torch.tensor(size).prod()) * 4,
    })

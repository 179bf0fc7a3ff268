"""N-D window attention (2D and 3D), written once: the number of spatial axes follows from ``window_size``.

Conventions (as in Swin / nnFormer / MONAI):

* feature maps inside the blocks are channels-last ``(B, *S, C)`` with ``S = (H, W)`` or ``(D, H, W)``;
* a map is padded at the end of every axis to a multiple of the window, optionally rolled by ``-shift``
  (shifted windows), then cut into ``N_r`` windows of ``N_p = prod(window)`` tokens, ordered batch-major:
  window tensor ``(B * N_r, N_p, C)``, windows of image ``b`` at rows ``b*N_r : (b+1)*N_r`` in raster order
  of the window grid;
* when the map is not larger than the window along an axis, the window is clipped to the map there and
  that axis is not shifted (:func:`effective_window`);
* optional *prefix* tokens (GLAM's global tokens) are prepended to every window: sequences of length
  ``P + N_p``. Relative position bias and the shifted-window mask apply to window<->window pairs only;
  prefix tokens see, and are seen by, every token of their window.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with the bias and the mask
folded into one float ``attn_mask``. Relative-position indices and shift masks are built once per
(window, table) / (padded shape, window, shift, device) and cached. Shifted maps attend per window class
(:func:`window_classes`: windows ordered so that those sharing a shift mask are contiguous), one SDPA call per
(image, class) with a small cached mask, so no ``(B * N_r, h, L, L)`` mask is ever built.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers
from .layers import chunked_inference, linear

__all__ = [
    "MASK_VALUE", "effective_window", "pad_to_multiple", "window_partition", "window_reverse",
    "relative_position_index", "shift_window_mask", "roll", "shifted_window_index", "partition_with_prefix",
    "key_padding",
    "WindowClasses", "window_classes", "WindowAttention",
]

#: additive value for masked (different-region) pairs in shifted windows (Swin / nnFormer use -100)
MASK_VALUE = -100.0


# ----------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------
def effective_window(spatial_shape: Sequence[int], window_size: Sequence[int],
                     shift_size: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Clip a window to the map: ``(S, ws, shift) -> (ws', shift')``.

    Along an axis where ``S[i] <= ws[i]`` the window becomes ``S[i]`` (one window covers the axis) and that
    axis is not shifted, as in Swin / nnFormer / MONAI.
    """
    if len(spatial_shape) != len(window_size) or len(shift_size) != len(window_size):
        raise ValueError(f"window_size={tuple(window_size)} does not match the {len(spatial_shape)} spatial "
                         f"axes of the input {tuple(spatial_shape)}")
    ws, sh = [], []
    for s, w, t in zip(spatial_shape, window_size, shift_size):
        if s <= w:
            ws.append(int(s))
            sh.append(0)
        else:
            ws.append(int(w))
            sh.append(int(t))
    return tuple(ws), tuple(sh)


def as_window_size(window_size, spatial_dims: int | None = None) -> Tuple[int, ...]:
    """Normalise a window-size argument: an int (needs ``spatial_dims``) or a 2/3-tuple of positive ints.
    Raises ``ValueError`` naming ``window_size`` / ``spatial_dims``."""
    if isinstance(window_size, int):
        if spatial_dims is None:
            raise ValueError("spatial_dims is required when window_size is an int")
        window_size = (window_size,) * spatial_dims
    window_size = tuple(int(w) for w in window_size)
    if spatial_dims is not None and spatial_dims != len(window_size):
        raise ValueError(f"spatial_dims={spatial_dims} does not match window_size={window_size}")
    if len(window_size) not in (2, 3):
        raise ValueError(f"window_size={window_size} must have 2 or 3 entries (2D or 3D)")
    if any(w < 1 for w in window_size):
        raise ValueError(f"window_size={window_size} entries must be >= 1")
    return window_size


def padded_shape(spatial_shape: Sequence[int], window_size: Sequence[int]) -> Tuple[int, ...]:
    """Smallest multiple of the window along each axis: ``S -> Sp``."""
    return tuple(int(math.ceil(s / w)) * w for s, w in zip(spatial_shape, window_size))


def pad_to_multiple(x: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """Zero-pad the end of every spatial axis of ``x (B, *S, C)`` to a multiple of the window: ``(B, *Sp, C)``."""
    S = x.shape[1:-1]
    pads = [(-s) % w for s, w in zip(S, window_size)]
    if not any(pads):
        return x
    spec = [0, 0]  # channel axis (last)
    for p in reversed(pads):
        spec += [0, p]
    return F.pad(x, spec)


def roll(x: torch.Tensor, shift: Sequence[int], sign: int = -1) -> torch.Tensor:
    """Cyclic shift of the spatial axes of ``x (B, *S, C)`` by ``sign * shift``; identity if no shift."""
    if not any(shift):
        return x
    dims = tuple(i + 1 for i, t in enumerate(shift) if t)
    shifts = tuple(sign * t for t in shift if t)
    return torch.roll(x, shifts=shifts, dims=dims)


def _window_grid_view(x: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """``x (B, *Sp, C)`` -> view ``(B, n0, n1, ..., w0, w1, ..., C)`` (window grid, then in-window position)."""
    B, *S, C = x.shape
    d = len(window_size)
    shape = [B]
    for s, w in zip(S, window_size):
        shape += [s // w, w]
    # (B, n0, w0, n1, w1, ..., C) -> (B, n0, n1, ..., w0, w1, ..., C)
    perm = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)] + [2 * d + 1]
    return x.view(*shape, C).permute(*perm)


def window_partition(x: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """``x (B, *Sp, C)`` with ``Sp`` a multiple of the window -> windows ``(B * N_r, N_p, C)``."""
    return _window_grid_view(x, window_size).reshape(-1, math.prod(window_size), x.shape[-1])


def window_reverse(windows: torch.Tensor, window_size: Sequence[int], spatial_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * N_r, N_p, C) -> (B, *Sp, C)`` for padded shape ``Sp``."""
    d = len(window_size)
    C = windows.shape[-1]
    grid = [s // w for s, w in zip(spatial_shape, window_size)]
    x = windows.view(-1, *grid, *window_size, C)
    # (B, n0, n1, ..., w0, w1, ..., C) -> (B, n0, w0, n1, w1, ..., C)
    perm = [0]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    perm.append(2 * d + 1)
    return x.permute(*perm).reshape(-1, *spatial_shape, C)


def _shape_cached(maxsize: int):
    """Decorator for the index/mask builders, pure functions of shapes (hashable arguments only):

    - results cached per arguments (``functools.lru_cache``);
    - built as plain tensors even when first called under ``torch.inference_mode`` (an inference tensor from the
      cache could not be used later in autograd);
    - under ``torch.compile`` the builder is traced into the graph instead (dynamo would trace through the
      cache anyway, with a warning): so builders use no data-dependent op and take their sizes from Python ints.
    """
    def deco(fn):
        @functools.lru_cache(maxsize=maxsize)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)
        return call
    return deco


@_shape_cached(128)
def relative_position_index(window_size: Tuple[int, ...], table_window: Tuple[int, ...] | None = None,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """Index ``(N_p, N_p)`` into a relative-position bias table of ``prod(2 * table_window - 1)`` rows.

    ``window_size`` is the (possibly clipped) window actually used; ``table_window`` the window the table was
    made for (default: the same). Row-major over the axes: ``sum_i (dx_i + tw_i - 1) * prod_{j>i} (2 tw_j - 1)``.
    Cached per (window, table window, device).
    """
    table_window = tuple(window_size) if table_window is None else tuple(table_window)
    if any(w > t for w, t in zip(window_size, table_window)):
        raise ValueError(f"window_size={window_size} exceeds the bias table's window {table_window}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window_size],
                                        indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (d, N_p, N_p), in [-(w-1), w-1]
    index = torch.zeros(rel.shape[1:], dtype=torch.long, device=device)
    for i, tw in enumerate(table_window):
        index = index * (2 * tw - 1) + rel[i] + tw - 1
    return index


def _grid_code(axis_labels: Sequence[torch.Tensor], base: int) -> torch.Tensor:
    """Combine one label vector per axis into an N-D grid of mixed-radix codes:
    ``out[i_0, ..., i_{d-1}] = sum_k axis_labels[k][i_k] * base ** (d - 1 - k)``, shape ``(len(l_0), ...)``."""
    d = len(axis_labels)
    code = torch.zeros((), dtype=axis_labels[0].dtype, device=axis_labels[0].device)
    for i, lab in enumerate(axis_labels):
        shape = [1] * d
        shape[i] = -1
        code = code * base + lab.view(shape)
    return code


@_shape_cached(128)
def _shift_window_mask(padded: Tuple[int, ...], window_size: Tuple[int, ...], shift: Tuple[int, ...],
                       device: torch.device) -> torch.Tensor:
    # label every voxel of the padded (rolled) map by the region it came from, as Swin does
    ax_labels = []
    for s, w, t in zip(padded, window_size, shift):
        lab = torch.zeros(s, device=device)
        if t:
            lab[s - w:s - t] = 1
            lab[s - t:] = 2
        ax_labels.append(lab)
    labels = _grid_code(ax_labels, 3)  # (*Sp)
    win = window_partition(labels[None, ..., None], window_size).squeeze(-1)  # (N_r, N_p)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill_(diff != 0, MASK_VALUE)


def shift_window_mask(padded: Sequence[int], window_size: Sequence[int], shift: Sequence[int],
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive shifted-window mask ``(N_r, N_p, N_p)``: 0 within a region, ``MASK_VALUE`` across regions.

    ``padded`` is the padded map shape (a multiple of the window). Cached per (shape, window, shift, device).
    """
    return _shift_window_mask(tuple(int(s) for s in padded), tuple(window_size), tuple(shift), torch.device(device))


class WindowClasses(NamedTuple):
    """Windows of a shifted map grouped by their shift mask (see :func:`window_classes`).

    ``perm (N_r,)``: raster index of the ``k``-th window in class order; ``inv (N_r,)``: its inverse;
    ``counts``: windows per class (classes are contiguous in that order); ``masks (n_cls, N_p, N_p)``: the
    additive shift mask shared by every window of a class; ``masked``: whether a class's mask is non-zero."""
    perm: torch.Tensor
    inv: torch.Tensor
    counts: Tuple[int, ...]
    masks: torch.Tensor
    masked: Tuple[bool, ...]

    def full_mask(self) -> torch.Tensor:
        """The per-window mask in class order ``(N_r, N_p, N_p)`` (= ``shift_window_mask(...)[perm]``)."""
        counts = torch.tensor(self.counts, device=self.masks.device)
        return self.masks.repeat_interleave(counts, dim=0)


@_shape_cached(128)
def _window_classes(padded: Tuple[int, ...], window_size: Tuple[int, ...], shift: Tuple[int, ...],
                    device: torch.device) -> WindowClasses:
    lasts, n_by_bit, cut = [], [], []  # per axis: bit "last window along a shifted axis", windows per bit
    for s, w, t in zip(padded, window_size, shift):
        last = torch.zeros(s // w, dtype=torch.long, device=device)
        if t:
            last[-1] = 1
        lasts.append(last)
        n_by_bit.append((s // w - 1, 1) if t else (s // w, 0))
        cut.append(0 < t < w)  # the last window holds two rolled regions along this axis
    code = _grid_code(lasts, 2).reshape(-1)  # (N_r,), raster order of the window grid
    perm = torch.argsort(code, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=device)
    # class sizes and masks from the shapes alone (no data-dependent op: torch.compile traces this function)
    counts, masked = [], []
    for bits in itertools.product((0, 1), repeat=len(padded)):  # code order, axis 0 most significant
        n = 1
        for nb, b in zip(n_by_bit, bits):
            n *= nb[b]
        if n:
            counts.append(n)
            masked.append(any(b and c for b, c in zip(bits, cut)))
    first = [sum(counts[:i]) for i in range(len(counts))]
    masks = _shift_window_mask(padded, window_size, shift, device)[perm[first]]
    return WindowClasses(perm, inv, tuple(counts), masks, tuple(masked))


def window_classes(padded: Sequence[int], window_size: Sequence[int], shift: Sequence[int],
                   device: torch.device | str = "cpu") -> WindowClasses:
    """Group the windows of a shifted map by shift mask: at most ``2^d`` classes.

    After the roll, a window mixes regions only where it is the last window along a shifted axis, so the
    windows of one class (the set of axes where they are last) share one ``(N_p, N_p)`` mask; most are interior
    (no mask). Attention then runs per class with one small cached ``(1, h, L, L)`` mask instead of a
    ``(N_r, h, L, L)`` one. Order: classes by code (interior first), raster order inside a class. Cached per
    (padded shape, window, shift, device).
    """
    return _window_classes(tuple(int(s) for s in padded), tuple(int(w) for w in window_size),
                           tuple(int(t) for t in shift), torch.device(device))


@_shape_cached(128)
def _shifted_window_index(padded: Tuple[int, ...], window_size: Tuple[int, ...], shift: Tuple[int, ...],
                          device: torch.device, by_class: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    n = math.prod(padded)
    flat = torch.arange(n, device=device).view(1, *padded, 1)
    idx = window_partition(roll(flat, shift, -1), window_size)  # (N_r, N_p)
    if by_class:
        idx = idx[_window_classes(padded, window_size, shift, device).perm]
    idx = idx.reshape(-1)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(n, device=device)
    return idx, inv


@_shape_cached(128)
def _prefixed_positions(padded: Tuple[int, ...], window_size: Tuple[int, ...], shift: Tuple[int, ...],
                        num_prefix: int, row: int, device: torch.device, by_class: bool = False) -> torch.Tensor:
    """Flat positions of the map's tokens in a ``(N_r, row, C)`` buffer of ``[prefix; window; padding]`` rows."""
    n_p = math.prod(window_size)
    _, inv = _shifted_window_index(padded, window_size, shift, device, by_class)
    return (inv // n_p) * row + num_prefix + inv % n_p


def key_padding(num_prefix: int, n_p: int, multiple: int) -> int:
    """Rows to append to ``[prefix; window]`` sequences so their length is a multiple of ``multiple``, or 0
    when that would add more than an eighth (or ``multiple`` is 0, or there is no prefix).

    SDPA's CPU flash kernel runs markedly slower on key lengths that are not a multiple of the vector width
    (AVX-512: 16 floats): 512 windows x 6 heads, head dim 32, on an AVX-512/AMX CPU: 74 keys 35 ms, 80 keys (6 of them
    masked) 27 ms; bf16 36 -> 22 ms. GLAM's ``N_g + N_p`` (10 + 64, 10 + 49, 10 + 512) is such a length."""
    L = num_prefix + n_p
    pad = -L % multiple if multiple and num_prefix else 0
    return pad if pad * 8 <= L else 0


def partition_with_prefix(x: torch.Tensor, window_size: Sequence[int], shift: Sequence[int],
                          prefix: torch.Tensor, by_class: bool = False, pad: int = 0) -> torch.Tensor:
    """``[prefix; windows(roll(x)); zeros]`` written into one buffer (no ``cat`` of a partitioned copy).

    ``x (B, *Sp, C)`` with ``Sp`` a multiple of the window, ``prefix (B * N_r, P, C)`` ->
    ``(B * N_r, P + N_p + pad, C)``; without ``pad`` equals
    ``torch.cat([prefix, window_partition(roll(x, shift, -1), ws)], 1)``, the ``pad`` last rows are zeros
    (key padding, see :func:`key_padding`).
    Unshifted: one permuted copy into the buffer; shifted: one scatter (``index_copy_`` with a cached index).
    ``by_class`` (shifted only): the windows of each image in :func:`window_classes` order (``prefix`` given in
    that order too).
    """
    B, *Sp, C = x.shape
    ws = tuple(int(w) for w in window_size)
    n_p, P = math.prod(ws), prefix.shape[1]
    grid = [s // w for s, w in zip(Sp, ws)]
    row = P + n_p + pad
    z = x.new_empty(B * math.prod(grid), row, C)
    z[:, :P] = prefix
    if pad:
        z[:, P + n_p:].zero_()
    if not any(shift):
        z[:, P:P + n_p].view(B, *grid, *ws, C).copy_(_window_grid_view(x, ws))
        return z
    pos = _prefixed_positions(tuple(int(s) for s in Sp), ws, tuple(int(t) for t in shift), P, row, x.device,
                              by_class)
    if B > 1:
        step = z.shape[0] // B * row
        pos = (pos.unsqueeze(0) + torch.arange(B, device=x.device).unsqueeze(1) * step).reshape(-1)
    z.view(-1, C).index_copy_(0, pos, x.reshape(-1, C))
    return z


def shifted_window_index(padded: Sequence[int], window_size: Sequence[int], shift: Sequence[int],
                         device: torch.device | str = "cpu", by_class: bool = False
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Roll + partition as one gather: ``(idx, inv)``, two ``(prod(Sp),)`` index vectors.

    For ``x (B, *Sp, C)``: ``x.reshape(B, -1, C).index_select(1, idx)`` equals
    ``window_partition(roll(x, shift, -1), ws)`` (viewed as ``(B, N_r * N_p, C)``), and ``inv`` undoes it:
    ``w.reshape(B, -1, C).index_select(1, inv)`` equals ``roll(window_reverse(w, ws, Sp), shift, +1)``. One copy
    instead of one per rolled axis plus one for the permutation. ``by_class``: the windows of each image in
    :func:`window_classes` order instead of raster order. Cached per (shape, window, shift, device, order).
    """
    return _shifted_window_index(tuple(int(s) for s in padded), tuple(int(w) for w in window_size),
                                 tuple(int(t) for t in shift), torch.device(device), bool(by_class))


# ----------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head attention inside windows, with relative position bias, for 2D and 3D windows.

    Self-attention (default): ``q, k, v = qkv(x)``.
    Cross-attention (``cross=True``, nnFormer's decoder "skip attention"): keys and values ``kv(context)``
    from another tensor with the same window layout; queries are ``x`` itself (nnFormer does not project
    them) unless ``q_proj=True``.

    Args:
        dim: channels ``C``.
        num_heads: heads ``h``; must divide ``dim``.
        window_size: nominal window (tuple, one entry per spatial axis): sizes the bias table
            ``(prod(2 ws - 1), h)``; a smaller (clipped) window indexes into the same table.

    Shapes: ``x (B_, P + N_p [+ pad], C)``, ``context`` the same, ``mask (N_r, N_p, N_p)`` with
    ``B_ = B * N_r`` -> ``(B_, P + N_p, C)``. ``pad`` trailing rows (``num_pad``, see :func:`key_padding`) are
    keys masked out of every query: they change no output.

    Setting ``store_attn = True`` takes a slow, explicit path that keeps the softmax weights
    ``(B_, h, L, L)`` in ``last_attn`` (used by :mod:`glam3d.models.attention_map`); otherwise SDPA.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 cross: bool = False, q_proj: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = tuple(int(w) for w in window_size)
        self.cross = cross
        self.scale = (dim // num_heads) ** -0.5
        n_rel = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias) if q_proj else None
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.store_attn = False
        self.last_attn: Optional[torch.Tensor] = None

    def relative_position_bias(self, window_size: Sequence[int] | None = None) -> torch.Tensor:
        """Bias ``(h, N_p, N_p)`` for the (possibly clipped) window actually used."""
        ws = self.window_size if window_size is None else tuple(window_size)
        idx = relative_position_index(ws, self.window_size, self.relative_position_bias_table.device)
        n = idx.shape[0]
        return self.relative_position_bias_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)

    #: without autograd, masks up to this size (bytes) are cached per module (larger ones: only the bias)
    MASK_CACHE_BYTES = 32 * 2 ** 20

    def attn_mask(self, batch_windows: int, window_size: Sequence[int], mask: Optional[torch.Tensor],
                  num_prefix: int, dtype: torch.dtype, prefix_queries: bool = True, num_pad: int = 0
                  ) -> torch.Tensor:
        """Float additive mask ``(1 | B_, h, P + N_p, P + N_p + pad)``: bias (+ shift mask) on the window block,
        ``-inf`` on the ``num_pad`` padding keys; ``(1 | B_, h, N_p, P + N_p + pad)`` when
        ``prefix_queries=False`` (only the window tokens ask).

        Without autograd (inference) the bias, and the whole mask when small, are cached per (window, shift
        mask, prefix, dtype) and rebuilt when the bias table changes (its version counter / storage).
        """
        table = self.relative_position_bias_table
        if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_compiling():
            # traced by torch.compile: built in the graph (a Python-side cache keyed on storage would break it)
            return self._build_attn_mask(batch_windows, window_size, mask, num_prefix, dtype, None, prefix_queries,
                                         num_pad)
        cache = self.__dict__.setdefault("_mask_cache", {})
        stamp = (table._version, table.data_ptr(), table.device, table.dtype)
        if cache.get("stamp") != stamp:
            cache.clear()
            cache["stamp"] = stamp
        ws = tuple(window_size)
        key = (batch_windows if mask is not None else 0, ws,
               None if mask is None else (mask.data_ptr(), tuple(mask.shape)), num_prefix, dtype, prefix_queries,
               num_pad)
        hit = cache.get(key)
        if hit is not None:
            return hit
        bkey = ("bias", ws)
        if bkey not in cache:
            cache[bkey] = self.relative_position_bias(ws).detach().contiguous()
        m = self._build_attn_mask(batch_windows, ws, mask, num_prefix, dtype, cache[bkey], prefix_queries, num_pad)
        if m.numel() * m.element_size() <= self.MASK_CACHE_BYTES:
            if len(cache) > 64:
                cache.clear()
                cache["stamp"] = stamp
            cache[key] = m
        return m

    def _build_attn_mask(self, batch_windows, window_size, mask, num_prefix, dtype, bias,
                         prefix_queries: bool = True, num_pad: int = 0) -> torch.Tensor:
        if bias is None:
            # contiguous: SDPA would otherwise copy the permuted gather (and adds would keep its layout)
            bias = self.relative_position_bias(window_size).contiguous()  # (h, N_p, N_p)
        n_r = 1 if mask is None else mask.shape[0]
        if mask is not None and batch_windows % n_r:
            raise ValueError(f"{batch_windows} windows is not a multiple of the mask's {n_r}")
        h, n_p = bias.shape[0], bias.shape[-1]
        if num_prefix:  # zeros for the prefix rows / columns, bias (+ mask) written straight into the window block
            lq = n_p + (num_prefix if prefix_queries else 0)
            m = bias.new_zeros(n_r, h, lq, n_p + num_prefix + num_pad)
            if num_pad:
                m[..., n_p + num_prefix:] = float("-inf")
            block = m[:, :, lq - n_p:, num_prefix:num_prefix + n_p]
            if mask is None:
                block.copy_(bias.unsqueeze(0).expand_as(block))
            else:
                block.copy_(bias.unsqueeze(0).expand_as(block)).add_(mask.unsqueeze(1).to(bias.dtype))
        elif mask is None:
            m = bias.unsqueeze(0)
        else:
            m = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (N_r, h, N_p, N_p)
        if mask is not None and batch_windows != n_r:
            m = m.unsqueeze(0).expand(batch_windows // n_r, *m.shape).reshape(batch_windows, *m.shape[1:])
        return m.to(dtype)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                window_size: Sequence[int] | None = None, mask: Optional[torch.Tensor] = None,
                num_prefix: int = 0, prefix_queries: bool = True,
                classes: Optional[WindowClasses] = None, num_pad: int = 0) -> torch.Tensor:
        """``x (B_, P + N_p + num_pad, C)`` -> ``(B_, P + N_p, C)``; ``(B_, N_p, C)`` with
        ``prefix_queries=False``: the prefix tokens are keys and values only (their own outputs are not computed
        — for a block whose global-token outputs nobody reads). The ``num_pad`` last rows are keys only, masked
        out (:func:`key_padding`; a prefix is required).

        ``classes`` (instead of ``mask``): the windows of each image come in :func:`window_classes` order;
        attention runs once per (image, class) with that class's small cached mask — no ``(B_, h, L, L)``
        mask is built (equal to ``mask=classes.full_mask()``).

        CPU inference (:func:`~glam3d.models.layers.chunked_inference`) takes the windows in groups of at most
        :data:`~glam3d.models.layers.CHUNK_TOKENS` tokens (projection, attention and output projection per
        group, written into one output), so the ``(B_, L, 3C)`` QKV of the whole map never exists."""
        B_, L, C = x.shape
        if self.cross and context is None:
            raise ValueError("context is required for cross-attention")
        ws = self.window_size if window_size is None else tuple(window_size)
        if math.prod(ws) + num_prefix + num_pad != L:
            raise ValueError(f"sequence length {L} != num_prefix {num_prefix} + window tokens {math.prod(ws)}"
                             + (f" + padding {num_pad}" if num_pad else ""))
        if num_pad and (not num_prefix or self.store_attn):
            raise ValueError("key padding needs a prefix and is not taken while attention weights are recorded")
        drop = self.attn_drop if self.training else 0.0
        if classes is not None and self.store_attn:
            mask, classes = classes.full_mask(), None
        if mask is None and not self.store_attn and chunked_inference(x):
            return self.proj_drop(self._forward_chunked(x, context, ws, num_prefix, prefix_queries, classes, drop,
                                                        num_pad))
        q, k, v = self._project(x, context, num_prefix, prefix_queries, num_pad)
        Lq = q.shape[2]
        if classes is not None:
            out = torch.cat([F.scaled_dot_product_attention(q[s:e], k[s:e], v[s:e], attn_mask=m, dropout_p=drop)
                             .transpose(1, 2) for s, e, m in self._window_groups(B_, ws, num_prefix,
                                                                                  prefix_queries, classes, q.dtype,
                                                                                  num_pad)])
            return self.proj_drop(linear(out.view(B_, Lq, C), self.proj))
        attn_mask = self.attn_mask(B_, ws, mask, num_prefix, q.dtype, prefix_queries, num_pad)
        if self.store_attn:
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1) + attn_mask, dim=-1)
            self.last_attn = attn.detach()
            out = F.dropout(attn, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B_, Lq, C)
        return self.proj_drop(linear(out, self.proj))

    def _project(self, x: torch.Tensor, context: Optional[torch.Tensor], num_prefix: int, prefix_queries: bool,
                 num_pad: int = 0):
        """Windows ``x (n, L, C)`` [, ``context (n, L, C)``] -> ``q (n, h, Lq, E)``, ``k, v (n, h, L, E)``
        (views; ``Lq = L - num_pad``, ``- P`` more without prefix queries)."""
        n, L, C = x.shape
        h = self.num_heads
        E = C // h
        if self.cross:
            q = x if self.q is None else linear(x, self.q)
            q = q.view(n, L, h, E).transpose(1, 2)
            kv = linear(context, self.kv).view(n, context.shape[1], 2, h, E).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
        else:
            qkv = linear(x, self.qkv).view(n, L, 3, h, E).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        first, stop = self._query_rows(L, num_prefix, prefix_queries, num_pad)
        if (first, stop) != (0, L):
            q = q[:, :, first:stop]
        return q, k, v

    @staticmethod
    def _query_rows(L: int, num_prefix: int, prefix_queries: bool, num_pad: int) -> Tuple[int, int]:
        """The rows of a ``[prefix; window; padding]`` sequence of length ``L`` that ask: ``(first, stop)`` —
        without the ``num_pad`` padding keys, and without the prefix when ``prefix_queries`` is False."""
        return (0 if prefix_queries else num_prefix), L - num_pad

    def _window_groups(self, B_: int, ws, num_prefix: int, prefix_queries: bool,
                       classes: Optional[WindowClasses], dtype: torch.dtype, num_pad: int = 0):
        """``[(start, stop, attn_mask)]``: ranges of windows sharing one ``(1, h, Lq, L)`` mask — each
        (image, class) with ``classes`` (contiguous row ranges: SDPA reads views, no gather), else all."""
        if classes is None:
            return [(0, B_, self.attn_mask(B_, ws, None, num_prefix, dtype, prefix_queries, num_pad))]
        n_r = sum(classes.counts)
        if B_ % n_r:
            raise ValueError(f"{B_} windows is not a multiple of the {n_r} windows of the classes")
        masks = [self.attn_mask(1, ws, classes.masks[c:c + 1] if masked else None, num_prefix, dtype,
                                prefix_queries, num_pad) for c, masked in enumerate(classes.masked)]
        groups, start = [], 0
        for _ in range(B_ // n_r):
            for n, m in zip(classes.counts, masks):
                groups.append((start, start + n, m))
                start += n
        return groups

    def _forward_chunked(self, x, context, ws, num_prefix: int, prefix_queries: bool,
                         classes: Optional[WindowClasses], drop: float, num_pad: int = 0) -> torch.Tensor:
        """:meth:`forward` without autograd on CPU, :data:`~glam3d.models.layers.CHUNK_TOKENS` tokens of windows
        at a time."""
        B_, L, C = x.shape
        first, stop = self._query_rows(L, num_prefix, prefix_queries, num_pad)
        Lq = stop - first  # (the output is allocated before the first chunk's projection)
        out = x.new_empty(B_, Lq, C)
        step = max(1, layers.CHUNK_TOKENS // L)
        for s, e, m in self._window_groups(B_, ws, num_prefix, prefix_queries, classes, x.dtype, num_pad):
            for a in range(s, e, step):
                b = min(e, a + step)
                q, k, v = self._project(x[a:b], None if context is None else context[a:b], num_prefix,
                                        prefix_queries, num_pad)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=drop)
                out[a:b] = linear(o.transpose(1, 2).reshape(b - a, Lq, C), self.proj)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, cross={self.cross}"

"""Effective global attention maps of a GLAM layer (paper eq. 7; figures 1, 5, 6).

Definition (what :func:`map_from_recorded` returns). For one block of a :class:`~glam3d.models.glam.GLAMLayer`,
one image, and a query token ``q`` at spatial position ``p`` lying (in that block's, possibly shifted, window
frame) in window ``r``:

* ``A_r'`` = the block's W-MSA softmax weights in window ``r'``, averaged over heads,
  ``(N_g + N_p) x (N_g + N_p)``, global tokens first; ``a_{j,r',i+N_g} = A_r'[j, N_g + i]``;
* ``B`` = the same block's G-MSA softmax weights, averaged over heads, ``(N_r N_g) x (N_r N_g)``;
  ``b_{k,r,j,r'} = B[r N_g + k, r' N_g + j]``;
* first term of eq. 7, the map of global token ``k`` of window ``r`` over all window tokens ``(r', i)``:
  ``G_k[r', i] = sum_j b_{k,r,j,r'} a_{j,r',i+N_g}``;
* the query's map weights the global tokens of its window by the query's own attention to them in the same
  W-MSA, ``alpha_k = A_r[N_g + t, k]`` (``t`` = the query's index in its window), or uniformly
  (``weighting="uniform"``, ``alpha_k = 1 / N_g``):
  ``M(p)[(r', i)] = sum_k alpha_k G_k[r', i]``.

The map is placed back on the feature map (un-shifted, padding cropped): a tensor ``(*S)``. Its total is
``sum_k alpha_k sum_{r', j} b_{k,r,j,r'} (1 - sum_{i <= N_g} a_{j,r',i})``, at most ``sum_k alpha_k``; with
``normalize=True`` it is divided by its total (sums to 1). The second term of eq. 7 (window-level, through the
previous global tokens) is left out.

The fast path of the layers stays SDPA; recording switches the chosen block to an explicit softmax path that
keeps the weights (:func:`recording`), during a real forward pass of the layer or of a whole network.

Usage::

    m = global_attention_map(layer, x, query=(5, 20, 31))             # (D, H, W) of the layer's map
    with recording(model.encoder.stages[0]):                          # inside a full network
        model(image)
    m = map_from_recorded(model.encoder.stages[0], query=(5, 20, 31))
    over_ct = upsample_map(m, image.shape[2:])                         # to draw over the CT
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .glam import GLAMLayer
from .window import window_reverse

__all__ = ["recording", "map_from_recorded", "global_attention_map", "upsample_map"]


def _check_layer(layer: GLAMLayer, block: int) -> int:
    if not isinstance(layer, GLAMLayer):
        raise ValueError(f"layer must be a GLAMLayer, got {type(layer).__name__}")
    if not layer.num_global_tokens or layer.gmsa is None:
        raise ValueError("layer has no G-MSA (num_global_tokens=0 or gmsa=False): no global attention map")
    n = len(layer.gmsa)  # == depth, or depth - 1 with last_gmsa=False
    if not -n <= block < n:
        raise ValueError(f"block={block} out of range: the layer has G-MSA after blocks 0..{n - 1}")
    return block % n


@contextlib.contextmanager
def recording(layer: GLAMLayer, block: int = -1):
    """Within the context, forward passes of ``layer`` keep block ``block``'s W-MSA and G-MSA weights."""
    block = _check_layer(layer, block)
    blk, gblk = layer.blocks[block], layer.gmsa[block]
    blk.attn.store_attn = gblk.attn.store_attn = blk.record_geometry = True
    try:
        yield layer
    finally:
        blk.attn.store_attn = gblk.attn.store_attn = blk.record_geometry = False


def map_from_recorded(layer: GLAMLayer, query: Sequence[int], block: int = -1, image: int = 0,
                      weighting: str = "query", normalize: bool = False) -> torch.Tensor:
    """The eq. 7 map ``(*S)`` of the query at spatial position ``query`` from the last recorded forward pass."""
    block = _check_layer(layer, block)
    blk, gblk = layer.blocks[block], layer.gmsa[block]
    geo, A_all, B_all = blk.last_geometry, blk.attn.last_attn, gblk.attn.last_attn
    if geo is None or A_all is None or B_all is None:
        raise ValueError("nothing recorded: run the layer inside `with recording(layer, block):` first")
    if weighting not in ("query", "uniform"):
        raise ValueError(f"weighting={weighting!r} must be 'query' or 'uniform'")
    S, ws, sh, Sp, grid = geo["spatial_shape"], geo["window_size"], geo["shift"], geo["padded"], geo["grid"]
    query = tuple(int(v) for v in query)
    if len(query) != len(S) or any(not 0 <= v < s for v, s in zip(query, S)):
        raise ValueError(f"query={query} is not a position of the {tuple(S)} feature map")
    n_r, n_g, n_p = math.prod(grid), layer.num_global_tokens, math.prod(ws)
    if not 0 <= image < B_all.shape[0]:
        raise ValueError(f"image={image} out of range for batch {B_all.shape[0]}")
    A = A_all[image * n_r:(image + 1) * n_r].float().mean(1)    # (N_r, L, L)
    Bm = B_all[image].float().mean(0).view(n_r, n_g, n_r, n_g)  # [r, k, r', j]
    # the query in the block's (rolled, padded) frame
    ps = [(v - t) % sp for v, t, sp in zip(query, sh, Sp)]
    r = t = 0
    for v, w, n in zip(ps, ws, grid):
        r = r * n + v // w
        t = t * w + v % w
    alpha = A[r, n_g + t, :n_g] if weighting == "query" else A.new_full((n_g,), 1.0 / n_g)
    G = torch.einsum("krj,rji->kri", Bm[r], A[:, :n_g, n_g:])  # (N_g, N_r, N_p)
    m = torch.einsum("k,kri->ri", alpha, G)                     # (N_r, N_p)
    m = window_reverse(m.unsqueeze(-1), ws, Sp)[0, ..., 0]     # (*Sp), rolled frame
    if any(sh):
        m = torch.roll(m, shifts=tuple(sh), dims=tuple(range(len(sh))))
    m = m[tuple(slice(0, s) for s in S)]
    if normalize:
        m = m / m.sum().clamp_min(1e-12)
    return m


@torch.no_grad()
def global_attention_map(layer: GLAMLayer, x: torch.Tensor, query: Sequence[int], block: int = -1,
                         image: int = 0, context: torch.Tensor | None = None, weighting: str = "query",
                         normalize: bool = False) -> torch.Tensor:
    """Run ``layer(x)`` (``x (B, C, *S)``) and return the eq. 7 map ``(*S)`` of ``query`` (a position in ``S``)."""
    with recording(layer, block):
        layer(x, context)
    return map_from_recorded(layer, query, block, image, weighting, normalize)


def upsample_map(m: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a map ``(*S)`` to an image grid ``size`` (nearest neighbour, for overlays): ``(*size)``."""
    return F.interpolate(m[None, None].float(), size=tuple(size), mode="nearest")[0, 0]

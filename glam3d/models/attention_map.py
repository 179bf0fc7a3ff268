"""Effective global attention maps of a GLAM layer (paper eq. 7; figures 1, 5, 6).

A visual token reads the global tokens of its window in a block's W-MSA; those tokens came out of a G-MSA,
which read the global tokens the previous block's W-MSA wrote, which read every token of their windows. Eq. 7
unrolls that path. For one *hop* of a :class:`~glam3d.models.glam.GLAMLayer` (:meth:`GLAMLayer.hops`: block
``l``'s W-MSA, the G-MSA after it, block ``l + 1``'s W-MSA), one image, all weights averaged over heads:

* ``a_{j,r',i}`` = block ``l``'s W-MSA softmax weight of global token ``j`` of window ``r'`` on token ``i`` of
  the sequence ``[g; w]`` of that window (``i <= N_g``: a global token, ``i = N_g + t``: window token ``t``);
* ``b_{k,r,j,r'}`` = the G-MSA softmax weight of global token ``k`` of window ``r`` on global token ``j`` of
  window ``r'``;
* eq. 7, the map of global token ``k`` of window ``r``:

  - patch-level term over the window tokens ``(r', t)``: ``P_k[r', t] = sum_j b_{k,r,j,r'} a_{j,r',N_g+t}``;
  - window-level term, one value per window ``r'`` (given to each of its tokens):
    ``W_k[r'] = sum_j b_{k,r,j,r'} sum_{i <= N_g} a_{j,r',i}``;
  - ``[G_k]_{r',t} = P_k[r', t] + W_k[r']`` (``term="sum"``, the paper's ``G_k``);

* the query's map: a query token at map position ``p`` lies (in block ``l + 1``'s, possibly shifted, window
  frame) in window ``r`` at index ``t_q``; it reads global token ``k`` of that window with block ``l + 1``'s W-MSA
  weight ``alpha_k = A^{l+1}_r[N_g + t_q, k]`` (``weighting="query"``) or ``1 / N_g`` (``"uniform"``):
  ``M(p) = sum_k alpha_k G_k`` (with ``r`` the query's window).

The map is placed back on the feature map (block ``l``'s windows, un-shifted, padding cropped): ``(*S)``. With
``normalize=True`` it is divided by its total (sums to 1).

The layers keep SDPA on their fast path; recording switches the hop's two blocks and its G-MSA to an explicit
softmax that keeps the weights (:func:`recording`), during a real forward pass of the layer or of a network.

Usage::

    m = global_attention_map(layer, x, query=(5, 20, 31))             # (D, H, W), the last hop, both terms
    with recording(model.stages[0]):                                  # inside a full network
        model(image)
    m = map_from_recorded(model.stages[0], query=(5, 20, 31), term="patch")
    over_ct = upsample_map(m, image.shape[2:])                         # to draw over the CT
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .glam import GLAMLayer
from .window import window_reverse

__all__ = ["TERMS", "recording", "map_from_recorded", "global_attention_map", "upsample_map"]

#: the eq. 7 terms a map can show
TERMS = ("patch", "window", "sum")


def _hop(layer: GLAMLayer, block: int) -> Tuple[int, int, int]:
    """``(block l, gmsa index, block l + 1)`` of hop ``block`` (negative: from the end); ValueError otherwise."""
    if not isinstance(layer, GLAMLayer):
        raise ValueError(f"layer must be a GLAMLayer, got {type(layer).__name__}")
    hops = layer.hops()
    if not hops:
        raise ValueError("layer has no G-MSA between two blocks (num_global_tokens=0, gmsa=False or depth 1): "
                         "no global attention map")
    n = len(hops)
    if not -n <= block < n:
        raise ValueError(f"block={block} out of range: the layer's G-MSA paths start at blocks 0..{n - 1}")
    return hops[block % n]


@contextlib.contextmanager
def recording(layer: GLAMLayer, block: int = -1):
    """Within the context, forward passes of ``layer`` keep the weights of hop ``block``: the W-MSA of blocks
    ``block`` and ``block + 1`` and the G-MSA between them."""
    b0, gi, b1 = _hop(layer, block)
    mods = [layer.blocks[b0].attn, layer.blocks[b1].attn, layer.gmsa[gi].attn]
    for m in mods:
        m.store_attn = True
    layer.blocks[b0].record_geometry = layer.blocks[b1].record_geometry = True
    try:
        yield layer
    finally:
        for m in mods:
            m.store_attn = False
        layer.blocks[b0].record_geometry = layer.blocks[b1].record_geometry = False


def _locate(position: Sequence[int], geo: dict) -> Tuple[int, int]:
    """Window index and in-window index of a map position in a block's (rolled, padded) window frame."""
    r = t = 0
    for v, s, w, n, sp in zip(position, geo["shift"], geo["window_size"], geo["grid"], geo["padded"]):
        v = (v - s) % sp
        r = r * n + v // w
        t = t * w + v % w
    return r, t


def map_from_recorded(layer: GLAMLayer, query: Sequence[int], block: int = -1, image: int = 0,
                      weighting: str = "query", term: str = "sum", normalize: bool = False) -> torch.Tensor:
    """The eq. 7 map ``(*S)`` of the query at spatial position ``query`` from the last recorded forward pass
    (``term``: ``"patch"``, ``"window"`` or ``"sum"``; hop ``block``)."""
    b0, gi, b1 = _hop(layer, block)
    if weighting not in ("query", "uniform"):
        raise ValueError(f"weighting={weighting!r} must be 'query' or 'uniform'")
    if term not in TERMS:
        raise ValueError(f"term={term!r} must be one of {TERMS}")
    blk0, blk1 = layer.blocks[b0], layer.blocks[b1]
    geo0, geo1 = blk0.last_geometry, blk1.last_geometry
    A0, A1, Bw = blk0.attn.last_attn, blk1.attn.last_attn, layer.gmsa[gi].attn.last_attn
    if geo0 is None or geo1 is None or A0 is None or A1 is None or Bw is None:
        raise ValueError("nothing recorded: run the layer inside `with recording(layer, block):` first")
    S, ws, sh, Sp, grid = geo0["spatial_shape"], geo0["window_size"], geo0["shift"], geo0["padded"], geo0["grid"]
    query = tuple(int(v) for v in query)
    if len(query) != len(S) or any(not 0 <= v < s for v, s in zip(query, S)):
        raise ValueError(f"query={query} is not a position of the {tuple(S)} feature map")
    n_r, n_g = math.prod(grid), layer.num_global_tokens
    if not 0 <= image < Bw.shape[0]:
        raise ValueError(f"image={image} out of range for batch {Bw.shape[0]}")
    dt = torch.promote_types(A0.dtype, torch.float32)           # (half precision weights summed in float32)
    A = A0[image * n_r:(image + 1) * n_r].to(dt).mean(1)       # (N_r, N_g + N_p, N_g + N_p), block l
    Bm = Bw[image].to(dt).mean(0).view(n_r, n_g, n_r, n_g)     # [r, k, r', j]
    r, t = _locate(query, geo1)                                # the query in block l+1's frame
    if weighting == "query":
        alpha = A1[image * n_r + r].to(dt).mean(0)[n_g + t, :n_g]
    else:
        alpha = A.new_full((n_g,), 1.0 / n_g)
    w = torch.einsum("k,krj->rj", alpha, Bm[r])                # weight of global token j of window r'
    m = A.new_zeros(n_r, A.shape[-1] - n_g)
    if term in ("patch", "sum"):
        m = m + torch.einsum("rj,rji->ri", w, A[:, :n_g, n_g:])
    if term in ("window", "sum"):
        m = m + (w * A[:, :n_g, :n_g].sum(-1)).sum(-1, keepdim=True)
    m = window_reverse(m.unsqueeze(-1), ws, Sp)[0, ..., 0]     # (*Sp), rolled frame of block l
    if any(sh):
        m = torch.roll(m, shifts=tuple(sh), dims=tuple(range(len(sh))))
    m = m[tuple(slice(0, s) for s in S)]
    if normalize:
        m = m / m.sum().clamp_min(1e-12)
    return m


@torch.no_grad()
def global_attention_map(layer: GLAMLayer, x: torch.Tensor, query: Sequence[int], block: int = -1,
                         image: int = 0, context: torch.Tensor | None = None, weighting: str = "query",
                         term: str = "sum", normalize: bool = False) -> torch.Tensor:
    """Run ``layer(x)`` (``x (B, C, *S)``) and return the eq. 7 map ``(*S)`` of ``query`` (a position in ``S``)."""
    with recording(layer, block):
        layer(x, context)
    return map_from_recorded(layer, query, block, image, weighting, term, normalize)


def upsample_map(m: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a map ``(*S)`` to an image grid ``size`` (nearest neighbour, for overlays): ``(*size)``."""
    return F.interpolate(m[None, None].float(), size=tuple(size), mode="nearest")[0, 0]

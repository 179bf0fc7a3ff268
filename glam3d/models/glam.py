"""GLAM: global tokens in window transformers (Themyr et al., WACV 2023), for 2D and 3D maps.

A GLAM layer (one resolution level) works on a map ``x (B, *S, C)`` cut into ``N_r`` windows of ``N_p`` tokens
and on per-window global tokens ``g (B, N_r, N_g, C)``, which start from one learned ``(N_g, C)`` parameter
broadcast to every window. It chains ``depth`` window blocks (plain and shifted windows alternating; window
``k`` of a shifted block keeps global tokens ``k``) and G-MSA steps:

* **W-MSA** (:class:`WindowBlock`, paper eqs. 2-4): a window transformer layer on ``z = [g; w]
  (B * N_r, N_g + N_p, C)`` (relative position bias / shift mask on window<->window pairs only), split back
  into the window tokens (reversed onto the map) and the window's global tokens ``g_hat``;
* **G-MSA** (eq. 5): attention among all ``N_r * N_g`` global tokens of one image (never across the batch)
  -> ``g'`` for the next block. A learned position (:meth:`GLAMLayer.global_position`) is added to its
  attention input only, never accumulated into ``g``: without it G-MSA cannot tell windows apart.

Two variants (``glam_variant``):

* ``"paper"`` - the plain reading of eq. 2: G-MSA is a full pre-LN transformer layer (:class:`GlobalBlock`,
  about ``12 C^2`` parameters), after each block's W-MSA; ``g`` enters W-MSA through the block's LayerNorm and
  leaves it with the block's residual and MLP. The position table is spatial ``(N_g, C, *grid)``.
* ``"authors"`` - the block of the authors' code (themyrl/glam 2D, themyrl/medseg 3D): G-MSA is bare multi-head
  attention (:class:`GlobalAttention`, ``4 C^2``) whose output replaces ``g``; ``g`` enters W-MSA without
  LayerNorm and leaves it as the attention output alone (2D) or with the block's residual and MLP (3D). The
  position table is the authors' per-sequence table ``(rows, C)``.

Where the G-MSA steps sit: every G-MSA output must be read by a later W-MSA, else its weights are dead. The
paper variant runs G-MSA between consecutive blocks (``depth - 1`` of them: W G W ... G W); the authors variant
runs one before every block (``depth``: G W G W ...), which is the authors' count of G-MSA per stage (their
code runs it after every block and drops the last one's output) with none of them dead. ``last_gmsa=True`` adds
one after the last block, whose output only :meth:`GLAMLayer.forward_tokens` callers asking for the global tokens
read. With ``num_global_tokens=0`` a layer *is* a Swin / nnFormer window stage: no extra parameters, identical
computation.

Usage::

    layer = GLAMLayer(dim=96, depth=2, num_heads=3, window_size=(4, 4, 4), num_global_tokens=10,
                      input_resolution=(16, 32, 32))
    y = layer(torch.randn(2, 96, 16, 32, 32))           # (2, 96, 16, 32, 32)
    y, g = layer(x, return_global=True)                  # g: (2, N_r * 10, 96)
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DropPath, Mlp, add_mlp_, chunked_inference, init_weights_trunc_normal, linear, to_ntuple
from .window import (WindowAttention, as_window_size, effective_window, pad_to_multiple, padded_shape,
                     key_padding, partition_with_prefix, shift_window_mask, shifted_window_index, window_classes,
                     window_partition, window_reverse)

__all__ = ["Attention", "WindowBlock", "GlobalBlock", "GlobalAttention", "GLAMLayer", "window_geometry",
           "GLAM_VARIANTS", "DEFAULT_GLAM_VARIANT", "GLOBAL_UPDATES", "check_glam_variant"]

#: ``glam_variant`` values (see the module docstring)
GLAM_VARIANTS = ("paper", "authors")
#: the networks' default: the paper's published figures were produced by the authors' code
DEFAULT_GLAM_VARIANT = "authors"
#: ``WindowBlock(global_update=...)`` values
GLOBAL_UPDATES = ("residual_mlp", "replace")


def check_glam_variant(glam_variant: str) -> str:
    """Return ``glam_variant`` or raise ``ValueError`` naming it."""
    if glam_variant not in GLAM_VARIANTS:
        raise ValueError(f"glam_variant={glam_variant!r} must be one of {GLAM_VARIANTS}")
    return glam_variant


def window_geometry(spatial_shape: Sequence[int], window_size: Sequence[int], shift: bool):
    """``(S, nominal window, shift?) -> (ws, shift, Sp, grid)``: clipped window and shift, padded shape, and
    window grid (``N_r = prod(grid)``)."""
    nominal_shift = tuple(w // 2 for w in window_size) if shift else (0,) * len(window_size)
    ws, sh = effective_window(spatial_shape, window_size, nominal_shift)
    Sp = padded_shape(spatial_shape, ws)
    grid = tuple(s // w for s, w in zip(Sp, ws))
    return ws, sh, Sp, grid


class Attention(nn.Module):
    """Plain multi-head self-attention over a sequence: ``(B, T, C) -> (B, T, C)`` (SDPA).

    ``store_attn = True`` keeps the softmax weights ``(B, h, T, T)`` in ``last_attn`` (slow debug path).
    """

    #: CPU inference, sequences at least this long: q, k, v copied out of the fused projection's strided layout
    #: (one ~1 ms copy; G-MSA over 5,120 tokens on an AVX-512/AMX CPU: 100 -> 95 ms)
    CONTIGUOUS_FROM = 1024

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.store_attn = False
        self.last_attn: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.num_heads
        qkv = linear(x, self.qkv).view(B, T, 3, h, C // h).permute(2, 0, 3, 1, 4)
        if T >= self.CONTIGUOUS_FROM and chunked_inference(x):
            qkv = qkv.contiguous()  # SDPA's CPU flash kernel reads q, k, v rows faster unstrided
        q, k, v = qkv[0], qkv[1], qkv[2]
        drop = self.attn_drop if self.training else 0.0
        if self.store_attn:
            attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
            self.last_attn = attn.detach()
            out = F.dropout(attn, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(linear(out.transpose(1, 2).reshape(B, T, C), self.proj))


class GlobalBlock(nn.Module):
    """G-MSA of the paper variant: a full pre-LN transformer layer over the global tokens of one image.

    ``g (B, T, C)``, ``pos (T, C)`` or None -> ``(B, T, C)`` with ``T = N_r * N_g``:
    ``g + attn(norm1(g) + pos)``, then ``+ mlp(norm2(.))``. The position enters the attention input only.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, g: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = self.norm1(g)
        g = g + self.drop_path(self.attn(a if pos is None else a + pos))
        return g + self.drop_path(self.mlp(self.norm2(g)))


class GlobalAttention(nn.Module):
    """G-MSA of the authors variant: bare multi-head attention over the global tokens of one image.

    ``g (B, T, C)``, ``pos (T, C)`` or None -> ``attn(g + pos) (B, T, C)``, which replaces ``g`` (no norm,
    residual or MLP).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)

    def forward(self, g: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.attn(g if pos is None else g + pos)


class WindowBlock(nn.Module):
    """(Shifted) window transformer block (Swin / nnFormer) with optional per-window prefix (global) tokens.

    Args:
        dim, num_heads, window_size (tuple, nominal), shift (shift by ``ws // 2`` when the map is larger than
        the window), mlp_ratio, qkv_bias, drop, attn_drop, drop_path.
        cross: nnFormer "skip attention": queries from ``x`` (normalised, unprojected), keys/values from
            ``context`` (normalised), residual from ``x + context``.
        global_norm: the global tokens enter the attention through ``norm1`` (paper reading); ``False``: as
            they are (the authors' code).
        global_update: what the block returns as the global tokens, from their attention outputs ``a``:
            ``"residual_mlp"`` ``g + a``, then ``+ mlp(norm2(.))`` (the paper's transformer layer; the authors'
            3D code) or ``"replace"`` ``a`` alone (the authors' 2D code).

    Forward: ``x (B, *S, C)`` channels-last, ``g (B, N_r, N_g, C)`` or None, ``context (B, *S, C)`` (cross only)
    -> ``(x' (B, *S, C), g_hat (B, N_r, N_g, C) or None)``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, cross: bool = False, global_norm: bool = True,
                 global_update: str = "residual_mlp"):
        super().__init__()
        if global_update not in GLOBAL_UPDATES:
            raise ValueError(f"global_update={global_update!r} must be one of {GLOBAL_UPDATES}")
        self.global_norm = bool(global_norm)
        self.global_update = global_update
        self.dim = dim
        self.window_size = tuple(window_size)
        self.shift = shift
        self.cross = cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, cross=cross,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.record_geometry = False
        self.last_geometry: Optional[dict] = None

    #: shifted blocks attend per window class (:func:`window_classes`, small cached masks); ``False``: one
    #: ``(B * N_r, h, L, L)`` mask (the reference path, also taken while attention weights are recorded)
    class_attention = True
    #: CPU inference: ``[global; window]`` sequences get masked padding keys up to a multiple of this
    #: (:func:`~glam3d.models.window.key_padding`; 0 = never)
    key_multiple = 16

    def _windows(self, x: torch.Tensor, ws, sh, prefix: Optional[torch.Tensor] = None,
                 by_class: bool = False, pad: int = 0) -> torch.Tensor:
        """``(B, *S, C) -> (B * N_r, N_p, C)``: pad, roll, partition (a shifted map in one gather); with
        ``prefix (B * N_r, P, C)``: ``[prefix; windows; pad zero rows] (B * N_r, P + N_p + pad, C)`` built in
        one buffer. ``by_class``: shifted windows in :func:`window_classes` order."""
        x = pad_to_multiple(x, ws)
        if prefix is not None:
            return partition_with_prefix(x, ws, sh, prefix, by_class, pad)
        if not any(sh):
            return window_partition(x, ws)
        B, *Sp, C = x.shape
        idx, _ = shifted_window_index(Sp, ws, sh, x.device, by_class)
        return x.reshape(B, -1, C).index_select(1, idx).view(-1, math.prod(ws), C)

    @staticmethod
    def _unshift(out: torch.Tensor, ws, sh, Sp, by_class: bool = False) -> torch.Tensor:
        """Reverse + roll back as one gather: ``(B * N_r, N_p, C)`` (possibly a slice) -> ``(B, prod(Sp), C)``."""
        _, inv = shifted_window_index(Sp, ws, sh, out.device, by_class)
        n_p, C = out.shape[1], out.shape[2]
        if out.is_contiguous():
            return out.view(-1, inv.numel(), C).index_select(1, inv)
        # a slice of [global; window] tokens: gather (window, token) pairs without copying the slice first
        return out.view(-1, inv.numel() // n_p, n_p, C)[:, inv // n_p, inv % n_p]

    @staticmethod
    def _add_unwindowed(shortcut: torch.Tensor, out: torch.Tensor, ws, sh, Sp, by_class: bool = False
                        ) -> torch.Tensor:
        """``shortcut (B, *S, C) + reverse(roll back(out (B * N_r, N_p, C)))``, cropped to ``S``.

        Unpadded maps skip the intermediate copy: unshifted, the add reads ``out`` through a permuted view;
        shifted, one gather (``inv`` index) replaces the reverse permutation and the per-axis rolls back.
        """
        B, *S, C = shortcut.shape
        d = len(ws)
        if tuple(Sp) == tuple(S):
            if not any(sh):
                grid = [s // w for s, w in zip(S, ws)]
                perm = [0]
                for i in range(d):
                    perm += [1 + i, 1 + d + i]
                perm.append(2 * d + 1)
                split = [B]
                for g, w in zip(grid, ws):
                    split += [g, w]
                y = out.view(B, *grid, *ws, C).permute(*perm)
                return (shortcut.view(*split, C) + y).view(shortcut.shape)
            return shortcut + WindowBlock._unshift(out, ws, sh, Sp, by_class).view(shortcut.shape)
        if any(sh):
            y = WindowBlock._unshift(out, ws, sh, Sp, by_class).view(B, *Sp, C)
        else:
            y = window_reverse(out, ws, Sp)
        return shortcut + y[(slice(None),) + tuple(slice(0, s) for s in S)]

    def forward(self, x: torch.Tensor, g: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, need_global: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``need_global=False``: the caller drops the updated global tokens (last block of a stage), so they
        serve as keys/values only — no query rows, residual or MLP for them (``x'`` is unchanged; returns
        ``(x', None)``). Ignored while attention weights are recorded (``attn.store_attn``)."""
        B, *S, C = x.shape
        ws, sh, Sp, grid = window_geometry(S, self.window_size, self.shift)
        if self.record_geometry:
            self.last_geometry = {"spatial_shape": tuple(S), "window_size": ws, "shift": sh, "padded": Sp,
                                  "grid": grid}
        if self.cross and (context is None or context.shape != x.shape):
            raise ValueError(f"context must have the shape of x {tuple(x.shape)}, "
                             f"got {None if context is None else tuple(context.shape)}")
        n_g = 0 if g is None else g.shape[2]
        # shifted windows grouped by mask class (windows, and their global tokens, in class order)
        classes = window_classes(Sp, ws, sh, x.device) if (
            any(sh) and self.class_attention and not self.attn.store_attn) else None
        by_class = classes is not None
        gn = None
        if g is not None:
            gn = self.norm1(g) if self.global_norm else g
            gn = (gn[:, classes.perm] if by_class else gn).reshape(-1, n_g, C)  # (B*N_r, N_g, C)
        # CPU inference: masked padding keys make [g; w] a multiple of the vector width (none without g)
        pad = key_padding(n_g, math.prod(ws), self.key_multiple) if (
            not self.attn.store_attn and chunked_inference(x)) else 0
        xw = self._windows(self.norm1(x), ws, sh, gn, by_class, pad)  # (B*N_r, [N_g +] N_p [+ pad], C)
        cw = self._windows(self.norm1(context), ws, sh, gn, by_class, pad) if self.cross else None
        mask = shift_window_mask(Sp, ws, sh, x.device) if any(sh) and not by_class else None
        keep_g = g is not None and (need_global or self.attn.store_attn)
        out = self.attn(xw, cw, ws, mask, n_g, prefix_queries=keep_g, classes=classes,
                        num_pad=pad)  # (B*N_r, [N_g+]N_p, C)
        del xw, cw  # (without autograd these are freed now: lower peak memory for the residual and MLP)
        if keep_g:
            g_out, out = out[:, :n_g].contiguous(), out[:, n_g:]
        if not isinstance(self.drop_path, nn.Identity):
            out = self.drop_path(out.view(B, -1, *out.shape[1:])).view(out.shape)
        # residual: x, or x + context for nnFormer's skip attention (formed only now, after the attention)
        x = self._add_unwindowed(x + context if self.cross else x, out, ws, sh, Sp, by_class)
        del out
        if chunked_inference(x) and x.is_contiguous() and (isinstance(self.drop_path, nn.Identity)
                                                             or not self.training):
            add_mlp_(x, self.norm2, self.mlp)  # x is this block's own new tensor: updated in place, in chunks
        else:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        if not keep_g:
            return x, None
        g_out = g_out.reshape(g.shape)
        if by_class:
            g_out = g_out[:, classes.inv]  # back to raster window order
        if self.global_update == "replace":
            return x, g_out
        g = g + self.drop_path(g_out)
        g = g + self.drop_path(self.mlp(self.norm2(g)))
        return x, g


class GLAMLayer(nn.Module):
    """One resolution level of a GLAM window transformer: ``depth`` GLAM blocks on a ``(B, C, *S)`` map.

    Args:
        dim: channels ``C``.
        depth: number of window blocks (alternating plain / shifted windows when ``shift``).
        num_heads: heads of the window attention (and of G-MSA unless ``global_num_heads``).
        window_size: int or tuple; the number of spatial axes is ``len(window_size)``, or ``spatial_dims``
            when an int.
        spatial_dims: 2 or 3 (only needed when ``window_size`` is an int).
        num_global_tokens: ``N_g`` per window (0: a plain Swin / nnFormer stage, no extra parameters).
        gmsa: run G-MSA (off: global tokens only talk inside their window; paper table 5 "GLAM-nogmsa").
        shift: shifted windows in odd blocks.
        mlp_ratio, qkv_bias, drop, attn_drop: as in Swin.
        drop_path: float or list of ``depth`` floats.
        glam_variant: ``"paper"`` or ``"authors"`` (module docstring): the G-MSA form, where it sits, how the
            window blocks treat the global tokens (the authors' 2D and 3D code differ there: ``spatial_dims``
            picks), the position table and the initial tokens (``N(0, 1)`` as the authors' code; paper:
            truncated normal, std .02).
        global_pos_embed: add a learned position to G-MSA's attention input. None (default): on whenever the
            table can be sized (``input_resolution``, or ``global_pos_rows`` for the authors variant).
            Paper variant: a table ``(N_g, C, *grid)`` over the window grid of ``input_resolution``, resized
            (bi/trilinear) for other maps. Authors variant: a table ``(rows, C)`` over the G-MSA sequence
            (window-major, token-minor), area-resampled to the sequence's length ``N_r * N_g`` (every row takes
            part, so every row is trained; equal to the table itself at ``rows`` tokens).
        global_pos_rows: rows of the authors variant's table (default ``N_r * N_g`` at ``input_resolution``).
        global_clamp: clamp the global tokens to ``[-1, 1]`` after every G-MSA.
        input_resolution: the map size ``S`` the layer is made for (sizes the position table).
        cross_attention: the first block is nnFormer's skip attention (queries from ``x``, keys/values from the
            ``context`` passed to ``forward``, residual ``x + context``); the decoder variant.
        global_num_heads: heads of G-MSA (default ``num_heads``).
        last_gmsa: one more G-MSA after the last block. Its output is read by nothing inside the layer, only by
            callers asking for the global tokens (``return_global``); the networks drop the tokens after a level.

    Forward: ``x (B, C, *S)`` [, ``context (B, C, *S)``] -> ``(B, C, *S)``; with ``return_global=True`` also the
    final global tokens ``(B, N_r * N_g, C)`` (None when ``N_g == 0``). :meth:`forward_tokens` is the same on
    channels-last maps ``(B, *S, C)`` (what the networks use, no layout copies).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size, spatial_dims: int | None = None,
                 num_global_tokens: int = 10, gmsa: bool = True, shift: bool = True, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path=0.0,
                 global_pos_embed: bool | None = None, global_clamp: bool = False,
                 input_resolution: Sequence[int] | None = None, cross_attention: bool = False,
                 global_num_heads: int | None = None, last_gmsa: bool = False,
                 glam_variant: str = DEFAULT_GLAM_VARIANT, global_pos_rows: int | None = None):
        super().__init__()
        window_size = as_window_size(window_size, spatial_dims)
        check_glam_variant(glam_variant)
        if dim < 1:
            raise ValueError(f"dim={dim} must be positive")
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        if num_global_tokens < 0:
            raise ValueError(f"num_global_tokens={num_global_tokens} must be >= 0")
        global_num_heads = global_num_heads or num_heads
        if num_global_tokens and gmsa and dim % global_num_heads:
            raise ValueError(f"global_num_heads={global_num_heads} must divide dim={dim}")
        dpr = list(drop_path) if isinstance(drop_path, (list, tuple)) else [float(drop_path)] * depth
        if len(dpr) != depth:
            raise ValueError(f"drop_path has {len(dpr)} entries, expected depth={depth}")
        authors = glam_variant == "authors"
        if global_pos_rows is not None and not authors:
            raise ValueError("global_pos_rows sizes the authors variant's position table; "
                             "glam_variant='paper' sizes its table from input_resolution")
        if global_pos_rows is not None and global_pos_rows < 1:
            raise ValueError(f"global_pos_rows={global_pos_rows} must be >= 1")
        self.dim = dim
        self.depth = depth
        self.spatial_dims = len(window_size)
        self.window_size = window_size
        self.num_global_tokens = num_global_tokens
        self.cross_attention = cross_attention
        self.global_clamp = global_clamp
        self.glam_variant = glam_variant
        #: G-MSA runs before every block (authors variant) instead of between blocks (paper variant)
        self.gmsa_first = authors
        self.last_gmsa = bool(last_gmsa)
        # the authors' 2D code (themyrl/glam) keeps only the attention output for g; their 3D code (themyrl/medseg)
        # adds the block's residual and MLP; both feed g to W-MSA without LayerNorm
        update = ("replace" if self.spatial_dims == 2 else "residual_mlp") if authors else "residual_mlp"
        self.blocks = nn.ModuleList([
            WindowBlock(dim, num_heads, window_size, shift=bool(shift and i % 2 == 1), mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=dpr[i],
                        cross=cross_attention and i == 0, global_norm=not authors, global_update=update)
            for i in range(depth)])
        n_gmsa = (depth if authors else depth - 1) + int(self.last_gmsa)
        self.use_gmsa = bool(gmsa and num_global_tokens and n_gmsa > 0)
        if self.use_gmsa:
            self.gmsa = nn.ModuleList([
                GlobalAttention(dim, global_num_heads, qkv_bias, drop, attn_drop) if authors else
                GlobalBlock(dim, global_num_heads, mlp_ratio, qkv_bias, drop, attn_drop, dpr[min(i, depth - 1)])
                for i in range(n_gmsa)])
        else:
            self.gmsa = None
        res = None if input_resolution is None else to_ntuple(input_resolution, self.spatial_dims,
                                                              "input_resolution")
        sizable = res is not None or (authors and global_pos_rows is not None)
        if global_pos_embed and num_global_tokens and gmsa and not sizable:
            raise ValueError("global_pos_embed=True needs input_resolution (the map size the layer is made for) "
                             + ("or global_pos_rows " if authors else "") + "to size the position table")
        if num_global_tokens:
            self.global_tokens = nn.Parameter(torch.zeros(num_global_tokens, dim))
        else:
            self.register_parameter("global_tokens", None)
        self.register_parameter("global_pos_embed", None)
        if self.use_gmsa and (global_pos_embed if global_pos_embed is not None else sizable):
            if authors:
                rows = global_pos_rows or math.prod(window_geometry(res, window_size, False)[3]) * num_global_tokens
                self.global_pos_embed = nn.Parameter(torch.zeros(rows, dim))
            else:
                grid = window_geometry(res, window_size, False)[3]
                self.global_pos_embed = nn.Parameter(torch.zeros(num_global_tokens, dim, *grid))
        self.apply(init_weights_trunc_normal)
        if self.global_tokens is not None:
            if authors:
                nn.init.normal_(self.global_tokens, std=1.0)
            else:
                nn.init.trunc_normal_(self.global_tokens, std=0.02)
        if self.global_pos_embed is not None:
            nn.init.trunc_normal_(self.global_pos_embed, std=0.02)

    # ------------------------------------------------------------------------------------------------------
    def gmsa_before(self, block: int) -> Optional[int]:
        """Index in ``gmsa`` of the G-MSA that runs right before block ``block`` (None if none)."""
        return block if self.use_gmsa and self.gmsa_first else None

    def gmsa_after(self, block: int) -> Optional[int]:
        """Index in ``gmsa`` of the G-MSA that runs right after block ``block`` (None if none)."""
        if not self.use_gmsa:
            return None
        if self.gmsa_first:
            return self.depth if self.last_gmsa and block == self.depth - 1 else None
        return block if block < len(self.gmsa) else None

    def hops(self) -> List[Tuple[int, int, int]]:
        """``[(block, gmsa, next_block)]``: every G-MSA that reads the global tokens a block's W-MSA wrote and
        whose output the next block's W-MSA reads (the path of paper eq. 7), in order; ``depth - 1`` of them."""
        if not self.use_gmsa:
            return []
        return [(b, b + 1 if self.gmsa_first else b, b + 1) for b in range(self.depth - 1)]

    def global_position(self, grid: Sequence[int]) -> Optional[torch.Tensor]:
        """The position added to G-MSA's input for a window grid: ``(N_r * N_g, C)``, window-major (None when the
        layer has no position table)."""
        pe = self.global_pos_embed
        if pe is None:
            return None
        n = math.prod(grid) * self.num_global_tokens
        if self.glam_variant == "authors":  # (rows, C) over the sequence
            if pe.shape[0] == n:
                return pe
            return F.adaptive_avg_pool1d(pe.t().unsqueeze(0), n)[0].t()
        if tuple(pe.shape[2:]) != tuple(grid):
            mode = "bilinear" if len(grid) == 2 else "trilinear"
            pe = F.interpolate(pe, size=tuple(grid), mode=mode, align_corners=False)
        d = len(grid)
        return pe.permute(*range(2, 2 + d), 0, 1).reshape(n, pe.shape[1])

    def initial_global_tokens(self, batch: int, num_windows: int) -> Optional[torch.Tensor]:
        """The learned ``(N_g, C)`` tokens broadcast to ``(B, N_r, N_g, C)`` (None when ``N_g == 0``)."""
        if not self.num_global_tokens:
            return None
        return self.global_tokens.expand(batch, num_windows, -1, -1)

    def _check(self, x: torch.Tensor, name: str = "x", channels_last: bool = False) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"{name} must have {self.spatial_dims} spatial axes ({self.spatial_dims + 2}-D), "
                             f"got shape {tuple(x.shape)}")
        c = x.shape[-1] if channels_last else x.shape[1]
        if c != self.dim:
            raise ValueError(f"{name} has {c} channels, expected dim={self.dim}")

    def _run_gmsa(self, index: int, g: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """G-MSA ``index`` on ``g (B, N_r, N_g, C)`` -> ``(B, N_r, N_g, C)``."""
        shape = g.shape
        g = self.gmsa[index](g.reshape(shape[0], -1, shape[-1]), pos).view(shape)
        return g.clamp(-1.0, 1.0) if self.global_clamp else g

    def forward_tokens(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, need_global: bool = True
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Channels-last forward: ``x (B, *S, C)`` [, ``context (B, *S, C)``] ->
        ``(x' (B, *S, C), g (B, N_r * N_g, C) or None)``.

        ``need_global=False`` (a network that drops the global tokens after the level): the last block's
        global-token outputs, which nothing reads, are not computed (``x'`` is the same; ``g`` is None unless a
        G-MSA follows the last block)."""
        self._check(x, "x", channels_last=True)
        if self.cross_attention and context is None:
            raise ValueError("context is required: this layer starts with cross-attention (cross_attention=True)")
        B, *S, C = x.shape
        g, pos = None, None
        if self.num_global_tokens:
            grid = window_geometry(S, self.window_size, False)[3]
            g = self.initial_global_tokens(B, math.prod(grid))
            pos = self.global_position(grid)
        last = self.depth - 1
        for i, blk in enumerate(self.blocks):
            before, after = self.gmsa_before(i), self.gmsa_after(i)
            if g is not None and before is not None:
                g = self._run_gmsa(before, g, pos)
            x, g = blk(x, g, context if i == 0 else None, need_global=need_global or i < last or after is not None)
            if g is not None and after is not None:
                g = self._run_gmsa(after, g, pos)
        return x, (None if g is None else g.reshape(B, -1, C))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, return_global: bool = False):
        """``x (B, C, *S)`` [, ``context (B, C, *S)``] -> ``(B, C, *S)`` [, global tokens ``(B, N_r*N_g, C)``]."""
        self._check(x, "x")
        if context is not None:
            self._check(context, "context")
            if context.shape != x.shape:
                raise ValueError(f"context shape {tuple(context.shape)} != x shape {tuple(x.shape)}")
            context = context.movedim(1, -1)
        y, g = self.forward_tokens(x.movedim(1, -1), context)
        y = y.movedim(-1, 1).contiguous()
        return (y, g) if return_global else y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, depth={self.depth}, window_size={self.window_size}, "
                f"num_global_tokens={self.num_global_tokens}, glam_variant={self.glam_variant}, "
                f"gmsa={len(self.gmsa) if self.gmsa is not None else 0}, cross={self.cross_attention}")

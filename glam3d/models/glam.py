"""GLAM: global tokens in window transformers (Themyr et al., WACV 2023), for 2D and 3D maps.

One GLAM block (paper eq. 2), on a map ``x (B, *S, C)`` and per-window global tokens ``g (B, N_r, N_g, C)``:

1. pre-LN, pad to a multiple of the window, roll by ``-ws // 2`` (shifted blocks), partition:
   ``w (B * N_r, N_p, C)``;
2. **W-MSA** transformer layer on ``z = [g; w] (B * N_r, N_g + N_p, C)`` (MSA + residual, LN + MLP + residual;
   relative position bias / shift mask on window<->window pairs only);
3. split ``z -> (g_hat, w_hat)``; reverse windows, roll back, crop -> ``x'``;
4. **G-MSA** transformer layer on ``g_hat`` viewed as ``(B, N_r * N_g, C)``: all global tokens of one image
   attend to each other (never across the batch) -> ``g'`` for the next block.

A :class:`GLAMLayer` (one resolution level / stage) starts from one learned ``(N_g, C)`` parameter broadcast to
every window and chains ``depth`` blocks, alternating plain and shifted windows (window ``k`` of a shifted block
keeps global tokens ``k``). With ``num_global_tokens=0`` it *is* a Swin / nnFormer window stage: no extra
parameters, identical computation.

Usage::

    layer = GLAMLayer(dim=96, depth=2, num_heads=3, window_size=(4, 4, 4), num_global_tokens=10)
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
                     key_padding, partition_with_prefix, roll, shift_window_mask, shifted_window_index, window_classes,
                     window_partition, window_reverse)

__all__ = ["Attention", "WindowBlock", "GlobalBlock", "GLAMLayer", "window_geometry"]


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
    #: (one ~1 ms copy; G-MSA over 5,120 tokens on the Xeon VM: 100 -> 95 ms)
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
    """G-MSA: a full pre-LN transformer layer over the global tokens of one image.

    ``g (B, N_r * N_g, C) -> (B, N_r * N_g, C)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        g = g + self.drop_path(self.attn(self.norm1(g)))
        return g + self.drop_path(self.mlp(self.norm2(g)))


class WindowBlock(nn.Module):
    """(Shifted) window transformer block (Swin / nnFormer) with optional per-window prefix (global) tokens.

    Args:
        dim, num_heads, window_size (tuple, nominal), shift (shift by ``ws // 2`` when the map is larger than
        the window), mlp_ratio, qkv_bias, drop, attn_drop, drop_path.
        cross: nnFormer "skip attention": queries from ``x`` (normalised, unprojected), keys/values from
            ``context`` (normalised), residual from ``x + context``.

    Forward: ``x (B, *S, C)`` channels-last, ``g (B, N_r, N_g, C)`` or None, ``context (B, *S, C)`` (cross only)
    -> ``(x' (B, *S, C), g_hat (B, N_r, N_g, C) or None)``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, cross: bool = False):
        super().__init__()
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
            gn = self.norm1(g)
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
        g = g + self.drop_path(g_out)
        g = g + self.drop_path(self.mlp(self.norm2(g)))
        return x, g


class GLAMLayer(nn.Module):
    """One resolution level of a GLAM window transformer: ``depth`` GLAM blocks on a ``(B, C, *S)`` map.

    Args:
        dim: channels ``C``.
        depth: number of blocks (alternating plain / shifted windows when ``shift``).
        num_heads: heads of the window attention (and of G-MSA unless ``global_num_heads``).
        window_size: int or tuple; the number of spatial axes is ``len(window_size)``, or ``spatial_dims``
            when an int.
        spatial_dims: 2 or 3 (only needed when ``window_size`` is an int).
        num_global_tokens: ``N_g`` per window (0: a plain Swin / nnFormer stage, no extra parameters).
        gmsa: run G-MSA after every block (off: global tokens only talk inside their window).
        shift: shifted windows in odd blocks.
        mlp_ratio, qkv_bias, drop, attn_drop: as in Swin.
        drop_path: float or list of ``depth`` floats.
        global_pos_embed: add a learned position embedding ``(N_g, C, *grid)`` to the global tokens before every
            G-MSA (needs ``input_resolution`` to size the window grid; linearly resized for other maps).
        global_clamp: clamp the global tokens to ``[-1, 1]`` after every G-MSA.
        input_resolution: the map size ``S`` the layer is made for (only needed by ``global_pos_embed``).
        cross_attention: the first block is nnFormer's skip attention (queries from ``x``, keys/values from the
            ``context`` passed to ``forward``, residual ``x + context``); the decoder variant.
        global_num_heads: heads of G-MSA (default ``num_heads``).
        last_gmsa: run G-MSA after the last block too (default, the paper's block). Its output only matters
            when the global tokens are returned (``return_global``) or read (eq. 7 map of the last block); a
            network that drops them after the stage passes ``False`` (no dead compute, no unused parameters).

    Forward: ``x (B, C, *S)`` [, ``context (B, C, *S)``] -> ``(B, C, *S)``; with ``return_global=True`` also the
    final global tokens ``(B, N_r * N_g, C)`` (None when ``N_g == 0``). :meth:`forward_tokens` is the same on
    channels-last maps ``(B, *S, C)`` (what the networks use, no layout copies).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size, spatial_dims: int | None = None,
                 num_global_tokens: int = 10, gmsa: bool = True, shift: bool = True, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path=0.0,
                 global_pos_embed: bool = False, global_clamp: bool = False,
                 input_resolution: Sequence[int] | None = None, cross_attention: bool = False,
                 global_num_heads: int | None = None, last_gmsa: bool = True):
        super().__init__()
        window_size = as_window_size(window_size, spatial_dims)
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
        self.dim = dim
        self.depth = depth
        self.spatial_dims = len(window_size)
        self.window_size = window_size
        self.num_global_tokens = num_global_tokens
        self.cross_attention = cross_attention
        self.global_clamp = global_clamp
        self.use_gmsa = bool(gmsa and num_global_tokens)
        self.blocks = nn.ModuleList([
            WindowBlock(dim, num_heads, window_size, shift=bool(shift and i % 2 == 1), mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=dpr[i],
                        cross=cross_attention and i == 0)
            for i in range(depth)])
        if num_global_tokens:
            self.global_tokens = nn.Parameter(torch.zeros(num_global_tokens, dim))
            nn.init.trunc_normal_(self.global_tokens, std=0.02)
        else:
            self.register_parameter("global_tokens", None)
        n_gmsa = depth if last_gmsa else depth - 1
        self.use_gmsa = self.use_gmsa and n_gmsa > 0
        self.gmsa = nn.ModuleList([
            GlobalBlock(dim, global_num_heads, mlp_ratio, qkv_bias, drop, attn_drop, dpr[i]) for i in range(n_gmsa)
        ]) if self.use_gmsa else None
        if global_pos_embed and self.use_gmsa:
            if input_resolution is None:
                raise ValueError("input_resolution is required with global_pos_embed=True")
            res = to_ntuple(input_resolution, self.spatial_dims, "input_resolution")
            _, _, _, grid = window_geometry(res, window_size, False)
            self.global_pos_embed = nn.Parameter(torch.zeros(num_global_tokens, dim, *grid))
            nn.init.trunc_normal_(self.global_pos_embed, std=0.02)
        else:
            self.register_parameter("global_pos_embed", None)
        self.apply(init_weights_trunc_normal)

    # ------------------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: Tuple[int, ...]) -> torch.Tensor:
        """Global position embedding ``(N_r, N_g, C)`` for a window grid (resized if needed)."""
        pe = self.global_pos_embed
        if tuple(pe.shape[2:]) != tuple(grid):
            mode = "bilinear" if len(grid) == 2 else "trilinear"
            pe = F.interpolate(pe, size=grid, mode=mode, align_corners=False)
        d = len(grid)
        return pe.permute(*range(2, 2 + d), 0, 1).reshape(-1, pe.shape[0], pe.shape[1])

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

    def forward_tokens(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, need_global: bool = True
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Channels-last forward: ``x (B, *S, C)`` [, ``context (B, *S, C)``] ->
        ``(x' (B, *S, C), g (B, N_r * N_g, C) or None)``.

        ``need_global=False`` (a network that drops the global tokens after the stage): the last block's
        global-token outputs, which nothing reads, are not computed (``x'`` is the same; ``g`` is None)."""
        self._check(x, "x", channels_last=True)
        if self.cross_attention and context is None:
            raise ValueError("context is required: this layer starts with cross-attention (cross_attention=True)")
        B, *S, C = x.shape
        g, pe = None, None
        if self.num_global_tokens:
            _, _, _, grid = window_geometry(S, self.window_size, False)
            g = self.initial_global_tokens(B, math.prod(grid))
            pe = self._pos_embed(grid) if self.global_pos_embed is not None else None
        last = len(self.blocks) - 1
        n_gmsa = len(self.gmsa) if self.gmsa is not None else 0
        for i, blk in enumerate(self.blocks):
            x, g = blk(x, g, context if i == 0 else None, need_global=need_global or i < last or i < n_gmsa)
            if g is not None and self.gmsa is not None and i < len(self.gmsa):
                shape = g.shape  # (B, N_r, N_g, C)
                if pe is not None:
                    g = g + pe
                g = self.gmsa[i](g.reshape(B, -1, C)).view(shape)
                if self.global_clamp:
                    g = g.clamp(-1.0, 1.0)
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
                f"num_global_tokens={self.num_global_tokens}, gmsa={self.use_gmsa}, cross={self.cross_attention}")

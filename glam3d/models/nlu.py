"""NLU: non-local upsampling (GLAM paper, sec. 3.2), 2D and 3D.

A low-resolution map is upsampled x2 per axis by cross-attention inside windows: the queries are the
skip-connection tokens of the matching high-resolution region (``2^d * N_p`` tokens, a window of ``2 * ws``),
the keys and values the ``N_p`` low-resolution tokens of a ``ws`` window. The output is the high-resolution map
(no residual: the nnFormer decoder adds the skip itself, as after patch expanding).

No position bias: a query is told apart only by its skip feature (non-local means).

Usage::

    up = NLU(in_dim=384, out_dim=192, num_heads=6, window_size=(4, 4, 4))
    y = up(low, skip)   # low (B, 384, 16, 16, 16), skip (B, 192, 32, 32, 32) -> (B, 192, 32, 32, 32)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import init_weights_trunc_normal, linear
from .window import as_window_size, effective_window, pad_to_multiple, padded_shape, window_partition, window_reverse

__all__ = ["NLU"]


class NLU(nn.Module):
    """Non-local upsampling ``low (B, C_in, *s), skip (B, C_out, *2s) -> (B, C_out, *2s)``.

    Args:
        in_dim: channels of the low-resolution map (keys / values come from it).
        out_dim: channels of the skip connection and of the output (queries come from the skip).
        num_heads: heads; must divide ``out_dim``.
        window_size: low-resolution window (int with ``spatial_dims``, or tuple); clipped to the map.
        qkv_bias, attn_drop, proj_drop: as in a transformer attention layer.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, window_size, spatial_dims: int | None = None,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        window_size = as_window_size(window_size, spatial_dims)
        if num_heads < 1 or out_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide out_dim={out_dim}")
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.window_size = window_size
        self.spatial_dims = len(window_size)
        self.norm_low = nn.LayerNorm(in_dim)
        self.norm_skip = nn.LayerNorm(out_dim)
        self.q = nn.Linear(out_dim, out_dim, bias=qkv_bias)
        self.kv = nn.Linear(in_dim, 2 * out_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.apply(init_weights_trunc_normal)

    def forward_tokens(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Channels-last: ``low (B, *s, C_in), skip (B, *2s, C_out) -> (B, *2s, C_out)``."""
        d = self.spatial_dims
        if low.ndim != d + 2 or skip.ndim != d + 2:
            raise ValueError(f"low and skip must have {d} spatial axes, got {tuple(low.shape)} and {tuple(skip.shape)}")
        if low.shape[-1] != self.in_dim:
            raise ValueError(f"low has {low.shape[-1]} channels, expected in_dim={self.in_dim}")
        if skip.shape[-1] != self.out_dim:
            raise ValueError(f"skip has {skip.shape[-1]} channels, expected out_dim={self.out_dim}")
        B, *s, _ = low.shape
        S = list(skip.shape[1:-1])
        if skip.shape[0] != B or S != [2 * v for v in s]:
            raise ValueError(f"skip spatial shape {tuple(S)} must be twice the low-resolution shape {tuple(s)}")
        ws, _ = effective_window(s, self.window_size, (0,) * d)
        wh = tuple(2 * w for w in ws)
        sp = padded_shape(s, ws)
        Sp = tuple(2 * v for v in sp)
        h, C = self.num_heads, self.out_dim
        E = C // h
        lw = window_partition(pad_to_multiple(self.norm_low(low), ws), ws)      # (B*N_r, N_p, C_in)
        sw = window_partition(pad_to_multiple(self.norm_skip(skip), wh), wh)    # (B*N_r, 2^d N_p, C_out)
        n, L = sw.shape[:2]
        q = linear(sw, self.q).view(n, L, h, E).transpose(1, 2)
        kv = linear(lw, self.kv).view(n, lw.shape[1], 2, h, E).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(linear(out.transpose(1, 2).reshape(n, L, C), self.proj))
        y = window_reverse(out, wh, Sp)
        if list(Sp) != S:
            y = y[(slice(None),) + tuple(slice(0, v) for v in S)]
        return y

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``low (B, C_in, *s), skip (B, C_out, *2s) -> (B, C_out, *2s)``."""
        return self.forward_tokens(low.movedim(1, -1), skip.movedim(1, -1)).movedim(-1, 1).contiguous()

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}, window_size={self.window_size}"

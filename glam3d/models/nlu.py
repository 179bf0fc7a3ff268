"""NLU: non-local upsampling (GLAM paper, sec. 3.2), 2D and 3D.

A low-resolution map is upsampled x2 per axis by cross-attention inside windows: the queries are the
skip-connection tokens of the matching high-resolution region (``2^d * N_p`` tokens, a window of ``2 * ws``),
the keys and values the ``N_p`` low-resolution tokens of a ``ws`` window. Two forms (``form``):

* ``"block"`` (default) - the authors' NLU (themyrl/glam, ``CrossAttentionBlock``), a full transformer block:
  queries from the *un-normalised* skip tokens projected to the low-resolution width, keys/values from the
  normalised low-resolution tokens, a relative position bias between each high-resolution query and each
  low-resolution key, the output projected to the skip width and added to a patch-expanding residual of the
  low-resolution map (:class:`PatchExpand`), then LayerNorm + MLP + residual;
* ``"attention"`` - the attention alone: queries from the normalised skip, no bias, no residual, no MLP (a query
  is told apart only by its skip feature, as in non-local means).

The block keeps the patch expanding it replaces as its residual path, so it can do at least what patch expanding
does; the attention form starts as an average of the window's low-resolution values. The paper's NLU gain
(table 4) was measured with the block.

Relative position bias of the block: along each axis, a query at high-resolution index ``p`` (``0 <= p < 2w``)
and a key at low-resolution index ``q`` (``0 <= q < w``) are ``p - 2q`` apart (in high-resolution steps, from
the key's first covered voxel): ``4w - 2`` offsets, one table row per combination over the axes
(``prod(4 w_i - 2)`` rows, each head its own column), every row used by a full window.

Usage::

    up = NLU(in_dim=384, out_dim=192, num_heads=12, window_size=(4, 4, 4))
    y = up(low, skip)   # low (B, 384, 16, 16, 16), skip (B, 192, 32, 32, 32) -> (B, 192, 32, 32, 32)
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import DropPath, Mlp, init_weights_trunc_normal, linear
from .window import (_shape_cached, as_window_size, effective_window, pad_to_multiple, padded_shape, window_partition,
                     window_reverse)

__all__ = ["NLU", "NLU_FORMS", "PatchExpand", "nlu_relative_position_index"]

#: ``NLU(form=...)`` values
NLU_FORMS = ("block", "attention")


@_shape_cached(64)
def _nlu_index(window: Tuple[int, ...], table_window: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    hi = torch.stack(torch.meshgrid(*[torch.arange(2 * w, device=device) for w in window], indexing="ij")).flatten(1)
    lo = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")).flatten(1)
    off = hi[:, :, None] - 2 * lo[:, None, :]  # (d, 2^d N_p, N_p), in [-(2w-2), 2w-1]
    index = torch.zeros(off.shape[1:], dtype=torch.long, device=device)
    for i, tw in enumerate(table_window):
        index = index * (4 * tw - 2) + off[i] + 2 * tw - 2
    return index


def nlu_relative_position_index(window: Sequence[int], table_window: Sequence[int] | None = None,
                                device: torch.device | str = "cpu") -> torch.Tensor:
    """Index ``(2^d N_p, N_p)`` into the NLU bias table of ``prod(4 tw - 2)`` rows: query (high-resolution, window
    ``2 w``, raster order) x key (low-resolution, window ``w``). ``window`` is the (possibly clipped) window used,
    ``table_window`` the one the table was made for (default the same). Cached per (window, table, device)."""
    window = tuple(int(w) for w in window)
    table_window = window if table_window is None else tuple(int(w) for w in table_window)
    if any(w > t for w, t in zip(window, table_window)):
        raise ValueError(f"window {window} exceeds the bias table's window {table_window}")
    return _nlu_index(window, table_window, torch.device(device))


class PatchExpand(nn.Module):
    """Patch expanding x2 per axis (Swin-Unet's, N-D): ``(B, *s, C_in) -> (B, *2s, C_out)`` channels-last.

    ``Linear(C_in, 2^d C_out, bias=False)``, the ``2^d`` groups of channels moved to the sub-positions (channel
    groups in raster order of the ``2 x ... x 2`` offsets), then LayerNorm(C_out)."""

    def __init__(self, in_dim: int, out_dim: int, spatial_dims: int):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.out_dim = out_dim
        self.expand = nn.Linear(in_dim, 2 ** spatial_dims * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, *s, _ = x.shape
        d = self.spatial_dims
        y = self.expand(x).view(B, *s, *([2] * d), self.out_dim)
        perm = [0]
        for i in range(d):
            perm += [1 + i, 1 + d + i]
        perm.append(2 * d + 1)
        y = y.permute(*perm).reshape(B, *[2 * v for v in s], self.out_dim)
        return self.norm(y)


class NLU(nn.Module):
    """Non-local upsampling ``low (B, C_in, *s), skip (B, C_out, *2s) -> (B, C_out, *2s)``.

    Args:
        in_dim: channels of the low-resolution map (keys / values come from it).
        out_dim: channels of the skip connection and of the output (queries come from the skip).
        num_heads: heads; must divide ``in_dim`` (block: the attention runs at the low-resolution width) or
            ``out_dim`` (attention form).
        window_size: low-resolution window (int with ``spatial_dims``, or tuple); clipped to the map.
        form: ``"block"`` (the authors' NLU) or ``"attention"`` (module docstring).
        qkv_bias, attn_drop, proj_drop: as in a transformer attention layer.
        mlp_ratio, drop_path: of the block's MLP and residual branches (block form only).
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, window_size, spatial_dims: int | None = None,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, form: str = "block",
                 mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        window_size = as_window_size(window_size, spatial_dims)
        if form not in NLU_FORMS:
            raise ValueError(f"form={form!r} must be one of {NLU_FORMS}")
        width = in_dim if form == "block" else out_dim  # the attention's width
        if num_heads < 1 or width % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide {'in_dim' if form == 'block' else 'out_dim'}"
                             f"={width} (form={form!r})")
        self.in_dim, self.out_dim, self.num_heads, self.form = in_dim, out_dim, num_heads, form
        self.window_size = window_size
        self.spatial_dims = len(window_size)
        self.width = width
        self.norm_low = nn.LayerNorm(in_dim)
        self.q = nn.Linear(out_dim, width, bias=qkv_bias)
        self.kv = nn.Linear(in_dim, 2 * width, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(width, out_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        if form == "block":
            n_rel = math.prod(4 * w - 2 for w in window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, num_heads))
            self.shortcut = PatchExpand(in_dim, out_dim, self.spatial_dims)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
            self.norm2 = nn.LayerNorm(out_dim)
            self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), drop=proj_drop)
        else:
            self.norm_skip = nn.LayerNorm(out_dim)
        self.apply(init_weights_trunc_normal)
        if form == "block":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, window: Sequence[int]) -> torch.Tensor:
        """Bias ``(h, 2^d N_p, N_p)`` of the block form for the (possibly clipped) window used."""
        idx = nlu_relative_position_index(window, self.window_size, self.relative_position_bias_table.device)
        return self.relative_position_bias_table[idx.view(-1)].view(*idx.shape, -1).permute(2, 0, 1)

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
        block = self.form == "block"
        ws, _ = effective_window(s, self.window_size, (0,) * d)
        wh = tuple(2 * w for w in ws)
        Sp = tuple(2 * v for v in padded_shape(s, ws))
        h, W = self.num_heads, self.width
        E = W // h
        lw = window_partition(pad_to_multiple(self.norm_low(low), ws), ws)        # (B*N_r, N_p, C_in)
        sw = skip if block else self.norm_skip(skip)                              # block: un-normalised queries
        sw = window_partition(pad_to_multiple(sw, wh), wh)                        # (B*N_r, 2^d N_p, C_out)
        n, L = sw.shape[:2]
        q = linear(sw, self.q).view(n, L, h, E).transpose(1, 2)
        kv = linear(lw, self.kv).view(n, lw.shape[1], 2, h, E).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias(ws).unsqueeze(0).to(q.dtype) if block else None
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(linear(out.transpose(1, 2).reshape(n, L, W), self.proj))
        y = window_reverse(out, wh, Sp)
        if list(Sp) != S:
            y = y[(slice(None),) + tuple(slice(0, v) for v in S)]
        if not block:
            return y
        y = self.shortcut(low) + self.drop_path(y)
        return y + self.drop_path(self.mlp(self.norm2(y)))

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``low (B, C_in, *s), skip (B, C_out, *2s) -> (B, C_out, *2s)``."""
        return self.forward_tokens(low.movedim(1, -1), skip.movedim(1, -1)).movedim(-1, 1).contiguous()

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, form={self.form}")

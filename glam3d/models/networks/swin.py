"""Swin Transformer backbone for 2D images, built from :class:`glam3d.models.glam.GLAMLayer` stages.

There is one window-attention implementation in glam3d (N-D, :mod:`glam3d.models.window`); a Swin stage here is
a ``GLAMLayer`` with 2D windows. With ``num_global_tokens=0`` the backbone computes exactly the Swin of Liu et
al. (ICCV 2021) — an ImageNet checkpoint (official or timm layout) loads with
:func:`glam3d.models.pretrained.load_pretrained` and gives the same features; with ``num_global_tokens > 0``
every stage becomes a GLAM stage (per-window global tokens, W-MSA and G-MSA, ``glam_variant`` "authors" or
"paper", see :mod:`glam3d.models.glam`).

Position tables of the global tokens: paper variant, one vector per (window of the ``input_resolution`` grid,
token); authors variant, the authors' per-sequence table of ``(45 N_g / 2^i)^2`` rows at level ``i``
(:func:`authors_pos_rows`: their ``swin_transformer_gtv8.py`` sizes it for the G-MSA sequence of a map far larger
than any crop), read by area resampling so that every row is trained. Those tables are what bring
GLAM-Swin-UperNet-B to the paper's 197 M parameters (table 6): 48.5 M of them.

Layout::

    x (B, 3, H, W) -> patch_embed (conv k=s=patch, LayerNorm)           (B, H/4, W/4, C)      channels-last
    stage 0: GLAMLayer(C)         -> out 0 (B, C,  H/4,  W/4)   -> merge 0 (2x2 concat, LN, Linear 4C->2C)
    stage 1: GLAMLayer(2C)        -> out 1 (B, 2C, H/8,  W/8)   -> merge 1
    stage 2: GLAMLayer(4C)        -> out 2 (B, 4C, H/16, W/16)  -> merge 2
    stage 3: GLAMLayer(8C)        -> out 3 (B, 8C, H/32, W/32)
    each output through its LayerNorm (``out_norms``, as Swin's segmentation backbone; ``out_norms.3`` is the
    ImageNet model's final ``norm``)

Sizes that are not multiples of ``patch × 2^3 × window``: the image is zero-padded on the bottom/right to a
multiple of the patch; an odd map is zero-padded by one row/column before a merge (as timm); inside each stage
the window code pads the map to a multiple of the window (zeros after the LayerNorm, unmasked, as Swin's
segmentation code) and crops back. Where a map is not larger than the window along an axis, the window is
clipped to the map there and that axis is not shifted. The features are those of the padded image (``H_i =
ceil(H / 4) / 2^i`` rounded up); the networks crop their logits back to ``(H, W)``.

Example::

    bb = SwinBackbone(**SWIN_SIZES["tiny"], num_global_tokens=10)
    feats = bb(torch.randn(2, 3, 224, 224))   # [(2, 96, 56, 56), (2, 192, 28, 28), (2, 384, 14, 14), (2, 768, 7, 7)]
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..glam import DEFAULT_GLAM_VARIANT, GLAMLayer
from ..layers import init_weights_trunc_normal, to_ntuple

__all__ = ["SWIN_SIZES", "PatchEmbed2d", "PatchMerging2d", "SwinBackbone", "swin_stage_resolutions",
           "authors_pos_rows", "AUTHORS_POS_SIDE"]

#: the authors' 2D code sizes the position table of level ``i`` as a square of side ``45 N_g / 2^i``
AUTHORS_POS_SIDE = 45


def authors_pos_rows(level: int, num_global_tokens: int) -> int:
    """Rows of the authors' 2D position table at resolution level ``level`` (0 = 1/4): ``(45 N_g // 2^i)^2``."""
    return (AUTHORS_POS_SIDE * num_global_tokens // 2 ** level) ** 2

#: Swin variants (Liu et al. 2021, table 1): channels of stage 1, blocks and heads per stage
SWIN_SIZES = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]},
    "small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]},
    "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
}


def swin_stage_resolutions(image_size: Sequence[int], patch_size: int = 4, num_stages: int = 4) -> List[tuple]:
    """Feature-map sizes ``[(H_0, W_0), ...]`` of every stage for an input ``(H, W)`` (padding included)."""
    h, w = (math.ceil(s / patch_size) for s in image_size)
    out = []
    for _ in range(num_stages):
        out.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


class PatchEmbed2d(nn.Module):
    """Non-overlapping patches: ``(B, C_in, H, W) -> (B, ceil(H/p), ceil(W/p), C)`` channels-last.

    ``proj`` = Conv2d(kernel = stride = p), then ``norm`` (LayerNorm, Swin's ``patch_norm``). The image is
    zero-padded on the bottom/right to a multiple of ``p``.
    """

    def __init__(self, in_channels: int = 3, embed_dim: int = 96, patch_size: int = 4, norm: bool = True):
        super().__init__()
        self.patch_size = int(patch_size)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2d(nn.Module):
    """Swin patch merging: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)`` channels-last.

    The 2×2 neighbours are concatenated in Swin's order ``[(0,0), (1,0), (0,1), (1,1)]`` (row, column offsets),
    then ``norm`` (LayerNorm 4C) and ``reduction`` (Linear 4C → C_out = 2C, no bias). Odd sizes are padded.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinBackbone(nn.Module):
    """Hierarchical (GLAM-)Swin encoder: ``(B, C_in, H, W)`` -> four maps ``(B, C·2^i, H/2^(i+2), W/2^(i+2))``.

    Args:
        in_channels: image channels (3).
        embed_dim: channels ``C`` of stage 0 (Swin-T/S 96, B 128).
        depths: blocks per stage; num_heads: heads per stage.
        window_size: window (int or (h, w)); 7 for the ImageNet-1k 224 checkpoints.
        patch_size: 4.
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate: as in Swin.
        drop_path_rate: stochastic depth, linearly increasing over all blocks from 0 to this value.
        num_global_tokens: GLAM global tokens per window (0 = vanilla Swin); glam_variant, gmsa,
            global_pos_embed, global_clamp, global_num_heads: passed to every :class:`GLAMLayer`.
        input_resolution: image size (H, W) the model is made for (sizes the paper variant's position tables;
            without it, and without ``global_pos_embed=False``, the paper variant has none).
        out_norms: which stage outputs get a LayerNorm: ``"all"`` (Swin segmentation backbone, UperNet),
            ``"last"`` (Swin-Unet: only the bottleneck, the ImageNet model's ``norm``) or ``"none"``.
        out_indices: which stage outputs ``forward`` returns (default all four).

    Attributes: ``num_features`` (channels per stage), ``stages`` (GLAMLayer), ``merges`` (PatchMerging2d,
    ``merges[i]`` between stage i and i+1), ``out_norms``.
    """

    def __init__(self, in_channels: int = 3, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size=7, patch_size: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, num_global_tokens: int = 0, gmsa: bool = True,
                 global_pos_embed: Optional[bool] = None, global_clamp: bool = False,
                 global_num_heads: Optional[int] = None, input_resolution: Optional[Sequence[int]] = None,
                 out_norms: str = "all", out_indices: Sequence[int] = (0, 1, 2, 3),
                 glam_variant: str = DEFAULT_GLAM_VARIANT):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths={depths} and num_heads={num_heads} must be non-empty and of equal length")
        n = len(depths)
        for i, h in enumerate(num_heads):
            if (embed_dim * 2 ** i) % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage's {embed_dim * 2 ** i} channels")
        if out_norms not in ("all", "last", "none"):
            raise ValueError(f"out_norms must be 'all', 'last' or 'none', got {out_norms!r}")
        if not out_indices or any(not 0 <= i < n for i in out_indices):
            raise ValueError(f"out_indices={tuple(out_indices)} must be stage numbers in 0..{n - 1}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate={drop_path_rate} must be in [0, 1)")
        window_size = to_ntuple(window_size, 2, "window_size")
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_size = tuple(int(w) for w in window_size)
        self.patch_size = int(patch_size)
        self.num_global_tokens = int(num_global_tokens)
        self.num_features = [embed_dim * 2 ** i for i in range(n)]
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed2d(in_channels, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        res = swin_stage_resolutions(input_resolution, patch_size, n) if input_resolution is not None else [None] * n
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i in range(n):
            self.stages.append(GLAMLayer(
                self.num_features[i], depths[i], num_heads[i], self.window_size, num_global_tokens=num_global_tokens,
                gmsa=gmsa, shift=True, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                global_pos_embed=global_pos_embed, global_clamp=global_clamp, input_resolution=res[i],
                global_num_heads=global_num_heads, glam_variant=glam_variant,
                global_pos_rows=(authors_pos_rows(i, num_global_tokens)
                                 if glam_variant == "authors" and num_global_tokens else None)))
            if i < n - 1:
                self.merges.append(PatchMerging2d(self.num_features[i], self.num_features[i + 1]))
        self.out_norms = nn.ModuleList([
            nn.LayerNorm(c) if out_norms == "all" or (out_norms == "last" and i == n - 1) else nn.Identity()
            for i, c in enumerate(self.num_features)])
        self.patch_embed.apply(init_weights_trunc_normal)
        self.merges.apply(init_weights_trunc_normal)
        self.out_norms.apply(init_weights_trunc_normal)

    def forward_tokens(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Channels-last stage outputs ``[(B, H_i, W_i, C_i)]`` (after ``out_norms``) for ``out_indices``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an image batch (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for i, stage in enumerate(self.stages):
            x, _ = stage.forward_tokens(x)
            if i in self.out_indices:
                outs.append(self.out_norms[i](x))
            if i < len(self.merges):
                x = self.merges[i](x)
        return outs

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(B, C_in, H, W)`` -> ``[(B, C_i, H_i, W_i)]`` for the stages in ``out_indices`` (channels-first)."""
        return [o.permute(0, 3, 1, 2).contiguous() for o in self.forward_tokens(x)]

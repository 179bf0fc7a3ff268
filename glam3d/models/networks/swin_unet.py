"""(GLAM-)Swin-Unet (Cao et al. 2021): Swin encoder, symmetric Swin decoder, skip connections, ×4 final expand.

Registered families (``glam3d.models.build_model``):

- ``swin_unet_{tiny,base}``: vanilla Swin-Unet, patch-expanding upsampling (paper table 1 "Swin-Unet [2]");
- ``glam_swin_unet_{tiny,base}``: GLAM in every encoder *and* decoder stage (10 global tokens per window, G-MSA;
  ``glam_variant`` "authors" or "paper") and Non-Local Upsampling (``nlu=True``) instead of patch expanding
  (``twin="swin_unet"``). The paper's GLAM-Swin-Unet-T (44.19 mIoU, table 1) is the "NLU ✓ GLAM ✓" row of its
  table 4 (44.20), so the GLAM variant uses NLU by default; ``nlu=False`` gives table 4's "GLAM only" ablation,
  ``swin_unet`` with ``nlu=True`` its "NLU only" row (43.20).

Layout (C = embed_dim, stage maps channels-last)::

    encoder (SwinBackbone, out_norms="last"):  e0 (C, 1/4)  e1 (2C, 1/8)  e2 (4C, 1/16)  e3 (8C, 1/32, LayerNorm)
    for l = 2, 1, 0:
        x = up[l](x)                       patch expand (Linear C_{l+1} -> 2 C_{l+1}, 2×2 pixel shuffle, LN)
                                           or NLU(x, skip=e_l): cross-attention, queries from the skip
        x = concat_back[l]([x, e_l])       Linear 2 C_l -> C_l
        x = decoder[l](x)                  GLAMLayer(C_l, depths[l], num_heads[l])   (symmetric to the encoder)
    norm_up (LN) -> final_expand (Linear C -> 16 C, 4×4 pixel shuffle, LN) -> head (1×1 conv, no bias)

As in Swin-Unet the decoder stages mirror the encoder's depths, heads and stochastic-depth rates. One deliberate
difference: Swin-Unet's code takes its skips *before* each encoder stage's blocks (right after patch embedding /
merging); we take the stage outputs (after the blocks), which is the usual U-Net wiring, the one drawn in the
Swin-Unet and GLAM figures, and what the backbone's features API returns.

Default crop 512×512 (the ADE20K recipe; the original Swin-Unet used 224×224 on Synapse). Any input size works:
sizes that are not multiples of 32 are padded in the encoder and the decoder crops each upsampled map to its
skip and the logits to ``(H, W)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..glam import DEFAULT_GLAM_VARIANT, GLAMLayer, check_glam_variant
from ..layers import init_weights_trunc_normal
from ..nlu import NLU_FORMS
from ..registry import records_arguments, register_family
from .swin import SWIN_SIZES, SwinBackbone, authors_pos_rows, swin_stage_resolutions

__all__ = ["PatchExpand2d", "FinalPatchExpand2d", "SwinUnet", "build_swin_unet"]


class PatchExpand2d(nn.Module):
    """Swin-Unet patch expanding: ``(B, h, w, C) -> (B, 2h, 2w, C/2)`` (Linear C→2C no bias, 2×2 shuffle, LN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        x = self.expand(x).view(B, h, w, 2, 2, C // 2).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * h, 2 * w, C // 2)
        return self.norm(x)


class FinalPatchExpand2d(nn.Module):
    """Swin-Unet final ×4 expanding: ``(B, h, w, C) -> (B, 4h, 4w, C)`` (Linear C→16C no bias, 4×4 shuffle, LN)."""

    def __init__(self, dim: int, scale: int = 4):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        s = self.scale
        x = self.expand(x).view(B, h, w, s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(B, s * h, s * w, C)
        return self.norm(x)


class _NLUUp(nn.Module):
    """Adapter: ``low (B, h, w, C_in)`` + ``skip (B, H, W, C_out)`` -> ``(B, H, W, C_out)`` channels-last via
    :class:`glam3d.models.nlu.NLU`, which needs a skip of exactly ``2h × 2w``: when the encoder padded an odd
    map (``H = 2h - 1``) the skip is zero-padded to ``2h`` and the result cropped back."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, window_size, form: str = "block"):
        super().__init__()
        from ..nlu import NLU  # one implementation for 2D and 3D

        self.nlu = NLU(in_dim, out_dim, num_heads, window_size, form=form)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        H, W = skip.shape[1:3]
        h2, w2 = 2 * low.shape[1], 2 * low.shape[2]
        if (H, W) != (h2, w2):
            skip = F.pad(skip, (0, 0, 0, w2 - W, 0, h2 - H))
        return self.nlu.forward_tokens(low, skip)[:, :H, :W]


@records_arguments
class SwinUnet(nn.Module):
    """(GLAM-)Swin-Unet; ``forward (B, 3, H, W) -> (B, K, H, W)``.

    Args (beyond :class:`SwinBackbone`'s): ``num_classes``; ``nlu`` (Non-Local Upsampling instead of patch
    expanding); ``nlu_form`` (``"block"``, the authors' NLU, attention at the lower level's width and heads, or
    ``"attention"``: :mod:`glam3d.models.nlu`); ``decoder_global_tokens`` (global tokens of the decoder stages,
    default ``num_global_tokens``); ``default_crop`` (H, W).
    Attributes: ``spatial_dims = 2``, ``in_channels``, ``num_classes``, ``default_crop``, ``encoder``.
    """

    spatial_dims = 2

    def __init__(self, num_classes: int = 150, in_channels: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size=7,
                 patch_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2, num_global_tokens: int = 0,
                 gmsa: bool = True, global_pos_embed: Optional[bool] = None, global_clamp: bool = False,
                 global_num_heads: Optional[int] = None, nlu: bool = False,
                 decoder_global_tokens: Optional[int] = None, default_crop: Sequence[int] = (512, 512),
                 glam_variant: str = DEFAULT_GLAM_VARIANT, nlu_form: str = "block"):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        check_glam_variant(glam_variant)
        if nlu_form not in NLU_FORMS:
            raise ValueError(f"nlu_form={nlu_form!r} must be one of {NLU_FORMS}")
        depths, num_heads = list(depths), list(num_heads)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.default_crop = tuple(int(c) for c in default_crop)
        self.nlu = bool(nlu)
        self.encoder = SwinBackbone(in_channels, embed_dim, depths, num_heads, window_size, patch_size, mlp_ratio,
                                    qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, num_global_tokens, gmsa,
                                    global_pos_embed, global_clamp, global_num_heads,
                                    input_resolution=self.default_crop, out_norms="last",
                                    glam_variant=glam_variant)
        n = len(depths)
        dims = self.encoder.num_features
        ws = self.encoder.window_size
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        res = swin_stage_resolutions(self.default_crop, patch_size, n)
        n_g = num_global_tokens if decoder_global_tokens is None else int(decoder_global_tokens)
        self.up = nn.ModuleList()
        self.concat_back = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for l in range(n - 1):  # index l = the level the block outputs (0 = 1/4)
            heads = num_heads[l + 1] if nlu_form == "block" else num_heads[l]
            self.up.append(_NLUUp(dims[l + 1], dims[l], heads, ws, nlu_form) if nlu else PatchExpand2d(dims[l + 1]))
            self.concat_back.append(nn.Linear(2 * dims[l], dims[l]))
            self.decoder.append(GLAMLayer(
                dims[l], depths[l], num_heads[l], ws, num_global_tokens=n_g, gmsa=gmsa, shift=True,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:l]):sum(depths[:l + 1])], global_pos_embed=global_pos_embed,
                global_clamp=global_clamp, input_resolution=res[l], global_num_heads=global_num_heads,
                glam_variant=glam_variant,
                global_pos_rows=authors_pos_rows(l, n_g) if glam_variant == "authors" and n_g else None))
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = FinalPatchExpand2d(dims[0], patch_size)
        self.head = nn.Conv2d(dims[0], num_classes, 1, bias=False)
        for m in (self.concat_back, self.norm_up, self.final_expand, self.head):
            m.apply(init_weights_trunc_normal)
        for u in self.up:
            if isinstance(u, PatchExpand2d):
                u.apply(init_weights_trunc_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        skips = self.encoder.forward_tokens(x)  # channels-last, finest first
        y = skips[-1]
        for l in range(len(skips) - 2, -1, -1):
            skip = skips[l]
            if self.nlu:
                y = self.up[l](y, skip)
            else:
                y = self.up[l](y)[:, :skip.shape[1], :skip.shape[2]]
            y = self.concat_back[l](torch.cat([y, skip], dim=-1))
            y, _ = self.decoder[l].forward_tokens(y)
        y = self.final_expand(self.norm_up(y))[:, :H, :W]
        return self.head(y.permute(0, 3, 1, 2).contiguous())


def build_swin_unet(**kwargs) -> SwinUnet:
    return SwinUnet(**kwargs)


def _sizes(glam: bool) -> dict:
    extra = {"num_global_tokens": 10, "nlu": True} if glam else {"num_global_tokens": 0, "nlu": False}
    return {name: {**SWIN_SIZES[name], **extra} for name in ("tiny", "base")}


register_family("swin_unet", build_swin_unet, _sizes(False), default_size="tiny",
                description="Swin-Unet: Swin encoder, symmetric Swin decoder with patch expanding (2D)")
register_family("glam_swin_unet", build_swin_unet, _sizes(True), default_size="tiny", twin="swin_unet",
                description="GLAM-Swin-Unet: GLAM encoder and decoder, Non-Local Upsampling (2D)")

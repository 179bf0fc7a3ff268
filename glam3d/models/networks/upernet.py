"""(GLAM-)Swin-UperNet: Swin backbone + UperNet head (Xiao et al. 2018) + auxiliary FCN head, as in Swin / mmseg.

Registered families (``glam3d.models.build_model``):

- ``swin_upernet_{tiny,small,base}``: vanilla Swin-UperNet (paper table 1 rows "Swin-UperNet [24]");
- ``glam_swin_upernet_{tiny,small,base}``: the same with GLAM in every backbone stage (10 global tokens per
  window; ``glam_variant`` "authors" (default) or "paper", :mod:`glam3d.models.glam`; ``twin="swin_upernet"``).

Head (mmseg ``UPerHead``, 512 channels, every conv = Conv(no bias) + BatchNorm + ReLU):
PPM on the last stage (adaptive average pools 1, 2, 3, 6 → 1×1 conv → bilinear up; concat with the input → 3×3
conv) ; FPN: 1×1 lateral convs on stages 0–2, top-down bilinear additions, 3×3 convs; all four levels upsampled
to stage 0 (1/4), concatenated, 3×3 conv, dropout 0.1, 1×1 conv to classes. Auxiliary head (mmseg ``FCNHead``)
on stage 2 (the third): 3×3 conv to 256 channels, dropout 0.1, 1×1 conv to classes; loss weight 0.4
(``model.aux_weights = (1.0, 0.4)``).

Forward: ``(B, 3, H, W)`` → logits ``(B, K, H, W)`` (bilinear from 1/4, align_corners=False). In training mode
with ``aux=True`` it returns ``(main, aux)``, both ``(B, K, H, W)``. BatchNorm needs more than one value per
channel in training (the 1×1 PPM branch): use a batch of at least 2 per device, or convert to SyncBatchNorm
(``nn.SyncBatchNorm.convert_sync_batchnorm``) for multi-GPU training as mmseg does.

Example::

    model = build_model("glam_swin_upernet_tiny", num_classes=19, default_crop=[769, 769])
    load_pretrained(model, "swin_tiny_patch4_window7_224.pth")
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..glam import DEFAULT_GLAM_VARIANT
from ..registry import records_arguments, register_family
from .swin import SWIN_SIZES, SwinBackbone

__all__ = ["ConvBNReLU", "PPM", "UPerHead", "FCNHead", "SwinUperNet", "build_swin_upernet"]


class ConvBNReLU(nn.Sequential):
    """mmseg ``ConvModule``: Conv2d (no bias) + BatchNorm2d + ReLU. ``(B, C_in, H, W) -> (B, C_out, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PPM(nn.Module):
    """Pyramid pooling: ``(B, C, h, w) -> [(B, channels, h, w)] * len(pool_scales)``."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1))
                                       for s in self.pool_scales])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [_resize(b(x), x.shape[-2:]) for b in self.branches]


class UPerHead(nn.Module):
    """UperNet decode head: stage maps ``[(B, C_i, H_i, W_i)]`` (finest first) -> logits ``(B, K, H_0, W_0)``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self.bottleneck(torch.cat([top] + self.psp_modules(top), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        x = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """Auxiliary FCN head: ``(B, C_in, h, w) -> (B, K, h, w)`` (``num_convs`` 3×3 ConvBNReLU, dropout, 1×1)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        convs = [ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


@records_arguments
class SwinUperNet(nn.Module):
    """(GLAM-)Swin backbone + UperNet head (+ auxiliary FCN head on stage ``aux_index``).

    Attributes: ``spatial_dims = 2``, ``in_channels``, ``num_classes``, ``default_crop`` (H, W),
    ``aux_weights`` (loss weights of the outputs returned in training mode).
    """

    spatial_dims = 2

    def __init__(self, num_classes: int = 150, in_channels: int = 3, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size=7,
                 patch_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3, num_global_tokens: int = 0,
                 gmsa: bool = True, global_pos_embed: Optional[bool] = None, global_clamp: bool = False,
                 global_num_heads: Optional[int] = None, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux: bool = True,
                 aux_index: int = 2, aux_channels: int = 256, aux_weight: float = 0.4,
                 default_crop: Sequence[int] = (512, 512), glam_variant: str = DEFAULT_GLAM_VARIANT):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.default_crop = tuple(int(c) for c in default_crop)
        self.backbone = SwinBackbone(in_channels, embed_dim, depths, num_heads, window_size, patch_size, mlp_ratio,
                                     qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, num_global_tokens, gmsa,
                                     global_pos_embed, global_clamp, global_num_heads,
                                     input_resolution=self.default_crop, out_norms="all",
                                     glam_variant=glam_variant)
        feats = self.backbone.num_features
        if not 0 <= aux_index < len(feats):
            raise ValueError(f"aux_index={aux_index} must be a stage number in 0..{len(feats) - 1}")
        self.decode_head = UPerHead(feats, num_classes, channels, pool_scales, dropout)
        self.aux_index = aux_index
        self.auxiliary_head = FCNHead(feats[aux_index], num_classes, aux_channels, 1, dropout) if aux else None
        self.aux_weights = (1.0, float(aux_weight)) if aux else (1.0,)

    def forward(self, x: torch.Tensor):
        H, W = x.shape[-2:]
        feats = self.backbone(x)
        p = self.backbone.patch_size
        padded = (feats[0].shape[-2] * p, feats[0].shape[-1] * p)  # the patch-padded image size

        def full(logits):
            return _resize(logits, padded)[..., :H, :W]

        out = full(self.decode_head(feats))
        if self.training and self.auxiliary_head is not None:
            return out, full(self.auxiliary_head(feats[self.aux_index]))
        return out


def build_swin_upernet(**kwargs) -> SwinUperNet:
    return SwinUperNet(**kwargs)


def _sizes(glam: bool) -> dict:
    extra = {"num_global_tokens": 10} if glam else {"num_global_tokens": 0}
    return {name: {**cfg, **extra} for name, cfg in SWIN_SIZES.items()}


register_family("swin_upernet", build_swin_upernet, _sizes(False), default_size="tiny",
                description="Swin backbone + UperNet head + auxiliary FCN head (2D, mmseg recipe)")
register_family("glam_swin_upernet", build_swin_upernet, _sizes(True), default_size="tiny", twin="swin_upernet",
                description="GLAM-Swin backbone (10 global tokens/window, G-MSA) + UperNet head (2D)")

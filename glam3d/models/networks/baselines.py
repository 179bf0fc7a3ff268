"""Baselines wrapped to the glam3d network contract: MONAI's SwinUNETR.

Contract: ``forward(x (B, C_in, D, H, W)) -> logits (B, K, D, H, W)``; attributes ``spatial_dims``,
``in_channels``, ``num_classes``, ``default_crop``, ``deep_supervision`` (False: SwinUNETR has one output).
SwinUNETR needs every spatial size divisible by 32 (patch 2, 4 halvings); a ValueError names ``x`` otherwise.
It also needs ``einops``, an optional dependency of glam3d (``pip install 'glam3d[swinunetr]'``): without it,
building the network raises an ImportError saying so in one line.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import to_ntuple
from ..registry import records_arguments

__all__ = ["SwinUNETRNet", "build_swin_unetr", "SWIN_UNETR_SIZES"]


def _require_einops() -> None:
    try:
        import einops  # noqa: F401  (MONAI's SwinUNETR rearranges its tokens with it)
    except ImportError:
        raise ImportError("the SwinUNETR baseline needs einops, which is not installed: "
                          "pip install 'glam3d[swinunetr]' (or pip install einops)") from None


@records_arguments
class SwinUNETRNet(nn.Module):
    """MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022) behind the glam3d forward contract."""

    spatial_dims = 3
    divisor = (32, 32, 32)

    def __init__(self, crop_size=(64, 128, 128), in_channels: int = 1, num_classes: int = 14, feature_size: int = 48,
                 depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False, deep_supervision: bool = False):
        super().__init__()
        _require_einops()
        from monai.networks.nets import SwinUNETR

        crop = to_ntuple(crop_size, 3, "crop_size")
        if any(c % 32 for c in crop):
            raise ValueError(f"crop_size={crop} must be divisible by 32 for SwinUNETR")
        if feature_size % 12:
            raise ValueError(f"feature_size={feature_size} must be a multiple of 12 for SwinUNETR")
        if deep_supervision:
            raise ValueError("deep_supervision is not available for swin_unetr (one output)")
        self.net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=feature_size,
                             depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                             dropout_path_rate=drop_path_rate, use_checkpoint=use_checkpoint, spatial_dims=3)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.default_crop = crop
        self.deep_supervision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"x spatial shape {tuple(x.shape[2:])} must be divisible by 32")
        return self.net(x)


SWIN_UNETR_SIZES = {
    # MONAI's BTCV configuration (feature size 48), at nnFormer's crop for an equal-crop comparison
    "synapse": dict(crop_size=(64, 128, 128), in_channels=1, num_classes=14, feature_size=48),
    "tiny": dict(crop_size=(32, 64, 64), in_channels=1, num_classes=9, feature_size=12, num_heads=(1, 2, 4, 8)),
}


def build_swin_unetr(**kwargs) -> SwinUNETRNet:
    return SwinUNETRNet(**kwargs)

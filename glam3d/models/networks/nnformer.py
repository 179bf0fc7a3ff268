"""nnFormer (Zhou et al. 2021) and GLAM-nnFormer (Themyr et al. 2023) for 3D segmentation.

Architecture of the official Synapse network (repository 282857341/nnFormer, ``nnFormer_synapse.py``), written
anew on our N-D window blocks (:mod:`glam3d.models.glam`):

* **stem** (:class:`ConvStem`): two ``project`` units, conv3x3 (stride ``(p0, p1/2, p2/2)``) GELU LN conv3x3
  GELU LN, then conv3x3 (stride ``p/2``) GELU LN conv3x3, then LN: ``(B, C_in, D, H, W) -> (B, D/p0, H/p1,
  W/p2, E)`` (channels-last tokens from here on);
* **encoder**: 4 stages of (shifted) window blocks (:class:`~glam3d.models.glam.GLAMLayer`), an output LayerNorm
  per stage (the skip connections), strided-conv :class:`PatchMerging` (GELU, LN, conv3x3 s2, ``C -> 2C``)
  between stages; the last stage is the bottleneck;
* **decoder**: 3 levels, each :class:`PatchExpanding` (LN, transposed conv 2x2x2 s2, ``2C -> C``) of the
  previous output, then a window stage whose first block is "skip attention" (queries: upsampled decoder
  tokens; keys/values: the encoder skip; residual: their sum) and whose next block is a shifted window block;
* **heads**: a transposed conv with kernel = stride = patch size per decoder level (deep supervision: 3 heads,
  outputs ``[full, 1/2, 1/4]``).

Notes on fidelity: the relative position index here is the standard row-major one (the official code's index
formula for 3D windows maps some distinct offsets to the same table row); the table size, hence the parameter
count, is the same. Weights are initialised timm-style (trunc normal .02 for linear layers).

GLAM-nnFormer adds global tokens + G-MSA to every window stage of the encoder (the last one is the
bottleneck) and to every decoder level, and replaces patch expanding by NLU (:class:`~glam3d.models.nlu.NLU`).
Switches (the paper's ablations and the two readings of its block): ``num_global_tokens`` (int or one per
encoder stage; 0 = nnFormer), ``glam_variant`` (``"authors"`` default, ``"paper"``), ``gmsa``, ``nlu``,
``nlu_form``, ``glam_decoder``, ``global_pos_embed``, ``global_clamp``. Stages whose map (at ``crop_size``) is one
window (``N_r == 1``: stages 3-4 of the Synapse config) keep their global tokens: G-MSA there has nothing to
connect, but the tokens still carry learned memory into every window attention (paper sec. 3); with
``glam_single_window=False`` such stages have none. Global tokens do not leave their level, so no G-MSA runs
after a level's last block (it would be dead): see :class:`~glam3d.models.glam.GLAMLayer`.

Usage::

    net = build_model("glam_nnformer_tiny")
    logits = net.eval()(torch.randn(1, 1, 32, 64, 64))   # (1, 9, 32, 64, 64)
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn

from ..glam import DEFAULT_GLAM_VARIANT, GLAMLayer, check_glam_variant, window_geometry
from ..layers import conv_as_gemm, gemm_conv_pays, to_ntuple
from ..nlu import NLU, NLU_FORMS
from ..registry import records_arguments

__all__ = ["ConvStem", "PatchMerging", "PatchExpanding", "NnFormer", "build_nnformer", "build_glam_nnformer",
           "NNFORMER_SIZES"]


def _linspace(stop: float, n: int) -> List[float]:
    """``torch.linspace(0, stop, n)`` as floats (device-independent)."""
    return [stop * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _cl(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (B, *S, C)`` (view)."""
    return x.movedim(1, -1)


def _cf(x: torch.Tensor) -> torch.Tensor:
    """``(B, *S, C) -> (B, C, *S)`` (view)."""
    return x.movedim(-1, 1)


def _channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """A one-channel CPU image ``(B, 1, *S)`` viewed with channels-last strides: the same memory (a size-1 axis's
    stride is free) and the same values out of the convolution, but oneDNN then writes the stem convolution's
    output channels-last instead of computing in that layout and copying it back (bf16 on an AMX CPU: 28 -> 6 ms
    for the Synapse crop's first convolution), and the LayerNorm after it reads it without a copy. Other inputs
    are returned as they are."""
    if x.device.type != "cpu" or x.ndim != 5 or x.shape[1] != 1 or not x.is_contiguous():
        return x
    return x.as_strided(x.shape, (x.stride(0), 1, *x.stride()[2:]))


class _Project(nn.Module):
    """conv3x3(stride) GELU LN conv3x3 [GELU LN]: ``(B, C_in, *S) -> (B, C_out, *S/stride)``."""

    def __init__(self, in_dim: int, out_dim: int, stride: Sequence[int], last: bool):
        super().__init__()
        self.conv1 = nn.Conv3d(in_dim, out_dim, 3, stride=tuple(stride), padding=1)
        self.conv2 = nn.Conv3d(out_dim, out_dim, 3, stride=1, padding=1)
        self.act = nn.GELU()
        self.norm1 = nn.LayerNorm(out_dim)
        self.norm2 = None if last else nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _cf(self.norm1(_cl(self.act(self.conv1(x)))))
        x = self.conv2(x)
        if self.norm2 is not None:
            x = _cf(self.norm2(_cl(self.act(x))))
        return x


class ConvStem(nn.Module):
    """nnFormer's convolutional patch embedding: ``(B, C_in, D, H, W) -> (B, D/p0, H/p1, W/p2, E)``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: Sequence[int]):
        super().__init__()
        p = tuple(patch_size)
        stride1 = (p[0], p[1] // 2, p[2] // 2)
        stride2 = (p[0] // 2, p[1] // 2, p[2] // 2)
        if any(s < 1 for s in stride1 + stride2) or any(a * b != c for a, b, c in zip(stride1, stride2, p)):
            raise ValueError(f"patch_size={p} must be (2a, 2b, 2c)-like: (p0, p1/2, p2/2) * (p0/2, p1/2, p2/2) = p")
        self.proj1 = _Project(in_channels, embed_dim // 2, stride1, last=False)
        self.proj2 = _Project(embed_dim // 2, embed_dim, stride2, last=True)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_cl(self.proj2(self.proj1(_channels_last_input(x)))))


class PatchMerging(nn.Module):
    """GELU, LN, conv3x3 stride 2: ``(B, *S, C) -> (B, *S/2, 2C)`` (channels-last in and out)."""

    def __init__(self, dim: int):
        super().__init__()
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Conv3d(dim, 2 * dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.act(x))
        if gemm_conv_pays(x, self.reduction):  # the weight dwarfs the map (the last merging): one GEMM
            return conv_as_gemm(x, self.reduction)
        return _cl(self.reduction(_cf(x)))


class PatchExpanding(nn.Module):
    """LN, transposed conv 2 stride 2: ``(B, *S, C) -> (B, *2S, C/2)`` (channels-last in and out)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.ConvTranspose3d(dim, dim // 2, 2, stride=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return _cl(self.up(_cf(self.norm(x))))


class _NLUUp(nn.Module):
    """NLU in place of patch expanding: ``(low (B, *S, 2C), skip (B, *2S, C)) -> (B, *2S, C)``."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], form: str = "block"):
        super().__init__()
        self.nlu = NLU(2 * dim, dim, num_heads, tuple(window_size), form=form)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.nlu.forward_tokens(x, skip)


@records_arguments
class NnFormer(nn.Module):
    """nnFormer / GLAM-nnFormer 3D segmentation network.

    Args:
        crop_size: the input size the network is made for ``(D, H, W)`` (``default_crop``; sizes the global
            position embeddings and decides which stages have a single window).
        in_channels, num_classes: input channels, output classes (background included).
        embed_dim: channels of stage 1 (doubling per stage).
        depths, num_heads, window_size: per encoder stage (4 entries; the decoder levels 1-3 reuse stages 1-3's).
        patch_size: stem stride ``(p0, p1, p2)``.
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: as in nnFormer (encoder and decoder each
            spread ``drop_path_rate`` linearly over their blocks).
        deep_supervision: training-mode output ``[full, 1/2, 1/4]``.
        num_global_tokens: GLAM tokens per window, int or one per encoder stage (0 = vanilla nnFormer).
        glam_variant, gmsa, global_pos_embed, global_clamp: GLAM options (:class:`~glam3d.models.glam.GLAMLayer`);
            the position tables are sized from ``crop_size`` (authors variant: ``N_r * N_g`` rows per level).
        global_num_heads: heads of each stage's G-MSA, int or one per encoder stage (the decoder levels reuse
            stages 1-3's); default ``num_heads``. The paper leaves it open; it changes neither the parameters nor
            the multiply-adds, only how the attention is split (head dimension 64 runs at the CPU flash kernel's
            matmul peak: ``docs/performance.md``).
        glam_decoder: global tokens in the decoder stages too (with the encoder stage's count).
        glam_single_window: global tokens also in stages whose map is one window at ``crop_size`` (default);
            False: none there.
        nlu: upsample with NLU instead of patch expanding in the decoder.
        nlu_form: ``"block"`` (the authors' NLU; its attention at the low-resolution level's width and heads) or
            ``"attention"`` (attention alone, at the skip's width and heads); see :mod:`glam3d.models.nlu`.

    Forward: ``x (B, C_in, D, H, W)`` with ``D, H, W`` divisible by ``patch_size * 2**(stages-1)`` -> logits
    ``(B, K, D, H, W)``; a list ``[full, 1/2, 1/4]`` in training mode when ``deep_supervision``.
    """

    spatial_dims = 3

    def __init__(self, crop_size=(64, 128, 128), in_channels: int = 1, num_classes: int = 14, embed_dim: int = 192,
                 depths=(2, 2, 2, 2), num_heads=(6, 12, 24, 48), window_size=(4, 4, 8, 4), patch_size=(2, 4, 4),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, deep_supervision: bool = True, num_global_tokens=0,
                 gmsa: bool = True, nlu: bool = False, glam_decoder: bool = True, glam_single_window: bool = True,
                 global_pos_embed: bool | None = None, global_clamp: bool = False, global_num_heads=None,
                 glam_variant: str = DEFAULT_GLAM_VARIANT, nlu_form: str = "block"):
        super().__init__()
        check_glam_variant(glam_variant)
        if nlu_form not in NLU_FORMS:
            raise ValueError(f"nlu_form={nlu_form!r} must be one of {NLU_FORMS}")
        n = len(depths)
        if n < 2:
            raise ValueError(f"depths={depths} needs at least 2 stages")
        for name, v in (("num_heads", num_heads), ("window_size", window_size)):
            if len(v) != n:
                raise ValueError(f"{name}={v} must have one entry per stage ({n}, from depths)")
        crop = to_ntuple(crop_size, 3, "crop_size")
        patch = to_ntuple(patch_size, 3, "patch_size")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels} must be >= 1")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        dims = [embed_dim * 2 ** i for i in range(n)]
        gh = list(num_heads) if global_num_heads is None else list(to_ntuple(global_num_heads, n,
                                                                                 "global_num_heads"))
        for name, heads in (("num_heads", num_heads), ("global_num_heads", gh)):
            for i, (d, h) in enumerate(zip(dims, heads)):
                if h < 1 or d % h:
                    raise ValueError(f"{name}[{i}]={h} must divide the stage dim {d} (embed_dim={embed_dim})")
        self.divisor = tuple(p * 2 ** (n - 1) for p in patch)
        if any(c % dv for c, dv in zip(crop, self.divisor)):
            raise ValueError(f"crop_size={crop} must be divisible by patch_size * 2**{n - 1} = {self.divisor}")
        ng = list(to_ntuple(num_global_tokens, n, "num_global_tokens"))
        res = [tuple(c // p // 2 ** i for c, p in zip(crop, patch)) for i in range(n)]
        windows = [to_ntuple(w, 3, "window_size") for w in window_size]
        self.single_window = [math.prod(window_geometry(r, w, False)[3]) == 1 for r, w in zip(res, windows)]
        if not glam_single_window:
            ng = [0 if single else k for k, single in zip(ng, self.single_window)]
        self.in_channels, self.num_classes = in_channels, num_classes
        self.default_crop = crop
        self.deep_supervision = deep_supervision
        self.patch_size = patch
        self.num_global_tokens = ng
        self.glam_variant = glam_variant

        glam = dict(gmsa=gmsa, glam_variant=glam_variant, global_pos_embed=global_pos_embed,
                    global_clamp=global_clamp, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                    attn_drop=attn_drop_rate)
        self.stem = ConvStem(in_channels, embed_dim, patch)
        self.pos_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        dpr = _linspace(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        self.skip_norms = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i in range(n):
            self.stages.append(GLAMLayer(dims[i], depths[i], num_heads[i], windows[i], num_global_tokens=ng[i],
                                         global_num_heads=gh[i],
                                         drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                                         input_resolution=res[i], **glam))
            self.skip_norms.append(nn.LayerNorm(dims[i]))
            if i < n - 1:
                self.downsamples.append(PatchMerging(dims[i]))

        # decoder levels n-2 .. 0 (stored by level index); drop path grows towards full resolution
        dec_depths = list(depths[:n - 1])
        ddpr = _linspace(drop_path_rate, sum(dec_depths))
        self.ups = nn.ModuleList()
        self.dec_stages = nn.ModuleList()
        for k in range(n - 1):
            j = n - 2 - k  # position in application order
            start = sum(dec_depths[n - 2 - t] for t in range(j))
            if nlu:
                heads = num_heads[k + 1] if nlu_form == "block" else num_heads[k]
                self.ups.append(_NLUUp(dims[k], heads, windows[k + 1], nlu_form))
            else:
                self.ups.append(PatchExpanding(dims[k + 1]))
            self.dec_stages.append(GLAMLayer(dims[k], dec_depths[k], num_heads[k], windows[k],
                                             num_global_tokens=ng[k] if glam_decoder else 0, global_num_heads=gh[k],
                                             drop_path=ddpr[start:start + dec_depths[k]], input_resolution=res[k],
                                             cross_attention=True, **glam))
        n_heads = n - 1 if deep_supervision else 1
        self.heads = nn.ModuleList([nn.ConvTranspose3d(dims[k], num_classes, patch, stride=patch)
                                    for k in range(n_heads)])

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, D, H, W) (3 spatial axes), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, expected in_channels={self.in_channels}")
        if any(s % d for s, d in zip(x.shape[2:], self.divisor)):
            raise ValueError(f"x spatial shape {tuple(x.shape[2:])} must be divisible by {self.divisor} "
                             f"(patch_size * 2**(stages-1))")

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        t = self.pos_drop(self.stem(x))                 # (B, *S0, E)
        skips: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            t, _ = stage.forward_tokens(t, need_global=False)
            skips.append(self.skip_norms[i](t))
            if i < len(self.downsamples):
                t = self.downsamples[i](t)
        t = skips[-1]
        all_levels = self.deep_supervision and self.training
        outs = []
        for k in range(len(self.dec_stages) - 1, -1, -1):
            up = self.ups[k](t, skips[k])
            t, _ = self.dec_stages[k].forward_tokens(up, skips[k], need_global=False)
            skips[k + 1] = skips[k] = up = None  # (freed as soon as used: lower peak memory in inference)
            if all_levels:
                outs.append(t)                          # levels n-2 .. 0
        if all_levels:
            return [self.heads[k](_cf(outs[-1 - k])) for k in range(len(self.heads))]
        return self.heads[0](_cf(t))


# ---------------------------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------------------------
NNFORMER_SIZES = {
    # the official Synapse configuration (nnFormerTrainerV2_nnformer_synapse)
    "synapse": dict(crop_size=(64, 128, 128), in_channels=1, num_classes=14, embed_dim=192, depths=(2, 2, 2, 2),
                    num_heads=(6, 12, 24, 48), window_size=(4, 4, 8, 4), patch_size=(2, 4, 4),
                    deep_supervision=True),
    # trains on a laptop CPU: 16^3 tokens at stage 1, the 8 evaluated Synapse organs + background
    "tiny": dict(crop_size=(32, 64, 64), in_channels=1, num_classes=9, embed_dim=24, depths=(2, 2, 2, 2),
                 num_heads=(2, 4, 8, 16), window_size=(4, 4, 4, 2), patch_size=(2, 4, 4), deep_supervision=True,
                 drop_path_rate=0.1),
}

GLAM_DEFAULTS = dict(num_global_tokens=10, gmsa=True, nlu=True, glam_decoder=True)


def build_nnformer(**kwargs) -> NnFormer:
    """Vanilla nnFormer (no global tokens, patch expanding)."""
    for key in ("num_global_tokens", "nlu"):
        if kwargs.get(key):
            raise ValueError(f"{key} is a glam_nnformer option; nnformer is the vanilla network")
    return NnFormer(**kwargs)


def build_glam_nnformer(**kwargs) -> NnFormer:
    """GLAM-nnFormer: nnFormer + global tokens / G-MSA in every window stage + NLU (all switchable)."""
    cfg = dict(GLAM_DEFAULTS)
    cfg.update(kwargs)
    return NnFormer(**cfg)

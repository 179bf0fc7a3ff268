"""Generic layers shared by the networks: MLP, DropPath, tuple helpers, weight init.

Shapes: every layer here works on channels-last tokens ``(..., C)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["to_ntuple", "Mlp", "DropPath", "init_weights_trunc_normal", "linear", "CHUNK_TOKENS",
           "chunked_inference", "add_mlp_", "conv_as_gemm", "gemm_conv_pays"]

_LINEAR_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _fused_ok(x: torch.Tensor, lin: nn.Linear) -> bool:
    """oneDNN fused linear applies: CPU fp32 inference (no autograd, no autocast), not under ``torch.compile``
    (which fuses bias and GELU itself)."""
    return (_LINEAR_POINTWISE is not None and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype == torch.float32
            and lin.weight.dtype == torch.float32 and lin.bias is not None and torch.backends.mkldnn.is_available()
            and not (torch.is_grad_enabled() and (x.requires_grad or lin.weight.requires_grad))
            and not torch.is_autocast_enabled("cpu")
            and not (lin._forward_hooks or lin._forward_pre_hooks))  # hooks keep seeing the module called


def linear(x: torch.Tensor, lin: nn.Linear, act: str | None = None) -> torch.Tensor:
    """``lin(x)`` (then ``act``: None or ``"gelu"``, exact erf GELU) on ``(..., C_in) -> (..., C_out)``.

    On CPU in fp32 inference this is one oneDNN matmul with the bias (and GELU) fused as post-ops: no separate
    pass to broadcast the bias into the output (what ``addmm`` does) nor to apply GELU. Elsewhere (training,
    GPU, autocast) it is exactly ``F.gelu(lin(x))`` / ``lin(x)``. Results agree to float rounding.
    """
    if _fused_ok(x, lin):
        shape = x.shape
        y = _LINEAR_POINTWISE(x.reshape(-1, shape[-1]), lin.weight, lin.bias, act or "none", [], "none")
        return y.view(*shape[:-1], y.shape[-1])
    y = lin(x)
    return torch.nn.functional.gelu(y) if act == "gelu" else y


#: CPU inference: window attention runs on groups of windows of at most this many tokens, and a block's MLP on
#: this many tokens at a time, each written into (added onto) one output: per-block temporaries stay ~20-40 MB
#: (a stage-1 Synapse map would otherwise hold a 75 MB QKV and a 100 MB MLP hidden layer per image at once)
CHUNK_TOKENS = 8192


def chunked_inference(x: torch.Tensor) -> bool:
    """Token-wise work on ``x`` may run in chunks and in place: CPU, no autograd, not traced by torch.compile.
    (On a GPU the extra kernel launches would cost more than the memory is worth.)"""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def add_mlp_(x: torch.Tensor, norm: nn.Module, mlp: nn.Module, chunk: int | None = None) -> torch.Tensor:
    """``x += mlp(norm(x))`` in place, ``chunk`` (default :data:`CHUNK_TOKENS`) tokens at a time (``x (..., C)``
    contiguous, no autograd): the pre-LN residual MLP of a transformer block without its full-size
    temporaries. Returns ``x``."""
    chunk = chunk or CHUNK_TOKENS
    flat = x.view(-1, x.shape[-1])
    for i in range(0, flat.shape[0], chunk):
        rows = flat[i:i + chunk]
        rows += mlp(norm(rows))
    return x


def gemm_conv_pays(x: torch.Tensor, conv: nn.Module, factor: int = 4) -> bool:
    """CPU float32 inference and a convolution (float32 weight in the standard layout) whose weight is ``factor``
    times larger than its im2col patches (``x (B, *S, C)`` channels-last): then :func:`conv_as_gemm` beats the
    convolution kernel."""
    if not chunked_inference(x) or x.dtype != torch.float32 or conv.weight.dtype != torch.float32 \
            or not conv.weight.is_contiguous() or getattr(conv, "groups", 1) != 1 \
            or getattr(conv, "padding_mode", "zeros") != "zeros" or any(d != 1 for d in conv.dilation):
        return False
    out = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip(x.shape[1:-1], conv.kernel_size, conv.stride,
                                                             conv.padding)]
    cols = x.shape[0] * math.prod(out) * conv.weight[0].numel()
    return conv.weight.numel() >= factor * cols


def conv_as_gemm(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv`` (an ``nn.Conv2d``/``Conv3d``, zero padding, no groups or dilation) on a channels-last map
    ``x (B, *S, C)`` -> ``(B, *S_out, C_out)`` channels-last, as one GEMM of the im2col patches with the
    weight read in place.

    For nnFormer's last patch merging (a 127 MB weight, 4^3 outputs per image) oneDNN's convolution copies
    the weight to the input's layout and reorders it in every call: ~250 MB of transient memory and 50 ms on a
    2-core CPU; this takes ~10 MB and 30 ms. Equal to the convolution up to float rounding."""
    d = x.ndim - 2
    pad = []
    for p in reversed(conv.padding):
        pad += [p, p]
    cols = F.pad(x, [0, 0] + pad)  # (B, *S + 2p, C)
    for i, (k, st) in enumerate(zip(conv.kernel_size, conv.stride)):
        cols = cols.unfold(1 + i, k, st)  # (B, *S_out, C, *k)
    out = cols.shape[1:1 + d]
    y = F.linear(cols.reshape(x.shape[0] * math.prod(out), -1), conv.weight.view(conv.out_channels, -1),
                 conv.bias)
    return y.view(x.shape[0], *out, conv.out_channels)


def to_ntuple(value, n: int, name: str = "value") -> tuple:
    """``4 -> (4,)*n``; a sequence must have length ``n`` (ValueError naming ``name`` otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, Sequence) and not isinstance(value, str):
        t = tuple(value)
        if len(t) != n:
            raise ValueError(f"{name}={value!r} has {len(t)} entries, expected {n}")
        return t
    raise ValueError(f"{name}={value!r} must be a number or a sequence of {n} numbers")


class Mlp(nn.Module):
    """Two-layer perceptron ``(..., C) -> (..., C_out)``: fc1, GELU, dropout, fc2, dropout."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act, nn.GELU) and self.act.approximate == "none" and _fused_ok(x, self.fc1):
            return self.drop(linear(self.drop(linear(x, self.fc1, "gelu")), self.fc2))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample: ``(B, ...) -> (B, ...)``; identity in eval mode or when ``p == 0``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path={p} must be in [0, 1)")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def init_weights_trunc_normal(module: nn.Module) -> None:
    """timm/Swin init: Linear weights ~ trunc normal(std .02), biases 0, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

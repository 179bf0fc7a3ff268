"""Generic layers shared by the networks: MLP, DropPath, tuple helpers, weight init.

Shapes: every layer here works on channels-last tokens ``(..., C)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["to_ntuple", "Mlp", "DropPath", "init_weights_trunc_normal", "linear"]

_LINEAR_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _fused_ok(x: torch.Tensor, lin: nn.Linear) -> bool:
    """oneDNN fused linear applies: CPU fp32 inference (no autograd, no autocast), not under ``torch.compile``
    (which fuses bias and GELU itself)."""
    return (_LINEAR_POINTWISE is not None and not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
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

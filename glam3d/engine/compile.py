"""``torch.compile`` for glam3d networks, for training and for sliding-window inference.

Every glam3d network (GLAM-nnFormer, nnFormer, the 2D GLAM-Swin variants) traces as **one graph** with static
shapes: the window index and shift-mask builders of :mod:`glam3d.models.window` are plain tensor code of the
shapes (no data-dependent op), the inference caches and oneDNN fused linears step aside while tracing. So a
compiled network is compiled once per input shape (training crop; sliding-window batch) and never falls back
to eager in the middle of a forward.

Usage::

    net = compile_network(model, inference=True, device="cpu", batch_size=2)  # glam3d predict --compile
    labels = predict_volume(net, image, roi, sw_batch_size=2)  # every forward a (2, C, *roi) batch: one graph

What it buys: on a GPU the eager forward at batch 1 waits on kernel dispatch (``docs/performance.md``,
"Where GLAM-nnFormer's extra time goes"); fewer, fused kernels (and CUDA graphs with
``mode="reduce-overhead"``) are what should pay there
(``glam3d bench --sections compiled``; not yet measured on a GPU). On a 2-core CPU (fp32,
Synapse-size networks) compiling takes 40–140 s per network and the compiled forward is no faster than the tuned
eager one (compiled / eager 0.99–1.10 in two benchmark runs). Training compiles forward and backward.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["COMPILE_MODES", "compile_network", "FixedBatch"]

#: ``torch.compile`` modes accepted by :func:`compile_network` (``glam3d predict --compile MODE``)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_network(model: torch.nn.Module, *, inference: bool, device: torch.device | str,
                    mode: Optional[str] = None, batch_size: Optional[int] = None) -> Callable:
    """``torch.compile(model, dynamic=False)`` with the settings glam3d uses.

    Args:
        model: the network (already on ``device``); its weights must not change afterwards when ``inference``.
        inference: compile for ``torch.no_grad`` forwards only. On CPU this turns on inductor *freezing*
            (weights folded into the graph as constants, convolution and linear weights pre-packed for oneDNN):
            the part of the speed-up that beats glam3d's eager fused linears.
        device: where it runs (``cpu`` or ``cuda[:N]``).
        mode: a ``torch.compile`` mode (:data:`COMPILE_MODES`); default ``"default"``.
        batch_size: with ``inference``, wrap the compiled network in :class:`FixedBatch`, so a smaller last
            sliding-window batch is padded to this size instead of compiling the network a second time.

    Returns the compiled callable (an ``nn.Module`` wrapper; ``.eval()`` reaches the original network).
    """
    mode = mode or "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; one of {', '.join(COMPILE_MODES)}")
    device = torch.device(device)
    # static shapes: the window helpers need Python ints; a new shape compiles a new graph (rare: fixed crops)
    kwargs = {"dynamic": False}
    if inference and device.type == "cpu" and mode == "default":
        kwargs["options"] = {"freezing": True}  # torch.compile takes either options or a mode, not both
    else:
        kwargs["mode"] = mode
    net = torch.compile(model, **kwargs)
    if inference and batch_size is not None:
        return FixedBatch(net, int(batch_size))
    return net


class FixedBatch(torch.nn.Module):
    """Call a network always with ``batch_size`` samples: a smaller batch ``(b, C, *S)`` is zero-padded to
    ``(batch_size, C, *S)`` and the outputs cut back to ``b`` (each output of a list/tuple). A compiled network
    with static shapes then keeps one graph for a whole sliding window whose last batch is short."""

    def __init__(self, net: Callable, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net = net
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor):
        b = x.shape[0]
        if b > self.batch_size:
            raise ValueError(f"batch of {b} exceeds the fixed batch size {self.batch_size}")
        if b < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - b,) + tuple(x.shape[1:]))])
        out = self.net(x)
        if b == self.batch_size:
            return out
        if isinstance(out, (list, tuple)):
            return type(out)(o[:b] for o in out)
        return out[:b]

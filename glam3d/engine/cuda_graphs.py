"""A network's inference forward captured once as a CUDA graph and replayed, for sliding-window inference on GPUs.

At the batch sizes of a sliding window (1-4 windows) a GPU forward of these networks waits on the host: every
one of its ~700-1,000 kernels is dispatched from Python, ≈ 28 µs each, so fp32 and bf16 take the same time and
GLAM's extra small ops (global tokens joined to and split from the windows, G-MSA's second layer) cost time in
proportion to their number, not their FLOPs (``docs/performance.md``). A CUDA graph records
the kernels of one forward once and launches them all from one call: the time becomes the kernels' own.
Unlike ``torch.compile(mode="reduce-overhead")`` (``glam3d predict --compile reduce-overhead``) nothing is
compiled: capturing costs a few forwards (well under a second), the kernels are the eager ones.

Usage::

    net = graphed_network(model, batch_size=2)      # glam3d predict --cuda-graphs
    with torch.inference_mode():
        labels = predict_volume(net, image, roi, sw_batch_size=2, device="cuda")

Rules a captured forward keeps: fixed input shape, dtype and autocast setting per graph (each new combination is
captured once more; :func:`graphed_network` pads the short last window batch so a sliding window needs one);
inference only (no autograd); the network's weights must not change after the capture — the graph also reads
the attention masks the networks cache from their bias tables, which a weight change makes stale — so call
:meth:`CudaGraphForward.reset` after loading new weights. Every tensor the graph reads that existed before the
capture (weights, cached masks and window indices) is kept alive with the graph, so a cache evicting it cannot
free memory a replay still reads. The input is copied into the graph's own buffer and the outputs are copied
out of it, so a caller may keep a result across calls.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..inference.precision import autocast_to

__all__ = ["capture_forward", "tensors_read", "CudaGraphForward", "CudaGraphCaptureError", "graphed_network"]


class CudaGraphCaptureError(RuntimeError):
    """The forward could not be captured (an op in it syncs with the host, or makes a CPU tensor, …)."""


class _ReadTensors(TorchDispatchMode):
    """Records the tensors an op sequence reads that it did not make itself (``kept``): the memory a captured
    graph reads besides its own pool. Tensors made inside are only counted by ``id``, not held (holding them
    would keep the capture from reusing its own intermediate memory)."""

    def __init__(self):
        super().__init__()
        self.kept: Dict[int, torch.Tensor] = {}
        self._made: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self._made:
                self.kept.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.kept:
                self._made.add(id(t))
        return out


def tensors_read(fn, *args) -> Tuple[object, List[torch.Tensor]]:
    """``(fn(*args), the tensors it read that existed before the call)``: for a network its input, weights,
    cached masks and window indices — not its intermediates."""
    mode = _ReadTensors()
    with mode:
        out = fn(*args)
    return out, list(mode.kept.values())


def capture_forward(net, x: torch.Tensor, amp: Optional[torch.dtype] = None, warmup: int = 3):
    """Capture ``net(x)`` as a CUDA graph.

    Args:
        net: a network on ``x``'s CUDA device (eval mode).
        x: the graph's static input ``(B, C, *S)``; later replays read whatever it holds then.
        amp: autocast dtype (bf16 / fp16) or None for full precision.
        warmup: forwards run first on a side stream (cuBLAS / cuDNN workspaces, lazily loaded kernels and the
            networks' cached masks and window indices are made outside the capture).

    Returns ``(graph, out, kept)``: ``graph.replay()`` recomputes ``out`` (the network's output tensor(s), in
    the graph's private memory pool) from the current contents of ``x``; ``kept``: the tensors the graph reads
    outside its pool, to hold as long as the graph.
    """
    device = x.device
    with torch.cuda.device(device):  # stream, pool and capture on x's GPU, whichever one is current
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode(), autocast_to("cuda", amp, cache=False):
            for _ in range(warmup):
                net(x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with (torch.cuda.graph(graph, stream=side), torch.inference_mode(),
              autocast_to("cuda", amp, cache=False)):
            out, kept = tensors_read(net, x)
    return graph, out, kept


def _clone(out):
    if isinstance(out, (list, tuple)):
        return type(out)(o.clone() for o in out)
    return out.clone()


class CudaGraphForward(torch.nn.Module):
    """``net``'s forward, replayed from a CUDA graph captured at its first call with each input signature.

    ``forward(x)``: ``x`` ``(B, C, *S)`` on a CUDA device, under ``torch.no_grad`` / ``torch.inference_mode``;
    returns the same as ``net(x)`` (fresh tensors). A signature is ``(shape, dtype, device, autocast dtype)``:
    the ambient ``torch.autocast("cuda")`` setting at the call is the one captured, as the eager call would use it.
    """

    def __init__(self, net: torch.nn.Module, warmup: int = 3):
        super().__init__()
        self.net = net
        self.warmup = warmup
        # signature -> (graph, its static input, its outputs, the tensors it reads outside its pool)
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, object, list]] = {}

    def forward(self, x: torch.Tensor):
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the input on a CUDA device, got {x.device}")
        if torch.is_grad_enabled():
            raise RuntimeError("CudaGraphForward is for inference: call it under torch.no_grad() or "
                               "torch.inference_mode()")
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(x.shape), x.dtype, x.device, amp)
        with torch.inference_mode(), torch.cuda.device(x.device):
            if key not in self._graphs:
                static = x.clone()
                try:
                    graph, out, kept = capture_forward(self.net, static, amp, self.warmup)
                except torch.cuda.OutOfMemoryError:
                    raise  # the eager forward would run out of memory too
                except Exception as err:  # an op that syncs with the host, a CPU tensor made in the forward…
                    msg = (str(err).strip().splitlines() or ["?"])[0][:200]
                    raise CudaGraphCaptureError(
                        f"capturing the network's forward as a CUDA graph failed ({type(err).__name__}: {msg}); "
                        "run it eagerly instead (glam3d predict --no-cuda-graphs)") from err
                self._graphs[key] = (graph, static, out, kept)
            graph, static, out, _ = self._graphs[key]
            static.copy_(x)
            graph.replay()
        return _clone(out)  # outside inference mode: ordinary tensors under torch.no_grad

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool); the next call captures afresh (after new weights)."""
        self._graphs.clear()


def graphed_network(model: torch.nn.Module, batch_size: int, warmup: int = 3) -> torch.nn.Module:
    """``model`` for sliding-window inference through CUDA graphs: every batch padded to ``batch_size`` windows
    (:class:`glam3d.engine.compile.FixedBatch`) so that one graph serves the whole scan per autocast setting."""
    from .compile import FixedBatch
    return FixedBatch(CudaGraphForward(model, warmup), batch_size)

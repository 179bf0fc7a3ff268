"""Benchmark: glam3d's networks beside their peers, speed and memory, in one table measured in one run.

:func:`run_bench` measures, for each model (``glam_nnformer``, ``nnformer`` and MONAI's SwinUNETR, at the
``synapse`` and ``tiny`` sizes):

* parameters and multiply-adds per crop (:mod:`glam3d.models.complexity`);
* forward time per crop (median of ``repeats`` after a warm-up, ``torch.inference_mode``, batch 1; all models
  timed *round-robin in one process*, order reversed every other round, so a busy machine slows them alike
  and the ratios stay meaningful; the GLAM / nnFormer forward ratio is the median over rounds of the
  per-round ratio, with a distribution-free 95 % interval: the target reads UNCLEAR when 1.2 lies inside it);
* achieved GFLOP/s (2 x MACs / time) and its fraction of the machine's matmul peak (median of timed
  ``2048^3`` fp32 matmuls, measured by the same run);
* sliding-window throughput (voxels/s) on a ``128x256x256`` volume with
  :func:`glam3d.inference.sliding_window.predict_volume` (overlap 0.5, Gaussian), and its peak memory: each model runs
  in its own child process, so peaks never mix (CPU: the child's peak RSS, ``VmHWM`` / ``ru_maxrss``; GPU:
  ``torch.cuda.max_memory_allocated``); with ``sw_rounds`` > 1 one child per model and round, order reversed
  every round, medians, and the throughput ratios as medians of per-round ratios with their 95 % interval;
* how time and memory grow with the volume (3 sizes) and with the scan length (``512x512x200`` and
  ``512x512x1000``, overlap 0, ``nnformer_synapse``), one child process per line; each long-CT child first
  writes a synthetic int16 CT to a temporary ``.npy`` and infers it from disk to disk
  (:class:`~glam3d.utils.ooc.NpySlabReader`, CT clip + scale as ``normalize``,
  :class:`~glam3d.utils.ooc.NpySlabWriter`), or from an in-memory int16 array (``long_ct_in_memory``);
* the same long scans through the ``glam3d predict`` command (section ``predict_ct``): each written as a
  ``.nii.gz`` int16 CT (0.8 x 0.8 x 2.5 mm), with a checkpoint of the long-CT model (random weights, SGD
  momentum, a plan resampling to ``predict_ct_spacing`` mm — 4 by default so that the scan's reading,
  preprocessing and restoring dominate rather than the network; ``(3, 0.8, 0.8)`` is a Synapse-like fine plan),
  in a child process: its peak RSS, time, and the overlap and batch it ran with;
* a training step of the tiny config (forward + backward + SGD step, batch 2, deep supervision);
* with bf16 autocast (section ``bf16``, default on a GPU and on CPUs with native bf16): forward time and
  sliding-window throughput again, and the bf16 matmul peak;
* on a GPU (section ``graph``): forward time again with each model's forward captured once as a CUDA graph
  and replayed (fp32 and bf16), which takes the host's kernel dispatch out of the time, and the sliding
  window again with the networks replayed from CUDA graphs (:mod:`glam3d.engine.cuda_graphs`, what
  ``glam3d predict --cuda-graphs`` runs), fp32 and bf16;
* with section ``compiled`` (last, it takes minutes): the forwards of ``torch.compile``'d networks;
* on a GPU (section ``gpu``): the longest ``D x 512 x 512`` scan inferred without running out of memory, with
  the GPU peak of every probe.

It then prints the ratios (GLAM-nnFormer / nnFormer forward time, sliding-window throughput ratio, glam3d /
SwinUNETR voxels per second) and PASS / FAIL per target. ``run_bench(cfg, on_section=f)`` calls ``f`` with the
report so far after every section (``res["complete"]`` False), which is how ``glam3d bench --json`` keeps the
measurements of a run that is cut short.

Every result names the hardware setup it was measured on (``res["setup"]``, :func:`machine_setup`), e.g.
``cpu-avx512-amx-2c-torch2.13-fp32-bf16`` or ``gpu-h100-torch2.11-fp32-bf16``: device, CPU vector ISA class
(:func:`cpu_isa_class`) and threads, or GPU model (:func:`gpu_class`); torch's major.minor version; the
precisions measured. :func:`save_result` writes ``DIR/<setup>.json`` and ``.md`` (``glam3d bench --save DIR``), so
one folder holds one current result per setup.

Usage::

    from glam3d.bench import BenchConfig, run_bench, format_report
    result = run_bench(BenchConfig(quick=True))
    print(format_report(result))

``python -m glam3d.bench --worker JSON`` is the child-process entry point (one sliding-window measurement).
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .alloc import allocator_state, preloaded_allocator
from .commands.bench import SECTIONS  # the CLI's list (a light module: no torch import at parse time)
from .inference.precision import autocast_to, inference_weights, resolve_amp

__all__ = ["BenchConfig", "run_bench", "format_report", "to_markdown", "matmul_peak_gflops", "time_forward",
           "TARGETS", "FULL_MODELS", "QUICK_MODELS"]

FULL_MODELS = ["glam_nnformer_synapse", "nnformer_synapse", "swin_unetr_synapse",
               "glam_nnformer_tiny", "nnformer_tiny", "swin_unetr_tiny"]
QUICK_MODELS = ["glam_nnformer_tiny", "nnformer_tiny", "swin_unetr_tiny"]

#: target name -> (description, threshold)
TARGETS = {
    "glam_forward_ratio": ("GLAM-nnFormer / nnFormer forward time <= 1.2", 1.2),
    "glam_sw_ratio": ("GLAM-nnFormer / nnFormer sliding-window voxels/s >= 0.85", 0.85),
    "glam_forward_ratio_graph": ("forward time <= 1.2, each forward replayed from a CUDA graph (GPU, fp32)", 1.2),
    "glam_sw_ratio_graph": ("sliding-window voxels/s >= 0.85, the networks replayed from CUDA graphs (GPU, fp32)",
                            0.85),
    "glam_forward_ratio_graph_bf16": ("forward time <= 1.2, CUDA graphs + bf16 autocast (GPU)", 1.2),
    "glam_sw_ratio_graph_bf16": ("sliding-window voxels/s >= 0.85, CUDA graphs + bf16 autocast (GPU: how glam3d "
                                 "predict runs there by default)", 0.85),
    "nnformer_peak_fraction": ("nnFormer (synapse) forward >= 60% of the matmul peak", 0.60),
    "long_ct_memory": ("sliding window, 512x512x200 and 512x512x1000: both < 2 GB peak RSS", 2.0e9),
    "long_ct_flat": ("sliding-window memory does not grow with the scan length (peak ratio <= 1.10)", 1.10),
    "long_ct_linear": ("sliding-window time linear in the scan's windows (s/window ratio 1000 vs 200 slices in "
                       "[0.8, 1.25])", (0.8, 1.25)),
    "predict_ct_memory": ("glam3d predict, the long-CT scans as .nii.gz: < 2 GB peak RSS", 2.0e9),
}


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures. ``quick``: tiny models and small volumes (tests / CI, seconds)."""

    models: Optional[List[str]] = None          # default: FULL_MODELS, or QUICK_MODELS with quick
    device: str = "cpu"
    repeats: int = 3                            # timed forwards per model (after one warm-up)
    quick: bool = False
    sw_volume: Optional[Sequence[int]] = None   # default (128, 256, 256); quick (48, 96, 96)
    overlap: float = 0.5
    sw_batch_size: int = 2
    sw_rounds: int = 1                          # sliding-window children per model, order reversed every round
    scaling_model: Optional[str] = None         # default nnformer_synapse (overlap 0), quick nnformer_tiny
    scaling_volumes: Optional[List[Sequence[int]]] = None
    scaling_overlap: float = 0.0
    long_ct_model: Optional[str] = None         # default nnformer_synapse, quick nnformer_tiny
    long_ct_volumes: Optional[List[Sequence[int]]] = None
    long_ct_overlap: float = 0.0
    long_ct_in_memory: bool = False             # int16 input array + labels tensor in memory instead of .npy files
    long_ct_sw_batch_size: int = 1              # one window per forward: the activations of one window only
    predict_ct_spacing: Union[float, Sequence[float]] = 4.0  # predict_ct: the checkpoint plan's target spacing
                                                # (mm: one value, isotropic, or sz sy sx)
    predict_ct_probabilities: bool = False      # predict_ct: also write the class probabilities (--probabilities)
    train_model: Optional[str] = None           # default glam_nnformer_tiny
    train_repeats: int = 3
    matmul_size: Optional[int] = None           # default 2048; quick 512
    threads: Optional[int] = None               # torch threads (default: torch's)
    sections: Optional[List[str]] = None        # subset of SECTIONS (default: all; bf16 on CUDA and on CPUs
                                                # with native bf16, graph/compiled/gpu on CUDA only)
    largest_limit: int = 4096                   # gpu section: longest D x 512 x 512 tried
    progress: bool = False

    def resolved(self) -> "BenchConfig":
        c = BenchConfig(**asdict(self))
        q = c.quick
        c.models = list(c.models) if c.models else list(QUICK_MODELS if q else FULL_MODELS)
        c.sw_volume = tuple(c.sw_volume or ((48, 96, 96) if q else (128, 256, 256)))
        c.scaling_model = c.scaling_model or ("nnformer_tiny" if q else "nnformer_synapse")
        c.scaling_volumes = [tuple(v) for v in (c.scaling_volumes or (
            [(32, 64, 64), (64, 64, 64), (128, 64, 64)] if q else
            [(128, 256, 256), (256, 256, 256), (512, 256, 256)]))]
        c.long_ct_model = c.long_ct_model or ("nnformer_tiny" if q else "nnformer_synapse")
        c.long_ct_volumes = [tuple(v) for v in (c.long_ct_volumes or (
            [(64, 128, 128), (320, 128, 128)] if q else [(200, 512, 512), (1000, 512, 512)]))]
        c.train_model = c.train_model or "glam_nnformer_tiny"
        c.matmul_size = c.matmul_size or (512 if q else 2048)
        if q:
            c.repeats = min(c.repeats, 2)
            c.train_repeats = min(c.train_repeats, 2)
        cuda = torch.device(c.device).type == "cuda"
        if not c.sections:
            from .inference.precision import cpu_bf16_native

            bf16 = cuda or (torch.device(c.device).type == "cpu" and cpu_bf16_native())
            c.sections = [s for s in SECTIONS if cuda or s not in ("bf16", "graph", "compiled", "gpu")
                          or (s == "bf16" and bf16)]
        c.sections = list(c.sections)
        return c


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, device="cpu", dtype=torch.float32) -> float:
    """The machine's matmul peak: median GFLOP/s of ``n^3`` products (``2 n^3`` FLOPs each) after one warm-up,
    the best of the two kernels the networks use on a CPU (BLAS ``torch.mm`` and oneDNN's fp32 matmul — on
    some CPUs one is clearly faster); ``torch.mm`` on a GPU."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    kernels = [lambda: torch.mm(a, b, out=out)]
    from .models.layers import _LINEAR_POINTWISE
    if device.type == "cpu" and dtype == torch.float32 and _LINEAR_POINTWISE is not None \
            and torch.backends.mkldnn.is_available():
        bt, zero = b.t().contiguous(), torch.zeros(n, dtype=dtype)
        kernels.append(lambda: _LINEAR_POINTWISE(a, bt, zero, "none", [], "none"))
    best = 0.0
    for run in kernels:
        run()
        _sync(device)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            _sync(device)
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * n ** 3 / statistics.median(ts) / 1e9)
    return best


def _build(name: str, device, seed: int = 0):
    """Build a model spec (``NAME[:key=value]...``, :func:`glam3d.models.parse_model_spec`) in eval mode."""
    from .models import build_model_spec
    torch.manual_seed(seed)
    return build_model_spec(name).to(device).eval()


def _time_rounds(runs: Dict[str, Callable[[], object]], repeats: int, device) -> Dict[str, List[float]]:
    """Seconds per call of each ``runs[name]()``, interleaved: one untimed warm-up round, then ``repeats``
    rounds over all of them, in the given order in even rounds and reversed in odd ones (counterbalanced: a
    model that always ran right after another one would inherit its cache and allocator state)."""
    device = torch.device(device)
    times: Dict[str, List[float]] = {k: [] for k in runs}
    order = list(runs.items())
    for rnd in range(repeats + 1):
        for name, run in (order if rnd % 2 == 0 else order[::-1]):
            _sync(device)
            t = time.perf_counter()
            run()
            _sync(device)
            if rnd:
                times[name].append(time.perf_counter() - t)
    return times


def time_forward(models: Dict[str, torch.nn.Module], inputs: Dict[str, torch.Tensor], repeats: int, device,
                 amp: Optional[torch.dtype] = None) -> Dict[str, List[float]]:
    """Seconds per forward (``torch.inference_mode``, optional autocast), timed by :func:`_time_rounds`."""
    device = torch.device(device)

    def runner(m, x):
        def run():
            with torch.inference_mode(), autocast_to(device, amp):
                m(x)
        return run

    return _time_rounds({n: runner(m, inputs[n]) for n, m in models.items()}, repeats, device)


def _one_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"`` (at most 160 characters of it), for a table cell."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or ['?'])[0][:160]}"


class _Captured:
    """A captured forward and the tensors it reads outside its pool (held as long as it is)."""

    def __init__(self, graph, kept):
        self.graph, self.kept = graph, kept

    def replay(self) -> None:
        self.graph.replay()


def capture_graphs(models: Dict[str, torch.nn.Module], inputs: Dict[str, torch.Tensor], device,
                   amp: Optional[torch.dtype] = None) -> Dict[str, object]:
    """CUDA only: each model's forward on its (static) input captured once as a CUDA graph
    (:func:`glam3d.engine.cuda_graphs.capture_forward`), so that a replay launches every kernel of the forward
    without the host dispatching them one by one (at batch 1 a fast GPU spends most of an eager forward waiting
    on that dispatch). Returns name -> a captured forward (``replay()``), or the one-line error of a failed
    capture."""
    from .engine.cuda_graphs import capture_forward
    out: Dict[str, object] = {}
    for name, m in models.items():
        try:
            graph, _, kept = capture_forward(m, inputs[name], amp)
            out[name] = _Captured(graph, kept)
        except Exception as err:  # report it in the table, measure the others
            out[name] = _one_line(err)
    return out


def compile_models(models: Dict[str, torch.nn.Module], inputs: Dict[str, torch.Tensor], device,
                   rows: Dict[str, dict]) -> Dict[str, Callable]:
    """Each model through :func:`glam3d.engine.compile.compile_network` for inference (static shapes; frozen
    weights on CPU) and called once on its input, which compiles it: ``rows[name]["compile_s"]`` is that first
    call. A model that fails to compile gets ``forward_compiled_error`` (one line) and is left out."""
    from .engine.compile import compile_network
    out = {}
    for name, m in models.items():
        try:
            c = compile_network(m, inference=True, device=device)
            _sync(device)
            t = time.perf_counter()
            with torch.inference_mode():
                c(inputs[name])
            _sync(device)
            rows[name]["compile_s"] = time.perf_counter() - t
            out[name] = c
        except Exception as err:  # report it in the table, measure the others
            rows[name]["forward_compiled_error"] = _one_line(err)
    return out


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss() -> int:
    """Peak RSS of this process in bytes. Linux: ``VmHWM`` (per address space: ``ru_maxrss`` survives
    ``execve`` and would report the parent's peak in a child); elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # bytes (macOS reports bytes, Linux KiB)


#: CT window of the synthetic long-CT input (HU), scaled to [0, 1] per window by ``normalize``
CT_CLIP = (-125.0, 275.0)


def _ct_normalize(x: torch.Tensor) -> torch.Tensor:
    """Elementwise CT preprocessing (clip to :data:`CT_CLIP`, scale to [0, 1]), in place on a float window."""
    lo, hi = CT_CLIP
    return x.clamp_(lo, hi).sub_(lo).div_(hi - lo)


def _synthetic_ct_planes(d0: int, d1: int, hw, channels: int = 1) -> torch.Tensor:
    """Planes ``[d0, d1)`` of a reproducible synthetic CT, int16 HU in [-1024, 1500): ``(channels, n, H, W)``."""
    g = torch.Generator().manual_seed(1000003 * d0 + 17)
    return torch.randint(-1024, 1500, (channels, d1 - d0, *hw), generator=g, dtype=torch.int16)


def _child_setup(spec: dict):
    """Threads, device and model of a child-process measurement: ``(device, model, roi, volume)``."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    model = _build(spec["model"], device)
    roi = tuple(model.default_crop)
    spec["in_channels"] = model.in_channels
    if device.type == "cpu":  # bf16 on a CPU: weights cast once, as glam3d predict runs it
        inference_weights(model, resolve_amp(spec.get("amp", False), device))
    if spec.get("cuda_graphs"):  # captured by the warm-up batch below, replayed by the timed pass
        from .engine.cuda_graphs import graphed_network
        model = graphed_network(model, spec["sw_batch_size"])
    spec["warmed_up"] = _warm_up(model, device, roi, spec)
    return device, model, roi, tuple(spec["volume"])


def _warm_up(model, device: torch.device, roi, spec: dict) -> bool:
    """One untimed forward of a batch of windows (same batch size and autocast as the measurement) before a
    sliding-window line is timed — on CUDA always (the first use of each kernel loads it lazily and creates the
    cuBLAS / cuDNN handles: seconds, paid once by a long-running inference, and different for fp32 and bf16),
    elsewhere only when ``spec["warmup"]`` (CPU lines are measured cold, so they stay comparable with each
    other; CPU first-call costs are small beside a 5 s window). Returns whether it ran."""
    if device.type != "cuda" and not spec.get("warmup"):
        return False
    amp = resolve_amp(spec.get("amp", False), device)
    x = torch.randn(spec["sw_batch_size"], spec["in_channels"], *roi, device=device)
    with torch.inference_mode(), autocast_to(device, amp):
        model(x)
    _sync(device)
    return True


def _measure(spec: dict, device: torch.device, roi, vol, run: Callable[[], torch.Tensor]) -> dict:
    """Time ``run()`` (it returns the labels) and report the fields every sliding-window line has: seconds,
    voxels/s, RSS before and peak RSS of this process, and on GPU ``max_memory_allocated``."""
    rss_before = _rss_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    labels = run()
    _sync(device)
    dt = time.perf_counter() - t
    res = {"model": spec["model"], "volume": list(vol), "roi": list(roi), "overlap": spec["overlap"],
           "sw_batch_size": spec["sw_batch_size"], "seconds": dt, "voxels_per_s": math.prod(vol) / dt,
           "peak_rss": _peak_rss(), "rss_before": rss_before, "labels_shape": list(labels.shape),
           "warmed_up": spec.get("warmed_up", False)}
    if device.type == "cuda":
        res["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    return res


def _long_ct_worker(spec: dict) -> dict:
    """Child process, long-CT line: write a synthetic int16 CT to a temporary ``.npy`` (a few planes at a time),
    then infer it disk to disk (NpySlabReader + normalize + NpySlabWriter, the blending's sums shared by two rows
    of windows parked in the same folder) — or, with ``in_memory``, from an int16 array in memory to a labels
    tensor. Reports time, peak RSS and the accumulator's peak."""
    import tempfile

    from .inference.sliding_window import predict_volume
    from .utils.ooc import NpySlabReader, NpySlabWriter
    device, model, roi, vol = _child_setup(spec)
    cin = model.in_channels
    step = 16
    stats: dict = {}
    kwargs = dict(overlap=spec["overlap"], sw_batch_size=spec["sw_batch_size"], mode="gaussian", device=device,
                  amp=spec.get("amp", False), stats=stats, normalize=_ct_normalize)
    with tempfile.TemporaryDirectory(prefix="glam3d-longct-", dir=spec.get("tmpdir")) as tmp:
        if spec.get("in_memory"):
            image = torch.empty((cin,) + vol, dtype=torch.int16)
            for d0 in range(0, vol[0], step):
                image[:, d0:d0 + step] = _synthetic_ct_planes(d0, min(d0 + step, vol[0]), vol[1:], cin)

            def run():
                return predict_volume(model, image, roi, **kwargs)
        else:
            if cin != 1:
                raise ValueError(f"the long-CT bench writes single-channel CTs; {spec['model']} takes {cin}")
            ct = os.path.join(tmp, "ct.npy")
            with NpySlabWriter(ct, vol, dtype="int16") as w:  # (D, H, W): read back as (1, D, H, W)
                for d0 in range(0, vol[0], step):
                    planes = _synthetic_ct_planes(d0, min(d0 + step, vol[0]), vol[1:])
                    w[d0:d0 + planes.shape[1]] = planes[0]
            image = NpySlabReader(ct)
            out = NpySlabWriter(os.path.join(tmp, "labels.npy"), vol)
            kwargs["spill"] = tmp  # as glam3d predict does: sums shared by two window rows wait on disk

            def run():
                with out:
                    return predict_volume(model, image, roi, out=out, **kwargs)
        res = _measure(spec, device, roi, vol, run)
    res["input"] = "memory (int16)" if spec.get("in_memory") else "npy (int16)"
    for k in ("windows", "peak_accumulator_bytes", "slab_bytes", "input_block_bytes", "labels_bytes",
              "labels_buffer_bytes", "spill", "peak_spilled_bytes"):
        res[k] = stats.get(k)
    return res


#: voxel size (mm; D, H, W) of the synthetic NIfTI CTs of the predict_ct section
PREDICT_CT_VOXEL = (2.5, 0.8, 0.8)


def _write_ct_nifti(path: str, vol) -> None:
    """A synthetic int16 CT ``vol = (D, H, W)`` as a ``.nii.gz`` (stored ``(W, H, D)``, RAS, voxel
    :data:`PREDICT_CT_VOXEL`), written 16 planes at a time (Fortran order: the planes are the file's slowest
    axis), so writing it never holds the volume."""
    import numpy as np

    from .utils.nifti import write_volumes

    D, H, W = vol
    slabs = (_synthetic_ct_planes(d0, min(d0 + 16, D), (H, W))[0].numpy().transpose(2, 1, 0)  # (W, H, planes)
             for d0 in range(0, D, 16))
    write_volumes(path, [slabs], None, (W, H, D),
                  np.diag([PREDICT_CT_VOXEL[2], PREDICT_CT_VOXEL[1], PREDICT_CT_VOXEL[0], 1.0]), np.int16)


def _spacing3(spacing) -> list:
    """``4`` or ``[4]`` -> ``[4.0, 4.0, 4.0]``; ``[3, 0.8, 0.8]`` (sz sy sx) as it is."""
    v = [float(x) for x in (spacing if isinstance(spacing, (list, tuple)) else [spacing])]
    return v * 3 if len(v) == 1 else v


def _spacing_label(spacing) -> str:
    """A plan spacing for the table: ``4`` (isotropic) or ``3x0.8x0.8`` (sz x sy x sx)."""
    v = _spacing3(spacing)
    return f"{v[0]:g}" if len(set(v)) == 1 else "x".join(f"{x:g}" for x in v)


def _predict_ct_prepare(spec: dict) -> dict:
    """Child process: the predict_ct files in ``spec["dir"]`` — the CT and a training-style checkpoint of
    ``spec["model"]`` (random weights + SGD momentum, plan, validation settings)."""
    from preprocessing.pipeline import make_plan

    from .engine.checkpoint import save_checkpoint
    model = _build(spec["model"], "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    plan = make_plan(_spacing3(spec["spacing"]), {"scheme": "transunet"},
                     {str(i): i for i in range(1, getattr(model, "num_classes", 2))})
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "plan": plan,
             "model_spec": dict(model.glam3d_spec),
             "config": {"val": {"roi_size": list(model.default_crop), "overlap": spec["overlap"],
                                "sw_batch_size": spec["sw_batch_size"]}}}
    save_checkpoint(os.path.join(spec["dir"], "model.pt"), state)
    _write_ct_nifti(os.path.join(spec["dir"], "ct.nii.gz"), tuple(spec["volume"]))
    return {"model": spec["model"], "volume": list(spec["volume"]),
            "checkpoint_bytes": os.path.getsize(os.path.join(spec["dir"], "model.pt")),
            "nifti_bytes": os.path.getsize(os.path.join(spec["dir"], "ct.nii.gz"))}


def _predict_ct_worker(spec: dict) -> dict:
    """Child process: ``glam3d predict`` on the prepared CT, in this fresh process (what a user runs): time,
    peak RSS (``VmHWM``: the whole command, torch import and checkpoint mapping included)."""
    from .cli import main
    d = spec["dir"]
    rss_before = _rss_now()
    t = time.perf_counter()
    rc = main(["predict", "--checkpoint", os.path.join(d, "model.pt"), "--input", os.path.join(d, "ct.nii.gz"),
               "--output", os.path.join(d, "out"), "--device", spec["device"], "--quiet", "--overwrite",
               *(["--probabilities"] if spec.get("probabilities") else [])])
    dt = time.perf_counter() - t
    with open(os.path.join(d, "out", "predictions.json")) as f:
        manifest = json.load(f)
    case = manifest["cases"].get("ct", {})
    used = manifest.get("inference", {})  # what the command ran with (read from the checkpoint, as a user's run)
    return {"model": spec["model"], "volume": list(spec["volume"]), "spacing": spec["spacing"],
            "overlap": used.get("overlap"), "sw_batch_size": used.get("sw_batch_size"), "exit_code": rc,
            "probabilities": bool(used.get("probabilities")),
            "seconds": dt,
            "voxels_per_s": math.prod(spec["volume"]) / dt, "peak_rss": _peak_rss(), "rss_before": rss_before,
            "status": case.get("status"), "output_shape": case.get("shape")}


def _worker(spec: dict) -> dict:
    """Child process: build a model, make a volume, run :func:`predict_volume`, report time and memory."""
    from .inference.sliding_window import predict_volume
    if spec.get("long_ct"):
        return _long_ct_worker(spec)
    if spec.get("predict_ct"):
        return (_predict_ct_prepare if spec["predict_ct"] == "prepare" else _predict_ct_worker)(spec)
    device, model, roi, vol = _child_setup(spec)
    image = torch.empty((spec["in_channels"],) + vol, dtype=torch.float32).uniform_(-1, 1)  # pages touched
    stats: dict = {}
    res = _measure(spec, device, roi, vol, lambda: predict_volume(
        model, image, roi, overlap=spec["overlap"], sw_batch_size=spec["sw_batch_size"], mode="gaussian",
        device=device, amp=spec.get("amp", False), stats=stats))
    res["windows"] = stats.get("windows")
    res["slab_bytes"] = stats.get("slab_bytes")
    return res


def _run_child(spec: dict, timeout: Optional[float] = None) -> dict:
    """Run :func:`_worker` in a fresh interpreter (its own peak memory); returns its JSON or an ``error``."""
    cmd = [sys.executable, "-m", "glam3d.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": spec["model"], "volume": list(spec["volume"]), "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"model": spec["model"], "volume": list(spec["volume"]), "error": f"exit {proc.returncode}: {tail[0]}"}


def _train_step_time(name: str, device, repeats: int, batch: int = 2) -> dict:
    """Median seconds of forward + backward + SGD step (batch 2, deep-supervision CE loss)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    from .models import build_model_spec
    model = build_model_spec(name).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    crop = tuple(model.default_crop)
    x = torch.randn(batch, model.in_channels, *crop, device=device)
    y = torch.randint(0, model.num_classes, (batch, *crop), device=device)
    ds_weights = [4 / 7, 2 / 7, 1 / 7]

    def step():
        out = model(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = 0.0
        for k, o in enumerate(outs):
            t = y if o.shape[2:] == y.shape[1:] else F.interpolate(y[:, None].float(), size=o.shape[2:],
                                                                    mode="nearest")[:, 0].long()
            loss = loss + ds_weights[min(k, 2)] * F.cross_entropy(o, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        opt.step()

    step()
    _sync(torch.device(device))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        _sync(torch.device(device))
        ts.append(time.perf_counter() - t)
    return {"model": name, "batch": batch, "crop": list(crop), "seconds": statistics.median(ts), "all": ts}


def _largest_volume(name: str, device, hw=(512, 512), start: int = 256, limit: int = 4096,
                    timeout: float = 300) -> dict:
    """Longest ``D x 512 x 512`` scan inferred without running out of memory (bf16, overlap 0, two windows per
    forward; doubling from ``start`` up to ``limit``, then one bisection step after a failure). Every probe is
    a child process; ``probes`` keeps each one's depth, seconds, GPU peak (or error)."""
    probes = []

    def probe(d):
        r = _run_child({"model": name, "volume": [d, *hw], "device": str(device), "overlap": 0.0,
                        "sw_batch_size": 2, "amp": "bf16"}, timeout=timeout)
        probes.append({"depth": d, **{k: r.get(k) for k in ("seconds", "gpu_peak", "peak_rss", "error")}})
        return "error" not in r

    ok, bad, d = 0, None, start
    while d <= limit:
        if not probe(d):
            bad = d
            break
        ok, d = d, d * 2
    if bad is not None and ok and probe((ok + bad) // 2):
        ok = (ok + bad) // 2
    return {"model": name, "largest_depth": ok, "hw": list(hw), "searched_up_to": limit,
            "first_failure": bad, "probes": probes}


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
def _log(cfg: BenchConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pair(rows: Dict[str, dict], a: str, b: str, key: str) -> Optional[float]:
    if a in rows and b in rows and rows[a].get(key) and rows[b].get(key):
        return rows[a][key] / rows[b][key]
    return None


def median_ci(values: Sequence[float], confidence: float = 0.95) -> Optional[Tuple[float, float]]:
    """Distribution-free confidence interval of the median: the order statistics ``(x_(k), x_(n+1-k))`` with
    the largest ``k`` such that ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``; None when ``n`` is too
    small for that confidence (fewer than 6 values at 95 %)."""
    xs = sorted(values)
    n = len(xs)
    alpha, k, tail = (1 - confidence) / 2, 0, 0.0
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2 ** n  # P(Binomial(n, 1/2) <= k)
        if nxt > alpha:
            break
        tail, k = nxt, k + 1
    return (xs[k - 1], xs[n - k]) if k else None


def _round_ratios(rows: Dict[str, dict], a: str, b: str, key: str = "forward_all") -> Optional[List[float]]:
    """Per-round ``a / b`` of a per-round measurement (``key``: forward times ``forward_all``,
    ``forward_bf16_all``, ``forward_graph_all``…, or sliding-window voxels/s ``sw_all``, ``sw_bf16_all``);
    None when either model was not measured."""
    ta, tb = rows.get(a, {}).get(key), rows.get(b, {}).get(key)
    return [x / y for x, y in zip(ta, tb)] if ta and tb else None


def _paired(rows: Dict[str, dict], a: str, b: str, key: str = "forward_all") -> Optional[float]:
    """Median over rounds of the per-round ratio ``a / b`` (the two measurements of a round run back to back,
    so a drift in the machine's speed between rounds cancels; the ratio of the two medians is reported beside
    the forward one)."""
    r = _round_ratios(rows, a, b, key)
    return statistics.median(r) if r else None


def _paired_with_ci(rows: Dict[str, dict], a: str, b: str, key: str, name: str) -> dict:
    """``{name: _paired(…), name + "_ci95": median_ci of the same per-round ratios}`` (None when not measured;
    the interval also None under 6 rounds)."""
    r = _round_ratios(rows, a, b, key)
    return {name: statistics.median(r) if r else None, f"{name}_ci95": median_ci(r) if r else None}


def _record_times(rows: Dict[str, dict], times: Dict[str, List[float]], suffix: str,
                  peak: Optional[float] = None) -> None:
    """Store a forward timing in each model's row: ``forward{suffix}_s`` (median) and ``forward{suffix}_all``;
    with ``peak`` (GFLOP/s) also ``gflops{suffix}`` (2 x MACs / median) and ``peak_fraction{suffix}``."""
    for n, ts in times.items():
        s = statistics.median(ts)
        rows[n].update({f"forward{suffix}_s": s, f"forward{suffix}_all": ts})
        if peak:
            gf = 2 * rows[n]["macs_G"] / s
            rows[n].update({f"gflops{suffix}": gf, f"peak_fraction{suffix}": gf / peak})


def _sw_fields(key: str, runs: List[dict]) -> dict:
    """A model's sliding-window fields from its rounds (child results in round order): ``{key}`` (the median
    round's result, or the first error), ``{key}_all`` (voxels/s per round: paired by round across models),
    ``{key}_voxels_per_s`` / ``{key}_seconds`` (medians), ``{key}_peak_rss`` / ``{key}_gpu_peak`` (maxima)."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return {key: bad[0]}
    vps = [r["voxels_per_s"] for r in runs]
    mid = sorted(range(len(runs)), key=vps.__getitem__)[(len(runs) - 1) // 2]
    gpu = [r["gpu_peak"] for r in runs if r.get("gpu_peak") is not None]
    return {key: runs[mid], f"{key}_all": vps, f"{key}_voxels_per_s": statistics.median(vps),
            f"{key}_seconds": statistics.median(r["seconds"] for r in runs),
            f"{key}_peak_rss": max(r["peak_rss"] for r in runs), f"{key}_gpu_peak": max(gpu) if gpu else None}


def run_bench(cfg: BenchConfig, on_section: Optional[Callable[[dict], None]] = None) -> dict:
    """Measure everything (see the module docstring); returns a JSON-serialisable dict.

    ``on_section(res)`` is called after every finished section with the report so far (ratios and targets of
    what is measured; ``res["complete"]`` False, ``res["sections_done"]`` the sections in it), so a run that
    is cut short (time limit, lost machine) still leaves its measurements (``glam3d bench --json`` rewrites
    the file each time)."""
    from .models.complexity import build_meta, count_macs, count_parameters
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    res: dict = {"config": asdict(cfg), "machine": {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda_tf32": ({"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                       "cudnn_version": torch.backends.cudnn.version()} if device.type == "cuda" else None),
        "allocator": {**allocator_state(), "preloaded": preloaded_allocator(),
                      "malloc_conf": os.environ.get("MALLOC_CONF")}}}
    res["setup"] = machine_setup(device, torch.get_num_threads(), cfg.sections)

    rows: Dict[str, dict] = {}
    res["sections_done"] = []

    def done(section: str) -> None:
        res["sections_done"].append(section)
        if on_section is not None:
            on_section(_summarise(res, rows, cfg, t_start, complete=False))

    _log(cfg, f"matmul peak ({cfg.matmul_size}^3 fp32)")
    peak = matmul_peak_gflops(cfg.matmul_size, repeats=7 if not cfg.quick else 3, device=device)
    res["matmul_peak_gflops"] = peak
    if "bf16" in cfg.sections:
        res["matmul_peak_bf16_gflops"] = matmul_peak_gflops(cfg.matmul_size, repeats=7 if not cfg.quick else 3,
                                                            device=device, dtype=torch.bfloat16)

    for name in cfg.models:
        _log(cfg, f"count {name}")
        m = build_meta(name)  # on the meta device: no weights made just to count them
        shape = (1, m.in_channels, *m.default_crop)
        rows[name] = {"model": name, "crop": list(m.default_crop), "params_M": count_parameters(m) / 1e6,
                      "macs_G": count_macs(m, shape) / 1e9}
        del m

    def build_all():
        models = {n: _build(n, device) for n in cfg.models}
        return models, {n: torch.randn(1, m.in_channels, *m.default_crop, device=device) for n, m in models.items()}

    timed = {"forward", "bf16", "graph"} & set(cfg.sections)
    if timed:
        models, inputs = build_all()
    if "forward" in cfg.sections:
        _log(cfg, f"forward timing, {cfg.repeats} rounds over {len(cfg.models)} models")
        times = time_forward(models, inputs, cfg.repeats, device)
        # the peak is the machine's best rate: a second sample right after the rounds, the higher one counts (a
        # single sample taken while a shared machine is busy can read low enough to put a network above 100 %)
        again = matmul_peak_gflops(cfg.matmul_size, repeats=7 if not cfg.quick else 3, device=device)
        res["matmul_peak_samples"] = [peak, again]
        peak = res["matmul_peak_gflops"] = max(peak, again)
        _record_times(rows, times, "", peak)
        done("forward")
    if "bf16" in cfg.sections:
        _log(cfg, f"forward timing with bf16 autocast, {cfg.repeats} rounds over {len(cfg.models)} models")
        if device.type == "cpu":  # weights cast once, as glam3d predict runs bf16 on a CPU (the float32 rounds
            for m in models.values():  # are done; the graph section, which needs them, is CUDA only)
                inference_weights(m, torch.bfloat16)
        res["bf16_weights"] = "cast once (inference_weights)" if device.type == "cpu" else "autocast"
        _record_times(rows, time_forward(models, inputs, cfg.repeats, device, amp=torch.bfloat16), "_bf16",
                      res["matmul_peak_bf16_gflops"])
        done("forward_bf16")
    if "graph" in cfg.sections and device.type != "cuda":
        res["graph_skipped"] = "CUDA graphs need a CUDA device"
    elif "graph" in cfg.sections:
        for label, amp in (("graph", None), ("graph_bf16", torch.bfloat16)):
            _log(cfg, f"forward timing, CUDA graph replays{' (bf16 autocast)' if amp else ''}")
            graphs = capture_graphs(models, inputs, device, amp)
            ok = {n: g.replay for n, g in graphs.items() if not isinstance(g, str)}
            for n, g in graphs.items():
                if isinstance(g, str):
                    rows[n][f"forward_{label}_error"] = g
            _record_times(rows, _time_rounds(ok, cfg.repeats, device), f"_{label}",
                          res.get("matmul_peak_bf16_gflops") if amp else peak)
            del graphs, ok
            torch.cuda.empty_cache()
        done("graph")
    if timed:
        del models, inputs

    def child_spec(model, volume, overlap, **extra) -> dict:
        """One sliding-window child's job (``extra`` adds or overrides: amp, long_ct, sw_batch_size…)."""
        return {"model": model, "volume": list(volume), "device": str(device), "overlap": overlap,
                "sw_batch_size": cfg.sw_batch_size, "threads": cfg.threads, **extra}

    # sliding window, one child per model and round: fp32 ("sw") and bf16 autocast ("sw_bf16"), the same fields;
    # on CUDA with section graph also each network replayed from a CUDA graph ("sw_graph", "sw_graph_bf16")
    graphs = device.type == "cuda" and "graph" in cfg.sections
    for key, amp, graphed in (("sw", False, False), ("sw_graph", False, True), ("sw_bf16", "bf16", False),
                              ("sw_graph_bf16", "bf16", True)):
        if ("sw" if amp is False else "bf16") not in cfg.sections or (graphed and not graphs):
            continue
        runs: Dict[str, List[dict]] = {n: [] for n in cfg.models}
        for rnd in range(cfg.sw_rounds):
            for n in (cfg.models if rnd % 2 == 0 else cfg.models[::-1]):
                _log(cfg, f"sliding window {n} on {'x'.join(map(str, cfg.sw_volume))}"
                          f"{', bf16 autocast' if amp else ''}{', CUDA graph' if graphed else ''}"
                          f"{f', round {rnd + 1}/{cfg.sw_rounds}' if cfg.sw_rounds > 1 else ''} (child process)")
                runs[n].append(_run_child(child_spec(n, cfg.sw_volume, cfg.overlap, amp=amp, cuda_graphs=graphed)))
        for n, rs in runs.items():
            rows[n].update(_sw_fields(key, rs))
        done(key)
    if device.type == "cuda" and "gpu" in cfg.sections:
        _log(cfg, f"largest volume without OOM (up to {cfg.largest_limit}x512x512, child processes)")
        res["largest_volume"] = _largest_volume(cfg.long_ct_model, device, limit=cfg.largest_limit)
        done("gpu")

    def scan(model, volumes, overlap, label, **extra):
        out = []
        for v in volumes:
            _log(cfg, f"{label}: {model} on {'x'.join(map(str, v))}, overlap {overlap} (child process)")
            out.append(_run_child(child_spec(model, v, overlap, **extra)))
        return out

    if "scaling" in cfg.sections:
        res["scaling"] = scan(cfg.scaling_model, cfg.scaling_volumes, cfg.scaling_overlap, "scaling")
        done("scaling")
    if "long_ct" in cfg.sections:
        res["long_ct"] = scan(cfg.long_ct_model, cfg.long_ct_volumes, cfg.long_ct_overlap,
                              "long CT (in memory)" if cfg.long_ct_in_memory else "long CT (.npy to .npy)",
                              long_ct=True, in_memory=cfg.long_ct_in_memory,
                              sw_batch_size=cfg.long_ct_sw_batch_size)
        done("long_ct")
    if "predict_ct" in cfg.sections:
        import tempfile
        res["predict_ct"] = []
        for v in cfg.long_ct_volumes:
            _log(cfg, f"glam3d predict: {cfg.long_ct_model} on a {'x'.join(map(str, v))} .nii.gz CT, plan "
                      f"{_spacing_label(cfg.predict_ct_spacing)} mm, overlap {cfg.long_ct_overlap} (child processes)")
            with tempfile.TemporaryDirectory(prefix="glam3d-predictct-") as tmp:
                spec = child_spec(cfg.long_ct_model, v, cfg.long_ct_overlap, dir=tmp,
                                  spacing=cfg.predict_ct_spacing, sw_batch_size=cfg.long_ct_sw_batch_size,
                                  probabilities=cfg.predict_ct_probabilities)
                prep = _run_child({**spec, "predict_ct": "prepare"})
                r = prep if "error" in prep else {**_run_child({**spec, "predict_ct": "run"}),
                                                   **{k: prep[k] for k in ("checkpoint_bytes", "nifti_bytes")}}
            res["predict_ct"].append(r)
        done("predict_ct")
    if "train" in cfg.sections:
        _log(cfg, f"training step {cfg.train_model}")
        res["train"] = _train_step_time(cfg.train_model, device, cfg.train_repeats)
        done("train")
    if "compiled" in cfg.sections:  # last: compiling takes minutes per network
        _log(cfg, f"forward timing, torch.compile (compiling {len(cfg.models)} models first)")
        models, inputs = build_all()
        compiled = compile_models(models, inputs, device, rows)
        _record_times(rows, time_forward(compiled, inputs, cfg.repeats, device), "_compiled", peak)
        del compiled, models, inputs
        done("compiled")
    return _summarise(res, rows, cfg, t_start, complete=True)


def _summarise(res: dict, rows: Dict[str, dict], cfg: BenchConfig, t_start: float, complete: bool) -> dict:
    """Fill ``res`` with the rows, ratios and targets of what is measured so far; returns ``res``."""
    res["rows"] = [rows[n] for n in cfg.models if n in rows]
    ratios = {}
    for size in ("synapse", "tiny"):
        g, v, s = f"glam_nnformer_{size}", f"nnformer_{size}", f"swin_unetr_{size}"

        def glam(key, g=g, v=v):
            return _paired_with_ci(rows, g, v, f"{key}_all", f"glam_over_nnformer_{key}")
        ratios[size] = {
            **glam("forward"), "glam_over_nnformer_forward_of_medians": _pair(rows, g, v, "forward_s"),
            **glam("sw"), "glam_over_swin_unetr_sw": _paired(rows, g, s, "sw_all"),
            "nnformer_over_swin_unetr_sw": _paired(rows, v, s, "sw_all"),
            **glam("forward_bf16"), **glam("forward_graph"), **glam("forward_graph_bf16"), **glam("forward_compiled"),
            **glam("sw_bf16"), "glam_over_swin_unetr_sw_bf16": _paired(rows, g, s, "sw_bf16_all"),
            **glam("sw_graph"), "glam_over_swin_unetr_sw_graph": _paired(rows, g, s, "sw_graph_all"),
            **glam("sw_graph_bf16"), "glam_over_swin_unetr_sw_graph_bf16": _paired(rows, g, s, "sw_graph_bf16_all"),
        }
    ratios.update(_variant_ratios(rows, cfg.models))
    res["ratios"] = ratios
    res["targets"] = _targets(rows, ratios, res)
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["total_seconds"] = time.perf_counter() - t_start
    res["complete"] = complete
    return res


def _variant_ratios(rows: Dict[str, dict], models: Sequence[str]) -> Dict[str, dict]:
    """Ratios of every model given with options (``NAME:key=value``) over its vanilla twin of the same size when
    that was measured too (``glam_nnformer_synapse:global_num_heads=3`` over ``nnformer_synapse``), and over the
    same variant without options: ``{spec: {"over_<twin>_forward": …, "over_<twin>_forward_ci95": …,
    "over_<twin>_sw": …, "over_<NAME>_forward": …}}``."""
    from .models import parse_model_spec
    from .models.registry import resolve
    out = {}
    for spec in models:
        name, overrides = parse_model_spec(spec)
        if not overrides:
            continue
        fam, size = resolve(name)
        r = {}
        for ref in ([f"{fam.twin}_{size}"] if fam.twin else []) + [name]:
            if ref in rows:
                for key in ("forward", "sw"):
                    r.update(_paired_with_ci(rows, spec, ref, f"{key}_all", f"over_{ref}_{key}"))
        out[spec] = {k: v for k, v in r.items() if v is not None}
    return out


def _sw_equal_efficiency(nn_row: dict, macs: float) -> Optional[float]:
    """The sliding-window GLAM / nnFormer ratio at equal efficiency, with the work both networks share.

    nnFormer's sliding window takes ``sw_seconds`` for ``windows`` windows; GLAM's extra multiply-adds at
    nnFormer's average rate would add ``windows * forward_s * (macs - 1)`` to it (its batch-1 forward time
    standing in for a window's share of a batch). The weighting, blending and argmax cost both networks the same,
    so this reference lies above ``1 / macs``. ``None`` unless nnFormer's forward and sliding window were both
    measured."""
    sw, f = nn_row.get("sw_seconds"), nn_row.get("forward_s")
    n = (nn_row.get("sw") or {}).get("windows")
    if not (sw and f and n):
        return None
    return sw / (sw + n * f * (macs - 1))


def _targets(rows, ratios, res) -> List[dict]:
    syn = ratios["synapse"]
    size = "synapse" if (syn["glam_over_nnformer_forward"], syn["glam_over_nnformer_sw"]) != (None, None) else "tiny"
    out = []

    def add(key, value, ok, note="", status=None):
        desc, _ = TARGETS[key]
        out.append({"target": key, "description": desc, "value": value,
                    "status": status or ("n/a" if ok is None else ("PASS" if ok else "FAIL")), "note": note})

    # the ratio at equal efficiency: GLAM's extra multiply-adds run as fast as nnFormer's average
    glam_row, nn_row = rows.get(f"glam_nnformer_{size}", {}), rows.get(f"nnformer_{size}", {})
    macs = glam_row["macs_G"] / nn_row["macs_G"] if glam_row.get("macs_G") and nn_row.get("macs_G") else None
    for key, name, upper in (("glam_forward_ratio", "forward", True), ("glam_sw_ratio", "sw", False),
                             ("glam_forward_ratio_graph", "forward_graph", True),
                             ("glam_sw_ratio_graph", "sw_graph", False),
                             ("glam_forward_ratio_graph_bf16", "forward_graph_bf16", True),
                             ("glam_sw_ratio_graph_bf16", "sw_graph_bf16", False)):
        r, ci = ratios[size].get(f"glam_over_nnformer_{name}"), ratios[size].get(f"glam_over_nnformer_{name}_ci95")
        if r is None and "_graph" in key:
            continue  # CUDA graphs: only where a GPU measured them
        thr = TARGETS[key][1]
        ok = None if r is None else (r <= thr if upper else r >= thr)
        # the threshold inside the 95 % interval: the rounds do not decide
        unclear = r is not None and ci is not None and (ci[0] <= thr < ci[1] if upper else ci[0] < thr <= ci[1])
        note = f"{size} size" + (f"; 95 % CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else "")
        if macs and r is not None:
            note += f"; multiply-adds {macs:.3f}" if upper else f"; 1 / multiply-adds {1 / macs:.3f}"
            shared = _sw_equal_efficiency(nn_row, macs) if name == "sw" else None
            note += f", with the shared work {shared:.3f}" if shared is not None else ""
        add(key, r, ok, note, "UNCLEAR" if unclear else None)
    # the best fp32 rate measured: eager, or replayed from a CUDA graph where the eager GPU forward waits on the
    # host's kernel dispatch (the rate of the kernels, what glam3d predict gets on a GPU)
    nn = rows.get("nnformer_synapse", {})
    how = max((k for k in ("peak_fraction", "peak_fraction_graph") if nn.get(k) is not None), key=nn.get,
              default=None)
    f = nn.get(how) if how else None
    note = "nnformer_synapse not measured" if f is None else ""
    if how == "peak_fraction_graph":
        note = "CUDA graph replays" + (f"; eager {100 * nn['peak_fraction']:.1f}%" if nn.get("peak_fraction") else "")
    add("nnformer_peak_fraction", f, None if f is None else f >= TARGETS["nnformer_peak_fraction"][1], note)
    lc = [r for r in res.get("long_ct", []) if "error" not in r]
    if len(lc) >= 2:
        peaks = [r["peak_rss"] for r in lc]
        add("long_ct_memory", max(peaks), max(peaks) < TARGETS["long_ct_memory"][1],
            f"{lc[0]['model']}, overlap {lc[0]['overlap']}")
        flat = peaks[-1] / peaks[0]
        work = [(r["peak_rss"] - r["rss_before"]) for r in lc]
        add("long_ct_flat", flat, flat <= TARGETS["long_ct_flat"][1],
            f"peak RSS {peaks[-1] / 1e9:.2f} / {peaks[0] / 1e9:.2f} GB; inference increment "
            f"{work[-1] / 1e9:.2f} / {work[0] / 1e9:.2f} GB; input {lc[0].get('input', 'float32 in memory')}")
        # time per window: the number of windows is the voxels rounded up to the window grid (a 200-slice scan
        # needs 4 rows of 64-slice windows, 1.28x its voxels; 1,000 slices 16 rows, 1.02x), which s/voxel mixes in
        spv = [r["seconds"] / math.prod(r["volume"]) for r in lc]
        spw = [r["seconds"] / r["windows"] if r.get("windows") else float("nan") for r in lc]
        lin = spw[-1] / spw[0]
        lo, hi = TARGETS["long_ct_linear"][1]
        add("long_ct_linear", lin, lo <= lin <= hi,
            f"s/window, longest / shortest ({lc[-1]['windows']} / {lc[0]['windows']} windows); s/voxel ratio "
            f"{spv[-1] / spv[0]:.3f}")
    else:
        for k in ("long_ct_memory", "long_ct_flat", "long_ct_linear"):
            add(k, None, None, "long-CT section not run")
    pc = res.get("predict_ct") or []
    ok = [r for r in pc if "error" not in r and r.get("exit_code") == 0]
    if pc and len(ok) == len(pc):
        peak = max(r["peak_rss"] for r in ok)
        add("predict_ct_memory", peak, peak < TARGETS["predict_ct_memory"][1],
            f"{ok[0]['model']}, plan {_spacing_label(ok[0]['spacing'])} mm, overlap {ok[0]['overlap']}"
            f"{', with --probabilities' if ok[0].get('probabilities') else ''}; "
            + " / ".join(f"{r['volume'][0]} slices {r['peak_rss'] / 1e9:.2f} GB" for r in ok))
    else:
        add("predict_ct_memory", None, None if not pc else False,
            "predict_ct section not run" if not pc else "a predict_ct line failed")
    return out


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _gb(v):
    return _f(None if v is None else v / 1e9, "{:.2f}")


def _tables(res: dict):
    """The report as (title, header, rows) tables of strings (shared by the text and Markdown writers)."""
    tabs = []
    gpu = res["machine"]["device"].startswith("cuda")
    bf16 = "matmul_peak_bf16_gflops" in res
    graph = any(k.startswith("forward_graph") for r in res["rows"] for k in r)
    compiled = any(k.startswith("forward_compiled") for r in res["rows"] for k in r)
    head = ["model", "crop", "params (M)", "MACs (G)", "fwd (s)", "GFLOP/s", "% peak", "SW vox/s", "SW s",
            "peak RSS (GB)"]
    if gpu:
        head += ["GPU peak (GB)"]
    if bf16:
        head += ["fwd bf16 (s)", "% bf16 peak", "SW bf16 vox/s"] + (["GPU peak bf16 (GB)"] if gpu else [])
    if graph:
        head += ["fwd graph (s)", "fwd graph bf16 (s)", "% peak graph", "% bf16 peak graph", "SW graph vox/s",
                 "SW graph bf16 vox/s"]
    if compiled:
        head += ["fwd compiled (s)", "compile (s)"]
    body = []
    for r in res["rows"]:
        line = [r["model"], "x".join(map(str, r["crop"])), _f(r["params_M"]), _f(r["macs_G"]),
                _f(r.get("forward_s"), "{:.3f}"), _f(r.get("gflops"), "{:.1f}"),
                _f(None if r.get("peak_fraction") is None else 100 * r["peak_fraction"], "{:.1f}"),
                _f(r.get("sw_voxels_per_s"), "{:,.0f}"), _f(r.get("sw_seconds"), "{:.1f}"), _gb(r.get("sw_peak_rss"))]
        if "sw" in r and "error" in r["sw"]:
            line[7] = "error"
        if gpu:
            line += [_gb(r.get("sw_gpu_peak"))]
        if bf16:
            line += [_f(r.get("forward_bf16_s"), "{:.3f}"),
                     _f(None if r.get("peak_fraction_bf16") is None else 100 * r["peak_fraction_bf16"], "{:.1f}"),
                     "error" if "error" in r.get("sw_bf16", {}) else _f(r.get("sw_bf16_voxels_per_s"), "{:,.0f}")]
            line += [_gb(r.get("sw_bf16_gpu_peak"))] if gpu else []
        if graph:
            line += ["error" if r.get(f"forward_{k}_error") else _f(r.get(f"forward_{k}_s"), "{:.4f}")
                     for k in ("graph", "graph_bf16")]
            line += [_f(None if r.get(f"peak_fraction_{k}") is None else 100 * r[f"peak_fraction_{k}"], "{:.1f}")
                     for k in ("graph", "graph_bf16")]
            line += ["error" if "error" in r.get(k, {}) else _f(r.get(f"{k}_voxels_per_s"), "{:,.0f}")
                     for k in ("sw_graph", "sw_graph_bf16")]
        if compiled:
            line += ["error" if r.get("forward_compiled_error") else _f(r.get("forward_compiled_s"), "{:.3f}"),
                     _f(r.get("compile_s"), "{:.0f}")]
        body.append(line)
    sw = res["config"]["sw_volume"]
    peaks = f"{res['matmul_peak_gflops']:.1f} GFLOP/s fp32" + (
        f", {res['matmul_peak_bf16_gflops']:.1f} bf16" if bf16 else "")
    tabs.append((f"models (matmul peak {peaks}; sliding window on "
                 f"{'x'.join(map(str, sw))}, overlap {res['config']['overlap']}, Gaussian"
                 + (f", median of {res['config']['sw_rounds']} rounds" if res["config"].get("sw_rounds", 1) > 1
                    else "")
                 + (f"; bf16 weights: {res['bf16_weights']}" if bf16 and res.get("bf16_weights") else "") + ")",
                 head, body))

    body = []
    for size, rr in res["ratios"].items():
        for k, v in rr.items():
            if isinstance(v, (tuple, list)):
                body.append([size, k, "-".join(f"{x:.3f}" for x in v)])
            elif v is not None:
                body.append([size, k, _f(v, "{:.3f}")])
    tabs.append(("ratios", ["size / model", "ratio", "value"], body))

    for key, title in (("scaling", "growth with the volume"), ("long_ct", "long CT (scan length)")):
        if res.get(key):
            lct = key == "long_ct"
            head = ["model", "volume", "overlap", "windows", "time (s)", "voxels/s", "peak RSS (GB)",
                    "inference increment (GB)"] + (["input", "accumulator peak (GB)"] if lct else [])
            body = []
            for r in res[key]:
                if "error" in r:
                    body.append([r["model"], "x".join(map(str, r["volume"])), "-", "-", "-", "-", "-",
                                 r["error"]] + (["-", "-"] if lct else []))
                    continue
                body.append([r["model"], "x".join(map(str, r["volume"])), str(r["overlap"]), str(r["windows"]),
                             _f(r["seconds"], "{:.1f}"), _f(r["voxels_per_s"], "{:,.0f}"), _gb(r["peak_rss"]),
                             _gb(r["peak_rss"] - r["rss_before"])]
                            + ([r.get("input", "-"), _f(None if r.get("peak_accumulator_bytes") is None else
                                                        r["peak_accumulator_bytes"] / 1e9, "{:.3f}")] if lct else []))
            tabs.append((title, head, body))
    if res.get("predict_ct"):
        body = []
        for r in res["predict_ct"]:
            if "error" in r or r.get("exit_code"):
                body.append([r["model"], "x".join(map(str, r["volume"])), "-", "-", "-", "-",
                             r.get("error") or f"exit {r.get('exit_code')}"])
                continue
            body.append([r["model"], "x".join(map(str, r["volume"])), _spacing_label(r["spacing"]), str(r["overlap"]),
                         _f(r["seconds"], "{:.1f}"), _gb(r["peak_rss"]),
                         (r.get("status") or "-") + (" + probabilities" if r.get("probabilities") else "")])
        tabs.append(("glam3d predict on the long CTs as .nii.gz (reading, preprocessing, sliding window, restoring, "
                     "writing)", ["model", "volume", "plan (mm)", "overlap", "time (s)", "peak RSS (GB)", "result"],
                     body))
    if res.get("train"):
        t = res["train"]
        tabs.append(("training step (forward + backward + SGD, deep supervision)", ["model", "batch", "crop",
                     "step (s)"], [[t["model"], str(t["batch"]), "x".join(map(str, t["crop"])),
                                    _f(t["seconds"], "{:.3f}")]]))
    if res.get("largest_volume"):
        lv = res["largest_volume"]
        tabs.append(("largest volume without OOM (GPU, bf16, overlap 0): every probe",
                     ["model", "D x H x W", "time (s)", "GPU peak (GB)", "peak RSS (GB)", "result"],
                     [[lv["model"], "x".join(map(str, [p["depth"], *lv["hw"]])), _f(p.get("seconds"), "{:.1f}"),
                       _gb(p.get("gpu_peak")), _gb(p.get("peak_rss")), p.get("error") or "ok"]
                      for p in lv.get("probes", [])]
                     + [[lv["model"], f"largest: {lv['largest_depth']}x" + "x".join(map(str, lv["hw"])), "-", "-",
                         "-", f"searched up to {lv['searched_up_to']}; first failure {lv['first_failure']}"]]))
    body = []
    for t in res["targets"]:
        v = t["value"]
        vs = "-" if v is None else (_gb(v) + " GB" if t["target"] in ("long_ct_memory", "predict_ct_memory") else
                                    f"{100 * v:.1f}%" if t["target"] == "nnformer_peak_fraction" else f"{v:.3f}")
        body.append([t["status"], t["description"], vs, t["note"]])
    tabs.append(("targets", ["status", "target", "measured", "note"], body))
    return tabs


def format_report(res: dict) -> str:
    """Plain-text report (the table printed by ``glam3d bench``)."""
    m = res["machine"]
    lines = [f"glam3d bench{_setup_label(res)}: {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, "
             f"torch {m['torch']}, {m['threads']} threads, {m['cpu_count']} CPUs, load average {_load(m)}, "
             f"allocator {_alloc(m)}; total {res['total_seconds']:.0f} s{_partial(res)}"]
    for title, head, body in _tables(res):
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
        lines += ["", title, "  ".join(h.ljust(w) for h, w in zip(head, widths)),
                  "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _setup_label(res: dict) -> str:
    """`` [<setup name>]`` for a report's first line (empty for a result without a setup)."""
    name = (res.get("setup") or {}).get("name")
    return f" [{name}]" if name else ""


def _alloc(m) -> str:
    """The allocator a result was measured with: glam3d's profile and what it set, and a library preloaded in
    place of glibc's malloc (``jemalloc (LD_PRELOAD, MALLOC_CONF=...)``); ``default`` when neither."""
    a = m.get("allocator") or {}
    lib = a.get("preloaded")
    lib = f"{lib} (LD_PRELOAD{', MALLOC_CONF=' + a['malloc_conf'] if a.get('malloc_conf') else ''})" if lib else ""
    if not a.get("enabled"):
        return lib or "default"
    parts = (["THP"] if a.get("thp_env") == "1" and not a.get("torch_imported") else []) + \
        ([f"mmap>={int(a['mmap_threshold_env']) >> 10} KiB"] if a.get("mallopt") else [])
    return (f"{a['profile']} profile: " if a.get("profile") else "") + ("+".join(parts) or "default") + \
        (f"; {lib}" if lib else "")


def _partial(res: dict) -> str:
    if res.get("complete", True):
        return ""
    return f"; PARTIAL (run still going or cut short; done: {', '.join(res.get('sections_done', [])) or 'none'})"


def _load(m) -> str:
    a, b = m.get("loadavg_start"), m.get("loadavg_end")
    if not a:
        return "n/a"
    return f"{a[0]:.1f} -> {b[0]:.1f}" if b else f"{a[0]:.1f}"


def to_markdown(res: dict) -> str:
    """The same report as Markdown tables."""
    m = res["machine"]
    lines = [f"_glam3d bench{_setup_label(res)}: {m['device']}, torch {m['torch']}, {m['threads']} threads, "
             f"{m['cpu_count']} CPUs, load average {_load(m)}, allocator {_alloc(m)}; "
             f"total {res['total_seconds']:.0f} s{_partial(res)}_"]
    for title, head, body in _tables(res):
        lines += ["", f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the hardware setup, and the result files named by it
# ---------------------------------------------------------------------------------------------------------------
#: sections that measure float32 work / bf16 work (the setup name's precision part; "graph" replays both)
FP32_SECTIONS = ("forward", "sw", "scaling", "long_ct", "predict_ct", "train", "graph", "compiled")
BF16_SECTIONS = ("bf16", "graph", "gpu")

#: words of a GPU's name that say who made it or its product line, not which chip it is
_GPU_BRAND_WORDS = {"nvidia", "amd", "intel", "tesla", "geforce", "quadro", "radeon", "instinct", "graphics", "arc"}


def cpu_isa_class(capability: str, flags: Sequence[str] = (), machine: str = "") -> str:
    """The CPU's vector ISA class as PyTorch uses it, for a setup name: ATen's kernel level (``capability``,
    :func:`torch.backends.cpu.get_cpu_capability`: ``AVX512``, ``AVX2``, ``SVE256``, ``ZVECTOR``…) lowercased,
    or, where ATen runs its portable ``DEFAULT`` kernels, the architecture (``machine``, :func:`platform.machine`:
    ``arm64``, ``x86-64``); then ``-amx`` when the CPU flags (``flags``, Linux ``/proc/cpuinfo``) include AMX-BF16
    tiles, else ``-bf16`` when they include AVX512-BF16: the two ways a CPU computes bf16 natively, which decide
    how fast the bf16 sections run. ``("AVX512", ["avx512f", "avx512_bf16", "amx_bf16"])`` -> ``avx512-amx``."""
    import re
    level = (capability or "default").strip().lower()
    if level == "default":
        arch = (machine or "").strip().lower()
        arch = {"aarch64": "arm64", "amd64": "x86-64", "x86_64": "x86-64"}.get(arch, arch)
        level = re.sub(r"[^a-z0-9]+", "-", arch).strip("-") or "default"
    flags = {f.strip().lower() for f in flags}
    if "amx_bf16" in flags:
        return f"{level}-amx"
    if "avx512_bf16" in flags:
        return f"{level}-bf16"
    return level


def _cpu_flags() -> List[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``: ``flags`` on x86, ``Features`` on ARM); [] elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return value.split()
    except OSError:
        pass
    return []


def cpu_isa() -> str:
    """:func:`cpu_isa_class` of this machine."""
    import platform

    return cpu_isa_class(torch.backends.cpu.get_cpu_capability(), _cpu_flags(), platform.machine())


def gpu_class(name: str) -> str:
    """A GPU's model for a setup name, from its device name: the brand and product-line words dropped, then the
    words up to the first one with a digit, that one cut at its first ``-``, lowercase letters and digits only.
    ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA A100-SXM4-40GB`` -> ``a100``, ``NVIDIA GeForce RTX 4090`` ->
    ``rtx4090``, ``AMD Instinct MI250X`` -> ``mi250x``."""
    import re
    words = [w for w in re.split(r"[\s_]+", name.strip().lower()) if w and w not in _GPU_BRAND_WORDS]
    kept = []
    for w in words:
        if any(c.isdigit() for c in w):
            kept.append(w.split("-")[0])
            break
        kept.append(w)
    slug = re.sub(r"[^a-z0-9]", "", "".join(kept))
    if not slug:
        raise ValueError(f"GPU name {name!r} has no model in it")
    return slug


def _torch_minor(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13``."""
    import re
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"torch version {version!r} is not MAJOR.MINOR...")
    return f"{m.group(1)}.{m.group(2)}"


def setup_name(device: str, torch_version: str, precisions: Sequence[str], isa: Optional[str] = None,
               threads: Optional[int] = None, gpu: Optional[str] = None) -> str:
    """The name of a hardware setup: ``cpu-<isa>-<threads>c-torch<X.Y>-<precisions>`` on a CPU
    (``cpu-avx512-amx-2c-torch2.13-fp32-bf16``), ``gpu-<model>-torch<X.Y>-<precisions>`` on a GPU
    (``gpu-h100-torch2.11-fp32-bf16``, model :func:`gpu_class`); ``<type>-torch<X.Y>-<precisions>`` on another
    device type (``mps-torch2.13-fp32``). ``precisions``: what was measured, of ``fp32`` / ``tf32`` / ``bf16``,
    in that order. Deterministic: the same machine, torch and sections give the same name."""
    kind = torch.device(device).type
    order = ("fp32", "tf32", "bf16")
    if not precisions or any(p not in order for p in precisions):
        raise ValueError(f"precisions {list(precisions)} must be some of {', '.join(order)}")
    prec = "-".join(p for p in order if p in precisions)
    tv = _torch_minor(torch_version)
    if kind == "cpu":
        if not isa or not threads or threads < 1:
            raise ValueError("a CPU setup needs its ISA class and the number of threads")
        return f"cpu-{isa}-{int(threads)}c-torch{tv}-{prec}"
    if kind == "cuda":
        if not gpu:
            raise ValueError("a GPU setup needs the GPU's name")
        return f"gpu-{gpu_class(gpu)}-torch{tv}-{prec}"
    return f"{kind}-torch{tv}-{prec}"


def setup_precisions(sections: Sequence[str], tf32: bool = False) -> List[str]:
    """The precisions a run of ``sections`` measures: ``fp32`` (``tf32`` on a GPU that allows TF32 matmuls) when
    any of :data:`FP32_SECTIONS` is in it, ``bf16`` when any of :data:`BF16_SECTIONS` is."""
    out = (["tf32" if tf32 else "fp32"] if set(sections) & set(FP32_SECTIONS) else [])
    return out + (["bf16"] if set(sections) & set(BF16_SECTIONS) else [])


def machine_setup(device, threads: int, sections: Sequence[str]) -> dict:
    """This machine's setup for a run of ``sections`` on ``device`` with ``threads`` torch threads:
    ``{"name": setup_name(...), "device": "cpu" | "gpu" | another type, "cpu_isa", "threads", "gpu" (its full
    name), "torch": "X.Y", "precisions"}`` (``res["setup"]`` of every result)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    tf32 = device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    prec = setup_precisions(sections, tf32) or ["fp32"]
    isa = cpu_isa()
    model = gpu
    if gpu is not None:
        try:
            gpu_class(gpu)
        except ValueError:  # a device name without a model in it: "unknown" rather than no result
            model = "unknown"
    return {"name": setup_name(str(device), torch.__version__, prec, isa=isa, threads=threads, gpu=model),
            "device": "gpu" if device.type == "cuda" else device.type, "cpu_isa": isa, "threads": threads,
            "gpu": gpu, "torch": _torch_minor(torch.__version__), "precisions": prec}


def result_paths(directory, name: str, partial: bool = False) -> Tuple[str, str]:
    """``(DIR/<name>.json, DIR/<name>.md)``; ``partial``: ``DIR/<name>.partial.json`` / ``.md``, where a run in
    progress writes, so that a cut run never replaces a finished result."""
    stem = os.path.join(os.fspath(directory), name + (".partial" if partial else ""))
    return stem + ".json", stem + ".md"


def check_replaceable(path, sections: Sequence[str], models: Sequence[str]) -> None:
    """Raise :class:`glam3d.errors.UserError` unless a result of ``sections`` and ``models`` may be written at
    ``path``: no file there, or a glam3d bench result with no section and no model that this run leaves out (a
    narrower run, ``--quick`` or ``--sections forward``, would lose the other figures). A file that is not a bench
    result is never replaced."""
    from .errors import UserError
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
        old_sections, old_models = old["config"]["sections"], old["config"]["models"]
        if not (isinstance(old.get("rows"), list) and isinstance(old_sections, list) and isinstance(old_models, list)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError("exists and is not a glam3d bench result; not replaced", path) from None
    lost = [s for s in old_sections if s not in sections] + [m for m in old_models if m not in models]
    if lost:
        raise UserError(f"measures {', '.join(lost)}, which this run leaves out; not replaced (measure them too, "
                        f"or write elsewhere with --json / --markdown)", path)


def save_result(res: dict, directory, partial: bool = False) -> Tuple[str, str]:
    """Write ``res`` as JSON and Markdown to :func:`result_paths` of its setup (atomically; ``partial``: the
    ``.partial`` files of a run in progress; a finished result removes them). Returns the two paths."""
    from .utils.io import atomic_write_text
    name = res["setup"]["name"]
    js, md = result_paths(directory, name, partial)
    atomic_write_text(js, json.dumps(res, indent=2, default=list) + "\n")
    atomic_write_text(md, to_markdown(res))
    if not partial:
        for p in result_paths(directory, name, partial=True):
            if os.path.exists(p):
                os.unlink(p)
    return js, md


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        print(json.dumps(_worker(json.loads(argv[1]))), flush=True)
        return 0
    from .cli import main
    return main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(_main())

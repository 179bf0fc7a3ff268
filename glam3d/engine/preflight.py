"""Checks made before heavy work: a window size the network accepts, and whether a network's weights can fit the
machine at all.

Both are answered from a copy of the network built on the ``meta`` device (shapes only: no memory, no
arithmetic; a Synapse-size nnFormer builds there in about 20 ms), so a typo in a config or a hostile checkpoint
gets one error line before anything is allocated, instead of an out-of-memory kill or a traceback minutes later.

Usage::

    meta = meta_network("glam_nnformer_synapse", {})          # never allocates
    check_roi_size([64, 128, 128], network_divisor(meta), source=None, what="--roi-size")
    check_fits(weight_bytes(meta), "cuda:0", source=ckpt, what="the network recorded in the checkpoint")
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError

#: a window (training crop, sliding-window ROI) larger than this on any axis, or in all, is far beyond any scan:
#: CT and MR are reconstructed on at most 1024 x 1024 (rarely 2048 x 2048) in-plane grids with a few hundred to
#: ~3000 slices, and a natural image (Cityscapes) is 2048 x 1024; 2^28 voxels (512 x 512 x 1024) is a 1 GiB float32
#: input before the network's activations multiply it by tens of channels
MAX_WINDOW_AXIS = 4096
MAX_WINDOW_VOXELS = 2 ** 28
#: transformer blocks a network may have (nnFormer: 8 in its encoder; Swin-L: 24; Swin-G, the deepest Swin: 50):
#: past this a spec is a typo or hostile, and even on the meta device a block takes milliseconds to build
#: (100,000 blocks: minutes)
MAX_BLOCKS = 256
#: factory calls of at least this many elements go to the meta device when a builder needs real small tensors
_SMALL = 1 << 16


# ---------------------------------------------------------------------------------------------------------------
# the network on the meta device
# ---------------------------------------------------------------------------------------------------------------
class TooManyBlocks(ValueError):
    """A network spec whose ``depths`` add up to more than :data:`MAX_BLOCKS`."""


def meta_network(name: str, kwargs: Optional[dict] = None):
    """The registered variant ``name`` built with ``kwargs`` without allocating its weights: on the meta device,
    or — for builders that compute with small tensors (MONAI's SwinUNETR reads ``linspace(...).item()``) — with
    every tensor of ``_SMALL`` elements or more on the meta device and only the small ones real. ``None`` when
    it cannot be built that way (the caller then builds it for real). A spec that does not build (unknown name,
    bad option, a size PyTorch refuses: negative, overflowing) raises ``ValueError``/``TypeError``; one with more
    than :data:`MAX_BLOCKS` blocks raises :class:`TooManyBlocks` before anything is built."""
    from ..models.registry import build_model

    kwargs = dict(kwargs or {})
    return build_on_meta(lambda: build_model(name, **kwargs), kwargs)


def build_on_meta(build, kwargs: Optional[dict] = None):
    """``build()`` (any network builder: a registry name, a ``package.module:factory``) run so that nothing large
    is allocated: on the meta device, else with only the large tensors there (see :func:`meta_network`); ``None``
    when the builder cannot run that way. ``kwargs`` (what it builds with) are checked for more than
    :data:`MAX_BLOCKS` blocks first (:class:`TooManyBlocks`); a builder that fails raises ``ValueError`` /
    ``TypeError`` (a RuntimeError as ``ValueError``, its first line)."""
    import torch

    depths = (kwargs or {}).get("depths")
    if isinstance(depths, (list, tuple)) and all(isinstance(d, int) for d in depths) and sum(depths) > MAX_BLOCKS:
        raise TooManyBlocks(f"depths={_short(depths)} makes {sum(depths):,} transformer blocks; no network here "
                            f"has more than {MAX_BLOCKS}")
    for mode in (lambda: torch.device("meta"), _large_on_meta):
        try:
            with mode():
                return build()
        except NotImplementedError:
            continue
        except RuntimeError as err:  # the meta device cannot run what the builder computes, or the spec is bad
            if "meta" in str(err).lower():
                continue
            raise ValueError(_one_line(err)) from None
    return None


def _one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error (PyTorch appends C++ backtraces), at most ``limit`` characters."""
    text = " ".join((str(err).strip().splitlines() or [""])[0].split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(seq) -> str:
    text = str(list(seq))
    return text if len(text) <= 40 else text[:37] + "...]"


def _numel_requested(func, args, kwargs) -> Optional[int]:
    """Elements a factory call asks for (``torch.empty(2, 3)``, ``zeros((2, 3))``, ``full((2, 3), v)``), or
    ``None`` for factories whose size is not a shape (``arange``, ``tensor``, ``linspace``: kept real)."""
    import torch

    if func not in (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.empty_strided,
                    torch.randint):
        return None
    if func is torch.randint:  # randint(high, size) / randint(low, high, size)
        size = kwargs.get("size", next((a for a in args if isinstance(a, (tuple, list, torch.Size))), None))
    elif "size" in kwargs:
        size = kwargs["size"]
    elif args and isinstance(args[0], (tuple, list, torch.Size)):
        size = args[0]
    else:
        size = [a for a in args if isinstance(a, int)]
    try:
        return math.prod(int(s) for s in size)
    except (TypeError, ValueError):
        return None


def _large_on_meta():
    """A torch-function mode that sends factory calls of ``_SMALL`` elements or more to the meta device."""
    import torch
    from torch.overrides import TorchFunctionMode

    class LargeOnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if kwargs.get("device") is None:
                n = _numel_requested(func, args, kwargs)
                if n is not None and n >= _SMALL:
                    kwargs["device"] = torch.device("meta")
            return func(*args, **kwargs)

    return LargeOnMeta()


def network_divisor(model) -> tuple:
    """What every spatial size of the network's input must be a multiple of: ``model.divisor`` (nnFormer family:
    patch size × 2^(stages-1); SwinUNETR: 32), else 1 per axis (the 2D Swin networks pad their input)."""
    dims = int(getattr(model, "spatial_dims", 3))
    div = getattr(model, "divisor", None)
    if div is None:
        return (1,) * dims
    return tuple(int(d) for d in div)


def weight_bytes(model) -> int:
    """Bytes of the network's parameters and buffers (each tensor once), wherever they live (meta included)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def num_parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------------------------
# window sizes
# ---------------------------------------------------------------------------------------------------------------
def check_roi_size(roi, divisor: Sequence[int], source=None, what: str = "--roi-size") -> tuple:
    """``roi`` as a tuple of ints, after checking it is a window the network accepts: one positive size per
    spatial axis (as many as ``divisor``), none beyond :data:`MAX_WINDOW_AXIS` and at most
    :data:`MAX_WINDOW_VOXELS` in all, each a multiple of ``divisor`` (:func:`network_divisor`). Otherwise a
    one-line :class:`UserError` naming ``what`` (the option or config key) and ``source`` (the file it came from;
    ``None`` for a command-line option)."""
    problem = window_problem(roi, divisor)
    if problem:
        raise UserError(f"{what} {_show_roi(roi)} {problem}", source)
    return tuple(int(r) for r in roi)


def window_problem(roi, divisor: Sequence[int]) -> Optional[str]:
    """What is wrong with window ``roi`` for a network of ``divisor`` (see :func:`check_roi_size`), or ``None``."""
    n = len(divisor)
    axes = "(D, H, W)" if n == 3 else "(H, W)" if n == 2 else f"({n} axes)"
    if not isinstance(roi, (list, tuple)) or len(roi) != n or \
            not all(isinstance(r, int) and not isinstance(r, bool) for r in roi):
        return f"must be {n} whole sizes {axes}"
    if any(r <= 0 for r in roi):
        return f"must be {n} positive sizes {axes}"
    if max(roi) > MAX_WINDOW_AXIS or math.prod(roi) > MAX_WINDOW_VOXELS:
        return (f"is far larger than any scan (at most {MAX_WINDOW_AXIS} voxels an axis and "
                f"2^{int(math.log2(MAX_WINDOW_VOXELS))} in all)")
    if any(r % d for r, d in zip(roi, divisor)):
        near = [max(d, round(r / d) * d) for r, d in zip(roi, divisor)]
        return (f"must be divisible by the network's {tuple(divisor)} (patch size x 2^(stages-1)) on every axis, "
                f"e.g. {_show_roi(near)}")
    return None


def _show_roi(roi) -> str:
    if isinstance(roi, (list, tuple)):
        return "[" + ", ".join(str(r) for r in roi) + "]" if len(roi) <= 8 else _short(roi)
    return repr(roi)[:40]


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def machine_memory(device="cpu") -> Optional[tuple]:
    """``(bytes, description)`` of the memory a device has at most: a GPU's total memory; for the CPU, RAM (or
    the container's memory limit, if lower) plus swap. ``None`` when unknown (other device types)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        idx = dev.index if dev.index is not None else 0
        if idx >= torch.cuda.device_count():
            return None
        props = torch.cuda.get_device_properties(idx)  # no CUDA context is created for this
        return int(props.total_memory), f"GPU {idx} ({props.name}) has"
    if dev.type != "cpu":
        return None
    ram = _phys_ram()
    if ram is None:
        return None
    limit = _cgroup_value("memory.max", "memory/memory.limit_in_bytes")
    if limit is not None:
        ram = min(ram, limit)
    swap = _meminfo("SwapTotal") or 0
    swap_limit = _cgroup_value("memory.swap.max", "memory/memory.memsw.limit_in_bytes")
    if swap_limit is not None:
        swap = min(swap, swap_limit)
    return ram + swap, "this machine has" + (" (RAM + swap)" if swap else "")


def _phys_ram() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return _meminfo("MemTotal")


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_value(v2: str, v1: str) -> Optional[int]:
    for path in (Path("/sys/fs/cgroup") / v2, Path("/sys/fs/cgroup") / v1):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2 ** 60:  # "max" or a v1 "no limit" value: no limit
            return int(text)
        return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


def format_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def check_fits(nbytes: int, device, source=None, what: str = "the network", purpose: str = "its weights") -> None:
    """Refuse (one-line :class:`UserError` naming ``source``, with both numbers) when ``nbytes`` exceed everything
    ``device`` has (:func:`machine_memory`): such a run can only end in an out-of-memory kill. Unknown memory:
    no check. The line reads ``<what> needs <n> for <purpose> alone, but <device> has <m> of memory``."""
    have = machine_memory(device)
    if have is None or nbytes <= have[0]:
        return
    raise UserError(f"{what} needs {format_bytes(nbytes)} for {purpose} alone, but {have[1]} "
                    f"{format_bytes(have[0])} of memory", source)


def optimizer_slots(optim_cfg) -> int:
    """Tensors the optimiser keeps per parameter: AdamW 2 (first and second moments), SGD 1 with momentum."""
    name = getattr(optim_cfg, "name", "sgd")
    if name == "adamw":
        return 2
    return 1 if getattr(optim_cfg, "momentum", 0) else 0


def training_bytes(model, optim_cfg) -> int:
    """Weights, gradients and optimiser state of training ``model`` (activations come on top)."""
    w = weight_bytes(model)
    p = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())
    return w + p * (1 + optimizer_slots(optim_cfg))


def _local_ranks() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def resolve_train_device(name: str):
    """``train.device`` as the device a run would use (``auto``: the rank's GPU when there is one)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        return torch.device("cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# the two entry points: a training config, a checkpoint
# ---------------------------------------------------------------------------------------------------------------
def check_training_network(model, cfg, source=None) -> None:
    """For training ``cfg`` with ``model`` (meta or real): the training crop and validation window fit the
    network's divisor and the window bounds, and weights + gradients + optimiser state fit the training device
    (on the CPU once per local rank; on a GPU, the weights also fit the CPU, where the network is built first).
    One-line :class:`UserError` naming ``source`` otherwise."""
    div = network_divisor(model)
    if cfg.task == "2d":
        windows = [("data.crop_size", cfg.data.crop_size), ("val.roi_size", cfg.val.roi_size)]
    else:
        windows = [("data.roi_size", cfg.data.roi_size), ("val.roi_size", cfg.val.roi_size)]
    for key, roi in windows:
        if roi is not None and len(roi) == len(div):
            check_roi_size(list(roi), div, source, what=f"config key '{key}'")
    device = resolve_train_device(cfg.train.device)
    need = training_bytes(model, cfg.optim)
    purpose = (f"its weights, gradients and {cfg.optim.name} state" if optimizer_slots(cfg.optim)
               else "its weights and gradients")
    if device.type == "cpu" and _local_ranks() > 1:
        need *= _local_ranks()
        purpose += f" in {_local_ranks()} processes"
    what = f"config key 'model': {cfg.model.name} ({format_count(num_parameters(model))} parameters)"
    if device.type != "cpu":  # the network is built on the CPU first
        check_fits(weight_bytes(model), "cpu", source, what, "its weights")
    check_fits(need, device, source, what, purpose)


def check_config_network(cfg, source=None) -> None:
    """:func:`check_training_network` on the configured network built on the meta device. Registered variants
    only (a ``package.module:factory`` network is built by the trainer, which knows the dataset's classes and
    channels); a network that does not build at all is left to the trainer's own error, so a ``base:`` recipe
    without a network of its own still validates — except a spec with more blocks than any network
    (:data:`MAX_BLOCKS`), which even the trainer could not build in reasonable time."""
    if ":" in cfg.model.name:
        return
    try:
        model = meta_network(cfg.model.name, cfg.model.overrides)
    except TooManyBlocks as err:
        raise UserError(f"config key 'model.overrides': {err}", source) from None
    except (ValueError, TypeError, KeyError):
        return
    if model is not None:
        check_training_network(model, cfg, source)


def check_factory_network(cfg, factory, kwargs: dict, source=None) -> None:
    """:func:`check_training_network` for a ``package.module:factory`` network (``cfg.model.name``), built with
    ``kwargs`` (the dataset's classes and channels included) on the meta device: a window the network does not
    accept, or weights beyond the machine, are refused before the run folder is touched. A factory that cannot
    build on the meta device is not checked; one that fails to build at all is a one-line :class:`UserError`."""
    name = cfg.model.name
    try:
        model = build_on_meta(lambda: factory(**kwargs), kwargs)
    except TooManyBlocks as err:
        raise UserError(f"config key 'model.overrides': {err}", source) from None
    except (ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
        raise UserError(f"config key 'model': cannot build {name!r} ({_one_line(err)})", source) from None
    if model is not None:
        check_training_network(model, cfg, source)


def check_checkpoint_network(spec: dict, path=None, device=None):
    """The meta-device copy of the network a checkpoint records (``state['model_spec']``), after checking its
    weights fit the CPU (where the network is built) and ``device`` (where it will run). ``None`` when it cannot
    be built on the meta device (no check). UserError naming ``path`` otherwise."""
    spec = spec or {}
    name = spec.get("name")
    if not isinstance(name, str):
        raise UserError("the checkpoint records no network (model_spec.name)", path)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError("the checkpoint's model_spec.kwargs is not a mapping", path)
    try:
        model = meta_network(name, kwargs)
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"cannot rebuild the network recorded in the checkpoint ({_one_line(err)})", path) from None
    if model is None:
        return None
    what = f"the network recorded in the checkpoint ({name}, {format_count(num_parameters(model))} parameters)"
    check_fits(weight_bytes(model), "cpu", path, what)
    if device is not None and str(device) != "cpu":
        check_fits(weight_bytes(model), device, path, what)
    return model

"""CPU allocator settings: none by default; an opt-in glibc profile; which allocator library a process runs on.

By default glam3d leaves PyTorch's allocator and glibc's malloc as they are and compiles nothing: a ``glam3d``
command calls :func:`tune_allocator` only when ``GLAM3D_ALLOC_TUNING`` is set (:func:`tune_from_environment`).

The opt-in ``GLAM3D_ALLOC_TUNING=memory`` lowers the peak memory of inference at some speed: sliding-window
inference allocates and frees the same few hundred MB of activations for every window, and with glibc's default
*dynamic* mmap threshold blocks freed once raise the threshold, later blocks of that size come from the heap and
the heap keeps the freed pages. The profile sets ``M_MMAP_THRESHOLD = 1 MiB`` (``mallopt`` here,
``MALLOC_MMAP_THRESHOLD_`` for child processes): every block of 1 MiB or more is its own mapping and goes back to
the OS on ``free``, and a fixed threshold switches the dynamic adjustment off. It also sets
``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator at its first allocation, so it must be set before
``import torch``): tensors of 2 MB or more are aligned for transparent huge pages, fewer page faults. Measured on
the Synapse-size networks (``experiments/allocators.py``, ``docs/performance.md``): peak RSS 0.81-0.88x stock's,
time 1.1-1.2x. ``0`` / ``off`` / ``false`` / ``no`` (or unset): nothing. Any other value is not a profile: one
warning line on stderr, nothing tuned.

Values already in the environment (``THP_MEM_ALLOC_ENABLE``, ``MALLOC_MMAP_THRESHOLD_``) win over the profile's.

The faster allocators are libraries preloaded in place of glibc's malloc (``LD_PRELOAD``, the way PyTorch's CPU
launcher ``torch.backends.xeon.run_cpu`` uses them); :func:`preloaded_allocator` says which one a process got.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict, Optional

#: blocks of at least this many bytes are mmapped (and unmapped on free)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc malloc.h

ENV_SWITCH = "GLAM3D_ALLOC_TUNING"
PROFILES = ("memory",)
_OFF = ("", "0", "off", "false", "no")


def _glibc():
    try:  # the C library this process runs on (not a scan of the executable like platform.libc_ver)
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (AttributeError, ValueError, OSError):  # not a glibc system
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def tune_from_environment() -> Optional[Dict[str, object]]:
    """What ``glam3d`` commands call before importing torch: :func:`tune_allocator` when ``GLAM3D_ALLOC_TUNING``
    is set (to anything but an empty string), else nothing at all (``None``): PyTorch's allocator and glibc stay
    as they are."""
    if not os.environ.get(ENV_SWITCH, "").strip():
        return None
    return tune_allocator()


def tune_allocator(enable: bool | str | None = None) -> Dict[str, object]:
    """Apply the ``memory`` profile (above) to this process and, through the environment, to its children.

    Calling it is the opt-in. ``enable=None`` reads ``GLAM3D_ALLOC_TUNING``; ``"memory"`` or ``True`` applies the
    profile, ``False`` or ``"0"`` / ``"off"`` nothing; another name is not a profile (one warning line on stderr,
    nothing applied). Returns what is in effect: ``{"enabled", "profile", "thp_env", "mmap_threshold_env",
    "mallopt", "torch_imported"}`` (THP only takes effect when torch was not imported yet; ``mallopt`` is False
    off glibc or when a value in the environment is malformed), and ``"error"`` for a name that is not a
    profile."""
    from_env = enable is None
    if from_env:
        enable = os.environ.get(ENV_SWITCH, "")
    if isinstance(enable, str):
        name = enable.strip().lower()
        enable = False if name in _OFF else name
    elif enable is True:
        enable = "memory"
    state: Dict[str, object] = {"enabled": False, "profile": None, "torch_imported": "torch" in sys.modules,
                                "mallopt": False}
    if enable is not False and enable not in PROFILES:
        where = f"{ENV_SWITCH}={enable!r}" if from_env else f"allocator profile {enable!r}"
        state["error"] = f"{where} is not a profile ({', '.join(PROFILES)}; 0 or off: none); nothing tuned"
        print(f"glam3d: warning: {state['error']}", file=sys.stderr)
    elif enable == "memory":
        state.update(enabled=True, profile="memory")
        libc = _glibc()
        if libc is not None:
            os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
            os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
            try:
                value = int(os.environ["MALLOC_MMAP_THRESHOLD_"])
            except ValueError:  # glibc ignores a malformed value too
                value = None
            state["mallopt"] = value is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(value)))
    state["thp_env"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    state["mmap_threshold_env"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    _STATE.clear()
    _STATE.update(state)
    return state


_STATE: Dict[str, object] = {}

#: allocator libraries that replace glibc's malloc through ``LD_PRELOAD`` (PyTorch's CPU launcher offers both)
PRELOAD_LIBRARIES = ("jemalloc", "tcmalloc")


def preloaded_allocator() -> Optional[str]:
    """``"jemalloc"`` or ``"tcmalloc"`` when that library is mapped into this process (``LD_PRELOAD`` took), else
    ``None`` (also off Linux, where ``/proc/self/maps`` does not exist)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    return next((name for name in PRELOAD_LIBRARIES if f"/lib{name}" in maps), None)


def allocator_state() -> Dict[str, object]:
    """What the last :func:`tune_allocator` call put in effect (``{}`` when it was never called)."""
    return dict(_STATE)

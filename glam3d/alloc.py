"""Opt-in CPU allocator settings for long-volume inference (Linux/glibc; no torch import here).

By default glam3d leaves PyTorch's allocator and glibc's malloc as they are and compiles nothing: a ``glam3d``
command calls :func:`tune_allocator` only when ``GLAM3D_ALLOC_TUNING`` is set (:func:`tune_from_environment`).

Why one might opt in: sliding-window inference allocates and frees the same few hundred MB of activations for
every window. With glibc's default *dynamic* mmap threshold, blocks freed once grow the threshold, later blocks of
that size come from the heap, and the heap keeps the freed pages: the process RSS can end ~0.8-1 GB above the live
tensors on a Synapse-size nnFormer. The profiles (``GLAM3D_ALLOC_TUNING=<profile>``):

* ``memory``: ``M_MMAP_THRESHOLD = 1 MiB`` (``mallopt`` here, ``MALLOC_MMAP_THRESHOLD_`` for child processes):
  every block of 1 MiB or more is its own mapping and goes back to the OS on ``free``; a fixed threshold also
  switches the dynamic adjustment off. Alone it costs page faults on every window, so it also sets
  ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator at its first allocation, so it must be set before
  ``import torch``): tensors of 2 MB or more are aligned for transparent huge pages, far fewer page faults.
* ``speed``: threshold 32 MiB (glibc's maximum) and no heap trimming, so the 25 MB stage-1 activations of the
  Synapse-size networks are reused from the heap rather than mapped, zeroed and unmapped for every forward; the
  price is a peak RSS about 0.5 GB higher (the heap keeps what it once held).
* ``cache`` (any other non-off value too): the memory profile's settings, then (this imports torch) a caching
  CPU allocator bounded by the peak of the live tensors (:mod:`glam3d.cpu_cache`, compiled once with the C++
  compiler). Where it cannot be built the memory profile stays (one warning line when the cache was asked for
  by name or a ``GLAM3D_CPU_CACHE_*`` variable is set).
* ``0`` / ``off``: nothing (as unset).

Values already in the environment (``THP_MEM_ALLOC_ENABLE``, ``MALLOC_*_``) win over the profile's.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict, Optional

#: blocks of at least this many bytes are mmapped (and unmapped on free)
MMAP_THRESHOLD = 1 << 20
#: the ``speed`` profile: glibc's largest threshold (``HEAP_MAX_SIZE / 2``) and a heap that is never trimmed
SPEED_MMAP_THRESHOLD = 32 << 20
SPEED_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h

ENV_SWITCH = "GLAM3D_ALLOC_TUNING"


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
    as they are and nothing is compiled."""
    if not os.environ.get(ENV_SWITCH, "").strip():
        return None
    return tune_allocator()


def tune_allocator(enable: bool | str | None = None) -> Dict[str, object]:
    """Apply one profile of the settings above to this process and (through the environment) to its children.

    Calling it is the opt-in. ``enable=None`` reads ``GLAM3D_ALLOC_TUNING``: ``0``/``off`` none, ``memory``,
    ``speed`` or ``cache`` that profile, unset or anything else the cache profile (the memory profile where the
    cache cannot be built); ``enable=`` one of those names, ``True`` (the cache profile) or ``False`` chooses
    directly. Returns
    what is in effect: ``{"enabled", "profile", "thp_env", "mmap_threshold_env", "trim_threshold_env",
    "mallopt", "torch_imported"}`` (THP only takes effect when torch was not imported yet; ``mallopt`` is False
    off glibc or when a value in the environment is malformed), and for the cache profile ``"cache"`` (its
    settings) or ``"cache_error"`` (why the memory profile stayed)."""
    if enable is None:
        enable = os.environ.get(ENV_SWITCH, "").strip().lower()
        enable = False if enable in ("0", "false", "no", "off") else enable
    # asked for by name, or configured: then a fallback is worth a warning line
    asked_for_cache = enable == "cache" or any(k.startswith("GLAM3D_CPU_CACHE_") for k in os.environ)
    profile = enable if enable in ("memory", "speed", "cache") else ("cache" if enable is not False else None)
    state: Dict[str, object] = {"enabled": profile is not None, "profile": profile,
                                "torch_imported": "torch" in sys.modules, "mallopt": False}
    if profile is not None:
        libc = _glibc()
        if libc is not None:
            os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
            settings = [("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD,
                         SPEED_MMAP_THRESHOLD if profile == "speed" else MMAP_THRESHOLD)]
            if profile == "speed":
                settings.append(("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, SPEED_TRIM_THRESHOLD))
            ok = True
            for env, param, value in settings:
                os.environ.setdefault(env, str(value))
                try:
                    value = int(os.environ[env])
                except ValueError:  # glibc ignores a malformed value too
                    ok = False
                    continue
                ok = bool(libc.mallopt(param, ctypes.c_int(value))) and ok
            state["mallopt"] = ok
    if profile == "cache":
        os.environ[ENV_SWITCH] = "cache"  # child processes (benchmark workers, data loaders) install it too
        from . import cpu_cache
        try:
            info = cpu_cache.install()
            state["cache"] = {k: info[k] for k in ("slack_bytes", "cap_bytes", "min_bytes")}
        except cpu_cache.CacheUnavailable as e:
            state["profile"], state["cache_error"] = "memory", str(e)
            os.environ[ENV_SWITCH] = "memory"  # children need not try again
            if asked_for_cache:
                print(f"glam3d: warning: GLAM3D_ALLOC_TUNING=cache unavailable, memory profile instead: {e}",
                      file=sys.stderr)
    state["thp_env"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    state["mmap_threshold_env"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    state["trim_threshold_env"] = os.environ.get("MALLOC_TRIM_THRESHOLD_")
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

"""CPU allocator settings that keep long-volume inference small and fast (Linux/glibc; no torch import here).

Sliding-window inference allocates and frees the same few hundred MB of activations for every window. With
glibc's default *dynamic* mmap threshold, blocks freed once grow the threshold, later blocks of that size come
from the heap, and the heap keeps the freed pages: the process RSS ends ~0.8-1 GB above the live tensors
(measured on the Synapse-size nnFormer, ``experiments/PERFORMANCE.md``). Two settings fix that:

* ``M_MMAP_THRESHOLD = 1 MiB`` (``mallopt`` here, ``MALLOC_MMAP_THRESHOLD_`` for child processes): every block
  of 1 MiB or more is its own mapping and goes back to the OS on ``free``; a fixed threshold also switches the
  dynamic adjustment off. Alone it costs page faults on every window.
* ``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch's CPU allocator at its first allocation, so it must be set before
  ``import torch``): tensors of 2 MB or more are aligned for transparent huge pages, far fewer page faults
  per tensor, which buys most of that time back (a Synapse forward still takes ~0.1 M faults and 1.3-2 s of
  system CPU time: every 1-32 MB tensor is still mapped, zeroed and unmapped).

:func:`tune_allocator` applies both; ``glam3d`` commands call it before importing torch. Set
``GLAM3D_ALLOC_TUNING=0`` to leave the allocator alone; values already in the environment win.

``GLAM3D_ALLOC_TUNING=speed`` trades memory for time instead: threshold 32 MiB (glibc's maximum) and no heap
trimming, so the 25 MB stage-1 activations of the Synapse-size networks are reused from the heap rather than
mapped, zeroed and unmapped for every forward (page faults and TLB flushes were 15 % of the CPU time). Measured
on the 2-core VM: nnFormer forward 5.2 -> 4.25 s, long-CT inference 11-17 % less time, but its peak RSS
1.59 -> 2.13-2.18 GB (the heap keeps what it once held).

The **cache profile** (the default; ``GLAM3D_ALLOC_TUNING=cache``) gets both: the memory profile's settings,
then (this imports torch) a caching CPU allocator bounded by the peak of the live tensors
(:mod:`glam3d.cpu_cache`, compiled once with the C++ compiler): on the Zen 4 VM forwards 27-29 % faster than the
memory profile, long-CT peak 1.73 / 1.74 GB. Where it cannot be built the memory profile stays (one warning line
when the cache was asked for by name or a ``GLAM3D_CPU_CACHE_*`` variable is set); ``GLAM3D_ALLOC_TUNING=memory`` chooses the memory profile alone.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict

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


def tune_allocator(enable: bool | str | None = None) -> Dict[str, object]:
    """Apply the settings above to this process and (through the environment) to its children.

    ``enable=None`` reads ``GLAM3D_ALLOC_TUNING``: ``0``/``off`` none, ``memory``, ``speed`` or ``cache`` that
    profile, unset or anything else the default (the cache profile, the memory profile where the cache cannot
    be built); ``enable=`` one of those names, ``True`` (the default) or ``False`` chooses directly. Returns
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


def allocator_state() -> Dict[str, object]:
    """What the last :func:`tune_allocator` call put in effect (``{}`` when it was never called)."""
    return dict(_STATE)

"""A caching CPU allocator for PyTorch, bounded by the peak of the live tensors (``GLAM3D_ALLOC_TUNING=cache``).

Why: with the default (memory) allocator profile every activation of 1 MiB or more is its own mapping, faulted
in, zeroed and unmapped at every forward (a Synapse-size forward: ~0.1 M page faults, 1.2-1.6 s of system time
on the 2-core VM); glibc's heap (the ``speed`` profile) reuses them but keeps ~0.3-0.45 GB of fragments.
PyTorch's own CPU caching allocator is reachable from C++ only. This module compiles a small one
(``glam3d/csrc/cpu_cache.cpp``, ~1 s with the C++ compiler and the headers that ship with torch), loads it with
``ctypes`` and installs it as PyTorch's CPU allocator:

* blocks >= ``min_bytes`` (1 MiB) are rounded up to 2 MiB, aligned for transparent huge pages, and kept after a
  tensor frees them for the next request of about that size (best fit, at most 1/8 larger);
* the cache never lets the mapped bytes exceed the highest live total seen so far plus ``slack`` (64 MiB;
  ``GLAM3D_CPU_CACHE_SLACK_MB``), nor holds more than ``cap`` (2 GiB; ``GLAM3D_CPU_CACHE_CAP_MB``): the blocks
  freed longest ago are unmapped first. Peak memory = peak of the live tensors + at most the slack (+ 2 MiB
  rounding per tensor), so the long-CT bound holds, while the repeated forwards of a sliding window reuse their
  blocks without page faults;
* a miss that has to unmap cached blocks to stay under that bound resizes the one of them closest in size to
  the request instead (its tail unmapped, or the mapping grown with ``mremap``): the same blocks stay cached
  and the same bytes mapped, but only the bytes it grows by are faulted in and zeroed (``fresh_bytes``);
* smaller blocks go to PyTorch's allocator as before.

The library is built once per torch version and source into ``$GLAM3D_CACHE_DIR`` (default
``~/.cache/glam3d``), atomically; ``$CXX`` (default ``g++``) compiles it. Where it cannot be built, :func:`install`
raises :class:`CacheUnavailable` with one line saying why, and :func:`glam3d.alloc.tune_allocator` falls back to
the memory profile with a warning. Once installed it stays for the life of the process (tensors it handed out
are freed through it); :func:`empty_cache` returns the cached blocks to the OS.

Usage::

    from glam3d import cpu_cache
    cpu_cache.install()            # after ``import torch``; or GLAM3D_ALLOC_TUNING=cache for glam3d commands
    ...                            # forwards
    cpu_cache.stats()              # {"live_bytes", "cached_bytes", "peak_bytes", "hits", "misses", ...}
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional

__all__ = ["CacheUnavailable", "build_library", "install", "installed", "stats", "empty_cache", "reset_peak",
           "DEFAULT_SLACK_MB", "DEFAULT_CAP_MB", "MIN_BYTES"]

SOURCE = Path(__file__).with_name("csrc") / "cpu_cache.cpp"
DEFAULT_SLACK_MB = 64
DEFAULT_CAP_MB = 2048
MIN_BYTES = 1 << 20
_STAT_KEYS = ("live_bytes", "cached_bytes", "peak_bytes", "peak_live_bytes", "hits", "misses", "evictions",
              "cap_bytes", "slack_bytes", "min_bytes", "resizes", "fresh_bytes")

_lib: Optional[ctypes.CDLL] = None


class CacheUnavailable(RuntimeError):
    """The caching allocator cannot be built or installed here (the message says why, in one line)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("GLAM3D_CACHE_DIR") or Path.home() / ".cache" / "glam3d")


def build_library(cache_dir: Optional[Path] = None) -> Path:
    """Compile ``csrc/cpu_cache.cpp`` against the installed torch (once; later calls return the cached file).

    Returns the shared library's path. Raises :class:`CacheUnavailable` without a compiler, torch headers, or
    when the compile fails (first line of the compiler's error)."""
    import torch
    torch_dir = Path(torch.__file__).parent
    include, libdir = torch_dir / "include", torch_dir / "lib"
    if not (include / "c10" / "core" / "CPUAllocator.h").is_file():
        raise CacheUnavailable(f"{include}: torch's C++ headers are not installed")
    cxx = os.environ.get("CXX", "g++")
    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__}|{torch_dir}|{cxx}".encode()).hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir is not None else _cache_dir()
    target = out_dir / f"libglam3d_cpu_cache-{key}.so"
    if target.is_file():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise CacheUnavailable(f"{out_dir}: cannot write the compiled allocator ({e.strerror or e})") from None
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(SOURCE), f"-L{libdir}", "-lc10",
           f"-Wl,-rpath,{libdir}", "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise CacheUnavailable(f"{cxx}: cannot compile {SOURCE.name} ({e})") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
        raise CacheUnavailable(f"{SOURCE}: {cxx} failed: {first.strip()}")
    os.replace(tmp, target)  # atomic: a concurrent build or an interrupted one never leaves a partial library
    return target


def _mb_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise CacheUnavailable(f"{name}={raw!r} is not a whole number of MiB") from None
    if value < 0:
        raise CacheUnavailable(f"{name}={raw!r} must be >= 0")
    return value


def install(slack_mb: Optional[int] = None, cap_mb: Optional[int] = None, min_bytes: int = MIN_BYTES) -> Dict:
    """Build (if needed), load and install the cache as PyTorch's CPU allocator; returns :func:`stats`.

    ``slack_mb`` / ``cap_mb`` default to ``GLAM3D_CPU_CACHE_SLACK_MB`` / ``GLAM3D_CPU_CACHE_CAP_MB`` (64 / 2048).
    A second call keeps the first settings. Raises :class:`CacheUnavailable` (one line) where it cannot."""
    global _lib
    import torch  # noqa: F401  (libc10 must be loaded, and torch's default CPU allocator registered)
    slack = _mb_env("GLAM3D_CPU_CACHE_SLACK_MB", DEFAULT_SLACK_MB) if slack_mb is None else int(slack_mb)
    cap = _mb_env("GLAM3D_CPU_CACHE_CAP_MB", DEFAULT_CAP_MB) if cap_mb is None else int(cap_mb)
    if slack < 0 or cap < 0 or min_bytes < 1:
        raise CacheUnavailable(f"slack_mb={slack}, cap_mb={cap}, min_bytes={min_bytes}: must be >= 0 (min >= 1)")
    if _lib is None:
        path = build_library()
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise CacheUnavailable(f"{path}: cannot be loaded ({e})") from None
        lib.glam3d_cache_install.argtypes = [ctypes.c_int64] * 3
        lib.glam3d_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
        rc = lib.glam3d_cache_install(cap << 20, slack << 20, int(min_bytes))
        if rc < 0:
            raise CacheUnavailable("PyTorch's CPU allocator has no raw deleter: the cache cannot stand in for it")
        _lib = lib
    return stats()


def installed() -> bool:
    """Whether the cache is PyTorch's CPU allocator in this process now."""
    return _lib is not None and bool(_lib.glam3d_cache_installed())


def stats() -> Dict[str, int]:
    """Counters of the cache (``{}`` when it is not installed): bytes live / cached in blocks >= ``min_bytes``,
    their peak (``peak_bytes`` = live + cached, ``peak_live_bytes``), hits, misses, evictions, settings,
    ``resizes`` (misses served by resizing a block the bound made it give up) and ``fresh_bytes`` (bytes new to
    the blocks of misses: faulted in and zeroed at their first touch)."""
    if _lib is None:
        return {}
    buf = (ctypes.c_int64 * len(_STAT_KEYS))()
    _lib.glam3d_cache_stats(buf)
    return dict(zip(_STAT_KEYS, (int(v) for v in buf)))


def empty_cache() -> None:
    """Return every cached (free) block to the OS; live tensors are untouched."""
    if _lib is not None:
        _lib.glam3d_cache_empty()


def reset_peak() -> None:
    """Start the peak counters (and the peak that bounds the cache) from what is live and cached now."""
    if _lib is not None:
        _lib.glam3d_cache_reset_peak()

"""Atomic file output: everything glam3d writes goes to a temporary name in the target folder, then is renamed.

A reader never sees a half-written file, and an interrupted write leaves the previous file (if any) untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (fsync'd), on error delete it.

    ``suffix`` (default: the target's full suffix, e.g. ``.nii.gz``) is kept so writers that look at the
    extension (nibabel, SimpleITK, numpy) still pick the right format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _owner() -> str:
    """``<host>-<pid>``: tags temporary names so :func:`sweep_stale_temps` can tell a dead writer's leftovers."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


_TMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp")


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` left in ``folder`` when its process was killed
    (SIGKILL, power loss): only files made on this host by a process that no longer exists, so a live writer's
    temporary file (another process writing into the same folder) is never touched. Returns the deleted paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _owner().rsplit("-", 1)[0]
    removed = []
    for p in folder.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or m.group("host") != host or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def has_room(folder: str | os.PathLike, nbytes: int) -> bool:
    """``folder``'s filesystem has at least twice ``nbytes`` free: the margin glam3d keeps before it puts a
    scratch file of that size there (scans decoded, labels spilled by ``glam3d predict``) rather than keep the
    data in memory. ``OSError`` if the folder cannot be examined."""
    return shutil.disk_usage(folder).free >= 2 * int(nbytes)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` written atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

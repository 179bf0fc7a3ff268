"""Atomic file output: everything glam3d writes goes to a temporary name in the target folder, then is renamed.

A reader never sees a half-written file, and an interrupted write leaves the previous file (if any) untouched.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DiskFull


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as err:
        _raise_if_full(err, path)
        raise
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _raise_if_full(err, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _raise_if_full(err: OSError, path: Path) -> None:
    if err.errno in _FULL:
        raise disk_full(path) from None


def disk_full(path: Path, needed: int | None = None) -> DiskFull:
    """The one-line error for ``path`` not written because its filesystem is full: says how much is free there
    (and ``needed``, when known) and that the previous file (if any) is as it was."""
    try:
        free = f"{_format_bytes(shutil.disk_usage(path.parent).free)} free there"
    except OSError:
        free = "no space left"
    need = f", about {_format_bytes(needed)} needed" if needed else ""
    kept = "; the previous file is untouched" if path.exists() else "; nothing was written"
    return DiskFull(f"cannot write the file: the disk is full ({free}{need}){kept}", path)


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


#: what PyTorch's zip writer says when a write comes up short (a full disk; torch.save raises RuntimeError, not
#: OSError): "[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534" or "PytorchStreamWriter
#: failed writing file data/0: file write failed"
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed writing")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_path`). A full disk — an ``OSError`` (ENOSPC,
    EDQUOT) or the ``RuntimeError`` PyTorch's zip writer raises for a short write — becomes a one-line
    :class:`~glam3d.errors.DiskFull` naming ``path``; the temporary file is removed and ``path`` keeps its
    previous content."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        failed = None
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            if not _TORCH_WRITE_FAILED.search(str(err)):
                raise
            failed = " ".join(str(err).split())
        if failed is None:
            return
        gc.collect()  # the writer (held by the traceback just dropped) closes the file: its space is free again
        tmp.unlink(missing_ok=True)
        needed = _tensor_bytes(obj)
        try:
            full = shutil.disk_usage(path.parent).free < needed + (1 << 20)
        except OSError:
            full = False
        if full:
            raise disk_full(path, needed)
        raise OSError(errno.EIO, f"PyTorch could not write the file ({failed})", str(path))


def _tensor_bytes(obj) -> int:
    """Bytes of the tensor storages in a nested dict / list / tuple (each storage once): about what
    ``torch.save`` writes."""
    import torch

    seen, total, stack = set(), 0, [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            if node.device.type == "meta":
                continue
            storage = node.untyped_storage()
            key = (node.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
    return total


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

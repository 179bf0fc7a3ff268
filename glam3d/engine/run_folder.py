"""The run folder ``glam3d train`` writes (``--out``, ``cfg.output``), claimed through :mod:`glam3d.utils.ownership`.

A run folder (kind ``training-run``) holds a marker, ``.glam3d-folder.json``, written before anything else, and
glam3d writes only the entries it lists there (:data:`RUN_ENTRIES`: ``config.yaml``, ``split.json``,
``train.log``, ``log.csv``, ``curves.png``, ``checkpoints/``, ``tb/``, ``val/``, ``validation/``). So:

* a folder that is new or empty is taken (the marker first);
* a folder holding a glam3d run (its marker) is taken to resume it, refused without ``--resume`` /
  ``--overwrite`` once it has a checkpoint, and ``--overwrite`` deletes only the listed entries (a user's
  ``notes.txt`` beside them stays);
* a folder with other content and no marker is refused with one line naming it, ``--overwrite`` or not: a user's
  own ``checkpoints/`` or ``config.yaml`` is never replaced or deleted;
* a run folder written by glam3d before the markers existed is adopted (the marker written, listing what glam3d
  wrote, with a note) when it is recognisably glam3d's: ``config.yaml`` is a glam3d config (the sections
  ``model``, ``data``, ``optim``, ``train`` of :func:`glam3d.config.dump_config`), with ``checkpoints/`` holding
  only glam3d checkpoints (``last.pt``, ``last.pt.prev``, ``best.pt``: archives whose pickle names glam3d's
  checkpoint format; read from the zip directory and the small pickle, never unpickled) or a glam3d
  ``split.json``; and every other run entry present is one glam3d writes (``train.log`` lines stamped as the
  logger stamps them, ``log.csv`` with glam3d's columns, ``curves.png`` a PNG, ``tb/`` only TensorBoard event
  files, ``val/`` only ``miou_epochNNNN`` tables). Anything else there means the folder is not adopted.

Every check runs on rank 0 (:func:`claim_run`); the trainer broadcasts a refusal to the other ranks
(:func:`glam3d.engine.distributed.on_main`).
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from ..utils.ownership import OwnedFolder, claim, read_marker

__all__ = ["RUN_KIND", "RUN_ENTRIES", "claim_run", "adopt_run", "has_run", "is_glam3d_checkpoint"]

RUN_KIND = "training-run"
RUN_ENTRIES = ("config.yaml", "split.json", "train.log", "log.csv", "curves.png", "checkpoints/", "tb/", "val/",
               "validation/")
CHECKPOINT_NAMES = re.compile(r"(last\.pt|last\.pt\.prev|best\.pt)")
_TEMP = re.compile(r"^\..+\.tmp")  # glam3d.utils.io.atomic_path's temporary names
#: the pickle of a checkpoint (its tensors are separate archive members) is a few KB to a few MB (the config)
_MAX_PICKLE_BYTES = 64 << 20


def has_run(run_dir: Path) -> bool:
    """A folder holds a run once it has a checkpoint (a start that died before its first epoch end does not
    count: there is nothing to keep or resume)."""
    return any((Path(run_dir) / "checkpoints" / n).is_file() for n in ("last.pt", "best.pt"))


def is_glam3d_checkpoint(path: Path) -> bool:
    """``path`` is a checkpoint glam3d wrote: a PyTorch zip archive whose pickle names glam3d's checkpoint format
    (read as bytes, never unpickled)."""
    from .checkpoint import FORMAT

    try:
        with zipfile.ZipFile(path) as z:
            pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > _MAX_PICKLE_BYTES:
                return False
            return FORMAT.encode() in z.read(pickles[0])
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False


def _regular(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _only(folder: Path, ok: Callable[[Path], bool]) -> bool:
    """``folder`` is a real folder whose entries (glam3d temporary files aside) are all regular files passing
    ``ok``."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    for p in folder.iterdir():
        if _regular(p) and _TEMP.match(p.name):
            continue
        if not (_regular(p) and ok(p)):
            return False
    return True


def _head(p: Path, n: int = 4096) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _glam3d_config(p: Path) -> bool:
    from ..config import MAX_CONFIG_BYTES
    from ..utils.bounded_yaml import load_bounded

    if not _regular(p) or p.stat().st_size > MAX_CONFIG_BYTES:
        return False
    try:
        data = load_bounded(p.read_text(encoding="utf-8"), p)
    except Exception:  # noqa: BLE001 - unreadable / not YAML / too big: not glam3d's
        return False
    return (isinstance(data, dict) and {"model", "data", "optim", "train"} <= set(data)
            and isinstance(data["model"], dict) and isinstance(data["model"].get("name"), str))


def _glam3d_split(p: Path) -> bool:
    try:
        data = json.loads(p.read_text(encoding="utf-8")) if _regular(p) else None
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("train"), list) and isinstance(data.get("val"), list)


_STAMP = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")   # RunLogger's file format: "%(asctime)s %(message)s"
_RECOGNISED = {
    "split.json": _glam3d_split,
    "train.log": lambda p: _regular(p) and (p.stat().st_size == 0 or bool(_STAMP.match(_head(p)))),
    "log.csv": lambda p: _regular(p) and _head(p).startswith(b"epoch,iteration,lr,train_loss,"),
    "curves.png": lambda p: _regular(p) and _head(p, 8) == b"\x89PNG\r\n\x1a\n",
    "checkpoints": lambda p: _only(p, lambda f: bool(CHECKPOINT_NAMES.fullmatch(f.name)) and is_glam3d_checkpoint(f)),
    "tb": lambda p: _only(p, lambda f: f.name.startswith("events.out.tfevents.")),
    "val": lambda p: _only(p, lambda f: bool(re.fullmatch(r"miou_epoch\d+\.(md|csv|json)", f.name))),
}


def adopt_run(folder: Path) -> Optional[list]:
    """The entries of a glam3d run folder written before ownership markers (see the module doc), or None."""
    folder = Path(folder)
    if not _glam3d_config(folder / "config.yaml"):
        return None
    present = [name for name in _RECOGNISED if (folder / name).exists() or (folder / name).is_symlink()]
    if not ({"checkpoints", "split.json"} & set(present)):
        return None
    if (folder / "validation").exists() or not all(_RECOGNISED[name](folder / name) for name in present):
        return None
    return ["config.yaml"] + [name + "/" if (folder / name).is_dir() else name for name in present]


def _ours(folder: Path) -> bool:
    """``folder`` holds a glam3d run folder's marker, or would be adopted (read only)."""
    try:
        marker = read_marker(folder) if folder.is_dir() else None
    except UserError:
        return False
    if marker is not None:
        return marker["kind"] == RUN_KIND
    return folder.is_dir() and adopt_run(folder) is not None


def claim_run(run_dir, *, resume: bool, overwrite: bool, log: Callable[[str], None]) -> OwnedFolder:
    """Take ``run_dir`` for a run (see the module doc): refusals first (nothing to resume; a run already there
    without ``--resume`` / ``--overwrite``; a folder glam3d did not write), then the marker; on a fresh start the
    listed entries of an earlier run are deleted (``--overwrite``, or a start that never reached a checkpoint), and
    :data:`RUN_ENTRIES` are recorded before anything is written. ``log``: where the adoption note goes."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if resume and not last.is_file() and not last.with_name("last.pt.prev").is_file():
        raise UserError(f"--resume: nothing to resume in {run_dir} (no checkpoints/last.pt)")
    if not resume and not overwrite and has_run(run_dir) and _ours(run_dir):
        raise UserError(f"{run_dir} already holds a training run; use --resume to continue it, --overwrite to "
                        f"replace it, or --out for another folder")
    owned = claim(run_dir, RUN_KIND, tool="glam3d train", adopt=adopt_run, log=log)
    if not resume:
        owned.clear()
    owned.record(*RUN_ENTRIES)
    return owned

"""The folders ``glam3d-preprocess`` writes (``--out``), claimed through :mod:`glam3d.utils.ownership`.

A preprocessed dataset folder (kind ``preprocessed-dataset``) holds ``dataset.json``, ``cases/`` and ``.cache/``;
a phantom folder (kind ``phantom-dataset``) holds ``img/``, ``label/`` and ``phantom.json``. The marker
``.glam3d-folder.json`` is written first and lists these as they are created; ``--overwrite`` deletes only them.

Folders written by glam3d before the markers existed are adopted when they are recognisably glam3d's and hold
nothing glam3d would have to replace without knowing it wrote it:

* preprocessed: ``dataset.json`` (if there: a run killed before its end has none) is a glam3d manifest (a JSON
  object with ``plan`` holding ``version``, ``target_spacing`` and ``intensity``, a ``cases`` object and a
  ``training`` list); ``cases/`` (if there) holds only glam3d case files (``<id>.npz`` archives of ``image``,
  ``meta`` and ``plan_hash`` arrays: their directory is read, never their content); ``.cache/`` (if there) only
  ``intensity_stats.json``; at least one of ``dataset.json`` and ``cases/`` is there (plus glam3d's temporary
  files anywhere);
* phantom: ``phantom.json`` says ``"generator": "glam3d-preprocess phantom"``, ``img/`` and ``label/`` hold only
  ``img*.nii.gz`` / ``label*.nii.gz``.

The marker then lists exactly those entries; other files in the folder are the user's and stay untouched. Anything
else (an unrelated ``dataset.json``, a ``cases/`` holding other files) is refused, ``--overwrite`` or not.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional

from glam3d.utils.ownership import OwnedFolder, claim

PREPROCESSED = "preprocessed-dataset"
PHANTOM = "phantom-dataset"
_TEMP = re.compile(r"^\..+\.tmp")   # glam3d.utils.io.atomic_path's temporary names


def _only(folder: Path, pattern: str, check=None) -> bool:
    """``folder`` is missing, or holds only regular files matching ``pattern`` (and ``check(path)`` true) besides
    glam3d temporary files."""
    if not folder.exists():
        return True
    if not folder.is_dir() or folder.is_symlink():
        return False
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink() and _TEMP.match(p.name):
            continue
        if not (p.is_file() and not p.is_symlink() and re.fullmatch(pattern, p.name) and (check is None or check(p))):
            return False
    return True


CASE_ARRAYS = {"image.npy", "meta.npy", "plan_hash.npy"}


def _case_file(path: Path) -> bool:
    """``path`` is an archive of glam3d's case arrays (its zip directory is read, no array is loaded)."""
    try:
        with zipfile.ZipFile(path) as z:
            return CASE_ARRAYS <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _manifest(path: Path) -> bool:
    try:
        man = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    plan = man.get("plan") if isinstance(man, dict) else None
    return (isinstance(plan, dict) and {"version", "target_spacing", "intensity"} <= set(plan)
            and isinstance(man.get("cases"), dict) and isinstance(man.get("training"), list))


def adopt_preprocessed(folder: Path) -> Optional[list]:
    """The entries of a glam3d preprocessed dataset written before ownership markers, or None."""
    has_json, has_cases = (folder / "dataset.json").exists(), (folder / "cases").exists()
    if not (has_json or has_cases):
        return None
    if has_json and not _manifest(folder / "dataset.json"):
        return None
    if not (_only(folder / "cases", r"[^/]+\.npz", _case_file) and _only(folder / ".cache", r"intensity_stats\.json")):
        return None
    return (["dataset.json"] if has_json else []) + [f"{d}/" for d in ("cases", ".cache") if (folder / d).is_dir()]


def adopt_phantom(folder: Path) -> Optional[list]:
    """The entries of a glam3d phantom folder written before ownership markers, or None."""
    try:
        info = json.loads((folder / "phantom.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(info, dict) and info.get("generator") == "glam3d-preprocess phantom"):
        return None
    if not (_only(folder / "img", r"img\d+\.nii\.gz") and _only(folder / "label", r"label\d+\.nii\.gz")):
        return None
    return ["phantom.json"] + [f"{d}/" for d in ("img", "label") if (folder / d).is_dir()]


def claim_output(out: Path, kind: str, log: Callable[[str], None]) -> OwnedFolder:
    """Claim ``--out`` for ``kind`` (see the module doc); one-line UserError naming it when glam3d may not."""
    adopt = {PREPROCESSED: adopt_preprocessed, PHANTOM: adopt_phantom}[kind]
    return claim(out, kind, tool="glam3d-preprocess", adopt=adopt, log=log)

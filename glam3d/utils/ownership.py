"""Output folders glam3d can prove it owns: a marker written first, listing what glam3d wrote there.

A folder a glam3d command claims as its output (``glam3d-preprocess``: a preprocessed dataset, a phantom set; the
module is generic, any command's output folder can use it) holds ``.glam3d-folder.json``::

    {"glam3d_folder": 1, "id": "<uuid4 hex>", "kind": "preprocessed-dataset", "tool": "glam3d-preprocess",
     "entries": ["cases/", ".cache/", "dataset.json"]}

The marker is written before anything else goes into the folder, and an entry is added to it *before* the file or
folder it names is created (so a killed process never leaves an unlisted output). ``entries`` are paths relative to
the folder; a name ending in ``/`` is a folder glam3d created, and everything under it is glam3d's.

The rules this module enforces:

* :func:`claim` takes a folder that does not exist, is empty, or holds a marker of the same kind. A folder with
  other content and no marker is refused with one line naming it — unless ``adopt`` recognises it as glam3d's own
  output from before the markers existed (then the marker is written, listing only the entries ``adopt`` returns).
* :meth:`OwnedFolder.record` refuses a name that exists but is not listed: glam3d never replaces a file it did not
  write (a user's ``dataset.json``, their own checkpoints).
* :meth:`OwnedFolder.remove` and :meth:`OwnedFolder.clear` (``--overwrite``) delete listed entries only; anything
  else in the folder stays.

Usage::

    owned = claim(out, "preprocessed-dataset", tool="glam3d-preprocess")
    if overwrite:
        owned.clear()
    owned.record("dataset.json")          # refuses a dataset.json glam3d did not write
    atomic_write_json(out / "dataset.json", manifest)
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, List, Optional

from ..errors import UserError

MARKER = ".glam3d-folder.json"
MARKER_VERSION = 1


def _check_entry(name: str) -> str:
    """``name`` as a normalised relative POSIX path (a trailing ``/`` kept for folders); ValueError otherwise."""
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"an owned entry must be a non-empty relative path, got {name!r}")
    folder = name.endswith("/")
    p = PurePosixPath(name.rstrip("/"))
    if p.is_absolute() or any(part in ("..", ".") for part in p.parts) or str(p) == MARKER:
        raise ValueError(f"an owned entry must be a path inside the folder (no '..', not the marker), got {name!r}")
    return str(p) + ("/" if folder else "")


def read_marker(folder) -> Optional[dict]:
    """The marker of ``folder`` (a dict), None when there is none; :class:`UserError` naming it when it is there
    but unreadable or not a glam3d marker."""
    path = Path(folder) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the glam3d folder marker ({type(err).__name__}); glam3d will not write "
                        f"into or delete anything in this folder until it is repaired or removed", path) from None
    ok = (isinstance(data, dict) and data.get("glam3d_folder") == MARKER_VERSION and isinstance(data.get("id"), str)
          and isinstance(data.get("kind"), str) and isinstance(data.get("entries"), list))
    if ok:
        try:
            data["entries"] = [_check_entry(e) for e in data["entries"]]
        except ValueError:
            ok = False
    if not ok:
        raise UserError("is not a valid glam3d folder marker (expected glam3d_folder, id, kind, entries); glam3d "
                        "will not write into or delete anything in this folder", path)
    return data


@dataclass
class OwnedFolder:
    """A folder glam3d owns (see the module doc). ``entries``: what glam3d wrote there, relative paths."""

    path: Path
    id: str
    kind: str
    tool: str = "glam3d"
    entries: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------------ queries
    def owns(self, name: str) -> bool:
        """``name`` (relative path) is a listed entry or lies under a listed folder."""
        name = _check_entry(name).rstrip("/")
        for e in self.entries:
            if name == e.rstrip("/") or (e.endswith("/") and name.startswith(e)):
                return True
        return False

    def _exists(self, name: str) -> bool:
        p = self.path / name.rstrip("/")
        return p.exists() or p.is_symlink()

    # ------------------------------------------------------------------------------------------------ changes
    def record(self, *names: str) -> None:
        """Add entries (a trailing ``/`` for a folder) before creating them. A name that already exists and is not
        listed is refused (:class:`UserError` naming it): glam3d does not replace what it did not write."""
        new = []
        for raw in names:
            name = _check_entry(raw)
            if self.owns(name):
                continue
            if self._exists(name):
                raise UserError(f"exists and was not written by glam3d (it is not listed in {MARKER}); it is never "
                                f"replaced: move it away or choose another output folder", self.path / name.rstrip("/"))
            new.append(name)
        if new:
            self.entries = sorted(set(self.entries) | set(new))
            self._write()

    def remove(self, name: str) -> None:
        """Delete a listed entry (a folder with its content; a symbolic link itself, never its target) and drop it
        from the marker. A name that is not listed is refused (:class:`UserError`)."""
        name = _check_entry(name)
        listed = [e for e in self.entries if e.rstrip("/") == name.rstrip("/")]
        if not listed:
            raise UserError(f"is not listed in {MARKER}: glam3d did not write it and will not delete it",
                            self.path / name.rstrip("/"))
        _delete(self.path / name.rstrip("/"))
        self.entries = [e for e in self.entries if e not in listed]
        self._write()

    def clear(self) -> List[str]:
        """Delete every listed entry (what ``--overwrite`` removes); everything else in the folder stays. Returns the
        entries that existed and were deleted."""
        gone = [e for e in self.entries if self._exists(e)]
        for e in list(self.entries):
            _delete(self.path / e.rstrip("/"))
        self.entries = []
        self._write()
        return gone

    # ------------------------------------------------------------------------------------------------ marker
    def as_dict(self) -> dict:
        return {"glam3d_folder": MARKER_VERSION, "id": self.id, "kind": self.kind, "tool": self.tool,
                "entries": list(self.entries)}

    def _write(self) -> None:
        """Rewrite the marker atomically, keeping entries another writer of the same folder added meanwhile."""
        from .io import atomic_write_json

        try:
            current = read_marker(self.path)
        except UserError:
            current = None
        if current is not None and current["id"] == self.id:
            theirs = set(current["entries"]) - set(self._known)
            self.entries = sorted(set(self.entries) | theirs)
        atomic_write_json(self.path / MARKER, self.as_dict())
        self._known = list(self.entries)

    def __post_init__(self):
        self.path = Path(self.path)
        self.entries = sorted({_check_entry(e) for e in self.entries})
        self._known = list(self.entries)


def _delete(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _new_marker(folder: Path, kind: str, tool: str, entries=()) -> OwnedFolder:
    """Write a new marker, complete and only if there is none yet (two processes claiming one new folder: the
    second one gets the first one's marker): written to a temporary file, fsync'd, then hard-linked to its name
    (a link never replaces an existing file); exclusive creation where the filesystem has no hard links."""
    import tempfile

    owned = OwnedFolder(folder, uuid.uuid4().hex, kind, tool, list(entries))
    text = json.dumps(owned.as_dict(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=MARKER + ".new.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, folder / MARKER)
        except FileExistsError:
            return _existing(folder, read_marker(folder), kind)
        except OSError:
            try:
                with open(folder / MARKER, "x", encoding="utf-8") as fh:
                    fh.write(text)
            except FileExistsError:
                return _existing(folder, read_marker(folder), kind)
    finally:
        os.unlink(tmp)
    return owned


def _existing(folder: Path, marker: dict, kind: str) -> OwnedFolder:
    if marker["kind"] != kind:
        raise UserError(f"holds a glam3d {marker['kind']} folder ({MARKER}), not a {kind}: choose another folder",
                        folder)
    return OwnedFolder(folder, marker["id"], marker["kind"], str(marker.get("tool", "glam3d")), marker["entries"])


IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})   # written by file browsers, not users


def claim(folder, kind: str, *, tool: str = "glam3d", adopt: Optional[Callable[[Path], Optional[list]]] = None,
          log: Optional[Callable[[str], None]] = None) -> OwnedFolder:
    """Take ``folder`` as a glam3d output folder of ``kind`` (e.g. ``"preprocessed-dataset"``, ``"run"``).

    * missing or empty: created, and the marker written first;
    * a marker of this ``kind``: the folder is glam3d's (a rerun, a resume);
    * a marker of another kind, an unreadable marker: refused;
    * other content and no marker: ``adopt(folder)`` may recognise glam3d's own output from before the markers
      existed and return the entries it wrote (a marker listing exactly those is written; ``log`` says so);
      otherwise refused with one line naming the folder (nothing in it is written, replaced or deleted).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError("exists and is not a folder", folder)
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is not None:
        return _existing(folder, marker, kind)
    folder.mkdir(parents=True, exist_ok=True)
    content = sorted(p.name for p in folder.iterdir() if p.name not in IGNORED_NAMES
                     and not p.name.startswith(MARKER + ".new"))
    if not content:
        return _new_marker(folder, kind, tool)
    entries = adopt(folder) if adopt is not None else None
    if entries:
        owned = _new_marker(folder, kind, tool, entries)
        if log is not None:
            log(f"{folder}: glam3d output written before ownership markers; {MARKER} written, listing "
                f"{', '.join(owned.entries)}")
        return owned
    shown = ", ".join(content[:3]) + (f" and {len(content) - 3} more" if len(content) > 3 else "")
    raise UserError(f"is not empty ({shown}) and was not written by glam3d (no {MARKER}); glam3d writes only into a "
                    f"new or empty folder or one it made, and never replaces or deletes what it did not write "
                    f"(--overwrite included): choose another output folder", folder)


__all__ = ["MARKER", "OwnedFolder", "claim", "read_marker"]

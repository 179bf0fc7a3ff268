"""``predictions.json``: the record ``glam3d predict`` keeps in its output folder, and the folder's ownership.

The manifest holds the run's checkpoints (path, sha256, network, epoch, metrics), config, code version and
inference settings, and one entry per case: input(s), output, status, seconds, label values present, and its
provenance — ``"checkpoints": [{"path", "sha256"}, …]`` (several for an ensemble) and ``"inference"``: the options
that shaped the output (window, overlap, blending, mirroring, precision, postprocessing, format). A case's entry is
the truth about its file (the top level describes only the last run into the folder); ``glam3d evaluate`` reads it
(:mod:`glam3d.metrics.provenance`), and a rerun skips a case only when its entry names the same checkpoints and
options.

Several ``glam3d predict`` processes (and the ranks of a ``torchrun``) may share an output folder: each case's entry
is merged into ``predictions.json`` as soon as the case is written, read-merge-write under an exclusive lock on
the folder (:func:`write_manifest`), so a killed run leaves every finished case recorded.

The folder is claimed through :mod:`glam3d.utils.ownership` (:func:`claim_output`, kind ``predictions``): its
marker lists every file glam3d wrote there, and only those are ever replaced. A prediction folder written before
the markers existed is adopted when its ``predictions.json`` is glam3d's and lists its files.

Example::

    write_manifest(out_dir, {"format": FORMAT, "cases": {"img0001": {"status": "written"}}})
    read_manifest(out_dir / MANIFEST)["cases"]["img0001"]["status"]     # "written"
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

__all__ = ["MANIFEST", "FORMAT", "KIND", "sha256_file", "read_manifest", "write_manifest", "locked", "claim_output",
           "adopt_predictions", "owned_now", "record_outputs"]

MANIFEST = "predictions.json"
FORMAT = "glam3d-predictions-v1"
KIND = "predictions"          # the ownership marker's kind of a prediction folder
_RANK_MANIFEST = re.compile(r"^predictions\.rank\d+\.json$")   # per-rank manifests of older multi-GPU runs


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read ``chunk`` bytes at a time (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    """The JSON at ``path`` (``{}`` when it is missing or unreadable: a manifest is a record, never an input)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(out_dir: Path, manifest: dict, prev: Optional[dict] = None, world: int = 1, rank: int = 0,
                   writer: Optional[Callable] = None) -> None:
    """Merge ``manifest``'s cases into ``out_dir/predictions.json`` (the cases recorded there stay, those of
    ``manifest`` replace theirs; the head is ``manifest``'s) under an exclusive lock on the folder, re-reading the
    file inside it so no process drops cases another one recorded meanwhile. ``prev`` (the manifest read earlier),
    ``world`` and ``rank`` are accepted for older callers: every rank merges into the one file."""
    from ..utils.io import atomic_write_json

    writer = writer or atomic_write_json
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        current = read_manifest(out_dir / MANIFEST) or dict(prev or {})
        cases = dict(current.get("cases") or {})
        cases.update(manifest.get("cases") or {})
        writer(out_dir / MANIFEST, {**manifest, "cases": cases})


@contextlib.contextmanager
def locked(folder: Path):
    """Exclusive ``fcntl.flock`` on the folder itself (no lock file is left behind; a no-op where flock is
    unavailable)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - Windows
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def adopt_predictions(folder: Path) -> Optional[list]:
    """The entries of a glam3d prediction folder written before ownership markers: ``predictions.json`` (a glam3d
    manifest: its ``format`` and a ``cases`` object), the per-rank manifests beside it, and every file its case
    entries name as ``output`` or ``probabilities`` that is in the folder. None when ``predictions.json`` is not
    glam3d's (the folder is then refused)."""
    man = read_manifest(folder / MANIFEST)
    if man.get("format") != FORMAT or not isinstance(man.get("cases"), dict):
        return None
    entries = [MANIFEST] + sorted(p.name for p in folder.iterdir() if _RANK_MANIFEST.match(p.name) and p.is_file())
    for e in man["cases"].values():
        if not isinstance(e, dict):
            continue
        for key in ("output", "probabilities"):
            name = Path(str(e.get(key) or "")).name
            p = folder / name
            if name and not name.startswith(".") and p.is_file() and not p.is_symlink():
                entries.append(name)
    return sorted(set(entries))


def claim_output(out_dir: Path, log: Optional[Callable[[str], None]] = None):
    """Claim ``out_dir`` as a prediction folder (:func:`glam3d.utils.ownership.claim`, kind :data:`KIND`; older
    glam3d prediction folders adopted, :func:`adopt_predictions`); created if missing. Several processes may claim
    one folder at once: the claim is made under the folder's lock. One-line :class:`~glam3d.errors.UserError`
    naming it when glam3d may not write there."""
    from ..utils.ownership import claim

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        from ..errors import UserError

        raise UserError("--output must be a folder", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        return claim(out_dir, KIND, tool="glam3d predict", adopt=adopt_predictions, log=log)


def owned_now(out_dir: Path):
    """The folder's ownership as its marker says now (other processes writing into the folder add entries); call
    under :func:`locked` to act on it."""
    from ..utils.ownership import claim

    return claim(out_dir, KIND, tool="glam3d predict")


def record_outputs(out_dir: Path, *names: str) -> None:
    """List ``names`` in the folder's marker before they are created, under the folder's lock and from the marker
    as it is now: a name another glam3d process listed is glam3d's; one that exists unlisted is refused
    (:meth:`glam3d.utils.ownership.OwnedFolder.record`)."""
    if names:
        with locked(out_dir):
            owned_now(out_dir).record(*names)

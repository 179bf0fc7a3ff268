"""``predictions.json``: the record ``glam3d predict`` keeps in its output folder.

It holds the checkpoint (path, sha256, network, epoch, metrics), the config, the code version, the inference
settings and one entry per case (input, output, status, seconds, label values present); ``glam3d evaluate``
copies it into its report (:func:`glam3d.metrics.report.load_provenance`). Several ``glam3d predict`` processes
may share an output folder: :func:`write_manifest` merges under an exclusive lock on the folder; a multi-rank run
writes ``predictions.rank<r>.json`` per rank and the rank that finds all of them merges them.

Example::

    write_manifest(out_dir, {"format": FORMAT, "cases": {"img0001": {"status": "written"}}}, {}, 1, 0,
                   atomic_write_json)
    read_manifest(out_dir / MANIFEST)["cases"]["img0001"]["status"]     # "written"
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

__all__ = ["MANIFEST", "FORMAT", "sha256_file", "read_manifest", "write_manifest", "locked"]

MANIFEST = "predictions.json"
FORMAT = "glam3d-predictions-v1"


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
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def write_manifest(out_dir: Path, manifest: dict, prev: dict, world: int, rank: int, writer) -> None:
    """Merge with the previous manifest's cases (kept outputs stay described) and write it. Multi-rank runs:
    each rank writes ``predictions.rank<r>.json``; the rank that finds all of them merges ``predictions.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # several predict processes may share the folder: read-merge-write under an exclusive lock, re-reading the
    # manifest inside it so no process drops cases another one recorded meanwhile
    with locked(out_dir):
        prev = read_manifest(out_dir / MANIFEST) or prev
        if world <= 1:
            cases = dict(prev.get("cases", {}))
            cases.update(manifest["cases"])
            writer(out_dir / MANIFEST, {**manifest, "cases": cases})
            return
        writer(out_dir / f"predictions.rank{rank}.json", manifest)
        parts = [out_dir / f"predictions.rank{r}.json" for r in range(world)]
        if all(p.is_file() for p in parts):
            cases = dict(prev.get("cases", {}))
            for p in parts:
                cases.update(read_manifest(p).get("cases", {}))
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

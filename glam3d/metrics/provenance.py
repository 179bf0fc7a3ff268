"""Which checkpoint made which prediction: reading ``glam3d predict``'s ``predictions.json`` manifests.

A manifest's case entry names its checkpoints in one of two forms, both read:

* ``"checkpoints": [{"path": …, "sha256": …}, …]`` (several for an ensemble), and ``"inference"`` options;
* ``"checkpoint_sha256": "…"`` (one checkpoint; its path is the top-level ``checkpoint.path`` when the hashes agree).

The case entry always wins over the manifest's top-level ``checkpoint`` (which names the checkpoint of the *last*
run into the folder, not necessarily of every output in it). Only a case entry that names no checkpoint at all
falls back to the top level (as does every case of a manifest with no case entries at all), and the report says so
for that case. A case missing from the manifest's entries has an unknown checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import UserError

MANIFEST = "predictions.json"


def load_provenance(pred_dir) -> dict:
    """The ``predictions.json`` manifest written by ``glam3d predict`` (merging per-rank manifests of a
    multi-GPU run when the merged one is missing); ``{}`` when the predictions carry none."""
    pred_dir = Path(pred_dir)
    main = pred_dir / MANIFEST
    try:
        if main.is_file():
            data = json.loads(main.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        parts = sorted(pred_dir.glob("predictions.rank*.json"))
        if parts:
            merged = json.loads(parts[0].read_text(encoding="utf-8"))
            merged["cases"] = {}
            for p in parts:
                merged["cases"].update(json.loads(p.read_text(encoding="utf-8")).get("cases", {}))
            return merged
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"cannot read the predictions manifest ({err})", main) from None
    return {}


def _top_checkpoints(manifest: dict) -> list[dict]:
    top = manifest.get("checkpoints")
    if isinstance(top, list) and top:
        return [c for c in top if isinstance(c, dict)]
    ck = manifest.get("checkpoint")
    return [ck] if isinstance(ck, dict) and ck.get("sha256") else []


def case_checkpoints(manifest: dict, case: str) -> tuple[list[dict], str]:
    """``([{"path", "sha256"}, …], how)`` for one case name of a manifest; ``how`` is ``case`` (the case entry
    names them), ``top-level`` (the entry names none: the manifest's top-level checkpoint) or ``unknown``."""
    top = _top_checkpoints(manifest)
    if not isinstance(manifest.get("cases"), dict):  # a manifest without case entries: the top level is all it says
        return ([{"path": c.get("path"), "sha256": c.get("sha256")} for c in top], "top-level") if top \
            else ([], "unknown")
    entry = manifest["cases"].get(case)
    if not isinstance(entry, dict):
        return [], "unknown"
    if isinstance(entry.get("checkpoints"), list) and entry["checkpoints"]:
        out = []
        for c in entry["checkpoints"]:
            if isinstance(c, dict):
                out.append({"path": c.get("path"), "sha256": c.get("sha256")})
            elif isinstance(c, str):
                out.append({"path": None, "sha256": c})
        return out, "case"
    sha = entry.get("checkpoint_sha256")
    if sha:
        path = next((c.get("path") for c in top if c.get("sha256") == sha), None)
        return [{"path": path, "sha256": sha}], "case"
    if top:
        return [{"path": c.get("path"), "sha256": c.get("sha256")} for c in top], "top-level"
    return [], "unknown"


def manifest_case_name(manifest: dict, prediction_path, case: str) -> Optional[str]:
    """The manifest's name for a prediction file: the entry whose ``output`` is that file, else ``case``."""
    cases = manifest.get("cases") or {}
    if case in cases:
        return case
    target = Path(prediction_path).name
    for name, e in cases.items():
        if isinstance(e, dict) and e.get("output") and Path(str(e["output"])).name == target:
            return name
    return None


def attribute(scored: dict, manifests: dict) -> tuple[list[dict], dict]:
    """Every checkpoint behind the scored predictions.

    ``scored``: ``{case id: (prediction folder, prediction file, case name under which it was written)}``;
    ``manifests``: ``{prediction folder: manifest dict}``. Returns ``(checkpoints, per_case)``: ``checkpoints`` is a
    list of ``{"sha256", "paths", "cases", "pred_dirs", "from_top_level"}`` (one per distinct sha256, most cases
    first; an entry with sha256 ``None`` gathers the cases whose checkpoint is unknown) and ``per_case`` maps each
    case to ``{"checkpoints": [sha256, …], "how": …, "inference": … (if recorded)}``."""
    by_sha: dict = {}
    per_case = {}
    for cid, (folder, pred_path, name) in scored.items():
        man = manifests.get(str(folder)) or {}
        mname = manifest_case_name(man, pred_path, name) if man else None
        if man and not isinstance(man.get("cases"), dict):
            mname = name
        cks, how = case_checkpoints(man, mname) if mname else ([], "unknown")
        entry = (man.get("cases") or {}).get(mname, {}) if mname else {}
        info = {"checkpoints": [c["sha256"] for c in cks], "how": how}
        if isinstance(entry, dict) and entry.get("inference"):
            info["inference"] = entry["inference"]
        per_case[cid] = info
        for c in cks or [{"path": None, "sha256": None}]:
            e = by_sha.setdefault(c["sha256"], {"sha256": c["sha256"], "paths": [], "cases": [], "pred_dirs": [],
                                                "from_top_level": []})
            if c.get("path") and c["path"] not in e["paths"]:
                e["paths"].append(c["path"])
            e["cases"].append(cid)
            if str(folder) not in e["pred_dirs"]:
                e["pred_dirs"].append(str(folder))
            if how == "top-level":
                e["from_top_level"].append(cid)
    out = sorted(by_sha.values(), key=lambda e: (e["sha256"] is None, -len(e["cases"])))
    return out, per_case

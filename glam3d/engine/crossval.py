"""Cross-validation as nnU-Net does it: folds from ``splits_final.json``, and each fold's validation exported.

``glam3d train CONFIG --data PRE --fold K`` (``data.fold``) trains fold ``K`` of ``PRE/splits_final.json``:

* the file is nnU-Net v2's (a list of ``{"train": [...], "val": [...]}``), so nnU-Net's own can be dropped in; it
  is used as it is when present (its ids checked against the dataset: one error line naming the file), and made
  on first use otherwise (:func:`glam3d.data.datasets.crossval_splits`: ``data.num_folds`` folds, seeded as
  nnU-Net seeds them) — written into the preprocessed folder only when glam3d owns it (its ownership marker, see
  :mod:`preprocessing.output`; the file is recorded there first), else computed in memory (the same folds for
  every fold's run) with a warning saying so;
* ``--fold all`` trains on every case of the folds without validation;
* the run folder is ``OUTPUT/fold_<K>``;
* at the end of a fold's training, :func:`export_validation` predicts the fold's validation cases from their
  source scans (the preprocessed ``dataset.json``'s ``cases[id].source_image``) with the
  :class:`~glam3d.inference.predictor.Predictor` and the best checkpoint, into ``OUTPUT/fold_<K>/validation/
  <id>.nii.gz`` in each scan's own geometry (with ``predictions.json``), and scores them there with
  ``glam3d evaluate`` (``report.*``, ``summary.json``). ``glam3d evaluate --pred OUTPUT/fold_*/validation ...``
  is then the cross-validation summary.
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Optional

from ..data import datasets as D
from ..errors import UserError
from . import distributed as dist

__all__ = ["fold_split", "write_splits", "export_validation", "VALIDATION"]

VALIDATION = "validation"


def fold_split(cfg, manifest: dict, log, env: dist.DistEnv) -> dict:
    """The ``split.json`` of fold ``cfg.data.fold``: ``fold``, ``splits_file``, ``num_folds``, ``train``, ``val``
    (case ids). Rank 0 writes ``splits_final.json`` when it makes it (see the module doc)."""
    root = Path(cfg.data.root)
    path = root / D.SPLITS_FILE
    fold = D.parse_fold(cfg.data.fold)
    ids = D.case_ids(manifest)
    if path.is_file():
        splits, source = D.read_splits(path, ids), "used as it is"
    else:
        splits = D.crossval_splits(ids, cfg.data.num_folds, source=root / "dataset.json")
        source = write_splits(root, splits, log) if env.is_main else "made"
    split = D.fold_split(splits, fold, path)
    if env.is_main:
        what = (f"fold {fold} of {len(splits)}" if fold != "all" else f"fold all (every case of the {len(splits)} "
                f"folds, no validation)")
        log.info(f"{what}: {len(split['train'])} training / {len(split['val'])} validation cases; {path} {source}")
    return {"fold": fold, "splits_file": str(path), "num_folds": len(splits), **split}


def write_splits(root: Path, splits: list, log) -> str:
    """Write ``splits_final.json`` into the preprocessed folder ``root`` when glam3d owns it (recorded in its
    marker first; a folder written before markers is adopted as ``glam3d-preprocess`` adopts it); else warn and
    leave the folder alone. Returns what happened, for the log."""
    from ..utils.io import atomic_write_json
    from ..utils.ownership import claim

    path = root / D.SPLITS_FILE
    try:
        from preprocessing.output import PREPROCESSED, adopt_preprocessed

        owned = claim(root, PREPROCESSED, tool="glam3d train", adopt=adopt_preprocessed, log=log.info)
        owned.record(D.SPLITS_FILE)
        if not path.exists():  # another fold's run may have written it meanwhile (the same folds)
            atomic_write_json(path, splits)
        return f"written ({len(splits)} folds, nnU-Net's seed {D.SPLITS_SEED})"
    except (UserError, OSError, ImportError) as err:
        reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        log.warning(f"{path} not written ({reason}); the {len(splits)} folds are made the same way for every fold's "
                    f"run and recorded in its split.json")
        return "made in memory"


# ------------------------------------------------------------------------------------------------ export
def _sources(manifest: dict, root: Path, ids) -> tuple:
    """``({id: [image files]}, [problems])``: each case's source scan(s) from ``manifest['cases'][id]``."""
    cases = manifest.get("cases") if isinstance(manifest.get("cases"), dict) else {}
    found, missing = {}, []
    for cid in ids:
        meta = cases.get(cid) if isinstance(cases.get(cid), dict) else {}
        src = meta.get("source_image")
        files = [src] if isinstance(src, str) else list(src) if isinstance(src, list) else []
        paths = []
        for f in files:
            p = Path(f)
            if not p.is_absolute():  # relative: from the current folder, then from the dataset's folder
                p = next((c for c in (Path.cwd() / p, root / p) if c.is_file()), Path.cwd() / p)
            paths.append(p)
        if not paths:
            missing.append(f"case {cid} has no source_image")
        elif not all(p.is_file() for p in paths):
            missing.append(f"case {cid}: {next(p for p in paths if not p.is_file())} is gone")
        else:
            found[cid] = paths
    return found, missing


def _load(paths):
    from preprocessing.imageio import load_channels

    return load_channels(paths)


def export_validation(run_dir: Path, checkpoint: Path, manifest: dict, data_root: Path, val_ids, env: dist.DistEnv,
                      log) -> Optional[dict]:
    """Predict the validation cases ``val_ids`` of a fold from their source scans into ``run_dir/validation``
    (sharded over the ranks), then (rank 0) write ``predictions.json`` and the ``glam3d evaluate`` report there.
    A case whose output exists and was made by the same checkpoint file (its sha256 in ``predictions.json``) is
    kept. Returns ``{"folder", "cases", "written", "kept", "failed", "mean_dice", "report"}`` (``mean_dice`` and
    ``report`` on rank 0), or None when the export was skipped (source scans gone: one warning)."""
    import nibabel as nib

    from ..inference.manifest import FORMAT, MANIFEST, read_manifest, write_manifest
    from ..inference.predictor import AMP_NAMES, Predictor
    from ..utils.io import atomic_path, atomic_write_json

    data_root = Path(data_root)
    sources, missing = _sources(manifest, data_root, val_ids)
    if missing:
        if env.is_main:
            log.warning(f"the fold's validation cases were not predicted: their source scans are needed "
                        f"({len(missing)} of {len(val_ids)} cases: {missing[0]})")
        return None
    out = Path(run_dir) / VALIDATION
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier(env)
    t0 = time.time()
    predictor = Predictor.from_checkpoint(checkpoint, device=str(env.device))
    sha = predictor.sha256
    prev = read_manifest(out / MANIFEST)
    entries, failures = {}, []
    for cid in list(val_ids)[env.rank::env.world_size]:
        target = out / f"{cid}.nii.gz"
        entry = {"input": [str(p) for p in sources[cid]], "output": str(target), "checkpoint_sha256": sha,
                 "inference": dict(predictor.settings)}
        old = prev.get("cases", {}).get(cid, {})
        if target.is_file() and old.get("checkpoint_sha256") == sha and old.get("inference") == entry["inference"]:
            entries[cid] = {**old, "status": "skipped (exists)"}
            continue
        tc = time.time()
        try:
            labels = predictor.predict(_load(sources[cid]))
        except UserError as err:  # this scan only (unreadable, refused): the others go on
            failures.append(f"case {cid}: {err}")
            entries[cid] = {**entry, "status": "failed", "error": str(err)}
            continue
        with atomic_path(target, suffix=".nii.gz") as tmp:
            nib.save(labels, str(tmp))
        entries[cid] = {**entry, "status": "written", "seconds": round(time.time() - tc, 2),
                        "shape": list(labels.shape[:3])}
    gathered = dist.all_gather_object((entries, failures), env)
    cases = {k: v for part, _ in gathered for k, v in part.items()}
    failures = [f for _, part in gathered for f in part]
    status = [e["status"].split()[0] for e in cases.values()]
    result = {"folder": str(out), "cases": len(val_ids), "written": status.count("written"),
              "skipped": status.count("skipped"), "failed": status.count("failed"), "seconds": None,
              "mean_dice": None, "report": None}
    if not env.is_main:
        return result
    if failures:
        log.warning(f"{len(failures)} of {len(val_ids)} validation cases could not be predicted ({failures[0]}"
                    f"{'; ...' if len(failures) > 1 else ''}); the report scores the others")
    meta = predictor.metadata
    head = {"format": FORMAT, "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "checkpoint": {"path": str(Path(checkpoint).resolve()), "sha256": sha,
                           "model_spec": meta.get("model_spec"), "epoch": meta.get("epoch"),
                           "iteration": meta.get("iteration"), "metrics": meta.get("metrics")},
            "config": meta.get("config"), "labels": meta.get("labels"),
            "label_values": (predictor.plan or {}).get("label_values"),
            "inference": {**predictor.settings, "device": str(predictor.device), "amp": AMP_NAMES[predictor.amp]},
            "made_by": "glam3d train (fold validation)", "cases": cases}
    write_manifest(out, head, {}, 1, 0, atomic_write_json)
    result["seconds"] = round(time.time() - t0, 1)
    log.info(f"validation: {result['written']} written, {result['skipped']} kept, {result['failed']} failed of "
             f"{len(val_ids)} cases -> {out}")
    result.update(_report(out, data_root, log))
    return result


def _report(folder: Path, data_root: Path, log) -> dict:
    """``glam3d evaluate`` of the fold's predictions against the preprocessed dataset's source labels, written
    into ``folder``; ``{"mean_dice", "report"}`` (None on failure: a warning with the command to rerun)."""
    import argparse
    import contextlib
    import io
    import json

    from ..commands import evaluate as ev
    from ..errors import run_command

    dataset = data_root / "dataset.json"
    argv = ["evaluate", "--pred", str(folder), "--gt", str(dataset), "--labels", str(dataset), "--only-predicted",
            "--out", str(folder), "--quiet"]
    parser = argparse.ArgumentParser(prog="glam3d")
    ev.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        rc = run_command(ev.run, args)
    for line in errors.getvalue().splitlines():
        if line.startswith("warning: "):
            log.warning(line[len("warning: "):])
    if rc != 0:
        log.warning(f"the fold's validation report was not written ({errors.getvalue().strip() or rc}); run "
                    f"glam3d {' '.join(argv)}")
        return {"mean_dice": None, "report": None}
    report = json.loads((folder / "report.json").read_text())
    mean = report.get("overall", {}).get("dice", {}).get("mean")
    log.info(f"validation report: mean Dice {mean if mean is None else f'{mean:.4f}'} over {report.get('n_cases')} "
             f"cases -> {folder / 'report.md'}")
    return {"mean_dice": mean, "report": str(folder / "report.json")}

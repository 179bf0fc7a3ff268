"""Whole-dataset preprocessing runs (what ``glam3d-preprocess synapse|msd`` call): plan, per-case work, manifest."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from glam3d.errors import UserError
from glam3d.utils.io import atomic_write_json, sweep_stale_temps

from . import datasets as D
from .output import PREPROCESSED, claim_output
from .pipeline import channel_scheme, make_plan
from .raw_dataset import discover


def _check_out(inp: Path, out: Path):
    inp, out = Path(inp).resolve(), Path(out).resolve()   # links followed: a link into the input is inside it
    if out == inp or inp in out.parents:
        raise UserError(f"the output folder {out} is inside the input folder {inp}; choose a folder outside it "
                        f"(input files are never modified)")
    if out.exists() and not out.is_dir():
        raise UserError("--out exists and is not a folder", out)


def _log(msg, quiet=False):
    if not quiet:
        print(msg, file=sys.stderr)


def run_synapse(raw, out, *, intensity="transunet", spacing=None, orientation="RAS", keep_all_labels=False,
                unlisted="error", workers=1, overwrite=False, strict=False, interpolation="linear",
                label_interpolation="linear", crop_to_body=True, quiet=False, debug=False) -> dict:
    """The Synapse protocol over a BTCV folder. Returns the summary dict (``failed`` > 0 means exit 2)."""
    raw, out = Path(raw), Path(out)
    if unlisted not in ("error", "skip", "train", "test"):
        raise UserError(f"--unlisted must be error, skip, train or test, got {unlisted!r}")
    _check_out(raw, out)
    root, cases, warnings = D.discover_synapse(raw, unlisted)
    labels, values = D.synapse_labels(keep_all_labels)
    return _run(name="Synapse", description="BTCV multi-organ CT, Synapse protocol (TransUNet split: 18 train / "
                                            "12 test)" + ("" if keep_all_labels else ", 8 organs"),
                inp=root, out=out, cases=cases, warnings=warnings, labels=labels, label_values=values,
                declared=list(range(14)), modality={"0": "CT"}, allow_channels=False, nch=1, extra={},
                intensity=intensity, spacing=spacing, orientation=orientation, workers=workers,
                overwrite=overwrite, strict=strict, interpolation=interpolation, crop_to_body=crop_to_body,
                label_interpolation=label_interpolation, body_threshold=-500.0, quiet=quiet, debug=debug)


def run_msd(dataset, out, *, intensity=None, spacing=None, orientation="RAS", workers=1, overwrite=False,
            strict=False, interpolation="linear", label_interpolation="linear", crop_to_body=True, quiet=False,
            debug=False) -> dict:
    """Any nnU-Net v2 / MSD raw dataset (:mod:`preprocessing.raw_dataset`): training cases from the lists or
    imagesTr/labelsTr, test cases from the list or imagesTs. ``intensity`` None: per channel by its name, as
    nnU-Net does (CT -> dataset foreground statistics, other names -> per-case z-score; see
    :func:`preprocessing.pipeline.channel_scheme`)."""
    ds, out = Path(dataset), Path(out)
    _check_out(ds, out)
    raw, cases, warnings = discover(ds)
    lab_map = raw.labels
    modality = raw.channels
    schemes = [channel_scheme(v) for v in modality.values()]
    if intensity is None:
        intensity = ("nnunet" if all(s == "ct" for s in schemes) else
                     "zscore" if all(s == "zscore" for s in schemes) else "per_channel")
    values = {i: v for i, v in enumerate([v for v in sorted(lab_map) if v != 0], start=1)}
    labels = {"0": lab_map.get(0, "background")}
    labels.update({str(i): lab_map[v] for i, v in values.items()})
    extra = {"source_layout": raw.layout, "file_ending": raw.file_ending}
    return _run(name=raw.name, description=str(raw.meta.get("description", "")), inp=ds, out=out,
                cases=cases, warnings=warnings, labels=labels, label_values=values, declared=sorted(lab_map),
                modality=modality, allow_channels=True, nch=len(modality), intensity=intensity, spacing=spacing,
                orientation=orientation, workers=workers, overwrite=overwrite, strict=strict,
                interpolation=interpolation, crop_to_body=crop_to_body, label_interpolation=label_interpolation,
                body_threshold=-500.0 if schemes[0] == "ct" else None, quiet=quiet, debug=debug, extra=extra)


def _intensity(intensity, modality, stats):
    """The plan's ``intensity`` entry. ``stats()``: the training set's foreground statistics per channel."""
    if intensity == "nnunet":
        return {"scheme": "nnunet", "percentiles": [0.5, 99.5], "channels": stats()}
    if intensity == "transunet":
        return {"scheme": "transunet", "window": [-125.0, 275.0]}
    if intensity == "zscore":
        return {"scheme": "zscore"}
    if intensity == "per_channel":
        schemes = [channel_scheme(n) for n in modality.values()]
        chans = stats() if "ct" in schemes else None
        return {"scheme": "per_channel", "percentiles": [0.5, 99.5],
                "channels": [{"name": n, "scheme": s, **(chans[i] if s == "ct" else {})}
                             for i, (n, s) in enumerate(zip(modality.values(), schemes))]}
    raise UserError(f"--intensity must be transunet, nnunet or zscore, got {intensity!r}")


def _run(*, name, description, inp, out, cases, warnings, labels, label_values, declared, modality,
         allow_channels, nch, intensity, spacing, orientation, workers, overwrite, strict, interpolation,
         label_interpolation, crop_to_body, body_threshold, quiet, debug, extra):
    t0 = time.time()
    for w in warnings:
        _log(f"warning: {w}", quiet)
    if strict:
        for c in cases:
            if c.error:
                raise UserError(f"{c.error} (--strict: stopping)")
    if spacing is None:
        spacing = D.median_spacing(cases, orientation)
        _log(f"target spacing (median of the training cases, sz sy sx): "
             f"{' '.join(f'{v:.3f}' for v in spacing)} mm", quiet)
    if intensity not in ("transunet", "nnunet", "zscore", "per_channel"):
        raise UserError(f"--intensity must be transunet, nnunet or zscore, got {intensity!r}")
    # the output folder: new, empty or glam3d's own (its marker written first); --overwrite deletes only what the
    # marker lists, and nothing glam3d did not write is ever replaced
    owned = claim_output(out, PREPROCESSED, log=lambda m: _log(f"note: {m}", quiet))
    if overwrite:
        gone = owned.clear()
        if gone:
            _log(f"--overwrite: removed {', '.join(gone)} (glam3d's earlier output) from {out}", quiet)
    owned.record(".cache/", "cases/", "dataset.json")
    for folder in (out, out / "cases", out / ".cache"):  # leftovers of a killed run (live writers' are kept)
        sweep_stale_temps(folder)

    def stats():
        return D.foreground_intensity_stats(cases, declared, out, nch, allow_channels, log=lambda m: _log(m, quiet))

    intens = _intensity(intensity, modality, stats)
    plan = make_plan(spacing, intens, label_values, orientation=orientation, crop_to_body=crop_to_body,
                     body_threshold=body_threshold, num_channels=nch, image_interpolation=interpolation,
                     label_interpolation=label_interpolation)
    phash = D.plan_hash(plan)
    tasks = [{"case": c, "npz": str(D.case_output(out, c.id)), "plan": plan, "plan_hash": phash,
              "declared": declared, "allow_channels": allow_channels, "overwrite": overwrite, "debug": debug}
             for c in cases]

    def on_result(res, bar):
        if res["status"] == "failed" and not strict:
            bar.write(f"error: {res['error']}", file=sys.stderr)
            if debug and res.get("traceback"):
                bar.write(res["traceback"], file=sys.stderr)

    results = D.run_pool(D.process_case, tasks, workers, desc=name, strict=strict, quiet=quiet,
                         on_result=on_result)
    order = {c.id: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r["id"]])
    ok = [r for r in results if r["status"] in ("done", "skipped")]
    failed = [r for r in results if r["status"] == "failed"]

    def entry(r):
        e = {"id": r["id"], "image": f"cases/{r['id']}.npz"}
        if r["meta"].get("source_label"):
            e["label"] = f"cases/{r['id']}.npz"
        return e

    training = [entry(r) for r in ok if r["split"] == "training"]
    test = [entry(r) for r in ok if r["split"] == "test"]
    manifest = {
        "name": name, "description": description, "tensorImageSize": "4D", "modality": modality,
        "labels": labels, "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
        "plan": plan, "cases": {r["id"]: r["meta"] for r in ok},
        "failed": [{"id": r["id"], "error": r["error"]} for r in failed],
        "source": str(Path(inp).resolve()), **extra,
    }
    atomic_write_json(out / "dataset.json", manifest)
    done = sum(r["status"] == "done" for r in results)
    skipped = sum(r["status"] == "skipped" for r in results)
    secs = [r["seconds"] for r in results if r["status"] == "done"]
    summary = {"cases": len(results), "done": done, "skipped": skipped, "failed": len(failed),
               "training": len(training), "test": len(test), "seconds": time.time() - t0,
               "seconds_per_case": (sum(secs) / len(secs)) if secs else 0.0, "dataset_json": str(out / "dataset.json")}
    per_case = f", {summary['seconds_per_case']:.2f} s/case" if done else ""
    _log(f"{name}: {len(results)} cases: {done} preprocessed, {skipped} already done (skipped), {len(failed)} failed"
         f"; {len(training)} training / {len(test)} test in {out / 'dataset.json'} "
         f"({summary['seconds']:.1f} s{per_case})",
         quiet)  # --quiet: the error lines only
    if failed:
        _log(f"{len(failed)} case(s) failed (errors above); they are not in dataset.json", quiet)
    return summary

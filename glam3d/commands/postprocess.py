"""``glam3d postprocess``: decide (on validation predictions) and apply the largest-component postprocessing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError

EPILOG = """\
decide: score the predictions (as glam3d evaluate does: report.* and summary.json into --out) and decide, as
  nnU-Net's nnUNetv2_determine_postprocessing does, whether keeping the largest connected component helps: first
  all foreground as one (kept if the mean Dice rises and no organ's falls), then each organ (kept if its mean Dice
  rises). The decision, with the Dice with and without each step, goes to OUT/postprocessing.json.
apply: clean every label map of a prediction folder with a decision (or 'all': the largest component of every
  organ) into another folder, same names and format (like nnUNetv2_apply_postprocessing). The input is never
  modified; the output folder's predictions.json is the input's with the postprocessing recorded.
examples:
  glam3d postprocess decide --pred run/fold_0/validation run/fold_1/validation run/fold_2/validation
      run/fold_3/validation run/fold_4/validation --gt nnUNet_raw/Dataset017_BTCV/labelsTr
      --labels nnUNet_raw/Dataset017_BTCV/dataset.json --out run/cv_postprocessing
  glam3d postprocess apply --input preds_test/ --out preds_test_pp/ --pp run/cv_postprocessing/postprocessing.json
"""


def add_parser(subparsers):
    from .evaluate import add_3d_arguments

    p = subparsers.add_parser("postprocess", help="decide / apply the largest-component postprocessing",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = sub.add_parser("decide", help="decide on validation predictions (writes OUT/postprocessing.json + report)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    add_3d_arguments(d)
    d.add_argument("--out", required=True, metavar="DIR", help="folder for postprocessing.json and the report")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    a = sub.add_parser("apply", help="apply a decision to a prediction folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    a.add_argument("--input", "-i", required=True, metavar="DIR", help="prediction folder (flat, nnU-Net or MONAI)")
    a.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the cleaned label maps")
    a.add_argument("--pp", required=True, metavar="FILE|all",
                   help="postprocessing.json from 'decide', or 'all' (largest component of every organ)")
    a.add_argument("--overwrite", action="store_true", help="replace label maps already in --out")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    for q in (d, a):
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def run(args) -> int:
    if args.action == "decide":
        from .evaluate import run_3d

        if not args.pred or not args.gt:
            raise UserError("--pred and --gt are required (the validation predictions and their truths)")
        args.decide_postprocessing = ""
        return run_3d(args)
    return run_apply(args)


def run_apply(args) -> int:
    from ..metrics.label_io import read_label_map, split_ext, write_ext, write_label_map_like
    from ..metrics.layouts import find_predictions
    from ..metrics.provenance import MANIFEST, load_provenance
    from ..postprocessing import apply_postprocessing, load_decision
    from ..utils.io import atomic_write_json

    inp, out = Path(args.input), Path(args.out)
    if not inp.is_dir():
        raise UserError("--input: prediction folder not found", inp)
    ri, ro = inp.resolve(), out.resolve()
    if ro == ri or ri in ro.parents:
        raise UserError(f"the output folder is inside the input folder {inp}; choose a folder outside it (input files "
                        f"are never modified)", out)
    if out.exists() and not out.is_dir():
        raise UserError("--out exists and is not a folder", out)
    if args.pp == "all":
        decision, pp_desc = "all", "all"
    else:
        decision, pp_desc = load_decision(args.pp), str(Path(args.pp).resolve())
    preds = find_predictions(inp)
    if not preds:
        raise UserError("no label maps (.nii.gz, .mha, .nrrd, …) in this folder", inp)
    targets = {}
    for case, p in preds.items():
        targets[case] = out / f"{case}{write_ext(split_ext(p.path.name)[1])}"
    existing = [t for t in targets.values() if t.exists()]
    if existing and not args.overwrite:
        raise UserError(f"{len(existing)} output file(s) exist already (e.g. {existing[0].name}); --overwrite "
                        f"replaces them", out)
    manifest = load_provenance(inp)
    items = list(preds.items())
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="postprocess", unit="case", leave=False, disable=None)
    changed = {}
    for case, p in items:
        labels, _ = read_label_map(p.path, case, "prediction")
        cleaned = apply_postprocessing(labels, decision)
        changed[case] = int((cleaned != labels).sum())
        write_label_map_like(targets[case], cleaned, p.path)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if manifest:
        cases = {}
        for name, e in (manifest.get("cases") or {}).items():
            e = dict(e) if isinstance(e, dict) else {}
            if name in targets:
                e.update({"postprocessed_from": str(preds[name].path), "output": str(targets[name]),
                          "voxels_removed": changed[name]})
            cases[name] = e
        atomic_write_json(out / MANIFEST, {**manifest, "cases": cases, "postprocessing": {
            "decision": pp_desc, "source": str(ri),
            **({"classes_largest_component": decision["classes_largest_component"],
                "foreground_largest_component": decision["foreground_largest_component"]["apply"]}
               if isinstance(decision, dict) else {})}})
    n_changed = sum(1 for v in changed.values() if v)
    print(f"{len(items)} label maps postprocessed ({pp_desc}) into {out}; {n_changed} changed, "
          f"{sum(changed.values())} voxels set to background", file=sys.stdout)
    return 0

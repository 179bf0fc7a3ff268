"""``glam3d-preprocess``: CT/MR preprocessing for glam3d (Synapse/BTCV, nnU-Net v2 and MSD datasets, phantoms).

Sub-commands: ``phantom`` (synthetic BTCV-layout CT set), ``synapse`` (the Synapse protocol), ``msd`` (any
nnU-Net v2 / MSD raw dataset, any image format SimpleITK reads), ``inspect`` (a table of cases and warnings).
User errors print one line (``error: ...``) and exit 2; ``--debug`` shows tracebacks. An output folder (``--out``)
must be new, empty or one glam3d made (``.glam3d-folder.json``); ``--overwrite`` deletes only what glam3d wrote.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from glam3d.errors import UserError, run_command


def _common(p):
    p.add_argument("--out", required=True, type=Path, help="output folder (dataset.json + cases/<id>.npz)")
    p.add_argument("--spacing", nargs=3, type=float, metavar=("SZ", "SY", "SX"),
                   help="target spacing in mm (default: the training cases' median spacing)")
    p.add_argument("--orientation", default="RAS", help="axis code the scans are reoriented to (default RAS)")
    p.add_argument("--interpolation", default="linear", choices=["linear", "bspline"],
                   help="image resampling (default linear)")
    p.add_argument("--label-interpolation", default="linear", choices=["linear", "nearest"],
                   help="label resampling: linear = each label's mask resampled linearly, then argmax (nnU-Net "
                        "style; never mixes label values, keeps small organs better; default) or nearest")
    p.add_argument("--no-crop", dest="crop_to_body", action="store_false", help="do not crop to the body")
    p.add_argument("--workers", type=int, default=1, help="parallel processes over cases (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: delete what glam3d wrote in --out (listed in its .glam3d-folder.json; nothing "
                        "else) and redo every case")
    p.add_argument("--strict", action="store_true", help="stop at the first bad case")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (errors still printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glam3d-preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("phantom", help="write a synthetic abdominal CT set in the raw BTCV layout")
    p.add_argument("--out", required=True, type=Path, help="output folder (img/, label/ are created)")
    p.add_argument("--cases", type=int, default=30, help="number of cases (1..40; BTCV ids, the 30 Synapse ids "
                                                         "first; default 30)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same cases (default 0)")
    p.add_argument("--matrix", type=int, default=512,
                   help="in-plane size (default 512 = 0.7 mm; the field of view is fixed, 128 gives ~2.8 mm)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes over cases (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite cases that already exist (in a folder glam3d made)")
    p.add_argument("--preview", type=Path, metavar="PNG", help="also write a PNG of slices with labels overlaid")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    p = sub.add_parser("synapse", help="Synapse protocol (BTCV: 8 organs, 18/12 split)")
    p.add_argument("--raw", required=True, type=Path, help="BTCV folder with img/ and label/ "
                                                          "(or RawData/Training/img ...)")
    _common(p)
    p.add_argument("--intensity", default="transunet", choices=["transunet", "nnunet"],
                   help="transunet: clip [-125, 275] -> [0, 1] (default); nnunet: foreground percentile clip + "
                        "z-score with training-set statistics")
    p.add_argument("--keep-all-labels", action="store_true", help="keep the 13 BTCV labels (default: 8 organs)")
    p.add_argument("--unlisted", default="error", choices=["error", "skip", "train", "test"],
                   help="cases in neither Synapse list: error (default), skip, or add to train/test")

    p = sub.add_parser("msd", help="any nnU-Net v2 / MSD raw dataset (dataset.json, imagesTr, labelsTr, imagesTs)")
    p.add_argument("--dataset", required=True, type=Path,
                   help="the raw dataset folder (e.g. nnUNet_raw/Dataset003_Liver or Task03_Liver)")
    _common(p)
    p.add_argument("--intensity", default=None, choices=["transunet", "nnunet", "zscore"],
                   help="one scheme for every channel; default: per channel by its dataset.json name, as nnU-Net: "
                        "CT -> clip to the training foreground's 0.5/99.5 percentiles and z-score with its mean/std; "
                        "noNorm, rescale_to_0_1, rgb_to_0_1 as named; any other name -> per-case z-score (non-zero "
                        "voxels)")

    p = sub.add_parser("inspect", help="table of every case (shape, spacing, orientation, range, labels) + warnings")
    p.add_argument("folder", type=Path, help="a BTCV, nnU-Net v2 or MSD dataset folder, or a folder of images")

    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _phantom(args) -> int:
    from . import phantom as ph
    from .datasets import run_pool
    from glam3d.utils.io import atomic_write_json

    if not 16 <= args.matrix <= 1024:
        raise UserError(f"--matrix must be between 16 and 1024, got {args.matrix}")
    from .output import PHANTOM, claim_output

    ids = ph.case_ids(args.cases)
    out = args.out
    if out.exists() and not out.is_dir():
        raise UserError("--out exists and is not a folder", out)
    owned = claim_output(out, PHANTOM, log=lambda m: None if args.quiet else print(f"note: {m}", file=sys.stderr))
    owned.record("img/", "label/", "phantom.json")
    t0 = time.time()
    todo = [c for c in ids if args.overwrite or not ((out / "img" / f"img{c}.nii.gz").exists()
                                                     and (out / "label" / f"label{c}.nii.gz").exists())]
    tasks = [{"out": str(out), "id": c, "seed": args.seed, "matrix": args.matrix} for c in todo]
    res = run_pool(_phantom_task, tasks, args.workers, desc="phantom", quiet=args.quiet)
    info_path = out / "phantom.json"
    info = {"generator": "glam3d-preprocess phantom", "seed": args.seed, "matrix": args.matrix,
            "labels": {str(k): v for k, v in ph.BTCV_LABELS.items()}, "cases": {}}
    if info_path.is_file():
        try:
            import json

            old = json.loads(info_path.read_text())
            if old.get("seed") == args.seed and old.get("matrix") == args.matrix:
                info["cases"].update(old.get("cases", {}))
        except Exception:
            pass
    for r in res:
        info["cases"][r["id"]] = r
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(info_path, info)
    if args.preview:
        ph.preview(ids[: min(3, len(ids))], args.preview, seed=args.seed, matrix=args.matrix)
    if not args.quiet:
        dt = time.time() - t0
        print(f"phantom: {len(res)} cases written, {len(ids) - len(res)} already there, to {out} "
              f"({dt:.1f} s{f', {dt / len(res):.2f} s/case' if res else ''})"
              + (f"; preview {args.preview}" if args.preview else ""), file=sys.stderr)
    return 0


def _phantom_task(t):
    from .phantom import write_case

    return write_case(Path(t["out"]), t["id"], t["seed"], t["matrix"])


def _process(args) -> int:
    from . import run

    common = dict(spacing=args.spacing, orientation=args.orientation, workers=args.workers,
                  overwrite=args.overwrite, strict=args.strict, interpolation=args.interpolation,
                  label_interpolation=args.label_interpolation,
                  crop_to_body=args.crop_to_body, quiet=args.quiet, debug=getattr(args, "debug", False))
    if args.command == "synapse":
        summary = run.run_synapse(args.raw, args.out, intensity=args.intensity,
                                  keep_all_labels=args.keep_all_labels, unlisted=args.unlisted, **common)
    else:
        summary = run.run_msd(args.dataset, args.out, intensity=args.intensity, **common)
    return 2 if summary["failed"] else 0


def _inspect(args) -> int:
    from .inspection import inspect_folder

    inspect_folder(args.folder)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"phantom": _phantom, "synapse": _process, "msd": _process, "inspect": _inspect}[args.command]
    return run_command(handler, args, interrupted="interrupted (finished cases are kept; run again to resume)")

if __name__ == "__main__":
    sys.exit(main())

"""``glam3d evaluate``: Dice and HD95 per case and organ, summary tables and plots, with provenance."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..metrics.segmentation import CONVENTIONS

EPILOG = """\
Pairs every truth file with the prediction of the same case (img0001/label0001/0001 all name case 0001), checks
shape and geometry, and writes report.json, report.csv, report.md (paper table) and report.png into --out.
Conventions: glam3d (HD95 in mm; organs absent from both excluded and counted), nnformer and transunet (HD95 in
voxels with those papers' edge cases, for numbers comparable to theirs).
example: glam3d evaluate --pred preds/ --gt RawData/Training/label --labels synapse --out report/
"""


def add_parser(subparsers):
    p = subparsers.add_parser("evaluate", help="Dice/HD95 report of predictions against ground truth",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps (NIfTI)")
    p.add_argument("--gt", required=True, metavar="DIR",
                   help="folder of ground-truth label maps (or a raw BTCV folder with label/)")
    p.add_argument("--labels", default=None, metavar="synapse|PATH",
                   help="organs to score: 'synapse' (8 organs, raw BTCV ids) or a dataset.json "
                        "(default: the labels recorded in the predictions' manifest, else synapse)")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--convention", choices=CONVENTIONS, default="glam3d",
                   help="edge cases and HD95 units (default glam3d: mm)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from ..metrics.report import evaluate_folders, load_provenance, markdown_table, resolve_labels, write_report

    pred_dir = Path(args.pred)
    if not pred_dir.is_dir():
        raise UserError("--pred: prediction folder not found", pred_dir)
    provenance = load_provenance(pred_dir)
    if args.labels is not None:
        spec, source = args.labels, args.labels
    elif provenance.get("labels"):
        spec = {"labels": provenance["labels"], "plan": {"label_values": provenance.get("label_values") or {}}}
        source = "predictions.json"
    else:
        spec, source = "synapse", "synapse (default)"
    organs = resolve_labels(spec)
    per_case = evaluate_folders(pred_dir, args.gt, organs, args.convention, progress=not args.quiet)
    prov = dict(provenance)
    prov_eval = {"pred_dir": str(pred_dir.resolve()), "gt_dir": str(Path(args.gt).resolve()),
                 "labels": source, "organs": [[n, v] for n, v in organs], "convention": args.convention}
    summary = write_report(per_case, args.out, [n for n, _ in organs], args.convention,
                           provenance={**prov, "evaluation": prov_eval})
    _print(markdown_table(summary))
    excl = sum(e["dice"]["excluded"] for e in summary["per_organ"].values())
    print(f"{summary['n_cases']} cases, convention {args.convention} (HD95 in {summary['hd95_unit']})"
          + (f", {excl} organ-case Dice values excluded (absent from both)" if excl else ""))
    if summary["unmatched_predictions"]:
        print(f"note: {len(summary['unmatched_predictions'])} predictions match no truth file and were ignored")
    if not provenance:
        print("note: the predictions carry no predictions.json manifest; the report has no checkpoint provenance")
    print(f"report: {Path(args.out) / 'report.md'} (+ .json .csv .png)")
    return 0


def _print(text: str) -> None:
    """Print even where stdout cannot encode "±"/"—" (an ASCII locale): substitute instead of crashing."""
    import sys

    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(enc)
    except (UnicodeEncodeError, LookupError):
        text = text.replace("±", "+/-").replace("—", "-").encode(enc, errors="replace").decode(enc)
    print(text)

"""``glam3d evaluate``: Dice, HD95 and NSD per case and organ, summary tables and plots, with provenance."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..metrics.segmentation import CONVENTIONS

EPILOG = """\
Pairs every truth file with the prediction of the same case (img0001/label0001/0001 all name case 0001; nnU-Net's
case.nii.gz with case.nii.gz), checks shape, geometry and label values, and writes report.json, report.csv,
report.md (paper table), report.png and summary.json (nnU-Net v2's schema) into --out.

Predictions: flat / nnU-Net folders (case.nii.gz, .mha, .nrrd, ...; nnU-Net's summary.json, plans.json, *.npz are
passed over) or MONAI SaveImage folders (case/case_seg.nii.gz, case/case_trans.nii.gz). Several --pred folders
(the folds' validation outputs) give one report over all cases with per-fold means; a case in two is an error.
Truth: a folder (flat, MSD/nnU-Net labelsTr, BTCV label/) or a preprocessed glam3d dataset.json.
Labels: --labels synapse | a dataset.json (raw nnU-Net v2 / MSD, or preprocessed) | a JSON mapping
({"liver": 1} or {"1": "liver"}); without --labels, the labels in the predictions' predictions.json; never a guess.
A prediction value outside the label set is an error; a truth value outside the dataset's declared set a warning.
Metrics: Dice, HD95, NSD (normalised surface Dice at a per-organ tolerance in mm, FLARE22's organ tolerances by
default, 2 mm for other structures). Conventions: glam3d (HD95 in mm; organs absent from both excluded and
counted), nnformer and transunet (HD95 in voxels with those papers' edge cases, for numbers comparable to theirs).
examples:
  glam3d evaluate --pred preds/ --gt RawData/Training/label --labels synapse --out report/
  glam3d evaluate --pred run/fold_0/validation run/fold_1/validation run/fold_2/validation
      run/fold_3/validation run/fold_4/validation --gt nnUNet_raw/Dataset017_BTCV/labelsTr
      --labels nnUNet_raw/Dataset017_BTCV/dataset.json --out cv_report/ --decide-postprocessing
  glam3d evaluate --pred run/fold_0/validation --gt nnUNet_raw/Dataset017_BTCV/labelsTr --only-predicted
      --labels nnUNet_raw/Dataset017_BTCV/dataset.json --nsd-tolerance 2 liver=5 --out fold0_report/

2D (--task 2d): mIoU / mAcc / aAcc and per-class IoU (mmseg conventions: one confusion matrix over the set,
255 ignored) written as miou.json, miou.csv, miou.md into --out. Either score PNG label maps paired by file
name (predictions hold training ids 0..K-1; --reduce-zero-label maps ground-truth 0 -> ignored, v -> v-1 as for
raw ADE20K annotations), or predict and score the validation split of a dataset with a trained checkpoint.
examples:
  glam3d evaluate --task 2d --pred preds/ --gt ADEChallengeData2016/annotations/validation
      --num-classes 150 --reduce-zero-label --class-names ade20k --out report/
  glam3d evaluate --checkpoint runs/ade20k_glam_swin_upernet_tiny/checkpoints/best.pt
      --dataset-root data/ade20k --out report/ [--inference slide] [--device cuda]
"""


def add_parser(subparsers):
    p = subparsers.add_parser("evaluate", help="Dice/HD95/NSD report of predictions against ground truth",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_3d_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--decide-postprocessing", nargs="?", const="", default=None, metavar="FILE",
                   help="also decide the largest-component postprocessing on these cases as nnU-Net does and write "
                        "the decision (default: OUT/postprocessing.json); the report says per organ if it helped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("2D segmentation (mIoU)")
    g.add_argument("--task", choices=("3d", "2d"), default=None,
                   help="3d: label volumes, Dice/HD95/NSD (default); 2d: PNG label maps or --checkpoint, mIoU")
    g.add_argument("--num-classes", type=int, metavar="K", help="2D: number of classes (PNG mode)")
    g.add_argument("--reduce-zero-label", action="store_true",
                   help="2D: ground-truth value 0 is ignored and v becomes v-1 (raw ADE20K annotations)")
    g.add_argument("--ignore-index", type=int, default=255, help="2D: ground-truth value left out (default 255)")
    g.add_argument("--class-names", metavar="ade20k|cityscapes|FILE",
                   help="2D: class names (a preset or a JSON list); default 0..K-1 (PNG mode)")
    g.add_argument("--checkpoint", metavar="CKPT", help="2D: predict with this trained checkpoint, then score")
    g.add_argument("--dataset-root", metavar="DIR",
                   help="2D with --checkpoint: dataset folder (default: data.root of the checkpoint's config)")
    g.add_argument("--split", metavar="NAME", help="2D with --checkpoint: split to score (default: validation)")
    g.add_argument("--inference", choices=("whole", "slide"),
                   help="2D with --checkpoint: whole image or sliding windows (default: the config's val.inference)")
    g.add_argument("--flip", action="store_true", help="2D with --checkpoint: add the horizontally flipped pass")
    g.add_argument("--max-images", type=int, default=0, help="2D with --checkpoint: score the first N only")
    g.add_argument("--device", default="auto", help="2D with --checkpoint: auto | cpu | cuda | cuda:N")
    return p


def add_3d_arguments(p) -> None:
    """The 3D options ``glam3d evaluate`` and ``glam3d postprocess decide`` share."""
    p.add_argument("--pred", nargs="+", metavar="DIR",
                   help="folder(s) of predicted label maps: one, or the folds' validation folders (2D: one PNG folder)")
    p.add_argument("--gt", metavar="DIR|dataset.json",
                   help="ground truth: a folder (flat, labelsTr, BTCV label/), or a preprocessed glam3d dataset.json "
                        "(each case's source_label); 2D: a PNG folder")
    p.add_argument("--labels", default=None, metavar="synapse|JSON",
                   help="organs to score: 'synapse' (8 organs, raw BTCV ids), a dataset.json (raw nnU-Net v2 / MSD "
                        "or preprocessed), or a JSON mapping {name: value} / {value: name} (default: the labels "
                        "recorded in the predictions' predictions.json; else an error)")
    p.add_argument("--only-predicted", action="store_true",
                   help="score only the truths that have a prediction (the report counts the others); without it a "
                        "truth without prediction is an error")
    p.add_argument("--nsd-tolerance", nargs="+", metavar="MM|ORGAN=MM",
                   help="NSD tolerance in mm: one number for every organ and/or organ=mm (default: FLARE22's "
                        "per-organ tolerances, 2 mm for other structures)")
    p.add_argument("--convention", choices=CONVENTIONS, default="glam3d",
                   help="edge cases and HD95 units (default glam3d: mm)")


def _label_spec(args, pred_dirs, manifests):
    """``(labels spec, where it came from)``: --labels, else the labels of the predictions' manifests (all the
    same), else a UserError asking for --labels."""
    if args.labels is not None:
        return args.labels, args.labels
    found = [(d, m) for d, m in manifests.items() if m.get("labels")]
    if found:
        specs = {repr((m["labels"], m.get("label_values"))) for _, m in found}
        if len(specs) > 1:
            raise UserError("the prediction folders' manifests record different label sets; give --labels")
        d, m = found[0]
        return {"labels": m["labels"], "plan": {"label_values": m.get("label_values") or {}}}, \
            f"{Path(d) / 'predictions.json'}"
    hint = ""
    if args.gt and str(args.gt).lower().endswith(".json"):
        hint = f" (e.g. --labels {args.gt})"
    where = pred_dirs[0] if len(pred_dirs) == 1 else None
    raise UserError("no label set: the predictions carry no predictions.json with labels, and glam3d does not guess "
                    f"which value is which organ; give --labels synapse, a dataset.json or a JSON mapping{hint}",
                    where)


def run(args) -> int:
    task = args.task or ("2d" if getattr(args, "checkpoint", None) else "3d")
    if task == "2d":
        return run_2d(args)
    if args.checkpoint:
        raise UserError("--checkpoint evaluates 2D checkpoints (--task 2d); for 3D run glam3d predict first")
    if not args.pred or not args.gt:
        raise UserError("--pred and --gt are required (folders of predicted and ground-truth label maps)")
    return run_3d(args)


def run_3d(args) -> int:
    import sys

    from ..metrics.labels import load_label_set
    from ..metrics.provenance import attribute, load_provenance
    from ..metrics.report import evaluate_folders, markdown_table, write_report

    pred_dirs = [Path(p) for p in args.pred]
    for d in pred_dirs:
        if not d.is_dir():
            raise UserError("--pred: prediction folder not found", d)
    manifests = {str(d): load_provenance(d) for d in pred_dirs}
    spec, source = _label_spec(args, pred_dirs, manifests)
    label_set = load_label_set(spec)
    label_set.source = source if isinstance(source, str) else label_set.source
    organs = label_set.organs
    decide = getattr(args, "decide_postprocessing", None) is not None
    pp_path = None
    if decide:
        pp_path = Path(args.decide_postprocessing) if args.decide_postprocessing else Path(args.out) / \
            "postprocessing.json"
        if pp_path.exists() and pp_path.is_dir():
            raise UserError("--decide-postprocessing: a folder, not a file", pp_path)

    def warn(msg):
        print(f"warning: {msg}", file=sys.stderr)

    per_case = evaluate_folders(pred_dirs, args.gt, label_set, args.convention, progress=not args.quiet,
                                only_predicted=args.only_predicted, nsd_tolerance=args.nsd_tolerance,
                                postprocessing=decide, warn=warn)
    cases = {k: v for k, v in per_case.items() if not k.startswith("__")}
    checkpoints, case_prov = [], {}
    if any(manifests.values()):  # every checkpoint behind the scored files, from each case's manifest entry
        checkpoints, case_prov = attribute({c: (v["fold"], v["prediction"], v["case_name"]) for c, v in cases.items()},
                                           manifests)
    evaluation = {"pred_dirs": [str(d.resolve()) for d in pred_dirs], "gt": str(Path(args.gt).resolve()),
                  "gt_files": per_case["__gt__"], "labels": label_set.source, "organs": [[n, v] for n, v in organs],
                  "convention": args.convention, "only_predicted": bool(args.only_predicted),
                  "nsd_tolerance_mm": per_case["__nsd_tolerance_mm__"]}
    if len(pred_dirs) == 1:
        prov = {**manifests[str(pred_dirs[0])], "evaluation": evaluation} if manifests[str(pred_dirs[0])] else {}
    else:
        prov = {"manifests": {d: m for d, m in manifests.items() if m}, "evaluation": evaluation}
        if not prov["manifests"]:
            prov = {}
    decision = None
    if decide:
        from ..postprocessing import decide_postprocessing

        decision = decide_postprocessing({c: v["postprocessing_dice"] for c, v in cases.items()}, organs)
        decision["evaluated"] = {"pred_dirs": evaluation["pred_dirs"], "gt": evaluation["gt"],
                                 "labels": label_set.source, "cases": list(cases)}
    summary = write_report(per_case, args.out, [n for n, _ in organs], args.convention, provenance=prov,
                           checkpoints=checkpoints, case_provenance=case_prov, postprocessing=decision,
                           evaluation=evaluation)
    if decision is not None:
        from ..metrics.report import _json_safe
        from ..utils.io import atomic_write_json

        atomic_write_json(pp_path, _json_safe({**decision, "created": summary["evaluated_at"]}))
    _print(markdown_table(summary))
    excl = sum(e["dice"]["excluded"] for e in summary["per_organ"].values())
    folds = f" from {len(pred_dirs)} folders" if len(pred_dirs) > 1 else ""
    print(f"{summary['n_cases']} cases{folds}, convention {args.convention} (HD95 in {summary['hd95_unit']}; NSD at "
          + ", ".join(f"{n} {t:g}" for n, t in (summary["nsd_tolerance_mm"] or {}).items()) + " mm)"
          + (f", {excl} organ-case Dice values excluded (absent from both)" if excl else ""))
    for f in summary["folds"]:
        print(f"  {f['pred_dir']}: {f['n_cases']} cases, mean Dice {100 * f['overall']['dice']:.2f}")
    left = summary["truths_left_out"]["count"]
    if args.only_predicted:
        print(f"--only-predicted: {left} truth{'s' if left != 1 else ''} without a prediction left out")
    if summary["unmatched_predictions"]:
        print(f"note: {len(summary['unmatched_predictions'])} predictions match no truth file and were ignored")
    if summary["warnings"]:
        print(f"note: {len(summary['warnings'])} warning(s), listed in the report")
    known = [c for c in checkpoints if c["sha256"]]
    if len(known) > 1:
        print(f"note: the scored predictions come from {len(known)} different checkpoints (report.md lists which "
              f"made which case)")
    if any(c["sha256"] is None for c in checkpoints) and any(manifests.values()):
        n = sum(len(c["cases"]) for c in checkpoints if c["sha256"] is None)
        print(f"note: {n} case(s) have no checkpoint recorded in their predictions.json")
    if not any(manifests.values()):
        print("note: the predictions carry no predictions.json manifest; the report has no checkpoint provenance")
    if decision is not None:
        fg = decision["foreground_largest_component"]
        kept = [e["name"] for e in decision["per_class"] if e["apply"]]
        print(f"postprocessing: foreground-as-one {'kept' if fg['apply'] else 'not kept'}; largest component kept "
              f"for {', '.join(kept) if kept else 'no organ'} (mean Dice {100 * decision['mean_dice']['without']:.2f}"
              f" -> {100 * decision['mean_dice']['with']:.2f}); decision: {pp_path}")
    print(f"report: {Path(args.out) / 'report.md'} (+ .json .csv .png, summary.json)")
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


# ----------------------------------------------------------------------------------------------------------------
# 2D
# ----------------------------------------------------------------------------------------------------------------
def _class_names_2d(spec, num_classes):
    import json

    from ..data.natural import ADE20K_CLASSES, CITYSCAPES_CLASSES

    if spec is None:
        return None if num_classes is None else [str(i) for i in range(num_classes)]
    presets = {"ade20k": list(ADE20K_CLASSES), "cityscapes": list(CITYSCAPES_CLASSES)}
    if spec in presets:
        names = presets[spec]
    else:
        path = Path(spec)
        try:
            names = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError("--class-names: not ade20k, cityscapes or an existing JSON file", path) from None
        except (OSError, ValueError) as err:
            raise UserError(f"--class-names: cannot read a JSON list of names ({err})", path) from None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise UserError("--class-names: expected a JSON list of class names", path)
    if num_classes is not None and len(names) != num_classes:
        raise UserError(f"--class-names lists {len(names)} classes but --num-classes is {num_classes}")
    return names


def evaluate_png_folders(pred_dir, gt_dir, num_classes: int, *, reduce_zero_label: bool = False,
                         ignore_index: int = 255):
    """Confusion matrix of PNG label maps paired by file stem (every ground-truth file needs a prediction).
    Returns ``(ConfusionMatrix, pairs, unmatched_predictions)``."""
    import numpy as np

    from ..data.natural import read_label_png
    from ..metrics.miou import ConfusionMatrix

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for flag, d in (("--pred", pred_dir), ("--gt", gt_dir)):
        if not d.is_dir():
            raise UserError(f"{flag}: folder not found", d)
    gts = {p.stem: p for p in sorted(gt_dir.rglob("*.png"))}
    preds = {p.stem: p for p in sorted(pred_dir.rglob("*.png"))}
    if not gts:
        raise UserError("--gt: no ground-truth PNG files", gt_dir)
    missing = [s for s in gts if s not in preds]
    if missing:
        raise UserError(f"{len(missing)} ground-truth maps have no prediction of the same name (e.g. "
                        f"{missing[0]}.png)", pred_dir)
    cm = ConfusionMatrix(num_classes, ignore_index)
    for stem, gt_path in gts.items():
        gt = read_label_png(gt_path).astype(np.int64)
        pred = read_label_png(preds[stem]).astype(np.int64)
        if pred.shape != gt.shape:
            raise UserError(f"prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but its ground truth is "
                            f"{gt.shape[1]}x{gt.shape[0]}", preds[stem])
        if reduce_zero_label:
            gt = np.where(gt == 0, ignore_index, gt - 1)
            gt[gt == ignore_index - 1] = ignore_index  # mmseg: 255 -> 254 -> ignored again
        if pred.max(initial=0) >= num_classes or pred.min(initial=0) < 0:
            raise UserError(f"predicted label {int(pred.max())} outside 0..{num_classes - 1}", preds[stem])
        bad = (gt != ignore_index) & ((gt < 0) | (gt >= num_classes))
        if bad.any():
            raise UserError(f"ground-truth label {int(gt[bad].flat[0])} outside 0..{num_classes - 1} and not "
                            f"{ignore_index}{'' if reduce_zero_label else ' (raw ADE20K? add --reduce-zero-label)'}",
                            gt_path)
        cm.update(pred, gt)
    unmatched = sorted(s for s in preds if s not in gts)
    return cm, len(gts), unmatched


def run_2d(args) -> int:
    from ..metrics.miou import write_miou_report

    if args.checkpoint:
        return _run_2d_checkpoint(args)
    if not args.pred or not args.gt:
        raise UserError("--task 2d: give --pred and --gt (PNG folders) with --num-classes, or --checkpoint")
    if len(args.pred) > 1:
        raise UserError("--task 2d: one --pred folder")
    args.pred = args.pred[0]
    if not args.num_classes or args.num_classes < 1:
        raise UserError("--task 2d with --pred/--gt needs --num-classes K (e.g. 150 for ADE20K, 19 for Cityscapes)")
    names = _class_names_2d(args.class_names, args.num_classes)
    cm, n, unmatched = evaluate_png_folders(args.pred, args.gt, args.num_classes,
                                            reduce_zero_label=args.reduce_zero_label, ignore_index=args.ignore_index)
    meta = {"pred_dir": str(Path(args.pred).resolve()), "gt_dir": str(Path(args.gt).resolve()), "images": n,
            "num_classes": args.num_classes, "reduce_zero_label": bool(args.reduce_zero_label),
            "ignore_index": args.ignore_index}
    metrics = cm.metrics(names)
    write_miou_report(args.out, metrics, title=f"mIoU of {args.pred} ({n} images)", extra=meta)
    print(f"{n} images: mIoU {100 * metrics['mIoU']:.2f}, mAcc {100 * metrics['mAcc']:.2f}, "
          f"aAcc {100 * metrics['aAcc']:.2f}")
    if unmatched:
        print(f"note: {len(unmatched)} predictions match no ground-truth file and were ignored")
    print(f"report: {Path(args.out) / 'miou.md'} (+ .json .csv)")
    return 0


def _run_2d_checkpoint(args) -> int:
    import dataclasses

    from ..config import Data2DConfig, config_from_dict
    from ..data.natural import build_2d_datasets
    from ..engine.checkpoint import checkpoint_metadata, load_checkpoint, model_from_checkpoint
    from ..engine.distributed import resolve_device
    from ..metrics.miou import evaluate_segmentation, write_miou_report

    state = load_checkpoint(args.checkpoint, mmap=True)
    raw_cfg = state.get("config") or {}
    try:
        cfg = config_from_dict(raw_cfg, source=str(args.checkpoint))
    except UserError:
        cfg = None
    if cfg is None or not isinstance(cfg.data, Data2DConfig):
        raise UserError("not a 2D checkpoint (its config has no data.dataset ade20k | cityscapes | synthetic)",
                        args.checkpoint)
    data = dataclasses.asdict(cfg.data)
    if args.dataset_root:
        data["root"] = str(args.dataset_root)
    if args.split:
        data["val_split"] = args.split
    _, val_ds, names = build_2d_datasets(data)
    model = model_from_checkpoint(state, path=args.checkpoint)
    state = checkpoint_metadata(state)
    if getattr(model, "num_classes", len(names)) != len(names):
        raise UserError(f"the checkpoint's network predicts {model.num_classes} classes but the data at "
                        f"{data['root']} has {len(names)}", args.checkpoint)
    device = resolve_device(args.device)
    model.to(device).eval()
    mode = args.inference or cfg.val.inference
    crop = list(cfg.val.roi_size or cfg.data.crop_size)
    stride = [max(1, int(round(c * (1.0 - cfg.val.overlap)))) for c in crop]
    n = min(len(val_ds), args.max_images) if args.max_images else len(val_ds)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="evaluate", leave=False, dynamic_ncols=True, mininterval=1.0)
    cm = evaluate_segmentation(model, val_ds, len(names), ignore_index=cfg.loss.ignore_index, mode=mode,
                               crop_size=crop, stride=stride, flip=args.flip or cfg.val.mirror, device=device,
                               max_items=n, progress=(lambda i: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    metrics = cm.metrics(names)
    meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "model": (state.get("model_spec") or {}).get("name"),
            "dataset": cfg.data.dataset, "data_root": str(Path(data["root"]).resolve()),
            "split": data.get("val_split") or "validation", "images": n, "inference": mode,
            "crop_size": crop, "stride": stride if mode == "slide" else None, "flip": bool(args.flip or cfg.val.mirror),
            "epoch": state.get("epoch"), "iteration": state.get("iteration"), "device": str(device)}
    write_miou_report(args.out, metrics, title=f"{meta['model']} on {cfg.data.dataset} ({n} images, {mode})",
                      extra=meta)
    print(f"{n} images: mIoU {100 * metrics['mIoU']:.2f}, mAcc {100 * metrics['mAcc']:.2f}, "
          f"aAcc {100 * metrics['aAcc']:.2f}")
    print(f"report: {Path(args.out) / 'miou.md'} (+ .json .csv)")
    return 0

"""``glam3d demo``: the whole pipeline on the embedded default, end to end on a CPU.

phantom CT set (BTCV layout) → Synapse-protocol preprocessing (on a 4 mm grid, ``--spacing``) → train the tiny
GLAM-nnFormer → sliding-window inference on the held-out (Synapse test-split) phantoms, written in each scan's own
geometry → per-organ Dice/HD95 report against the original label maps (table printed; JSON, CSV, Markdown and PNG
saved).

Each step is the same code path a user runs alone (``glam3d-preprocess``, ``glam3d train``, ``glam3d predict``,
``glam3d evaluate``); a rerun of the demo resumes: finished cases, a finished training run and existing
predictions are kept.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import UserError

DEFAULT_CONFIG = "phantom_glam_nnformer_tiny"  # shipped in the package (glam3d/configs)
TARGET_DICE = 0.80
TARGET_MINUTES = 15.0
# the demo's training grid (sz sy sx, mm): a 32x64x64 crop of a 4 mm grid holds most of a phantom abdomen (every
# organ, both body sides) in one patch, which is what lets the tiny network learn the anatomy in ~1000 CPU steps;
# predictions are still written, and scored, in each scan's own geometry (~2.8 mm at --matrix 128)
DEMO_SPACING = (4.0, 4.0, 4.0)
# what a demo folder holds: --overwrite deletes a folder only when it holds nothing else
DEMO_ENTRIES = {"phantom_raw", "phantom_pre", "run", "predictions", "test_labels", "report", "phantom_preview.png"}


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="phantoms -> preprocess -> train tiny GLAM-nnFormer -> infer -> report",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="work folder (default ./demo_out)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="training config: a file or a shipped config's name (default: phantom_glam_nnformer_tiny)")
    p.add_argument("--cases", type=int, default=30, help="phantom cases (BTCV ids; default 30 = 18 train/12 test)")
    p.add_argument("--matrix", type=int, default=128, help="phantom in-plane matrix (default 128, ~2.8 mm)")
    p.add_argument("--spacing", nargs=3, type=float, default=list(DEMO_SPACING), metavar=("SZ", "SY", "SX"),
                   help=f"preprocessing target spacing in mm (default {' '.join(f'{v:g}' for v in DEMO_SPACING)}; "
                        f"the evaluation is always in each scan's own geometry)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override, e.g. train.epochs=4 (repeatable)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes for phantoms/preprocessing")
    p.add_argument("--overwrite", action="store_true", help="start from scratch (deletes the --out folder first)")
    return p


def run(args) -> int:
    from ..config import config_path, load_config
    from ..engine.train import train
    from .. import cli as glam_cli
    from preprocessing import cli as pre_cli

    out: Path = args.out
    config_path(args.config)  # a missing config fails here, before any work
    if args.overwrite and out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
        if foreign:
            raise UserError(f"--overwrite: refusing to delete a folder that holds more than a demo run "
                            f"(e.g. {foreign[0]})", out)
        shutil.rmtree(out)
    raw, pre, run_dir = out / "phantom_raw", out / "phantom_pre", out / "run"
    pred, gt, report = out / "predictions", out / "test_labels", out / "report"
    t0 = time.time()
    timings = {}

    def step(name, fn):
        print(f"\n== {name} ==", flush=True)
        t = time.time()
        rc = fn()
        timings[name] = time.time() - t
        if rc:
            raise UserError(f"demo step '{name}' failed (exit code {rc}); see the messages above")

    step("1/5 phantom CT set", lambda: pre_cli.main(
        ["phantom", "--out", str(raw), "--cases", str(args.cases), "--matrix", str(args.matrix),
         "--seed", str(args.seed), "--workers", str(args.workers), "--preview", str(out / "phantom_preview.png")]))
    step("2/5 preprocess (Synapse protocol)", lambda: pre_cli.main(
        ["synapse", "--raw", str(raw), "--out", str(pre), "--workers", str(args.workers), "--unlisted", "skip",
         "--spacing", *(f"{v:g}" for v in args.spacing)]))

    summary = {}

    def _train():
        cfg = load_config(args.config, [f"data.root={pre}", f"output={run_dir}", f"train.seed={args.seed}",
                                        *args.override])
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        summary.update(train(cfg, resume=resume))
        return 0

    step("3/5 train", _train)
    best = Path(summary.get("checkpoint_best") or summary["checkpoint_last"])

    manifest = json.loads((pre / "dataset.json").read_text())
    test_ids = [e["id"] for e in manifest["test"]]
    cases = manifest["cases"]
    images = [cases[i]["source_image"] for i in test_ids]
    gt.mkdir(parents=True, exist_ok=True)
    for i in test_ids:  # the truth of the test cases only, for evaluate
        src = Path(cases[i]["source_label"])
        dst = gt / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)

    step("4/5 sliding-window inference on the held-out phantoms", lambda: glam_cli.main(
        ["predict", "--checkpoint", str(best), "--input", *images, "--output", str(pred)]))
    step("5/5 per-organ report", lambda: glam_cli.main(
        ["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", "synapse", "--out", str(report)]))

    rep = json.loads((report / "report.json").read_text())
    mean_dice = _mean_dice(rep)
    minutes = (time.time() - t0) / 60
    print("\n== demo summary ==")
    for name, s in timings.items():
        print(f"  {name:<55s} {s:7.1f} s")
    ok_d = mean_dice is not None and mean_dice >= TARGET_DICE
    ok_t = minutes <= TARGET_MINUTES
    print(f"mean Dice over the 8 Synapse organs on {len(test_ids)} held-out phantoms: "
          f"{mean_dice:.4f} (target >= {TARGET_DICE:.2f}: {'PASS' if ok_d else 'FAIL'})")
    print(f"total time: {minutes:.1f} min (target <= {TARGET_MINUTES:.0f} min: {'PASS' if ok_t else 'FAIL'})")
    print(f"report: {report / 'report.md'}  plots: {report / 'report.png'}  run: {run_dir}")
    return 0


def _mean_dice(rep: dict) -> float:
    """The overall mean Dice of a report.json written by :func:`glam3d.metrics.report.write_report`."""
    try:
        return float(rep["overall"]["dice"]["mean"])
    except (KeyError, TypeError, ValueError):
        raise UserError("report.json has no overall mean Dice", "report.json") from None

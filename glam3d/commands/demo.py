"""``glam3d demo``: the whole pipeline on the embedded default, end to end on a CPU.

phantom CT set (BTCV layout) → Synapse-protocol preprocessing (on a 4 mm grid, ``--spacing``) → train the tiny
GLAM-nnFormer → sliding-window inference on the held-out (Synapse test-split) phantoms, written in each scan's own
geometry → per-organ Dice/HD95 report against the original label maps (table printed; JSON, CSV, Markdown and PNG
saved).

Each step is the same code path a user runs alone (``glam3d-preprocess``, ``glam3d train``, ``glam3d predict``,
``glam3d evaluate``); a rerun of the demo resumes: finished cases, a finished training run and existing
predictions are kept.

The work folder (``--out``) is claimed through :mod:`glam3d.utils.ownership` (kind ``demo``): its marker is written
first and lists :data:`DEMO_ENTRIES` before they are made; ``--overwrite`` deletes only those. A folder with other
content and no marker is refused (one line naming it), unless it is a demo folder written before markers existed
(:func:`adopt_demo`).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError

DEFAULT_CONFIG = "phantom_glam_nnformer_tiny"  # shipped in the package (glam3d/configs)
TARGET_DICE = 0.80
TARGET_MINUTES = 15.0
# the demo's training grid (sz sy sx, mm): a 32x64x64 crop of a 4 mm grid holds most of a phantom abdomen (every
# organ, both body sides) in one patch, which is what lets the tiny network learn the anatomy in ~1000 CPU steps;
# predictions are still written, and scored, in each scan's own geometry (~2.8 mm at --matrix 128)
DEMO_SPACING = (4.0, 4.0, 4.0)
# what a demo folder holds (listed in its ownership marker before they are made; --overwrite deletes only these)
DEMO_KIND = "demo"
DEMO_ENTRIES = ("phantom_raw/", "phantom_pre/", "run/", "predictions/", "test_labels/", "report/",
                "phantom_preview.png")


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
    p.add_argument("--seed", type=int, default=0, help="seeds the phantoms and the training (default 0)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="training config override, e.g. train.epochs=4 (repeatable)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes for phantoms/preprocessing")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch (deletes what an earlier demo wrote into --out, nothing else)")
    return p


def _marker_kind(folder: Path) -> Optional[str]:
    from ..utils.ownership import read_marker

    try:
        marker = read_marker(folder)
    except UserError:
        return None
    return marker["kind"] if marker else None


def _only_files(folder: Path, pattern: str) -> bool:
    return folder.is_dir() and not folder.is_symlink() and all(
        p.is_file() and not p.is_symlink() and re.fullmatch(pattern, p.name) for p in folder.iterdir())


def adopt_demo(folder: Path) -> Optional[list]:
    """The entries of a ``glam3d demo`` folder written before ownership markers, or None: its ``phantom_raw/`` is a
    glam3d phantom set, and each other demo entry there is what the demo writes (``phantom_pre/`` a glam3d
    preprocessed dataset, ``run/`` a glam3d run folder, ``predictions/`` glam3d predictions, ``test_labels/``
    only ``label*.nii.gz``, ``report/`` only evaluate's report files, the preview a PNG). Other files in the folder
    are the user's: not listed, never touched."""
    from preprocessing.output import PHANTOM, PREPROCESSED, adopt_phantom, adopt_preprocessed

    from ..engine.run_folder import RUN_KIND, adopt_run
    from ..inference.manifest import FORMAT, read_manifest

    def is_dataset(p, kind, adopt):
        return p.is_dir() and (_marker_kind(p) == kind or (_marker_kind(p) is None and adopt(p) is not None))

    checks = {
        "phantom_raw": lambda p: is_dataset(p, PHANTOM, adopt_phantom),
        "phantom_pre": lambda p: is_dataset(p, PREPROCESSED, adopt_preprocessed),
        "run": lambda p: is_dataset(p, RUN_KIND, adopt_run),
        "predictions": lambda p: p.is_dir() and read_manifest(p / "predictions.json").get("format") == FORMAT,
        "test_labels": lambda p: _only_files(p, r"label\d+\.nii\.gz"),
        "report": lambda p: _only_files(p, r"(report\.(json|csv|md|png)|summary\.json|\..+\.tmp.*)"),
        "phantom_preview.png": lambda p: p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n",
    }
    present = [e for e in DEMO_ENTRIES if (folder / e.rstrip("/")).exists()]
    if "phantom_raw/" not in present or not all(checks[e.rstrip("/")](folder / e.rstrip("/")) for e in present):
        return None
    return present


def claim_demo_folder(out: Path, overwrite: bool):
    """Claim ``out`` for the demo (see the module doc); ``overwrite`` deletes what an earlier demo listed."""
    from ..utils.ownership import claim

    try:
        owned = claim(out, DEMO_KIND, tool="glam3d demo", adopt=adopt_demo, log=lambda m: print(f"note: {m}"))
    except UserError as err:
        if overwrite:
            raise UserError(f"--overwrite: refusing to delete anything here: {err}") from None
        raise
    if overwrite:
        owned.clear()
    owned.record(*DEMO_ENTRIES)
    return owned


def run(args) -> int:
    from ..config import config_path, load_config
    from ..engine.train import train
    from .. import cli as glam_cli
    from preprocessing import cli as pre_cli

    out: Path = args.out
    config_path(args.config)  # a missing config fails here, before any work
    claim_demo_folder(out, args.overwrite)
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

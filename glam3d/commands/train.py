"""``glam3d train CONFIG``: train a network on a preprocessed dataset (a thin layer over
:func:`glam3d.engine.train.train`).

Examples::

    glam3d train phantom_glam_nnformer_tiny --override data.root=data/phantom_pre
    glam3d train synapse_glam_nnformer --out runs/glam_s1 --override train.seed=1
    glam3d train synapse_glam_nnformer --out runs/glam_s1 --resume
    torchrun --nproc_per_node=4 -m glam3d train synapse_glam_nnformer
    for k in 0 1 2 3 4; do glam3d train synapse_glam_nnformer --data data/synapse_nn --fold $k --out runs/cv; done
    glam3d evaluate --pred runs/cv/fold_*/validation --gt data/synapse_nn/dataset.json --only-predicted \
        --out runs/cv/cv_report

Also runnable without the dispatcher: ``python -m glam3d.commands.train CONFIG ...``.
"""
from __future__ import annotations

import argparse
import sys

HELP = "train a network from a YAML config (single process, or DDP under torchrun)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help=HELP, description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="configs: `glam3d configs` lists the shipped ones; keys: see glam3d/config.py")
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, or the name of a shipped config (`glam3d configs`); a file may "
                                   "inherit another with 'base:'")
    p.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config key, e.g. optim.lr=3e-4 or data.roi_size=[32,64,64] (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: the config's 'output')")
    p.add_argument("--data", metavar="DIR", help="preprocessed dataset folder (same as --override data.root=DIR)")
    p.add_argument("--fold", metavar="K|all",
                   help="cross-validation fold of DIR/splits_final.json (nnU-Net's format; made on first use, 5 "
                        "folds): 0..4, or 'all' (every training case, no validation); the run folder becomes "
                        "OUT/fold_K, and at the end the fold's validation cases are predicted and scored in "
                        "OUT/fold_K/validation (same as --override data.fold=K)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last "
                                                          "checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in the output folder")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device, auto)")
    p.add_argument("--epochs", type=int, help="same as --override train.epochs=N")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def build_config(args):
    from ..config import load_config

    overrides = list(args.override)
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.fold is not None:
        overrides.append(f"data.fold={args.fold}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(args.config, overrides=overrides)
    if args.out:
        cfg.output = args.out
    return cfg


def run(args) -> int:
    from ..engine.train import train
    from ..errors import UserError

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    cfg = build_config(args)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if summary.get("rank", 0) != 0:
        return 0
    if summary.get("task") == "2d":
        what, best = "best val mIoU", summary.get("best_miou")
    else:
        what, best = "best mean val Dice", summary.get("best_mean_dice")
    print(f"run folder: {summary['run_dir']}  {what}: {'n/a' if best is None else f'{best:.4f}'}  "
          f"checkpoint: {summary['checkpoint_best'] or summary['checkpoint_last']}")
    val = summary.get("validation")
    if val:
        dice = val.get("mean_dice")
        print(f"fold validation: {val['cases']} cases predicted into {val['folder']}"
              + (f"  mean Dice {dice:.4f}  report: {val['report']}" if dice is not None else ""))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m glam3d.commands.train``), same behaviour as ``glam3d train``."""
    from ..cli import run_and_end

    p = argparse.ArgumentParser(prog="glam3d train", description=HELP)
    _add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    return run_and_end(run, args)


if __name__ == "__main__":
    sys.exit(main())

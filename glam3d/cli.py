"""The ``glam3d`` command: a thin dispatcher over ``glam3d.commands.<name>`` modules.

Each command module defines ``add_parser(subparsers)`` (returns its parser) and ``run(args) -> int``.
User errors (:class:`glam3d.errors.UserError`) print one line and exit 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .alloc import tune_from_environment
from .errors import run_command

# command name -> module under glam3d.commands
COMMANDS = {
    "models": "models",
    "configs": "configs",
    "demo": "demo",
    "train": "train",
    "predict": "predict",
    "evaluate": "evaluate",
    "postprocess": "postprocess",
    "show": "show",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glam3d", description="glam3d: GLAM transformers for 3D medical (and 2D) "
                                     "image segmentation: train, predict, evaluate, inspect")
    parser.add_argument("--version", action="version", version=f"glam3d {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS.values():
        module = importlib.import_module(f"glam3d.commands.{mod}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
        # allow --debug after the sub-command too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, --version and usage errors exit here, without importing torch
    tune_from_environment()  # opt-in only (GLAM3D_ALLOC_TUNING), before the command imports torch
    return run_and_end(args._run, args)


def run_and_end(fn, args) -> int:
    """:func:`~glam3d.errors.run_command` ``fn(args)``; in a process that ran a distributed job, then the end of
    the process (:func:`glam3d.engine.distributed.end_process`), after an uncaught exception too (its traceback is
    printed and the exit status is 1, not the SIGABRT of PyTorch's teardown)."""
    def distributed():  # imported only by commands that can run under torchrun (no torch import here otherwise)
        return sys.modules.get("glam3d.engine.distributed")
    try:
        rc = run_command(fn, args)
    except BaseException as err:
        if distributed() is None or not distributed().ended_group():
            raise
        if isinstance(err, SystemExit) and isinstance(err.code, int):
            rc = err.code
        else:
            import traceback
            traceback.print_exc()
            rc = 1
    return distributed().end_process(rc) if distributed() is not None else rc

if __name__ == "__main__":
    sys.exit(main())

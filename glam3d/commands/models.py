"""``glam3d models``: list the registered networks with parameters, MACs at their crop and GLAM overhead."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list registered networks (params, MACs, GLAM overhead)",
                              description=__doc__)
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="only these variants or families (e.g. nnformer glam_nnformer_tiny)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def run(args) -> int:
    from ..errors import UserError
    from ..models.complexity import format_table, model_table

    try:
        rows = model_table(args.names)
    except ValueError as err:
        raise UserError(str(err)) from None
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=list))
    else:
        print(format_table(rows))
    return 0

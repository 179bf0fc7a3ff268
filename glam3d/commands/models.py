"""``glam3d models``: list the registered networks with parameters, MACs at their crop and GLAM overhead.

The one source of the model table: ``glam3d models --markdown`` prints the table the README shows."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list registered networks (params, MACs, GLAM overhead)",
                              description=__doc__)
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="only these variants or families (e.g. nnformer glam_nnformer_tiny), or variants with "
                        "options NAME:key=value (e.g. glam_swin_upernet_base:glam_variant=paper)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the rows as JSON")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's model table)")
    return p


def run(args) -> int:
    from ..errors import UserError
    from ..models.complexity import format_markdown, format_table, model_table

    try:
        rows = model_table(args.names)
    except ValueError as err:
        raise UserError(str(err)) from None
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=list))
    elif getattr(args, "markdown", False):
        print(format_markdown(rows))
    else:
        print(format_table(rows))
    return 0

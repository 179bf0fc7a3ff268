"""``glam3d configs``: list the training configs that ship with glam3d, or print one to start your own from.

Examples::

    glam3d configs                                   # the shipped configs, one a line, with their first comment
    glam3d configs synapse_glam_nnformer > my.yaml   # a copy to edit; `base: ...` lines name other shipped configs

``glam3d train NAME`` takes a shipped config by name; a file path works everywhere a name does.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("configs", help="list the shipped training configs, or print one",
                              description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help="print this shipped config (YAML, as shipped)")
    return p


def _summary(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def run(args) -> int:
    from ..config import config_path, shipped_configs

    if args.name:
        print(config_path(args.name).read_text(), end="")
        return 0
    names = shipped_configs()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {_summary(config_path(name).read_text())}")
    return 0

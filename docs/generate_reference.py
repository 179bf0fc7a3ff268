"""Write the generated reference pages: ``docs/reference/cli.md`` (from the argparse parsers of ``glam3d`` and
``glam3d-preprocess``) and ``docs/reference/config.md`` (every config key, its type, default and meaning, from the
dataclasses in :mod:`glam3d.config` and the comments beside their fields).

    python docs/generate_reference.py           # rewrite both pages
    python docs/generate_reference.py --check   # exit 1 when a page is stale (the tests run this)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGES = {"cli": HERE / "reference" / "cli.md", "config": HERE / "reference" / "config.md"}
WIDTH = "120"  # argparse wraps usage lines at $COLUMNS: fixed so the page does not depend on the terminal


# ------------------------------------------------------------------------------------------------ CLI
def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _default(action: argparse.Action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or isinstance(action, (argparse._StoreTrueAction,
                                                                   argparse._StoreFalseAction)):
        return ""
    if isinstance(d, (list, tuple)):
        if not d:
            return ""
        d = " ".join(str(v) for v in d)
    return f"`{d}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for a in parser._actions:
        if a.help is argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            name = ", ".join(a.option_strings)
            if a.nargs != 0:
                metavar = a.metavar if a.metavar is not None else (a.dest.upper() if not a.choices else
                                                                   "{" + ",".join(map(str, a.choices)) + "}")
                if isinstance(metavar, tuple):
                    metavar = " ".join(metavar)
                name += f" {metavar}" + (" ..." if a.nargs in ("+", "*") else "")
        else:
            name = a.metavar or a.dest
        help_text = (a.help or "") % {"default": a.default} if a.help and "%(" in a.help else (a.help or "")
        rows.append(f"| `{_cell(name)}` | {_default(a)} | {_cell(help_text)} |")
    if not rows:
        return []
    return ["| argument | default | meaning |", "|---|---|---|", *rows, ""]


def _command_section(prog: str, parser: argparse.ArgumentParser, depth: int) -> list[str]:
    lines = [f"{'#' * depth} `{prog}`", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    lines += ["```", parser.format_usage().strip(), "```", ""]
    lines += _options_table(parser)
    if parser.epilog:
        lines += ["```", parser.epilog.strip(), "```", ""]
    for name, sub in _subparsers(parser).items():
        lines += _command_section(f"{prog} {name}", sub, min(depth + 1, 4))
    return lines


def cli_page() -> str:
    from glam3d.cli import build_parser as glam3d_parser
    from preprocessing.cli import build_parser as preprocess_parser

    os.environ["COLUMNS"] = WIDTH
    lines = ["# Command-line reference", "",
             "Generated from the argparse parsers by `python docs/generate_reference.py`; a test fails when this "
             "page is stale. Every command prints the same with `--help`.", ""]
    for prog, parser in (("glam3d", glam3d_parser()), ("glam3d-preprocess", preprocess_parser())):
        lines += _command_section(prog, parser, 2)
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ config
def _field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the class source: the comment at the end of a field's line, else the comment
    lines just above it."""
    src = inspect.getsource(cls)
    comments: dict[str, str] = {}
    pending: list[str] = []
    line_of: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line_of.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    for i, line in enumerate(src.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(line_of.get(i, ""))
            continue
        name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
        if name.isidentifier() and not stripped.startswith(("def ", "class ", "@", "return")):
            text = line_of.get(i) if i in line_of and not stripped.startswith("#") else None
            comments[name] = text if text else " ".join(pending)
        pending = [] if stripped else pending
    return comments


def _type_name(tp) -> str:
    from glam3d.config import _type_name as config_type_name
    return config_type_name(tp)


def _default_value(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`\"{value}\"`" if value else '`""`'
    return f"`{value}`"


def _config_rows(cls, prefix: str, out: list, sections: list) -> None:
    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = _default_value(f)
        if dataclasses.is_dataclass(default):
            sections.append((key, type(default)))
            continue
        out.append(f"| `{key}` | {_cell(_type_name(tp))} | {_show(default)} | {_cell(notes.get(f.name, ''))} |")


def config_page() -> str:
    from glam3d import config as C

    lines = ["# Config reference", "",
             "Every key of a training config (YAML; `glam3d configs NAME` prints a shipped one), with its type, "
             "default and meaning. Generated from the dataclasses in `glam3d/config.py` by "
             "`python docs/generate_reference.py`; a test fails when this page is stale. A config may inherit "
             "another with `base: other.yaml`; `glam3d train CONFIG --override key=value` sets any key.", ""]
    data_variants = [(C.DataConfig, "`data` — 3D (a preprocessed dataset)"),
                     (C.Data2DConfig, "`data` — 2D (`data.dataset: ade20k | cityscapes | synthetic`)")]

    def section(prefix: str, cls, title: str) -> None:
        doc = inspect.getdoc(cls) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        rows: list[str] = []
        subsections: list = []
        _config_rows(cls, prefix, rows, subsections)
        lines.extend([f"## {title}", ""] + ([_cell(doc), ""] if doc else []))
        if rows:
            lines.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for key, sub in subsections:
            if key == "data":
                for variant, variant_title in data_variants:
                    section("data.", variant, variant_title)
            else:
                section(key + ".", sub, f"`{key}`")

    section("", C.Config, "Top level")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ main
def render() -> dict[str, str]:
    return {"cli": cli_page(), "config": config_page()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a page differs from what would be written")
    args = p.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = PAGES[name]
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{path}: stale; run python docs/generate_reference.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())

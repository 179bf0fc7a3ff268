"""YAML read with a bound on what the document expands to, before anything walks it.

A YAML alias (``*a``) refers to an anchored node (``&a``) without copying it, so a few hundred bytes can describe
a structure of 10⁹ entries ("billion laughs")::

    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    ...                                   # nine levels: 10⁹ x's

PyYAML builds it quickly with shared lists, and then any code that walks it (type checks, ``dataclasses.asdict``,
``json.dumps``) runs for hours. :func:`load_bounded` composes the node graph, measures the expanded size (nodes
reached through aliases counted every time, memoised per node, so the measurement is linear in the text) and
its depth, and refuses past :data:`MAX_NODES` / :data:`MAX_DEPTH`, or a node that contains itself, before one
Python object is built.

Usage::

    data = load_bounded(path.read_text(), source=path)       # UserError naming path if it is too big
    budget = NodeBudget()                                     # one budget shared by several documents
    a, b = load_bounded(t1, p1, budget), load_bounded(t2, p2, budget)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import UserError
from . import shared_refs

#: expanded nodes (scalars, lists, mappings, keys) a config may hold. A full training config is about 200; a list
#: of thousands of validation case ids stays far below; a billion-laughs document is far above.
MAX_NODES = 100_000
#: nesting depth (a config nests 4 levels: data.augment.rotate_deg[0])
MAX_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present (the same node graph)


@dataclass
class NodeBudget:
    """Expanded nodes left for the documents read against this budget (``base:`` chains share one), and how
    many documents have been read against it."""
    left: int = MAX_NODES
    documents: int = 0


def load_bounded(text: str, source=None, budget: NodeBudget | None = None) -> Any:
    """``yaml.safe_load(text)``, refused with a one-line :class:`UserError` naming ``source`` when the document
    expands to more than ``budget.left`` nodes (default :data:`MAX_NODES`), nests deeper than :data:`MAX_DEPTH`,
    or contains itself through an alias. Syntax errors propagate as ``yaml.YAMLError``."""
    budget = budget if budget is not None else NodeBudget()
    budget.documents += 1
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the pure-Python composer recurses per nesting level
            raise UserError(f"YAML nested deeper than {MAX_DEPTH} levels", source) from None
        if node is None:
            return None
        budget.left -= expanded_size(node, budget.left, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def expanded_size(root: yaml.Node, limit: int = MAX_NODES, source=None) -> int:
    """Number of nodes ``root`` stands for once every alias is replaced by a copy of its target (a mapping counts
    itself, its keys and its values). Raises :class:`UserError` naming ``source`` past ``limit`` nodes, past
    :data:`MAX_DEPTH` levels, or on a node that contains itself."""
    try:
        return shared_refs.expanded_size(root, _children, limit, MAX_DEPTH)
    except shared_refs.ExpansionRefused as e:
        raise UserError({
            "size": f"YAML aliases expand to more than {limit:,} values (an alias bomb?); a config needs a few "
                    f"hundred",
            "depth": f"YAML nested deeper than {MAX_DEPTH} levels",
            "cycle": "YAML alias refers to a node that contains it (a structure that never ends)",
        }[e.kind], source) from None


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []

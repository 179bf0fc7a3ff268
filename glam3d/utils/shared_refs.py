"""The size a structure with shared references stands for once every reference is copied out.

A pickle's memo and a YAML alias both let a node be referred to many times without being copied, so a few hundred
bytes can describe 10⁹ entries ("billion laughs"), or a structure that contains itself. Anything that later walks
the structure (type checks, ``json.dumps``, a report) runs for hours or forever. :func:`expanded_size` measures
it first: nodes reached through a shared reference are counted every time, memoised per node, so the measurement
is linear in the number of distinct nodes; iterative, so hostile nesting cannot exhaust the Python stack.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Set


class ExpansionRefused(ValueError):
    """Raised by :func:`expanded_size`; ``kind`` is ``"size"`` (past the limit), ``"depth"`` (nested past the
    maximum depth) or ``"cycle"`` (a node that contains itself)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def expanded_size(root: Any, children: Callable[[Any], Iterable[Any]], limit: int,
                  max_depth: Optional[int] = None) -> int:
    """Number of nodes ``root`` stands for, itself included, with ``children(node)`` the nodes it refers to (none
    for a leaf, which counts 1). Raises :class:`ExpansionRefused` as soon as a node stands for more than ``limit``
    nodes, nests more than ``max_depth`` levels, or reaches itself."""
    size: Dict[int, int] = {}
    depth: Dict[int, int] = {}
    open_: Set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = list(children(node))
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_.discard(key)
            if size[key] > limit:
                raise ExpansionRefused("size")
            if max_depth is not None and depth[key] > max_depth:
                raise ExpansionRefused("depth")
            continue
        if key in size:
            continue
        if key in open_:
            raise ExpansionRefused("cycle")
        open_.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in children(node) if id(kid) not in size)
    return size[id(root)]

"""The largest-connected-component postprocessing of a label map, one ``Z``-slab at a time.

:func:`apply_in_slabs` cleans an ``(X, Y, Z)`` label map in place exactly as
:func:`glam3d.postprocessing.apply_postprocessing` does — voxel for voxel, ties included (of two largest components
of equal size, the one whose first voxel comes first in C order is kept, as ``ndimage.label`` + ``argmax`` keep
it) — but never labels more than a few planes at once, so its memory does not grow with the scan. The whole-map
version labels each organ inside its bounding box (an ``int32`` label array and three boolean masks of the box);
one stray island far from the organ stretches that box over the scan, and on a long CT it costs gigabytes.

Two passes over the map per step (the foreground-as-one step, then the per-class step):

1. every ``Z``-slab is labelled per group (a class, or the foreground classes as one mask), full connectivity
   (26 neighbours); each piece gets a global id, its size and the C-order index of its first voxel; pieces that
   touch across a slab boundary (the last plane of a slab and the first of the next, the 9 neighbours of full
   connectivity) are joined, and the connected components of that graph
   (:func:`scipy.sparse.csgraph.connected_components`) are the components of the whole map: sizes summed, first
   voxel the earliest of their pieces;
2. the slabs are labelled again (the same labels: ``ndimage.label`` is deterministic) and every voxel of a group
   outside its largest component becomes background.

Memory: the labels of one slab (``int32``, :data:`SLAB_VOXELS` voxels) and 20 bytes per piece of a slab.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
from scipy import ndimage

__all__ = ["apply_in_slabs", "present_values", "SLAB_VOXELS"]

#: voxels labelled at once (a slab of whole planes, at least one): 4 M voxels, 16 MB of int32 labels
SLAB_VOXELS = 1 << 22
_STRUCTURE = ndimage.generate_binary_structure(3, 3)    # full connectivity, as apply_postprocessing
_SHIFTS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def present_values(a: np.ndarray) -> list:
    """The values in the integer array ``a``, sorted (a count of each value for 8- and 16-bit labels: no sort)."""
    a = np.asarray(a)
    if a.dtype.itemsize <= 2 and a.size and (a.dtype.kind == "u" or a.min() >= 0):
        return np.flatnonzero(np.bincount(a.ravel(order="K"))).tolist()
    return np.unique(a).tolist()


def _planes(shape, planes: Optional[int]) -> int:
    return max(1, int(planes) if planes else SLAB_VOXELS // max(1, shape[0] * shape[1]))


def apply_in_slabs(labels: np.ndarray, decision: Union[dict, str, None], *, planes: Optional[int] = None,
                   release: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Clean ``labels`` (an ``(X, Y, Z)`` integer array, e.g. a map in a mapped file) in place as ``decision``
    says (a decision dict, ``"all"`` or None: see :func:`glam3d.postprocessing.apply_postprocessing`), ``planes``
    ``Z``-planes at a time (default: :data:`SLAB_VOXELS` voxels). ``release()`` is called after every slab (e.g. to
    drop a mapping's pages from the process). Returns ``labels``."""
    from ..postprocessing import check_decision

    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an (X, Y, Z) integer array, got {labels.dtype} {labels.shape}")
    if decision is None:
        return labels
    step = _planes(labels.shape, planes)
    if isinstance(decision, str):
        if decision != "all":
            raise ValueError(f"decision must be a postprocessing dict, 'all' or None, got {decision!r}")
        _keep_largest(labels, _per_class(None), step, release)
        return labels
    check_decision(decision)
    fg = decision["foreground_largest_component"]
    if fg["apply"]:
        cls = fg.get("classes")
        _keep_largest(labels, _foreground(None if cls is None else [int(c) for c in cls]), step, release)
    if decision["classes_largest_component"]:
        _keep_largest(labels, _per_class([int(c) for c in decision["classes_largest_component"]]), step, release)
    return labels


def _per_class(classes):
    """Groups of a slab: each value present (of ``classes``; None: every value but 0) alone."""
    wanted = None if classes is None else set(classes)

    def groups(slab):
        return [v for v in present_values(slab) if v != 0 and (wanted is None or v in wanted)]
    return groups


def _foreground(classes):
    """One group: the voxels of ``classes`` (None: every value but 0) as one mask."""
    def groups(slab):
        return ["fg"]

    groups.mask = (lambda slab: slab > 0) if classes is None else (lambda slab: np.isin(slab, classes))
    return groups


def _mask(groups, key, slab):
    return groups.mask(slab) if key == "fg" else slab == key


def _keep_largest(labels: np.ndarray, groups, step: int, release) -> None:
    X, Y, Z = labels.shape
    sizes, firsts, owner = [], [], []        # per piece: voxels, C-order index of its first voxel, group key
    edges = []                               # pieces joined across slab boundaries (global ids)
    slabs = []                               # per slab: [(key, id offset, pieces)] in the order labelled
    last: dict = {}                          # group key -> global ids of the previous slab's last plane
    next_id = 1
    for z0 in range(0, Z, step):
        z1 = min(z0 + step, Z)
        slab = np.asarray(labels[:, :, z0:z1])
        done = []
        for key in groups(slab):
            lab, n = ndimage.label(_mask(groups, key, slab), structure=_STRUCTURE)
            if n == 0:
                continue
            flat = lab.ravel()                              # C order over (X, Y, dz)
            nz = np.flatnonzero(flat)
            ids = flat[nz]
            sizes.append(np.bincount(ids, minlength=n + 1)[1:])
            first = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(first, ids, nz)
            x, y, z = np.unravel_index(first[1:], lab.shape)
            firsts.append((x.astype(np.int64) * Y + y) * Z + (z0 + z))
            owner.append(np.full(n, _key_code(key), np.int64))
            prev = last.get(key)
            top = lab[:, :, 0]
            if prev is not None:
                edges.append(_joins(prev, np.where(top > 0, top + (next_id - 1), 0)))
            bottom = lab[:, :, -1]
            last[key] = np.where(bottom > 0, bottom.astype(np.int64) + (next_id - 1), 0)
            done.append((key, next_id - 1, n))
            next_id += n
            del lab, flat, nz, ids
        for key in [k for k in last if k not in {d[0] for d in done}]:
            last[key] = None                                 # no piece in this slab: nothing joins across it
        slabs.append(done)
        del slab
        if release is not None:
            release()
    if next_id == 1:
        return
    keep = _largest_per_group(next_id, np.concatenate(sizes), np.concatenate(firsts), np.concatenate(owner), edges)
    if keep is None:
        return
    for (z0, done) in zip(range(0, Z, step), slabs):
        z1 = min(z0 + step, Z)
        if not done or all(keep[off + 1:off + n + 1].all() for _, off, n in done):
            continue
        slab = labels[:, :, z0:z1]
        for key, off, n in done:
            if keep[off + 1:off + n + 1].all():
                continue
            lab, m = ndimage.label(_mask(groups, key, np.asarray(slab)), structure=_STRUCTURE)
            if m != n:
                raise AssertionError("internal error: a slab labelled differently on the second pass")
            lut = np.ones(n + 1, bool)
            lut[1:] = keep[off + 1:off + n + 1]
            slab[~lut[lab]] = 0
            del lab
        if release is not None:
            release()


def _key_code(key) -> int:
    """An integer for a group key (a label value, or -1 for the foreground as one)."""
    return -1 if key == "fg" else int(key)


def _joins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(k, 2)`` distinct id pairs of pieces of plane ``a`` (``(X, Y)``, global ids, 0: none) touching pieces of the
    next plane ``b`` through full connectivity (the voxel below and its 8 neighbours)."""
    X, Y = a.shape
    pairs = []
    for dx, dy in _SHIFTS:
        sa = a[max(0, -dx):X - max(0, dx), max(0, -dy):Y - max(0, dy)]
        sb = b[max(0, dx):X - max(0, -dx), max(0, dy):Y - max(0, -dy)]
        both = (sa > 0) & (sb > 0)
        if both.any():
            pairs.append(np.stack([sa[both], sb[both]], axis=1))
    if not pairs:
        return np.empty((0, 2), np.int64)
    return np.unique(np.concatenate(pairs).astype(np.int64), axis=0)


def _largest_per_group(n_ids: int, sizes, firsts, owner, edges) -> Optional[np.ndarray]:
    """``keep[id]``: the piece belongs to its group's largest component (ties: the earliest first voxel); None when
    no group has more than one component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    e = np.concatenate(edges) if edges else np.empty((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(e), np.int8), (e[:, 0] - 1, e[:, 1] - 1)), shape=(n_ids - 1, n_ids - 1))
    ncomp, comp = connected_components(graph, directed=False)
    comp_size = np.bincount(comp, weights=sizes, minlength=ncomp)
    comp_first = np.full(ncomp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(comp_first, comp, firsts)
    comp_owner = np.empty(ncomp, np.int64)
    comp_owner[comp] = owner
    keep_comp = np.zeros(ncomp, bool)
    several = False
    for g in np.unique(comp_owner):
        mine = np.flatnonzero(comp_owner == g)
        several |= len(mine) > 1
        big = mine[comp_size[mine] == comp_size[mine].max()]
        keep_comp[big[np.argmin(comp_first[big])]] = True
    if not several:
        return None
    keep = np.ones(n_ids, bool)
    keep[1:] = keep_comp[comp]
    return keep

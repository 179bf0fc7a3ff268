"""Preprocessed 3D datasets for training: manifest, validation split, cached cases, seeded patch draws.

A preprocessed dataset is ``ROOT/dataset.json`` + ``ROOT/cases/<id>.npz`` (see
``docs/reference/file-formats.md``). Only the manifest's ``training`` cases are ever read here; the validation
split is carved from them (seeded) and ``test`` cases are never touched.

Determinism: a training patch is a pure function of ``(seed, epoch, draw index)``. Epoch ``e`` draws
``iters_per_epoch * batch_size * world_size`` volumes in an order derived from ``(seed, e)`` (a concatenation
of seeded permutations of the training cases, so every case is seen equally often), and the random transforms
of draw ``g`` are seeded from ``(seed, e, g)``. Rank ``r`` of ``W`` takes, at step ``t``, the draws
``t*B*W + r*B + [0, B)``: the union over ranks of one step is exactly what one process with batch ``B*W`` would
draw. Nothing depends on the number of DataLoader workers, and an epoch can be replayed from any step.

Usage::

    manifest = read_manifest(root)
    split = make_split(case_ids(manifest), val_fraction=0.2, val_cases=None, seed=0)
    cache = CaseCache(case_entries(root, manifest, split["train"]))
    ds = PatchDataset(cache, train_transforms(cfg.data), seed=0, batch_size=2, iters_per_epoch=250)
    loader = DataLoader(ds, batch_size=2, sampler=EpochSampler(ds), collate_fn=collate_patches)
"""
from __future__ import annotations

import contextlib

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import UserError
from .transforms import cached_transforms


# ----------------------------------------------------------------------------------------------------------------
# manifest and split
# ----------------------------------------------------------------------------------------------------------------
def _type_name(v) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def inside_path(rel) -> bool:
    """``rel`` (a manifest entry's path) names a file inside the dataset folder: relative, no ``..`` escaping it
    (checked on the text: a folder the user linked in, e.g. ``cases`` on another disk, is theirs to choose)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return False
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or ":" in p.parts[0]:
        return False
    depth = 0
    for part in p.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return depth > 0


def _check_entries(manifest: dict, key: str, path: Path, need_label: bool) -> None:
    entries = manifest.get(key, [])
    if not isinstance(entries, list):
        raise UserError(f"field {key!r} must be a list of cases, got {_type_name(entries)}", path)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or (need_label and "label" not in entry):
            raise UserError(f"{key}[{i}] needs 'image'" + (" and 'label'" if need_label else ""), path)
        for fld in ("image", "label"):
            if fld in entry and not inside_path(entry[fld]):
                raise UserError(f"field '{key}[{i}].{fld}' is {entry[fld]!r}: a case file must be a relative path "
                                f"inside the dataset folder", path)
        if "id" in entry and not (isinstance(entry["id"], str) and entry["id"]):
            raise UserError(f"field '{key}[{i}].id' must be a non-empty string, got {entry['id']!r}", path)


def read_manifest(root) -> dict:
    """Load and check ``ROOT/dataset.json`` (UserError naming the file and the field on any problem): the types of
    ``labels``, ``modality``, ``training`` and ``test``, and that every case file it names lies inside ROOT."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("dataset folder not found (config key data.root)", root)
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError("no dataset.json in this folder: not a preprocessed dataset "
                        "(run glam3d-preprocess, then point data.root at its --out folder)", root)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON ({err.msg} at line {err.lineno})", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read ({type(err).__name__}: {err})", path) from None
    if not isinstance(manifest, dict):
        raise UserError("must be a JSON object", path)
    for key in ("labels", "training"):
        if key not in manifest:
            raise UserError(f"missing key {key!r}", path)
    if not isinstance(manifest["training"], list) or not manifest["training"]:
        raise UserError("'training' lists no cases", path)
    _check_entries(manifest, "training", path, need_label=True)
    _check_entries(manifest, "test", path, need_label=False)
    labels = manifest["labels"]
    if not isinstance(labels, dict):
        raise UserError(f"field 'labels' must be an object mapping class indices to names "
                        f"({{\"0\": \"background\", ...}}), got {_type_name(labels)}", path)
    try:
        idx = sorted(int(k) for k in labels)
    except (TypeError, ValueError):
        raise UserError("'labels' keys must be integer class indices", path) from None
    if idx != list(range(len(idx))) or len(idx) < 2:
        raise UserError(f"'labels' must be contiguous indices 0..K-1 with K >= 2, got {idx}", path)
    modality = manifest.get("modality")
    if modality is not None:
        if not isinstance(modality, dict) or not modality:
            raise UserError(f"field 'modality' must be an object {{\"0\": \"CT\", ...}}, got {_type_name(modality)}",
                            path)
        keys = [k for k in modality if not (isinstance(k, str) and k.strip().isdigit())]
        if keys or sorted(int(k) for k in modality) != list(range(len(modality))):
            raise UserError(f"field 'modality': keys must be the channel numbers \"0\"..\"{len(modality) - 1}\", "
                            f"got {sorted(modality)}", path)
    return manifest


def case_id(entry: dict) -> str:
    return str(entry.get("id") or Path(entry["image"]).name.split(".")[0])


def case_ids(manifest: dict) -> List[str]:
    return [case_id(e) for e in manifest["training"]]


def label_names(manifest: dict) -> List[str]:
    """Class names by index (``labels`` of dataset.json), background first."""
    labels = manifest["labels"]
    return [str(labels[str(i)] if str(i) in labels else labels[i]) for i in range(len(labels))]


def in_channels(manifest: dict) -> int:
    return max(1, len(manifest.get("modality") or {"0": ""}))


def make_split(ids: Sequence[str], val_fraction: float, val_cases: Optional[Sequence[str]], seed: int) -> dict:
    """Train/validation split of the *training* case ids: ``val_cases`` if given, else a seeded
    ``round(val_fraction * n)`` cases (at least 1 when ``val_fraction > 0``, always leaving one for training)."""
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise UserError("dataset.json: duplicate training case ids")
    if val_cases is not None:
        unknown = [c for c in val_cases if str(c) not in ids]
        if unknown:
            raise UserError(f"config key 'data.val_cases': {unknown[:3]} are not training cases of the dataset")
        val = [str(c) for c in val_cases]
    elif val_fraction > 0 and len(ids) > 1:
        n_val = min(len(ids) - 1, max(1, int(round(val_fraction * len(ids)))))
        order = np.random.default_rng([int(seed), 0x5B1]).permutation(sorted(ids))
        val = sorted(str(c) for c in order[:n_val])
    else:
        val = []
    train = [c for c in ids if c not in set(val)]
    if not train:
        raise UserError("the validation split leaves no training case (data.val_cases / data.val_fraction)")
    return {"seed": int(seed), "train": train, "val": val}


# ----------------------------------------------------------------------------------------------------------------
# cross-validation folds (nnU-Net's splits_final.json)
# ----------------------------------------------------------------------------------------------------------------
SPLITS_FILE = "splits_final.json"
#: nnU-Net v2's seed for its 5-fold split (``generate_crossval_split(..., seed=12345)``)
SPLITS_SEED = 12345


def crossval_splits(ids: Sequence[str], num_folds: int = 5, seed: int = SPLITS_SEED, source=None) -> List[dict]:
    """``num_folds`` folds over the training case ``ids``, as nnU-Net v2 makes ``splits_final.json``: the ids
    sorted, their indices shuffled by ``numpy.random.RandomState(seed)`` and cut into consecutive chunks (the first
    ``n % num_folds`` one case larger), i.e. scikit-learn's ``KFold(num_folds, shuffle=True, random_state=seed)``
    over the sorted ids. Fold ``k`` validates on chunk ``k`` and trains on the rest; both lists in sorted order.

    Returns ``[{"train": [...], "val": [...]}, ...]``. :class:`UserError` (naming ``source``, the dataset) when
    there are fewer cases than folds."""
    ids = sorted(str(i) for i in ids)
    if len(set(ids)) != len(ids):
        raise UserError("duplicate training case ids", source)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if len(ids) < num_folds:
        raise UserError(f"{num_folds}-fold cross-validation needs at least {num_folds} training cases, the dataset has "
                        f"{len(ids)} (data.num_folds)", source)
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, len(ids) // num_folds, dtype=int)
    sizes[: len(ids) % num_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [c for i, c in enumerate(ids) if i not in val],
                       "val": [c for i, c in enumerate(ids) if i in val]})
    return splits


def read_splits(path, ids: Sequence[str]) -> List[dict]:
    """The folds of a ``splits_final.json`` (nnU-Net's format: a list of ``{"train": [...], "val": [...]}``),
    checked against the dataset's training case ``ids``: every id it names is a training case, no case is in both
    lists of a fold. One-line :class:`UserError` naming the file otherwise."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON ({err.msg} at line {err.lineno})", path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read ({type(err).__name__}: {err})", path) from None
    if not isinstance(splits, list) or not splits:
        raise UserError(f"must be a list of folds [{{\"train\": [...], \"val\": [...]}}, ...] (nnU-Net's "
                        f"splits_final.json), got {_type_name(splits)}", path)
    known = set(str(i) for i in ids)
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) or \
                not isinstance(fold.get("val"), list):
            raise UserError(f"fold {k} must be an object with 'train' and 'val' lists of case ids", path)
        for key in ("train", "val"):
            bad = [c for c in fold[key] if not isinstance(c, str)]
            if bad:
                raise UserError(f"fold {k}: '{key}' holds {_type_name(bad[0])} ({bad[0]!r}), not a case id", path)
            unknown = [c for c in fold[key] if c not in known]
            if unknown:
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                raise UserError(f"fold {k}: '{key}' names case(s) {', '.join(unknown[:3])}{more} that are not "
                                f"training cases of the dataset", path)
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise UserError(f"fold {k}: case {both[0]} is in both 'train' and 'val'", path)
        if not fold["train"]:
            raise UserError(f"fold {k}: 'train' lists no case", path)
    return splits


def parse_fold(value) -> object:
    """A fold as given (``--fold``, ``data.fold``): an int ``>= 0`` or ``"all"``; :class:`UserError` otherwise."""
    text = str(value).strip()
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text)
    raise UserError(f"config key 'data.fold' (--fold) must be a fold number 0, 1, ... or 'all', got {value!r}")


def fold_split(splits: List[dict], fold, path=None) -> dict:
    """``{"train", "val"}`` of ``fold`` (an int, or ``"all"``: every case of the folds, no validation)."""
    if fold == "all":
        ids = sorted({c for f in splits for key in ("train", "val") for c in f[key]})
        return {"train": ids, "val": []}
    if not 0 <= fold < len(splits):
        raise UserError(f"--fold {fold}: the splits have folds 0..{len(splits) - 1}", path)
    return {"train": list(splits[fold]["train"]), "val": list(splits[fold]["val"])}


def case_entries(root, manifest: dict, ids: Sequence[str]) -> List[dict]:
    """``[{"id", "image": abs path, "label": abs path, "channels": C}]`` for the given training ids (files must
    exist inside ROOT; ``channels``: what ``modality`` declares, checked when a case is loaded)."""
    root = Path(root)
    by_id = {case_id(e): e for e in manifest["training"]}
    channels = in_channels(manifest)
    out = []
    for cid in ids:
        e = by_id[cid]
        for fld in ("image", "label"):
            if not inside_path(e.get(fld)):
                raise UserError(f"case {cid}: {fld} {e.get(fld)!r} is not a path inside the dataset folder",
                                root / "dataset.json")
        image, label = root / e["image"], root / e["label"]
        for p in {image, label}:
            if not p.is_file():
                raise UserError(f"case {cid}: file listed in dataset.json is missing", p)
        out.append({"id": cid, "image": str(image), "label": str(label), "channels": channels})
    return out


def case_shape(path, key: str = "image") -> Optional[tuple]:
    """The shape of array ``key`` in a case archive (``.npz``), read from its header only (no voxel is
    decompressed); None when the file holds no such array or cannot be read that way."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(fh)
        return tuple(int(s) for s in shape)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


# ----------------------------------------------------------------------------------------------------------------
# cases and patches
# ----------------------------------------------------------------------------------------------------------------
class CaseCache:
    """The loaded cases (image, label, foreground locations): a MONAI ``CacheDataset`` (``cache="memory"``, loaded
    once, shared copy-on-write with DataLoader workers) or a plain ``Dataset`` (``cache="none"``, read per draw)."""

    def __init__(self, entries: List[dict], cache: str = "memory", workers: int = 0,
                 with_label_locations: bool = True):
        from monai.data import CacheDataset, Dataset as MonaiDataset

        self.entries = list(entries)
        transform = cached_transforms(with_label_locations)
        with _user_errors():
            if cache == "memory":
                self.ds = CacheDataset(self.entries, transform=transform, cache_rate=1.0,
                                       num_workers=max(1, workers) if workers else None, copy_cache=False,
                                       progress=False)
            else:
                self.ds = MonaiDataset(self.entries, transform=transform)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        with _user_errors():
            return self.ds[i]


@contextlib.contextmanager
def _user_errors():
    """MONAI wraps an exception raised inside a transform in ``RuntimeError("applying transform ...")``; surface
    a :class:`UserError` (a bad case file) as itself, so the CLI prints its one line instead of a traceback."""
    try:
        yield
    except RuntimeError as err:
        cause, seen = err, set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, UserError):
                raise cause from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_cases: int, n_draws: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed), int(epoch), 0xC0FFEE])
    reps = math.ceil(n_draws / n_cases)
    return np.concatenate([rng.permutation(n_cases) for _ in range(reps)])[:n_draws]


class SeededDraws(Dataset):
    """Base of the seeded training datasets (3D patches, 2D images): an epoch is ``iters_per_epoch`` steps of
    ``batch_size`` draws per rank; step ``s`` takes global draws ``s*B*W .. (s+1)*B*W - 1`` and rank ``r`` the
    ``B`` of them from ``(s*W + r)*B`` — so W ranks see exactly what one process with ``B*W`` per step sees."""

    def __init__(self, *, seed: int, batch_size: int, iters_per_epoch: int, rank: int = 0, world_size: int = 1):
        self.seed, self.batch_size, self.iters = int(seed), int(batch_size), int(iters_per_epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.len_per_epoch = self.batch_size * self.iters

    def __len__(self) -> int:  # per epoch
        return self.len_per_epoch

    def draw_index(self, k: int) -> int:
        """Global draw index of this rank's ``k``-th item of an epoch."""
        step, j = divmod(k, self.batch_size)
        return step * self.batch_size * self.world_size + self.rank * self.batch_size + j


class PatchDataset(SeededDraws):
    """Seeded training patches. Index ``epoch * len_per_epoch + k`` (see :class:`EpochSampler`) -> dict with
    ``image`` float32 ``(num_samples, C, *roi)`` and ``label`` uint8 ``(num_samples, 1, *roi)``."""

    def __init__(self, cases: CaseCache, transform, *, seed: int, batch_size: int, iters_per_epoch: int,
                 num_samples: int = 1, rank: int = 0, world_size: int = 1):
        super().__init__(seed=seed, batch_size=batch_size, iters_per_epoch=iters_per_epoch, rank=rank,
                         world_size=world_size)
        self.cases, self.transform = cases, transform
        self.num_samples = int(num_samples)

    def __getitem__(self, index: int) -> dict:
        epoch, k = divmod(int(index), self.len_per_epoch)
        g = self.draw_index(k)
        order = _epoch_order(self.seed, epoch, len(self.cases), self.len_per_epoch * self.world_size)
        case = self.cases[int(order[g])]
        self.transform.set_random_state(seed=_seed(self.seed, epoch, g, 0xD7A))
        images, labels = [], []
        for _ in range(self.num_samples):
            out = self.transform(case)
            images.append(out["image"])
            labels.append(out["label"])
        return {"image": torch.stack(images), "label": torch.stack(labels)}


class EpochSampler(Sampler):
    """Yields ``epoch * len(ds) + k`` for ``k`` from ``start`` (resume inside an epoch) to ``len(ds)``."""

    def __init__(self, dataset: PatchDataset):
        self.n = len(dataset)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        base = self.epoch * self.n
        return iter(range(base + self.start, base + self.n))

    def __len__(self) -> int:
        return self.n - self.start


def collate_patches(items: List[dict]) -> dict:
    """Concatenate per-draw stacks: image ``(B * num_samples, C, *roi)``, label ``(B * num_samples, 1, *roi)``."""
    return {"image": torch.cat([it["image"] for it in items]), "label": torch.cat([it["label"] for it in items])}


def validation_volumes(entries: List[dict], cache: str = "memory", workers: int = 0) -> CaseCache:
    """Whole validation volumes (no foreground locations)."""
    return CaseCache(entries, cache=cache, workers=workers, with_label_locations=False)


def check_label_range(cases: CaseCache, num_classes: int, source=None) -> None:
    """UserError if a label value is outside ``0..num_classes-1`` (checked on cached cases only)."""
    for i in range(len(cases)):
        item = cases[i]
        mx = int(item["label"].max())
        if mx >= num_classes:
            raise UserError(f"case {item['id']}: label value {mx} but dataset.json lists only {num_classes} "
                            f"labels", source)


__all__ = ["read_manifest", "case_ids", "label_names", "in_channels", "make_split", "crossval_splits", "read_splits",
           "parse_fold", "fold_split", "SPLITS_FILE", "case_entries", "case_shape", "CaseCache",
           "PatchDataset", "EpochSampler", "collate_patches", "validation_volumes", "check_label_range"]

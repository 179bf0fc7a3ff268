"""Raw datasets in nnU-Net v2 and Medical Segmentation Decathlon (MSD v1) layouts, read from their dataset.json.

Both layouts are ``DATASET/dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (+ ``imagesTs/``). What glam3d reads from
dataset.json (every field checked for its type; a wrong one is one error line naming the file and the field):

=================  =========================================================================================
field              meaning
=================  =========================================================================================
``channel_names``  nnU-Net v2: ``{"0": "CT", "1": "T2", ...}``; a channel's name picks its normalisation
                   (:func:`preprocessing.pipeline.channel_scheme`). Its presence marks the v2 layout.
``modality``       MSD v1: the same mapping (used when there is no ``channel_names``).
``labels``         v2: name -> value (``{"background": 0, "liver": 1}``); MSD: value -> name
                   (``{"0": "background", "1": "liver"}``). Region-based labels (a list of values,
                   ``regions_class_order``) and nnU-Net's ``ignore`` label are refused.
``file_ending``    v2: the image format (``.nii.gz``, ``.mha``, ``.nrrd``, ... anything SimpleITK reads);
                   default ``.nii.gz``.
``numTraining``    the number of training cases; checked against the cases found.
``training``       MSD: ``[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]``.
``test``           MSD: ``["./imagesTs/y.nii.gz", ...]``.
``dataset``        v2 (optional): ``{"case": {"images": [...], "label": "..."}}``, files named explicitly.
=================  =========================================================================================

Case ids: from the lists where they exist (the label file's name for ``training``, the image's for ``test``, the
key for ``dataset``), else from the files. A v2 image is always ``<case>_XXXX<file_ending>`` (one file per
channel, grouped by the 4-digit suffix); an MSD image is ``<case>.nii.gz`` (a 4D file for several modalities) and
its name is never cut at trailing digits: without a list, the label files name the training cases. So
``amos_0001`` is one case both as ``amos_0001_0000.nii.gz`` (v2) and as ``amos_0001.nii.gz`` (MSD). A listed
image that does not exist as named but as channel files (``<name>_0000<ending>``, ...) is read as those.

A dataset.json whose lists name files that do not exist, or whose ``numTraining`` differs from the training cases
found, is inconsistent: refused up front, one line naming it and the first problem (preprocessing and inspect).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from glam3d.errors import UserError

from .imageio import IMAGE_ENDINGS, NIFTI_ENDINGS, strip_ending

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
SAFE_ID = re.compile(r"^[^/\\\x00]+$")


@dataclass
class Case:
    id: str
    images: list                  # one path, or one per channel (nnU-Net _0000, _0001, ...)
    label: Optional[Path]
    split: str                    # "training" | "test"
    error: Optional[str] = None   # a problem found while listing (missing label, not in split, ...)
    extra: dict = field(default_factory=dict)


@dataclass
class RawDataset:
    """A raw dataset's dataset.json, checked. ``labels``: value -> name (background 0 included); ``channels``:
    ``{"0": name, ...}`` from ``channel_field``."""

    root: Path
    path: Path
    meta: dict
    layout: str                   # "nnunet-v2" | "msd"
    channels: Dict[str, str]
    channel_field: str            # "channel_names" | "modality"
    labels: Dict[int, str]
    file_ending: str

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.root.name)


# ------------------------------------------------------------------------------------------------ dataset.json
def _type_name(v) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError("no dataset.json (an nnU-Net / MSD dataset folder has dataset.json, imagesTr/, labelsTr/)",
                        path.parent)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read ({type(exc).__name__}: {exc})", path) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON ({exc})", path) from None
    if not isinstance(meta, dict):
        raise UserError(f"must be a JSON object, got {_type_name(meta)}", path)
    return meta


def label_map(meta: dict, path) -> Dict[int, str]:
    """``{value: name}`` (sorted, background 0 included) from MSD (``{"0": "background"}``, value -> name) or nnU-Net
    v2 (``{"background": 0}``, name -> value) ``labels``; one-line UserError naming ``path`` for anything else."""
    if "labels" not in meta:
        raise UserError("has no 'labels' entry", path)
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"field 'labels' must be an object (MSD: value -> name, nnU-Net v2: name -> value), got "
                        f"{_type_name(labels) if labels != {} else 'an empty object'}", path)
    if "regions_class_order" in meta or any(isinstance(v, list) for v in labels.values()):
        region = next((k for k, v in labels.items() if isinstance(v, list)), "regions_class_order")
        raise UserError(f"field 'labels': {region!r} is a region (nnU-Net region-based training: a list of label "
                        f"values); glam3d trains one class per label value: give plain labels", path)
    out: Dict[int, str] = {}
    def whole(v):
        return (isinstance(v, int) or isinstance(v, float) and v.is_integer()) and not isinstance(v, bool)

    v2 = all(whole(v) for v in labels.values())
    for k, v in labels.items():
        if v2:
            value, name = int(v), str(k)
        else:
            if not isinstance(v, str) or isinstance(k, str) and not re.fullmatch(r"\s*-?\d+\s*", k):
                raise UserError(f"field 'labels' must map label values to names (MSD: {{\"1\": \"liver\"}}) or names "
                                f"to values (nnU-Net v2: {{\"liver\": 1}}); got {k!r}: {v!r}", path)
            value, name = int(k), v
        if value < 0:
            raise UserError(f"field 'labels': label {name!r} has the negative value {value}", path)
        if value in out:
            raise UserError(f"field 'labels': labels {out[value]!r} and {name!r} share the value {value}", path)
        if name.strip().lower() == "ignore" and value != 0:
            raise UserError("field 'labels': the 'ignore' label (nnU-Net's sparse annotation) is not supported; "
                            "glam3d trains on fully labelled maps", path)
        out[value] = name
    out.setdefault(0, "background")
    return dict(sorted(out.items()))


def _channels(meta: dict, path) -> tuple:
    fld = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
    if fld is None:
        raise UserError("has neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD): the input channels and "
                        "their normalisation are unknown (e.g. \"channel_names\": {\"0\": \"CT\"})", path)
    ch = meta[fld]
    if not isinstance(ch, dict) or not ch:
        raise UserError(f"field {fld!r} must be an object {{\"0\": \"CT\", ...}}, got "
                        f"{_type_name(ch) if ch != {} else 'an empty object'}", path)
    bad = [k for k in ch if not (isinstance(k, str) and re.fullmatch(r"\d+", k.strip()))]
    if bad:
        raise UserError(f"field {fld!r}: keys must be channel numbers \"0\", \"1\", ...; got {bad[0]!r}", path)
    nums = sorted(int(k) for k in ch)
    if nums != list(range(len(nums))):
        raise UserError(f"field {fld!r}: channels must be numbered 0..{len(nums) - 1}, got {nums}", path)
    names = {int(k): v for k, v in ch.items()}
    for n, v in names.items():
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"field {fld!r}: channel {n} must be named by a string (e.g. \"CT\"), got {v!r}", path)
    return fld, {str(n): names[n].strip() for n in sorted(names)}


def read_dataset_json(ds) -> RawDataset:
    """Read and check ``DS/dataset.json`` (types of every field glam3d uses; see the module doc)."""
    root = Path(ds)
    if not root.is_dir():
        raise UserError("is not a folder", root)
    path = root / "dataset.json"
    meta = load_json(path)
    labels = label_map(meta, path)
    fld, channels = _channels(meta, path)
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not re.fullmatch(r"\.[A-Za-z0-9._-]+", ending):
        raise UserError(f"field 'file_ending' must be a file ending such as \".nii.gz\" or \".mha\", got {ending!r}",
                        path)
    if "numTraining" in meta and (not isinstance(meta["numTraining"], int) or isinstance(meta["numTraining"], bool)
                                  or meta["numTraining"] < 0):
        raise UserError(f"field 'numTraining' must be a whole number, got {meta['numTraining']!r}", path)
    for key, kind in (("training", list), ("test", list), ("dataset", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise UserError(f"field {key!r} must be {_type_name(kind())}, got {_type_name(meta[key])}", path)
    for i, e in enumerate(meta.get("training") or []):
        if not (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)):
            raise UserError(f"field 'training[{i}]' must be {{\"image\": path, \"label\": path}}, got {e!r:.80}", path)
    for i, e in enumerate(meta.get("test") or []):
        if not (isinstance(e, str) or isinstance(e, dict) and isinstance(e.get("image"), str)):
            raise UserError(f"field 'test[{i}]' must be an image path (or {{\"image\": path}}), got {e!r:.80}", path)
    for k, e in (meta.get("dataset") or {}).items():
        if not (isinstance(e, dict) and isinstance(e.get("images"), list) and e["images"]
                and all(isinstance(p, str) for p in e["images"]) and isinstance(e.get("label"), str)):
            raise UserError(f"field 'dataset.{k}' must be {{\"images\": [paths], \"label\": path}}, got {e!r:.80}",
                            path)
    layout = "nnunet-v2" if fld == "channel_names" else "msd"
    return RawDataset(root, path, meta, layout, channels, fld, labels, ending)


# ------------------------------------------------------------------------------------------------ files
def list_images(folder: Path, endings) -> List[Path]:
    """Image files of ``folder`` with one of ``endings``, sorted; hidden files (``._x.nii.gz`` of macOS archives)
    skipped. Links are listed even when they lead nowhere (a broken link or a loop is then reported by name)."""
    if not folder.is_dir():
        return []
    lows = tuple(e.lower() for e in endings)
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.name.lower().endswith(lows) and (p.is_file() or p.is_symlink()))


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def _ending_of(name: str) -> str:
    stem = strip_ending(name)
    if stem != name:
        return name[len(stem):]
    return "".join(Path(name).suffixes[-1:])


def _channel_group(path: Path) -> List[Path]:
    """``<name>_XXXX<ending>`` files beside ``path`` (``<name><ending>``), sorted by channel."""
    ending = _ending_of(path.name)
    stem = path.name[: len(path.name) - len(ending)]
    if not path.parent.is_dir():
        return []
    pat = re.compile(re.escape(stem) + r"_(\d{4})" + re.escape(ending) + "$")
    return sorted((p for p in path.parent.iterdir() if pat.match(p.name)), key=lambda p: p.name)


def _channel_error(paths: List[Path], n: int, fld: str) -> Optional[str]:
    matches = [CHANNEL_SUFFIX.match(strip_ending(p.name, (_ending_of(p.name),))) for p in paths]
    if not all(matches):
        odd = next(p for p, m in zip(paths, matches) if not m)
        return f"{odd}: mixed with channel files ({paths[0].name}, ...) of the same case"
    chans = [int(m.group("channel")) for m in matches]
    if chans != list(range(n)):
        shown = ", ".join(f"{c:04d}" for c in chans)
        return (f"{paths[0]}: channel files {shown} found; dataset.json {fld!r} declares {n} channel(s), "
                f"numbered 0000..{n - 1:04d}")
    return None


# ------------------------------------------------------------------------------------------------ discovery
class _Problems:
    """Inconsistencies of dataset.json with the files: collected, then raised as one line."""

    def __init__(self, path: Path):
        self.path, self.items = path, []

    def add(self, msg: str):
        self.items.append(msg)

    def raise_any(self):
        if self.items:
            more = f" (and {len(self.items) - 1} more problem(s) of this kind)" if len(self.items) > 1 else ""
            raise UserError(f"{self.items[0]}{more}", self.path)


def _resolve(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def _listed_images(ds: RawDataset, where: str, rel: str, problems: _Problems) -> List[Path]:
    """The image file(s) a list entry names: the file itself, else its channel files; a problem when neither."""
    p = _resolve(ds.root, rel)
    if _exists(p):
        return [p]
    group = _channel_group(p)
    if group:
        return group
    problems.add(f"field {where!r} names {rel}, which does not exist (nor as channel files "
                 f"{strip_ending(p.name, (_ending_of(p.name),))}_0000{_ending_of(p.name)}, ...)")
    return []


def _check_id(cid: str, where: str, problems: _Problems) -> bool:
    if not SAFE_ID.match(cid) or cid in (".", ".."):
        problems.add(f"field {where!r}: {cid!r} cannot be a case id (it becomes a file name)")
        return False
    return True


def _unlisted(ds: RawDataset, sub: str, cases: List[Case], key: str, warnings: list) -> None:
    """A warning for image files in ``sub`` that the dataset.json list ``key`` does not name (they are not read)."""
    listed = {p.resolve() for c in cases for p in c.images if _exists(p)}
    extra = [p for p in list_images(ds.root / sub, IMAGE_ENDINGS) if p.resolve() not in listed]
    if extra:
        warnings.append(f"{ds.root / sub}: {len(extra)} image file(s) not in dataset.json's {key!r} list (e.g. "
                        f"{extra[0].name}); ignored")


def _training_cases(ds: RawDataset, problems: _Problems, warnings: list) -> List[Case]:
    cases = _listed_training(ds, problems)
    if cases is None:
        return _scan_training(ds, warnings)
    _unlisted(ds, "imagesTr", cases, "dataset" if "dataset" in ds.meta else "training", warnings)
    return cases


def _listed_training(ds: RawDataset, problems: _Problems) -> Optional[List[Case]]:
    """The training cases dataset.json lists (``dataset``, else ``training``); None without a list."""
    n, fld = ds.num_channels, ds.channel_field
    cases: List[Case] = []
    if "dataset" in ds.meta:
        for cid, e in ds.meta["dataset"].items():
            if not _check_id(cid, f"dataset.{cid}", problems):
                continue
            images = [_resolve(ds.root, p) for p in e["images"]]
            label = _resolve(ds.root, e["label"])
            for p, where in [(p, f"dataset.{cid}.images") for p in images] + [(label, f"dataset.{cid}.label")]:
                if not _exists(p):
                    problems.add(f"field {where!r} names {p}, which does not exist")
            err = None if len(images) == n else (f"{images[0]}: {len(images)} image file(s) but dataset.json "
                                                 f"{fld!r} declares {n} channel(s)")
            cases.append(Case(cid, images, label, "training", err))
        return cases
    if "training" in ds.meta:
        for i, e in enumerate(ds.meta["training"]):
            where = f"training[{i}]"
            label = _resolve(ds.root, e["label"])
            cid = strip_ending(label.name, (_ending_of(label.name),))
            if not _check_id(cid, where, problems):
                continue
            if not _exists(label):
                problems.add(f"field '{where}.label' names {e['label']}, which does not exist")
            images = _listed_images(ds, f"{where}.image", e["image"], problems)
            err = _channel_error(images, n, fld) if len(images) > 1 else None
            cases.append(Case(cid, images, label, "training", err))
        return cases
    return None


def _endings(ds: RawDataset) -> tuple:
    """The file endings of images when folders are listed: ``file_ending`` (v2, or an MSD dataset.json that has
    one), else NIfTI."""
    return (ds.file_ending,) if ds.layout == "nnunet-v2" or "file_ending" in ds.meta else NIFTI_ENDINGS


def _scan_training(ds: RawDataset, warnings: list) -> List[Case]:
    """No list: v2 groups imagesTr by the channel suffix; MSD takes the case ids from labelsTr."""
    n, fld = ds.num_channels, ds.channel_field
    endings = _endings(ds)
    labels = {strip_ending(p.name, endings): p for p in list_images(ds.root / "labelsTr", endings)}
    groups: Dict[str, list] = {}
    lone: List[Case] = []
    for p in list_images(ds.root / "imagesTr", endings):
        stem = strip_ending(p.name, endings)
        m = CHANNEL_SUFFIX.match(stem)
        if ds.layout == "nnunet-v2":
            if not m:
                lone.append(Case(stem, [p], None, "training",
                                 f"{p}: not named <case>_XXXX{ds.file_ending} (nnU-Net v2 names each channel file "
                                 f"with its 4-digit channel number)"))
                continue
            groups.setdefault(m.group("case"), []).append(p)
        elif stem in labels:
            groups.setdefault(stem, []).append(p)
        elif m and m.group("case") in labels:
            groups.setdefault(m.group("case"), []).append(p)
        else:
            groups.setdefault(stem, []).append(p)
    cases = []
    for cid, files in sorted(groups.items()):
        files.sort(key=lambda p: p.name)
        lab = labels.pop(cid, None)
        split_files = ds.layout == "nnunet-v2" or len(files) > 1 or files[0].name != f"{cid}{_ending_of(files[0].name)}"
        err = _channel_error(files, n, fld) if split_files else None
        if lab is None and err is None:
            want = ds.root / "labelsTr" / f"{cid}{ds.file_ending if ds.layout == 'nnunet-v2' else '.nii.gz'}"
            err = f"{files[0]}: no label file (expected {want})"
        cases.append(Case(cid, files, lab, "training", err))
    for _, p in sorted(labels.items()):
        warnings.append(f"{p}: label without an image; ignored")
    return sorted(cases + lone, key=lambda c: c.id)


def _test_cases(ds: RawDataset, problems: _Problems, warnings: list) -> List[Case]:
    n, fld = ds.num_channels, ds.channel_field
    cases = []
    if "test" in ds.meta:
        for i, e in enumerate(ds.meta["test"]):
            rel = e if isinstance(e, str) else e["image"]
            p = _resolve(ds.root, rel)
            cid = strip_ending(p.name, (_ending_of(p.name),))
            if not _check_id(cid, f"test[{i}]", problems):
                continue
            images = _listed_images(ds, f"test[{i}]", rel, problems)
            err = _channel_error(images, n, fld) if len(images) > 1 else None
            cases.append(Case(cid, images, None, "test", err))
        _unlisted(ds, "imagesTs", cases, "test", warnings)
        return cases
    endings = _endings(ds)
    groups: Dict[str, list] = {}
    for p in list_images(ds.root / "imagesTs", endings):
        stem = strip_ending(p.name, endings)
        m = CHANNEL_SUFFIX.match(stem)
        if ds.layout == "nnunet-v2":
            if not m:
                cases.append(Case(stem, [p], None, "test", f"{p}: not named <case>_XXXX{ds.file_ending} (nnU-Net "
                                                           f"v2 names each channel file with its 4-digit number)"))
                continue
            groups.setdefault(m.group("case"), []).append(p)
        else:
            groups.setdefault(stem, []).append(p)    # MSD: one file per case, its name is the id
    for cid, files in sorted(groups.items()):
        files.sort(key=lambda p: p.name)
        err = _channel_error(files, n, fld) if ds.layout == "nnunet-v2" else None
        cases.append(Case(cid, files, None, "test", err))
    return sorted(cases, key=lambda c: c.id)


def discover(ds_folder):
    """``(RawDataset, cases, warnings)`` of an nnU-Net v2 / MSD folder (see the module doc). Inconsistencies of
    dataset.json with the files raise one UserError; problems of single cases (a missing label without a list,
    misnumbered channel files) are the cases' ``error`` and leave the others alone."""
    ds = read_dataset_json(ds_folder)
    problems = _Problems(ds.path)
    warnings: list = []
    training = _training_cases(ds, problems, warnings)
    test = _test_cases(ds, problems, warnings)
    for split, cs in (("training", training), ("test", test)):
        seen: Dict[str, Case] = {}
        for c in cs:
            if c.id in seen:
                problems.add(f"two {split} cases have the id {c.id!r} ({c.images[0] if c.images else '?'} and "
                             f"{seen[c.id].images[0] if seen[c.id].images else '?'})")
            seen[c.id] = c
    clash = sorted({c.id for c in training} & {c.id for c in test})
    if clash:
        problems.add(f"case id {clash[0]!r} is both a training and a test case")
    if "numTraining" in ds.meta and ds.meta["numTraining"] != len(training):
        listed = "training" in ds.meta or "dataset" in ds.meta
        source = "its training cases" if listed else "imagesTr/"
        v2_none = ds.layout == "nnunet-v2" and not listed and not training
        hint = f" named <case>_XXXX{ds.file_ending} (check 'file_ending')" if v2_none else ""
        problems.add(f"field 'numTraining' is {ds.meta['numTraining']} but {source} hold(s) {len(training)} "
                     f"case(s){hint}")
    problems.raise_any()
    for c in training + test:
        c.extra.update(channels=ds.num_channels, channel_field=ds.channel_field)
    if not training and not test:
        raise UserError(f"no images found in imagesTr/ or imagesTs/ (file ending {ds.file_ending})", ds.root)
    return ds, training + test, warnings


__all__ = ["Case", "RawDataset", "discover", "label_map", "list_images", "read_dataset_json", "IMAGE_ENDINGS"]

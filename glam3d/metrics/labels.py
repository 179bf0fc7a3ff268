"""Label sets for evaluation: which organs to score, with which values, and which values are legal in the files.

A :class:`LabelSet` comes from one of

``"synapse"``
    the 8 Synapse organs with their raw BTCV values; the declared set is BTCV's 0..13 (Synapse scores 8 of them).
a raw nnU-Net v2 ``dataset.json``
    ``"labels": {"background": 0, "liver": 1, …}`` (name → value). Region-based datasets (values that are lists,
    ``regions_class_order``) are refused. A class named ``ignore`` is nnU-Net's ignore label: declared, never scored,
    and its truth voxels are left out of every metric.
a raw MSD v1 ``dataset.json``
    ``"labels": {"0": "background", "1": "liver", …}`` (value → name).
a preprocessed glam3d ``dataset.json`` (or the labels recorded in ``predictions.json``)
    value → name over *training indices*, with ``plan.label_values`` mapping each index back to the original value
    in the label files; organs are scored in those original values, as ``glam3d predict`` writes them.
a JSON mapping file
    a bare object in either direction, ``{"liver": 1, "spleen": 2}`` or ``{"1": "liver", "2": "spleen"}``; the
    direction is told by the types (integer values: name → value; integer-string keys with string values:
    value → name). Value 0 is background.

``declared`` is the dataset's full label set where it is known (used to check the files' values); ``None`` when
the source lists only the classes a model was trained on (a preprocessed dataset or a manifest, where Synapse keeps
8 of BTCV's 13 organs): then the truth's values are not checked, and a prediction may hold only the scored values.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError

# Synapse evaluation: the 8 organs in the order papers print them, with their raw BTCV label ids
SYNAPSE_ORGANS = [("aorta", 8), ("gallbladder", 4), ("left kidney", 3), ("right kidney", 2), ("liver", 6),
                  ("pancreas", 11), ("spleen", 1), ("stomach", 7)]
# BTCV's 13 organs (raw values): the set Synapse label files hold
BTCV_NAMES = {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
              7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas",
              12: "right adrenal gland", 13: "left adrenal gland"}

LABELS_HELP = ("give --labels synapse, a dataset.json (raw nnU-Net v2 / MSD, or preprocessed by glam3d) or a JSON "
               "mapping file ({\"liver\": 1, …} or {\"1\": \"liver\", …})")


@dataclass
class LabelSet:
    """``organs``: ``[(name, value in the files)]`` in report order; ``declared``: every value the dataset declares
    (background included) or ``None`` when unknown; ``ignore``: nnU-Net's ignore value or ``None``."""

    organs: list
    source: str
    declared: Optional[frozenset] = None
    ignore: Optional[int] = None
    notes: list = field(default_factory=list)

    @property
    def names(self) -> list:
        return [n for n, _ in self.organs]

    def allowed_in_prediction(self) -> frozenset:
        """Values a prediction may hold: the declared set, else background and the scored values."""
        if self.declared is not None:
            return self.declared
        return frozenset({0, *(v for _, v in self.organs)} | ({self.ignore} if self.ignore is not None else set()))


def _name_key(name: str) -> str:
    """'kidney_left', 'Left Kidney', 'left-kidney' → 'kidney left' (word order and separators ignored)."""
    words = re.split(r"[\s_\-()]+", str(name).lower())
    words = [{"l": "left", "r": "right"}.get(w, w) for w in words if w]
    return " ".join(sorted(words))


def _synapse_first(organs: list) -> list:
    """Synapse organs first, in the Synapse column order; the others after, in value order."""
    order = {_name_key(n): i for i, (n, _) in enumerate(SYNAPSE_ORGANS)}
    syn = sorted([o for o in organs if _name_key(o[0]) in order], key=lambda o: order[_name_key(o[0])])
    return syn + [o for o in organs if _name_key(o[0]) not in order]


def _int(x) -> Optional[int]:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, str) and re.fullmatch(r"\s*\d+\s*", x):
        return int(x)
    return None


def _is_btcv_subset(organs: list) -> bool:
    """Every organ is a BTCV organ at its BTCV value (a Synapse / BTCV label set from a preprocessed dataset)."""
    return bool(organs) and all(_name_key(BTCV_NAMES.get(v, "")) == _name_key(n) for n, v in organs)


def _check_unique(organs: list, where) -> list:
    seen = {}
    for n, v in organs:
        if v in seen:
            raise UserError(f"labels {seen[v]!r} and {n!r} share the value {v}", where)
        if v < 0 or v > 65535:
            raise UserError(f"label {n!r} has value {v}, outside 0..65535", where)
        seen[v] = n
    return organs


def labels_from_dataset(labels: dict, plan: Optional[dict] = None) -> list[tuple[str, int]]:
    """``(name, label value in the files)`` for every foreground class of a value → name ``labels`` mapping
    (``{"0": "background", "1": "spleen", …}``), with ``plan["label_values"]`` mapping training indices back to
    the original label values. Classes that are Synapse organs come first in the Synapse column order."""
    values = {}
    if plan and plan.get("label_values"):
        values = {int(k): int(v) for k, v in plan["label_values"].items()}
    out = []
    for k, name in sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0]):
        if k == 0:
            continue
        out.append((str(name), values.get(k, k)))
    return _synapse_first(out)


def _from_mapping(mapping: dict, where, plan: Optional[dict] = None) -> tuple[list, frozenset, Optional[int], str]:
    """``(organs, declared values, ignore value, "name->value" | "value->name")`` of a labels mapping."""
    if not mapping:
        raise UserError("the labels mapping is empty", where)
    vals = list(mapping.values())
    if any(isinstance(v, (list, tuple, dict)) for v in vals):
        raise UserError("region-based labels (classes made of several values) are not supported: evaluate scores "
                        "one label value per class", where)
    if all(_int(v) is not None and not isinstance(v, str) for v in vals):  # nnU-Net v2: name -> value
        pairs = [(str(n), int(v)) for n, v in mapping.items()]
        ignore = next((v for n, v in pairs if n.strip().lower() == "ignore"), None)
        organs = [(n, v) for n, v in sorted(pairs, key=lambda p: p[1]) if v != 0 and v != ignore]
        return _synapse_first(_check_unique(organs, where)), frozenset({0, *(v for _, v in pairs)}), ignore, \
            "name->value"
    if all(_int(k) is not None for k in mapping) and all(isinstance(v, str) for v in vals):  # MSD v1: value -> name
        lv = {int(k): int(v) for k, v in ((plan or {}).get("label_values") or {}).items()}
        pairs = [(str(n), lv.get(int(k), int(k))) for k, n in mapping.items()]
        organs = [(n, v) for n, v in sorted(pairs, key=lambda p: p[1]) if v != 0]
        return _synapse_first(_check_unique(organs, where)), frozenset({0, *(v for _, v in pairs)}), None, \
            "value->name"
    raise UserError("cannot tell the direction of the labels mapping: expected name -> integer value "
                    "({\"liver\": 1}) or integer value -> name ({\"1\": \"liver\"})", where)


def _raw_declared(preprocessed: dict, path: Path) -> Optional[frozenset]:
    """The declared label set of the raw dataset a preprocessed one was made from, when it can be read."""
    src = preprocessed.get("source")
    if isinstance(src, str):
        raw = Path(src) / "dataset.json"
        try:
            data = json.loads(raw.read_text())
            if isinstance(data, dict) and isinstance(data.get("labels"), dict):
                return _from_mapping(data["labels"], raw)[1]
        except (OSError, ValueError, UserError):
            pass
    return None


def label_set_from_json(data, path, source: Optional[str] = None) -> LabelSet:
    """A :class:`LabelSet` from parsed JSON: a dataset.json (raw or preprocessed) or a bare mapping."""
    source = source or str(path)
    if not isinstance(data, dict):
        raise UserError("expected a JSON object (a dataset.json or a labels mapping)", path)
    if "regions_class_order" in data:
        raise UserError("region-based labels (regions_class_order) are not supported: evaluate scores one label "
                        "value per class", path)
    if "labels" in data:
        if not isinstance(data["labels"], dict):
            raise UserError("'labels' must be a mapping (name -> value or value -> name)", path)
        plan = data.get("plan") if isinstance(data.get("plan"), dict) else None
        organs, declared, ignore, _ = _from_mapping(data["labels"], path, plan)
        if plan is not None and plan.get("label_values"):  # preprocessed: labels list the trained classes only
            declared = _raw_declared(data, Path(path))
            if declared is None and _is_btcv_subset(organs):
                declared = frozenset(range(14))
        if not organs:
            raise UserError("the dataset lists no foreground labels", path)
        return LabelSet(organs, source, declared, ignore)
    organs, declared, ignore, _ = _from_mapping(data, path)
    if not organs:
        raise UserError("the labels mapping lists no foreground label", path)
    return LabelSet(organs, source, declared, ignore)


def load_label_set(spec) -> LabelSet:
    """``"synapse"``, a path to a dataset.json / mapping file (or a folder holding dataset.json), a dict with
    ``labels`` (+ ``plan``), or a list of ``(name, value)``."""
    if isinstance(spec, LabelSet):
        return spec
    if isinstance(spec, (list, tuple)):
        organs = [(str(n), int(v)) for n, v in spec]
        return LabelSet(organs, "list", None)
    if isinstance(spec, dict):
        return label_set_from_json(spec if "labels" in spec else {"labels": spec}, "labels", "mapping")
    if str(spec).lower() == "synapse":
        return LabelSet(list(SYNAPSE_ORGANS), "synapse", frozenset(range(14)))
    path = Path(spec)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise UserError(f"--labels: not 'synapse' and no such file; {LABELS_HELP}", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read labels ({err})", path) from None
    return label_set_from_json(data, path, str(path))


def resolve_labels(spec) -> list[tuple[str, int]]:
    """The scored organs ``[(name, value)]`` of :func:`load_label_set`'s ``spec``."""
    return list(load_label_set(spec).organs)

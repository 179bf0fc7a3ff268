"""Per-organ tolerances (mm) of the normalised surface Dice (NSD).

Default: the organ-specific tolerances of the FLARE22 challenge's evaluation (``FLARE22_DSC_NSD_Eval.py`` of
JunMa11/FLARE), chosen there per organ from the variability of expert contours: liver, pancreas and stomach 5 mm,
kidneys, spleen and esophagus 3 mm, aorta, inferior vena cava, adrenal glands and gallbladder 2 mm, duodenum 7 mm.
Any other structure gets :data:`DEFAULT_TOLERANCE_MM` (2 mm, the smallest FLARE22 tolerance). Organs are matched by
name with separators and word order ignored (``kidney_left`` = ``Left Kidney``).

``--nsd-tolerance 2`` sets every organ; ``--nsd-tolerance liver=3 spleen=1.5`` overrides those organs (the others
keep the default); both forms mix (``--nsd-tolerance 1 liver=4``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ..errors import UserError
from .labels import _name_key

DEFAULT_TOLERANCE_MM = 2.0
FLARE22_TOLERANCE_MM = {
    "liver": 5.0, "right kidney": 3.0, "left kidney": 3.0, "spleen": 3.0, "pancreas": 5.0, "aorta": 2.0,
    "inferior vena cava": 2.0, "right adrenal gland": 2.0, "left adrenal gland": 2.0, "gallbladder": 2.0,
    "esophagus": 3.0, "stomach": 5.0, "duodenum": 7.0,
}
_ALIASES = {"ivc": "inferior vena cava", "postcava": "inferior vena cava", "rk": "right kidney",
            "lk": "left kidney", "rag": "right adrenal gland", "lag": "left adrenal gland",
            "oesophagus": "esophagus", "gall bladder": "gallbladder"}
_TABLE = {_name_key(k): v for k, v in FLARE22_TOLERANCE_MM.items()}
_TABLE.update({_name_key(a): FLARE22_TOLERANCE_MM[k] for a, k in _ALIASES.items()})


def default_tolerance(name: str) -> float:
    """The FLARE22 tolerance of a known abdominal organ, else :data:`DEFAULT_TOLERANCE_MM`."""
    return _TABLE.get(_name_key(name), DEFAULT_TOLERANCE_MM)


def _value(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"--nsd-tolerance: {what} is not a number of mm ({text!r})") from None
    if not math.isfinite(v) or v < 0:
        raise UserError(f"--nsd-tolerance: {what} must be a finite number of mm >= 0, got {text!r}")
    return v


def resolve_tolerances(names: Sequence[str], spec: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``{organ name: tolerance in mm}`` for the scored ``names``: the defaults, then a bare number in ``spec`` for
    every organ, then its ``organ=mm`` entries (wherever they stand). An organ that is not scored is an error
    listing the scored ones."""
    spec = [str(s) for s in (spec or [])]
    tol = {n: default_tolerance(n) for n in names}
    bare = [s for s in spec if "=" not in s]
    if len(bare) > 1:
        raise UserError(f"--nsd-tolerance: one tolerance for every organ, got {len(bare)} ({' '.join(bare)})")
    if bare:
        v = _value(bare[0], "the tolerance")
        tol = {n: v for n in names}
    by_key = {_name_key(n): n for n in names}
    for item in spec:
        if "=" not in item:
            continue
        organ, val = item.rsplit("=", 1)
        name = by_key.get(_name_key(organ))
        if name is None:
            raise UserError(f"--nsd-tolerance: {organ!r} is not one of the scored organs ({', '.join(names)})")
        tol[name] = _value(val, organ)
    return tol

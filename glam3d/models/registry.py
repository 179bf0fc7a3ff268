"""Registry of named network variants.

A variant is ``"<family>_<size>"`` (e.g. ``glam_nnformer_tiny``) or just ``<family>`` with ``size=`` given.
Each family registers one builder ``fn(**kwargs) -> nn.Module`` and a table of sizes (plain dicts of kwargs);
``build_model(name, **overrides)`` merges the size's config with the overrides and calls the builder.

Every built model exposes ``spatial_dims``, ``in_channels``, ``num_classes`` and ``default_crop`` (the input
size its config is made for), and records ``model.glam3d_spec = {"name": ..., "kwargs": {...}}`` so a checkpoint
can rebuild it.

A *model spec* is a variant name with options: ``"NAME[:key=value]..."`` (values in YAML, e.g.
``"glam_nnformer_synapse:global_num_heads=[3,6,12,24]"``); :func:`parse_model_spec` splits it,
:func:`build_model_spec` builds it, :func:`check_model_spec` validates it without allocating weights.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Callable, Dict

import torch.nn as nn


@dataclass
class Family:
    name: str
    builder: Callable[..., nn.Module]
    sizes: Dict[str, dict] = field(default_factory=dict)
    default_size: str | None = None
    twin: str | None = None  # the vanilla family this one adds GLAM to (for overhead tables)
    description: str = ""


_FAMILIES: Dict[str, Family] = {}


def register_family(name: str, builder: Callable[..., nn.Module], sizes: Dict[str, dict], *,
                    default_size: str | None = None, twin: str | None = None, description: str = "") -> None:
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} registered twice")
    _FAMILIES[name] = Family(name, builder, dict(sizes), default_size, twin, description)


def _ensure_loaded() -> None:
    # importing the network modules registers their families
    from . import networks  # noqa: F401


def families() -> Dict[str, Family]:
    _ensure_loaded()
    return dict(_FAMILIES)


def list_models() -> list[str]:
    """All full variant names, e.g. ``['glam_nnformer_synapse', 'glam_nnformer_tiny', ...]``."""
    return sorted(f"{f.name}_{s}" for f in families().values() for s in f.sizes)


def resolve(name: str, size: str | None = None) -> tuple[Family, str]:
    """Split a variant name into (family, size); raise ValueError naming close matches."""
    fams = families()
    if size is None:
        for fam in sorted(fams, key=len, reverse=True):
            if name.startswith(fam + "_") and name[len(fam) + 1:] in fams[fam].sizes:
                return fams[fam], name[len(fam) + 1:]
        if name in fams and fams[name].default_size:
            return fams[name], fams[name].default_size
    elif name in fams and size in fams[name].sizes:
        return fams[name], size
    close = difflib.get_close_matches(name, list_models() + list(fams), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{' size ' + repr(size) if size else ''}{hint}; "
                     f"known: {', '.join(list_models())}")


def model_config(name: str, size: str | None = None, **overrides) -> tuple[Family, str, dict]:
    fam, size = resolve(name, size)
    cfg = copy.deepcopy(fam.sizes[size])
    cfg.update(overrides)
    return fam, size, cfg


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"NAME[:key=value]..."`` -> ``(NAME, {key: value})`` (values parsed as YAML: numbers, booleans, lists).

    >>> parse_model_spec("glam_nnformer_synapse:global_num_heads=[3,6,12,24]:nlu=false")
    ('glam_nnformer_synapse', {'global_num_heads': [3, 6, 12, 24], 'nlu': False})
    """
    import yaml
    name, *items = spec.split(":")
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"model {spec!r}: option {item!r} is not key=value")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"model {spec!r}: option {item!r} has an unreadable value") from None
    return name.strip(), overrides


def build_model_spec(spec: str) -> nn.Module:
    """Build ``"NAME[:key=value]..."`` (see :func:`parse_model_spec`)."""
    name, overrides = parse_model_spec(spec)
    return build_model(name, **overrides)


def check_model_spec(spec: str) -> str:
    """Raise ValueError naming the spec when it does not build (unknown name, option or value); weights are
    made on the meta device, so this is cheap for any size. Returns the spec."""
    import torch
    try:
        with torch.device("meta"):
            build_model_spec(spec)
    except (TypeError, ValueError) as err:
        msg = str(err)
        raise ValueError(msg if spec in msg else f"model {spec!r}: {msg}") from None
    return spec


def build_model(name: str, size: str | None = None, **overrides) -> nn.Module:
    """Build a registered variant: ``build_model("glam_nnformer_tiny", num_classes=9)``."""
    fam, size, cfg = model_config(name, size, **overrides)
    model = fam.builder(**cfg)
    model.glam3d_spec = {"name": f"{fam.name}_{size}", "kwargs": copy.deepcopy(overrides)}
    return model

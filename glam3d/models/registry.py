"""Registry of named network variants.

A variant is ``"<family>_<size>"`` (e.g. ``glam_nnformer_tiny``) or just ``<family>`` with ``size=`` given.
Each family registers one builder ``fn(**kwargs) -> nn.Module`` and a table of sizes (plain dicts of kwargs);
``build_model(name, **overrides)`` merges the size's config with the overrides and calls the builder.

Every built model exposes ``spatial_dims``, ``in_channels``, ``num_classes`` and ``default_crop`` (the input
size its config is made for), and records ``model.glam3d_spec = {"name", "version", "kwargs"}`` so a checkpoint
can rebuild it (:func:`build_from_spec`): ``kwargs`` holds *every* argument of the network's constructor with the
value it was built with (defaults, size table and overrides resolved; tuples as lists), so a later change of a
default never changes the network a saved spec rebuilds. A network class records its arguments with
:func:`records_arguments`. A spec without ``version`` predates this (its ``kwargs`` are only the overrides given at
build time): it is rebuilt with the defaults of that time (:data:`LEGACY_OPTIONS`).

A *model spec* is a variant name with options: ``"NAME[:key=value]..."`` (values in YAML, e.g.
``"glam_nnformer_synapse:global_num_heads=[3,6,12,24]"``); :func:`parse_model_spec` splits it,
:func:`build_model_spec` builds it, :func:`check_model_spec` validates it without allocating weights.
"""
from __future__ import annotations

import copy
import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

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
    """Build a registered variant: ``build_model("glam_nnformer_tiny", num_classes=9)``. The model's
    ``glam3d_spec`` records every constructor argument it was built with (module docstring)."""
    fam, size, cfg = model_config(name, size, **overrides)
    model = fam.builder(**cfg)
    model.glam3d_spec = _spec_of(f"{fam.name}_{size}", model, cfg)
    return model


# ---------------------------------------------------------------------------------------------------------------
# recorded specs: what a checkpoint rebuilds
# ---------------------------------------------------------------------------------------------------------------
#: layout of ``glam3d_spec`` / a checkpoint's ``model_spec``: 2 = ``kwargs`` holds every constructor argument with
#: its resolved value; a spec without ``version`` (read as 1) holds only the overrides given at build time
SPEC_VERSION = 2

#: options a spec without ``version`` was built with by default where today's defaults differ, per family (the
#: families that existed then): G-MSA as a full transformer layer (``glam_variant="paper"``), NLU as attention
#: alone, no position on the global tokens and, in 3D, no global tokens in levels whose map is one window.
#: A recorded override wins over these.
LEGACY_OPTIONS: Dict[str, Dict[str, Any]] = {
    "glam_nnformer": {"glam_variant": "paper", "nlu_form": "attention", "glam_single_window": False,
                      "global_pos_embed": False},
    # the vanilla 2D families take GLAM options and NLU as overrides (paper table 4's "NLU only" row)
    "swin_unet": {"glam_variant": "paper", "nlu_form": "attention", "global_pos_embed": False},
    "glam_swin_unet": {"glam_variant": "paper", "nlu_form": "attention", "global_pos_embed": False},
    "swin_upernet": {"glam_variant": "paper", "global_pos_embed": False},
    "glam_swin_upernet": {"glam_variant": "paper", "global_pos_embed": False},
}
#: families whose GLAM levels, before spec version 2, also built a G-MSA after the level's last block: its output
#: was read by nothing (the global tokens end with the level), so its weights in such a checkpoint are dropped
LEGACY_TRAILING_GMSA = ("swin_unet", "glam_swin_unet", "swin_upernet", "glam_swin_upernet")


def records_arguments(cls: type) -> type:
    """Class decorator for a registered network: each instance keeps the arguments its ``__init__`` received,
    defaults filled in, as ``glam3d_arguments`` (a dict), which :func:`build_model` records in the spec."""
    init = cls.__init__
    signature = inspect.signature(init)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise TypeError(f"{cls.__name__}.__init__ takes *args/**kwargs: its arguments cannot be recorded")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.glam3d_arguments = {k: v for k, v in list(bound.arguments.items())[1:]}

    cls.__init__ = __init__
    return cls


def plain(value):
    """``value`` as plain data (tuples become lists, recursively): what a spec stores, equal after a YAML/JSON
    round trip."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _spec_of(name: str, model: nn.Module, cfg: dict) -> dict:
    """The spec of ``model`` built by its family's builder from ``cfg``: the constructor's recorded arguments when
    the builder passed ``cfg`` through to them unchanged (so the builder can take them back), else ``cfg``."""
    args = getattr(model, "glam3d_arguments", None)
    kwargs = cfg
    if isinstance(args, dict) and all(k in args and plain(args[k]) == plain(v) for k, v in cfg.items()):
        kwargs = _resolve_automatic(model, args)
    return {"name": name, "version": SPEC_VERSION, "kwargs": plain(copy.deepcopy(kwargs))}


def _resolve_automatic(model: nn.Module, args: dict) -> dict:
    """``args`` with ``global_pos_embed=None`` ("on wherever the table can be sized", which every registered
    network can) replaced by what the network built: True when one of its GLAM levels has a position table."""
    if "global_pos_embed" not in args or args["global_pos_embed"] is not None:
        return args
    from .glam import GLAMLayer

    built = any(isinstance(m, GLAMLayer) and m.global_pos_embed is not None for m in model.modules())
    return {**args, "global_pos_embed": built}


def spec_version(spec: dict) -> int:
    """The layout version of a recorded spec (1 when it has none); ValueError when it is not one this glam3d
    reads."""
    version = spec.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"model spec version {version!r} is not a version number")
    if version > SPEC_VERSION:
        raise ValueError(f"model spec version {version} is newer than this glam3d reads (up to {SPEC_VERSION}): "
                         f"a newer glam3d wrote it")
    return version


def legacy_options(spec: dict) -> Dict[str, Any]:
    """The options :func:`build_from_spec` adds to a spec without ``version`` (:data:`LEGACY_OPTIONS` of its
    family, less those the spec records); ``{}`` for a versioned spec, a family the default changes did not touch,
    or a spec whose name is not a registered variant (the build then says why)."""
    if not isinstance(spec, dict) or spec_version(spec) >= 2 or not isinstance(spec.get("name"), str):
        return {}
    try:
        fam, _ = resolve(spec["name"])
    except ValueError:
        return {}
    kwargs = spec.get("kwargs") or {}
    return {k: v for k, v in LEGACY_OPTIONS.get(fam.name, {}).items() if k not in kwargs}


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild the network a recorded spec (``glam3d_spec``, a checkpoint's ``model_spec``) names.

    Version 2: the family's builder gets exactly the recorded arguments (no size table, no default of today).
    No version: ``build_model(name, **legacy_options(spec), **kwargs)``. The rebuilt model records a version-2
    spec. Raises ValueError/TypeError when the spec does not build (unknown name, bad option or version)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("the model spec names no network (name)")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError("the model spec's kwargs is not a mapping")
    if spec_version(spec) < 2:
        return build_model(spec["name"], **legacy_options(spec), **copy.deepcopy(kwargs))
    fam, size = resolve(spec["name"])
    kwargs = copy.deepcopy(kwargs)
    model = fam.builder(**kwargs)
    model.glam3d_spec = _spec_of(f"{fam.name}_{size}", model, kwargs)
    return model

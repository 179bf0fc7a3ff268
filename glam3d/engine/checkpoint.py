"""Checkpoints: plain dicts of tensors and builtins, written atomically, loaded with ``weights_only=True``.

Layout (``format = "glam3d-checkpoint-v1"``)::

    {"format", "model_spec": {"name", "kwargs"}, "model": state_dict, "optimizer", "scheduler", "scaler",
     "epoch", "iteration", "rng", "config", "plan", "labels", "metrics"}

Only ``format``, ``model_spec`` and ``model`` are required; the engine fills the rest.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils.io import atomic_torch_save

FORMAT = "glam3d-checkpoint-v1"


def save_checkpoint(path, state: dict, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically. ``keep_previous`` first renames an existing file to ``<path>.prev``
    (so a later corruption of ``path`` can fall back to it)."""
    path = Path(path)
    state = dict(state)
    state.setdefault("format", FORMAT)
    if keep_previous and path.exists():
        path.replace(path.with_name(path.name + ".prev"))
    atomic_torch_save(state, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a glam3d checkpoint safely. Raises :class:`UserError` (one line naming the file) when the file is
    missing, truncated/corrupt, carries pickled code (refused, never run), or is not a glam3d checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path)
    if path.stat().st_size == 0:
        raise UserError("checkpoint is empty (0 bytes)", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported object"
        raise UserError(f"refused to load checkpoint: it contains objects other than tensors and plain data "
                        f"(weights_only load failed: {first[:200]})", path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint is truncated or corrupt ({first[:200]})", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"not a glam3d checkpoint (expected format {FORMAT!r})", path)
    return state


def model_from_checkpoint(state: dict, path=None, strict: bool = True):
    """Rebuild the network recorded in ``state['model_spec']`` and load its weights (architecture mismatches
    raise :class:`UserError` naming the checkpoint)."""
    from ..models.registry import build_model

    spec = state.get("model_spec") or {}
    try:
        model = build_model(spec["name"], **dict(spec.get("kwargs", {})))
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"cannot rebuild the network recorded in the checkpoint ({err})", path) from None
    load_model_weights(model, state["model"], path=path, strict=strict)
    return model


def load_model_weights(model: torch.nn.Module, weights: dict, path=None, strict: bool = True) -> None:
    """``load_state_dict`` with a one-line :class:`UserError` on architecture mismatch."""
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: checkpoint "
                         f"{tuple(weights[wrong[0]].shape)} vs model {tuple(own[wrong[0]].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        name = getattr(model, "glam3d_spec", {}).get("name", type(model).__name__)
        raise UserError(f"checkpoint weights do not fit the network {name}: " + "; ".join(parts), path)
    model.load_state_dict(weights, strict=strict)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as plain data/tensors."""
    np_state = np.random.get_state()
    state = {
        "python": _tuplify(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    if isinstance(x, (list, tuple)):
        return tuple(_tuplify(v) for v in x)
    return x

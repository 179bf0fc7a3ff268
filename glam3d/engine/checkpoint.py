"""Checkpoints: plain dicts of tensors and builtins, written atomically, loaded with ``weights_only=True``.

Layout (``format = "glam3d-checkpoint-v1"``)::

    {"format", "model_spec": {"name", "version", "kwargs"}, "model": state_dict, "optimizer", "scheduler", "scaler",
     "epoch", "iteration", "rng", "config", "plan", "labels", "metrics"}

Only ``format``, ``model_spec`` and ``model`` are required; the engine fills the rest. ``model_spec`` is the
network's ``glam3d_spec`` (:mod:`glam3d.models.registry`): version 2 records every constructor argument, so a
later change of a default never changes what a checkpoint rebuilds; a spec without version is rebuilt with the
defaults of its time (:func:`model_from_checkpoint`).

A checkpoint never holds NaN/inf weights: :func:`save_checkpoint` refuses a state whose ``model`` or
``optimizer`` tensors are not all finite (nothing written, the previous file untouched), and
:func:`load_model_weights` — which :func:`model_from_checkpoint` (predict, evaluate, show) and the trainer's
resume / ``init_checkpoint`` go through — refuses such weights from a file written elsewhere.
:func:`model_from_checkpoint` also sizes the recorded network on the meta device before building it
(:func:`glam3d.engine.preflight.check_checkpoint_network`).
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils.io import atomic_torch_save
from ..utils.shared_refs import ExpansionRefused, expanded_size

FORMAT = "glam3d-checkpoint-v1"


def save_checkpoint(path, state: dict, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically. ``keep_previous`` first renames an existing file to ``<path>.prev``
    (so a later corruption of ``path`` can fall back to it).

    Refused with :class:`NonFiniteCheckpoint` (naming ``path``; nothing written, ``path`` and ``<path>.prev`` as
    they were) when a tensor of ``state['model']`` or ``state['optimizer']`` holds NaN/inf. A full disk raises a
    one-line :class:`UserError` naming ``path`` (:func:`glam3d.utils.io.atomic_torch_save`)."""
    path = Path(path)
    state = dict(state)
    state.setdefault("format", FORMAT)
    bad = [f"{entry}.{name}" for entry in ("model", "optimizer") for name in find_non_finite(state.get(entry))]
    if bad:
        raise NonFiniteCheckpoint(f"refused to write a checkpoint with NaN/inf values ({_tensors(len(bad))}, e.g. "
                                  f"{bad[0]}): the training diverged; the file on disk was left as it was", path)
    if keep_previous and path.is_file():
        _keep_copy(path, path.with_name(path.name + ".prev"))
    atomic_torch_save(state, path)


class NonFiniteCheckpoint(UserError):
    """Weights (or optimiser state) with NaN/inf: never written, never loaded into a network."""


def find_non_finite(tree, prefix: str = "") -> list:
    """Dotted names (``"stages.0.norm.weight"``, ``"state.3.exp_avg"``) of the floating-point and complex tensors
    in ``tree`` (nested dicts / lists / tuples, e.g. a ``state_dict`` or an optimiser's state) that hold a NaN
    or an infinity; ``[]`` when all are finite. One device synchronisation per device, whatever the number of
    tensors; meta tensors (no values) are skipped."""
    import torch

    by_device: dict = {}
    for name, t in _float_tensors(tree, prefix):
        if t.device.type != "meta" and t.layout == torch.strided and t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    bad = []
    for items in by_device.values():
        # one pass per tensor: a sum is NaN/inf when an element is (NaN and inf propagate); a sum of finite values
        # that overflows is caught by the exact test below, so only the tensors whose sum is not finite pay for it
        sums = torch.stack([torch.isfinite(t.sum(dtype=_SUM_DTYPE.get(t.dtype))) for _, t in items])
        if bool(sums.all()):
            continue
        bad += [name for (name, t), ok in zip(items, sums.tolist()) if not ok and not bool(torch.isfinite(t).all())]
    return bad


_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # (no overflow at 65504 / 3e38)


def _float_tensors(tree, prefix: str = ""):
    """``(dotted name, tensor)`` for every floating-point / complex tensor in ``tree``; each container visited once
    (a loaded pickle may share or nest them)."""
    seen = set()
    stack = [(prefix, tree)]
    while stack:
        name, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                yield name, node
        elif isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                continue
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in reversed(list(items)))


def check_finite_weights(weights: dict, path=None) -> None:
    """Refuse (:class:`NonFiniteCheckpoint`, one line naming ``path``) network weights that hold NaN/inf: a
    network loaded with them predicts garbage (all background) without any error."""
    bad = find_non_finite(weights)
    if bad:
        raise NonFiniteCheckpoint(f"the checkpoint's weights hold NaN/inf ({_tensors(len(bad))}, e.g. {bad[0]}): "
                                  f"it comes from a diverged training run; refused", path)


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _keep_copy(path: Path, prev: Path) -> None:
    """Make ``prev`` a copy of ``path`` atomically while ``path`` stays in place (a kill at any moment leaves a
    loadable ``path``): hard link (or copy) to a temporary name, then rename onto ``prev``."""
    import shutil

    from ..utils.io import atomic_path

    with atomic_path(prev, suffix="") as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(path, tmp)


#: entries only training reads (weights, and the optimiser / scheduler / scaler / RNG states of a resume)
TRAINING_STATE = ("model", "optimizer", "scheduler", "scaler", "rng")


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a glam3d checkpoint safely. Raises :class:`UserError` (one line naming the file) when the file is
    missing, truncated/corrupt, carries pickled code (refused, never run), or is not a glam3d checkpoint.

    ``mmap=True`` (inference): the tensors are mapped from the file instead of read into memory, so entries
    nobody touches (the optimiser's momentum, as large as the weights) never occupy RAM, and the weights' pages
    go away with the last reference to them (see :func:`checkpoint_metadata`). Files in torch's legacy
    (non-zip) format are read normally."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path)
    if path.stat().st_size == 0:
        raise UserError("checkpoint is empty (0 bytes)", path)
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap" in str(err)):
                raise
            state = torch.load(path, map_location=map_location, weights_only=True)  # legacy format: no mmap
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for foreign/corrupt files
        cls = UnsafeCheckpoint if _is_code(err) else UserError
        raise cls(describe_load_error(err), path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"not a glam3d checkpoint (expected format {FORMAT!r})", path)
    _check_expanded_size(state, path)
    return state


#: values (containers, scalars and tensors, each counted once per reference) a checkpoint may hold; a Synapse-size
#: training checkpoint (weights, AdamW state, RNG states, config) holds a few thousand
MAX_CHECKPOINT_VALUES = 1_000_000


def _containers(node) -> list:
    """What a checkpoint's list / tuple / dict refers to (a dict: its keys and values); nothing for anything else."""
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    return list(node) if isinstance(node, (list, tuple)) else []


def _check_expanded_size(state, path) -> None:
    """Refuse a checkpoint whose lists / dicts, once shared references are followed, stand for more than
    :data:`MAX_CHECKPOINT_VALUES` values, or contain themselves: a pickle's memo lets a few hundred bytes describe
    10⁹ entries, which JSON manifests and reports would then write out forever. Linear in the file's objects."""
    try:
        expanded_size(state, _containers, MAX_CHECKPOINT_VALUES)
    except ExpansionRefused as e:
        raise UserError("refused: the checkpoint's data contains itself (a structure that never ends)"
                        if e.kind == "cycle" else
                        f"refused: the checkpoint's data expands to more than {MAX_CHECKPOINT_VALUES:,} values "
                        f"through shared references (a pickle bomb?)", path) from None


def checkpoint_metadata(state: dict) -> dict:
    """``state`` without :data:`TRAINING_STATE`: what inference, reports and manifests read once the network is
    built. Keep this instead of ``state`` so the loaded weights and optimiser state can be freed (a Synapse-size
    checkpoint: 0.6 GB of weights + 0.6 GB of SGD momentum)."""
    return {k: v for k, v in state.items() if k not in TRAINING_STATE}


class UnsafeCheckpoint(UserError):
    """The file's pickle asks to import/call code: refused (never run); not a mere corruption."""


def _is_code(err: BaseException) -> bool:
    return isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err)


def describe_load_error(err: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``: code in the pickle (refused, never run) vs a file
    that is not a checkpoint or is truncated. Never repeats torch's advice to retry with ``weights_only=False``."""
    text = str(err)
    if _is_code(err):
        m = re.search(r"unsupported GLOBAL (\S+)", text)
        what = m.group(1) if m else "a Python object"
        return (f"refused to load: the file asks to import and call {what}, code that glam3d never runs "
                f"(a checkpoint holds only tensors and plain data; nothing was executed)")
    m = re.search(r"(Unsupported operand \S+|invalid load key[^\n]*|[^\n]*truncat[^\n]*|[^\n]*zip archive[^\n]*)",
                  text)
    detail = m.group(1).strip() if m else (text.strip().splitlines()[0] if text.strip() else "")
    if "Weights only load failed" in detail or "weights_only" in detail:
        detail = ""
    return f"not a checkpoint, or truncated/corrupt ({type(err).__name__}{': ' + detail[:160] if detail else ''})"


def model_from_checkpoint(state: dict, path=None, strict: bool = True, assign: bool = False, device=None):
    """Rebuild the network recorded in ``state['model_spec']`` and load its weights (architecture mismatches
    raise :class:`UserError` naming the checkpoint).

    Before anything is built: weights with NaN/inf are refused (:func:`check_finite_weights`), and the recorded
    network is sized on the meta device — a spec whose weights alone exceed the CPU's memory (where it is built)
    or ``device``'s (where it will run, when given) is refused with one line giving both numbers.

    The network is rebuilt by :func:`glam3d.models.registry.build_from_spec`: a version-2 spec from exactly its
    recorded arguments; a spec without version (written before every argument was recorded) with the defaults
    of that time (:data:`~glam3d.models.registry.LEGACY_OPTIONS`), the weights of the G-MSA its 2D networks ran
    after each GLAM level's last block (output read by nothing) dropped, and one note on stderr saying so.

    ``assign`` (inference from a mapped checkpoint, :func:`load_checkpoint` ``mmap=True``): the network's
    parameters *become* the checkpoint's tensors (``load_state_dict(assign=True)``) instead of being copied
    into, so the weights exist once — as pages of the mapped file — instead of twice while the network is
    built (0.6 GB for a Synapse-size nnFormer). The mapping is private: nothing is ever written to the file."""
    from ..models.registry import build_from_spec, legacy_options, spec_version
    from .preflight import check_checkpoint_network

    spec = state.get("model_spec") or {}
    try:
        legacy = isinstance(spec, dict) and spec_version(spec) < 2
        assumed = legacy_options(spec)
    except ValueError as err:  # a version this glam3d does not read
        raise UserError(f"cannot rebuild the network recorded in the checkpoint ({err})", path) from None
    sized = dict(spec, kwargs={**assumed, **(spec.get("kwargs") or {})}) if assumed else spec
    check_checkpoint_network(sized, path, device)  # sized on the meta device before it is built for real
    check_finite_weights(state["model"], path)
    try:
        model = build_from_spec(spec)
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"cannot rebuild the network recorded in the checkpoint ({err})", path) from None
    weights, dropped = state["model"], []
    if legacy and _legacy_trailing_gmsa(spec):
        dropped = legacy_dead_weights(model, weights)
        gone = set(dropped)
        weights = {k: v for k, v in weights.items() if k not in gone}
    try:
        load_model_weights(model, weights, path=path, strict=strict, assign=assign, checked=True)
    except NonFiniteCheckpoint:
        raise
    except UserError as err:
        if not assumed:
            raise
        raise UserError(f"{err}; its model_spec has no version, so it was rebuilt with the defaults of glam3d "
                        f"before model spec version 2 ({_options(assumed)})") from None
    if legacy and _uses_glam_or_nlu(model):
        _legacy_note(spec, assumed, dropped, path)
    return model


def legacy_dead_weights(model: torch.nn.Module, weights: dict) -> list:
    """Names in ``weights`` (a checkpoint's ``model``, possibly ``module.``-prefixed) of the G-MSA that 2D networks
    ran after each GLAM level's last block before model spec version 2: ``<level>.gmsa.<n>.*`` where ``n`` is the
    number of G-MSA the rebuilt level has. Its output was read by nothing (the global tokens end with the level),
    so the network computes the same without it."""
    from ..models.glam import GLAMLayer

    prefixes = tuple(f"{name}.gmsa.{len(layer.gmsa) if layer.gmsa is not None else 0}."
                     for name, layer in model.named_modules()
                     if isinstance(layer, GLAMLayer) and layer.num_global_tokens)
    if not prefixes:
        return []
    own = model.state_dict()
    return [k for k in weights if (k[len("module."):] if k.startswith("module.") else k).startswith(prefixes)
            and k not in own]


def _legacy_trailing_gmsa(spec: dict) -> bool:
    from ..models.registry import LEGACY_TRAILING_GMSA, resolve

    try:
        return resolve(spec["name"])[0].name in LEGACY_TRAILING_GMSA
    except (KeyError, TypeError, ValueError):
        return False


def _uses_glam_or_nlu(model: torch.nn.Module) -> bool:
    """Whether ``model`` has global tokens or NLU: the parts whose defaults changed with model spec version 2."""
    from ..models.glam import GLAMLayer
    from ..models.nlu import NLU

    return any((isinstance(m, GLAMLayer) and m.num_global_tokens) or isinstance(m, NLU) for m in model.modules())


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no option changed since"


def _legacy_note(spec: dict, assumed: dict, dropped: list, path) -> None:
    """One line on stderr: the checkpoint predates model spec version 2, the options assumed, what was dropped."""
    import sys

    where = f"{path}: " if path is not None else ""
    note = (f"note: {where}the checkpoint predates model spec version 2; {spec.get('name')} rebuilt with the "
            f"defaults it was trained with ({_options(assumed)})")
    if dropped:
        note += (f"; {_tensors(len(dropped))} of the G-MSA after each GLAM level's last block dropped (its output "
                 f"was read by nothing)")
    if (spec.get("kwargs") or {}).get("global_pos_embed"):
        note += ("; global_pos_embed=True: that glam3d added the position into the global tokens, today it enters "
                 "G-MSA's attention input only, so the outputs differ from the trained network's")
    print(note, file=sys.stderr)


def load_model_weights(model: torch.nn.Module, weights: dict, path=None, strict: bool = True,
                       assign: bool = False, checked: bool = False) -> None:
    """``load_state_dict`` with a one-line :class:`UserError` on architecture mismatch (``assign``: see
    :func:`model_from_checkpoint`; a tensor whose dtype differs from the network's is copied as usual), and
    :class:`NonFiniteCheckpoint` for weights holding NaN/inf (``checked``: the caller already checked them)."""
    if not checked:
        check_finite_weights(weights, path)
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
    if assign:  # keep the network's dtypes (assign would take the checkpoint's)
        weights = {k: (v if k not in own or v.dtype == own[k].dtype else v.to(own[k].dtype))
                   for k, v in weights.items()}
    model.load_state_dict(weights, strict=strict, assign=assign)


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

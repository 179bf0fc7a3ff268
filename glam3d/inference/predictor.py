"""The :class:`Predictor`: trained glam3d checkpoints applied to new scans, from Python or from ``glam3d predict``.

A checkpoint carries the preprocessing plan and the label values, so a user gives only the scans. Each scan is
preprocessed exactly like the training data (``preprocessing.pipeline.preprocess_scan``; lazily: rows are
normalised and resampled as the sliding window reads them), segmented by slab-streaming sliding windows
(:func:`glam3d.inference.sliding_window.predict_volume`) and mapped back to the input's grid and label values
(``restored_label_slabs``: Z-slab by Z-slab).

Several checkpoints (``Predictor.from_checkpoints``; ``glam3d predict --checkpoint A B …``) are an ensemble: every
window goes through each network and their softmax is averaged before the windows are blended (nnU-Net's
ensembling of folds), so the blending buffers, the spill and the memory are those of one network. They must share
the preprocessing plan and the labels (else one error line naming the checkpoint that differs); the window
settings are the first checkpoint's (or the caller's), checked against every network.

* :meth:`Predictor.predict`: one scan (an image file, a case's channel files, a DICOM series folder, or a nibabel
  image) to a nibabel image of labels in the scan's own geometry (and the class probabilities on request), voxel
  for voxel what ``glam3d predict`` writes for it.
* :meth:`Predictor.predict_files`: what ``glam3d predict`` runs: many scans to ``<case><ending>`` files (the input's
  format, or ``format``), streamed to disk, postprocessed on request (``largest_component``), with provenance per
  case in ``predictions.json`` (:mod:`glam3d.inference.manifest`: the checkpoints' sha256 and the options that
  shape the output), resume (a case is skipped only when the same checkpoints and options made its output), an
  ownership marker (:mod:`glam3d.utils.ownership`: glam3d replaces only files it wrote), a scratch folder for the
  temporary files of a scan, and one shard of the cases per rank under ``torchrun`` (``WORLD_SIZE > 1``: rank r
  takes cases r, r + world, … on GPU ``LOCAL_RANK``).

Example::

    from glam3d import Predictor

    predictor = Predictor.from_checkpoint("runs/synapse/checkpoints/best.pt", device="cuda", mirror=True)
    labels = predictor.predict("scan.nii.gz")                       # nib.Nifti1Image, the scan's geometry
    labels, probs = predictor.predict(nib.load("scan.nii.gz"), probabilities=True)   # probs: (X, Y, Z, K)
    predictor.predict_files(["RawData/Testing/img"], "preds/")      # preds/<case>.nii.gz + predictions.json

    folds = Predictor.from_checkpoints([f"runs/fold_{k}/checkpoints/best.pt" for k in range(5)],
                                       largest_component="runs/cv_report/postprocessing.json")
    folds.predict_files(["nnUNet_raw/Dataset017_BTCV/imagesTs"], "preds_test/")
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import sys
import time
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import UserError
from ..utils.ooc import ScratchArray
from . import precision, sliding_window
from .cases import Case, InputSpec, PredictionFiles, image_case, load_case, preprocessing_pipeline
from .manifest import (FORMAT, MANIFEST, claim_output, locked, owned_now, read_manifest, record_outputs, sha256_file,
                       write_manifest)

__all__ = ["Predictor", "FilesResult", "CaseResult", "inference_settings", "resolve_device", "torchrun_env",
           "check_compile_options", "input_spec", "OUTPUT_OPTIONS"]

AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: the inference options that shape a written label map (recorded per case; a rerun skips a case only when these
#: and the checkpoints are the same). Not among them: the device, batch size, compiling and CUDA graphs (the same
#: arithmetic), nor the bf16 weights cast once on a CPU (bit-identical to autocast).
OUTPUT_OPTIONS = ("roi_size", "overlap", "mode", "mirror", "amp", "postprocessing", "format")


# ------------------------------------------------------------------------------------------------ settings
def torchrun_env() -> tuple:
    """``(world_size, rank, local_rank)`` of this process under ``torchrun`` (``(1, 0, -1)`` outside)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "-1") or -1) if world > 1 else -1
    return world, rank, local_rank


def resolve_device(name, local_rank: int = -1) -> torch.device:
    """``auto`` (the GPU ``local_rank`` — or the first — when CUDA is available, else the CPU), ``cpu``, ``cuda``
    (GPU ``local_rank`` under torchrun), ``cuda:N``, or a ``torch.device``; :class:`UserError` for an unknown
    device or CUDA without a GPU."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if local_rank >= 0 else 0)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
        if dev.index is None and local_rank >= 0:
            dev = torch.device("cuda", local_rank)
    return dev


def check_compile_options(compile: Optional[str], cuda_graphs: Optional[bool]) -> None:
    """:class:`UserError` when CUDA graphs are asked for beside ``torch.compile`` (whose ``reduce-overhead`` mode
    replays CUDA graphs itself); only an explicit ``cuda_graphs=True``: the default yields to ``compile``."""
    if cuda_graphs and compile is not None:
        raise UserError("--cuda-graphs and --compile exclude each other (--compile reduce-overhead replays CUDA "
                        "graphs itself)")


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _first(*values):
    """The first value that is not None (``0`` and ``False`` are settings, not gaps)."""
    return next((v for v in values if v is not None), None)


def _whole(v):
    """A whole float (``16.0``) as an int; anything else as it is (for :func:`check_roi_size` to judge)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def inference_settings(state: dict, model, args) -> dict:
    """Window size, overlap, blending, mirroring, batch: the caller's choice (``args.roi_size``, ``.overlap``,
    ``.sw_batch_size``, ``.mode``, ``.mirror``; None: not chosen), else the checkpoint's validation settings, else
    nnFormer's (0.5 overlap, Gaussian, no mirroring). ``args.checkpoint`` names the checkpoint in errors.

    The window is checked against every network (``model``: one, or a list for an ensemble) before any scan is
    read: whole positive sizes, one per axis, within sane bounds and divisible by the network's divisor
    (:func:`glam3d.engine.preflight.check_roi_size`)."""
    from ..engine.preflight import check_roi_size, network_divisor

    cfg = state.get("config") or {}
    roi = _first(args.roi_size, _get(cfg, "val", "roi_size"), _get(cfg, "data", "roi_size"),
                 getattr(model if not isinstance(model, (list, tuple)) else model[0], "default_crop", None))
    if roi is None:
        raise UserError("the checkpoint records no window size; give --roi-size D H W", args.checkpoint)
    roi = [_whole(r) for r in roi] if isinstance(roi, (list, tuple)) else roi
    user = args.roi_size is not None
    for m in (model if isinstance(model, (list, tuple)) else [model]):
        roi = list(check_roi_size(roi, network_divisor(m), None if user else args.checkpoint,
                                  what="--roi-size" if user else "the checkpoint's window size (val.roi_size)"))
    overlap = _first(args.overlap, _get(cfg, "val", "overlap"), 0.5)   # a checkpoint's overlap 0 stays 0
    if not 0 <= float(overlap) < 1:
        where = "--overlap" if args.overlap is not None else "the checkpoint's val.overlap"
        raise UserError(f"{where} must be in [0, 1), got {overlap}", None if args.overlap is not None
                        else args.checkpoint)
    sw = _first(args.sw_batch_size, _get(cfg, "val", "sw_batch_size"), 2)
    if int(sw) < 1:
        where = "--sw-batch-size" if args.sw_batch_size is not None else "the checkpoint's val.sw_batch_size"
        raise UserError(f"{where} must be >= 1, got {sw}", None if args.sw_batch_size is not None
                        else args.checkpoint)
    mode = _first(args.mode, _get(cfg, "val", "mode"), "gaussian")
    mirror = bool(_first(args.mirror, _get(cfg, "val", "mirror"), False))
    return {"roi_size": roi, "overlap": float(overlap), "sw_batch_size": int(sw), "mode": mode,
            "mirror": bool(mirror)}


def _check_classes(num_classes: Optional[int], plan: dict, ckpt_path: Path) -> None:
    """UserError naming the checkpoint when its network predicts classes its plan cannot map back to label values
    (found up front, not after a scan's sliding window)."""
    known = [int(k) for k in (plan.get("label_values") or {})]
    top = max(known, default=0)
    if num_classes is not None and num_classes - 1 > top:
        raise UserError(f"the network predicts {num_classes} classes (training indices 0..{num_classes - 1}) but the "
                        f"preprocessing plan maps only 0..{top} back to label values; the checkpoint is inconsistent",
                        ckpt_path)


def _source_format(state: dict) -> tuple:
    """``(layout, file_ending)`` of the raw dataset the checkpoint's training data was preprocessed from (nnU-Net
    v2 / MSD: what the preprocessed dataset.json records as ``source_layout`` and ``file_ending``), ``(None, None)``
    when unknown. Looked up in the checkpoint, then in the preprocessed dataset.json its config names (``data.root``)
    when that file is there and holds the checkpoint's very plan."""
    for d in (state, state.get("dataset"), state.get("plan")):
        if isinstance(d, dict) and isinstance(d.get("source_layout"), str):
            return d["source_layout"], d.get("file_ending")
    root = _get(state.get("config") or {}, "data", "root")
    if isinstance(root, str) and root:
        with contextlib.suppress(OSError, ValueError, TypeError):
            ds = json.loads((Path(root) / "dataset.json").read_text(encoding="utf-8"))
            if isinstance(ds, dict) and ds.get("plan") == state.get("plan") and \
                    isinstance(ds.get("source_layout"), str):
                return ds["source_layout"], ds.get("file_ending")
    return None, None


def _meta_network(state: dict):
    """The checkpoint's network built on the meta device (shapes only: its divisor and default window), or None
    when it cannot be built that way (its real build then reports what is wrong)."""
    from ..engine.preflight import meta_network

    spec = state.get("model_spec") or {}
    try:
        kwargs = dict(spec.get("kwargs") or {})
        from ..models import registry

        legacy = getattr(registry, "legacy_options", None)   # the defaults a spec without version was built with
        if legacy is not None:
            kwargs = {**(legacy(spec) or {}), **kwargs}
        return meta_network(spec["name"], kwargs)
    except Exception:  # noqa: BLE001 - a bad spec is reported by model_from_checkpoint, with the file's name
        return None


def _spec_of(state: dict, model=None) -> InputSpec:
    channels = _first(getattr(model, "in_channels", None), _get(state, "plan", "num_channels"), 1)
    layout, ending = _source_format(state)
    return InputSpec(int(channels), layout, ending if isinstance(ending, str) else None)


def input_spec(checkpoints) -> InputSpec:
    """What the (first) checkpoint expects of a case — its input channels, and the raw layout and file ending its
    data came from (:class:`~glam3d.inference.cases.InputSpec`) — read from the checkpoint mapped, without building
    its network (``glam3d predict`` groups and checks the input files with it before the networks are built)."""
    from ..engine.checkpoint import load_checkpoint

    paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    if not paths:
        raise ValueError("no checkpoint given")
    state = load_checkpoint(Path(paths[0]), mmap=True)
    return _spec_of(state)


def _first_difference(a, b, prefix: str = "") -> str:
    """The first key path where two JSON-like values differ, with both values (for a one-line error)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    text = f"{json.dumps(a, default=str)[:60]} vs {json.dumps(b, default=str)[:60]}"
    return f"{prefix}: {text}" if prefix else text


def _postprocessing(value, plan: dict):
    """``largest_component`` as ``(decision, source, key)``: the decision (None, ``"all"`` or a checked decision
    dict), where it came from (None, ``"all"``, the decision file), and what of it shapes the output (recorded and
    compared on reruns). A decision naming label values the plan never writes is refused (a decision of another
    dataset)."""
    from ..postprocessing import check_decision, load_decision

    if value is None or value is False:
        return None, None, None
    if value is True or value == "all":
        return "all", "all", "all"
    if isinstance(value, dict):
        decision, source = check_decision(value), "(a decision given in memory)"
    else:
        decision, source = load_decision(value), str(Path(value).resolve())
    fg = decision["foreground_largest_component"]
    key = {"foreground_largest_component": bool(fg["apply"]),
           "foreground_classes": sorted(int(v) for v in (fg.get("classes") or [])) if fg["apply"] else [],
           "classes_largest_component": sorted(int(v) for v in decision["classes_largest_component"])}
    known = {int(v) for v in (plan.get("label_values") or {}).values()}
    stray = sorted(set(key["foreground_classes"] + key["classes_largest_component"]) - known)
    if known and stray:
        raise UserError(f"the postprocessing decision names label value {stray[0]}, which the checkpoint never "
                        f"writes (its values: {', '.join(map(str, sorted(known)))}): a decision of another dataset?",
                        source if source.endswith(".json") else None)
    return decision, source, key


# ------------------------------------------------------------------------------------------------ results
@dataclass
class CaseResult:
    """What :meth:`Predictor.predict_files` did with one case: ``status`` written | skipped | failed."""
    name: str
    status: str
    seconds: float = 0.0
    note: str = ""


@dataclass
class FilesResult:
    """The outcome of :meth:`Predictor.predict_files`: one :class:`CaseResult` per case of this rank, and the
    manifest this process recorded (``predictions.json`` in ``output_dir`` merges it with earlier runs')."""
    output_dir: Path
    cases: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    @property
    def failed(self) -> list:
        return [c for c in self.cases if c.status == "failed"]

    @property
    def exit_code(self) -> int:
        """``glam3d predict``'s exit status: 2 when a scan failed, else 0."""
        return 2 if self.failed else 0


@dataclass
class _Segmented:
    """One scan segmented in the preprocessed grid: its image as read, the labels ``(D, H, W)`` uint8 (an array,
    possibly mapped from the scratch folder), the probabilities ``(K, D, H, W)`` float32 or None, and the
    preprocessing ``meta`` that maps them back."""
    image: object
    labels: np.ndarray
    probs: object
    meta: dict


# ------------------------------------------------------------------------------------------------ the predictor
class Predictor:
    """Trained networks with their preprocessing plan and inference settings, ready to segment scans.

    Made by :meth:`from_checkpoint` (one checkpoint) or :meth:`from_checkpoints` (an ensemble). :meth:`predict`
    segments one scan and returns nibabel images; :meth:`predict_files` writes files for many (what ``glam3d
    predict`` runs).

    Attributes: ``models`` (the networks: eval mode, on ``device``, possibly cast, compiled or CUDA-graphed),
    ``model`` (the first), ``plan`` (the preprocessing plan), ``settings`` (``roi_size``, ``overlap``,
    ``sw_batch_size``, ``mode``, ``mirror``), ``device``, ``stitch_device`` (None: ``device``), ``amp`` (autocast
    dtype or None), ``checkpoints`` (paths), ``checkpoint`` (the first), ``metadata`` (the first checkpoint without
    its weights: config, labels, epoch, metrics; ``members`` holds every checkpoint's), ``postprocessing`` (None,
    ``"all"`` or a decision dict), ``spec`` (what a case must be: channels, source layout).

    Example::

        predictor = Predictor.from_checkpoint("best.pt", device="cpu", amp="off", overlap=0.5)
        seg = predictor.predict("ct.nii.gz")            # nib.Nifti1Image of label values, the CT's grid
        seg.to_filename("ct_seg.nii.gz")
    """

    def __init__(self, model, plan: dict, settings: dict, *, device, stitch_device=None,
                 amp: Optional[torch.dtype] = None, weights: str = "float32", compile: Optional[str] = None,
                 cuda_graphs: bool = False, checkpoint=None, metadata=None, largest_component=None,
                 spec: Optional[InputSpec] = None):
        if not plan:
            raise ValueError("plan: a preprocessing plan is needed to prepare new scans like the training data")
        missing = {"roi_size", "overlap", "sw_batch_size", "mode", "mirror"} - set(settings)
        if missing:
            raise ValueError(f"settings lacks {sorted(missing)}")
        if amp not in AMP_NAMES:
            raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp}")
        self.models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not self.models:
            raise ValueError("model: no network given")
        self.model = self.models[0]
        self.plan, self.settings = plan, dict(settings)
        self.device = torch.device(device)
        self.stitch_device = torch.device(stitch_device) if stitch_device is not None else None
        self.amp, self.weights, self.compile, self.cuda_graphs = amp, weights, compile, bool(cuda_graphs)
        paths = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint] * len(self.models)
        if len(paths) != len(self.models):
            raise ValueError(f"{len(paths)} checkpoints for {len(self.models)} networks")
        self.checkpoints = [Path(p) if p is not None else None for p in paths]
        self.checkpoint = self.checkpoints[0]
        metas = metadata if isinstance(metadata, (list, tuple)) else [metadata] * len(self.models)
        self.members = [dict(m or {}) for m in metas]
        self.metadata = self.members[0]
        self.postprocessing, self._pp_source, self._pp_key = _postprocessing(largest_component, plan)
        self.in_channels = getattr(self.model, "in_channels", None)
        self.spec = spec or InputSpec(int(self.in_channels or plan.get("num_channels", 1)))
        self._sha256: dict = {}

    def __repr__(self):
        names = [m.get("model_spec", {}).get("name", type(n).__name__) for m, n in zip(self.members, self.models)]
        what = repr(names[0]) if len(names) == 1 else f"ensemble of {len(names)}: {', '.join(names)}"
        return f"Predictor({what}, device={self.device}, amp={AMP_NAMES[self.amp]}, {self.settings})"

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, device="auto", *, amp="auto", overlap: Optional[float] = None,
                        roi_size: Optional[Sequence[int]] = None, sw_batch_size: Optional[int] = None,
                        mode: Optional[str] = None, mirror: Optional[bool] = None, stitch_device=None,
                        compile: Union[str, bool, None] = None, cuda_graphs: Optional[bool] = None,
                        local_rank: Optional[int] = None, largest_component=None) -> "Predictor":
        """Load a glam3d checkpoint (mapped, weights only) and make its network ready for inference; a list of
        checkpoints makes an ensemble (:meth:`from_checkpoints`).

        Args:
            path: the checkpoint (``checkpoints/best.pt`` of a run), or a list of them.
            device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``.
            amp: ``auto`` (bf16 on GPUs that support it, else fp16; float32 on a CPU), ``off``, ``bf16``, ``fp16``
                (GPU only). bf16 on a CPU casts the weights once (bit-identical to autocast's outputs).
            overlap, roi_size, sw_batch_size, mode, mirror: the sliding window (None: the checkpoint's
                validation settings, else 0.5 overlap, the training crop, 2 windows a batch, Gaussian blending,
                no mirroring).
            stitch_device: where windows are blended (default ``device``; ``cpu`` for scans too large for the GPU).
            compile: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``,
                ``max-autotune-no-cudagraphs``; ``True``: ``default``), or None.
            cuda_graphs: capture the forward as a CUDA graph (None: on for a GPU without ``compile``).
            local_rank: the GPU of this rank (None: ``LOCAL_RANK`` under torchrun).
            largest_component: keep the largest connected component before writing a label map: ``"all"`` (every
                organ), a ``postprocessing.json`` from ``glam3d postprocess decide`` / ``glam3d evaluate
                --decide-postprocessing`` (or its dict), or None (no postprocessing).

        Problems (a bad checkpoint, weights holding NaN/inf, a window the network does not take, an unknown
        device, fp16 on a CPU, a network the plan cannot map back) raise :class:`~glam3d.errors.UserError` with one
        line naming the file or option.
        """
        paths = list(path) if isinstance(path, (list, tuple)) else [path]
        return cls.from_checkpoints(paths, device, amp=amp, overlap=overlap, roi_size=roi_size,
                                    sw_batch_size=sw_batch_size, mode=mode, mirror=mirror,
                                    stitch_device=stitch_device, compile=compile, cuda_graphs=cuda_graphs,
                                    local_rank=local_rank, largest_component=largest_component)

    @classmethod
    def from_checkpoints(cls, paths: Sequence, device="auto", *, amp="auto", overlap: Optional[float] = None,
                         roi_size: Optional[Sequence[int]] = None, sw_batch_size: Optional[int] = None,
                         mode: Optional[str] = None, mirror: Optional[bool] = None, stitch_device=None,
                         compile: Union[str, bool, None] = None, cuda_graphs: Optional[bool] = None,
                         local_rank: Optional[int] = None, largest_component=None) -> "Predictor":
        """An ensemble of checkpoints (e.g. the five folds of a cross-validation): every window goes through each
        network, and their softmax (each averaged over the mirrorings) is averaged before the windows are blended.

        The checkpoints must share the preprocessing plan and the labels (they predict one label map): otherwise
        one :class:`~glam3d.errors.UserError` naming the checkpoint that differs and the first difference. Their
        networks may differ (an nnFormer and a GLAM-nnFormer of the same plan) but must predict the same classes
        from the same channels. The window settings are the caller's, else the first checkpoint's validation
        settings, and must suit every network (divisors); a note says when another checkpoint records other ones.
        The arguments are :meth:`from_checkpoint`'s; one path is a single network.
        """
        from ..engine.checkpoint import checkpoint_metadata, load_checkpoint, model_from_checkpoint

        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("from_checkpoints: no checkpoint given")
        seen: dict = {}
        for p in paths:
            key = p.resolve()
            if key in seen:
                raise UserError(f"given twice (also as {seen[key]}); an ensemble averages different checkpoints", p)
            seen[key] = p
        compile = "default" if compile is True else (None if compile is False else compile)
        check_compile_options(compile, cuda_graphs)
        world, rank, env_local_rank = torchrun_env()
        local_rank = env_local_rank if local_rank is None else int(local_rank)
        states = []
        for p in paths:   # every checkpoint read (mapped) and compared before any network is built
            state = load_checkpoint(p, mmap=True)
            if not state.get("plan"):
                raise UserError("the checkpoint carries no preprocessing plan, so new scans cannot be prepared like "
                                "its training data (was it written by glam3d train?)", p)
            if states:
                for what, key in (("preprocessing plan differs", "plan"), ("labels differ", "labels")):
                    if state.get(key) != states[0].get(key):
                        raise UserError(f"its {what} from {paths[0]}'s "
                                        f"({_first_difference(states[0].get(key), state.get(key))}); an ensemble "
                                        f"averages networks trained on the same preprocessed data and labels", p)
            states.append(state)
        plan = states[0]["plan"]
        device = resolve_device(device, local_rank)
        if cuda_graphs and device.type != "cuda":
            raise UserError(f"--cuda-graphs needs a CUDA device; the network runs on {device} (--device cuda)")
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and compile is None
        stitch = resolve_device(stitch_device, local_rank) if stitch_device else None
        try:
            amp_dtype = precision.resolve_amp(amp, device)
        except ValueError as err:
            raise UserError(f"--amp: {err}") from None
        if amp_dtype == torch.bfloat16 and device.type == "cpu" and not precision.cpu_bf16_native() and rank == 0:
            print("warning: --amp bf16: this CPU has no native bf16 (AVX512-BF16 / AMX); bf16 is emulated and slower "
                  "than float32 here", file=sys.stderr)
        # CPU + bf16 (eager): the weights cast once instead of by autocast at every window (bit-identical labels)
        cast_weights = amp_dtype is not None and device.type == "cpu" and compile is None
        choice = types.SimpleNamespace(roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode,
                                       mirror=mirror, checkpoint=paths[0])
        # the window checked against the networks built on the meta device, before any is built for real
        shapes = [_meta_network(state) for state in states]
        settings = inference_settings(states[0], shapes, choice) if all(m is not None for m in shapes) else None
        del shapes
        models, metas = [], []
        for i, p in enumerate(paths):
            # the network's weights are the mapped checkpoint's pages (assign): one copy of them while it is built;
            # sized on the meta device first, against the CPU and the device it will run on; NaN/inf refused
            try:
                model = model_from_checkpoint(states[i], p, assign=True, device=device).to(device).eval()
            except ImportError as err:  # an optional dependency of the network (e.g. einops for SwinUNETR)
                raise UserError(f"cannot rebuild the network recorded in the checkpoint ({err})", p) from None
            states[i] = checkpoint_metadata(states[i])  # the weights and optimiser state are not held any longer
            if models:
                for attr in ("num_classes", "in_channels"):
                    a, b = getattr(models[0], attr, None), getattr(model, attr, None)
                    if a is not None and b is not None and a != b:
                        raise UserError(f"its network has {attr} {b}, {paths[0]}'s has {a}: an ensemble's networks "
                                        f"predict the same classes from the same channels", p)
            if cast_weights:
                precision.cast_off_the_map(model, amp_dtype)
            _check_classes(getattr(model, "num_classes", None), plan, p)
            models.append(model)
            metas.append(states[i])
        if settings is None:
            settings = inference_settings(metas[0], models, choice)
        if rank == 0:
            _note_other_settings(settings, choice, metas, models, paths)
        if compile is not None:
            from ..engine.compile import COMPILE_MODES, compile_network

            if compile not in COMPILE_MODES:
                raise UserError(f"--compile: unknown mode {compile!r} ({', '.join(COMPILE_MODES)})")
            models = [compile_network(m, inference=True, device=device, mode=compile,
                                      batch_size=settings["sw_batch_size"]) for m in models]
        elif cuda_graphs:
            from ..engine.cuda_graphs import graphed_network
            models = [graphed_network(m, settings["sw_batch_size"]) for m in models]
        spec = _spec_of(metas[0], models[0])
        return cls(models, plan, settings, device=device, stitch_device=stitch, amp=amp_dtype,
                   weights="bf16" if cast_weights and amp_dtype == torch.bfloat16 else "float32", compile=compile,
                   cuda_graphs=bool(cuda_graphs), checkpoint=paths, metadata=metas,
                   largest_component=largest_component, spec=spec)

    # -- one scan -----------------------------------------------------------------------------------------------
    def predict(self, image, *, probabilities: bool = False, scratch=None, progress: Union[bool, str] = False):
        """Segment one scan.

        Args:
            image: an image file (NIfTI, ``.mha``, ``.nrrd``, …), a channel file of a case (its other channel files
                are taken from its folder), a folder holding one DICOM series (or one case's files), or a nibabel
                image (3D, ``(X, Y, Z, C)`` for several channels, or 4D of one volume).
            probabilities: also return the class probabilities.
            scratch: a folder for the scan's temporary files (the scan decoded, the labels, the probabilities, the
                blending's parked sums; all unlinked at once), so that a long CT is not held in memory; None: in
                memory.
            progress: a progress bar over the windows (True, or a string: its description).

        Returns:
            a ``nib.Nifti1Image`` of label values in the input's geometry (its shape and affine; the dtype
            ``glam3d predict`` writes), postprocessed when the predictor was made with ``largest_component``,
            voxel for voxel the label map ``glam3d predict`` writes for this scan — or, with ``probabilities``,
            ``(labels, probs)``: ``probs`` a float32 ``(X, Y, Z, K)`` image (softmax per class, vector intent),
            what ``--probabilities`` writes.
        """
        from ..utils.nifti import nifti_header

        case = image_case(image, self.spec)
        pipeline = preprocessing_pipeline()
        if probabilities:
            self._check_probabilities(pipeline)
        folder = Path(scratch) if scratch is not None else None
        if folder is not None and not folder.is_dir():
            raise UserError("scratch must be an existing folder (or None)", folder)
        try:
            seg = self._segment(case, pipeline, want_probs=probabilities, scratch=folder,
                                progress=(case.name if progress is True else progress) or False)
        except _ScanError as err:
            raise err.error from None
        shape, affine = tuple(seg.image.shape[:3]), np.asarray(seg.image.affine, float)
        dtype, slabs = pipeline.restored_label_slabs(seg.labels, seg.meta, self.plan)
        out = np.empty(shape, dtype=dtype)
        _fill_z(out, slabs, case.source)
        if self.postprocessing is not None:
            from ..postprocessing import apply_postprocessing

            apply_postprocessing(out, self.postprocessing, inplace=True)
        labels = _image(out, affine, nifti_header(shape, dtype, affine))
        seg.labels = None
        del slabs
        if not probabilities:
            return labels
        probs = seg.probs.array if isinstance(seg.probs, ScratchArray) else seg.probs.cpu().numpy()
        k = probs.shape[0]
        maps = np.empty(shape + (k,), dtype=np.float32)
        for c, class_slabs in enumerate(pipeline.restored_probabilities(probs, seg.meta, self.plan)):
            _fill_z(maps[..., c], class_slabs, case.source)
        hdr = nifti_header(shape + (k,), np.float32, affine)
        hdr.set_intent("vector", (), name="class probabilities")
        return labels, _image(maps, affine, hdr)

    # -- many scans to files --------------------------------------------------------------------------------------
    def check_files(self, inputs, output_dir, scratch=True, format: Optional[str] = None) -> PredictionFiles:
        """:meth:`PredictionFiles.check` with this predictor's :class:`~glam3d.inference.cases.InputSpec` (how
        channel files are grouped into cases)."""
        return PredictionFiles.check(inputs, output_dir, scratch, spec=self.spec, format=format)

    def predict_files(self, inputs, output_dir=None, *, overwrite: bool = False, probabilities: bool = False,
                      scratch=True, quiet: bool = False, world_size: Optional[int] = None,
                      rank: Optional[int] = None, format: Optional[str] = None) -> FilesResult:
        """Segment scans into ``output_dir/<case><ending>`` (what ``glam3d predict`` runs).

        Args:
            inputs: image files, folders of them (nnU-Net channel files ``<case>_XXXX`` grouped into cases), DICOM
                series folders (or a :class:`PredictionFiles` checked beforehand, which then also gives the output
                and scratch folders and the format).
            output_dir: the folder of the label maps and ``predictions.json``.
            overwrite: predict every case again (default: a case whose output the same checkpoints and options made,
                as ``predictions.json`` records, is kept and reported as skipped; any other is predicted again).
                Only files glam3d wrote are ever replaced, ``overwrite`` or not.
            probabilities: also write ``<case>_probabilities.nii.gz`` (softmax per class, the input geometry; made
                for a kept label map that lacks it).
            scratch: the folder of a scan's temporary files (True: ``output_dir``; None or False: in memory).
            quiet: no progress bars.
            world_size, rank: this process's shard of the cases (default: torchrun's ``WORLD_SIZE`` / ``RANK``).
            format: the label maps' format (``nii.gz``, ``nii``, ``mha``, ``nrrd``, …; None: each input's own).

        The output folder is claimed first (:func:`glam3d.inference.manifest.claim_output`: new, empty, glam3d's
        own, or an older glam3d prediction folder whose ``predictions.json`` lists its files). Problems found up
        front (unreadable headers, output = input, a file there glam3d did not write where an output would go, a
        bad scratch folder) raise :class:`~glam3d.errors.UserError` before anything is written; a scan that fails
        while being read or preprocessed is reported in one line on stderr and recorded as failed, the others are
        still written. Outputs are written atomically; each case's entry is merged into ``predictions.json`` as
        soon as it is written. Prints one line per case and a summary.
        """
        from ..utils.io import atomic_path, sweep_stale_temps
        from ..utils.nifti import write_volumes
        from .outputs import write_label_map

        files = inputs if isinstance(inputs, PredictionFiles) else self.check_files(inputs, output_dir, scratch,
                                                                                    format)
        out_dir, scratch = files.output_dir, files.scratch
        env_world, env_rank, _ = torchrun_env()
        world = env_world if world_size is None else int(world_size)
        rank = env_rank if rank is None else int(rank)
        if not 0 <= rank < max(world, 1):
            raise ValueError(f"rank {rank} is outside a world of {world}")
        pipeline = preprocessing_pipeline()
        if probabilities:
            self._check_probabilities(pipeline)
        mine = files.cases[rank::world] if world > 1 else files.cases
        claim_output(out_dir, log=None if rank else lambda m: print(f"note: {m}", file=sys.stderr))
        with locked(out_dir):   # the marker as it is now (another process may be writing into the folder)
            owned = owned_now(out_dir)
            _check_not_foreign(owned, files, probabilities)
            owned.record(MANIFEST)
            prev = read_manifest(out_dir / MANIFEST)
        manifest = self._manifest(probabilities, world, files.format)
        for folder in {out_dir, scratch} - {None}:  # temporary files of a killed earlier run (live writers' kept)
            sweep_stale_temps(folder)
        result = FilesResult(out_dir, manifest=manifest)
        checkpoints = self.checkpoint_records()
        t_all = time.time()
        for i, case in enumerate(mine):
            out_path, prob_path = files.label_path(case), files.probability_path(case)
            options = self.output_options(files.ending(case))
            old = (prev.get("cases") or {}).get(case.name)
            keep_labels = not overwrite and _made_by(old, out_path, checkpoints, options, owned)
            want_probs = probabilities and not (keep_labels and _probabilities_kept(old, prob_path, owned))
            entry = {"input": str(case.source), "output": str(out_path), "series_id": case.series_id}
            if len(case.files) > 1 and case.kind == "file":
                entry["inputs"] = [str(p) for p in case.files]
            if keep_labels and not want_probs:
                entry = {**old, "status": "skipped (made by the same checkpoints and options)"}
                manifest["cases"][case.name] = entry
                result.cases.append(CaseResult(case.name, "skipped"))
                write_manifest(out_dir, {**manifest, "cases": {case.name: entry}})
                continue
            t0 = time.time()
            desc = None if quiet else f"[{i + 1}/{len(mine)}] {case.name}"
            try:
                seg = self._segment(case, pipeline, want_probs=want_probs, scratch=scratch, progress=desc or False)
            except _ScanError as err:  # this scan only: report it, go on with the others, exit 2 at the end
                print(f"error: {err.error}", file=sys.stderr)
                if isinstance(old, dict) and old.get("checkpoints") and out_path.is_file():
                    # the file an earlier run made is still there: its entry still describes it
                    entry = {**old, "last_attempt": {"status": "failed", "error": str(err.error)}}
                else:
                    entry.update({"status": "failed", "error": str(err.error)})
                manifest["cases"][case.name] = entry
                result.cases.append(CaseResult(case.name, "failed", time.time() - t0, str(err.error)))
                write_manifest(out_dir, {**manifest, "cases": {case.name: entry}})
                continue
            image, meta = seg.image, seg.meta
            # listed in the marker before they are created
            record_outputs(out_dir, *([] if keep_labels else [out_path.name]),
                           *([prob_path.name] if want_probs else []))
            # the label map restored Z-slab by Z-slab and streamed into its file (never whole in memory for NIfTI
            # without postprocessing; otherwise assembled in the scratch folder, see glam3d.inference.outputs)
            if keep_labels:  # only the probabilities were missing: the existing label map stays untouched
                entry = {**old, "probabilities": str(prob_path),
                         "note": "label map existed (same checkpoints and options) and was kept; probabilities added"}
                seen = set(old.get("label_values_present") or [])
            else:
                dtype, slabs = pipeline.restored_label_slabs(seg.labels, meta, self.plan)
                seen = write_label_map(out_path, slabs, image.shape[:3], image.affine, dtype,
                                       reference=case.files[0] if case.kind == "file" else None,
                                       postprocessing=self.postprocessing, scratch=scratch, source=case.source)
                del slabs
            seg.labels = None
            if seg.probs is not None:
                probs = seg.probs.array if isinstance(seg.probs, ScratchArray) else seg.probs.cpu().numpy()
                seg.probs = None
                with atomic_path(prob_path, suffix="".join(prob_path.suffixes[-2:]) if prob_path.name.endswith(".gz")
                                 else ".nii") as tmp:
                    write_volumes(tmp, pipeline.restored_probabilities(probs, meta, self.plan), probs.shape[0],
                                  image.shape[:3], image.affine, np.float32, intent="class probabilities")
                entry["probabilities"] = str(prob_path)
                del probs
            dt = time.time() - t0
            present = sorted(int(v) for v in seen if v != 0)
            entry.update({"status": "written", "seconds": round(dt, 2), "shape": list(image.shape[:3]),
                          "label_values_present": present, "checkpoints": checkpoints, "inference": options})
            if self._pp_source is not None:
                entry["postprocessing_source"] = self._pp_source
            manifest["cases"][case.name] = entry
            result.cases.append(CaseResult(case.name, "written", dt, f"labels {present}"))
            write_manifest(out_dir, {**manifest, "cases": {case.name: entry}})
            del seg, image

        write_manifest(out_dir, manifest)
        _print_summary(result.cases, time.time() - t_all, out_dir, world, rank)
        return result

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def sha256(self) -> Optional[str]:
        """The (first) checkpoint file's sha256 (computed once), None without a checkpoint file."""
        return self._sha(0)

    def _sha(self, i: int) -> Optional[str]:
        if i not in self._sha256 and self.checkpoints[i] is not None:
            self._sha256[i] = sha256_file(self.checkpoints[i])
        return self._sha256.get(i)

    def checkpoint_records(self) -> list:
        """``[{"path", "sha256"}, …]``: the checkpoints behind every output (what ``predictions.json`` records per
        case and ``glam3d evaluate`` reports)."""
        return [{"path": str(p.resolve()) if p is not None else None, "sha256": self._sha(i)}
                for i, p in enumerate(self.checkpoints)]

    def output_options(self, ending: str) -> dict:
        """The options that shape a label map (:data:`OUTPUT_OPTIONS`), as recorded per case."""
        s = self.settings
        return {"roi_size": list(s["roi_size"]), "overlap": s["overlap"], "mode": s["mode"], "mirror": s["mirror"],
                "amp": AMP_NAMES[self.amp], "postprocessing": self._pp_key, "format": ending}

    def _manifest(self, probabilities: bool, world: int, fmt: Optional[str]) -> dict:
        """The head of ``predictions.json``: the checkpoints, config, code version and inference settings of this
        run (the cases' own entries say which checkpoints and options made each output)."""
        from ..metrics.report import code_version

        stitch = self.stitch_device or self.device
        members = [{"path": c["path"], "sha256": c["sha256"], "model_spec": m.get("model_spec"),
                    "epoch": m.get("epoch"), "iteration": m.get("iteration"), "metrics": m.get("metrics")}
                   for c, m in zip(self.checkpoint_records(), self.members)]
        return {
            "format": FORMAT,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "checkpoint": members[0],
            "checkpoints": members,
            "config": self.metadata.get("config"),
            "seed": _get(self.metadata.get("config") or {}, "train", "seed"),
            "code": code_version(),
            "labels": self.metadata.get("labels"),
            "label_values": (self.plan or {}).get("label_values"),
            "inference": {**self.settings, "device": str(self.device), "stitch_device": str(stitch),
                          "amp": AMP_NAMES[self.amp], "weights": self.weights, "probabilities": probabilities,
                          "world_size": world, "cuda_graphs": self.cuda_graphs, "compile": self.compile,
                          "ensemble": len(self.models), "postprocessing": self._pp_source,
                          "format": fmt or "input"},
            "cases": {},
        }

    @staticmethod
    def _check_probabilities(pipeline) -> None:
        if not hasattr(pipeline, "restored_probabilities"):
            raise UserError("--probabilities needs preprocessing.pipeline.restored_probabilities (mapping class "
                            "maps back to the scan's grid), which this installation lacks; run without it")

    def _segment(self, case: Case, pipeline, *, want_probs: bool, scratch: Optional[Path], progress) -> _Segmented:
        """Read, preprocess and segment one scan; :class:`_ScanError` for problems of the scan itself (reading,
        preprocessing), :class:`UserError` for problems that concern every scan (the network's channels)."""
        from ..engine.cuda_graphs import CudaGraphCaptureError

        try:
            image, arr, meta = _prepare(case, pipeline, self.plan, spill_dir=scratch)
        except UserError as err:
            raise _ScanError(err) from None
        # a LazyScan (rows normalised and resampled as the sliding window reads them) or, for B-spline plans,
        # the float32 array
        x = arr if isinstance(arr, pipeline.LazyScan) else torch.as_tensor(np.ascontiguousarray(arr),
                                                                           dtype=torch.float32)
        if self.in_channels is not None and x.shape[0] != self.in_channels:
            raise UserError(f"scan has {x.shape[0]} channels after preprocessing, the network expects "
                            f"{self.in_channels}", case.source)
        s, stitch = self.settings, self.stitch_device or self.device
        # the labels go to the scratch folder window row by window row (not held while the network runs)
        writer = _label_writer(scratch, case.name, x.shape[1:])
        try:
            out = sliding_window.predict_volume(
                self.models if len(self.models) > 1 else self.model, x, s["roi_size"], overlap=s["overlap"],
                sw_batch_size=s["sw_batch_size"], mode=s["mode"], mirror=s["mirror"], device=self.device,
                amp=AMP_NAMES[self.amp], stitch_device=self.stitch_device, return_probs=want_probs,
                progress=progress, out=writer,
                probs_out=_probability_target(scratch, stitch) if want_probs else None,
                spill=scratch if stitch.type == "cpu" else None)
        except BaseException as err:
            if writer is not None:
                writer.abort()  # its temporary file goes
            if isinstance(err, CudaGraphCaptureError):  # the network, not this scan: stop with one line
                raise UserError(str(err)) from None
            raise
        labels, probs = (out if want_probs else (out, None))
        del x, arr, out  # the scan as read (held by the LazyScan) is not needed to restore the labels
        labels = _finished_labels(labels)
        _check_geometry(meta, image, case)
        return _Segmented(image, labels, probs, meta)


def _note_other_settings(settings: dict, choice, metas: list, models: list, paths: list) -> None:
    """One note per ensemble member whose own validation settings differ from those the ensemble runs with (the
    caller's or the first checkpoint's): the ensemble blends every network's windows on one grid."""
    for meta, model, p in zip(metas[1:], models[1:], paths[1:]):
        try:
            own = inference_settings(meta, model, types.SimpleNamespace(**{**vars(choice), "checkpoint": p}))
        except UserError:   # its own settings would not even suit its network: nothing to compare
            continue
        diff = [k for k in ("roi_size", "overlap", "mode", "mirror") if own[k] != settings[k]]
        if diff:
            print(f"note: {p}: validated with {', '.join(f'{k} {own[k]}' for k in diff)}; the ensemble runs every "
                  f"network with {', '.join(f'{k} {settings[k]}' for k in diff)} (the first checkpoint's, or the "
                  f"options given)", file=sys.stderr)


def _made_by(old, out_path: Path, checkpoints: list, options: dict, owned) -> bool:
    """The manifest entry ``old`` proves that ``out_path`` (glam3d's, still there) was made by ``checkpoints``
    (their sha256, in any order: averaging is symmetric) with ``options``."""
    if not isinstance(old, dict) or not isinstance(old.get("checkpoints"), list):
        return False
    if not old.get("status", "").startswith(("written", "skipped")) or not old.get("output"):
        return False
    if Path(str(old["output"])).name != out_path.name or not out_path.is_file() or not owned.owns(out_path.name):
        return False
    shas = sorted(str(c.get("sha256")) for c in old["checkpoints"] if isinstance(c, dict))
    return shas == sorted(str(c["sha256"]) for c in checkpoints) and old.get("inference") == options


def _probabilities_kept(old: dict, prob_path: Path, owned) -> bool:
    return (bool(old.get("probabilities")) and Path(str(old["probabilities"])).name == prob_path.name
            and prob_path.is_file() and owned.owns(prob_path.name))


def _check_not_foreign(owned, files: PredictionFiles, probabilities: bool) -> None:
    """:class:`UserError` naming the first file where an output would go that glam3d did not write (not listed in
    the folder's marker): it is never replaced, ``--overwrite`` or not."""
    from ..utils.ownership import MARKER

    for case in files.cases:
        targets = [files.label_path(case)] + ([files.probability_path(case)] if probabilities else [])
        for t in targets:
            if (t.exists() or t.is_symlink()) and not owned.owns(t.name):
                raise UserError(f"exists and was not written by glam3d (not listed in {MARKER} nor in "
                                f"predictions.json); it is never replaced, --overwrite included: move it away or "
                                f"choose another --output", t)


class _ScanError(Exception):
    """A :class:`UserError` of one scan (:meth:`Predictor.predict_files` reports it and goes on)."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


# ------------------------------------------------------------------------------------------------ helpers
def _prepare(case: Case, pipeline, plan, spill_dir=None):
    """Read and preprocess one scan: ``(image, array, meta)``; problems with the scan are :class:`UserError`.

    The array is a ``LazyScan`` (rows normalised and resampled when the sliding window reads them); a NIfTI CT
    of unscaled integers is decoded into an unlinked file in ``spill_dir`` (the output folder) and mapped, so
    the process holds neither the scan nor the network's float32 input, only the rows being read."""
    image = load_case(case)
    try:
        arr, meta = pipeline.preprocess_scan(image, plan, lazy=True, spill_dir=spill_dir)
    except UserError as err:
        if err.path is None and str(case.source) not in str(err):
            raise UserError(str(err), case.source) from None
        raise
    except (ValueError, RuntimeError, MemoryError) as err:
        raise UserError(f"cannot preprocess this scan ({err})", case.source) from None
    return image, arr, meta


def _label_writer(scratch: Optional[Path], name: str, shape):
    """Where ``predict_volume`` writes a scan's labels: a ``.npy`` in ``scratch`` written one finished ``D``-range
    at a time (:class:`~glam3d.utils.ooc.NpySlabWriter`), or None (a tensor in memory) without one."""
    from ..utils.io import has_room
    from ..utils.ooc import NpySlabWriter
    try:
        if scratch is None or not has_room(scratch, math.prod(shape)):
            return None   # no room: the labels stay in memory
        return NpySlabWriter(scratch / f".{name}.labels.{uuid.uuid4().hex}.npy", tuple(shape), np.uint8)
    except OSError:
        return None


def _finished_labels(labels) -> np.ndarray:
    """The sliding window's labels as a uint8 array: a tensor's memory (no copy), or a writer's file, completed,
    mapped read-only and unlinked at once (the mapping outlives the name: nothing is left in the folder)."""
    if not hasattr(labels, "close"):
        return labels.cpu().numpy().astype(np.uint8, copy=False)
    try:
        labels.close()
        return np.load(labels.path, mmap_mode="r")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(labels.path)


def _probability_target(scratch: Optional[Path], stitch):
    """``predict_volume``'s ``probs_out``: the ``(K, D, H, W)`` float32 probabilities go to a file in ``scratch``
    (:class:`~glam3d.utils.ooc.ScratchArray`), or stay a tensor on ``stitch`` (the stitching device) without a
    scratch folder or room in it."""
    from ..utils.io import has_room

    def make(shape):
        if scratch is not None:
            with contextlib.suppress(OSError):
                if has_room(scratch, math.prod(shape) * 4):
                    return ScratchArray(scratch, shape)
        return torch.empty(shape, dtype=torch.float32, device=stitch)
    return make


def _check_geometry(meta: dict, image, case: Case) -> None:
    """The restoring must give back the input's grid exactly (a broken pipeline must not write misplaced labels
    silently): the grid the preprocessing recorded in ``meta`` is the input's."""
    shape, affine = tuple(meta["original_shape"]), np.asarray(meta["original_affine"], float)
    if shape != tuple(image.shape[:3]) or not np.allclose(affine, image.affine, atol=1e-4):
        raise UserError(f"internal error: the restored segmentation {shape} does not match the input "
                        f"grid {tuple(image.shape)} / affine", case.source)


def _fill_z(out: np.ndarray, slabs, source) -> None:
    """Put the ``(X, Y, dz)`` slabs of one volume into ``out`` ``(X, Y, Z)`` along Z, in order (cast to its
    dtype, as the streamed NIfTI writer casts them); ValueError naming ``source`` when they do not make it."""
    z = 0
    for slab in slabs:
        dz = slab.shape[2]
        if tuple(slab.shape[:2]) != out.shape[:2] or z + dz > out.shape[2]:
            raise ValueError(f"{source}: the restored slabs do not make an image of {out.shape}")
        out[:, :, z:z + dz] = np.asarray(slab, dtype=out.dtype)
        z += dz
    if z != out.shape[2]:
        raise ValueError(f"{source}: the restored slabs cover {z} of {out.shape[2]} planes")


def _image(data: np.ndarray, affine: np.ndarray, header):
    """A ``nib.Nifti1Image`` of ``data`` with ``header`` (what the streamed writer puts in the file)."""
    import nibabel as nib

    return nib.Nifti1Image(data, affine, header)


def _print_summary(results, seconds, out_dir, world, rank) -> None:
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    written = [r for r in results if r.status == "written"]
    skipped = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        extra = {"written": f"{r.seconds:6.1f}s  {r.note}", "skipped": "output exists, kept (use --overwrite)",
                 "failed": "see the error above"}[r.status]
        print(f"{tag}{r.name:<28} {r.status:<8} {extra}")
    print(f"{tag}{len(written)} written, {len(skipped)} skipped, "
          + (f"{len(failed)} failed, " if failed else "")
          + f"{len(results)} cases in {seconds:.1f}s -> {out_dir}", file=sys.stdout)

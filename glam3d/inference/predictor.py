"""The :class:`Predictor`: a trained glam3d checkpoint applied to new scans, from Python or from ``glam3d predict``.

The checkpoint carries the preprocessing plan and the label values, so a user gives only the scans. Each scan is
preprocessed exactly like the training data (``preprocessing.pipeline.preprocess_scan``; lazily: rows are
normalised and resampled as the sliding window reads them), segmented by slab-streaming sliding windows
(:func:`glam3d.inference.sliding_window.predict_volume`) and mapped back to the input's grid and label values
(``restored_label_slabs``: Z-slab by Z-slab).

* :meth:`Predictor.predict`: one scan (a NIfTI file, a DICOM series folder, or a nibabel image) to a nibabel image
  of labels in the scan's own geometry (and the class probabilities on request), voxel for voxel what
  ``glam3d predict`` writes for it.
* :meth:`Predictor.predict_files`: what ``glam3d predict`` runs: many scans to ``<case>.nii.gz`` files, streamed
  to disk, with resume (existing outputs kept unless ``overwrite``), a ``predictions.json`` manifest
  (:mod:`glam3d.inference.manifest`), a scratch folder for the temporary files of a scan, and one shard of the
  cases per rank under ``torchrun`` (``WORLD_SIZE > 1``: rank r takes cases r, r + world, … on GPU
  ``LOCAL_RANK``).

Example::

    from glam3d import Predictor

    predictor = Predictor.from_checkpoint("runs/synapse/checkpoints/best.pt", device="cuda", mirror=True)
    labels = predictor.predict("scan.nii.gz")                       # nib.Nifti1Image, the scan's geometry
    labels, probs = predictor.predict(nib.load("scan.nii.gz"), probabilities=True)   # probs: (X, Y, Z, K)
    predictor.predict_files(["RawData/Testing/img"], "preds/")      # preds/<case>.nii.gz + predictions.json
"""
from __future__ import annotations

import contextlib
import datetime as _dt
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
from .cases import Case, PredictionFiles, image_case, load_case, preprocessing_pipeline
from .manifest import FORMAT, MANIFEST, read_manifest, sha256_file, write_manifest

__all__ = ["Predictor", "FilesResult", "CaseResult", "inference_settings", "resolve_device", "torchrun_env",
           "check_compile_options"]

AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


def inference_settings(state: dict, model, args) -> dict:
    """Window size, overlap, blending, mirroring, batch: the caller's choice (``args.roi_size``, ``.overlap``,
    ``.sw_batch_size``, ``.mode``, ``.mirror``; None: not chosen), else the checkpoint's validation settings, else
    nnFormer's (0.5 overlap, Gaussian, no mirroring). ``args.checkpoint`` names the checkpoint in errors."""
    cfg = state.get("config") or {}
    roi = _first(args.roi_size, _get(cfg, "val", "roi_size"), _get(cfg, "data", "roi_size"),
                 getattr(model, "default_crop", None))
    if roi is None:
        raise UserError("the checkpoint records no window size; give --roi-size D H W", args.checkpoint)
    roi = [int(r) for r in roi]
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
    """A trained network with its preprocessing plan and inference settings, ready to segment scans.

    Made by :meth:`from_checkpoint`. :meth:`predict` segments one scan and returns nibabel images;
    :meth:`predict_files` writes NIfTI files for many (what ``glam3d predict`` runs).

    Attributes: ``model`` (eval mode, on ``device``, possibly cast, compiled or CUDA-graphed), ``plan`` (the
    preprocessing plan), ``settings`` (``roi_size``, ``overlap``, ``sw_batch_size``, ``mode``, ``mirror``),
    ``device``, ``stitch_device`` (None: ``device``), ``amp`` (autocast dtype or None), ``checkpoint`` (path),
    ``metadata`` (the checkpoint without its weights: config, labels, epoch, metrics).

    Example::

        predictor = Predictor.from_checkpoint("best.pt", device="cpu", amp="off", overlap=0.5)
        seg = predictor.predict("ct.nii.gz")            # nib.Nifti1Image of label values, the CT's grid
        seg.to_filename("ct_seg.nii.gz")
    """

    def __init__(self, model: torch.nn.Module, plan: dict, settings: dict, *, device, stitch_device=None,
                 amp: Optional[torch.dtype] = None, weights: str = "float32", compile: Optional[str] = None,
                 cuda_graphs: bool = False, checkpoint=None, metadata: Optional[dict] = None):
        if not plan:
            raise ValueError("plan: a preprocessing plan is needed to prepare new scans like the training data")
        missing = {"roi_size", "overlap", "sw_batch_size", "mode", "mirror"} - set(settings)
        if missing:
            raise ValueError(f"settings lacks {sorted(missing)}")
        if amp not in AMP_NAMES:
            raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp}")
        self.model, self.plan, self.settings = model, plan, dict(settings)
        self.device = torch.device(device)
        self.stitch_device = torch.device(stitch_device) if stitch_device is not None else None
        self.amp, self.weights, self.compile, self.cuda_graphs = amp, weights, compile, bool(cuda_graphs)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.metadata = dict(metadata or {})
        self.in_channels = getattr(model, "in_channels", None)
        self._sha256: Optional[str] = None

    def __repr__(self):
        return (f"Predictor({self.metadata.get('model_spec', {}).get('name', type(self.model).__name__)!r}, "
                f"device={self.device}, amp={AMP_NAMES[self.amp]}, {self.settings})")

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, device="auto", *, amp="auto", overlap: Optional[float] = None,
                        roi_size: Optional[Sequence[int]] = None, sw_batch_size: Optional[int] = None,
                        mode: Optional[str] = None, mirror: Optional[bool] = None, stitch_device=None,
                        compile: Union[str, bool, None] = None, cuda_graphs: Optional[bool] = None,
                        local_rank: Optional[int] = None) -> "Predictor":
        """Load a glam3d checkpoint (mapped, weights only) and make its network ready for inference.

        Args:
            path: the checkpoint (``checkpoints/best.pt`` of a run).
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

        Problems (a bad checkpoint, an unknown device, fp16 on a CPU, a network the plan cannot map back) raise
        :class:`~glam3d.errors.UserError` with one line naming the file or option.
        """
        from ..engine.checkpoint import checkpoint_metadata, load_checkpoint, model_from_checkpoint

        compile = "default" if compile is True else (None if compile is False else compile)
        check_compile_options(compile, cuda_graphs)
        world, rank, env_local_rank = torchrun_env()
        local_rank = env_local_rank if local_rank is None else int(local_rank)
        ckpt_path = Path(path)
        state = load_checkpoint(ckpt_path, mmap=True)
        plan = state.get("plan")
        if not plan:
            raise UserError("the checkpoint carries no preprocessing plan, so new scans cannot be prepared like its "
                            "training data (was it written by glam3d train?)", ckpt_path)
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
        # the network's weights are the mapped checkpoint's pages (assign): one copy of them while it is built
        try:
            model = model_from_checkpoint(state, ckpt_path, assign=True).to(device).eval()
        except ImportError as err:  # an optional dependency of the network (e.g. einops for SwinUNETR)
            raise UserError(f"cannot rebuild the network recorded in the checkpoint ({err})", ckpt_path) from None
        state = checkpoint_metadata(state)  # the loaded weights and optimiser state are not held during inference
        # CPU + bf16 (eager): the weights cast once instead of by autocast at every window (bit-identical labels)
        cast_weights = amp_dtype is not None and device.type == "cpu" and compile is None
        if cast_weights:
            precision.cast_off_the_map(model, amp_dtype)
        choice = types.SimpleNamespace(roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode,
                                       mirror=mirror, checkpoint=path)
        settings = inference_settings(state, model, choice)
        _check_classes(getattr(model, "num_classes", None), plan, ckpt_path)
        if compile is not None:
            from ..engine.compile import COMPILE_MODES, compile_network

            if compile not in COMPILE_MODES:
                raise UserError(f"--compile: unknown mode {compile!r} ({', '.join(COMPILE_MODES)})")
            model = compile_network(model, inference=True, device=device, mode=compile,
                                    batch_size=settings["sw_batch_size"])
        elif cuda_graphs:
            from ..engine.cuda_graphs import graphed_network
            model = graphed_network(model, settings["sw_batch_size"])
        return cls(model, plan, settings, device=device, stitch_device=stitch, amp=amp_dtype,
                   weights="bf16" if cast_weights and amp_dtype == torch.bfloat16 else "float32", compile=compile,
                   cuda_graphs=bool(cuda_graphs), checkpoint=ckpt_path, metadata=state)

    # -- one scan -----------------------------------------------------------------------------------------------
    def predict(self, image, *, probabilities: bool = False, scratch=None, progress: Union[bool, str] = False):
        """Segment one scan.

        Args:
            image: a NIfTI file, a folder holding one DICOM series (or one NIfTI file), or a nibabel image (3D, or
                4D of one volume).
            probabilities: also return the class probabilities.
            scratch: a folder for the scan's temporary files (the scan decoded, the labels, the probabilities, the
                blending's parked sums; all unlinked at once), so that a long CT is not held in memory; None: in
                memory.
            progress: a progress bar over the windows (True, or a string: its description).

        Returns:
            a ``nib.Nifti1Image`` of label values in the input's geometry (its shape and affine; the dtype
            ``glam3d predict`` writes), voxel for voxel the file ``glam3d predict`` writes for this scan — or, with
            ``probabilities``, ``(labels, probs)``: ``probs`` a float32 ``(X, Y, Z, K)`` image (softmax per class,
            vector intent), what ``--probabilities`` writes.
        """
        from ..utils.nifti import nifti_header

        case = image_case(image)
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
    def predict_files(self, inputs, output_dir=None, *, overwrite: bool = False, probabilities: bool = False,
                      scratch=True, quiet: bool = False, world_size: Optional[int] = None,
                      rank: Optional[int] = None) -> FilesResult:
        """Segment scans into ``output_dir/<case>.nii.gz`` (what ``glam3d predict`` runs).

        Args:
            inputs: NIfTI files, folders of them, DICOM series folders (or a :class:`PredictionFiles` checked
                beforehand, which then also gives the output and scratch folders).
            output_dir: the folder of the label maps and ``predictions.json``.
            overwrite: replace existing outputs (default: keep them, reported as skipped; with ``probabilities``
                a missing probability map is still made, the label map kept).
            probabilities: also write ``<case>_probabilities.nii.gz`` (softmax per class, the input geometry).
            scratch: the folder of a scan's temporary files (True: ``output_dir``; None or False: in memory).
            quiet: no progress bars.
            world_size, rank: this process's shard of the cases (default: torchrun's ``WORLD_SIZE`` / ``RANK``).

        Problems found up front (unreadable headers, output = input, a bad scratch folder) raise
        :class:`~glam3d.errors.UserError` before anything is written; a scan that fails while being read or
        preprocessed is reported in one line on stderr and recorded as failed, the others are still written.
        Outputs are written atomically. Prints one line per case and a summary.
        """
        from ..utils.io import atomic_path, atomic_write_json, sweep_stale_temps
        from ..utils.nifti import write_volumes

        files = inputs if isinstance(inputs, PredictionFiles) else PredictionFiles.check(inputs, output_dir, scratch)
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
        manifest = self._manifest(probabilities, world)
        prev = read_manifest(out_dir / MANIFEST)

        out_dir.mkdir(parents=True, exist_ok=True)  # (also where scans are decoded to by default, see _prepare)
        for folder in {out_dir, scratch} - {None}:  # temporary files of a killed earlier run (live writers' kept)
            sweep_stale_temps(folder)
        result = FilesResult(out_dir, manifest=manifest)
        t_all = time.time()
        for i, case in enumerate(mine):
            out_path, prob_path = files.label_path(case), files.probability_path(case)
            entry = {"input": str(case.source), "output": str(out_path), "series_id": case.series_id}
            keep_labels = out_path.exists() and not overwrite
            want_probs = probabilities and (overwrite or not prob_path.exists())
            if keep_labels and not want_probs:
                old = prev.get("cases", {}).get(case.name, {})
                entry.update({"status": "skipped (exists)",
                              "checkpoint_sha256": old.get("checkpoint_sha256",
                                                           prev.get("checkpoint", {}).get("sha256"))})
                manifest["cases"][case.name] = entry
                result.cases.append(CaseResult(case.name, "skipped"))
                continue
            t0 = time.time()
            desc = None if quiet else f"[{i + 1}/{len(mine)}] {case.name}"
            try:
                seg = self._segment(case, pipeline, want_probs=want_probs, scratch=scratch, progress=desc or False)
            except _ScanError as err:  # this scan only: report it, go on with the others, exit 2 at the end
                print(f"error: {err.error}", file=sys.stderr)
                entry.update({"status": "failed", "error": str(err.error)})
                manifest["cases"][case.name] = entry
                result.cases.append(CaseResult(case.name, "failed", time.time() - t0, str(err.error)))
                continue
            image, meta = seg.image, seg.meta
            # the label map restored Z-slab by Z-slab and streamed into its NIfTI: never whole in memory
            dtype, slabs = pipeline.restored_label_slabs(seg.labels, meta, self.plan)
            seen: set = set()
            slabs = (seen.update(np.unique(s).tolist()) or s for s in slabs)
            if keep_labels:  # only the probabilities were missing: the existing label map stays untouched
                entry["note"] = "label map existed and was kept; probabilities added"
                for _ in slabs:  # (the values present in this prediction, for the manifest)
                    pass
            else:
                with atomic_path(out_path, suffix=".nii.gz") as tmp:
                    write_volumes(tmp, [slabs], None, image.shape[:3], image.affine, dtype)
            seg.labels = None
            del slabs
            if seg.probs is not None:
                probs = seg.probs.array if isinstance(seg.probs, ScratchArray) else seg.probs.cpu().numpy()
                seg.probs = None
                with atomic_path(prob_path, suffix=".nii.gz") as tmp:
                    write_volumes(tmp, pipeline.restored_probabilities(probs, meta, self.plan), probs.shape[0],
                                  image.shape[:3], image.affine, np.float32, intent="class probabilities")
                entry["probabilities"] = str(prob_path)
                del probs
            dt = time.time() - t0
            present = sorted(int(v) for v in seen if v != 0)
            entry.update({"status": "written", "seconds": round(dt, 2), "shape": list(image.shape[:3]),
                          "label_values_present": present, "checkpoint_sha256": manifest["checkpoint"]["sha256"]})
            manifest["cases"][case.name] = entry
            result.cases.append(CaseResult(case.name, "written", dt, f"labels {present}"))
            del seg, image

        write_manifest(out_dir, manifest, prev, world, rank, atomic_write_json)
        _print_summary(result.cases, time.time() - t_all, out_dir, world, rank)
        return result

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def sha256(self) -> Optional[str]:
        """The checkpoint file's sha256 (computed once), None without a checkpoint file."""
        if self._sha256 is None and self.checkpoint is not None:
            self._sha256 = sha256_file(self.checkpoint)
        return self._sha256

    def _manifest(self, probabilities: bool, world: int) -> dict:
        """The head of ``predictions.json``: the checkpoint, config, code version and inference settings."""
        from ..metrics.report import code_version

        state, stitch = self.metadata, self.stitch_device or self.device
        return {
            "format": FORMAT,
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "checkpoint": {"path": str(self.checkpoint.resolve()) if self.checkpoint else None, "sha256": self.sha256,
                           "model_spec": state.get("model_spec"), "epoch": state.get("epoch"),
                           "iteration": state.get("iteration"), "metrics": state.get("metrics")},
            "config": state.get("config"),
            "seed": _get(state.get("config") or {}, "train", "seed"),
            "code": code_version(),
            "labels": state.get("labels"),
            "label_values": (self.plan or {}).get("label_values"),
            "inference": {**self.settings, "device": str(self.device), "stitch_device": str(stitch),
                          "amp": AMP_NAMES[self.amp], "weights": self.weights, "probabilities": probabilities,
                          "world_size": world, "cuda_graphs": self.cuda_graphs, "compile": self.compile},
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
                self.model, x, s["roi_size"], overlap=s["overlap"], sw_batch_size=s["sw_batch_size"],
                mode=s["mode"], mirror=s["mirror"], device=self.device, amp=AMP_NAMES[self.amp],
                stitch_device=self.stitch_device, return_probs=want_probs, progress=progress, out=writer,
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

"""``glam3d predict``: segment new scans with a trained checkpoint, writing NIfTI label maps in each scan's geometry.

The checkpoint carries the preprocessing plan and the label values, so a user gives only the scans: NIfTI files,
folders of them, or DICOM series folders. Each scan is preprocessed exactly like the training data
(``preprocessing.pipeline.preprocess_scan``; lazily: rows are normalised and resampled as the sliding window
reads them), segmented by slab-streaming sliding windows
(:func:`glam3d.engine.inference.predict_volume`) and mapped back to the input's grid and label values
(``restored_label_slabs``: Z-slab by Z-slab, streamed into the NIfTI). ``predictions.json`` in the output folder
records the checkpoint's sha256, the config, code version and inference options (``glam3d evaluate`` copies it
into its report).

Under ``torchrun`` (``WORLD_SIZE > 1``) rank r takes cases r, r + world, … on GPU ``LOCAL_RANK``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import datetime as _dt
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError

EPILOG = """\
examples:
  glam3d predict --checkpoint runs/synapse/checkpoints/best.pt --input RawData/Testing/img --output preds/
  glam3d predict --checkpoint best.pt --input scan.nii.gz dicom_series/ --output preds/ --mirror --amp bf16
  torchrun --nproc_per_node 4 -m glam3d predict --checkpoint best.pt --input scans/ --output preds/
An existing output is kept (reported as skipped) unless --overwrite; outputs are written atomically.
Problems found up front (unreadable headers, a bad checkpoint, output = input) stop the run before anything is
written; a scan that fails while being read or preprocessed is reported in one line, the other scans are still
written, and the exit code is 2.
"""

MANIFEST = "predictions.json"


def add_parser(subparsers):
    p = subparsers.add_parser("predict", help="segment scans (NIfTI / DICOM) with a trained checkpoint",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="glam3d checkpoint (.pt)")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="NIfTI files, folders of NIfTI files, DICOM series folders")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for <case>.nii.gz label maps")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default: the checkpoint's validation setting, else 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default 2)")
    p.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="window size (default: the checkpoint's training crop)")
    p.add_argument("--mode", choices=("gaussian", "constant"), default=None, help="window blending (gaussian)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring test-time augmentation over all axes (8 passes; default: checkpoint's setting)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--stitch-device", default=None, metavar="DEVICE",
                   help="where windows are blended (default: --device); 'cpu' for scans too large for the GPU")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision (auto: bf16 on GPUs that support it, else fp16; float32 on CPU). bf16 "
                        "on a CPU with AVX512-BF16 or AMX runs the network 1.3-1.5x faster than float32 (labels "
                        "may differ at a few boundary voxels); fp16 is GPU-only")
    p.add_argument("--scratch", default=None, metavar="DIR",
                   help="folder for the temporary files of a scan, so that none is held in memory: the CT "
                        "decoded for reading (mapped, unlinked at once), the labels as the sliding window "
                        "finishes them, with --probabilities the class maps (mapped, unlinked at once), and "
                        "at overlap > 0 the blending's class sums that wait between two rows of windows (CPU "
                        "stitching; unlinked at once) (default: the output folder); 'none': keep them in memory")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <case>_probabilities.nii.gz (softmax per class, in the input geometry)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the network once (static shapes, CPU: frozen weights), then segment every "
                        "scan with it; meant for GPUs (on a small CPU compiling takes minutes and the forward is no "
                        "faster); MODE: default, reduce-overhead (CUDA graphs), max-autotune, "
                        "max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the network's forward once as a CUDA graph and replay it for every batch of "
                        "windows (no compiling; removes the host's per-kernel dispatch, which dominates at small "
                        "window batches: GLAM-nnFormer's sliding window 4.4x faster in bf16 on an H100). Default: on "
                        "when the network runs on a GPU (and --compile is not given); --no-cuda-graphs runs it eagerly")
    return p


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Case:
    name: str          # output stem
    source: Path       # file (NIfTI) or folder (DICOM)
    kind: str          # "nifti" | "dicom"
    series_id: Optional[str] = None
    files: list = field(default_factory=list)  # every file read (for the "never overwrite an input" check)


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")


def _nifti_stem(p: Path) -> str:
    for ext in (".nii.gz", ".nii"):
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return p.stem


def _dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader
    try:
        ids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    except RuntimeError:
        ids = ()
    return [(sid, list(reader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]


def collect_cases(inputs) -> list[Case]:
    """Expand the ``--input`` paths into cases (sorted within a folder, in argument order across them)."""
    cases: list[Case] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError("input not found", path)
        if path.is_file():
            if not _is_nifti(path):
                raise UserError("not a NIfTI file (.nii/.nii.gz); give DICOM series as their folder", path)
            cases.append(Case(_nifti_stem(path), path, "nifti", files=[path]))
            continue
        niftis = sorted(p for p in path.iterdir() if _is_nifti(p))
        if niftis:
            cases.extend(Case(_nifti_stem(p), p, "nifti", files=[p]) for p in niftis)
            continue
        found = _series_cases(path, path.name)
        if not found:  # a folder of series folders (one level)
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found.extend(_series_cases(sub, sub.name))
        if not found:
            raise UserError("no NIfTI files or DICOM series in this folder", path)
        cases.extend(found)
    names = {}
    for c in cases:
        if c.name in names and names[c.name] != c.source:
            raise UserError(f"two inputs would both be written as {c.name}.nii.gz ({names[c.name]} and "
                            f"{c.source}); predict them into different --output folders", c.source)
        names[c.name] = c.source
    seen, unique = set(), []
    for c in cases:  # the same file given twice is predicted once
        key = (str(c.source.resolve()), c.series_id)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def _series_cases(folder: Path, name: str) -> list[Case]:
    series = _dicom_series(folder)
    if len(series) == 1:
        return [Case(name, folder, "dicom", series[0][0], [Path(f) for f in series[0][1]])]
    return [Case(f"{name}_{i + 1}", folder, "dicom", sid, [Path(f) for f in files])
            for i, (sid, files) in enumerate(series)]


def read_dicom_series(folder: Path, series_id: Optional[str] = None):
    """A DICOM series as a ``nib.Nifti1Image``: SimpleITK's LPS geometry converted to RAS (x, y negated)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        files = (reader.GetGDCMSeriesFileNames(str(folder), series_id) if series_id
                 else reader.GetGDCMSeriesFileNames(str(folder)))
        reader.SetFileNames(files)
        img = reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise UserError(f"cannot read the DICOM series ({first[:200]})", folder) from None
    return sitk_to_nibabel(img)


def sitk_to_nibabel(img):
    """SimpleITK image (LPS world) → ``nib.Nifti1Image`` (RAS world) with the same voxels and geometry."""
    import nibabel as nib
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img)                     # (z, y, x) = (k, j, i)
    arr = np.transpose(arr, (2, 1, 0))                     # nibabel (i, j, k): a Fortran-ordered view, no copy
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    out = nib.Nifti1Image(arr, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def load_case(case: Case):
    import nibabel as nib

    if case.kind == "dicom":
        return read_dicom_series(case.source, case.series_id)
    try:
        img = nib.load(str(case.source))
        shape = img.shape
    except Exception as err:  # nibabel raises several types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read NIfTI ({first[:200]})", case.source) from None
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    elif len(shape) != 3:
        raise UserError(f"expected a 3D scan, got shape {shape}", case.source)
    return img


def _check_readable(case: Case) -> None:
    """Cheap up-front check (header only) so a bad input fails before any output is written."""
    if case.kind == "dicom":
        if not case.files:
            raise UserError("empty DICOM series", case.source)
        return
    import nibabel as nib

    try:
        img = nib.load(str(case.source))
        shape = img.shape
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read NIfTI ({first[:200]})", case.source) from None
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise UserError(f"expected a 3D scan, got shape {shape}", case.source)
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise UserError("the NIfTI header has no valid affine (orientation unknown)", case.source)
    check = getattr(_pipeline(), "check_stored_pixdims", None)
    if check is not None:
        check(case.source)


# ------------------------------------------------------------------------------------------------ checkpoint
def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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
    """Window size, overlap, blending, mirroring, batch: the CLI's choice, else the checkpoint's validation
    settings, else nnFormer's (0.5 overlap, Gaussian, no mirroring)."""
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


def _pipeline():
    """``preprocessing.pipeline`` (separate so tests can substitute a pipeline)."""
    try:
        from preprocessing import pipeline
    except ImportError as err:
        raise UserError(f"the preprocessing package is not available ({err})") from None
    return pipeline


def _resolve_device(name: str, local_rank: int):
    import torch

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


# ------------------------------------------------------------------------------------------------ run
def run(args) -> int:
    import torch

    from ..engine.checkpoint import checkpoint_metadata, load_checkpoint, model_from_checkpoint
    from ..engine.cuda_graphs import CudaGraphCaptureError
    from ..engine.inference import cpu_bf16_native, predict_volume, resolve_amp
    from ..metrics.report import code_version
    from ..utils.io import atomic_path, atomic_write_json, sweep_stale_temps
    from ..utils.nifti import write_volumes

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "-1") or -1) if world > 1 else -1
    if args.cuda_graphs and args.compile is not None:  # (only when asked for: the default yields to --compile)
        raise UserError("--cuda-graphs and --compile exclude each other (--compile reduce-overhead replays CUDA "
                        "graphs itself)")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("--output must be a folder", out_dir)

    # ---- everything that can be checked is checked before a single output is written
    cases = collect_cases(args.input)
    input_files = {p.resolve() for c in cases for p in c.files}
    input_dirs = {Path(p).resolve() for p in args.input if Path(p).is_dir()}
    if out_dir.resolve() in input_dirs:
        raise UserError("--output is one of the --input folders; write predictions to a separate folder", out_dir)
    scratch = out_dir if args.scratch is None else (None if args.scratch.lower() == "none" else Path(args.scratch))
    if scratch is not None and scratch != out_dir:
        if not scratch.is_dir():
            raise UserError("--scratch must be an existing folder (or 'none')", scratch)
        try:
            tempfile.TemporaryFile(dir=scratch).close()
        except OSError as err:
            raise UserError(f"--scratch: cannot write there ({err.strerror or err})", scratch) from None
    for c in cases:
        for suffix in (".nii.gz", "_probabilities.nii.gz"):
            target = (out_dir / f"{c.name}{suffix}").resolve()
            if target in input_files:
                raise UserError(f"refusing to write {target.name}: that file is an input", target)
    for c in cases:
        _check_readable(c)
    ckpt_path = Path(args.checkpoint)
    state = load_checkpoint(ckpt_path, mmap=True)
    plan = state.get("plan")
    if not plan:
        raise UserError("the checkpoint carries no preprocessing plan, so new scans cannot be prepared like its "
                        "training data (was it written by glam3d train?)", ckpt_path)
    pipeline = _pipeline()
    if args.probabilities and not hasattr(pipeline, "restored_probabilities"):
        raise UserError("--probabilities needs preprocessing.pipeline.restored_probabilities (mapping class "
                        "maps back to the scan's grid), which this installation lacks; run without it")
    device = _resolve_device(args.device, local_rank)
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device; the network runs on {device} (--device cuda)")
    if args.cuda_graphs is None:
        args.cuda_graphs = device.type == "cuda" and args.compile is None
    stitch = None
    if args.stitch_device:
        stitch = _resolve_device(args.stitch_device, local_rank)
    try:
        amp_dtype = resolve_amp(args.amp, device)
    except ValueError as err:
        raise UserError(f"--amp: {err}") from None
    if amp_dtype == torch.bfloat16 and device.type == "cpu" and not cpu_bf16_native() and rank == 0:
        print("warning: --amp bf16: this CPU has no native bf16 (AVX512-BF16 / AMX); bf16 is emulated and slower "
              "than float32 here", file=sys.stderr)
    # the network's weights are the mapped checkpoint's pages (assign): one copy of them while it is built
    model = model_from_checkpoint(state, ckpt_path, assign=True).to(device).eval()
    state = checkpoint_metadata(state)  # the loaded weights and optimiser state are not held during inference
    from .. import cpu_cache
    cpu_cache.empty_cache()  # the network's random initial weights, replaced by the checkpoint's: not kept cached,
    cpu_cache.reset_peak()   # nor counted in the peak that bounds what the cache may keep
    # CPU + bf16 (eager): the weights cast once instead of by autocast at every window (bit-identical labels)
    cast_weights = amp_dtype is not None and device.type == "cpu" and args.compile is None
    if cast_weights:
        _cast_off_the_map(model, amp_dtype)
    settings = inference_settings(state, model, args)
    in_ch = getattr(model, "in_channels", None)
    _check_classes(getattr(model, "num_classes", None), plan, ckpt_path)
    if args.compile is not None:
        from ..engine.compile import COMPILE_MODES, compile_network

        if args.compile not in COMPILE_MODES:
            raise UserError(f"--compile: unknown mode {args.compile!r} ({', '.join(COMPILE_MODES)})")
        model = compile_network(model, inference=True, device=device, mode=args.compile,
                                batch_size=settings["sw_batch_size"])
    elif args.cuda_graphs:
        from ..engine.cuda_graphs import graphed_network
        model = graphed_network(model, settings["sw_batch_size"])

    mine = cases[rank::world] if world > 1 else cases
    manifest = {
        "format": "glam3d-predictions-v1",
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "checkpoint": {"path": str(ckpt_path.resolve()), "sha256": sha256_file(ckpt_path),
                       "model_spec": state.get("model_spec"), "epoch": state.get("epoch"),
                       "iteration": state.get("iteration"), "metrics": state.get("metrics")},
        "config": state.get("config"),
        "seed": _get(state.get("config") or {}, "train", "seed"),
        "code": code_version(),
        "labels": state.get("labels"),
        "label_values": (plan or {}).get("label_values"),
        "inference": {**settings, "device": str(device), "stitch_device": str(stitch or device),
                      "amp": {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
                      "weights": "bf16" if cast_weights and amp_dtype == torch.bfloat16 else "float32",
                      "probabilities": args.probabilities, "world_size": world,
                      "cuda_graphs": bool(args.cuda_graphs), "compile": args.compile},
        "cases": {},
    }
    prev = _read_manifest(out_dir / MANIFEST)

    out_dir.mkdir(parents=True, exist_ok=True)  # (also where scans are decoded to by default, see _prepare)
    for folder in {out_dir, scratch} - {None}:  # temporary files of a killed earlier run (live writers' kept)
        sweep_stale_temps(folder)
    results = []
    t_all = time.time()
    for i, case in enumerate(mine):
        out_path = out_dir / f"{case.name}.nii.gz"
        prob_path = out_dir / f"{case.name}_probabilities.nii.gz"
        entry = {"input": str(case.source), "output": str(out_path), "series_id": case.series_id}
        keep_labels = out_path.exists() and not args.overwrite
        want_probs = args.probabilities and (args.overwrite or not prob_path.exists())
        if keep_labels and not want_probs:
            old = prev.get("cases", {}).get(case.name, {})
            entry.update({"status": "skipped (exists)",
                          "checkpoint_sha256": old.get("checkpoint_sha256", prev.get("checkpoint", {}).get("sha256"))})
            manifest["cases"][case.name] = entry
            results.append((case.name, "skipped", 0.0, ""))
            continue
        t0 = time.time()
        try:
            image, arr, meta = _prepare(case, pipeline, plan, spill_dir=scratch)
        except UserError as err:  # this scan only: report it, go on with the others, exit 2 at the end
            print(f"error: {err}", file=sys.stderr)
            entry.update({"status": "failed", "error": str(err)})
            manifest["cases"][case.name] = entry
            results.append((case.name, "failed", time.time() - t0, str(err)))
            continue
        # a LazyScan (rows normalised and resampled as the sliding window reads them) or, for B-spline plans,
        # the float32 array
        x = arr if isinstance(arr, pipeline.LazyScan) else torch.as_tensor(np.ascontiguousarray(arr),
                                                                           dtype=torch.float32)
        if in_ch is not None and x.shape[0] != in_ch:
            raise UserError(f"scan has {x.shape[0]} channels after preprocessing, the network expects {in_ch}",
                            case.source)
        desc = None if args.quiet else f"[{i + 1}/{len(mine)}] {case.name}"
        # the labels go to the scratch folder window row by window row (not held while the network runs)
        writer = _label_writer(scratch, case.name, x.shape[1:])
        try:
            out = predict_volume(model, x, settings["roi_size"], overlap=settings["overlap"],
                                 sw_batch_size=settings["sw_batch_size"], mode=settings["mode"],
                                 mirror=settings["mirror"], device=device, amp=args.amp, stitch_device=stitch,
                                 return_probs=want_probs, progress=desc or False, out=writer,
                                 probs_out=_probability_target(scratch, stitch or device) if want_probs else None,
                                 spill=scratch if (stitch or device).type == "cpu" else None)
        except BaseException as err:
            if writer is not None:
                writer.abort()  # its temporary file goes
            if isinstance(err, CudaGraphCaptureError):  # the network, not this scan: stop with one line
                raise UserError(str(err)) from None
            raise
        labels, probs = (out if want_probs else (out, None))
        del x, arr, out  # the scan as read (held by the LazyScan) is not needed to restore the labels
        labels = _finished_labels(labels)
        cpu_cache.empty_cache()  # the forwards' cached blocks: restoring (numpy) would come on top of them
        _check_geometry(meta, image, case)
        # the label map restored Z-slab by Z-slab and streamed into its NIfTI: never whole in memory
        dtype, slabs = pipeline.restored_label_slabs(labels, meta, plan)
        seen: set = set()
        slabs = (seen.update(np.unique(s).tolist()) or s for s in slabs)
        if keep_labels:  # only the probabilities were missing: the existing label map stays untouched
            entry["note"] = "label map existed and was kept; probabilities added"
            for _ in slabs:  # (the values present in this prediction, for the manifest)
                pass
        else:
            with atomic_path(out_path, suffix=".nii.gz") as tmp:
                write_volumes(tmp, [slabs], None, image.shape[:3], image.affine, dtype)
        del labels, slabs
        cpu_cache.empty_cache()
        if probs is not None:
            probs = probs.array if isinstance(probs, ScratchArray) else probs.cpu().numpy()
            with atomic_path(prob_path, suffix=".nii.gz") as tmp:
                write_volumes(tmp, pipeline.restored_probabilities(probs, meta, plan), probs.shape[0],
                              image.shape[:3], image.affine, np.float32, intent="class probabilities")
            entry["probabilities"] = str(prob_path)
            del probs
        dt = time.time() - t0
        present = sorted(int(v) for v in seen if v != 0)
        entry.update({"status": "written", "seconds": round(dt, 2), "shape": list(image.shape[:3]),
                      "label_values_present": present, "checkpoint_sha256": manifest["checkpoint"]["sha256"]})
        manifest["cases"][case.name] = entry
        results.append((case.name, "written", dt, f"labels {present}"))

    _write_manifest(out_dir, manifest, prev, world, rank, atomic_write_json)
    _print_summary(results, time.time() - t_all, out_dir, world, rank)
    return 2 if any(r[1] == "failed" for r in results) else 0


def _check_classes(num_classes: Optional[int], plan: dict, ckpt_path: Path) -> None:
    """UserError naming the checkpoint when its network predicts classes its plan cannot map back to label values
    (found up front, not after a scan's sliding window)."""
    known = [int(k) for k in (plan.get("label_values") or {})]
    top = max(known, default=0)
    if num_classes is not None and num_classes - 1 > top:
        raise UserError(f"the network predicts {num_classes} classes (training indices 0..{num_classes - 1}) but the "
                        f"preprocessing plan maps only 0..{top} back to label values; the checkpoint is inconsistent",
                        ckpt_path)


def _cast_off_the_map(model: torch.nn.Module, amp: torch.dtype) -> None:
    """CPU inference under ``amp`` autocast: the linear and convolution weights cast once
    (:func:`~glam3d.engine.inference.inference_weights`) and every other parameter and buffer (norms, bias
    tables: a few MB) copied, so that no tensor is left on the mapped checkpoint: the mapping and its float32
    pages go (Synapse-size nnFormer, bf16, 512 x 512 x 200 CT: peak 1.85 -> 1.29 GB)."""
    from ..engine.inference import inference_weights
    inference_weights(model, amp)
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dtype != amp:
            t.data = t.data.clone()


def _label_writer(scratch: Optional[Path], name: str, shape):
    """Where ``predict_volume`` writes a scan's labels: a ``.npy`` in ``scratch`` written one finished ``D``-range
    at a time (:class:`~glam3d.engine.inference.NpySlabWriter`), or None (a tensor in memory) without one."""
    import uuid

    from ..engine.inference import NpySlabWriter
    from ..utils.io import has_room
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


def _probability_target(scratch: Optional[Path], stitch):
    """``predict_volume``'s ``probs_out``: the ``(K, D, H, W)`` float32 probabilities go to a file in ``scratch``
    (:class:`ScratchArray`), or stay a tensor on ``stitch`` (the stitching device) without a scratch folder or
    room in it."""
    import torch

    from ..utils.io import has_room

    def make(shape):
        if scratch is not None:
            with contextlib.suppress(OSError):
                if has_room(scratch, math.prod(shape) * 4):
                    return ScratchArray(scratch, shape)
        return torch.empty(shape, dtype=torch.float32, device=stitch)
    return make


class ScratchArray:
    """A float32 array of ``shape`` in a file of ``folder`` that is unlinked as soon as it is mapped (nothing is
    left behind, even by a killed run): ``target[key] = value`` writes through the mapping, and about every
    32 MB of pages written they leave the process's resident memory (they stay in the page cache, dirty ones
    are written back), so a long CT's probabilities cost disk, not memory. ``np.asarray(target)`` is the mapped
    array."""

    RELEASE_BYTES = 32 << 20

    def __init__(self, folder, shape):
        fd, path = tempfile.mkstemp(dir=folder, prefix=".probabilities.", suffix=".f32")
        try:
            # the blocks reserved now: a disk filling up later would kill the process (SIGBUS) through the
            # mapping instead of failing here with an OSError (the caller then keeps the maps in memory)
            nbytes = math.prod(shape) * 4
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
            self.array = np.memmap(path, dtype=np.float32, mode="r+", shape=tuple(shape))
        finally:
            os.close(fd)
            os.unlink(path)
        self.shape, self.ndim, self._since = tuple(shape), len(shape), 0

    def __setitem__(self, key, value):
        value = np.asarray(value)
        if isinstance(key, tuple) and key and key[0] == slice(None) and value.ndim == self.ndim:
            for k in range(value.shape[0]):  # one leading index (a class) at a time: pages released in between
                self._write((k,) + key[1:], value[k])
        else:
            self._write(key, value)

    def _write(self, key, value):
        self.array[key] = value
        # the pages touched: a part of a row of the last axis faults in the pages under it; count whole rows
        rows = value.size // value.shape[-1] if value.ndim and value.shape[-1] else 1
        self._since += rows * self.shape[-1] * 4
        if self._since >= self.RELEASE_BYTES:
            release = getattr(_pipeline(), "release_pages", None)
            if release is not None:
                release(self.array)
            self._since = 0

    def __getitem__(self, key):
        return self.array[key]

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self.array, dtype=dtype)
        return self.array if dtype is None else self.array.astype(dtype)


def _check_geometry(meta: dict, image, case: Case) -> None:
    """The restoring must give back the input's grid exactly (a broken pipeline must not write misplaced labels
    silently): the grid the preprocessing recorded in ``meta`` is the input's."""
    shape, affine = tuple(meta["original_shape"]), np.asarray(meta["original_affine"], float)
    if shape != tuple(image.shape[:3]) or not np.allclose(affine, image.affine, atol=1e-4):
        raise UserError(f"internal error: the restored segmentation {shape} does not match the input "
                        f"grid {tuple(image.shape)} / affine", case.source)


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _write_manifest(out_dir: Path, manifest: dict, prev: dict, world: int, rank: int, writer) -> None:
    """Merge with the previous manifest's cases (kept outputs stay described) and write it. Multi-rank runs:
    each rank writes ``predictions.rank<r>.json``; the rank that finds all of them merges ``predictions.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # several predict processes may share the folder: read-merge-write under an exclusive lock, re-reading the
    # manifest inside it so no process drops cases another one recorded meanwhile
    with _locked(out_dir):
        prev = _read_manifest(out_dir / MANIFEST) or prev
        if world <= 1:
            cases = dict(prev.get("cases", {}))
            cases.update(manifest["cases"])
            writer(out_dir / MANIFEST, {**manifest, "cases": cases})
            return
        writer(out_dir / f"predictions.rank{rank}.json", manifest)
        parts = [out_dir / f"predictions.rank{r}.json" for r in range(world)]
        if all(p.is_file() for p in parts):
            cases = dict(prev.get("cases", {}))
            for p in parts:
                cases.update(_read_manifest(p).get("cases", {}))
            writer(out_dir / MANIFEST, {**manifest, "cases": cases})


@contextlib.contextmanager
def _locked(folder: Path):
    """Exclusive ``fcntl.flock`` on the folder itself (no lock file is left behind; a no-op where flock is
    unavailable)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - Windows
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _print_summary(results, seconds, out_dir, world, rank) -> None:
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    written = [r for r in results if r[1] == "written"]
    skipped = [r for r in results if r[1] == "skipped"]
    failed = [r for r in results if r[1] == "failed"]
    for name, status, dt, note in results:
        extra = {"written": f"{dt:6.1f}s  {note}", "skipped": "output exists, kept (use --overwrite)",
                 "failed": "see the error above"}[status]
        print(f"{tag}{name:<28} {status:<8} {extra}")
    print(f"{tag}{len(written)} written, {len(skipped)} skipped, "
          + (f"{len(failed)} failed, " if failed else "")
          + f"{len(results)} cases in {seconds:.1f}s -> {out_dir}", file=sys.stdout)

"""A catalogue of bad inputs across ``glam3d-preprocess``, ``glam3d train``, ``glam3d predict``, ``glam3d evaluate``.

One row per case. Every row must hold the same contract:

* the exit code is non-zero (2);
* stderr is exactly one line, ``error: …``, naming the file and the problem (no traceback without ``--debug``);
* no partial output is left: no ``*.tmp*`` file, and every output file that exists is complete (loads);
* the other cases of the same run finished (``others="done"``), or — for problems that refuse the whole run up
  front — nothing was written (``others="none"``).

The CLIs run in-process through their ``main(argv)`` (fast); ``test_real_exit_codes`` runs a few rows through
``python -m`` to prove the real process exit codes, and ``test_debug_shows_traceback`` checks ``--debug``.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import nibabel as nib
import numpy as np
import pytest
import torch

import helpers as H
from glam3d import cli as glam3d_cli
from preprocessing import cli as pre_cli


@dataclass
class Row:
    argv: list                       # CLI arguments (without the program name)
    tool: str                        # "pre" (glam3d-preprocess) or "glam3d"
    names: str                       # the file/folder the error line must name
    problem: str                     # regex the error line must match
    outputs: list                    # folders whose files must be complete (no *.tmp*, all loadable)
    others: str = "done"             # "done": the good cases were written; "none": nothing written
    good: list = field(default_factory=list)   # output files the good cases must have produced
    setup: Optional[Callable] = None  # called with monkeypatch (e.g. to make a tiny network importable)
    inputs_inside: list = field(default_factory=list)  # input files that live in an output folder (not checked)


# ------------------------------------------------------------------------------------------------ preprocess
def unwritable(tmp: Path):
    """``(output path that cannot be created, what the error names, problem regex)``: inside a read-only folder
    (chmod 0o555) — except as root, who ignores permissions: then below a regular file (where a folder should be)."""
    import os

    if os.geteuid() != 0:
        ro = tmp / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "out", ro, r"Permission denied"
    blocker = tmp / "blocker"
    blocker.write_text("a file where a folder should be\n")
    return blocker / "out", blocker, r"Not a directory|must be a folder"


def _pre_base(tmp: Path, bad_id="0006"):
    """raw BTCV folder with one good training case (0005); the row breaks case ``bad_id``."""
    raw = tmp / "raw"
    H.tiny_case(raw, "0005")
    img, lab = H.tiny_case(raw, bad_id)
    return raw, img, lab


def _pre_row(tmp, raw, names, problem, others="done", extra=()):
    out = tmp / "out"
    good = [out / "cases" / "0005.npz"] if others == "done" else []
    return Row(["synapse", "--raw", str(raw), "--out", str(out), "--quiet", *extra], "pre", str(names), problem,
               [out], others, good)


def pre_truncated_nifti(tmp):
    raw, img, _ = _pre_base(tmp)
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    return _pre_row(tmp, raw, img, r"cannot read the voxel data|not a readable NIfTI")


def pre_corrupt_nifti(tmp):
    raw, img, _ = _pre_base(tmp)
    img.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return _pre_row(tmp, raw, img, r"not a readable NIfTI")


def pre_zero_size_image(tmp):
    raw, img, _ = _pre_base(tmp)
    img.write_bytes(b"")
    return _pre_row(tmp, raw, img, r"not a readable NIfTI")


def pre_zero_size_label(tmp):
    raw, _, lab = _pre_base(tmp)
    lab.write_bytes(b"")
    return _pre_row(tmp, raw, lab, r"not a readable NIfTI")


def _pre_non_finite(tmp, value, where):
    raw, img, _ = _pre_base(tmp)
    d = np.full(H.SHAPE, 40.0, np.float32)
    d[where] = value
    H.save_nii(d, img)
    return _pre_row(tmp, raw, img, r"NaN/inf")


def pre_nan_voxels(tmp):
    return _pre_non_finite(tmp, np.nan, (3, 3, 3))


def pre_inf_voxels(tmp):
    return _pre_non_finite(tmp, np.inf, (1, 2, 3))


def pre_4d_image(tmp):
    raw, img, _ = _pre_base(tmp)
    H.save_nii(np.zeros(H.SHAPE + (2,), np.int16), img)
    return _pre_row(tmp, raw, img, r"expected a 3D image")


def pre_2d_image(tmp):
    raw, img, _ = _pre_base(tmp)
    H.save_nii(np.zeros(H.SHAPE[:2], np.int16), img)
    return _pre_row(tmp, raw, img, r"expected a 3D image|shape")


def zero_pixdim(path: Path, axis: int):
    """Rewrite a NIfTI so voxel axis ``axis`` has pixdim 0 and no sform/qform, as some broken converters write
    (nibabel will not save such a header itself: the bytes are written here)."""
    import gzip

    x = nib.load(str(path))
    data = np.asanyarray(x.dataobj)
    hdr = x.header.copy()
    hdr["qform_code"] = 0
    hdr["sform_code"] = 0
    hdr["pixdim"][1 + axis] = 0.0
    hdr["vox_offset"] = 352
    blob = hdr.binaryblock + b"\0" * 4 + np.asarray(data, hdr.get_data_dtype()).tobytes(order="F")
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(blob)
    return path


def pre_zero_spacing(tmp):
    raw, img, lab = _pre_base(tmp)
    for p in (img, lab):
        zero_pixdim(p, 1)
    return _pre_row(tmp, raw, img, r"voxel size \(pixdim\) is 2 x 0 x 3 mm")


def pre_absurd_spacing(tmp):
    raw, img, lab = _pre_base(tmp)
    aff = np.diag([1e6, 1e6, 3.0, 1.0])
    for p in (img, lab):
        x = nib.load(str(p))
        H.save_nii(np.asanyarray(x.dataobj), p, aff)
    return _pre_row(tmp, raw, img, r"implausible voxel size")


def pre_label_out_of_range(tmp):
    raw, _, lab = _pre_base(tmp)
    H.tiny_case(raw, "0006", labels=(1, 20))
    return _pre_row(tmp, raw, lab, r"label values 20 are not in the declared set")


def pre_label_negative(tmp):
    raw, _, lab = _pre_base(tmp)
    d = np.zeros(H.SHAPE, np.int16)
    d[4:6, 4:6, 2:4] = -3
    H.save_nii(d, lab)
    return _pre_row(tmp, raw, lab, r"label values -3 are not in the declared set")


def pre_label_not_integer(tmp):
    raw, _, lab = _pre_base(tmp)
    d = np.zeros(H.SHAPE, np.float32)
    d[4:6, 4:6, 2:4] = 1.5
    H.save_nii(d, lab)
    return _pre_row(tmp, raw, lab, r"non-integer")


def pre_label_shape_mismatch(tmp):
    raw, _, lab = _pre_base(tmp)
    H.save_nii(np.zeros((12, 10, 7), np.uint8), lab)
    return _pre_row(tmp, raw, lab, r"does not match the image")


def pre_label_affine_mismatch(tmp):
    raw, _, lab = _pre_base(tmp)
    aff = H.AFFINE.copy()
    aff[0, 3] = 5.0
    H.save_nii(np.zeros(H.SHAPE, np.uint8), lab, aff)
    return _pre_row(tmp, raw, lab, r"affine differs")


def pre_output_inside_input(tmp):
    raw, _, _ = _pre_base(tmp)
    out = raw / "preprocessed"
    return Row(["synapse", "--raw", str(raw), "--out", str(out), "--quiet"], "pre", str(raw),
               r"inside the input folder", [out], "none")


def pre_output_unwritable(tmp):
    raw, _, _ = _pre_base(tmp)
    out, names, problem = unwritable(tmp)
    return Row(["synapse", "--raw", str(raw), "--out", str(out), "--quiet"], "pre", str(names), problem,
               [tmp / "raw"], "none")


def pre_msd_bad_json(tmp):
    ds = tmp / "msd"
    H.save_nii(np.zeros(H.SHAPE, np.int16), ds / "imagesTr" / "a.nii.gz")
    (ds / "dataset.json").write_text('{"labels": {"0": "background",')
    out = tmp / "out"
    return Row(["msd", "--dataset", str(ds), "--out", str(out), "--quiet"], "pre", str(ds / "dataset.json"),
               r"not valid JSON", [out], "none")


# ------------------------------------------------------------------------------------------------ train
def _tinynet(mods):
    def setup(monkeypatch):
        monkeypatch.syspath_prepend(str(mods))
        sys.modules.pop("glam3d_tinynet", None)
    return setup


def _train_row(tmp, extra, names, problem, cfg_path=None, run=None):
    cfg, data, mods = H.train_setup(tmp)
    run = run or tmp / "run"
    return Row(["train", str(cfg_path or cfg), "--out", str(run), "--no-progress", *extra], "glam3d", str(names),
               problem, [run], "none", setup=_tinynet(mods))


def train_unknown_config_key(tmp):
    cfg, _, _ = H.train_setup(tmp)
    text = cfg.read_text().replace("optim:\n", "optim:\n  lerning_rate: 0.1\n")
    bad = tmp / "bad.yaml"
    bad.write_text(text)
    return _train_row(tmp, [], bad, r"unknown config key 'optim.lerning_rate'", cfg_path=bad)


def train_config_not_yaml(tmp):
    bad = tmp / "bad.yaml"
    bad.write_text("model: [unclosed\n  name: x: y\n")
    return _train_row(tmp, [], bad, r"YAML|yaml|parse|mapping", cfg_path=bad)


def train_data_not_preprocessed(tmp):
    empty = tmp / "empty"
    empty.mkdir()
    return _train_row(tmp, ["--data", str(empty)], empty, r"no dataset.json")


def train_labels_out_of_range(tmp):
    row = _train_row(tmp, [], tmp / "data" / "dataset.json", r"label value 7")
    case = tmp / "data" / "cases" / "case01.npz"
    z = dict(np.load(case))
    z["label"] = z["label"].copy()
    z["label"][0, 0, 0] = 7
    np.savez_compressed(case, **z)
    return row


def train_resume_truncated_checkpoint(tmp):
    from glam3d.utils.ownership import claim

    run = tmp / "run"
    claim(run, "training-run").record("checkpoints/")  # a glam3d run folder (its marker), whose last.pt is cut short
    (run / "checkpoints").mkdir(parents=True)
    ck = H.predict_checkpoint(run / "checkpoints" / "last.pt")
    ck.write_bytes(ck.read_bytes()[:1000])
    row = _train_row(tmp, ["--resume"], ck, r"truncated/corrupt", run=run)
    row.inputs_inside = [ck]
    return row


def train_init_other_architecture(tmp):
    ck = H.predict_checkpoint(tmp / "other.pt")  # an nnFormer; the config trains TinyNet
    return _train_row(tmp, ["--override", f"model.init_checkpoint={ck}"], ck, r"do not fit the network")


def train_init_not_a_checkpoint(tmp):
    ck = tmp / "notes.pt"
    ck.write_text("these are my notes, not weights\n" * 20)
    return _train_row(tmp, ["--override", f"model.init_checkpoint={ck}"], ck, r"not a checkpoint|corrupt")


def train_output_unwritable(tmp):
    out, names, problem = unwritable(tmp)
    return _train_row(tmp, [], names, problem, run=out)


# ------------------------------------------------------------------------------------------------ predict
def _predict_row(tmp, inputs, names, problem, others="done", good=(), ckpt=None, out=None, extra=()):
    ckpt = ckpt or H.predict_checkpoint(tmp / "ck.pt")
    out = out or tmp / "pred"
    return Row(["predict", "--checkpoint", str(ckpt), "--input", *map(str, inputs), "--output", str(out),
                "--quiet", "--device", "cpu", *extra], "glam3d", str(names), problem, [out], others,
               [out / g for g in good])


def _scans(tmp, n=2):
    return H.write_scans(tmp / "scans", n)


def predict_ckpt_not_a_checkpoint(tmp):
    _scans(tmp)
    ck = tmp / "notes.pt"
    ck.write_text("not a checkpoint\n" * 50)
    return _predict_row(tmp, [tmp / "scans"], ck, r"not a checkpoint|corrupt", "none", ckpt=ck)


def predict_ckpt_truncated(tmp):
    _scans(tmp)
    ck = H.predict_checkpoint(tmp / "ck.pt")
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    return _predict_row(tmp, [tmp / "scans"], ck, r"truncated/corrupt", "none", ckpt=ck)


def predict_ckpt_zero_size(tmp):
    _scans(tmp)
    ck = tmp / "empty.pt"
    ck.write_bytes(b"")
    return _predict_row(tmp, [tmp / "scans"], ck, r"empty", "none", ckpt=ck)


def predict_ckpt_other_architecture(tmp):
    from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint
    from glam3d.models import build_model

    _scans(tmp)
    state = load_checkpoint(H.predict_checkpoint(tmp / "ck.pt"))
    wider = dict(H.TINY_NET["kwargs"], embed_dim=24)
    state["model"] = build_model(H.TINY_NET["name"], **wider).state_dict()  # weights of another nnFormer size
    save_checkpoint(tmp / "other.pt", state)
    return _predict_row(tmp, [tmp / "scans"], tmp / "other.pt", r"do not fit the network", "none",
                        ckpt=tmp / "other.pt")


def predict_corrupt_nifti(tmp):
    _scans(tmp)
    bad = tmp / "scans" / "s9.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    return _predict_row(tmp, [tmp / "scans"], bad, r"cannot read NIfTI", "none")


def predict_zero_size_nifti(tmp):
    _scans(tmp)
    bad = tmp / "scans" / "s9.nii"
    bad.write_bytes(b"")
    return _predict_row(tmp, [tmp / "scans"], bad, r"cannot read NIfTI", "none")


def predict_nan_voxels(tmp):
    _scans(tmp)
    d = H.scan()
    d[4, 4, 4] = np.nan
    bad = H.save_nii(d, tmp / "scans" / "s9.nii.gz")
    return _predict_row(tmp, [tmp / "scans"], bad, r"NaN/inf", good=["s0.nii.gz", "s1.nii.gz"])


def predict_wrong_dimensionality(tmp):
    _scans(tmp)
    bad = H.save_nii(np.zeros((24, 20, 12, 3), np.float32), tmp / "scans" / "s9.nii.gz")
    return _predict_row(tmp, [tmp / "scans"], bad, r"expected a 3D scan", "none")


def predict_zero_spacing(tmp):
    _scans(tmp)
    bad = zero_pixdim(H.save_nii(H.scan(), tmp / "scans" / "s9.nii.gz"), 2)
    return _predict_row(tmp, [tmp / "scans"], bad, r"voxel size \(pixdim\) is 2 x 2 x 0 mm", "none")


def predict_absurd_spacing(tmp):
    _scans(tmp)
    bad = H.save_nii(H.scan(), tmp / "scans" / "s9.nii.gz", np.diag([1e6, 2.0, 3.0, 1.0]))
    return _predict_row(tmp, [tmp / "scans"], bad, r"implausible voxel size", good=["s0.nii.gz", "s1.nii.gz"])


def _dicom_series(folder: Path, uid: str, sizes, spacing=(0.9, 0.8, 2.5)):
    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, (h, w) in enumerate(sizes):
        arr = np.full((h, w), 40, np.int16)
        arr[2:-2, 2:-2] = 150
        sl = sitk.GetImageFromArray(arr)
        sl.SetSpacing(spacing[:2])
        for tag, val in (("0010|0010", "Phantom"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                         ("0008|0060", "CT"), ("0020|0013", str(k + 1)),
                         ("0020|0032", f"0\\0\\{k * spacing[2]}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                         ("0028|0030", f"{spacing[1]}\\{spacing[0]}"), ("0018|0050", str(spacing[2]))):
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        with H.keep_locale():
            writer.Execute(sl)


def predict_dicom_mixed_series(tmp):
    folder = tmp / "dicom" / "mixed"
    folder.mkdir(parents=True)
    _dicom_series(folder, "1.2.826.0.1.3680043.2.1125.7.101", [(20, 24)] * 6)          # a good series
    _dicom_series(folder, "1.2.826.0.1.3680043.2.1125.7.202", [(20, 24)] * 3 + [(16, 16)] * 3)  # slices disagree
    return _predict_row(tmp, [folder], folder, r"cannot read the DICOM series", good=["mixed_1.nii.gz"])


def predict_output_is_input(tmp):
    _scans(tmp)
    row = _predict_row(tmp, [tmp / "scans"], tmp / "scans", r"input", "none", out=tmp / "scans")
    row.inputs_inside = sorted((tmp / "scans").iterdir())
    return row


def predict_output_unwritable(tmp):
    _scans(tmp)
    out, names, problem = unwritable(tmp)
    return _predict_row(tmp, [tmp / "scans"], names, problem, "none", out=out)


def predict_not_nifti_file(tmp):
    _scans(tmp)
    bad = tmp / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n")
    return _predict_row(tmp, [tmp / "scans" / "s0.nii.gz", bad], bad, r"not a NIfTI file", "none")


# ------------------------------------------------------------------------------------------------ evaluate
def _truth(shape=(16, 14, 8)):
    g = np.zeros(shape, np.uint8)
    g[2:8, 2:8, 1:6] = 6
    g[9:14, 8:12, 2:7] = 1
    return g


def _eval_base(tmp):
    gt, pr = tmp / "gt", tmp / "pred"
    for i in (1, 2):
        H.save_nii(_truth(), gt / f"label000{i}.nii.gz")
        H.save_nii(_truth(), pr / f"img000{i}.nii.gz")
    return gt, pr


def _eval_row(tmp, names, problem, out=None):
    gt, pr = tmp / "gt", tmp / "pred"
    out = out or tmp / "report"
    return Row(["evaluate", "--pred", str(pr), "--gt", str(gt), "--labels", "synapse", "--out", str(out),
                "--quiet"], "glam3d", str(names), problem, [out], "none")


def evaluate_corrupt_prediction(tmp):
    _, pr = _eval_base(tmp)
    (pr / "img0002.nii.gz").write_bytes(b"\x1f\x8b" + b"x" * 300)
    return _eval_row(tmp, pr / "img0002.nii.gz", r"cannot read")


def evaluate_zero_size_truth(tmp):
    gt, _ = _eval_base(tmp)
    (gt / "label0001.nii.gz").write_bytes(b"")
    return _eval_row(tmp, gt / "label0001.nii.gz", r"cannot read")


def evaluate_shape_mismatch(tmp):
    _, pr = _eval_base(tmp)
    H.save_nii(_truth((16, 14, 9)), pr / "img0002.nii.gz")
    return _eval_row(tmp, "img0002.nii.gz", r"has shape")


def evaluate_geometry_mismatch(tmp):
    _, pr = _eval_base(tmp)
    aff = H.AFFINE.copy()
    aff[:3, 3] = [10.0, 0, 0]
    H.save_nii(_truth(), pr / "img0002.nii.gz", aff)
    return _eval_row(tmp, "img0002.nii.gz", r"differ in")


def evaluate_non_integer_labels(tmp):
    gt, _ = _eval_base(tmp)
    H.save_nii(_truth().astype(np.float32) * 0.5, gt / "label0002.nii.gz")
    return _eval_row(tmp, gt / "label0002.nii.gz", r"non-integer")


def evaluate_missing_prediction(tmp):
    _, pr = _eval_base(tmp)
    (pr / "img0002.nii.gz").unlink()
    return _eval_row(tmp, pr, r"no prediction for truth label0002")


def evaluate_4d_prediction(tmp):
    _, pr = _eval_base(tmp)
    H.save_nii(np.zeros((16, 14, 8, 2), np.uint8), pr / "img0001.nii.gz")
    return _eval_row(tmp, pr / "img0001.nii.gz", r"not a 3D label map")


def evaluate_corrupt_manifest(tmp):
    _, pr = _eval_base(tmp)
    (pr / "predictions.json").write_text('{"checkpoint": ')
    return Row(["evaluate", "--pred", str(pr), "--gt", str(tmp / "gt"), "--out", str(tmp / "report"), "--quiet"],
               "glam3d", str(pr / "predictions.json"), r"cannot read the predictions manifest", [tmp / "report"],
               "none")


def evaluate_output_unwritable(tmp):
    _eval_base(tmp)
    out, names, problem = unwritable(tmp)
    return _eval_row(tmp, names, problem, out=out)


CATALOGUE = {f.__name__: f for f in [
    pre_truncated_nifti, pre_corrupt_nifti, pre_zero_size_image, pre_zero_size_label, pre_nan_voxels,
    pre_inf_voxels, pre_4d_image, pre_2d_image, pre_zero_spacing, pre_absurd_spacing, pre_label_out_of_range,
    pre_label_negative, pre_label_not_integer, pre_label_shape_mismatch, pre_label_affine_mismatch,
    pre_output_inside_input, pre_output_unwritable, pre_msd_bad_json,
    train_unknown_config_key, train_config_not_yaml, train_data_not_preprocessed, train_labels_out_of_range,
    train_resume_truncated_checkpoint, train_init_other_architecture, train_init_not_a_checkpoint,
    train_output_unwritable,
    predict_ckpt_not_a_checkpoint, predict_ckpt_truncated, predict_ckpt_zero_size, predict_ckpt_other_architecture,
    predict_corrupt_nifti, predict_zero_size_nifti, predict_nan_voxels, predict_wrong_dimensionality,
    predict_zero_spacing, predict_absurd_spacing, predict_dicom_mixed_series, predict_output_is_input,
    predict_output_unwritable, predict_not_nifti_file,
    evaluate_corrupt_prediction, evaluate_zero_size_truth, evaluate_shape_mismatch, evaluate_geometry_mismatch,
    evaluate_non_integer_labels, evaluate_missing_prediction, evaluate_4d_prediction, evaluate_corrupt_manifest,
    evaluate_output_unwritable,
]}


# ------------------------------------------------------------------------------------------------ checked before
# heavy work: configs (bounded YAML, window sizes, iteration counts, networks beyond the machine) and checkpoints
# (NaN/inf weights, networks beyond the machine, pickle-memo bombs); each refused in well under a second, before
# any network is built (test_refused_before_heavy_work)
def _train_overrides(tmp, overrides, problem):
    extra = [a for o in overrides for a in ("--override", o)]
    return _train_row(tmp, extra, tmp / "tiny.yaml", problem)


def train_config_empty(tmp):
    bad = tmp / "empty.yaml"
    bad.write_text("# nothing here yet\n")
    return _train_row(tmp, [], bad, r"config file is empty", cfg_path=bad)


def train_config_alias_bomb(tmp):
    bad = tmp / "bomb.yaml"
    lines = ["base: tiny.yaml", "l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]  # 10^10 lols
    bad.write_text("\n".join(lines) + "\nmodel:\n  overrides: {x: *l9}\n")
    return _train_row(tmp, [], bad, r"YAML aliases expand to more than 100,000 values", cfg_path=bad)


def train_roi_zero(tmp):
    return _train_overrides(tmp, ["data.roi_size=[0,16,16]"], r"'data.roi_size' must be 3 positive sizes")


def train_roi_absurd(tmp):
    return _train_overrides(tmp, ["data.roi_size=[16,16,100000]"], r"'data.roi_size' .* far larger than any scan")


def train_roi_not_divisible(tmp):
    return _train_overrides(tmp, ["model.name=nnformer_tiny", "data.roi_size=[24,32,32]"],
                            r"'data.roi_size' \[24, 32, 32\] must be divisible by the network's \(16, 32, 32\)")


def train_absurd_iterations(tmp):
    return _train_row(tmp, ["--epochs", "1000000000"], tmp / "tiny.yaml",
                      r"'train.epochs' x train.iters_per_epoch is 2,000,000,000 iterations")


def train_negative_save_every(tmp):
    return _train_overrides(tmp, ["train.save_every_iters=-5"], r"'train.save_every_iters' must be in 0..")


def train_non_finite_lr(tmp):
    return _train_overrides(tmp, ["optim.lr=.inf"], r"'optim.lr' must be a finite number")


def train_network_beyond_memory(tmp):
    return _train_overrides(tmp, ["model.name=nnformer_tiny", "model.overrides.embed_dim=65536",
                                  "data.roi_size=[16,32,32]"],
                            r"needs [\d.]+ TiB for its weights, gradients and adamw state alone, but this machine "
                            r"has [\d.]+ \w+ of memory")


def predict_ckpt_non_finite_weights(tmp):
    _scans(tmp)
    from glam3d.engine.checkpoint import load_checkpoint

    state = load_checkpoint(H.predict_checkpoint(tmp / "ck.pt"))
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 4)
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))  # a diverged run's weights
    bad = tmp / "diverged.pt"
    torch.save(state, bad)  # written around save_checkpoint (which refuses them)
    return _predict_row(tmp, [tmp / "scans"], bad, r"weights hold NaN/inf .* diverged training run", "none",
                        ckpt=bad)


def predict_ckpt_network_beyond_memory(tmp):
    _scans(tmp)
    from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(H.predict_checkpoint(tmp / "ck.pt"))
    state["model_spec"] = {"name": H.TINY_NET["name"], "kwargs": dict(H.TINY_NET["kwargs"], embed_dim=65536)}
    save_checkpoint(tmp / "huge.pt", state)
    return _predict_row(tmp, [tmp / "scans"], tmp / "huge.pt",
                        r"network recorded in the checkpoint .* needs [\d.]+ TiB for its weights alone, but this "
                        r"machine has", "none", ckpt=tmp / "huge.pt")


def predict_ckpt_pickle_bomb(tmp):
    _scans(tmp)
    from glam3d.engine.checkpoint import load_checkpoint

    state = load_checkpoint(H.predict_checkpoint(tmp / "ck.pt"))
    bomb = ["lol"] * 10
    for _ in range(8):
        bomb = [bomb] * 10  # 10^9 strings through the pickle's shared references
    state["labels"] = bomb
    bad = tmp / "bomb.pt"
    torch.save(state, bad)
    return _predict_row(tmp, [tmp / "scans"], bad, r"expands to more than 1,000,000 values", "none", ckpt=bad)


BEFORE_HEAVY_WORK = [
    train_config_empty, train_config_alias_bomb, train_roi_zero, train_roi_absurd, train_roi_not_divisible,
    train_absurd_iterations, train_negative_save_every, train_non_finite_lr, train_network_beyond_memory,
    predict_ckpt_non_finite_weights, predict_ckpt_network_beyond_memory, predict_ckpt_pickle_bomb,
]
CATALOGUE.update({f.__name__: f for f in BEFORE_HEAVY_WORK})


# ================================================================================================================
# data side: nnU-Net v2 / MSD dataset.json fields, image geometry and voxel types, links, output folders glam3d
# does not own, preprocessed cases that are not finite or point outside their folder
# ================================================================================================================
def _bad_affine_case(tmp, affine=None, header=None):
    """The ``_pre_base`` dataset with case 0006's image and label rewritten on a broken geometry."""
    raw, img, lab = _pre_base(tmp)
    for p, dtype in ((img, np.int16), (lab, np.uint8)):
        data = np.asanyarray(nib.load(str(p)).dataobj).astype(dtype)
        if header is not None:
            hdr = header(dtype)
            nib.Nifti1Image(data, None, header=hdr).to_filename(str(p))
        else:
            nib.Nifti1Image(data, affine).to_filename(str(p))
    return raw, img


def pre_degenerate_affine(tmp):
    aff = H.AFFINE.copy()
    aff[:3, 1] = aff[:3, 0]                        # two voxel axes along the same direction: rank 2
    raw, img = _bad_affine_case(tmp, aff)
    return _pre_row(tmp, raw, img, r"affine is degenerate")


def pre_nan_affine(tmp):
    def header(dtype):
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(H.SHAPE)
        hdr.set_data_dtype(dtype)
        hdr["sform_code"], hdr["qform_code"] = 1, 0
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [np.nan, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]
        hdr["pixdim"][1:4] = [2, 2, 3]
        return hdr
    raw, img = _bad_affine_case(tmp, header=header)
    return _pre_row(tmp, raw, img, r"non-finite \(NaN/inf\) affine")


def pre_complex_voxels(tmp):
    raw, img, _ = _pre_base(tmp)
    H.save_nii(np.full(H.SHAPE, 40 + 3j, np.complex64), img)
    return _pre_row(tmp, raw, img, r"complex voxel type")


def pre_symlink_loop_image(tmp):
    raw, img, _ = _pre_base(tmp)
    img.unlink()
    img.symlink_to(img)
    return _pre_row(tmp, raw, img, r"symbolic-link loop")


def pre_output_inside_input_via_link(tmp):
    raw, _, _ = _pre_base(tmp)
    link = tmp / "elsewhere"
    link.symlink_to(raw)                          # --out looks outside the input, but the link leads into it
    out = link / "preprocessed"
    return Row(["synapse", "--raw", str(raw), "--out", str(out), "--quiet"], "pre", str(raw.resolve()),
               r"inside the input folder", [raw], "none")


def _foreign_out(tmp, overwrite):
    raw, _, _ = _pre_base(tmp)
    out = tmp / "out"
    out.mkdir()
    (out / "dataset.json").write_text('{"name": "my own dataset", "labels": {"background": 0, "liver": 1}}\n')
    return Row(["synapse", "--raw", str(raw), "--out", str(out), "--quiet", *(["--overwrite"] if overwrite else [])],
               "pre", str(out), r"is not empty \(dataset.json\) and was not written by glam3d", [out], "none")


def pre_out_holds_unrelated_dataset_json(tmp):
    return _foreign_out(tmp, False)


def pre_out_unrelated_dataset_json_overwrite(tmp):
    return _foreign_out(tmp, True)


def _msd(tmp, change=None, n=2, modality=("CT",)):
    """A tiny MSD dataset (``c1``.. in imagesTr with lists), dataset.json changed by ``change(meta)``."""
    ds = tmp / "Task01_Tiny"
    meta = {"name": "Tiny", "modality": {str(i): m for i, m in enumerate(modality)},
            "labels": {"0": "background", "1": "organ"}, "numTraining": n,
            "training": [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"}
                         for i in range(1, n + 1)], "test": []}
    for i in range(1, n + 1):
        img = np.full(H.SHAPE + ((len(modality),) if len(modality) > 1 else ()), -1000, np.int16)
        img[2:-2, 2:-2] = 40
        lab = np.zeros(H.SHAPE, np.uint8)
        lab[4:7, 4:7, 1:4] = 1
        H.save_nii(img, ds / "imagesTr" / f"c{i}.nii.gz")
        H.save_nii(lab, ds / "labelsTr" / f"c{i}.nii.gz")
    if change:
        change(meta)
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def _msd_row(tmp, ds, problem, names=None, others="none", good=()):
    out = tmp / "out"
    return Row(["msd", "--dataset", str(ds), "--out", str(out), "--quiet"], "pre",
               str(names or ds / "dataset.json"), problem, [out], others, [out / "cases" / g for g in good])


def pre_msd_labels_list(tmp):
    ds = _msd(tmp, lambda m: m.update(labels=["background", "organ"]))
    return _msd_row(tmp, ds, r"field 'labels' must be an object")


def pre_msd_modality_keys_not_numbers(tmp):
    ds = _msd(tmp, lambda m: m.update(modality={"CT": "0"}))
    return _msd_row(tmp, ds, r"field 'modality': keys must be channel numbers")


def pre_msd_region_labels(tmp):
    ds = _msd(tmp, lambda m: m.update(labels={"background": 0, "organ": 1, "whole": [1, 2]},
                                      regions_class_order=[1, 2]))
    return _msd_row(tmp, ds, r"'whole' is a region")


def pre_msd_num_training_mismatch(tmp):
    ds = _msd(tmp, lambda m: m.update(numTraining=5))
    return _msd_row(tmp, ds, r"'numTraining' is 5 but its training cases hold\(s\) 2")


def pre_msd_listed_image_missing(tmp):
    ds = _msd(tmp)
    (ds / "imagesTr" / "c2.nii.gz").unlink()
    return _msd_row(tmp, ds, r"'training\[1\].image' names ./imagesTr/c2.nii.gz, which does not exist")


def pre_msd_channel_count_differs(tmp):
    ds = _msd(tmp, n=3, modality=("T2", "ADC"))
    bad = H.save_nii(np.ones(H.SHAPE + (3,), np.float32), ds / "imagesTr" / "c2.nii.gz")
    return _msd_row(tmp, ds, r"has 3 channel\(s\) but dataset.json field 'modality' declares 2", names=bad,
                    others="done", good=["c1.npz", "c3.npz"])


def pre_inspect_inconsistent_dataset_json(tmp):
    ds = _msd(tmp, lambda m: m.update(numTraining=3))
    return Row(["inspect", str(ds)], "pre", str(ds / "dataset.json"), r"'numTraining' is 3", [], "none")


def _case_file(tmp, case="case01"):
    return tmp / "data" / "cases" / f"{case}.npz"


def _rewrite_case(path, **arrays):
    z = dict(np.load(path))
    z.update(arrays)
    np.savez_compressed(path, **z)


def train_case_nan_voxels(tmp):
    row = _train_row(tmp, [], _case_file(tmp), r"NaN/inf voxel")
    img = np.load(_case_file(tmp))["image"].copy()
    img[0, 3, 4, 5] = np.nan
    _rewrite_case(_case_file(tmp), image=img)
    return row


def train_case_complex_voxels(tmp):
    row = _train_row(tmp, [], _case_file(tmp), r"voxel type complex64, not real numbers")
    _rewrite_case(_case_file(tmp), image=np.load(_case_file(tmp))["image"].astype(np.complex64))
    return row


def train_channel_count_differs(tmp):
    row = _train_row(tmp, [], _case_file(tmp, "case02"), r"has 2 channel\(s\) but dataset.json field 'modality' "
                                                          r"declares 1")
    img = np.load(_case_file(tmp, "case02"))["image"]
    _rewrite_case(_case_file(tmp, "case02"), image=np.concatenate([img, img]))
    return row


def _edit_manifest(tmp, change):
    path = tmp / "data" / "dataset.json"
    man = json.loads(path.read_text())
    change(man)
    path.write_text(json.dumps(man))
    return path


def train_entry_outside_folder(tmp):
    row = _train_row(tmp, [], tmp / "data" / "dataset.json", r"'training\[1\].image' is '../stolen.npz'.*inside "
                                                             r"the dataset folder")
    _edit_manifest(tmp, lambda m: m["training"][1].update(image="../stolen.npz"))
    return row


def train_labels_as_list(tmp):
    row = _train_row(tmp, [], tmp / "data" / "dataset.json", r"field 'labels' must be an object")
    _edit_manifest(tmp, lambda m: m.update(labels=["background", "cube", "box"]))
    return row


def train_modality_keys_not_numbers(tmp):
    row = _train_row(tmp, [], tmp / "data" / "dataset.json", r"field 'modality': keys must be the channel numbers")
    _edit_manifest(tmp, lambda m: m.update(modality={"CT": "0"}))
    return row


CATALOGUE.update({f.__name__: f for f in [
    pre_degenerate_affine, pre_nan_affine, pre_complex_voxels, pre_symlink_loop_image,
    pre_output_inside_input_via_link, pre_out_holds_unrelated_dataset_json, pre_out_unrelated_dataset_json_overwrite,
    pre_msd_labels_list, pre_msd_modality_keys_not_numbers, pre_msd_region_labels, pre_msd_num_training_mismatch,
    pre_msd_listed_image_missing, pre_msd_channel_count_differs, pre_inspect_inconsistent_dataset_json,
    train_case_nan_voxels, train_case_complex_voxels, train_channel_count_differs, train_entry_outside_folder,
    train_labels_as_list, train_modality_keys_not_numbers,
]})


# ------------------------------------------------------------------------------------------------ checks
def _complete(path: Path) -> bool:
    """The file loads completely in the format its name says."""
    name = path.name
    try:
        if name.endswith((".nii", ".nii.gz")):
            np.asanyarray(nib.load(str(path)).dataobj).sum()
        elif name.endswith(".npz"):
            with np.load(path) as z:
                for k in z.files:
                    z[k]
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".pt"):
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return True


def check_outputs(row: Row):
    for folder in row.outputs:
        assert not H.temp_litter(folder), H.temp_litter(folder)
        if not folder.exists():
            continue
        files = [p for p in folder.rglob("*") if p.is_file() and p not in row.inputs_inside]
        bad = [str(p) for p in files if not _complete(p)]
        assert not bad, f"half-written files: {bad}"
        if row.others == "none" and row.tool == "glam3d" and row.argv[0] == "predict":
            assert not [p for p in files if p.name.endswith(".nii.gz")], files
        if row.others == "none" and row.tool == "pre":
            assert not list(folder.rglob("*.npz")), files
    for g in row.good:
        assert g.is_file() and _complete(g), f"the good case was not finished: {g}"


def check_error_line(err: str, row: Row):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err, line
    assert row.names in line, f"the error line does not name {row.names}: {line}"
    assert re.search(row.problem, line), f"the error line does not say {row.problem!r}: {line}"


def _main(row: Row):
    return pre_cli.main if row.tool == "pre" else glam3d_cli.main


def assert_refused(row: Row, capsys, monkeypatch) -> None:
    """The catalogue's contract for one row: run its command in-process (after the row's set-up), exit 2, exactly
    one stderr line naming the file and the problem, nothing half-written in its output folders."""
    if row.setup:
        row.setup(monkeypatch)
    capsys.readouterr()
    code = _main(row)(row.argv)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    check_error_line(err, row)
    check_outputs(row)


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    assert_refused(CATALOGUE[case](tmp_path), capsys, monkeypatch)


def test_catalogue_size():
    tools = {name.split("_")[0] for name in CATALOGUE}
    assert len(CATALOGUE) >= 25 and tools == {"pre", "train", "predict", "evaluate"}


@pytest.mark.parametrize("case", [f.__name__ for f in BEFORE_HEAVY_WORK])
def test_refused_before_heavy_work(case, tmp_path, capsys, monkeypatch):
    """The rows of the before-heavy-work section answer within seconds (test bound loose: one second is the aim)
    and never build a network for real: every network built is a meta-device copy."""
    import time

    from glam3d.engine import train as train_engine
    from glam3d.models import registry

    row = CATALOGUE[case](tmp_path)
    if row.setup:
        row.setup(monkeypatch)
    built = []
    real_build = registry.build_model

    def spy(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append({p.device.type for p in model.parameters() if p.numel() >= 1 << 16} or {"meta"})
        return model

    monkeypatch.setattr(registry, "build_model", spy)
    monkeypatch.setattr(train_engine, "build_network", lambda *a, **k: built.append({"real"}))
    capsys.readouterr()
    t0 = time.perf_counter()
    code = _main(row)(row.argv)
    seconds = time.perf_counter() - t0
    assert code == 2 and seconds < 5, (code, seconds, capsys.readouterr().err)
    assert all(devices == {"meta"} for devices in built), built


# ------------------------------------------------------------------------------------------------ real processes
REAL = ["pre_nan_voxels", "train_unknown_config_key", "predict_nan_voxels", "evaluate_shape_mismatch"]


def _module(row: Row):
    return ["-m", "preprocessing"] if row.tool == "pre" else ["-m", "glam3d"]


@pytest.mark.slow
def test_real_exit_codes(tmp_path):
    """The same contract through real processes (``python -m``), started together to share the import time."""
    procs = []
    for name in REAL:
        tmp = tmp_path / name
        tmp.mkdir()
        row = CATALOGUE[name](tmp)
        mods = tmp / "mods" if (tmp / "mods").is_dir() else None
        procs.append((row, H.python(*_module(row), *row.argv, mods=mods)))
    for row, p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 2, (row.argv, p.returncode, err)
        check_error_line(err, row)
        check_outputs(row)


def test_debug_shows_traceback(tmp_path, capsys):
    # fatal errors re-raise under --debug (traceback); per-case errors print theirs after the one-line error
    row = predict_ckpt_truncated(tmp_path / "a")
    from glam3d.errors import UserError

    with pytest.raises(UserError, match="truncated/corrupt"):
        glam3d_cli.main(["--debug", *row.argv])
    r = H.run("-m", "glam3d", "--debug", *row.argv)
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and "UserError" in r.stderr
    row = pre_nan_voxels(tmp_path / "b")
    capsys.readouterr()
    assert pre_cli.main(["--debug", *row.argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "NaN/inf" in err


# ================================================================================================================
# evaluate / postprocess: label sets, layouts, folds, postprocessing decisions
# ================================================================================================================
def _eval_row2(tmp, argv, names, problem, outputs=None):
    out = tmp / "report"
    return Row(["evaluate", *argv, "--out", str(out), "--quiet"], "glam3d", str(names), problem,
               outputs or [out], "none")


def evaluate_prediction_value_outside_label_set(tmp):
    gt, pr = _eval_base(tmp)
    bad = _truth()
    bad[0, 0, 0] = 40
    H.save_nii(bad, pr / "img0002.nii.gz")
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(gt), "--labels", "synapse"], pr / "img0002.nii.gz",
                      r"label values not in the label set: 40")


def evaluate_no_label_set(tmp):
    gt, pr = _eval_base(tmp)
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(gt)], pr, r"no label set.*--labels")


def evaluate_region_based_labels(tmp):
    gt, pr = _eval_base(tmp)
    ds = tmp / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "whole tumor": [1, 2, 3]}, "regions_class_order": [1]}))
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(gt), "--labels", str(ds)], ds, r"region-based")


def evaluate_labels_mapping_direction(tmp):
    gt, pr = _eval_base(tmp)
    m = tmp / "labels.json"
    m.write_text(json.dumps({"liver": "six"}))
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(gt), "--labels", str(m)], m,
                      r"direction of the labels mapping")


def evaluate_case_in_two_folds(tmp):
    gt, pr = _eval_base(tmp)
    other = tmp / "fold_1"
    H.save_nii(_truth(), other / "img0001.nii.gz")
    return _eval_row2(tmp, ["--pred", str(pr), str(other), "--gt", str(gt), "--labels", "synapse"], other,
                      r"case img0001 is predicted in two folders")


def evaluate_truth_from_dataset_json_missing(tmp):
    _, pr = _eval_base(tmp)
    ds = tmp / "pre" / "dataset.json"
    ds.parent.mkdir()
    ds.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "plan": {"label_values": {"1": 6}},
                              "cases": {"0001": {"source_label": str(tmp / "gone" / "label0001.nii.gz")}}}))
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(ds), "--labels", "synapse"], ds,
                      r"case 0001: its truth .* is not found")


def evaluate_corrupt_mha_prediction(tmp):
    gt, pr = _eval_base(tmp)
    (pr / "img0002.nii.gz").unlink()
    (pr / "img0002.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 16 14 8\nElementType = MET_UCHAR\n"
                                     b"ElementDataFile = LOCAL\n" + b"\x00" * 10)
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(gt), "--labels", "synapse"], pr / "img0002.mha",
                      r"cannot read prediction")


def evaluate_nsd_tolerance_negative(tmp):
    gt, pr = _eval_base(tmp)
    return _eval_row2(tmp, ["--pred", str(pr), "--gt", str(gt), "--labels", "synapse", "--nsd-tolerance",
                            "liver=-1"], "--nsd-tolerance", r"liver must be a finite number of mm >= 0")


def postprocess_apply_output_inside_input(tmp):
    _, pr = _eval_base(tmp)
    return Row(["postprocess", "apply", "--input", str(pr), "--out", str(pr / "cleaned"), "--pp", "all", "--quiet"],
               "glam3d", str(pr / "cleaned"), r"inside the input folder", [pr / "cleaned"], "none",
               inputs_inside=[])


def postprocess_apply_not_a_decision(tmp):
    _, pr = _eval_base(tmp)
    pp = tmp / "postprocessing.json"
    pp.write_text(json.dumps({"format": "glam3d-postprocessing-v1", "foreground_largest_component": {"apply": 1},
                              "classes_largest_component": []}))
    return Row(["postprocess", "apply", "--input", str(pr), "--out", str(tmp / "cleaned"), "--pp", str(pp),
                "--quiet"], "glam3d", str(pp), r"must be true or false", [tmp / "cleaned"], "none")


def postprocess_decide_prediction_value_outside(tmp):
    gt, pr = _eval_base(tmp)
    bad = _truth()
    bad[1, 1, 1] = 200
    H.save_nii(bad, pr / "img0001.nii.gz")
    return Row(["postprocess", "decide", "--pred", str(pr), "--gt", str(gt), "--labels", "synapse", "--out",
                str(tmp / "pp"), "--quiet"], "glam3d", str(pr / "img0001.nii.gz"), r"not in the label set: 200",
               [tmp / "pp"], "none")


EVALUATE_ROWS = {f.__name__: f for f in [
    evaluate_prediction_value_outside_label_set, evaluate_no_label_set, evaluate_region_based_labels,
    evaluate_labels_mapping_direction, evaluate_case_in_two_folds, evaluate_truth_from_dataset_json_missing,
    evaluate_corrupt_mha_prediction, evaluate_nsd_tolerance_negative, postprocess_apply_output_inside_input,
    postprocess_apply_not_a_decision, postprocess_decide_prediction_value_outside,
]}


@pytest.mark.parametrize("case", list(EVALUATE_ROWS))
def test_bad_input_evaluate(case, tmp_path, capsys, monkeypatch):
    """The catalogue's contract for the evaluate / postprocess rows: exit 2, one line naming the file and the
    problem, nothing written."""
    row = EVALUATE_ROWS[case](tmp_path)
    assert_refused(row, capsys, monkeypatch)
    for folder in row.outputs:
        assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


# ================================================================================================================
# predict: window sizes, output folders inside inputs or holding files glam3d did not write, ensembles, nnU-Net
# channel-file names, image formats, postprocessing decisions (each row: one error line, nothing written)
# ================================================================================================================
def predict_roi_not_divisible(tmp):
    _scans(tmp)
    return _predict_row(tmp, [tmp / "scans"], "--roi-size", r"\[24, 32, 32\] must be divisible by the network's "
                        r"\(16, 32, 32\)", "none", extra=["--roi-size", "24", "32", "32"])


def predict_roi_zero(tmp):
    _scans(tmp)
    return _predict_row(tmp, [tmp / "scans"], "--roi-size", r"must be 3 positive sizes", "none",
                        extra=["--roi-size", "0", "32", "32"])


def predict_output_inside_input_folder(tmp):
    _scans(tmp)
    out = tmp / "scans" / "pred"
    return _predict_row(tmp, [tmp / "scans"], out, r"--output is the --input folder .* or inside it", "none", out=out)


def predict_output_inside_dicom_series(tmp):
    folder = tmp / "dicom" / "ct"
    folder.mkdir(parents=True)
    _dicom_series(folder, "1.2.826.0.1.3680043.2.1125.7.303", [(20, 24)] * 6)
    out = folder / "pred"
    return _predict_row(tmp, [folder], out, r"--output is the --input folder", "none", out=out)


def predict_foreign_file_in_output(tmp):
    _scans(tmp)
    ck = H.predict_checkpoint(tmp / "ck.pt")
    out = tmp / "pred"
    assert glam3d_cli.main(["predict", "--checkpoint", str(ck), "--input", str(tmp / "scans" / "s0.nii.gz"),
                            "--output", str(out), "--quiet", "--device", "cpu"]) == 0
    H.save_nii(np.ones((24, 20, 12), np.uint8), out / "s1.nii.gz")   # the user's file where glam3d's s1 would go
    row = _predict_row(tmp, [tmp / "scans"], out / "s1.nii.gz", r"exists and was not written by glam3d .* never "
                       r"replaced, --overwrite included", "none", ckpt=ck, extra=["--overwrite"])
    row.inputs_inside = [out / "s0.nii.gz", out / "s1.nii.gz"]
    return row


def predict_output_holds_unrelated_files(tmp):
    _scans(tmp)
    out = tmp / "pred"
    out.mkdir()
    (out / "predictions.json").write_text('{"source": "another tool"}\n')
    return _predict_row(tmp, [tmp / "scans"], out, r"is not empty \(predictions\.json\) and was not written by glam3d",
                        "none", out=out)


def predict_ensemble_plan_differs(tmp):
    from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint

    _scans(tmp)
    a = H.predict_checkpoint(tmp / "ck.pt")
    state = load_checkpoint(H.predict_checkpoint(tmp / "b0.pt", seed=1))
    state["plan"]["target_spacing"] = [2.0, 2.0, 2.0]
    save_checkpoint(tmp / "b.pt", state)
    row = _predict_row(tmp, [tmp / "scans"], tmp / "b.pt", r"its preprocessing plan differs from .*ck\.pt's "
                       r"\(target_spacing", "none", ckpt=a)
    return _with_checkpoints(row, [a, tmp / "b.pt"])


def predict_v2_file_not_channel_named(tmp):
    from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint

    _scans(tmp)
    state = load_checkpoint(H.predict_checkpoint(tmp / "ck0.pt"))
    state["source_layout"], state["file_ending"] = "nnunet-v2", ".nii.gz"   # data from an nnU-Net v2 folder
    save_checkpoint(tmp / "v2.pt", state)
    return _predict_row(tmp, [tmp / "scans"], tmp / "scans" / "s0.nii.gz", r"not named <case>_XXXX\.nii\.gz "
                        r"\(nnU-Net v2", "none", ckpt=tmp / "v2.pt")


def predict_unreadable_mha(tmp):
    _scans(tmp)
    bad = tmp / "scans" / "s9.mha"
    bad.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
                    b"ElementDataFile = LOCAL\n" + b"\x00" * 10)
    return _predict_row(tmp, [tmp / "scans"], bad, r"not an image SimpleITK can read|cannot read the voxel data",
                        good=["s0.nii.gz", "s1.nii.gz"])   # (its header reads: it fails when its voxels are read)


def predict_decision_of_another_dataset(tmp):
    _scans(tmp)
    dec = tmp / "postprocessing.json"
    dec.write_text(json.dumps({"format": "glam3d-postprocessing-v1", "classes_largest_component": [6, 99],
                               "foreground_largest_component": {"apply": False}}))
    return _predict_row(tmp, [tmp / "scans"], dec, r"names label value 99, which the checkpoint never writes", "none",
                        extra=["--largest-component", str(dec)])


def predict_decision_not_a_decision(tmp):
    _scans(tmp)
    dec = tmp / "postprocessing.json"
    dec.write_text('{"apply": "yes"}\n')
    return _predict_row(tmp, [tmp / "scans"], dec, r"not a glam3d postprocessing decision", "none",
                        extra=["--largest-component", str(dec)])


def _with_checkpoints(row: Row, checkpoints) -> Row:
    """``row`` with ``--checkpoint`` naming several checkpoints (an ensemble)."""
    i = row.argv.index("--checkpoint")
    row.argv[i + 1:i + 2] = [str(c) for c in checkpoints]
    return row

PREDICT_ROWS = [
    predict_roi_not_divisible, predict_roi_zero, predict_output_inside_input_folder,
    predict_output_inside_dicom_series, predict_foreign_file_in_output, predict_output_holds_unrelated_files,
    predict_ensemble_plan_differs, predict_v2_file_not_channel_named, predict_unreadable_mha,
    predict_decision_of_another_dataset, predict_decision_not_a_decision,
]
CATALOGUE.update({f.__name__: f for f in PREDICT_ROWS})


@pytest.mark.parametrize("case", [f.__name__ for f in PREDICT_ROWS])
def test_bad_input_predict_outputs(case, tmp_path, capsys, monkeypatch):
    """The catalogue's contract for the rows of this section (collected here: they are added after
    ``test_bad_input`` is parametrised)."""
    assert_refused(CATALOGUE[case](tmp_path), capsys, monkeypatch)


@pytest.mark.parametrize("case", ["predict_roi_not_divisible", "predict_roi_zero", "predict_ensemble_plan_differs"])
def test_predict_refused_before_heavy_work(case, tmp_path, capsys, monkeypatch):
    """Window sizes and ensembles of different plans are refused before any network is built for real."""
    from glam3d.models import registry

    row = CATALOGUE[case](tmp_path)
    built, real_build = [], registry.build_model
    monkeypatch.setattr(registry, "build_model", lambda *a, **k: (
        lambda m: (built.append({p.device.type for p in m.parameters() if p.numel() >= 1 << 16} or {"meta"}), m)[1])(
        real_build(*a, **k)))
    capsys.readouterr()
    assert _main(row)(row.argv) == 2
    assert all(devices == {"meta"} for devices in built), built


# ================================================================================================================
# train: cross-validation folds, run folders glam3d does not own, non-finite checkpoints
# ================================================================================================================
def _fold_row(tmp, fold, names, problem, splits=None, n=None):
    row = _train_row(tmp, ["--fold", str(fold)], names, problem)
    data = tmp / "data"
    if n is not None:  # a dataset with n training cases instead
        import shutil

        shutil.rmtree(data)
        H.T.make_dataset(data, n=n, n_test=0, shape=(16, 20, 20))
    if splits is not None:
        (data / "splits_final.json").write_text(splits if isinstance(splits, str) else json.dumps(splits))
    row.outputs = [tmp / "run"]
    return row


def train_fold_beyond_the_splits(tmp):
    from glam3d.data.datasets import crossval_splits

    splits = crossval_splits([f"case{i:02d}" for i in range(4)], 2)
    return _fold_row(tmp, 2, tmp / "data" / "splits_final.json", r"--fold 2: the splits have folds 0..1", splits)


def train_splits_name_unknown_cases(tmp):
    splits = [{"train": ["case00", "case01"], "val": ["BTCV_004"]}]
    return _fold_row(tmp, 0, tmp / "data" / "splits_final.json",
                     r"fold 0: 'val' names case\(s\) BTCV_004 that are not training cases", splits)


def train_splits_not_json(tmp):
    return _fold_row(tmp, 0, tmp / "data" / "splits_final.json", r"not valid JSON", "[{'train': ")


def train_splits_not_a_list(tmp):
    return _fold_row(tmp, 0, tmp / "data" / "splits_final.json", r"must be a list of folds", {"0": {"train": []}})


def train_fold_not_a_number(tmp):
    return _fold_row(tmp, "seven", tmp / "tiny.yaml",
                     r"'data.fold' \(--fold\) must be a fold number 0, 1, ... or 'all'")


def train_too_few_cases_for_five_folds(tmp):
    return _fold_row(tmp, 0, tmp / "data" / "dataset.json",
                     r"5-fold cross-validation needs at least 5 training cases, the dataset has 3", n=3)


def _train_foreign_out(tmp, extra, make):
    out = tmp / "mine"
    make(out)
    row = _train_row(tmp, extra, out, r"is not empty .* was not written by glam3d", run=out)
    row.inputs_inside = [p for p in out.rglob("*") if p.is_file()]
    return row


def _their_checkpoints(out):
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, out / "checkpoints" / "last.pt")  # a model of their own


def _their_config(out):
    out.mkdir()
    (out / "config.yaml").write_text("model: unet\nlr: 0.01\n")


def train_out_holds_their_checkpoints(tmp):
    return _train_foreign_out(tmp, [], _their_checkpoints)


def train_out_holds_their_checkpoints_overwrite(tmp):
    return _train_foreign_out(tmp, ["--overwrite"], _their_checkpoints)


def train_out_holds_their_config_overwrite(tmp):
    return _train_foreign_out(tmp, ["--overwrite"], _their_config)


def train_resume_nan_checkpoints(tmp):
    """last.pt and last.pt.prev both with NaN weights (written around save_checkpoint): never resumed from."""
    from glam3d.config import load_config
    from glam3d.engine.checkpoint import load_checkpoint
    from glam3d.engine.train import train

    cfg_path, data, mods = H.train_setup(tmp)
    run = tmp / "run"
    sys.path.insert(0, str(mods))
    try:
        sys.modules.pop("glam3d_tinynet", None)
        cfg = load_config(cfg_path, [f"output={run}", "train.progress=false"])
        train(cfg, console=False)
    finally:
        sys.path.remove(str(mods))
    ck = run / "checkpoints" / "last.pt"
    for p in (ck, ck.with_name("last.pt.prev")):
        state = load_checkpoint(p)
        state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
        torch.save(state, p)
    row = _train_row(tmp, ["--resume"], ck, r"weights hold NaN/inf .* diverged training run", run=run)
    row.inputs_inside = list((run / "checkpoints").iterdir())
    return row


def train_init_checkpoint_nan_weights(tmp):
    from glam3d.engine.checkpoint import load_checkpoint

    state = load_checkpoint(H.predict_checkpoint(tmp / "ck.pt"))
    state["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, tmp / "diverged.pt")
    return _train_row(tmp, ["--override", f"model.init_checkpoint={tmp / 'diverged.pt'}"], tmp / "diverged.pt",
                      r"weights hold NaN/inf")


TRAIN_ROWS = {f.__name__: f for f in [
    train_fold_beyond_the_splits, train_splits_name_unknown_cases, train_splits_not_json, train_splits_not_a_list,
    train_fold_not_a_number, train_too_few_cases_for_five_folds, train_out_holds_their_checkpoints,
    train_out_holds_their_checkpoints_overwrite, train_out_holds_their_config_overwrite,
    train_resume_nan_checkpoints, train_init_checkpoint_nan_weights,
]}


@pytest.mark.parametrize("case", list(TRAIN_ROWS))
def test_bad_input_train(case, tmp_path, capsys, monkeypatch):
    """The catalogue's contract for these train rows: exit 2, one line naming the file or folder and the problem,
    nothing half written, and what the user had in the output folder untouched."""
    row = TRAIN_ROWS[case](tmp_path)
    before = {p: p.read_bytes() for p in row.inputs_inside}
    assert_refused(row, capsys, monkeypatch)
    assert {p: p.read_bytes() for p in row.inputs_inside} == before
    if case.startswith(("train_fold", "train_splits", "train_too_few", "train_out")):  # refused before any file
        assert not (tmp_path / "run").exists() and not (tmp_path / "mine" / ".glam3d-folder.json").exists()

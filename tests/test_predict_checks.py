"""Checks ``glam3d predict`` makes before heavy work, and unusual inputs it handles.

* ``--roi-size`` (and a checkpoint's own window) checked against the network's divisor and sane bounds, on the
  meta device, before any network is built for real; one line, nothing written.
* the device the networks will run on is passed to the checkpoint's memory check.
* a scan smaller than the window on every axis: padded for inference, written in its own geometry.
* an output folder inside an input: refused for folders of scans, DICOM series folders, and the folder of an
  input file.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import helpers as H

from glam3d.cli import main
from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint

pytest.importorskip("preprocessing.pipeline")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checks")
    ck = H.predict_checkpoint(tmp / "ck.pt")
    H.write_scans(tmp / "scans", 2)
    return tmp, ck


def _spy_builds(monkeypatch):
    from glam3d.models import registry

    built, real = [], registry.build_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()} or {"meta"})
        return model
    monkeypatch.setattr(registry, "build_model", spy)
    return built


@pytest.mark.parametrize("roi,words", [
    (["24", "32", "32"], r"--roi-size \[24, 32, 32\] must be divisible by the network's \(16, 32, 32\) .* "
                         r"e\.g\. \[32, 32, 32\]"),
    (["0", "32", "32"], r"--roi-size \[0, 32, 32\] must be 3 positive sizes"),
    (["16", "32", "100000"], r"--roi-size \[16, 32, 100000\] is far larger than any scan"),
])
def test_roi_size_checked_before_the_network_is_built(setup, tmp_path, capsys, monkeypatch, roi, words):
    import re

    tmp, ck = setup
    built = _spy_builds(monkeypatch)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp / "scans"), "--output", str(out),
                 "--device", "cpu", "--quiet", "--roi-size", *roi]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --roi-size") and len(err.strip().splitlines()) == 1 and re.search(words, err), err
    assert built and all(d == {"meta"} for d in built), built     # sized on the meta device only
    assert not out.exists()


def test_checkpoint_window_not_divisible_names_the_checkpoint(setup, tmp_path, capsys):
    tmp, ck = setup
    state = load_checkpoint(ck)
    state["config"]["val"]["roi_size"] = [16, 32, 48]
    bad = tmp_path / "odd.pt"
    save_checkpoint(bad, state)
    assert main(["predict", "--checkpoint", str(bad), "--input", str(tmp / "scans"), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: the checkpoint's window size (val.roi_size) [16, 32, 48] must be "
                          f"divisible"), err
    # the caller's --roi-size replaces it
    assert main(["predict", "--checkpoint", str(bad), "--input", str(tmp / "scans" / "s0.nii.gz"), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--quiet", "--roi-size", "16", "32", "32"]) == 0


def test_non_finite_checkpoint_refused_end_to_end(setup, tmp_path, capsys):
    """NaN weights saved around save_checkpoint (which refuses them): exit 2, one line naming the checkpoint,
    nothing written (the output folder is not even created)."""
    tmp, ck = setup
    state = load_checkpoint(ck)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 4)
    state["model"][name] = state["model"][name].clone()
    state["model"][name].view(-1)[3] = float("inf")
    bad = tmp_path / "diverged.pt"
    torch.save(state, bad)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(bad), "--input", str(tmp / "scans"), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: the checkpoint's weights hold NaN/inf (1 tensor, e.g. {name})")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_device_reaches_the_checkpoint_memory_check(setup, tmp_path, monkeypatch):
    """The networks are sized against the device they will run on (model_from_checkpoint's ``device``)."""
    from glam3d import Predictor
    from glam3d.engine import checkpoint as ckmod

    tmp, ck = setup
    seen, real = [], ckmod.model_from_checkpoint
    monkeypatch.setattr(ckmod, "model_from_checkpoint",
                        lambda *a, **k: (seen.append(k.get("device")), real(*a, **k))[1])
    Predictor.from_checkpoints([ck, H.predict_checkpoint(tmp_path / "b.pt", seed=3)], device="cpu")
    assert seen == [torch.device("cpu")] * 2


@pytest.mark.parametrize("roi_fits", [False, True])
def test_scan_smaller_than_the_window(setup, tmp_path, roi_fits):
    """A scan smaller than the window on every axis (after preprocessing: 5 x 6 x 4 voxels against 16 x 32 x 32) is
    zero-padded for inference: the label map has the scan's shape and affine, and equals the in-memory API's."""
    from glam3d import Predictor

    _, ck = setup
    aff = np.array([[0.0, 0.0, 3.0, -4.0], [-2.0, 0.0, 0.0, 7.0], [0.0, 2.0, 0.0, 1.5], [0, 0, 0, 1]])
    img = np.full((6, 5, 4), 40, np.int16)
    img[1:4, 1:3, 1:3] = 200
    scan = H.save_nii(img, tmp_path / "tiny.nii.gz", aff)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(scan), "--output", str(out), "--device", "cpu",
                 "--quiet", "--probabilities"]) == 0
    seg = nib.load(out / "tiny.nii.gz")
    assert seg.shape == img.shape and np.array_equal(seg.affine, aff)
    assert nib.load(out / "tiny_probabilities.nii.gz").shape == img.shape + (9,)
    api = Predictor.from_checkpoint(ck, device="cpu").predict(scan)
    assert np.array_equal(np.asanyarray(api.dataobj), np.asanyarray(seg.dataobj))


def test_output_inside_an_input_is_refused(setup, tmp_path, capsys):
    import SimpleITK as sitk

    tmp, ck = setup
    base = ["predict", "--checkpoint", str(ck), "--device", "cpu", "--quiet"]
    series = H.write_dicom_series(tmp_path / "dicom" / "series",
                                  sitk.GetImageFromArray(np.full((4, 10, 12), 40, np.int16)))
    scans = tmp_path / "scans"
    H.write_scans(scans, 1)
    refused = [
        ([scans], scans, "the --input folder"),                                 # the input folder itself
        ([scans], scans / "pred", "the --input folder"),                        # inside it
        ([series], series / "pred", "the --input folder"),                      # inside a DICOM series folder
        ([tmp_path / "dicom"], series / "pred", "the --input folder"),          # inside a folder of series
        ([scans / "s0.nii.gz"], scans, "the folder of the input file"),         # the folder of an input file
    ]
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    for inputs, out, words in refused:
        assert main(base + ["--input", *map(str, inputs), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: --output is {words}") and len(err.strip().splitlines()) == 1, err
        assert sorted(str(p) for p in tmp_path.rglob("*")) == listing          # nothing written anywhere
    # a subfolder of an input file's folder is not an input folder: allowed
    assert main(base + ["--input", str(scans / "s0.nii.gz"), "--output", str(scans / "pred_s0")]) == 0
    assert (scans / "pred_s0" / "s0.nii.gz").is_file()

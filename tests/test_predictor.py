"""The Python API: ``from glam3d import Predictor`` (lazy), ``Predictor.predict`` returns what ``glam3d predict``
writes (labels and probabilities, voxel for voxel, in the input's geometry) for a NIfTI path, a nibabel image or a
DICOM series, and ``predict_files`` is the command's engine."""
from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import helpers as H

from glam3d.cli import main
from glam3d.errors import UserError

pytest.importorskip("preprocessing.pipeline")


def _oblique_affine():
    a = np.diag([-1.6, -1.4, 2.5, 1.0])  # LPS-like storage, anisotropic
    c, s = np.cos(0.3), np.sin(0.3)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ a[:3, :3]
    a[:3, 3] = [20.0, -15.0, 40.0]
    return a


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint (random nnFormer: a mix of labels), two int16 CT scans (one oblique), and what
    ``glam3d predict --probabilities`` wrote for them."""
    tmp = tmp_path_factory.mktemp("predictor")
    ck = H.predict_checkpoint(tmp / "ck.pt")
    scans = tmp / "scans"
    H.save_nii(np.round(H.scan((26, 22, 12), seed=1)).astype(np.int16), scans / "a.nii.gz")
    H.save_nii(np.round(H.scan((20, 24, 10), seed=2)).astype(np.int16), scans / "b.nii.gz", _oblique_affine())
    out = tmp / "cli"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(scans), "--output", str(out), "--device", "cpu",
                 "--quiet", "--probabilities"]) == 0
    return ck, scans, out


def _same_image(got, path):
    """``got`` (a nibabel image in memory) holds the voxels, dtype, shape and geometry of the file at ``path``."""
    ref = nib.load(path)
    a, b = np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj)
    assert a.shape == b.shape and a.dtype == b.dtype == ref.get_data_dtype()
    assert np.array_equal(a, b)
    assert np.array_equal(got.affine, ref.affine)
    assert got.header.get_intent() == ref.header.get_intent()


def test_import_is_lazy():
    """``import glam3d`` imports no torch; ``from glam3d import Predictor`` gives the class (importing it then)."""
    code = ("import sys, glam3d\n"
            "assert 'torch' not in sys.modules, 'import glam3d imported torch'\n"
            "assert 'Predictor' in dir(glam3d)\n"
            "from glam3d import Predictor\n"
            "from glam3d.inference.predictor import Predictor as P\n"
            "assert Predictor is P and 'torch' in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=H.env())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    import glam3d
    with pytest.raises(AttributeError):
        glam3d.NoSuchThing  # noqa: B018


def test_predict_equals_what_the_command_writes(setup, tmp_path):
    """A path, the nibabel image loaded from it, and the same voxels in a fresh in-memory image: each gives the
    label map ``glam3d predict`` wrote, voxel for voxel (values, dtype, affine), also on an oblique LPS grid."""
    from glam3d import Predictor

    ck, scans, out = setup
    predictor = Predictor.from_checkpoint(ck, device="cpu")
    for name in ("a", "b"):
        path = scans / f"{name}.nii.gz"
        seg = predictor.predict(path)
        assert isinstance(seg, nib.Nifti1Image)
        _same_image(seg, out / f"{name}.nii.gz")
        assert len(np.unique(np.asanyarray(seg.dataobj))) > 1  # not a trivial map
        _same_image(predictor.predict(nib.load(path)), out / f"{name}.nii.gz")
        img = nib.load(path)
        fresh = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
        _same_image(predictor.predict(fresh), out / f"{name}.nii.gz")
    # saved by nibabel, it reads back the same
    seg.to_filename(tmp_path / "b_api.nii.gz")
    _same_image(nib.load(tmp_path / "b_api.nii.gz"), out / "b.nii.gz")


def test_predict_probabilities_and_scratch(setup, tmp_path):
    """``probabilities=True``: the labels and the ``(X, Y, Z, K)`` class maps ``--probabilities`` wrote, bit for
    bit; with a scratch folder the temporary files go there and nothing is left behind."""
    from glam3d import Predictor

    ck, scans, out = setup
    predictor = Predictor.from_checkpoint(ck, device="cpu")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for folder in (None, scratch):
        labels, probs = predictor.predict(scans / "b.nii.gz", probabilities=True, scratch=folder)
        _same_image(labels, out / "b.nii.gz")
        _same_image(probs, out / "b_probabilities.nii.gz")
        p = np.asanyarray(probs.dataobj)
        assert p.dtype == np.float32 and p.shape == labels.shape + (9,) and np.allclose(p.sum(-1), 1, atol=1e-3)
    assert list(scratch.iterdir()) == []


def test_predict_dicom_series(setup, tmp_path):
    """A DICOM series folder: the same labels as ``glam3d predict`` writes for it."""
    import SimpleITK as sitk

    from glam3d import Predictor

    ck, _, _ = setup
    arr = np.round(H.scan((24, 20, 10), seed=3)).astype(np.int16).transpose(2, 1, 0)  # (z, y, x)
    vol = sitk.GetImageFromArray(arr)
    vol.SetSpacing((2.0, 2.0, 3.0))
    vol.SetOrigin((-10.0, 20.0, 30.0))
    series = H.write_dicom_series(tmp_path / "series", vol, uid="1.2.826.0.1.3680043.2.1125.1.7")
    out = tmp_path / "cli"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(series), "--output", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    seg = Predictor.from_checkpoint(ck, device="cpu").predict(series)
    _same_image(seg, out / "series.nii.gz")


def test_predict_files_is_the_command(setup, tmp_path, capsys):
    """``predict_files`` writes what ``glam3d predict`` writes, reports each case, keeps existing outputs unless
    ``overwrite``, and records the run in ``predictions.json``."""
    from glam3d import Predictor

    ck, scans, out = setup
    predictor = Predictor.from_checkpoint(ck, device="cpu")
    dest = tmp_path / "api"
    result = predictor.predict_files([scans], dest, quiet=True)
    assert [(c.name, c.status) for c in result.cases] == [("a", "written"), ("b", "written")]
    assert result.exit_code == 0 and not result.failed
    for name in ("a", "b"):
        _same_image(nib.load(dest / f"{name}.nii.gz"), out / f"{name}.nii.gz")
    man = json.loads((dest / "predictions.json").read_text())
    cli_man = json.loads((out / "predictions.json").read_text())
    assert man["inference"] == {**cli_man["inference"], "probabilities": False}
    assert man["checkpoint"]["sha256"] == cli_man["checkpoint"]["sha256"]
    assert "2 written, 0 skipped" in capsys.readouterr().out
    again = predictor.predict_files([scans / "a.nii.gz"], dest, quiet=True)
    assert [c.status for c in again.cases] == ["skipped"]
    assert [c.status for c in predictor.predict_files([scans / "a.nii.gz"], dest, quiet=True,
                                                      overwrite=True).cases] == ["written"]


def test_predictor_refusals(setup, tmp_path):
    """One line naming the input for a folder of several scans; a TypeError for what is not an image; the
    command's one-line errors for a bad option."""
    from glam3d import Predictor

    ck, scans, _ = setup
    predictor = Predictor.from_checkpoint(ck, device="cpu", overlap=0.5, mirror=False)
    assert predictor.settings["overlap"] == 0.5 and predictor.settings["roi_size"] == [16, 32, 32]
    with pytest.raises(UserError, match=r"scans: holds 2 scans"):
        predictor.predict(scans)
    with pytest.raises(TypeError, match="nibabel image"):
        predictor.predict(np.zeros((4, 4, 4)))
    with pytest.raises(UserError, match="expected a 3D scan"):
        predictor.predict(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))
    with pytest.raises(UserError, match="--amp"):
        Predictor.from_checkpoint(ck, device="cpu", amp="fp16")
    with pytest.raises(UserError, match="overlap must be in"):
        Predictor.from_checkpoint(ck, device="cpu", overlap=1.5)
    with pytest.raises(UserError, match="checkpoint not found"):
        Predictor.from_checkpoint(tmp_path / "none.pt", device="cpu")

"""nnU-Net v2 and MSD raw datasets: case ids, channels, formats, per-channel normalisation, dataset.json checks.

Tiny synthetic datasets (16 x 14 x 8 voxels) in both layouts. The normalisation references are written here from
nnU-Net's definitions (CT: clip to the training foreground's 0.5/99.5 percentiles, z-score with its mean/std;
z-score: the case's non-zero voxels; noNorm: unchanged) and MONAI's NormalizeIntensity.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from glam3d.errors import UserError
from preprocessing import cli
from preprocessing.imageio import load_channels
from preprocessing.pipeline import intensity_transforms, preprocess_scan
from preprocessing.raw_dataset import discover
from preprocessing.run import run_msd

SHAPE = (16, 14, 8)
AFF = np.diag([1.5, 1.5, 2.0, 1.0])            # RAS storage: the preprocessed (z, y, x) array is a transpose


def _write(arr, path: Path, affine=AFF):
    """``arr`` as ``path`` in the format its name says (NIfTI by nibabel, others through SimpleITK's reading of
    the NIfTI nibabel wrote)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith((".nii.gz", ".nii")):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.to_filename(str(path))
        return path
    import SimpleITK as sitk

    tmp = path.with_name(name + ".tmp.nii.gz")
    _write(arr, tmp, affine)
    sitk.WriteImage(sitk.ReadImage(str(tmp)), str(path))
    tmp.unlink()
    return path


def _case_arrays(seed: int, channels: int):
    """CT-like channel 0 (air, body, two organs), MR-like others (zeros outside the body); labels 1, 2."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:8, 4:8, 2:6] = 1
    lab[9:12, 5:9, 2:6] = 2
    chans = []
    for c in range(channels):
        if c == 0:
            x = np.full(SHAPE, -1000, np.int16)
            x[2:14, 2:12, :] = rng.integers(-60, 80, (12, 10, 8))
            x[lab == 1] = rng.integers(80, 160, int((lab == 1).sum()))
            x[lab == 2] = rng.integers(150, 300, int((lab == 2).sum()))
        else:
            x = np.zeros(SHAPE, np.float32)
            x[2:14, 2:12, :] = rng.uniform(50, 400, (12, 10, 8)) * c
        chans.append(x)
    return chans, lab


def make_v2(root: Path, train, test=(), channels=("CT",), ending=".nii.gz", labels=None, seed=0, **extra):
    """An nnU-Net v2 raw dataset: ``imagesTr/<case>_XXXX<ending>``, ``labelsTr/<case><ending>``."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {"channel_names": {str(i): n for i, n in enumerate(channels)},
            "labels": labels or {"background": 0, "organ": 1, "lesion": 2}, "numTraining": len(train),
            "file_ending": ending, **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    for k, cid in enumerate(list(train) + list(test)):
        chans, lab = _case_arrays(seed + k, len(channels))
        sub = "imagesTr" if cid in train else "imagesTs"
        for c, x in enumerate(chans):
            _write(x, root / sub / f"{cid}_{c:04d}{ending}")
        if cid in train:
            _write(lab, root / "labelsTr" / f"{cid}{ending}")
    return root


def make_msd(root: Path, train, test=(), modality=("CT",), lists=True, seed=0, **extra):
    """An MSD (v1) dataset: ``imagesTr/<case>.nii.gz`` (4D for several modalities), lists in dataset.json."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": "T", "modality": {str(i): n for i, n in enumerate(modality)},
            "labels": {"0": "background", "1": "organ", "2": "lesion"}, "numTraining": len(train), **extra}
    if lists:
        meta["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train]
        meta["test"] = [f"./imagesTs/{c}.nii.gz" for c in test]
    (root / "dataset.json").write_text(json.dumps(meta))
    for k, cid in enumerate(list(train) + list(test)):
        chans, lab = _case_arrays(seed + k, len(modality))
        x = chans[0] if len(chans) == 1 else np.stack([c.astype(np.float32) for c in chans], axis=3)
        _write(x, root / ("imagesTr" if cid in train else "imagesTs") / f"{cid}.nii.gz")
        if cid in train:
            _write(lab, root / "labelsTr" / f"{cid}.nii.gz")
    return root


def _ids(cases, split):
    return [c.id for c in cases if c.split == split]


def _run(ds, out, **kw):
    """Preprocess at the scans' own spacing (no resampling: the references are the voxels themselves)."""
    kw.setdefault("spacing", [2.0, 1.5, 1.5])
    return run_msd(ds, out, quiet=True, **kw)


# ------------------------------------------------------------------------------------------------ case ids
def test_amos_ids_nnunet_v2(tmp_path):
    ds = make_v2(tmp_path / "Dataset219_AMOS", ["amos_0001", "amos_0002", "amos_0005"], ["amos_0500"])
    raw, cases, warnings = discover(ds)
    assert raw.layout == "nnunet-v2" and not warnings
    assert _ids(cases, "training") == ["amos_0001", "amos_0002", "amos_0005"]
    assert _ids(cases, "test") == ["amos_0500"]
    c = next(c for c in cases if c.id == "amos_0002")
    assert [p.name for p in c.images] == ["amos_0002_0000.nii.gz"] and c.label.name == "amos_0002.nii.gz"
    out = tmp_path / "out"
    s = _run(ds, out)
    assert (s["failed"], s["training"], s["test"]) == (0, 3, 1)
    man = json.loads((out / "dataset.json").read_text())
    assert [e["id"] for e in man["training"]] == ["amos_0001", "amos_0002", "amos_0005"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["amos_0001.npz", "amos_0002.npz", "amos_0005.npz",
                                                                 "amos_0500.npz"]
    assert man["source_layout"] == "nnunet-v2" and man["file_ending"] == ".nii.gz"


@pytest.mark.parametrize("lists", [True, False])
def test_amos_ids_msd(tmp_path, lists):
    """MSD: ``amos_0001.nii.gz`` is the case amos_0001 (never amos + channel 0001), from the lists or, without
    them, from the label files."""
    ds = make_msd(tmp_path / "Task99_AMOS", ["amos_0001", "amos_0002"], ["amos_0500", "amos_0501"], lists=lists)
    _write(np.zeros(SHAPE, np.int16), ds / "imagesTr" / "._amos_0001.nii.gz")   # macOS archive litter: hidden
    raw, cases, warnings = discover(ds)
    assert raw.layout == "msd"
    assert _ids(cases, "training") == ["amos_0001", "amos_0002"]
    assert _ids(cases, "test") == ["amos_0500", "amos_0501"]
    assert all(len(c.images) == 1 and not c.error for c in cases) and not warnings
    out = tmp_path / "out"
    s = _run(ds, out)
    assert (s["failed"], s["training"], s["test"]) == (0, 2, 2)
    assert sorted(p.stem for p in (out / "cases").iterdir()) == ["amos_0001", "amos_0002", "amos_0500", "amos_0501"]


def test_lists_are_authoritative(tmp_path):
    ds = make_msd(tmp_path / "Task", ["a_01", "a_02"], ["t_01"])
    _write(np.zeros(SHAPE, np.int16), ds / "imagesTr" / "stray_0000.nii.gz")
    raw, cases, warnings = discover(ds)
    assert _ids(cases, "training") == ["a_01", "a_02"]
    assert len(warnings) == 1 and "stray_0000.nii.gz" in warnings[0] and "'training' list" in warnings[0]
    # a listed image that exists as nnU-Net channel files instead (a converted dataset keeping its old list)
    (ds / "imagesTr" / "a_02.nii.gz").rename(ds / "imagesTr" / "a_02_0000.nii.gz")
    raw, cases, _ = discover(ds)
    c = next(c for c in cases if c.id == "a_02")
    assert [p.name for p in c.images] == ["a_02_0000.nii.gz"] and not c.error


def test_v2_explicit_dataset_key(tmp_path):
    ds = make_v2(tmp_path / "D", ["x1", "x2"])
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    (ds / "imagesTr" / "x2_0000.nii.gz").rename(elsewhere / "scan_x2.nii.gz")
    meta = json.loads((ds / "dataset.json").read_text())
    meta["dataset"] = {"x1": {"images": ["imagesTr/x1_0000.nii.gz"], "label": "labelsTr/x1.nii.gz"},
                       "x2": {"images": [str(elsewhere / "scan_x2.nii.gz")], "label": "labelsTr/x2.nii.gz"}}
    (ds / "dataset.json").write_text(json.dumps(meta))
    _, cases, _ = discover(ds)
    assert _ids(cases, "training") == ["x1", "x2"]
    assert next(c for c in cases if c.id == "x2").images == [elsewhere / "scan_x2.nii.gz"]


# ------------------------------------------------------------------------------------------------ channels
def _nonzero_zscore(x):
    x = x.astype(np.float64)
    m = x != 0
    out = x.copy()
    out[m] = (x[m] - x[m].mean()) / x[m].std()
    return out


def test_two_channel_mr_zscore_per_case(tmp_path):
    from monai.transforms import NormalizeIntensity

    ds = make_v2(tmp_path / "Dataset002_MR", ["m1", "m2"], channels=("T2", "ADC"))
    for cid in ("m1", "m2"):                    # MR-like channel 0 too: zeros outside the body
        p = ds / "imagesTr" / f"{cid}_0000.nii.gz"
        x = np.asanyarray(nib.load(str(p)).dataobj).astype(np.float32)
        _write(np.where(x <= -1000, 0, x + 1000).astype(np.float32), p)
    out = tmp_path / "out"
    assert _run(ds, out, crop_to_body=False)["failed"] == 0
    man = json.loads((out / "dataset.json").read_text())
    assert man["plan"]["intensity"] == {"scheme": "zscore"} and man["modality"] == {"0": "T2", "1": "ADC"}
    z = np.load(out / "cases" / "m1.npz")
    assert z["image"].shape == (2, 8, 14, 16)
    for c in range(2):
        x = np.asanyarray(nib.load(str(ds / "imagesTr" / f"m1_{c:04d}.nii.gz")).dataobj).astype(np.float32)
        ref = _nonzero_zscore(x).transpose(2, 1, 0)
        np.testing.assert_allclose(z["image"][c], ref, atol=1e-5)
        monai = np.asarray(NormalizeIntensity(nonzero=True)(x.copy())).transpose(2, 1, 0)
        np.testing.assert_allclose(z["image"][c], monai, atol=1e-5)


def test_mixed_channels_per_channel_scheme_and_predict_path(tmp_path):
    """CT + PET + noNorm: each channel normalised as nnU-Net would, recorded per channel in the plan, and
    ``preprocess_scan`` (what ``glam3d predict`` runs) reproduces the preprocessed case from the plan alone."""
    ds = make_v2(tmp_path / "Dataset003_PETCT", ["p1", "p2", "p3"], ["p9"], channels=("CT", "PET", "noNorm"))
    out = tmp_path / "out"
    assert _run(ds, out, crop_to_body=False)["failed"] == 0
    man = json.loads((out / "dataset.json").read_text())
    plan = man["plan"]
    chans = plan["intensity"]["channels"]
    assert plan["intensity"]["scheme"] == "per_channel" and plan["num_channels"] == 3
    assert [(c["name"], c["scheme"]) for c in chans] == [("CT", "ct"), ("PET", "zscore"), ("noNorm", "nonorm")]
    # the CT statistics: the training cases' foreground voxels of channel 0 (every voxel: fewer than 10,000)
    fg = []
    for cid in ("p1", "p2", "p3"):
        x = np.asanyarray(nib.load(str(ds / "imagesTr" / f"{cid}_0000.nii.gz")).dataobj).astype(np.float64)
        lab = np.asanyarray(nib.load(str(ds / "labelsTr" / f"{cid}.nii.gz")).dataobj)
        fg.append(x[lab > 0])
    fg = np.concatenate(fg)
    st = chans[0]
    np.testing.assert_allclose([st["lower"], st["upper"], st["mean"], st["std"]],
                               [np.percentile(fg, 0.5), np.percentile(fg, 99.5), fg.mean(), fg.std()], rtol=1e-6)
    assert "mean" not in chans[1] and "mean" not in chans[2]
    for cid, sub in (("p2", "imagesTr"), ("p9", "imagesTs")):
        files = [ds / sub / f"{cid}_{c:04d}.nii.gz" for c in range(3)]
        raw = [np.asanyarray(nib.load(str(f)).dataobj).astype(np.float64) for f in files]
        ref = [(np.clip(raw[0], st["lower"], st["upper"]) - st["mean"]) / st["std"], _nonzero_zscore(raw[1]), raw[2]]
        z = np.load(out / "cases" / f"{cid}.npz")["image"]
        for c in range(3):
            np.testing.assert_allclose(z[c], ref[c].transpose(2, 1, 0), atol=1e-4, err_msg=f"{cid} channel {c}")
        arr, _ = preprocess_scan(load_channels(files), plan)
        np.testing.assert_allclose(arr, z, atol=1e-5)
        lazy, _ = preprocess_scan(load_channels(files), plan, lazy=True)
        np.testing.assert_allclose(np.asarray(lazy), z, atol=1e-5)


def test_rescale_and_rgb_schemes():
    x = np.array([[[2.0, 4.0], [6.0, 10.0]]], dtype=np.float32)[None]      # (C=1, D, H, W)
    f = intensity_transforms({"scheme": "per_channel", "channels": [{"scheme": "rescale_to_0_1"}]}, 1, x)[0]
    np.testing.assert_allclose(f(x[0].copy()), (x[0] - 2) / 8)
    g = intensity_transforms({"scheme": "per_channel", "channels": [{"scheme": "rgb_to_0_1"}]}, 1, x * 20)[0]
    np.testing.assert_allclose(g(x[0] * 20), x[0] * 20 / 255)
    with pytest.raises(UserError, match=r"expects values in \[0, 255\]"):
        intensity_transforms({"scheme": "per_channel", "channels": [{"scheme": "rgb_to_0_1"}]}, 1, x * 100)
    with pytest.raises(UserError, match="unknown scheme"):
        intensity_transforms({"scheme": "per_channel", "channels": [{"scheme": "sigmoid"}]}, 1, x)


def test_channel_count_differs_between_cases(tmp_path, capsys):
    ds = make_msd(tmp_path / "Task05", ["c1", "c2", "c3"], modality=("T2", "ADC"))
    bad = ds / "imagesTr" / "c2.nii.gz"
    _write(np.ones(SHAPE + (3,), np.float32), bad)                          # three volumes, two declared
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["msd", "--dataset", str(ds), "--out", str(out), "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and str(bad) in err[0] and "has 3 channel(s)" in err[0] and "'modality' declares 2" in err[0]
    assert sorted(p.stem for p in (out / "cases").iterdir()) == ["c1", "c3"]
    # nnU-Net v2: a case missing a channel file
    ds2 = make_v2(tmp_path / "D2", ["d1", "d2"], channels=("T1", "T2"))
    (ds2 / "imagesTr" / "d2_0001.nii.gz").unlink()
    _, cases, _ = discover(ds2)
    c = next(c for c in cases if c.id == "d2")
    assert c.error and "channel files 0000 found" in c.error and "declares 2 channel(s)" in c.error


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_sitk_format_datasets(tmp_path, ending):
    """The same dataset as .nii.gz and as ``ending``: the same preprocessed cases."""
    ref = make_v2(tmp_path / "nii", ["f1", "f2"], ["f9"])
    other = make_v2(tmp_path / ending.strip("."), ["f1", "f2"], ["f9"], ending=ending)
    assert sorted(p.name for p in (other / "imagesTr").iterdir()) == [f"f1_0000{ending}", f"f2_0000{ending}"]
    assert _run(ref, tmp_path / "o_nii")["failed"] == 0
    assert _run(other, tmp_path / "o_other")["failed"] == 0
    ma = json.loads((tmp_path / "o_other" / "dataset.json").read_text())
    assert ma["file_ending"] == ending and [e["id"] for e in ma["training"]] == ["f1", "f2"]
    for cid in ("f1", "f2", "f9"):
        a, b = np.load(tmp_path / "o_nii" / "cases" / f"{cid}.npz"), np.load(tmp_path / "o_other" / "cases" /
                                                                          f"{cid}.npz")
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-4)
        if cid != "f9":
            np.testing.assert_array_equal(a["label"], b["label"])
    assert cli.main(["inspect", str(other)]) == 0


# ------------------------------------------------------------------------------------------------ dataset.json
def _one_error(capsys, argv):
    capsys.readouterr()
    code = cli.main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], (code, err)
    return err[0]


BAD_FIELDS = {
    "labels_list": ({"labels": ["background", "organ"]}, "field 'labels' must be an object"),
    "labels_region": ({"labels": {"background": 0, "organ": [1, 2], "lesion": 2},
                       "regions_class_order": [1, 2]}, "region"),
    "labels_ignore": ({"labels": {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}}, "'ignore' label"),
    "labels_shared_value": ({"labels": {"background": 0, "organ": 1, "lesion": 1}}, "share the value 1"),
    "labels_negative": ({"labels": {"background": 0, "organ": -1}}, "negative value"),
    "channel_keys_not_numbers": ({"channel_names": {"CT": "0"}}, "keys must be channel numbers"),
    "channel_name_not_string": ({"channel_names": {"0": 5}}, "channel 0 must be named by a string"),
    "channels_gap": ({"channel_names": {"0": "CT", "2": "PET"}}, r"numbered 0\.\.1"),
    "no_channels": ({"channel_names": None}, "neither 'channel_names'"),
    "file_ending_number": ({"file_ending": 5}, "field 'file_ending'"),
    "num_training_string": ({"numTraining": "2"}, "field 'numTraining' must be a whole number"),
    "training_not_list": ({"training": {"a": 1}}, "field 'training' must be a list"),
    "training_entry": ({"training": [{"image": "./imagesTr/a_0000.nii.gz"}]}, r"field 'training\[0\]'"),
    "test_entry": ({"test": [5]}, r"field 'test\[0\]'"),
}


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_dataset_json_fields_one_line(tmp_path, capsys, name):
    change, problem = BAD_FIELDS[name]
    ds = make_v2(tmp_path / "D", ["a", "b"])
    meta = json.loads((ds / "dataset.json").read_text())
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not None}
    (ds / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    for argv in (["msd", "--dataset", str(ds), "--out", str(out)], ["inspect", str(ds)]):
        line = _one_error(capsys, argv)
        assert str(ds / "dataset.json") in line, line
        assert re.search(problem, line), line
    assert not out.exists()


def test_inconsistent_dataset_json(tmp_path, capsys):
    ds = make_msd(tmp_path / "Task", ["a_1", "a_2", "a_3"])
    meta = json.loads((ds / "dataset.json").read_text())
    meta["numTraining"] = 4
    (ds / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    for argv in (["msd", "--dataset", str(ds), "--out", str(out)], ["inspect", str(ds)]):
        line = _one_error(capsys, argv)
        assert str(ds / "dataset.json") in line and "'numTraining' is 4" in line and "3 case(s)" in line
    meta["numTraining"] = 3
    meta["training"][1]["image"] = "./imagesTr/missing.nii.gz"
    (ds / "dataset.json").write_text(json.dumps(meta))
    for argv in (["msd", "--dataset", str(ds), "--out", str(out)], ["inspect", str(ds)]):
        line = _one_error(capsys, argv)
        assert "'training[1].image' names ./imagesTr/missing.nii.gz, which does not exist" in line
    meta["training"][1] = dict(meta["training"][0])
    (ds / "dataset.json").write_text(json.dumps(meta))
    assert "two training cases have the id 'a_1'" in _one_error(capsys, ["inspect", str(ds)])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_layouts_and_bad_geometry(tmp_path, capsys):
    ds = make_v2(tmp_path / "Dataset219_AMOS", ["amos_0001", "amos_0002"], ["amos_0500"], channels=("CT", "T1"))
    capsys.readouterr()
    assert cli.main(["inspect", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "nnunet-v2 layout, 3 cases" in out and "no warnings" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("amos_")]
    assert [r.split()[0] for r in rows] == ["amos_0001", "amos_0002", "amos_0500"]
    assert "16x14x8x2" in rows[0] and "1-2" in rows[0]
    # a NaN and a rank-deficient affine: warnings naming the file, no traceback, the other cases shown
    nan_img = ds / "imagesTr" / "amos_0002_0001.nii.gz"
    hdr = nib.load(str(nan_img)).header.copy()
    hdr["qform_code"], hdr["srow_x"] = 0, [np.nan, 0, 0, 0]
    nib.Nifti1Image(np.asanyarray(nib.load(str(nan_img)).dataobj), None, header=hdr).to_filename(str(nan_img))
    deg = AFF.copy()
    deg[:3, 1] = deg[:3, 0]
    for c in range(2):
        _write(np.ones(SHAPE, np.int16), ds / "imagesTs" / f"amos_0500_{c:04d}.nii.gz", deg)
    assert cli.main(["inspect", str(ds)]) == 0
    captured = capsys.readouterr()
    warn = [ln for ln in captured.out.splitlines() if ln.startswith("warning:")]
    assert "Traceback" not in captured.out + captured.err and len(warn) == 2, captured.out
    assert any(str(nan_img) in w and "non-finite (NaN/inf) affine" in w for w in warn)
    assert any("amos_0500_0000.nii.gz" in w and "degenerate" in w for w in warn)
    # the same cases in preprocessing: one error line each, the good case done
    capsys.readouterr()
    assert cli.main(["msd", "--dataset", str(ds), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    errs = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(errs) == 2 and all(e.startswith("error: ") for e in errs)
    assert (tmp_path / "o" / "cases" / "amos_0001.npz").is_file()


def test_symlink_loop_image_named(tmp_path, capsys):
    ds = make_v2(tmp_path / "D", ["a", "b"])
    loop = ds / "imagesTr" / "b_0000.nii.gz"
    loop.unlink()
    os.symlink(loop, loop)
    capsys.readouterr()
    assert cli.main(["inspect", str(ds)]) == 0
    out = capsys.readouterr().out
    assert any(str(loop) in ln and "symbolic-link loop" in ln for ln in out.splitlines() if ln.startswith("warning"))
    assert cli.main(["msd", "--dataset", str(ds), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and str(loop) in err[0] and "symbolic-link loop" in err[0]

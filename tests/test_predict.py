"""glam3d predict: geometry round trip (RAS / LPS / oblique), label values, skip/overwrite, refusals, DICOM."""
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

import helpers as H

from glam3d import cli
from glam3d.cli import main
from glam3d.engine.checkpoint import save_checkpoint
from glam3d.models import registry
from glam3d.utils.ownership import MARKER

pipeline = pytest.importorskip("preprocessing.pipeline")

# training index -> raw label value (Synapse ids): 1 aorta (8), 2 liver (6), 3 spleen (1)
LABEL_VALUES = {1: 8, 2: 6, 3: 1}
HU = {0: 0.0, 1: 95.0, 2: 155.0, 3: 215.0}  # body 0 HU; organ i at -125 + 400 * (0.4 + 0.15 i)


class Oracle(torch.nn.Module):
    """Reads the class off the (transunet-normalised) intensity: a train-free model with known answers."""
    in_channels, num_classes, spatial_dims, default_crop = 1, 4, 3, (16, 16, 16)
    autocast_seen: list = []  # the CPU autocast dtype (None: off) of every forward

    def forward(self, x):
        Oracle.autocast_seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        cls = torch.clamp(torch.round((x[:, 0] - 0.4) / 0.15), 0, 3).long()
        cls[x[:, 0] < 0.43] = 0  # midway between body (0.31) and aorta (0.55)
        return 10.0 * torch.nn.functional.one_hot(cls, 4).permute(0, 4, 1, 2, 3).float()


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_ensure_loaded", lambda: None)  # don't depend on other networks importing
    # the oracle is a model family for these tests only (other tests list the registry)
    monkeypatch.setitem(registry._FAMILIES, "testoracle", registry.Family("testoracle", lambda **kw: Oracle(),
                                                                          {"base": {}}))
    # the CLI with only the commands under test (the others are built elsewhere)
    monkeypatch.setattr(cli, "COMMANDS", {"predict": "predict", "evaluate": "evaluate", "show": "show"})


def _rot(deg):
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def make_scan(orientation, shape=(36, 32, 20), spacing=(1.5, 1.5, 3.0)):
    """Phantom scan + truth with blobs at fixed *world* positions, stored in the given orientation."""
    # canonical RAS grid
    ras = np.eye(4)
    ras[:3, :3] = np.diag(spacing)
    ras[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, -shape[2] * spacing[2] / 2]
    lab = np.zeros(shape, np.uint8)
    body = np.zeros(shape, bool)
    body[3:-3, 3:-3, :] = True
    lab[6:14, 8:20, 4:12] = 2          # liver (index 2), patient's right... anterior-ish
    lab[22:30, 10:18, 6:14] = 3        # spleen
    lab[15:21, 19:25, 2:18] = 1        # aorta: a tube along z
    img = np.where(body, 0.0, -1000.0).astype(np.float32)
    for i, hu in HU.items():
        if i:
            img[lab == i] = hu
    raw = np.zeros_like(lab)
    for i, v in LABEL_VALUES.items():
        raw[lab == i] = v
    if orientation == "RAS":
        aff = ras
        return nib.Nifti1Image(img, aff), nib.Nifti1Image(raw, aff), raw
    if orientation == "LPS":  # flip x and y in storage: same world content
        aff = ras.copy()
        aff[:, 0] *= -1
        aff[:, 1] *= -1
        aff[:3, 3] = ras[:3, :3] @ [shape[0] - 1, shape[1] - 1, 0] + ras[:3, 3]
        img2, raw2 = img[::-1, ::-1].copy(), raw[::-1, ::-1].copy()
        return nib.Nifti1Image(img2, aff), nib.Nifti1Image(raw2, aff), raw2
    # oblique: axes permuted (z stored first) and rotated 12 degrees about z
    img2, raw2 = np.ascontiguousarray(img.transpose(2, 0, 1)), np.ascontiguousarray(raw.transpose(2, 0, 1))
    aff = np.eye(4)
    aff[:3, :3] = _rot(12) @ ras[:3, :3][:, [2, 0, 1]]
    aff[:3, 3] = ras[:3, 3]
    return nib.Nifti1Image(img2, aff), nib.Nifti1Image(raw2, aff), raw2


def write_checkpoint(path, target_spacing):
    plan = pipeline.make_plan(target_spacing, {"scheme": "transunet"}, LABEL_VALUES, crop_to_body=True)
    state = {"model_spec": {"name": "testoracle_base", "kwargs": {}}, "model": {}, "plan": plan,
             "labels": {"0": "background", "1": "aorta", "2": "liver", "3": "spleen"},
             "config": {"val": {"roi_size": [16, 16, 16], "overlap": 0.5}, "train": {"seed": 7}}}
    save_checkpoint(path, state)
    return path


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_geometry_round_trip_exact(tmp_path, orientation, capsys):
    img, lab, raw = make_scan(orientation)
    nib.save(img, tmp_path / "img0001.nii.gz")
    # the plan's spacing equals the scan's (sz, sy, sx): no resampling, so the round trip is exact
    ck = write_checkpoint(tmp_path / "ck.pt", [3.0, 1.5, 1.5])
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "img0001.nii.gz"),
                 "--output", str(out), "--quiet"]) == 0
    seg = nib.load(out / "img0001.nii.gz")
    assert seg.shape == img.shape
    assert np.allclose(seg.affine, img.affine, atol=1e-6)
    pred = np.asanyarray(seg.dataobj)
    assert set(np.unique(pred)) == {0, 1, 6, 8}  # Synapse ids, not training indices
    assert np.array_equal(pred, raw)
    man = json.loads((out / "predictions.json").read_text())
    assert len(man["checkpoint"]["sha256"]) == 64 and man["seed"] == 7
    assert man["cases"]["img0001"]["status"] == "written"
    assert "1 written, 0 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_geometry_round_trip_resampled(tmp_path, orientation):
    img, lab, raw = make_scan(orientation)
    (tmp_path / "scans").mkdir()
    nib.save(img, tmp_path / "scans" / "scan.nii")
    ck = write_checkpoint(tmp_path / "ck.pt", [2.0, 1.2, 1.1])  # resampling both ways
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "scans"), "--output", str(out),
                 "--quiet", "--probabilities", "--format", "nii.gz"]) == 0
    seg = nib.load(out / "scan.nii.gz")
    assert seg.shape == img.shape and np.allclose(seg.affine, img.affine, atol=1e-6)
    pred = np.asanyarray(seg.dataobj)
    # organs land where the truth is: every organ's interior (truth eroded by one voxel) is predicted as that
    # organ, and the foreground agrees. (Linear resampling of the intensities makes organ rims pass through other
    # organs' intensity bins, so rims are not compared label by label.)
    from scipy import ndimage
    for v in (8, 6, 1):
        core = ndimage.binary_erosion(raw == v)
        assert (pred[core] == v).mean() > 0.98, v
    assert dice(pred > 0, raw > 0) > 0.9
    probs = nib.load(out / "scan_probabilities.nii.gz")
    assert probs.shape == img.shape + (4,)
    assert np.allclose(probs.affine, img.affine, atol=1e-6)
    p = np.asanyarray(probs.dataobj)
    assert np.allclose(p.sum(-1), 1, atol=1e-3)


def test_predict_reads_the_scan_lazily(tmp_path, monkeypatch):
    """The sliding window reads the preprocessed scan as a LazyScan (rows resampled on demand: no float32 copy of
    the whole resampled scan) of the scan decoded into the output folder and mapped (not held in memory), and the
    label map equals the one from the preprocessed array."""
    from glam3d.inference import sliding_window as inference
    img, _, _ = make_scan("oblique")
    nib.save(img, tmp_path / "scan.nii.gz")
    ck = write_checkpoint(tmp_path / "ck.pt", [2.0, 1.2, 1.1])
    seen, spilled = [], []
    real, real_spill = inference.predict_volume, pipeline.spill_stored
    monkeypatch.setattr(inference, "predict_volume", lambda model, image, *a, **k: (
        seen.append((type(image).__name__, type(k.get("out")).__name__, k.get("spill"))),
        real(model, image, *a, **k))[1])
    monkeypatch.setattr(pipeline, "spill_stored", lambda image, folder: (
        lambda m: (spilled.append((type(m).__name__, folder)), m)[1])(real_spill(image, folder)))
    img16 = nib.Nifti1Image(np.round(img.get_fdata()).astype(np.int16), img.affine)  # a CT as stored: int16 HU
    nib.save(img16, tmp_path / "scan.nii.gz")
    args = ["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "scan.nii.gz"), "--quiet"]
    assert main(args + ["--output", str(tmp_path / "lazy")]) == 0
    # decoded into the (new) output folder, mapped, unlinked: nothing but the outputs is left there
    assert spilled == [("memmap", tmp_path / "lazy")]
    # (and so were the labels, written row by row and mapped back for restoring: no hidden file either)
    assert sorted(p.name for p in (tmp_path / "lazy").iterdir()) == [MARKER, "predictions.json", "scan.nii.gz"]
    (tmp_path / "scr").mkdir()
    assert main(args + ["--output", str(tmp_path / "o2"), "--scratch", str(tmp_path / "scr")]) == 0
    assert main(args + ["--output", str(tmp_path / "o3"), "--scratch", "none"]) == 0   # read into memory
    assert spilled[1:] == [("memmap", tmp_path / "scr")] and list((tmp_path / "scr").iterdir()) == []
    assert main(args + ["--output", str(tmp_path / "o4"), "--scratch", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "o4").exists()
    eager = pipeline.preprocess_scan
    monkeypatch.setattr(pipeline, "preprocess_scan", lambda image, plan, **k: eager(image, plan))
    assert main(args + ["--output", str(tmp_path / "eager")]) == 0
    writer = "NpySlabWriter"   # labels (and the blending's parked sums) to the scratch folder, except with none
    assert seen == [("LazyScan", writer, tmp_path / "lazy"), ("LazyScan", writer, tmp_path / "scr"),
                    ("LazyScan", "NoneType", None), ("Tensor", writer, tmp_path / "eager")]
    a, b, c, d = (np.asanyarray(nib.load(tmp_path / o / "scan.nii.gz").dataobj) for o in ("lazy", "eager", "o2", "o3"))
    assert a.any() and np.array_equal(a, b) and np.array_equal(a, c) and np.array_equal(a, d)


def test_inference_settings_keep_zero_overlap():
    """A checkpoint validated at overlap 0 (or without mirroring) is predicted that way: 0 is a setting, not a
    gap to fill with the 0.5 default; the CLI still wins."""
    import argparse

    from glam3d.inference.predictor import inference_settings
    none = argparse.Namespace(roi_size=None, overlap=None, sw_batch_size=None, mode=None, mirror=None,
                              checkpoint="ck.pt")
    state = {"config": {"val": {"roi_size": [16, 32, 32], "overlap": 0.0, "sw_batch_size": 1, "mirror": False}}}
    got = inference_settings(state, Oracle(), none)
    assert got == {"roi_size": [16, 32, 32], "overlap": 0.0, "sw_batch_size": 1, "mode": "gaussian",
                   "mirror": False}
    assert inference_settings({}, type("M", (), {"default_crop": (8, 8, 8)})(), none)["overlap"] == 0.5
    cli_args = argparse.Namespace(**{**vars(none), "overlap": 0.25, "mirror": True})
    got = inference_settings(state, Oracle(), cli_args)
    assert got["overlap"] == 0.25 and got["mirror"] is True


def test_skip_existing_and_overwrite(tmp_path, capsys):
    """A rerun skips a case only when predictions.json shows the same checkpoint and options made it; --overwrite
    predicts it again; a file glam3d did not write is never replaced, --overwrite or not (one line naming it)."""
    img, _, raw = make_scan("RAS")
    nib.save(img, tmp_path / "a.nii.gz")
    ck = write_checkpoint(tmp_path / "ck.pt", [3.0, 1.5, 1.5])
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "a.nii.gz"), "--output", str(out),
            "--quiet"]
    assert main(args) == 0
    assert "1 written, 0 skipped" in capsys.readouterr().out
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    assert main(args) == 0
    assert "0 written, 1 skipped" in capsys.readouterr().out
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime  # kept
    assert main(args + ["--overwrite"]) == 0
    assert "1 written, 0 skipped" in capsys.readouterr().out
    assert np.array_equal(np.asanyarray(nib.load(out / "a.nii.gz").dataobj), raw)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != MARKER]  # no temporary files
    # a user's file in a folder glam3d never wrote: the folder is refused, the file stays
    user = tmp_path / "user"
    user.mkdir()
    sentinel = nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine)
    nib.save(sentinel, user / "a.nii.gz")
    before = (user / "a.nii.gz").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(args[:-3] + ["--output", str(user), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {user}:") and "not written by glam3d" in err
        assert len(err.strip().splitlines()) == 1
        assert (user / "a.nii.gz").read_bytes() == before and sorted(p.name for p in user.iterdir()) == ["a.nii.gz"]


def test_refusals(tmp_path, capsys):
    img, _, _ = make_scan("RAS")
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(img, scans / "a.nii.gz")
    ck = write_checkpoint(tmp_path / "ck.pt", [3.0, 1.5, 1.5])
    # output folder = input folder: the output a.nii.gz would replace the input
    assert main(["predict", "--checkpoint", str(ck), "--input", str(scans), "--output", str(scans)]) == 2
    assert "input" in capsys.readouterr().err
    # output file would be an input given explicitly from another folder
    other = tmp_path / "other"
    other.mkdir()
    nib.save(img, other / "a.nii.gz")
    assert main(["predict", "--checkpoint", str(ck), "--input", str(other / "a.nii.gz"), str(scans / "a.nii.gz"),
                 "--output", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    # a corrupt input: one line naming it, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.nii.gz").write_bytes(b"not a nifti")
    nib.save(img, bad / "a.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    # missing input, missing checkpoint
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "nope.nii.gz"),
                 "--output", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--input", str(scans),
                 "--output", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # CUDA graphs without a GPU, or beside --compile: refused before anything is read or written
    for extra, words in ((["--device", "cpu", "--cuda-graphs"], "needs a CUDA device"),
                         (["--cuda-graphs", "--compile"], "exclude each other")):
        assert main(["predict", "--checkpoint", str(ck), "--input", str(scans), "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
        assert not out.exists() or not any(out.iterdir())
    # a network with more classes than its plan maps back to label values: refused up front, naming the checkpoint
    short = tmp_path / "short.pt"
    plan = pipeline.make_plan([3.0, 1.5, 1.5], {"scheme": "transunet"}, {1: 8, 2: 6}, crop_to_body=True)
    save_checkpoint(short, {"model_spec": {"name": "testoracle_base", "kwargs": {}}, "model": {}, "plan": plan})
    assert main(["predict", "--checkpoint", str(short), "--input", str(scans), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {short}:") and "4 classes" in err and "0..2" in err
    assert len(err.strip().splitlines()) == 1 and (not out.exists() or not any(out.iterdir()))


def test_shard_over_ranks(tmp_path, monkeypatch):
    img, _, _ = make_scan("RAS", shape=(20, 20, 8))
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        nib.save(img, scans / f"c{i}.nii.gz")
    ck = write_checkpoint(tmp_path / "ck.pt", [3.0, 1.5, 1.5])
    out = tmp_path / "pred"
    for rank in (1, 0):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(["predict", "--checkpoint", str(ck), "--input", str(scans), "--output", str(out), "--quiet",
                     "--device", "cpu"]) == 0
        written = sorted(p.name for p in out.glob("c*.nii.gz"))
        assert written == (["c1.nii.gz"] if rank == 1 else ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"])
    man = json.loads((out / "predictions.json").read_text())
    assert sorted(man["cases"]) == ["c0", "c1", "c2"]


def test_dicom_series_lps_to_ras(tmp_path):
    import SimpleITK as sitk

    from glam3d.inference.cases import collect_cases, read_dicom_series

    arr = (np.arange(6 * 7 * 5).reshape(5, 7, 6) % 200).astype(np.int16)  # (z, y, x)
    vol = sitk.GetImageFromArray(arr)
    vol.SetSpacing((0.8, 0.9, 2.5))
    vol.SetOrigin((-10.0, 20.0, 30.0))
    d = H.write_dicom_series(tmp_path / "series", vol)
    cases = collect_cases([str(d)])
    assert len(cases) == 1 and cases[0].kind == "dicom" and cases[0].name == "series"
    img = read_dicom_series(d, cases[0].series_id)
    assert img.shape == (6, 7, 5)
    data = np.asanyarray(img.dataobj)
    for ijk in [(0, 0, 0), (5, 6, 4), (2, 3, 1)]:
        lps = np.asarray(vol.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)))
        ras = img.affine @ np.r_[ijk, 1]
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
        assert data[ijk] == arr[ijk[2], ijk[1], ijk[0]]


def test_cpu_amp(tmp_path, capsys, monkeypatch):
    """On a CPU: float32 by default, bf16 autocast when asked (with the weights cast once; both recorded in the
    manifest; a warning where the CPU has no native bf16), fp16 refused in one line before anything is written."""
    import glam3d.inference.precision as inf

    img, _, raw = make_scan("RAS")
    nib.save(img, tmp_path / "a.nii.gz")
    ck = write_checkpoint(tmp_path / "ck.pt", [3.0, 1.5, 1.5])
    base = ["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "a.nii.gz"), "--device", "cpu", "--quiet"]
    cast = []
    real_cast = inf.inference_weights
    monkeypatch.setattr(inf, "inference_weights", lambda m, amp: (cast.append(amp), real_cast(m, amp))[1])
    for amp, seen, native in (("auto", None, True), ("bf16", torch.bfloat16, True), ("bf16", torch.bfloat16, False)):
        monkeypatch.setattr(inf, "cpu_bf16_native", lambda native=native: native)
        Oracle.autocast_seen.clear()
        cast.clear()
        out = tmp_path / f"pred_{amp}_{native}"
        assert main(base + ["--output", str(out), "--amp", amp]) == 0
        assert Oracle.autocast_seen and set(Oracle.autocast_seen) == {seen}
        assert np.array_equal(np.asanyarray(nib.load(out / "a.nii.gz").dataobj), raw)
        man = json.loads((out / "predictions.json").read_text())
        assert man["inference"]["amp"] == ("off" if seen is None else "bf16")
        # bf16 on a CPU: the weights are cast once before the sliding window, not by autocast at every window
        assert cast == ([] if seen is None else [torch.bfloat16])
        assert man["inference"]["weights"] == ("float32" if seen is None else "bf16")
        err = capsys.readouterr().err
        assert ("no native bf16" in err) is (amp == "bf16" and not native)
    out = tmp_path / "pred_fp16"
    assert main(base + ["--output", str(out), "--amp", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --amp") and "fp16" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_probabilities_go_through_scratch_and_equal_the_in_memory_ones(tmp_path, monkeypatch, orientation):
    """--probabilities: the blended maps go to an unlinked scratch file (not memory), are restored one class at a
    time in Z-slabs (made whole first only where the plan moves the stored slice axis: the oblique scan) and
    streamed into the 4D NIfTI; the file equals the one made from in-memory maps (--scratch none) and the
    whole-map restoring (restore_probabilities)."""
    from glam3d.inference import sliding_window as inference
    from glam3d.utils import ooc as cmd
    monkeypatch.setattr(pipeline, "SLAB_BYTES", 1 << 12)  # several slabs per class map on this small scan
    img, _, _ = make_scan(orientation)
    nib.save(img, tmp_path / "scan.nii.gz")
    ck = write_checkpoint(tmp_path / "ck.pt", [2.0, 1.2, 1.1])
    made, classes = [], []
    real_init, real_restored = cmd.ScratchArray.__init__, pipeline.restored_probabilities
    monkeypatch.setattr(cmd.ScratchArray, "__init__", lambda self, folder, shape: (
        made.append(shape), real_init(self, folder, shape))[1])

    def restored(probs, meta, plan):
        for slabs in real_restored(probs, meta, plan):
            slabs = list(slabs)
            classes.append((sum(s.shape[2] for s in slabs), len(slabs)))
            yield slabs
    monkeypatch.setattr(pipeline, "restored_probabilities", restored)
    kept = {"probs": []}  # the blended maps each run's sliding window returned (a copy)
    real_pv = inference.predict_volume

    def predict_volume(*a, **k):
        result = real_pv(*a, **k)
        kept["probs"].append(np.array(np.asarray(result[1])))
        return result
    monkeypatch.setattr(inference, "predict_volume", predict_volume)
    outs = {}
    for name, extra in (("scratch", []), ("memory", ["--scratch", "none"])):
        out = tmp_path / name
        assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "scan.nii.gz"), "--output",
                     str(out), "--quiet", "--probabilities", *extra]) == 0
        assert sorted(p.name for p in out.iterdir()) == [MARKER, "predictions.json", "scan.nii.gz",
                                                         "scan_probabilities.nii.gz"]
        outs[name] = nib.load(out / "scan_probabilities.nii.gz")
    assert len(made) == 1 and made[0][0] == 4  # only the run with a scratch folder mapped its maps there
    assert [z for z, _ in classes] == [img.shape[2]] * 8  # one class at a time, all its planes, in both runs
    assert min(n for _, n in classes) > 1
    a, b = (np.asanyarray(outs[k].dataobj) for k in ("scratch", "memory"))
    assert a.shape == img.shape + (4,) and np.array_equal(a, b)
    assert np.allclose(a.sum(-1), 1, atol=1e-3)
    assert outs["scratch"].header.get_intent()[0] == "vector"
    # the whole-map path (K whole volumes in memory) from the same blended maps
    assert np.array_equal(kept["probs"][0], kept["probs"][1])
    plan = torch.load(ck, weights_only=True)["plan"]
    whole = pipeline.restore_probabilities(kept["probs"][0], pipeline.preprocess_scan(img, plan)[1], plan)
    np.testing.assert_array_equal(a, np.moveaxis(whole, 0, -1))  # bit for bit
    assert np.allclose(outs["scratch"].affine, img.affine, atol=1e-6)


def test_bf16_cast_lets_the_mapped_checkpoint_go(tmp_path):
    """glam3d predict --amp bf16 on a CPU: the weights cast once and the remaining tensors copied, so that none is
    left on the mapped checkpoint file — the mapping (and its float32 pages) goes — and the network's bf16
    outputs are those of autocast on the mapped float32 weights, bit for bit."""
    import gc

    import glam3d.models.networks  # noqa: F401  (the real networks; this module's registry is isolated)
    from glam3d.inference.precision import cast_off_the_map as _cast_off_the_map
    from glam3d.engine.checkpoint import checkpoint_metadata, load_checkpoint, model_from_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, {"model_spec": {"name": "nnformer_tiny", "kwargs": {}},
                           "model": registry.build_model("nnformer_tiny").state_dict()})

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return str(path) in f.read()

    state = load_checkpoint(path, mmap=True)
    model = model_from_checkpoint(state, path, assign=True).eval()
    state = checkpoint_metadata(state)
    gc.collect()
    assert mapped()  # the weights are the file's pages
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    _cast_off_the_map(model, torch.bfloat16)
    gc.collect()
    assert not mapped()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), ref)

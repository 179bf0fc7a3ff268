"""Largest-connected-component postprocessing: the cleaning functions, nnU-Net's decision rule, and the
glam3d evaluate --decide-postprocessing / glam3d postprocess decide|apply commands."""
import json
import math

import nibabel as nib
import numpy as np
import pytest

from glam3d import cli
from glam3d.cli import main
from glam3d.errors import UserError
from glam3d.postprocessing import (DECISION_FORMAT, apply_postprocessing, check_decision, decide_postprocessing,
                                   keep_largest_component, keep_largest_foreground_component, load_decision)


@pytest.fixture(autouse=True)
def _only_my_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"evaluate": "evaluate", "postprocess": "postprocess"})


# ------------------------------------------------------------------------------------------------ cleaning
def test_keep_largest_component_hand_built():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:4, 1:4, 1:4] = 1          # class 1: 27 voxels
    lab[8:10, 8:10, 8:10] = 1       # class 1: 8 voxels, far away -> removed
    lab[4, 4, 4] = 1                # touches the big block only at a corner: connected (26-neighbourhood)
    lab[6:8, 1:3, 1:3] = 2          # class 2: 8 voxels
    lab[6, 10, 10] = 2              # class 2: 1 voxel -> removed
    lab[10, 1, 1] = 3               # class 3, not asked for: kept
    lab[10, 5, 5] = 3
    before = lab.copy()
    out = keep_largest_component(lab, classes=[1, 2])
    np.testing.assert_array_equal(lab, before)  # the input is untouched
    assert out.dtype == lab.dtype
    expect = before.copy()
    expect[8:10, 8:10, 8:10] = 0
    expect[6, 10, 10] = 0
    np.testing.assert_array_equal(out, expect)
    # every class present (None), in place
    same = keep_largest_component(lab, inplace=True)
    assert same is lab and (lab == 3).sum() == 1 and lab[4, 4, 4] == 1
    # a class that is absent, and an empty map
    np.testing.assert_array_equal(keep_largest_component(before, classes=[7]), before)
    assert keep_largest_component(np.zeros((3, 3, 3), np.int16)).sum() == 0
    with pytest.raises(ValueError, match="integer"):
        keep_largest_component(before.astype(np.float32))
    with pytest.raises(ValueError, match="positive"):
        keep_largest_component(before, classes=[0])


def test_keep_largest_foreground_component():
    lab = np.zeros((10, 10, 10), np.uint16)
    lab[1:5, 1:5, 1:5] = 1
    lab[5:7, 1:5, 1:5] = 2      # touches class 1: one foreground component with it
    lab[8:10, 8:10, 8:10] = 1   # away: removed
    lab[8, 1, 8] = 3            # away, other class: removed too (all foreground as one)
    out = keep_largest_foreground_component(lab)
    assert (out == 2).sum() == (lab == 2).sum() and (out == 1).sum() == 64 and (out == 3).sum() == 0
    # restricted to classes 1 and 2: class 3 is not part of the foreground considered and stays
    out = keep_largest_foreground_component(lab, classes=[1, 2])
    assert (out == 3).sum() == 1 and (out == 1).sum() == 64


def test_matches_monai_keep_largest_connected_component():
    """Random label maps: the same result as MONAI's KeepLargestConnectedComponent (independent per class,
    full connectivity), an implementation written independently of ours."""
    import skimage  # noqa: F401  (MONAI's CPU path needs scikit-image: in the test extra)
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    rng = np.random.default_rng(0)
    for _trial in range(4):
        lab = rng.choice(4, size=(20, 18, 16), p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
        ref = KeepLargestConnectedComponent(applied_labels=[1, 2, 3], is_onehot=False, independent=True)(
            torch.from_numpy(lab.astype(np.int64))[None])
        np.testing.assert_array_equal(keep_largest_component(lab), np.asarray(ref[0]).astype(np.uint8))
        ref = KeepLargestConnectedComponent(applied_labels=[1, 2, 3], is_onehot=False, independent=False)(
            torch.from_numpy(lab.astype(np.int64))[None])
        np.testing.assert_array_equal(keep_largest_foreground_component(lab), np.asarray(ref[0]).astype(np.uint8))


def _decision(fg=False, classes=()):
    return {"format": DECISION_FORMAT, "foreground_largest_component": {"apply": fg, "classes": None},
            "classes_largest_component": list(classes)}


def test_apply_postprocessing_api():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    lab[7:9, 7:9, 7:9] = 1
    lab[1:3, 6:8, 6:8] = 2
    lab[8, 1, 1] = 2
    out = apply_postprocessing(lab, _decision(classes=[2]))
    assert (out == 1).sum() == (lab == 1).sum() and (out == 2).sum() == 8
    out = apply_postprocessing(lab, "all")
    assert (out == 1).sum() == 27 and (out == 2).sum() == 8
    out = apply_postprocessing(lab, _decision(fg=True))
    assert (out > 0).sum() == 27  # the largest foreground component is class 1's block
    np.testing.assert_array_equal(apply_postprocessing(lab, None), lab)
    with pytest.raises(UserError, match="format"):
        apply_postprocessing(lab, {"classes_largest_component": [1]})
    with pytest.raises(UserError, match="label values"):
        check_decision({**_decision(), "classes_largest_component": ["liver"]})
    with pytest.raises(ValueError, match="'all'"):
        apply_postprocessing(lab, "some")


# ------------------------------------------------------------------------------------------------ decision rule
def _cases(raw, fg, cls, fg_cls):
    """One case per column: each argument is ``{organ: [dice per case]}``."""
    n = len(next(iter(raw.values())))
    return {f"c{i}": {k: {o: v[i] for o, v in d.items()} for k, d in
                      (("raw", raw), ("fg", fg), ("cls", cls), ("fg_cls", fg_cls))} for i in range(n)}


ORGANS = [("liver", 1), ("spleen", 2)]


def test_decision_follows_nnunet():
    # foreground step raises the mean and lowers no organ: kept; then per class on top of it
    d = decide_postprocessing(_cases({"liver": [0.8, 0.9], "spleen": [0.7, 0.7]},
                                     {"liver": [0.9, 0.9], "spleen": [0.7, 0.7]},
                                     {"liver": [0.9, 0.9], "spleen": [0.6, 0.6]},
                                     {"liver": [0.9, 0.95], "spleen": [0.7, 0.7]}), ORGANS)
    assert d["foreground_largest_component"]["apply"] is True
    per = {e["name"]: e for e in d["per_class"]}
    assert per["liver"]["apply"] is True and per["liver"]["dice_without"] == pytest.approx(0.9)
    assert per["liver"]["dice_with"] == pytest.approx(0.925)
    assert per["spleen"]["apply"] is False  # equal Dice: a tie is not kept
    assert d["classes_largest_component"] == [1]
    assert d["mean_dice"]["with"] == pytest.approx((0.925 + 0.7) / 2)
    # the foreground step lowers one organ (although the mean rises): not kept; per class judged on the raw maps
    d = decide_postprocessing(_cases({"liver": [0.5, 0.5], "spleen": [0.9, 0.9]},
                                     {"liver": [0.9, 0.9], "spleen": [0.8, 0.8]},
                                     {"liver": [0.6, 0.6], "spleen": [0.95, 0.95]},
                                     {"liver": [0.9, 0.9], "spleen": [0.8, 0.8]}), ORGANS)
    fg = d["foreground_largest_component"]
    assert fg["apply"] is False and fg["classes_worse"] == ["spleen"]
    assert fg["mean_dice_with"] > fg["mean_dice_without"]
    assert [e["apply"] for e in d["per_class"]] == [True, True]
    assert d["mean_dice"]["without"] == pytest.approx(0.7) and d["mean_dice"]["with"] == pytest.approx(0.775)
    # a case where the organ is absent from both (NaN) is left out of that organ's mean
    nan = float("nan")
    d = decide_postprocessing(_cases({"liver": [0.5, nan], "spleen": [0.9, 0.9]},
                                     {"liver": [0.5, nan], "spleen": [0.9, 0.9]},
                                     {"liver": [0.6, nan], "spleen": [0.9, 0.9]},
                                     {"liver": [0.6, nan], "spleen": [0.9, 0.9]}), ORGANS)
    assert d["per_class"][0]["dice_with"] == pytest.approx(0.6) and d["per_class"][0]["apply"]


# ------------------------------------------------------------------------------------------------ commands
AFF = np.diag([1.0, 1.0, 2.0, 1.0])


def _truth():
    g = np.zeros((24, 24, 12), np.uint8)
    g[2:10, 2:10, 2:8] = 1        # liver: one block
    g[14:18, 3:7, 3:7] = 2        # spleen: two pieces in the truth (keeping one hurts)
    g[14:18, 14:18, 3:7] = 2
    return g


@pytest.fixture
def validation(tmp_path):
    """Three validation cases: the liver prediction carries a far speck (the largest component helps), the spleen
    prediction is right with its two pieces (the largest component would remove one)."""
    gt, pred = tmp_path / "labelsTr", tmp_path / "fold_0" / "validation"
    gt.mkdir()
    pred.mkdir(parents=True)
    for i in range(3):
        g = _truth()
        p = g.copy()
        p[20:22, 20:22, 9:11] = 1
        nib.save(nib.Nifti1Image(g, AFF), gt / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(p, AFF), pred / f"case_{i}.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    (pred / "predictions.json").write_text(json.dumps(
        {"checkpoint": {"path": "/r/fold_0/best.pt", "sha256": "c" * 64}, "labels": None,
         "cases": {f"case_{i}": {"output": str(pred / f"case_{i}.nii.gz"), "checkpoint_sha256": "c" * 64}
                   for i in range(3)}}))
    return tmp_path


def test_decide_and_apply(validation, capsys):
    t = validation
    out = t / "pp"
    assert main(["postprocess", "decide", "--pred", str(t / "fold_0" / "validation"), "--gt", str(t / "labelsTr"),
                 "--labels", str(t / "labels.json"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "largest component kept for liver" in printed
    d = load_decision(out / "postprocessing.json")
    assert d["foreground_largest_component"]["apply"] is False
    per = {e["name"]: e for e in d["per_class"]}
    assert per["liver"]["apply"] and per["liver"]["dice_with"] == 1.0 and per["liver"]["dice_without"] < 1.0
    assert not per["spleen"]["apply"] and per["spleen"]["dice_with"] < per["spleen"]["dice_without"]
    assert d["classes_largest_component"] == [1] and d["cases"] == 3
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Postprocessing" in md and "| liver | " in md and "| yes | yes |" in md and "| no | no |" in md
    rep = json.loads((out / "report.json").read_text())
    assert rep["postprocessing"]["classes_largest_component"] == [1]

    # apply it to the folder: the liver speck goes, the spleen's two pieces stay; the input is untouched
    src = t / "fold_0" / "validation"
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = t / "cleaned"
    assert main(["postprocess", "apply", "--input", str(src), "--out", str(dst), "--pp",
                 str(out / "postprocessing.json"), "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    for i in range(3):
        img = nib.load(str(dst / f"case_{i}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), _truth())
        np.testing.assert_array_equal(img.affine, AFF)
        assert img.get_data_dtype() == np.uint8
    man = json.loads((dst / "predictions.json").read_text())
    assert man["postprocessing"]["classes_largest_component"] == [1]
    assert man["cases"]["case_0"]["voxels_removed"] == 8 and man["cases"]["case_0"]["checkpoint_sha256"] == "c" * 64
    capsys.readouterr()
    # the cleaned folder scores better, and its report still names the checkpoint
    assert main(["evaluate", "--pred", str(dst), "--gt", str(t / "labelsTr"), "--labels", str(t / "labels.json"),
                 "--out", str(t / "rep2"), "--quiet"]) == 0
    rep2 = json.loads((t / "rep2" / "report.json").read_text())
    assert rep2["per_organ"]["liver"]["dice"]["mean"] == 1.0
    assert rep2["checkpoints"][0]["sha256"] == "c" * 64 and len(rep2["checkpoints"][0]["cases"]) == 3

    # existing outputs are not replaced without --overwrite; an output inside the input is refused
    capsys.readouterr()
    assert main(["postprocess", "apply", "--input", str(src), "--out", str(dst), "--pp", "all", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["postprocess", "apply", "--input", str(src), "--out", str(dst), "--pp", "all", "--quiet",
                 "--overwrite"]) == 0
    assert (np.asarray(nib.load(str(dst / "case_0.nii.gz")).dataobj) == 2).sum() == 64  # 'all': one spleen piece
    assert main(["postprocess", "apply", "--input", str(src), "--out", str(src / "pp"), "--pp", "all"]) == 2
    assert "inside the input" in capsys.readouterr().err and not (src / "pp").exists()
    (t / "bad.json").write_text('{"format": "x"}')
    assert main(["postprocess", "apply", "--input", str(src), "--out", str(t / "o3"), "--pp",
                 str(t / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert str(t / "bad.json") in err and "decision" in err and not (t / "o3").exists()


def test_evaluate_decide_postprocessing_option(validation, capsys):
    t = validation
    pp = t / "decision.json"
    assert main(["evaluate", "--pred", str(t / "fold_0" / "validation"), "--gt", str(t / "labelsTr"),
                 "--labels", str(t / "labels.json"), "--out", str(t / "rep"), "--decide-postprocessing", str(pp),
                 "--quiet"]) == 0
    d = json.loads(pp.read_text())
    assert d["classes_largest_component"] == [1] and not (t / "rep" / "postprocessing.json").exists()
    assert math.isclose(d["mean_dice"]["with"], (1.0 + d["dice_per_class"]["without"]["spleen"]) / 2)


def test_apply_keeps_format_and_geometry_simpleitk(tmp_path, capsys):
    """.nrrd stays .nrrd, .mhd (a header beside its data file) becomes a single .mha; spacing, origin, direction
    and voxel type are the input's."""
    import SimpleITK as sitk

    src = tmp_path / "in"
    src.mkdir()
    a = np.zeros((8, 10, 12), np.uint16)
    a[1:4, 1:4, 1:4] = 2
    a[6, 8, 10] = 2
    for name in ("c1.nrrd", "c2.mhd"):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((0.7, 0.8, 2.0))
        img.SetOrigin((1.0, -2.0, 3.0))
        img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(img, str(src / name))
    assert main(["postprocess", "apply", "--input", str(src), "--out", str(tmp_path / "out"), "--pp", "all",
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c1.nrrd", "c2.mha"]
    for name in ("c1.nrrd", "c2.mha"):
        img = sitk.ReadImage(str(tmp_path / "out" / name))
        assert img.GetSpacing() == pytest.approx((0.7, 0.8, 2.0)) and img.GetOrigin() == pytest.approx((1, -2, 3))
        assert img.GetDirection() == pytest.approx((0, 1, 0, 1, 0, 0, 0, 0, 1))
        arr = sitk.GetArrayFromImage(img)
        assert arr.dtype == np.uint16 and (arr == 2).sum() == 27

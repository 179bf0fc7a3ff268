"""glam3d evaluate: report files, pairing, provenance, conventions, refusals; show overlay renders."""
import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from glam3d import cli
from glam3d.cli import main
from glam3d.metrics.report import (SYNAPSE_ORGANS, case_key, evaluate_folders, labels_from_dataset,
                                   resolve_labels, write_report)


@pytest.fixture(autouse=True)
def _only_my_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"predict": "predict", "evaluate": "evaluate", "show": "show"})


AFF = np.diag([0.8, 0.8, 2.5, 1.0])


def truth(shape=(24, 24, 12)):
    g = np.zeros(shape, np.uint8)
    g[2:10, 2:10, 2:8] = 6      # liver
    g[14:20, 3:9, 3:9] = 1      # spleen
    g[11:13, 11:13, 1:11] = 8   # aorta
    g[15:19, 14:18, 4:8] = 3    # left kidney
    return g


def save(path, arr, aff=AFF):
    nib.save(nib.Nifti1Image(arr, aff), path)


@pytest.fixture
def folders(tmp_path):
    gt_dir, pr_dir = tmp_path / "RAW" / "label", tmp_path / "pred"
    gt_dir.mkdir(parents=True)
    pr_dir.mkdir()
    for i in (1, 2):
        g = truth()
        p = g.copy()
        if i == 2:
            p = np.roll(p, 1, axis=0)  # shifted one voxel (0.8 mm)
            p[p == 3] = 0              # left kidney missed
            p[20:22, 20:22, 1:3] = 4   # gallbladder predicted, absent from truth
        save(gt_dir / f"label000{i}.nii.gz", g)
        save(pr_dir / f"img000{i}.nii.gz", p)
    (pr_dir / "predictions.json").write_text(json.dumps(
        {"checkpoint": {"path": "/x/best.pt", "sha256": "ab" * 32}, "code": {"glam3d": "0.1.0"},
         "inference": {"overlap": 0.5}, "seed": 3}))
    return tmp_path


def test_case_keys():
    assert case_key("img0001.nii.gz") == case_key("label0001.nii.gz") == "0001"
    assert case_key("case_7_0000.nii.gz") == "case_7"
    assert case_key("0001.nii") == "0001"


def test_evaluate_cli_writes_report(folders, capsys):
    out = folders / "report"
    assert main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "RAW"), "--labels", "synapse",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| Metric | Aorta | Gallbladder | Left Kidney |" in printed
    for f in ("report.json", "report.csv", "report.md", "report.png"):
        assert (out / f).stat().st_size > 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["organs"] == [n for n, _ in SYNAPSE_ORGANS] and rep["n_cases"] == 2
    assert rep["provenance"]["checkpoint"]["sha256"] == "ab" * 32
    assert rep["provenance"]["evaluation"]["convention"] == "glam3d"
    c1, c2 = rep["cases"]["0001"]["organs"], rep["cases"]["0002"]["organs"]
    assert c1["liver"]["dice"] == 1.0 and c1["liver"]["hd95"] == 0.0
    # absent from both: excluded (null) and counted
    assert c1["pancreas"]["dice"] is None and c1["pancreas"]["status"] == "absent"
    assert rep["per_organ"]["pancreas"]["dice"]["n"] == 0 and rep["per_organ"]["pancreas"]["dice"]["excluded"] == 2
    # case 2: 1-voxel shift along an axis of 0.8 mm; missed kidney; gallbladder false positive
    assert c2["liver"]["hd95"] == pytest.approx(0.8)
    assert c2["left kidney"]["status"] == "missed" and c2["left kidney"]["dice"] == 0.0
    assert c2["gallbladder"]["dice"] == 0.0 and c2["gallbladder"]["hd95"] is None
    assert rep["per_organ"]["gallbladder"]["dice"]["n"] == 1  # case 1 excluded (absent from both)
    # overall mean = mean of organ means over counted organs, never NaN
    means = [rep["per_organ"][n]["dice"]["mean"] for n in rep["organs"] if rep["per_organ"][n]["dice"]["n"]]
    assert rep["overall"]["dice"]["mean"] == pytest.approx(np.mean(means))
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "—" in md and "glam3d convention" in md and "ab" * 32 in md
    rows = list(csv.reader((out / "report.csv").open(encoding="utf-8")))
    assert rows[0][0] == "case" and rows[1][0] == "0001" and rows[-3][0] == "mean"


def test_conventions_differ(folders):
    pc = {c: evaluate_folders(folders / "pred", folders / "RAW" / "label", "synapse", c)
          for c in ("glam3d", "nnformer", "transunet")}
    g, n, t = (pc[c]["0001"]["organs"]["pancreas"] for c in ("glam3d", "nnformer", "transunet"))
    assert math.isnan(g["dice"]) and n["dice"] == 1.0 and t["dice"] == 0.0
    gb = [pc[c]["0002"]["organs"]["gallbladder"]["dice"] for c in ("glam3d", "nnformer", "transunet")]
    assert gb == [0.0, 0.0, 1.0]
    # HD95: mm (0.8 mm voxels along the shift) vs voxels
    assert pc["glam3d"]["0002"]["organs"]["liver"]["hd95"] == pytest.approx(0.8)
    assert pc["nnformer"]["0002"]["organs"]["liver"]["hd95"] == pytest.approx(1.0)
    s = write_report(pc["nnformer"], folders / "r2", [n for n, _ in SYNAPSE_ORGANS], "nnformer", {})
    assert s["hd95_unit"] == "voxels" and s["per_organ"]["pancreas"]["dice"]["mean"] == 1.0


def test_errors_name_the_case(folders, capsys):
    pred = folders / "pred"
    # geometry mismatch
    save(pred / "img0002.nii.gz", truth(), aff=np.diag([0.8, 0.8, 3.0, 1.0]))
    out = folders / "rep"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(folders / "RAW"), "--labels", "synapse", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "case 0002" in err and "geometry" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written
    # shape mismatch
    save(pred / "img0002.nii.gz", truth((24, 24, 10)))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(folders / "RAW"), "--labels", "synapse", "--out",
                 str(out)]) == 2
    assert "case 0002" in capsys.readouterr().err
    # missing prediction
    (pred / "img0002.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred), "--gt", str(folders / "RAW"), "--labels", "synapse", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "case 0002" in err and "no prediction" in err
    # not a label map
    save(pred / "img0002.nii.gz", truth().astype(np.float32) + 0.5)
    assert main(["evaluate", "--pred", str(pred), "--gt", str(folders / "RAW"), "--labels", "synapse", "--out",
                 str(out)]) == 2
    assert "non-integer" in capsys.readouterr().err
    assert not out.exists()


def test_labels_from_dataset_json(tmp_path):
    ds = {"labels": {"0": "background", "1": "spleen", "2": "kidney_left", "3": "aorta", "4": "bladder"},
          "plan": {"label_values": {"1": 1, "2": 3, "3": 8, "4": 14}}}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    got = resolve_labels(str(tmp_path / "dataset.json"))
    assert got == [("aorta", 8), ("kidney_left", 3), ("spleen", 1), ("bladder", 14)]  # Synapse order first
    assert labels_from_dataset({"0": "bg", "1": "x"}) == [("x", 1)]
    from glam3d.errors import UserError
    with pytest.raises(UserError, match="dataset.json"):
        resolve_labels(str(tmp_path / "nope.json"))


def test_show_overlay(folders, tmp_path):
    img = np.random.default_rng(0).normal(40, 30, (24, 24, 12)).astype(np.float32)
    save(tmp_path / "img.nii.gz", img)
    out = tmp_path / "ov.png"
    assert main(["show", "overlay", "--image", str(tmp_path / "img.nii.gz"),
                 "--pred", str(folders / "pred" / "img0002.nii.gz"),
                 "--gt", str(folders / "RAW" / "label" / "label0002.nii.gz"), "--out", str(out), "--slices", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a prediction on another grid is refused
    save(tmp_path / "bad.nii.gz", truth((24, 24, 10)))
    assert main(["show", "overlay", "--image", str(tmp_path / "img.nii.gz"), "--pred", str(tmp_path / "bad.nii.gz"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_show_attention_glam_nnformer_tiny(tmp_path, monkeypatch):
    """End to end with a real GLAM network (random weights): the eq. 7 map of a voxel is drawn."""
    torch = pytest.importorskip("torch")
    pipeline = pytest.importorskip("preprocessing.pipeline")
    from glam3d.engine.checkpoint import save_checkpoint
    from glam3d.models import build_model

    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny")
    plan = pipeline.make_plan([2.5, 0.8, 0.8], {"scheme": "transunet"}, {1: 8, 2: 6}, crop_to_body=False)
    save_checkpoint(tmp_path / "ck.pt", {"model_spec": model.glam3d_spec, "model": model.state_dict(),
                                         "plan": plan, "config": {"data": {"roi_size": [32, 64, 64]}}})
    img = np.random.default_rng(0).normal(40, 30, (48, 40, 20)).astype(np.float32)
    save(tmp_path / "img.nii.gz", img)
    out = tmp_path / "attn.png"
    assert main(["show", "attention", "--checkpoint", str(tmp_path / "ck.pt"), "--image", str(tmp_path / "img.nii.gz"),
                 "--voxel", "10", "20", "24", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["show", "attention", "--checkpoint", str(tmp_path / "ck.pt"), "--image", str(tmp_path / "img.nii.gz"),
                 "--voxel", "10", "20", "99", "--out", str(tmp_path / "b.png")]) == 2
    assert not (tmp_path / "b.png").exists()


# ------------------------------------------------------------------------------------------------ label sets
def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_label_set_sources(tmp_path):
    from glam3d.errors import UserError
    from glam3d.metrics.labels import load_label_set

    v2 = _write(tmp_path / "v2" / "dataset.json", {"labels": {"background": 0, "liver": 1, "tumour": 2},
                                                   "file_ending": ".nii.gz"})
    ls = load_label_set(str(v2))
    assert ls.organs == [("liver", 1), ("tumour", 2)] and ls.declared == {0, 1, 2}
    assert load_label_set(str(tmp_path / "v2")).organs == ls.organs  # a folder holding dataset.json
    msd = _write(tmp_path / "msd.json", {"labels": {"0": "background", "1": "spleen", "2": "kidney_left"}})
    ls = load_label_set(str(msd))
    assert ls.organs == [("kidney_left", 2), ("spleen", 1)] and ls.declared == {0, 1, 2}
    # nnU-Net's ignore label: declared, not scored
    ls = load_label_set(str(_write(tmp_path / "ign.json", {"labels": {"background": 0, "liver": 1, "ignore": 2}})))
    assert ls.organs == [("liver", 1)] and ls.ignore == 2 and 2 in ls.allowed_in_prediction()
    # mapping files, both directions
    assert load_label_set(str(_write(tmp_path / "m1.json", {"liver": 6, "aorta": 8}))).organs == \
        [("aorta", 8), ("liver", 6)]
    assert load_label_set(str(_write(tmp_path / "m2.json", {"6": "liver", "8": "aorta"}))).declared == {0, 6, 8}
    # preprocessed glam3d dataset.json: training index -> original value; the raw dataset's declared set
    raw = _write(tmp_path / "raw" / "dataset.json", {"labels": {"background": 0, "a": 3, "b": 7, "c": 9}})
    pre = _write(tmp_path / "pre" / "dataset.json", {"labels": {"0": "background", "1": "a", "2": "b"},
                                                     "plan": {"label_values": {"1": 3, "2": 7}},
                                                     "source": str(raw.parent)})
    ls = load_label_set(str(pre))
    assert ls.organs == [("a", 3), ("b", 7)] and ls.declared == {0, 3, 7, 9}
    # ... without a readable source: unknown, except for BTCV organs at their BTCV values (Synapse)
    d = json.loads(pre.read_text())
    d["source"] = str(tmp_path / "gone")
    assert load_label_set(str(_write(tmp_path / "pre2.json", d))).declared is None
    syn = {"labels": {"0": "background", "1": "aorta", "2": "liver"}, "plan": {"label_values": {"1": 8, "2": 6}}}
    assert load_label_set(syn).declared == set(range(14))
    assert load_label_set("Synapse").declared == set(range(14))
    for bad, msg in (({"labels": {"background": 0, "whole tumor": [1, 2, 3]}}, "region-based"),
                     ({"labels": {"background": 0, "a": 1}, "regions_class_order": [1]}, "region-based"),
                     ({"liver": "one"}, "direction"),
                     ({"labels": ["liver"]}, "must be a mapping"),
                     ({"labels": {"a": 1, "b": 1}}, "share the value 1"),
                     ({"labels": {"background": 0}}, "no foreground")):
        p = _write(tmp_path / "bad.json", bad)
        with pytest.raises(UserError, match=msg) as e:
            load_label_set(str(p))
        assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_no_label_set_is_one_error_line(folders, capsys):
    """Neither --labels nor a manifest with labels: one line asking for --labels, nothing written."""
    out = folders / "rep"
    (folders / "pred" / "predictions.json").unlink()
    for extra in ([], ["--only-predicted"]):
        assert main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "RAW"), "--out", str(out),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--labels" in err and str(folders / "pred") in err
        assert not out.exists()
    # a region-based nnU-Net dataset.json: one line too
    ds = _write(folders / "ds.json", {"labels": {"background": 0, "tumor core": [2, 3]}})
    assert main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "RAW"), "--labels", str(ds),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "region-based" in err and not out.exists()


def test_manifest_labels_score_original_values(folders, capsys):
    """The labels recorded by glam3d predict (training index -> original value) name the organs."""
    pred = folders / "pred"
    man = json.loads((pred / "predictions.json").read_text())
    man.update({"labels": {"0": "background", "1": "liver", "2": "spleen"}, "label_values": {"1": 6, "2": 1}})
    (pred / "predictions.json").write_text(json.dumps(man))
    out = folders / "rep"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(folders / "RAW"), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["organs"] == ["liver", "spleen"] and rep["evaluation"]["labels"].endswith("predictions.json")
    assert rep["cases"]["0001"]["organs"]["liver"]["dice"] == 1.0
    # the truth holds aorta (8) and left kidney (3): not in the model's label set, but the set is BTCV's (silent)
    assert rep["warnings"] == [] and "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ layouts
def _nnunet_raw(root, n=3, ext=".nii.gz"):
    """nnUNet_raw/Dataset001_Abd: labelsTr/case_00i, dataset.json (v2, names -> values)."""
    raw = root / "Dataset001_Abd"
    (raw / "labelsTr").mkdir(parents=True)
    _write(raw / "dataset.json", {"labels": {"background": 0, "liver": 6, "spleen": 1, "aorta": 8, "left kidney": 3},
                                  "file_ending": ext, "channel_names": {"0": "CT"}, "numTraining": n})
    gts = {}
    for i in range(n):
        g = truth()
        if i == 1:
            g[g == 3] = 0
        gts[f"case_{i:03d}"] = g
        _save_any(raw / "labelsTr" / f"case_{i:03d}{ext}", g)
    return raw, gts


def _save_any(path, arr, aff=AFF):
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith((".nii.gz", ".nii")):
        save(path, arr, aff)
        return
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    sp = np.sqrt((lps[:3, :3] ** 2).sum(0))
    img.SetSpacing(tuple(float(s) for s in sp))
    img.SetOrigin(tuple(float(x) for x in lps[:3, 3]))
    img.SetDirection(tuple(float(x) for x in (lps[:3, :3] / sp).ravel()))
    sitk.WriteImage(img, str(path))


def _pred_of(g, i):
    p = g.copy()
    if i % 2:
        p = np.roll(p, 1, axis=0)
    return p


def test_layouts_nnunet_monai_and_simpleitk_formats(tmp_path, capsys):
    raw, gts = _nnunet_raw(tmp_path)
    ds = str(raw / "dataset.json")
    reports = {}
    # nnU-Net output folder: case.nii.gz plus nnU-Net's own side files
    nn = tmp_path / "nnunet_pred"
    nn.mkdir()
    for c, g in gts.items():
        save(nn / f"{c}.nii.gz", _pred_of(g, int(c[-1])))
        np.savez(nn / f"{c}.npz", probabilities=np.zeros(2))
    for f in ("summary.json", "plans.json", "dataset.json", "predict_from_raw_data_args.json"):
        (nn / f).write_text("{}")
    # MONAI SaveImage: <case>/<case>_seg.nii.gz (one with the default postfix _trans, one without postfix)
    mo = tmp_path / "monai_pred"
    for j, (c, g) in enumerate(gts.items()):
        name = {0: f"{c}_seg", 1: f"{c}_trans", 2: c}[j]
        _save_any(mo / c / f"{name}.nii.gz", _pred_of(g, j))
    # SimpleITK formats for both sides: .mha predictions, .nrrd truths
    raw_nrrd, _ = _nnunet_raw(tmp_path / "nrrd", ext=".nrrd")
    mha = tmp_path / "mha_pred"
    for c, g in gts.items():
        _save_any(mha / f"{c}.mha", _pred_of(g, int(c[-1])))
    runs = {"nnunet": (nn, raw), "monai": (mo, raw / "labelsTr"), "mha_vs_nrrd": (mha, raw_nrrd),
            "mha_vs_nifti": (mha, raw), "nifti_vs_nrrd": (nn, raw_nrrd / "labelsTr")}
    for name, (pred, gt) in runs.items():
        out = tmp_path / f"rep_{name}"
        assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", ds, "--out", str(out),
                     "--quiet"]) == 0, capsys.readouterr().err
        reports[name] = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    ref = reports["nnunet"]
    assert ref["n_cases"] == 3 and set(ref["cases"]) == set(gts) and ref["unmatched_predictions"] == []
    assert ref["cases"]["case_001"]["organs"]["liver"]["hd95"] == pytest.approx(0.8)
    for name, rep in reports.items():
        for c in gts:
            for organ in ("liver", "aorta", "left kidney"):
                a, b = rep["cases"][c]["organs"][organ], ref["cases"][c]["organs"][organ]
                for m in ("dice", "hd95", "nsd"):
                    assert (a[m] is None and b[m] is None) or a[m] == pytest.approx(b[m], abs=1e-9), (name, c, m)
    assert reports["monai"]["cases"]["case_000"]["prediction"].endswith("case_000/case_000_seg.nii.gz")


def test_nsd_in_every_report_file(folders, capsys):
    out = folders / "rep"
    assert main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "RAW"), "--labels", "synapse",
                 "--nsd-tolerance", "1", "liver=0.5", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| NSD (%) |" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"] == ["dice", "hd95", "nsd"]
    assert rep["nsd_tolerance_mm"]["liver"] == 0.5 and rep["nsd_tolerance_mm"]["aorta"] == 1.0
    c1, c2 = rep["cases"]["0001"]["organs"], rep["cases"]["0002"]["organs"]
    assert c1["liver"]["nsd"] == 1.0 and c2["left kidney"]["nsd"] == 0.0 and c1["pancreas"]["nsd"] is None
    # case 2's liver is shifted by one 0.8 mm voxel: at 0.5 mm only the side faces agree; at 1 mm all of it
    from glam3d.metrics.segmentation import nsd_monai
    g = truth() == 6
    assert c2["liver"]["nsd"] == pytest.approx(nsd_monai(np.roll(g, 1, 0), g, 0.5, (0.8, 0.8, 2.5)))
    assert c2["liver"]["nsd"] < 1.0 and c2["aorta"]["nsd"] == 1.0
    assert rep["per_organ"]["liver"]["nsd"]["n"] == 2
    rows = list(csv.reader((out / "report.csv").open(encoding="utf-8")))
    assert "nsd_liver" in rows[0] and "nsd_mean" in rows[0]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| NSD (%) |" in md and "liver 0.5 mm" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # an organ that is not scored
    assert main(["evaluate", "--pred", str(folders / "pred"), "--gt", str(folders / "RAW"), "--labels", "synapse",
                 "--nsd-tolerance", "bladder=2", "--out", str(folders / "r3")]) == 2
    err = capsys.readouterr().err
    assert "bladder" in err and "scored organs" in err and not (folders / "r3").exists()


def test_only_predicted(tmp_path, capsys):
    raw, gts = _nnunet_raw(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for c in ("case_000", "case_002"):
        save(pred / f"{c}.nii.gz", gts[c])
    args = ["evaluate", "--pred", str(pred), "--gt", str(raw / "labelsTr"), "--labels", str(raw / "dataset.json"),
            "--out", str(tmp_path / "rep"), "--quiet"]
    assert main(args) == 2  # without it: a truth without prediction is an error
    err = capsys.readouterr().err
    assert "case_001" in err and "no prediction" in err and "--only-predicted" in err
    assert main(args + ["--only-predicted"]) == 0
    assert "1 truth without a prediction left out" in capsys.readouterr().out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["n_cases"] == 2 and rep["truths_left_out"]["count"] == 1
    assert rep["truths_left_out"]["cases"][0]["case"] == "case_001"
    assert "Truths left out (no prediction, --only-predicted): 1" in (tmp_path / "rep" / "report.md").read_text(
        encoding="utf-8")


# ------------------------------------------------------------------------------------------------ cross-validation
def _folds(tmp_path, gts):
    folds = [tmp_path / "run" / f"fold_{k}" / "validation" for k in range(2)]
    split = [["case_000", "case_001"], ["case_002"]]
    for k, cases in enumerate(split):
        for c in cases:
            folds[k].mkdir(parents=True, exist_ok=True)
            p = gts[c].copy()
            if c == "case_002":
                p[p == 6] = 0  # fold 1 misses the liver
            save(folds[k] / f"{c}.nii.gz", p)
    return folds


def test_cross_validation_summary(tmp_path, capsys):
    raw, gts = _nnunet_raw(tmp_path)
    folds = _folds(tmp_path, gts)
    out = tmp_path / "cv"
    assert main(["evaluate", "--pred", *map(str, folds), "--gt", str(raw / "labelsTr"), "--labels",
                 str(raw / "dataset.json"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "3 cases from 2 folders" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_cases"] == 3 and [f["n_cases"] for f in rep["folds"]] == [2, 1]
    f0, f1 = rep["folds"]
    assert f0["per_organ"]["dice"]["liver"] == 1.0 and f1["per_organ"]["dice"]["liver"] == 0.0
    assert rep["per_organ"]["liver"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert rep["cases"]["case_002"]["fold"] == str(folds[1])
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Folds" in md and str(folds[1]) in md
    # nnU-Net's summary.json: per-label TP/FP/FN/Dice from nnU-Net's formula, nan-means over cases
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == {"foreground_mean", "mean", "metric_per_case"} and len(s["metric_per_case"]) == 3
    liver = [m["metrics"]["6"] for m in s["metric_per_case"]]
    n_liver = int((truth() == 6).sum())
    assert [x["Dice"] for x in liver] == [1.0, 1.0, 0.0] and liver[2]["FN"] == n_liver and liver[2]["TP"] == 0
    assert s["mean"]["6"]["Dice"] == pytest.approx(2 / 3)
    kid = [m["metrics"]["3"]["Dice"] for m in s["metric_per_case"]]
    assert kid == [1.0, None, 1.0] and s["mean"]["3"]["Dice"] == 1.0  # absent from both: NaN (null), nan-mean
    assert s["foreground_mean"]["Dice"] == pytest.approx(np.mean([s["mean"][k]["Dice"] for k in s["mean"]]))
    tn = s["metric_per_case"][0]["metrics"]["6"]["TN"]
    assert tn == truth().size - n_liver
    # a case in two folds is an error naming both folders
    save(folds[1] / "case_000.nii.gz", gts["case_000"])
    assert main(["evaluate", "--pred", *map(str, folds), "--gt", str(raw / "labelsTr"), "--labels",
                 str(raw / "dataset.json"), "--out", str(tmp_path / "cv2")]) == 2
    err = capsys.readouterr().err
    assert "case_000" in err and str(folds[0]) in err and str(folds[1]) in err and not (tmp_path / "cv2").exists()


def test_truth_from_preprocessed_dataset_json(tmp_path, capsys):
    raw, gts = _nnunet_raw(tmp_path)
    pre = _write(tmp_path / "pre" / "dataset.json", {
        "labels": {"0": "background", "1": "liver", "2": "aorta"}, "plan": {"label_values": {"1": 6, "2": 8}},
        "cases": {c: {"source_label": str(raw / "labelsTr" / f"{c}.nii.gz")} for c in gts}
        | {"case_900": {"source_label": None}}})
    folds = _folds(tmp_path, gts)
    out = tmp_path / "cv"
    assert main(["evaluate", "--pred", *map(str, folds), "--gt", str(pre), "--labels", str(pre), "--out", str(out),
                 "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_cases"] == 3 and rep["organs"] == ["aorta", "liver"]
    assert rep["per_organ"]["liver"]["dice"]["mean"] == pytest.approx(2 / 3)
    capsys.readouterr()
    # a truth the dataset.json points at that is gone
    (raw / "labelsTr" / "case_001.nii.gz").unlink()
    assert main(["evaluate", "--pred", *map(str, folds), "--gt", str(pre), "--labels", str(pre), "--out",
                 str(tmp_path / "cv2")]) == 2
    err = capsys.readouterr().err
    assert str(pre) in err and "case_001" in err and "not found" in err
    # the no-labels error points at the dataset.json
    assert main(["evaluate", "--pred", str(folds[0]), "--gt", str(pre), "--out", str(tmp_path / "cv3")]) == 2
    assert f"--labels {pre}" in capsys.readouterr().err
    # a raw MSD v1 dataset.json: the training list's label files (relative to the dataset.json)
    msd = _write(raw / "msd.json", {"labels": {"0": "background", "1": "spleen", "3": "left kidney", "6": "liver",
                                               "8": "aorta"},
                                    "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                                                 for c in ("case_000", "case_002")], "test": []})
    assert main(["evaluate", "--pred", *map(str, folds), "--gt", str(msd), "--labels", str(msd), "--out",
                 str(tmp_path / "cv4"), "--quiet"]) == 0
    rep = json.loads((tmp_path / "cv4" / "report.json").read_text())
    assert sorted(rep["cases"]) == ["case_000", "case_002"] and rep["unmatched_predictions"] == [str(folds[0] /
                                                                                                   "case_001.nii.gz")]


# ------------------------------------------------------------------------------------------------ provenance
def test_report_names_every_checkpoint(tmp_path, capsys):
    """Per-case provenance wins over the manifest's top level: an output kept from an earlier run is credited to
    the checkpoint that made it, an ensemble's outputs to all of its members."""
    raw, gts = _nnunet_raw(tmp_path, n=4)
    pred = tmp_path / "pred"
    pred.mkdir()
    for c, g in gts.items():
        save(pred / f"{c}.nii.gz", g)
    A, B, X, Y = ("a" * 64, "b" * 64, "e" * 64, "f" * 64)
    (pred / "predictions.json").write_text(json.dumps({
        "checkpoint": {"path": "/runs/new/best.pt", "sha256": B},
        "cases": {"case_000": {"status": "skipped (exists)", "checkpoint_sha256": A,
                               "output": str(pred / "case_000.nii.gz")},
                  "case_001": {"status": "written", "checkpoint_sha256": B},
                  "case_002": {"status": "written", "inference": {"overlap": 0.5, "mirror": True},
                               "checkpoints": [{"path": "/runs/f0/best.pt", "sha256": X},
                                               {"path": "/runs/f1/best.pt", "sha256": Y}]},
                  "case_003": {"status": "written"}}}))
    out = tmp_path / "rep"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(raw / "labelsTr"), "--labels",
                 str(raw / "dataset.json"), "--out", str(out), "--quiet"]) == 0
    assert "from 4 different checkpoints" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    by = {c["sha256"]: c for c in rep["checkpoints"]}
    assert set(by) == {A, B, X, Y}
    assert by[A]["cases"] == ["case_000"] and by[A]["paths"] == []          # never credited to the top level B
    assert by[B]["cases"] == ["case_001", "case_003"] and by[B]["from_top_level"] == ["case_003"]
    assert by[B]["paths"] == ["/runs/new/best.pt"]
    assert by[X]["cases"] == by[Y]["cases"] == ["case_002"] and by[X]["paths"] == ["/runs/f0/best.pt"]
    assert rep["cases"]["case_002"]["provenance"] == {"checkpoints": [X, Y], "how": "case",
                                                      "inference": {"overlap": 0.5, "mirror": True}}
    assert rep["cases"]["case_003"]["provenance"]["how"] == "top-level"
    md = (out / "report.md").read_text(encoding="utf-8")
    for sha in (A, B, X, Y):
        assert sha in md
    assert "4 checkpoints made the scored predictions" in md
    # a case missing from the manifest: unknown, said so
    man = json.loads((pred / "predictions.json").read_text())
    del man["cases"]["case_001"]
    (pred / "predictions.json").write_text(json.dumps(man))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(raw / "labelsTr"), "--labels",
                 str(raw / "dataset.json"), "--out", str(out), "--quiet"]) == 0
    assert "1 case(s) have no checkpoint recorded" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert {c["sha256"]: c["cases"] for c in rep["checkpoints"]}[None] == ["case_001"]
    assert "**unknown checkpoint**" in (out / "report.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ label values
def test_label_values_outside_the_label_set(tmp_path, capsys):
    raw, gts = _nnunet_raw(tmp_path, n=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    for c, g in gts.items():
        save(pred / f"{c}.nii.gz", g)
    ds = str(raw / "dataset.json")  # declares 0, 1, 3, 6, 8
    args = ["evaluate", "--pred", str(pred), "--gt", str(raw / "labelsTr"), "--labels", ds, "--quiet"]
    # a prediction value outside the label set: one error line naming the file and the values
    p = gts["case_001"].copy()
    p[0, 0, 0:2] = [12, 40]
    save(pred / "case_001.nii.gz", p)
    assert main(args + ["--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(pred / "case_001.nii.gz") in err and "12, 40" in err
    assert not (tmp_path / "r1").exists()
    save(pred / "case_001.nii.gz", gts["case_001"])
    # a truth value outside the declared set: a warning naming the file, scored as background
    g = gts["case_000"].copy()
    g[0, 0, 0] = 5
    save(raw / "labelsTr" / "case_000.nii.gz", g)
    assert main(args + ["--out", str(tmp_path / "r2")]) == 0
    captured = capsys.readouterr()
    warn = [ln for ln in captured.err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and str(raw / "labelsTr" / "case_000.nii.gz") in warn[0] and ": 5 " in warn[0]
    rep = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert len(rep["warnings"]) == 1 and "## Warnings" in (tmp_path / "r2" / "report.md").read_text(encoding="utf-8")
    # scoring a subset of a declared set is silent: Synapse's 8 of BTCV's 13 (truth holds esophagus 5, IVC 9)
    assert main(args[:-2] + ["synapse", "--quiet", "--out", str(tmp_path / "r3")]) == 0
    assert "warning" not in capsys.readouterr().err
    # ... and so is a mapping file's own set with an nnU-Net ignore label in the truth
    m = _write(tmp_path / "map.json", {"background": 0, "liver": 6, "aorta": 8, "spleen": 1, "left kidney": 3,
                                       "ignore": 5})
    assert main(args[:-2] + [str(m), "--quiet", "--out", str(tmp_path / "r4")]) == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads((tmp_path / "r4" / "report.json").read_text())
    assert rep["cases"]["case_000"]["n_voxels"] == g.size - 1  # the ignore voxel counts nowhere

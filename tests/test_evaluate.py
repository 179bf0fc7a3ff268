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

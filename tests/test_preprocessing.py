"""glam3d-preprocess: Synapse protocol, per-scan round trip, resume, bad inputs, MSD layout, inspect."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing import cli
from preprocessing.datasets import SYNAPSE_ORGANS, SYNAPSE_TEST, SYNAPSE_TRAIN
from preprocessing.phantom import BTCV_TRAINING_IDS
from preprocessing.pipeline import preprocess_label, preprocess_scan, restore_labels, restore_probabilities
from preprocessing.run import run_msd, run_synapse

MATRIX = 128
N_PHANTOMS = 5      # ids 0001..0005: LAS, RAS-oblique, LPS, LPS-oblique, RAS storage (0005 is a training case)


def _save(arr, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(arr, affine).to_filename(str(path))


def _tiny_case(root: Path, cid: str, shape=(12, 10, 6), affine=None, labels=(1, 2, 6, 8)):
    """A tiny valid BTCV case: a 'body' of soft tissue in air, a few labelled blocks."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    img = np.full(shape, -1000, np.int16)
    img[2:-2, 2:-2, :] = 40
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(labels):
        lab[3 + i % 3: 5 + i % 3, 3 + i // 3: 5 + i // 3, 1:-1] = v
    _save(img, affine, root / "img" / f"img{cid}.nii.gz")
    _save(lab, affine, root / "label" / f"label{cid}.nii.gz")


def _tree_digest(root: Path):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    assert cli.main(["phantom", "--out", str(out), "--cases", str(N_PHANTOMS), "--matrix", str(MATRIX),
                     "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def synapse_out(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("synapse")
    summary = run_synapse(phantoms, out, quiet=True)
    assert summary["failed"] == 0 and summary["done"] == N_PHANTOMS
    return out


# ------------------------------------------------------------------------------------------------ phantoms
def test_phantom_layout_deterministic_and_scaled(phantoms):
    from preprocessing.phantom import generate_case

    assert sorted(p.name for p in (phantoms / "img").iterdir()) == [f"img{c}.nii.gz" for c in
                                                                    BTCV_TRAINING_IDS[:N_PHANTOMS]]
    a = generate_case("0003", seed=0, matrix=64)
    b = generate_case("0003", seed=0, matrix=64)
    c = generate_case("0003", seed=1, matrix=64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.allclose(a[2], b[2])
    assert not np.array_equal(a[1], c[1])
    img = nib.load(str(phantoms / "img" / "img0005.nii.gz"))
    zooms = img.header.get_zooms()
    assert 358.4 / MATRIX * 0.9 < zooms[0] < 358.4 / MATRIX * 1.1 and 2.4 < zooms[2] < 3.6
    lab = np.asarray(nib.load(str(phantoms / "label" / "label0005.nii.gz")).dataobj)
    assert set(np.unique(lab)) == set(range(14))           # all 13 organs present
    data = np.asarray(img.dataobj)
    assert data.min() <= -900 and data.max() >= 400         # air and bone
    liver, spleen = data[lab == 6].mean(), data[lab == 1].mean()
    assert 30 < liver < 95 and 25 < spleen < 90             # soft tissue overlaps: position must matter
    # anatomy: liver on the patient's right, spleen on the left (world x, RAS+: +x = right)
    ijk = lambda v: np.argwhere(lab == v).mean(0)            # noqa: E731
    world = lambda v: img.affine[:3, :3] @ ijk(v) + img.affine[:3, 3]   # noqa: E731
    assert world(6)[0] > 0 > world(1)[0]
    assert world(2)[1] < world(6)[1] and world(8)[1] > world(2)[1] - 60   # kidneys posterior


# ------------------------------------------------------------------------------------------------ Synapse protocol
def test_synapse_split_exact(tmp_path, capsys):
    raw = tmp_path / "btcv" / "RawData" / "Training"      # the original BTCV nesting
    for i in range(1, 41):
        _tiny_case(raw, f"{i:04d}")
    out = tmp_path / "out"
    s = run_synapse(tmp_path / "btcv", out, unlisted="skip", quiet=True, spacing=[3, 2, 2])
    ds = json.loads((out / "dataset.json").read_text())
    assert [e["id"] for e in ds["training"]] == SYNAPSE_TRAIN
    assert [e["id"] for e in ds["test"]] == SYNAPSE_TEST
    assert ds["numTraining"] == 18 and ds["numTest"] == 12 and s["failed"] == 0
    assert all(e["label"] == f"cases/{e['id']}.npz" for e in ds["training"] + ds["test"])
    assert ds["labels"] == {"0": "background", "1": "aorta", "2": "gallbladder", "3": "left kidney",
                            "4": "right kidney", "5": "liver", "6": "pancreas", "7": "spleen", "8": "stomach"}
    assert ds["plan"]["label_values"] == {"1": 8, "2": 4, "3": 3, "4": 2, "5": 6, "6": 11, "7": 1, "8": 7}
    # unlisted ids (0011..0020) are errors by default: one line each, exit 2, the 30 others fine
    out2 = tmp_path / "out2"
    capsys.readouterr()
    code = cli.main(["synapse", "--raw", str(tmp_path / "btcv"), "--out", str(out2), "--spacing", "3", "2", "2",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errs) == 10 and all("neither the Synapse train" in e for e in errs)
    assert "Traceback" not in err
    assert len(list((out2 / "cases").glob("*.npz"))) == 30
    # --unlisted train adds them to training
    s3 = run_synapse(tmp_path / "btcv", tmp_path / "out3", unlisted="train", quiet=True, spacing=[3, 2, 2])
    assert (s3["training"], s3["test"]) == (28, 12)


def test_label_remap_and_volumes(phantoms, synapse_out):
    ds = json.loads((synapse_out / "dataset.json").read_text())
    for cid in ("0005", "0003"):
        meta = ds["cases"][cid]
        z = np.load(synapse_out / "cases" / f"{cid}.npz")
        img, lab = z["image"], z["label"]
        assert img.dtype == np.float32 and img.ndim == 4 and img.shape[0] == 1 and lab.dtype == np.uint8
        assert lab.shape == img.shape[1:] == tuple(meta["resampled_shape"])
        assert 0.0 <= img.min() and img.max() <= 1.0                     # transunet window
        assert set(np.unique(lab)) <= set(range(9))
        orig = nib.load(meta["source_label"])
        L = np.asarray(orig.dataobj)
        vox0 = float(np.prod(orig.header.get_zooms()[:3]))
        vox1 = float(np.prod(meta["resampled_spacing"]))
        for idx, (value, name) in enumerate(SYNAPSE_ORGANS, start=1):
            v0, v1 = (L == value).sum() * vox0, (lab == idx).sum() * vox1
            tol = 0.05 if name in ("liver", "spleen", "stomach", "left kidney", "right kidney") else 0.2
            assert abs(v1 / v0 - 1) < tol, (cid, name, v1 / v0)
    # --keep-all-labels keeps the 13 BTCV values as they are
    from preprocessing.datasets import synapse_labels

    labels, values = synapse_labels(keep_all=True)
    assert labels["1"] == "spleen" and labels["13"] == "left adrenal gland"
    plan = dict(ds["plan"], label_values={str(k): v for k, v in values.items()})
    img = nib.load(ds["cases"]["0005"]["source_image"])
    lab = preprocess_label(np.asarray(nib.load(ds["cases"]["0005"]["source_label"]).dataobj), img.affine,
                           ds["cases"]["0005"], plan)
    assert set(np.unique(lab)) == set(range(14))


@pytest.mark.parametrize("cid", ["0005", "0003", "0002"])     # RAS, LPS, oblique (RAS-oblique) storage
def test_roundtrip_restore_labels(phantoms, synapse_out, cid):
    ds = json.loads((synapse_out / "dataset.json").read_text())
    plan = ds["plan"]
    img = nib.load(str(phantoms / "img" / f"img{cid}.nii.gz"))
    labimg = nib.load(str(phantoms / "label" / f"label{cid}.nii.gz"))
    x, meta = preprocess_scan(img, plan)
    stored = {k: v for k, v in ds["cases"][cid].items() if k not in ("source_image", "source_label")}
    assert {k: v for k, v in meta.items() if k not in ("source_image", "source_label")} == stored
    assert set(meta) == set(ds["cases"][cid])
    assert np.allclose(x, np.load(synapse_out / "cases" / f"{cid}.npz")["image"])
    L = np.asarray(labimg.dataobj)
    lab = preprocess_label(L, img.affine, meta, plan)
    back = restore_labels(lab, meta, plan)
    assert back.shape == img.shape and np.allclose(back.affine, img.affine)
    B = np.asarray(back.dataobj)
    keep = [v for v, _ in SYNAPSE_ORGANS]
    assert set(np.unique(B)) <= set(keep) | {0}
    for v in keep:
        a, b = L == v, B == v
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.95, (cid, meta["orientation"], v, dice)
    assert meta["orientation"] == {"0005": "RAS", "0003": "LPS", "0002": "RAS"}[cid]
    if cid != "0003":
        return
    probs = np.stack([(lab == k).astype(np.float32) for k in range(9)])
    P = restore_probabilities(probs, meta, plan)
    assert P.shape == (9,) + img.shape
    assert np.mean(P.argmax(0) == np.vectorize({0: 0, **{v: i for i, (v, _) in enumerate(SYNAPSE_ORGANS, 1)}}
                                               .get)(np.where(np.isin(L, keep), L, 0))) > 0.99


def test_nnunet_intensity_and_cache(phantoms, tmp_path):
    out = tmp_path / "nn"
    run_synapse(phantoms, out, intensity="nnunet", quiet=True)
    ds = json.loads((out / "dataset.json").read_text())
    st = ds["plan"]["intensity"]["channels"][0]
    assert ds["plan"]["intensity"]["scheme"] == "nnunet"
    # foreground includes stomach gas, as in real BTCV (nnU-Net's lower percentile there is near -1000 too)
    assert -1024 <= st["lower"] < st["mean"] < st["upper"] < 400 and st["std"] > 0 and st["num_cases"] == 1
    cache = out / ".cache" / "intensity_stats.json"
    m0 = cache.stat().st_mtime_ns
    run_synapse(phantoms, out, intensity="nnunet", quiet=True)
    assert cache.stat().st_mtime_ns == m0
    x = np.load(out / "cases" / "0005.npz")["image"]
    assert x.min() >= (st["lower"] - st["mean"]) / st["std"] - 1e-3


def test_resume_skips_finished_cases(tmp_path):
    raw = tmp_path / "raw"
    ids = ["0001", "0002", "0003", "0005", "0006"]
    for c in ids:
        _tiny_case(raw, c)
    out = tmp_path / "resume"
    phantoms = raw
    s1 = run_synapse(phantoms, out, quiet=True)
    assert s1["done"] == N_PHANTOMS
    (out / "cases" / "0003.npz").unlink()                     # as if interrupted before this case
    mt = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.npz")}
    s2 = run_synapse(phantoms, out, quiet=True)
    assert (s2["done"], s2["skipped"]) == (1, N_PHANTOMS - 1)
    assert all((out / "cases" / n).stat().st_mtime_ns == t for n, t in mt.items())
    ds = json.loads((out / "dataset.json").read_text())
    assert sorted(ds["cases"]) == ids
    s3 = run_synapse(phantoms, out, quiet=True, overwrite=True)
    assert s3["done"] == N_PHANTOMS
    s4 = run_synapse(phantoms, out, quiet=True, spacing=[4.0, 4.0, 4.0])   # another plan: redone
    assert s4["done"] == N_PHANTOMS
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------ bad inputs
def _bad_dataset(root: Path):
    good = ["0005", "0006", "0007"]
    for c in good:
        _tiny_case(root, c)
    bad = {}
    _tiny_case(root, "0009")
    p = root / "img" / "img0009.nii.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]); bad["0009"] = p                          # truncated
    (root / "img" / "img0010.nii.gz").write_text("this is not a NIfTI file\n")
    _save(np.zeros((12, 10, 6), np.uint8), np.diag([2.0, 2, 3, 1]), root / "label" / "label0010.nii.gz")
    bad["0010"] = root / "img" / "img0010.nii.gz"                                  # not NIfTI
    _tiny_case(root, "0021"); (root / "label" / "label0021.nii.gz").unlink()
    bad["0021"] = root / "img" / "img0021.nii.gz"                                  # missing label
    _tiny_case(root, "0023")
    _save(np.zeros((12, 10, 7), np.uint8), np.diag([2.0, 2, 3, 1]), root / "label" / "label0023.nii.gz")
    bad["0023"] = root / "label" / "label0023.nii.gz"                              # shape mismatch
    _tiny_case(root, "0024")
    aff = np.diag([2.0, 2, 3, 1]); aff[0, 3] = 5
    _save(np.zeros((12, 10, 6), np.uint8), aff, root / "label" / "label0024.nii.gz")
    bad["0024"] = root / "label" / "label0024.nii.gz"                              # affine mismatch
    _tiny_case(root, "0026", labels=(1, 20))
    bad["0026"] = root / "label" / "label0026.nii.gz"                              # label value 20
    _tiny_case(root, "0027")
    d = np.full((12, 10, 6), 40.0, np.float32); d[3, 3, 3] = np.nan
    _save(d, np.diag([2.0, 2, 3, 1]), root / "img" / "img0027.nii.gz")
    bad["0027"] = root / "img" / "img0027.nii.gz"                                  # NaN
    _tiny_case(root, "0028")
    _save(np.zeros((12, 10, 6, 2), np.int16), np.diag([2.0, 2, 3, 1]), root / "img" / "img0028.nii.gz")
    bad["0028"] = root / "img" / "img0028.nii.gz"                                  # 4D
    return good, bad


def test_bad_inputs_one_line_each(tmp_path, capsys):
    raw = tmp_path / "raw"
    good, bad = _bad_dataset(raw)
    before = _tree_digest(raw)
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli.main(["synapse", "--raw", str(raw), "--out", str(out), "--workers", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errs) == len(bad), err
    for cid, path in bad.items():
        mine = [e for e in errs if str(path) in e]
        assert len(mine) == 1, (cid, path, err)
    text = "\n".join(errs)
    for needle in ("not a readable NIfTI", "no label file", "does not match", "affine differs",
                   "not in the declared set", "NaN", "expected a 3D image"):
        assert needle in text, needle
    assert sorted(p.stem for p in (out / "cases").glob("*.npz")) == good
    ds = json.loads((out / "dataset.json").read_text())
    assert sorted(e["id"] for e in ds["training"]) == good and len(ds["failed"]) == len(bad)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert _tree_digest(raw) == before                                             # inputs untouched
    # --strict: the first bad case is fatal, one line, exit 2
    out2 = tmp_path / "strict"
    capsys.readouterr()
    assert cli.main(["synapse", "--raw", str(raw), "--out", str(out2), "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--strict" in err[0]


def test_module_entry_point(tmp_path):
    """``python -m preprocessing`` (what the glam3d-preprocess console script runs); cheap commands only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "preprocessing", "--help"], capture_output=True, text=True, cwd=root,
                       env=env)
    assert r.returncode == 0 and "phantom" in r.stdout and "synapse" in r.stdout and "msd" in r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocessing", "inspect", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=root, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_fatal_user_errors(tmp_path, capsys):
    (tmp_path / "empty" / "img").mkdir(parents=True)
    assert cli.main(["synapse", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["synapse", "--raw", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    _tiny_case(tmp_path / "raw", "0005")
    assert cli.main(["synapse", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "raw" / "pp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "no NIfTI images" in err[0] and "is not a folder" in err[1] and "inside the input folder" in err[2]
    assert not (tmp_path / "raw" / "pp").exists()


# ------------------------------------------------------------------------------------------------ MSD layout
def test_msd_layouts(tmp_path):
    aff = np.diag([-1.5, -1.5, 2.0, 1.0])
    rng = np.random.default_rng(0)
    # nnU-Net v2: two MR channels as _0000/_0001, labels name -> value
    ds = tmp_path / "Dataset001_Brain"
    meta = {"name": "Brain", "channel_names": {"0": "T1", "1": "FLAIR"},
            "labels": {"background": 0, "edema": 1, "tumour": 2}, "file_ending": ".nii.gz"}
    (ds).mkdir()
    (ds / "dataset.json").write_text(json.dumps(meta))
    for cid, sub in (("b001", "imagesTr"), ("b002", "imagesTr"), ("b003", "imagesTs")):
        for ch in range(2):
            d = np.zeros((16, 14, 8), np.float32)
            d[3:13, 3:11, 1:7] = rng.uniform(100, 200, (10, 8, 6))
            _save(d, aff, ds / sub / f"{cid}_{ch:04d}.nii.gz")
        if sub == "imagesTr":
            lab = np.zeros((16, 14, 8), np.uint8); lab[5:8, 5:8, 2:5] = 1; lab[8:10, 5:8, 2:5] = 2
            _save(lab, aff, ds / "labelsTr" / f"{cid}.nii.gz")
    out = tmp_path / "out"
    s = run_msd(ds, out, quiet=True)
    assert s["failed"] == 0
    man = json.loads((out / "dataset.json").read_text())
    assert man["numTraining"] == 2 and man["numTest"] == 1 and "label" not in man["test"][0]
    assert man["labels"] == {"0": "background", "1": "edema", "2": "tumour"}
    assert man["plan"]["intensity"]["scheme"] == "zscore" and man["plan"]["num_channels"] == 2
    z = np.load(out / "cases" / "b001.npz")
    assert z["image"].shape[0] == 2 and set(np.unique(z["label"])) == {0, 1, 2}
    assert "label" not in np.load(out / "cases" / "b003.npz").files
    # MSD classic: 4D multi-modal image in one file, labels value -> name, CT -> nnunet statistics
    ds2 = tmp_path / "Task09_Thing"
    (ds2).mkdir()
    (ds2 / "dataset.json").write_text(json.dumps({"name": "Thing", "modality": {"0": "CT"},
                                                  "labels": {"0": "background", "1": "organ", "3": "tumour"}}))
    for cid in ("t_1", "t_2"):
        d = np.full((16, 14, 8), -1000, np.int16); d[2:14, 2:12, :] = 40
        _save(d, aff, ds2 / "imagesTr" / f"{cid}.nii.gz")
        lab = np.zeros((16, 14, 8), np.uint8); lab[5:8, 5:8, 2:5] = 1; lab[9:11, 5:8, 2:5] = 3
        _save(lab, aff, ds2 / "labelsTr" / f"{cid}.nii.gz")
    out2 = tmp_path / "out2"
    assert run_msd(ds2, out2, quiet=True)["failed"] == 0
    man2 = json.loads((out2 / "dataset.json").read_text())
    assert man2["plan"]["label_values"] == {"1": 1, "2": 3} and man2["plan"]["intensity"]["scheme"] == "nnunet"
    assert set(np.unique(np.load(out2 / "cases" / "t_1.npz")["label"])) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_table_and_warnings(tmp_path, phantoms, capsys):
    assert cli.main(["inspect", str(phantoms)]) == 0
    out = capsys.readouterr().out
    assert "0005" in out and "RAS" in out and "LPS" in out and "1-13" in out and "no warnings" in out
    raw = tmp_path / "raw"
    good, bad = _bad_dataset(raw)
    assert cli.main(["inspect", str(raw)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for cid in good + list(bad):
        assert any(ln.startswith(cid) for ln in lines), cid
    warn = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warn) == len(bad), out
    assert "NaN" in out and "affine differs" in out and "not in the declared set" in out

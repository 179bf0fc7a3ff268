"""Cross-validation folds (``glam3d train --fold K``): nnU-Net's ``splits_final.json`` made, used and checked; the
fold's run folder; the fold's validation cases predicted from their source scans and scored, and ``glam3d
evaluate`` over the folds' validation folders giving the cross-validation summary (on tiny phantom data)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from glam3d.config import config_from_dict
from glam3d.data import datasets as D
from glam3d.errors import UserError
import tiny_training as H


def kfold_reference(ids, n_splits, seed):
    """scikit-learn's ``KFold(n_splits, shuffle=True, random_state=seed).split(sorted ids)``, as nnU-Net v2's
    ``generate_crossval_split`` calls it, written from its documented algorithm: the indices shuffled by
    ``RandomState(seed).shuffle``, consecutive test chunks, the first ``n % n_splits`` one larger; train and test
    indices each in increasing order."""
    ids = sorted(ids)
    n = len(ids)
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    sizes = [n // n_splits + (1 if k < n % n_splits else 0) for k in range(n_splits)]
    out, start = [], 0
    for size in sizes:
        test = np.sort(idx[start:start + size])
        start += size
        train = np.setdiff1d(np.arange(n), test)
        out.append({"train": [ids[i] for i in train], "val": [ids[i] for i in test]})
    return out


@pytest.mark.parametrize("n,k", [(18, 5), (7, 5), (30, 5), (5, 5), (9, 3)])
def test_crossval_splits_are_nnunets(n, k):
    ids = [f"case_{i:03d}" for i in range(n)][::-1]  # given in any order
    splits = D.crossval_splits(ids, k)
    assert splits == kfold_reference(ids, k, 12345)
    vals = [c for f in splits for c in f["val"]]
    assert sorted(vals) == sorted(ids)  # every case validated exactly once
    for f in splits:
        assert sorted(f["train"] + f["val"]) == sorted(ids)


def test_crossval_splits_match_scikit_learn():
    import sklearn.model_selection as sklearn  # in the test extra
    ids = sorted(f"BTCV_{i:03d}" for i in range(1, 31))
    ref = [{"train": [ids[i] for i in tr], "val": [ids[i] for i in te]}
           for tr, te in sklearn.KFold(n_splits=5, shuffle=True, random_state=12345).split(ids)]
    assert D.crossval_splits(ids) == ref


def test_crossval_splits_need_enough_cases():
    with pytest.raises(UserError, match="5-fold cross-validation needs at least 5 training cases, the dataset has 3"):
        D.crossval_splits(["a", "b", "c"], 5)


def test_read_splits_checks_the_file(tmp_path):
    ids = ["a", "b", "c", "d"]
    path = tmp_path / "splits_final.json"
    good = [{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a", "b"]}]
    path.write_text(json.dumps(good))
    assert D.read_splits(path, ids) == good
    for bad, problem in [
        ({"train": ids}, r"must be a list of folds"),
        ([{"train": ["a"], "val": ["zz", "c"]}], r"fold 0: 'val' names case\(s\) zz that are not training cases"),
        ([good[0], {"train": ["a"], "val": ["a"]}], r"fold 1: case a is in both 'train' and 'val'"),
        ([{"train": ["a"]}], r"fold 0 must be an object with 'train' and 'val' lists"),
        ([{"train": [1], "val": []}], r"'train' holds a number"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=problem) as err:
            D.read_splits(path, ids)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        D.read_splits(path, ids)


# ------------------------------------------------------------------------------------------------ fold runs
@pytest.fixture
def tiny(tmp_path, monkeypatch):
    H.write_tinynet(tmp_path / "mods")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    sys.modules.pop("glam3d_tinynet", None)
    return tmp_path


def owned_dataset(root: Path, n: int = 5) -> Path:
    """The synthetic dataset of test_train.py in a folder glam3d owns (its marker written first, as
    glam3d-preprocess writes it)."""
    from glam3d.utils.ownership import claim

    owned = claim(root, "preprocessed-dataset", tool="glam3d-preprocess")
    owned.record("dataset.json", "cases/")
    return H.make_dataset(root, n=n)


def _train(cfg, **kw):
    from glam3d.engine.train import train

    return train(config_from_dict(cfg), console=False, **kw)


def _fold_cfg(data, out, fold, **train):
    return H.tiny_config(data, out, data={"fold": fold}, train={"epochs": 1, "iters_per_epoch": 2, **train})


def test_fold_run_makes_and_records_splits_final(tiny):
    from glam3d.utils.ownership import read_marker

    data = owned_dataset(tiny / "pre")
    summary = _train(_fold_cfg(data, tiny / "cv", 3))
    splits = json.loads((data / "splits_final.json").read_text())
    assert splits == D.crossval_splits(D.case_ids(D.read_manifest(data)))  # nnU-Net's layout and folds
    assert "splits_final.json" in read_marker(data)["entries"]  # recorded in the dataset folder's marker
    run = tiny / "cv" / "fold_3"
    assert summary["run_dir"] == str(run) and (run / "checkpoints" / "last.pt").is_file()
    split = json.loads((run / "split.json").read_text())
    assert (split["fold"], split["num_folds"]) == (3, 5)
    assert split["train"] == splits[3]["train"] and split["val"] == splits[3]["val"]
    assert summary["split"]["val"] == splits[3]["val"]
    log = (run / "train.log").read_text()
    assert "fold 3 of 5: 4 training / 1 validation cases" in log
    # the synthetic cases have no source scans: the export is skipped, with one warning saying so
    assert log.count("validation cases were not predicted: their source scans are needed") == 1
    assert summary["validation"] is None and not (run / "validation").exists()
    # a second fold uses the file as it is (same folds), and its own folder
    before = (data / "splits_final.json").stat().st_mtime_ns
    _train(_fold_cfg(data, tiny / "cv", 0))
    assert (data / "splits_final.json").stat().st_mtime_ns == before
    assert json.loads((tiny / "cv" / "fold_0" / "split.json").read_text())["val"] == splits[0]["val"]


def test_fold_in_a_folder_glam3d_does_not_own(tiny):
    """A preprocessed folder without glam3d's marker (nor recognisable as glam3d's) is never written into: the
    folds are made in memory (the same ones) and the run says so."""
    data = H.make_dataset(tiny / "pre")
    before = sorted(p.name for p in data.iterdir())
    _train(_fold_cfg(data, tiny / "cv", 1))
    assert sorted(p.name for p in data.iterdir()) == before
    log = (tiny / "cv" / "fold_1" / "train.log").read_text()
    assert "splits_final.json not written" in log and "is not empty" in log
    split = json.loads((tiny / "cv" / "fold_1" / "split.json").read_text())
    assert split["val"] == D.crossval_splits(D.case_ids(D.read_manifest(data)))[1]["val"]


def test_dropped_in_nnunet_splits_are_used_as_they_are(tiny):
    data = H.make_dataset(tiny / "pre", n=6)
    mine = [{"train": ["case00", "case01", "case02"], "val": ["case03", "case04"]},
            {"train": ["case03", "case04", "case05"], "val": ["case00"]}]  # nnU-Net allows any folds, any count
    (data / "splits_final.json").write_text(json.dumps(mine))
    _train(_fold_cfg(data, tiny / "cv", 1))
    split = json.loads((tiny / "cv" / "fold_1" / "split.json").read_text())
    assert (split["train"], split["val"], split["num_folds"]) == (mine[1]["train"], mine[1]["val"], 2)
    with pytest.raises(UserError, match=r"--fold 2: the splits have folds 0..1") as err:
        _train(_fold_cfg(data, tiny / "cv", 2))
    assert str(data / "splits_final.json") in str(err.value)
    assert not (tiny / "cv" / "fold_2").exists()  # refused before the run folder


def test_splits_naming_unknown_cases_are_refused(tiny):
    data = H.make_dataset(tiny / "pre")
    (data / "splits_final.json").write_text(json.dumps([{"train": ["case00", "BTCV_001"], "val": ["case01"]}]))
    with pytest.raises(UserError, match=r"splits_final.json: fold 0: 'train' names case\(s\) BTCV_001"):
        _train(_fold_cfg(data, tiny / "cv", 0))
    assert not (tiny / "cv").exists()


def test_fold_all_trains_on_every_case_without_validation(tiny):
    data = owned_dataset(tiny / "pre")
    summary = _train(_fold_cfg(data, tiny / "cv", "all"))
    run = tiny / "cv" / "fold_all"
    split = json.loads((run / "split.json").read_text())
    assert split["train"] == sorted(D.case_ids(D.read_manifest(data))) and split["val"] == []
    assert summary["checkpoint_best"] is None and (run / "checkpoints" / "last.pt").is_file()


def test_fold_run_resumes_in_its_folder(tiny):
    data = owned_dataset(tiny / "pre")
    _train(_fold_cfg(data, tiny / "cv", 2, epochs=1))
    summary = _train(_fold_cfg(data, tiny / "cv", 2, epochs=2), resume=True)
    assert summary["iterations"] == 4 and summary["run_dir"] == str(tiny / "cv" / "fold_2")


def test_fold_config_checks():
    from glam3d.config import validate_config

    for fold, problem in [("five", "must be a fold number 0, 1, ... or 'all'"), ("-1", "must be a fold number")]:
        cfg = config_from_dict({"data": {"root": "x", "fold": fold}, "model": {"name": "a:b"}})
        with pytest.raises(UserError, match=problem):
            validate_config(cfg)
    cfg = config_from_dict({"data": {"root": "x", "fold": 0, "val_cases": ["a"]}, "model": {"name": "a:b"}})
    with pytest.raises(UserError, match="data.val_cases' and data.fold"):
        validate_config(cfg)
    with pytest.raises(UserError, match="data.num_folds' must be in 2.."):
        validate_config(config_from_dict({"data": {"root": "x", "num_folds": 1}, "model": {"name": "a:b"}}))


def test_fold_option_of_the_command_line(tiny, capsys):
    from glam3d.commands.train import main

    data = owned_dataset(tiny / "pre")
    cfg = tiny / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(H.tiny_config(data, tiny / "unused", train={"epochs": 1, "iters_per_epoch": 1})))
    assert main([str(cfg), "--fold", "4", "--out", str(tiny / "cv"), "--no-progress"]) == 0
    assert f"run folder: {tiny / 'cv' / 'fold_4'}" in capsys.readouterr().out
    assert main([str(cfg), "--fold", "x", "--out", str(tiny / "cv")]) == 2
    assert "must be a fold number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the whole path
@pytest.mark.slow
def test_two_folds_predicted_scored_and_summarised(tmp_path, capsys):
    """Phantom CTs -> preprocess -> 2 folds trained (a few steps) -> each fold's validation cases predicted from
    their source scans into RUN/fold_K/validation (the scans' own geometry) and scored there -> ``glam3d evaluate``
    over both folders: every training case scored once, per-fold means, the checkpoints named."""
    import nibabel as nib

    from glam3d import cli
    from preprocessing import cli as pre_cli

    raw, pre, run = tmp_path / "raw", tmp_path / "pre", tmp_path / "cv"
    # BTCV ids 0001..0008: 0001-0004 and 0008 are Synapse test cases, 0005-0007 the training cases
    assert pre_cli.main(["phantom", "--out", str(raw), "--cases", "8", "--matrix", "48", "--workers", "1",
                         "--quiet"]) == 0
    assert pre_cli.main(["synapse", "--raw", str(raw), "--out", str(pre), "--workers", "1", "--unlisted", "skip",
                         "--spacing", "4", "4", "4", "--quiet"]) == 0
    cfg = {"name": "cv", "model": {"name": "nnformer_tiny", "overrides": {
        "crop_size": [16, 32, 32], "embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
        "window_size": [2, 2, 2, 1], "deep_supervision": False, "drop_path_rate": 0.0}},
        "data": {"root": str(pre), "roi_size": [16, 32, 32], "batch_size": 1, "num_folds": 2},
        "optim": {"name": "adamw", "lr": 1e-3, "schedule": "constant"},
        "train": {"epochs": 1, "iters_per_epoch": 2, "val_every": 1, "amp": "none", "progress": False},
        "val": {"overlap": 0.25}}
    cfg_path = tmp_path / "cv.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    for k in (0, 1):
        assert cli.main(["train", str(cfg_path), "--fold", str(k), "--out", str(run), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("fold validation:") == 2
    splits = json.loads((pre / "splits_final.json").read_text())
    manifest = json.loads((pre / "dataset.json").read_text())
    assert sorted(c for f in splits for c in f["val"]) == ["0005", "0006", "0007"]
    for k in (0, 1):
        val = run / f"fold_{k}" / "validation"
        assert sorted(p.name for p in val.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in splits[k]["val"])
        for c in splits[k]["val"]:  # in the source scan's own geometry
            src = nib.load(manifest["cases"][c]["source_image"])
            out = nib.load(str(val / f"{c}.nii.gz"))
            assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
        rep = json.loads((val / "report.json").read_text())
        assert sorted(rep["cases"]) == sorted(splits[k]["val"]) and (val / "summary.json").is_file()
        prov = json.loads((val / "predictions.json").read_text())
        best = run / f"fold_{k}" / "checkpoints" / "best.pt"
        from glam3d.inference.manifest import sha256_file
        assert prov["checkpoint"]["sha256"] == sha256_file(best)
        assert {e["checkpoint_sha256"] for e in prov["cases"].values()} == {sha256_file(best)}
    # resuming a finished fold keeps the predictions its checkpoint made
    stamp = (run / "fold_0" / "validation" / f"{splits[0]['val'][0]}.nii.gz").stat().st_mtime_ns
    assert cli.main(["train", str(cfg_path), "--fold", "0", "--out", str(run), "--device", "cpu", "--resume"]) == 0
    assert (run / "fold_0" / "validation" / f"{splits[0]['val'][0]}.nii.gz").stat().st_mtime_ns == stamp
    capsys.readouterr()
    # the cross-validation summary, as docs/how-to/train.md says (the preprocessed dataset.json also lists the
    # Synapse test cases' truths: --only-predicted leaves them out, and the report counts them)
    assert cli.main(["evaluate", "--pred", str(run / "fold_0" / "validation"), str(run / "fold_1" / "validation"),
                     "--gt", str(pre / "dataset.json"), "--only-predicted", "--out", str(run / "cv_report"),
                     "--quiet"]) == 0
    rep = json.loads((run / "cv_report" / "report.json").read_text())
    assert sorted(rep["cases"]) == ["0005", "0006", "0007"]
    assert rep["truths_left_out"]["count"] == 5  # 0001-0004, 0008: the test cases, never trained or validated on
    assert [f["n_cases"] for f in rep["folds"]] == [len(splits[0]["val"]), len(splits[1]["val"])]
    assert len(rep["checkpoints"]) == 2  # each fold's best.pt named


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(("info", msg))

    def warning(self, msg):
        self.lines.append(("warning", msg))


def test_export_predicts_what_it_can_and_scores_it(tmp_path):
    """One validation scan that cannot be read: one warning naming it, the other cases predicted and scored; the
    export rerun with the same checkpoint keeps what it made; source scans gone: one warning, nothing exported."""
    import helpers as RH

    from glam3d.engine.crossval import export_validation
    from glam3d.engine.distributed import DistEnv
    from preprocessing.datasets import synapse_labels

    ck = RH.predict_checkpoint(tmp_path / "best.pt")
    scans = RH.write_scans(tmp_path / "scans", 3)
    truth = np.zeros((24, 20, 12), np.uint8)
    truth[5:10, 5:9, 2:8] = 1  # spleen (BTCV value 1)
    labels = [RH.save_nii(truth, tmp_path / "labels" / f"s{i}.nii.gz") for i in range(3)]
    scans[1].write_bytes(b"not a scan at all")
    names, values = synapse_labels(False)
    data = tmp_path / "pre"
    data.mkdir()
    cases = {f"s{i}": {"source_image": str(scans[i]), "source_label": str(labels[i])} for i in range(3)}
    (data / "dataset.json").write_text(json.dumps({"labels": names, "plan": {"label_values": values},
                                                   "training": [], "cases": cases}))
    log = _Log()
    res = export_validation(tmp_path / "run", ck, {"cases": cases}, data, ["s0", "s1", "s2"], DistEnv(), log)
    warn = [m for level, m in log.lines if level == "warning"]
    assert len(warn) == 1 and "1 of 3 validation cases could not be predicted (case s1:" in warn[0]
    assert str(scans[1]) in warn[0]
    assert (res["written"], res["failed"], res["skipped"]) == (2, 1, 0)
    val = tmp_path / "run" / "validation"
    assert sorted(p.name for p in val.glob("*.nii.gz")) == ["s0.nii.gz", "s2.nii.gz"]
    rep = json.loads((val / "report.json").read_text())
    assert sorted(rep["cases"]) == ["s0", "s2"] and res["mean_dice"] == rep["overall"]["dice"]["mean"]
    stamp = (val / "s0.nii.gz").stat().st_mtime_ns
    res = export_validation(tmp_path / "run", ck, {"cases": cases}, data, ["s0", "s2"], DistEnv(), _Log())
    assert (res["written"], res["skipped"]) == (0, 2) and (val / "s0.nii.gz").stat().st_mtime_ns == stamp
    scans[2].unlink()
    log = _Log()
    assert export_validation(tmp_path / "run2", ck, {"cases": cases}, data, ["s0", "s2"], DistEnv(), log) is None
    assert [m for level, m in log.lines if level == "warning"] == [
        f"the fold's validation cases were not predicted: their source scans are needed (1 of 2 cases: case s2: "
        f"{scans[2]} is gone)"]
    assert not (tmp_path / "run2").exists()

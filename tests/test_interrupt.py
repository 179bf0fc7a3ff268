"""Interrupted and concurrent runs.

* SIGKILL during ``glam3d-preprocess`` and ``glam3d predict`` (parked mid-write of a known case by a launcher
  shim, then killed), then the same command again: finished cases are kept (same mtime, not redone), the
  temporary file of the killed write is swept, and the results equal an uninterrupted run byte for byte.
* Training: SIGKILL mid-epoch + ``--resume`` ending bit-exact is ``tests/test_resume.py``
  (``test_sigkill_mid_epoch_then_resume_is_bit_exact``); here: a corrupt ``last.pt`` falls back to
  ``last.pt.prev`` with a one-line warning, still bit-exact; and ``--deterministic`` runs are bit-identical.
* Two ``glam3d predict`` processes writing the same outputs (``--overwrite``) never corrupt each other's files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import helpers as H
from glam3d import cli as glam3d_cli
from glam3d.utils.ownership import MARKER
from preprocessing import cli as pre_cli

CASES = ["0005", "0006", "0007", "0009", "0010"]


def _mtimes(paths):
    return {Path(p).name: Path(p).stat().st_mtime_ns for p in paths}


def _npz_equal(a: Path, b: Path):
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            x, y = za[k], zb[k]
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (a.name, k)


# ------------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.slow
def test_preprocess_sigkill_then_rerun(tmp_path):
    raw = tmp_path / "raw"
    for c in CASES:
        H.tiny_case(raw, c)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    argv = ["synapse", "--raw", raw, "--quiet"]
    # parked while writing the 3rd case (its temporary file half written), then SIGKILL
    proc, marker = H.start_hanging(tmp_path, "preprocessing", [*argv, "--out", killed],
                                   "numpy:savez_compressed", at=3)
    H.kill_when_parked(proc, marker)
    done = sorted(p for p in (killed / "cases").glob("*.npz") if not p.name.startswith("."))
    assert [p.stem for p in done] == CASES[:2]
    assert len(H.temp_litter(killed)) == 1          # the killed write's temporary file
    assert not (killed / "dataset.json").exists()
    before = _mtimes(done)

    assert pre_cli.main([str(a) for a in argv] + ["--out", str(killed)]) == 0
    assert _mtimes(done) == before                  # finished cases kept, not redone
    assert not H.temp_litter(killed)                # the dead writer's temporary file was swept
    assert pre_cli.main([str(a) for a in argv] + ["--out", str(ref)]) == 0
    assert sorted(p.name for p in (killed / "cases").iterdir()) == [f"{c}.npz" for c in CASES]
    for c in CASES:
        _npz_equal(killed / "cases" / f"{c}.npz", ref / "cases" / f"{c}.npz")
    assert H.load_json(killed / "dataset.json") == H.load_json(ref / "dataset.json")


# ------------------------------------------------------------------------------------------------ predict
@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_inputs")
    H.write_scans(tmp / "scans", 4)
    ck = H.predict_checkpoint(tmp / "ck.pt")
    ref = tmp / "ref"
    assert glam3d_cli.main(["predict", "--checkpoint", str(ck), "--input", str(tmp / "scans"), "--output", str(ref),
                            "--quiet", "--device", "cpu"]) == 0
    return tmp / "scans", ck, ref


def _same_prediction(a: Path, b: Path):
    ia, ib = nib.load(str(a)), nib.load(str(b))
    assert np.array_equal(ia.affine, ib.affine) and ia.shape == ib.shape
    da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
    assert da.dtype == db.dtype and da.tobytes() == db.tobytes(), a.name


@pytest.mark.slow
def test_predict_sigkill_then_rerun(tmp_path, predict_inputs):
    scans, ck, ref = predict_inputs
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", ck, "--input", scans, "--output", out, "--quiet", "--device", "cpu"]
    proc, marker = H.start_hanging(tmp_path, "glam3d", argv, "glam3d.utils.nifti:write_nifti_streamed", at=2)  # s1
    H.kill_when_parked(proc, marker)
    assert sorted(p.name for p in out.glob("*.nii.gz") if not p.name.startswith(".")) == ["s0.nii.gz"]
    assert len(H.temp_litter(out)) == 1
    before = _mtimes([out / "s0.nii.gz"])

    assert glam3d_cli.main([str(a) for a in argv]) == 0
    assert _mtimes([out / "s0.nii.gz"]) == before                 # kept, not redone
    assert not H.temp_litter(out)
    names = sorted(p.name for p in ref.glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == names and len(names) == 4
    for n in names:
        _same_prediction(out / n, ref / n)
    man = H.load_json(out / "predictions.json")
    assert sorted(man["cases"]) == ["s0", "s1", "s2", "s3"]
    assert man["cases"]["s0"]["status"].startswith("skipped")


@pytest.mark.slow
def test_two_predict_processes_same_folder(tmp_path, predict_inputs):
    scans, ck, ref = predict_inputs
    out = tmp_path / "shared"
    argv = ["-m", "glam3d", "predict", "--checkpoint", ck, "--input", scans, "--output", out, "--quiet",
            "--device", "cpu", "--overwrite"]
    procs = [H.python(*argv) for _ in range(2)]
    for p in procs:
        o, e = p.communicate(timeout=240)
        assert p.returncode == 0, e[-3000:]
    names = sorted(p.name for p in ref.glob("*.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == names
    for n in names:
        _same_prediction(out / n, ref / n)
    man = H.load_json(out / "predictions.json")             # valid JSON, every case recorded
    assert sorted(man["cases"]) == ["s0", "s1", "s2", "s3"]
    assert all(c["status"] == "written" for c in man["cases"].values())
    # nothing hidden but the folder's ownership marker, which lists every output
    assert not H.temp_litter(out) and [p.name for p in out.iterdir() if p.name.startswith(".")] == [MARKER]
    assert set(H.load_json(out / MARKER)["entries"]) == set(names) | {"predictions.json"}


def test_manifest_merge_is_serialised(tmp_path):
    """Concurrent manifest updates (threads standing in for processes) lose no case: each writer re-reads the
    manifest under the folder lock before merging."""
    import threading

    from glam3d.inference.manifest import MANIFEST, write_manifest as _write_manifest
    from glam3d.utils.io import atomic_write_json

    out = tmp_path / "out"
    out.mkdir()

    def writer(i):
        _write_manifest(out, {"format": "x", "cases": {f"c{i}": {"status": "written"}}}, {}, 1, 0,
                        atomic_write_json)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(H.load_json(out / MANIFEST)["cases"]) == sorted(f"c{i}" for i in range(16))


# ------------------------------------------------------------------------------------------------ training
def _train_cli(cfg, out, *extra):
    return glam3d_cli.main(["train", str(cfg), "--out", str(out), "--no-progress", *map(str, extra)])


@pytest.fixture
def tinynet(tmp_path, monkeypatch):
    cfg, data, mods = H.train_setup(tmp_path, epochs=3)
    monkeypatch.syspath_prepend(str(mods))
    sys.modules.pop("glam3d_tinynet", None)
    return cfg


def _state(run: Path, name="last.pt"):
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_falls_back_to_previous_checkpoint(tmp_path, tinynet, capsys):
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _train_cli(tinynet, full) == 0
    # a run stopped after epoch 2 whose last.pt then got truncated (disk full, copy cut short)
    assert _train_cli(tinynet, broken, "--epochs", "2") == 0
    ck = broken / "checkpoints"
    assert _state(broken, "last.pt.prev")["epoch"] == 1 and _state(broken)["epoch"] == 2
    (ck / "last.pt").write_bytes((ck / "last.pt").read_bytes()[:4096])
    capsys.readouterr()
    assert _train_cli(tinynet, broken, "--resume") == 0
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if "last.pt.prev" in ln]
    assert len(warn) == 1 and "warning" in warn[0] and "truncated/corrupt" in warn[0], err
    assert "resuming from epoch 2, iteration 0" in err
    a, b = _state(full), _state(broken)
    assert a["iteration"] == b["iteration"] == 6
    _assert_same_weights(a["model"], b["model"])       # replaying epoch 2 from last.pt.prev is bit-exact


def test_resume_with_both_checkpoints_corrupt_is_one_line(tmp_path, tinynet, capsys):
    run = tmp_path / "run"
    assert _train_cli(tinynet, run, "--epochs", "2") == 0
    for n in ("last.pt", "last.pt.prev"):
        (run / "checkpoints" / n).write_bytes(b"\0" * 100)
    capsys.readouterr()
    assert _train_cli(tinynet, run, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "last.pt" in err[0], err


def test_keep_previous_never_leaves_no_checkpoint(tmp_path):
    """``save_checkpoint(keep_previous=True)`` copies the old file to ``.prev`` (hard link) while ``path`` stays:
    at no moment is there no loadable ``path``."""
    from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint

    p = tmp_path / "last.pt"
    save_checkpoint(p, {"model_spec": {}, "model": {"w": torch.zeros(2)}, "epoch": 1}, keep_previous=True)
    assert not p.with_name("last.pt.prev").exists()
    save_checkpoint(p, {"model_spec": {}, "model": {"w": torch.ones(2)}, "epoch": 2}, keep_previous=True)
    assert load_checkpoint(p)["epoch"] == 2 and load_checkpoint(p.with_name("last.pt.prev"))["epoch"] == 1
    assert not H.temp_litter(tmp_path)


def test_deterministic_training_is_bit_identical(tmp_path, tinynet):
    import yaml

    cfg = yaml.safe_load(tinynet.read_text())
    cfg["train"]["deterministic"] = False          # the flag alone must make it deterministic
    cfg["train"]["epochs"] = 2
    path = tmp_path / "nondet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train_cli(path, a, "--deterministic", "--device", "cpu") == 0
    assert _train_cli(path, b, "--deterministic", "--device", "cpu") == 0
    sa, sb = _state(a), _state(b)
    assert sa["config"]["train"]["deterministic"] is True
    _assert_same_weights(sa["model"], sb["model"])
    for pid, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sb["optimizer"]["state"][pid][k])

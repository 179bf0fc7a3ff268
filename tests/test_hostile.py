"""Hostile files: checkpoints (and preprocessed cases) whose pickle is built to run code when loaded.

Each payload, if it ever ran, would create a marker file (``os.system("touch MARKER")`` or ``eval`` of an
``open(MARKER, "w")``). Every loader must refuse the file with one line naming it, and the marker must never
appear: ``glam3d predict --checkpoint``, ``glam3d train --resume`` (no silent fallback to ``last.pt.prev``),
``model.init_checkpoint``, ``glam3d.models.pretrained.load_pretrained``, and the preprocessed ``.npz`` cases.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers as H
from glam3d import cli as glam3d_cli
from glam3d.engine.checkpoint import FORMAT, UnsafeCheckpoint, load_checkpoint
from glam3d.errors import UserError


class ShellPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


def _evil_checkpoint(path: Path, marker: Path, where="top", kind=ShellPayload, base: dict = None):
    """A file that looks like a glam3d checkpoint but carries a payload (``torch.save`` pickles the
    ``__reduce__`` result; nothing runs while saving)."""
    state = dict(base or {"format": FORMAT, "model_spec": {"name": "nnformer_tiny", "kwargs": {}},
                          "model": {"w": torch.zeros(2)}})
    if where == "top":
        state["extra"] = kind(marker)
    elif where == "weights":
        state["model"] = dict(state["model"], evil=kind(marker))
    torch.save(state, path)
    assert not marker.exists()
    return path


def _raw_pickle(path: Path, marker: Path):
    with open(path, "wb") as fh:
        pickle.dump({"format": FORMAT, "model": ShellPayload(marker)}, fh)
    return path


@pytest.mark.parametrize("variant", ["top-shell", "weights-eval", "raw-pickle"])
def test_load_checkpoint_refuses_payload(tmp_path, variant):
    marker = tmp_path / "MARKER"
    p = tmp_path / "evil.pt"
    if variant == "top-shell":
        _evil_checkpoint(p, marker)
    elif variant == "weights-eval":
        _evil_checkpoint(p, marker, where="weights", kind=EvalPayload)
    else:
        _raw_pickle(p, marker)
    with pytest.raises(UserError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg and "weights_only=False" not in msg  # never advise the unsafe load
    if variant != "raw-pickle":
        assert isinstance(e.value, UnsafeCheckpoint) and "never runs" in msg and "nothing was executed" in msg
    assert not marker.exists()


def test_predict_refuses_payload_checkpoint(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    H.write_scans(tmp_path / "scans", 1)
    base = load_checkpoint(H.predict_checkpoint(tmp_path / "good.pt"))
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, base=base)
    out = tmp_path / "pred"
    capsys.readouterr()
    code = glam3d_cli.main(["predict", "--checkpoint", str(evil), "--input", str(tmp_path / "scans"),
                            "--output", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(evil) in err[0] and "refused" in err[0], err
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())


def test_train_resume_refuses_payload_and_does_not_fall_back(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "MARKER"
    cfg, _, mods = H.train_setup(tmp_path)
    monkeypatch.syspath_prepend(str(mods))
    sys.modules.pop("glam3d_tinynet", None)
    run = tmp_path / "run"
    args = ["train", str(cfg), "--out", str(run), "--no-progress"]
    assert glam3d_cli.main(args) == 0
    last = run / "checkpoints" / "last.pt"
    assert last.with_name("last.pt.prev").is_file()          # a good previous checkpoint is there ...
    _evil_checkpoint(last, marker, base=load_checkpoint(last))
    before = last.read_bytes()
    capsys.readouterr()
    assert glam3d_cli.main(args + ["--resume", "--epochs", "3"]) == 2  # ... but a planted payload stops the run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(last) in err[0] and "refused" in err[0], err
    assert not marker.exists()
    assert last.read_bytes() == before                          # evidence left in place


def test_init_checkpoint_payload_refused(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "MARKER"
    cfg, _, mods = H.train_setup(tmp_path)
    monkeypatch.syspath_prepend(str(mods))
    sys.modules.pop("glam3d_tinynet", None)
    evil = _evil_checkpoint(tmp_path / "init.pt", marker, kind=EvalPayload)
    capsys.readouterr()
    assert glam3d_cli.main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress",
                            "--override", f"model.init_checkpoint={evil}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(evil) in err[0], err
    assert not marker.exists()


def test_load_pretrained_refuses_payload(tmp_path):
    from glam3d.models.networks.swin import SwinBackbone
    from glam3d.models.pretrained import load_pretrained

    marker = tmp_path / "MARKER"
    model = SwinBackbone(3, 8, (2, 2, 2, 2), (1, 2, 2, 4), window_size=2, drop_path_rate=0.0)
    evil = tmp_path / "swin.pth"
    torch.save({"model": {**model.state_dict(), "head.weight": ShellPayload(marker)}}, evil)
    with pytest.raises(UserError) as e:
        load_pretrained(model, evil)
    assert str(evil) in str(e.value) and "never runs" in str(e.value)
    assert not marker.exists()


def test_preprocessed_case_with_pickled_object_refused(tmp_path, monkeypatch, capsys):
    """A ``cases/<id>.npz`` holding a pickled object array: the training loader reads with allow_pickle=False."""
    marker = tmp_path / "MARKER"
    cfg, data, mods = H.train_setup(tmp_path)
    monkeypatch.syspath_prepend(str(mods))
    sys.modules.pop("glam3d_tinynet", None)
    case = data / "cases" / "case02.npz"
    z = dict(np.load(case))
    z["image"] = np.array([ShellPayload(marker)], dtype=object)
    np.savez(case, **z)
    capsys.readouterr()
    assert glam3d_cli.main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(case) in err[0] and "allow_pickle" in err[0], err
    assert not marker.exists()


def test_preprocess_does_not_unpickle_existing_outputs(tmp_path):
    """A planted ``OUT/cases/<id>.npz`` with a pickled object is not trusted as a finished case: it is redone."""
    from preprocessing.run import run_synapse

    marker = tmp_path / "MARKER"
    raw = tmp_path / "raw"
    H.tiny_case(raw, "0005")
    out = tmp_path / "out"
    (out / "cases").mkdir(parents=True)
    np.savez(out / "cases" / "0005.npz", image=np.zeros(3), meta=np.array([ShellPayload(marker)], dtype=object),
             plan_hash=np.array([ShellPayload(marker)], dtype=object))
    s = run_synapse(raw, out, quiet=True)
    assert (s["done"], s["skipped"], s["failed"]) == (1, 0, 0)
    with np.load(out / "cases" / "0005.npz", allow_pickle=False) as z:
        assert z["image"].dtype == np.float32
    assert not marker.exists()

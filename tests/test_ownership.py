"""glam3d.utils.ownership and its use by glam3d-preprocess: glam3d replaces or deletes only what it wrote."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import helpers as H
from glam3d.errors import UserError
from glam3d.utils.ownership import MARKER, OwnedFolder, claim, read_marker
from preprocessing import cli


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the module
def test_claim_new_folder_writes_the_marker_first(tmp_path):
    f = claim(tmp_path / "a" / "b", "run", tool="test")
    assert sorted(p.name for p in f.path.iterdir()) == [MARKER]
    m = read_marker(f.path)
    assert m["kind"] == "run" and m["entries"] == [] and len(m["id"]) == 32 and m["tool"] == "test"
    f.record("checkpoints/", "config.yaml")
    assert read_marker(f.path)["entries"] == ["checkpoints/", "config.yaml"]
    again = claim(f.path, "run")
    assert again.id == f.id and again.owns("checkpoints/last.pt") and again.owns("config.yaml")
    assert not again.owns("checkpoints.txt") and not again.owns("other/x")
    with pytest.raises(UserError, match="holds a glam3d run folder"):
        claim(f.path, "preprocessed-dataset")


def test_foreign_content_refused_and_untouched(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "dataset.json").write_text('{"my": "own file"}')
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "best.pt").write_bytes(b"my weights")
    before = _digest(d)
    with pytest.raises(UserError, match="was not written by glam3d") as e:
        claim(d, "run")
    msg = str(e.value)
    assert msg.startswith(str(d)) and "\n" not in msg and "checkpoints, dataset.json" in msg
    assert _digest(d) == before and not (d / MARKER).exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")       # a file browser's litter does not count
    assert claim(tmp_path / "empty", "run").entries == []


def test_record_remove_clear_only_touch_listed_entries(tmp_path):
    f = claim(tmp_path / "run", "run")
    (f.path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and was not written by glam3d") as e:
        f.record("notes.txt")
    assert str(f.path / "notes.txt") in str(e.value)
    f.record("out/", "summary.json")
    (f.path / "out").mkdir()
    (f.path / "out" / "a.npz").write_bytes(b"1")
    (f.path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="not listed"):
        f.remove("notes.txt")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (f.path / "link").symlink_to(outside)         # a link the user made is not glam3d's either
    with pytest.raises(UserError, match="exists and was not written"):
        f.record("link")
    gone = f.clear()
    assert sorted(gone) == ["out/", "summary.json"]
    assert sorted(p.name for p in f.path.iterdir()) == sorted([MARKER, "notes.txt", "link"])
    assert outside.read_text() == "keep" and read_marker(f.path)["entries"] == []
    for bad in ("../x", "/abs", MARKER, ""):
        with pytest.raises(ValueError):
            f.record(bad)


def test_unreadable_or_foreign_marker_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / MARKER).write_text("{not json")
    with pytest.raises(UserError, match="cannot read the glam3d folder marker"):
        claim(d, "run")
    (d / MARKER).write_text(json.dumps({"glam3d_folder": 1, "id": "x", "kind": "run", "entries": ["../../etc"]}))
    with pytest.raises(UserError, match="not a valid glam3d folder marker"):
        claim(d, "run")


def test_concurrent_writers_keep_each_others_entries(tmp_path):
    a = claim(tmp_path / "r", "run")
    b = claim(tmp_path / "r", "run")          # a second process on the same folder
    a.record("x.json")
    b.record("y.json")
    assert read_marker(tmp_path / "r")["entries"] == ["x.json", "y.json"]
    b.remove("y.json")
    assert read_marker(tmp_path / "r")["entries"] == ["x.json"]


def test_adoption_lists_only_what_adopt_returns(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "result.json").write_text("{}")
    (d / "user.txt").write_text("mine")
    logs = []
    f = claim(d, "run", adopt=lambda p: ["result.json"] if (p / "result.json").exists() else None, log=logs.append)
    assert f.entries == ["result.json"] and len(logs) == 1 and MARKER in logs[0]
    f.clear()
    assert (d / "user.txt").read_text() == "mine" and not (d / "result.json").exists()


# ------------------------------------------------------------------------------------------------ glam3d-preprocess
def _raw(tmp_path, ids=("0005", "0006")):
    raw = tmp_path / "raw"
    for c in ids:
        H.tiny_case(raw, c)
    return raw


def _synapse(raw, out, *extra):
    return cli.main(["synapse", "--raw", str(raw), "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("overwrite", [False, True])
def test_unrelated_dataset_json_never_replaced(tmp_path, capsys, overwrite):
    raw = _raw(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text('{"name": "my nnU-Net dataset", "labels": {"background": 0}}')
    before = _digest(out)
    capsys.readouterr()
    assert _synapse(raw, out, *(["--overwrite"] if overwrite else [])) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {out}: is not empty (dataset.json)"), err
    assert _digest(out) == before and sorted(p.name for p in out.iterdir()) == ["dataset.json"]


def test_preprocess_output_is_owned_and_overwrite_removes_only_its_own(tmp_path, capsys):
    raw = _raw(tmp_path)
    out = tmp_path / "out"
    assert _synapse(raw, out) == 0
    m = read_marker(out)
    assert m["kind"] == "preprocessed-dataset" and m["entries"] == [".cache/", "cases/", "dataset.json"]
    owned = OwnedFolder(out, m["id"], m["kind"], entries=m["entries"])
    assert all(owned.owns(p.name) for p in out.iterdir() if p.name != MARKER)
    (out / "my_notes.txt").write_text("mine")
    (out / "cases" / "0099.npz").write_bytes((out / "cases" / "0005.npz").read_bytes())   # a case gone since
    assert _synapse(raw, out) == 0                                                         # resume: marker kept
    assert read_marker(out)["id"] == m["id"] and (out / "cases" / "0099.npz").exists()
    capsys.readouterr()
    assert cli.main(["synapse", "--raw", str(raw), "--out", str(out), "--overwrite"]) == 0
    assert "--overwrite: removed cases/, dataset.json (glam3d" in capsys.readouterr().err   # no .cache/: transunet
    assert (out / "my_notes.txt").read_text() == "mine" and not (out / "cases" / "0099.npz").exists()
    assert sorted(p.stem for p in (out / "cases").iterdir()) == ["0005", "0006"]
    # a phantom folder is not a preprocessed one (and the other way round)
    ph = tmp_path / "ph"
    assert cli.main(["phantom", "--out", str(ph), "--cases", "1", "--matrix", "32", "--quiet"]) == 0
    assert read_marker(ph)["entries"] == ["img/", "label/", "phantom.json"]
    capsys.readouterr()
    assert _synapse(raw, ph) == 2
    assert "holds a glam3d phantom-dataset folder" in capsys.readouterr().err


def test_outputs_from_before_markers_are_adopted(tmp_path, capsys):
    """A folder glam3d wrote before the markers existed (dataset.json with the plan, cases/<id>.npz of glam3d
    arrays) is taken as glam3d's: marker written listing those, the user's other files never touched."""
    raw = _raw(tmp_path)
    out = tmp_path / "out"
    assert _synapse(raw, out) == 0
    (out / MARKER).unlink()
    (out / "my_notes.txt").write_text("mine")
    mt = {p.name: p.stat().st_mtime_ns for p in (out / "cases").iterdir()}
    capsys.readouterr()
    assert cli.main(["synapse", "--raw", str(raw), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "written before ownership markers" in err and "2 already done" in err
    assert read_marker(out)["entries"] == [".cache/", "cases/", "dataset.json"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cases").iterdir()} == mt
    assert _synapse(raw, out, "--overwrite") == 0
    assert (out / "my_notes.txt").read_text() == "mine"
    # a run killed before it wrote dataset.json: cases/ alone is recognised by the arrays in its archives
    (out / MARKER).unlink()
    (out / "dataset.json").unlink()
    assert _synapse(raw, out) == 0 and (out / "dataset.json").is_file()
    # ... but not a cases/ folder holding something else
    (out / MARKER).unlink()
    (out / "dataset.json").unlink()
    np.savez(out / "cases" / "mine.npz", weights=np.zeros(3))
    before = _digest(out)
    capsys.readouterr()
    assert _synapse(raw, out) == 2
    assert "was not written by glam3d" in capsys.readouterr().err and _digest(out) == before


def test_phantom_refuses_a_users_raw_folder(tmp_path, capsys):
    """img/ + label/ without phantom.json is what a user's BTCV download looks like: never adopted."""
    raw = _raw(tmp_path)
    before = _digest(raw)
    capsys.readouterr()
    assert cli.main(["phantom", "--out", str(raw), "--cases", "2", "--matrix", "32", "--quiet", "--overwrite"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and str(raw) in err[0] and "was not written by glam3d" in err[0]
    assert _digest(raw) == before
    ph = tmp_path / "ph"
    assert cli.main(["phantom", "--out", str(ph), "--cases", "1", "--matrix", "32", "--quiet"]) == 0
    (ph / MARKER).unlink()                                        # a phantom folder from before the markers
    assert cli.main(["phantom", "--out", str(ph), "--cases", "2", "--matrix", "32", "--quiet"]) == 0
    assert read_marker(ph)["entries"] == ["img/", "label/", "phantom.json"]

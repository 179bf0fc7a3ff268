"""Provenance and ownership of a prediction folder.

* Each case's entry in ``predictions.json`` names the checkpoints (path, sha256) and the options that made its
  file; a rerun skips a case only when they are the same, otherwise predicts it again; ``glam3d evaluate`` then
  credits every case to the checkpoint that made it.
* The folder carries glam3d's ownership marker: a file glam3d did not write is never replaced, ``--overwrite`` or
  not; prediction folders from before the marker are adopted when their ``predictions.json`` lists their files.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import helpers as H

from glam3d.cli import main
from glam3d.inference.manifest import sha256_file
from glam3d.utils.ownership import MARKER

pytest.importorskip("preprocessing.pipeline")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny nnFormer checkpoints A and B of one plan, three scans."""
    tmp = tmp_path_factory.mktemp("provenance")
    a, b = H.predict_checkpoint(tmp / "A.pt", seed=0), H.predict_checkpoint(tmp / "B.pt", seed=1)
    H.write_scans(tmp / "scans", 3)
    return tmp, a, b


def _predict(ck, inputs, out, *extra):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return main(["predict", "--checkpoint", *([str(c) for c in ck] if isinstance(ck, list) else [str(ck)]),
                 "--input", *map(str, inputs), "--output", str(out), "--device", "cpu", "--quiet", *map(str, extra)])


def _man(out):
    return json.loads((out / "predictions.json").read_text())


def test_rerun_with_another_checkpoint_predicts_again(setup, tmp_path, capsys):
    tmp, a, b = setup
    out = tmp_path / "out"
    assert _predict(a, tmp / "scans", out) == 0
    made_by_a = (out / "s1.nii.gz").read_bytes()
    capsys.readouterr()
    assert _predict(a, tmp / "scans", out) == 0                       # same checkpoint and options: skipped
    assert "0 written, 3 skipped" in capsys.readouterr().out
    assert _man(out)["cases"]["s1"]["checkpoints"] == [{"path": str(a.resolve()), "sha256": sha256_file(a)}]
    assert _predict(b, tmp / "scans" / "s1.nii.gz", out) == 0         # another checkpoint: predicted again
    assert "1 written, 0 skipped" in capsys.readouterr().out
    assert (out / "s1.nii.gz").read_bytes() != made_by_a
    man = _man(out)
    assert man["cases"]["s1"]["checkpoints"] == [{"path": str(b.resolve()), "sha256": sha256_file(b)}]
    assert man["cases"]["s0"]["checkpoints"][0]["sha256"] == sha256_file(a)   # the others stay A's
    assert _predict(b, tmp / "scans" / "s1.nii.gz", out, "--overlap", "0.5") == 0   # another option: again
    assert "1 written, 0 skipped" in capsys.readouterr().out
    entry = _man(out)["cases"]["s1"]
    assert entry["inference"] == {"roi_size": [16, 32, 32], "overlap": 0.5, "mode": "gaussian", "mirror": False,
                                  "amp": "off", "postprocessing": None, "format": ".nii.gz"}
    assert set(json.loads((out / MARKER).read_text())["entries"]) == {"predictions.json", "s0.nii.gz",
                                                                     "s1.nii.gz", "s2.nii.gz"}


def test_evaluate_names_the_checkpoint_of_each_case(setup, tmp_path):
    """predict with A, then with B over one case, into one folder; glam3d evaluate's report credits s0 and s2 to A
    and s1 to B (report.json checkpoints, per case, and the markdown's provenance)."""
    from preprocessing.datasets import synapse_labels

    tmp, a, b = setup
    out = tmp_path / "preds"
    assert _predict(a, tmp / "scans", out) == 0
    assert _predict(b, tmp / "scans" / "s1.nii.gz", out) == 0
    gt = tmp_path / "gt"
    values = [v for _, v in sorted(synapse_labels(False)[1].items())]
    for i in range(3):
        truth = np.zeros((24, 20, 12), np.uint8)
        truth[5:10, 5:9, 2:8] = values[0]
        truth[13:19, 10:15, 3:9] = values[1]
        H.save_nii(truth, gt / f"s{i}.nii.gz")
    assert main(["evaluate", "--pred", str(out), "--gt", str(gt), "--labels", "synapse", "--out",
                 str(tmp_path / "report"), "--quiet"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    by_sha = {c["sha256"]: c for c in report["checkpoints"]}
    assert sorted(by_sha[sha256_file(a)]["cases"]) == ["s0", "s2"]
    assert by_sha[sha256_file(b)]["cases"] == ["s1"] and by_sha[sha256_file(b)]["paths"] == [str(b.resolve())]
    assert not any(c["from_top_level"] for c in report["checkpoints"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert sha256_file(b)[:12] in md and sha256_file(a)[:12] in md


def test_a_file_glam3d_did_not_write_is_never_replaced(setup, tmp_path, capsys):
    tmp, a, _ = setup
    out = tmp_path / "out"
    assert _predict(a, tmp / "scans" / "s0.nii.gz", out) == 0
    user = nib.Nifti1Image(np.ones((24, 20, 12), np.uint8), H.AFFINE)
    nib.save(user, out / "s1.nii.gz")          # the user's own file, where glam3d's s1 would go
    before = (out / "s1.nii.gz").read_bytes()
    listing = sorted(p.name for p in out.iterdir())
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert _predict(a, tmp / "scans", out, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out / 's1.nii.gz'}: exists and was not written by glam3d")
        assert "--overwrite included" in err and len(err.strip().splitlines()) == 1
        assert (out / "s1.nii.gz").read_bytes() == before and sorted(p.name for p in out.iterdir()) == listing
    # a folder of someone else's files (no marker, no glam3d manifest) is refused whole
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "predictions.json").write_text('{"mine": true}\n')
    assert _predict(a, tmp / "scans", other) == 2
    err = capsys.readouterr().err
    assert f"{other}: is not empty" in err and "not written by glam3d" in err
    assert sorted(p.name for p in other.iterdir()) == ["predictions.json"]


def test_prediction_folder_from_before_the_marker_is_adopted(setup, tmp_path, capsys):
    """A folder glam3d predict wrote before ownership markers (predictions.json listing its files, a case entry
    with checkpoint_sha256 only): adopted with a note, the marker listing exactly those files; its outputs
    (provenance in the older form) are predicted again; the user's notes beside them stay unlisted."""
    tmp, a, _ = setup
    out = tmp_path / "old"
    assert _predict(a, tmp / "scans", out) == 0
    (out / MARKER).unlink()
    man = _man(out)
    for e in man["cases"].values():       # the older per-case form
        e["checkpoint_sha256"] = e.pop("checkpoints")[0]["sha256"]
        e.pop("inference")
    (out / "predictions.json").write_text(json.dumps(man))
    (out / "notes.txt").write_text("my notes\n")
    capsys.readouterr()
    assert _predict(a, tmp / "scans", out) == 0
    cap = capsys.readouterr()
    assert f"note: {out}: glam3d output written before ownership markers" in cap.err
    assert "3 written, 0 skipped" in cap.out
    entries = set(json.loads((out / MARKER).read_text())["entries"])
    assert entries == {"predictions.json", "s0.nii.gz", "s1.nii.gz", "s2.nii.gz"}
    assert (out / "notes.txt").read_text() == "my notes\n"
    assert _man(out)["cases"]["s0"]["checkpoints"][0]["sha256"] == sha256_file(a)


def test_killed_run_keeps_finished_cases_recorded(setup, tmp_path, monkeypatch):
    """Each case's entry is in predictions.json as soon as its file is written: a run that dies at the second case
    leaves the first recorded, so the next run skips it."""
    from glam3d.inference import outputs

    tmp, a, _ = setup
    out = tmp_path / "out"
    real, calls = outputs.write_label_map, []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(outputs, "write_label_map", dying)
    assert _predict(a, tmp / "scans", out) == 130
    assert sorted(_man(out)["cases"]) == ["s0"] and _man(out)["cases"]["s0"]["status"] == "written"
    monkeypatch.setattr(outputs, "write_label_map", real)
    mtime = (out / "s0.nii.gz").stat().st_mtime_ns
    assert _predict(a, tmp / "scans", out) == 0
    assert (out / "s0.nii.gz").stat().st_mtime_ns == mtime
    assert _man(out)["cases"]["s0"]["status"].startswith("skipped")
    assert _man(out)["cases"]["s0"]["checkpoints"][0]["sha256"] == sha256_file(a)


def test_a_failed_rerun_leaves_the_earlier_entry(setup, tmp_path, capsys):
    """A rerun with another checkpoint whose scan now fails to read: the file the earlier run made stays, and so does
    its entry (its checkpoint), with the failed attempt noted."""
    tmp, a, b = setup
    scans = tmp_path / "scans"
    H.write_scans(scans, 1)
    out = tmp_path / "out"
    assert _predict(a, scans, out) == 0
    d = H.scan()
    d[3, 3, 3] = np.nan
    H.save_nii(d, scans / "s0.nii.gz")
    assert _predict(b, scans, out) == 2
    assert "NaN/inf" in capsys.readouterr().err
    entry = _man(out)["cases"]["s0"]
    assert entry["status"] == "written" and entry["checkpoints"][0]["sha256"] == sha256_file(a)
    assert entry["last_attempt"]["status"] == "failed" and "NaN/inf" in entry["last_attempt"]["error"]


def test_probabilities_added_to_a_kept_label_map(setup, tmp_path):
    """--probabilities on a rerun with the same checkpoint and options: the label map is kept (not rewritten), the
    class maps are added and recorded; another run with them is skipped."""
    tmp, a, _ = setup
    out = tmp_path / "out"
    assert _predict(a, tmp / "scans" / "s0.nii.gz", out) == 0
    mtime = (out / "s0.nii.gz").stat().st_mtime_ns
    assert _predict(a, tmp / "scans" / "s0.nii.gz", out, "--probabilities") == 0
    assert (out / "s0.nii.gz").stat().st_mtime_ns == mtime
    probs = np.asanyarray(nib.load(out / "s0_probabilities.nii.gz").dataobj)
    assert probs.shape == (24, 20, 12, 9) and np.allclose(probs.sum(-1), 1, atol=1e-3)
    entry = _man(out)["cases"]["s0"]
    assert entry["probabilities"] == str(out / "s0_probabilities.nii.gz") and "kept" in entry["note"]
    assert entry["checkpoints"][0]["sha256"] == sha256_file(a)
    pm = (out / "s0_probabilities.nii.gz").stat().st_mtime_ns
    assert _predict(a, tmp / "scans" / "s0.nii.gz", out, "--probabilities") == 0
    assert (out / "s0_probabilities.nii.gz").stat().st_mtime_ns == pm
    assert _man(out)["cases"]["s0"]["status"].startswith("skipped")

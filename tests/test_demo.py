"""``glam3d demo`` end to end, shortened: phantoms -> preprocessing -> 2 training steps -> inference on the held-out
phantoms -> report. Checks the plumbing (files, summary, exit code, rerun resumes), not the Dice target: the full
demo's measured figures are in the README."""
import json

import pytest

from glam3d.cli import main


@pytest.mark.slow
def test_demo_short_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    # 12 BTCV ids: 0001..0010, 0021, 0022 -> 6 Synapse-test phantoms (0001-0004, 0008, 0022), 6 for training
    args = ["demo", "--out", str(out), "--cases", "12", "--matrix", "64", "--workers", "1",
            "--override", "train.epochs=1", "--override", "train.iters_per_epoch=2", "--override", "val.max_cases=1",
            "--override", "val.overlap=0.25"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "== demo summary ==" in printed
    assert "mean Dice over the 8 Synapse organs on 6 held-out phantoms" in printed
    assert "total time:" in printed and ("PASS" in printed or "FAIL" in printed)

    report = out / "report"
    for name in ("report.json", "report.csv", "report.md", "report.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    rep = json.loads((report / "report.json").read_text())
    assert 0.0 <= rep["overall"]["dice"]["mean"] <= 1.0
    manifest = json.loads((out / "phantom_pre" / "dataset.json").read_text())
    test_ids = sorted(e["id"] for e in manifest["test"])
    assert test_ids == ["0001", "0002", "0003", "0004", "0008", "0022"]
    assert not set(test_ids) & {str(e.get("id")) for e in manifest["training"]}   # never trained on
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == \
        sorted(f"img{i}.nii.gz" for i in test_ids)
    assert (out / "run" / "checkpoints" / "last.pt").is_file()

    # a rerun resumes: nothing is regenerated, retrained or re-predicted, and the summary is printed again
    stamp = (out / "predictions" / "img0001.nii.gz").stat().st_mtime_ns
    assert main(args) == 0
    assert "== demo summary ==" in capsys.readouterr().out
    assert (out / "predictions" / "img0001.nii.gz").stat().st_mtime_ns == stamp


def test_demo_overwrite_refuses_a_foreign_folder(tmp_path, capsys):
    """--overwrite deletes only a folder that holds a demo run and nothing else."""
    from glam3d.cli import main

    keep = tmp_path / "thesis.tex"
    keep.write_text("precious")
    assert main(["demo", "--out", str(tmp_path), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to delete" in err[0] and str(tmp_path) in err[0]
    assert keep.read_text() == "precious"

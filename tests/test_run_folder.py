"""Run folders glam3d can prove it owns (``glam3d train --out DIR``, ``glam3d demo --out DIR``): the marker first,
only listed entries replaced or deleted, a folder that never held a glam3d run refused with one line (``--overwrite``
or not), resume unchanged, run folders from before markers adopted with a note."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from glam3d.config import config_from_dict
from glam3d.errors import UserError
from glam3d.utils.ownership import MARKER, read_marker
import tiny_training as H


def _train(cfg, **kw):
    from glam3d.engine.train import train

    return train(config_from_dict(cfg), console=False, **kw)


def _cfg(data, out, **train):
    return H.tiny_config(data, out, train={"epochs": 1, "iters_per_epoch": 2, **train})


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_marker_written_first_and_lists_the_run(tiny):
    """The marker exists before the first file of the run (a callback at the start sees it listing every run
    entry) and lists exactly what the run may write."""
    from glam3d.engine.callbacks import Callback
    from glam3d.engine.run_folder import RUN_ENTRIES, RUN_KIND

    data, tmp = tiny
    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer):
            seen["marker"] = read_marker(trainer.run_dir)

    _train(_cfg(data, tmp / "run"), callback=Look())
    assert seen["marker"]["kind"] == RUN_KIND and set(seen["marker"]["entries"]) == set(RUN_ENTRIES)
    marker = read_marker(tmp / "run")
    for p in (tmp / "run").iterdir():  # everything the run wrote is listed
        assert p.name == MARKER or (p.name + ("/" if p.is_dir() else "")) in marker["entries"], p.name


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("theirs", ["checkpoints", "config.yaml", "notes"])
def test_folder_that_never_held_a_run_is_refused(tiny, capsys, overwrite, theirs):
    """A user's own checkpoints/, config.yaml (or anything) in --out: one line naming the folder, nothing
    written, replaced or deleted, with or without --overwrite."""
    from glam3d.commands.train import main

    data, tmp = tiny
    out = tmp / "mine"
    if theirs == "checkpoints":
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.pt").write_bytes(b"my own model, trained for a month")
    elif theirs == "config.yaml":
        out.mkdir()
        (out / "config.yaml").write_text("experiment: mine\nlr: 0.1\n")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("thesis notes\n")
    before = _snapshot(out)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(json.dumps(_cfg(data, tmp / "unused")))
    code = main([str(cfg), "--out", str(out), "--no-progress", *(["--overwrite"] if overwrite else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {out}: is not empty") and "was not written by glam3d" in err[0]
    assert _snapshot(out) == before and not (out / MARKER).exists()


def test_overwrite_removes_only_what_the_marker_lists(tiny):
    data, tmp = tiny
    out = tmp / "run"
    _train(_cfg(data, out))
    (out / "notes.txt").write_text("mine\n")
    (out / "analysis").mkdir()
    (out / "analysis" / "fig.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="already holds a training run"):
        _train(_cfg(data, out))
    _train(_cfg(data, out, seed=3), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "analysis" / "fig.png").read_bytes() == b"mine"
    assert (out / "checkpoints" / "last.pt").is_file()
    # a file of theirs under a name the run uses, put into a glam3d run folder: the run refuses to replace it
    (out / "checkpoints" / "last.pt").unlink()
    (out / "checkpoints" / "best.pt").unlink()
    marker = json.loads((out / MARKER).read_text())
    marker["entries"] = [e for e in marker["entries"] if e != "log.csv"]
    (out / MARKER).write_text(json.dumps(marker))
    (out / "log.csv").write_text("my,own,table\n")
    with pytest.raises(UserError, match=r"log.csv: exists and was not written by glam3d"):
        _train(_cfg(data, out))
    assert (out / "log.csv").read_text() == "my,own,table\n"


def test_resume_keeps_working_and_a_dead_start_is_replaced(tiny):
    data, tmp = tiny
    out = tmp / "run"
    _train(_cfg(data, out, epochs=1))
    assert _train(_cfg(data, out, epochs=2), resume=True)["iterations"] == 4
    # a start that died before its first checkpoint leaves listed files only: a new start replaces them
    (out / "checkpoints" / "last.pt").unlink()
    (out / "checkpoints" / "last.pt.prev").unlink()
    (out / "checkpoints" / "best.pt").unlink()
    assert _train(_cfg(data, out, epochs=1))["iterations"] == 2


def _strip_marker(out: Path) -> None:
    (out / MARKER).unlink()


def test_run_folder_from_before_markers_is_adopted(tiny, capsys):
    """A glam3d run folder without a marker (written before markers existed) is recognised: --resume carries on
    and --overwrite replaces it, each with a note; the marker then lists exactly glam3d's entries."""
    data, tmp = tiny
    out = tmp / "old"
    _train(_cfg(data, out, epochs=1))
    _strip_marker(out)
    (out / "notes.txt").write_text("mine\n")
    from glam3d.engine.train import train

    summary = train(config_from_dict(_cfg(data, out, epochs=2)), resume=True, console=True)
    assert summary["iterations"] == 4
    err = capsys.readouterr().err
    assert "glam3d output written before ownership markers" in err
    marker = read_marker(out)
    assert "notes.txt" not in marker["entries"] and "checkpoints/" in marker["entries"]
    _strip_marker(out)
    _train(_cfg(data, out, epochs=1), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine\n" and read_marker(out)["kind"] == "training-run"


def test_adoption_needs_glam3d_content(tiny):
    """Not adopted: a config.yaml that is not a glam3d config, a checkpoint that is not glam3d's, or a run entry
    glam3d does not write that way."""
    from glam3d.engine.run_folder import adopt_run

    data, tmp = tiny
    out = tmp / "old"
    _train(_cfg(data, out, epochs=1))
    _strip_marker(out)
    assert adopt_run(out) is not None
    cases = {
        "config": lambda: (out / "config.yaml").write_text("lr: 0.1\n"),
        "checkpoint": lambda: (out / "checkpoints" / "best.pt").write_bytes(b"PK not really"),
        "extra checkpoint": lambda: (out / "checkpoints" / "mine.pt").write_bytes(b"x"),
        "log.csv": lambda: (out / "log.csv").write_text("a,b\n1,2\n"),
        "tb": lambda: (out / "tb" / "plot.png").write_bytes(b"x"),
    }
    for what, spoil in cases.items():
        saved = _snapshot(out)
        spoil()
        assert adopt_run(out) is None, what
        with pytest.raises(UserError, match="is not empty"):
            _train(_cfg(data, out), overwrite=True)
        for p in list(out.rglob("*")):  # restore
            if p.is_file() and str(p.relative_to(out)) not in saved:
                p.unlink()
        for rel, content in saved.items():
            (out / rel).write_bytes(content)
        assert adopt_run(out) is not None


def test_demo_folder_is_claimed_with_a_marker(tmp_path, capsys):
    """``glam3d demo --out`` writes its marker first, --overwrite deletes only its listed entries; a demo folder
    from before markers is adopted."""
    from glam3d.commands.demo import DEMO_ENTRIES, DEMO_KIND, claim_demo_folder

    out = tmp_path / "demo"
    owned = claim_demo_folder(out, overwrite=False)
    assert owned.kind == DEMO_KIND and set(read_marker(out)["entries"]) == set(DEMO_ENTRIES)
    (out / "report").mkdir()
    (out / "report" / "report.json").write_text("{}")
    (out / "thesis.tex").write_text("precious")
    claim_demo_folder(out, overwrite=True)
    assert not (out / "report").exists() and (out / "thesis.tex").read_text() == "precious"

    from preprocessing import cli as pre_cli

    old = tmp_path / "old_demo"
    assert pre_cli.main(["phantom", "--out", str(old / "phantom_raw"), "--cases", "1", "--matrix", "32",
                         "--quiet"]) == 0
    for folder in (old, old / "phantom_raw"):
        (folder / MARKER).unlink(missing_ok=True)
    (old / "test_labels").mkdir()
    (old / "test_labels" / "label0001.nii.gz").write_bytes(b"x")
    (old / "mine.txt").write_text("mine")
    capsys.readouterr()
    claim_demo_folder(old, overwrite=True)
    assert "written before ownership markers" in capsys.readouterr().out
    assert not (old / "phantom_raw").exists() and not (old / "test_labels").exists()
    assert (old / "mine.txt").read_text() == "mine"

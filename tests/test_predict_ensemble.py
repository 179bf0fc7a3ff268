"""Ensembles: ``predict_volume`` over a list of networks and ``glam3d predict --checkpoint A B``.

The reference is the plain average of the networks' separately blended probabilities (each network's own sliding
window, then ``(pA + pB) / 2``); the ensemble averages the softmax per window before blending, which equals it up
to float32 rounding because blending is linear. Memory: the blending buffers of an ensemble are those of one
network (the accumulator peak and the spill are unchanged)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import helpers as H

from glam3d.cli import main
from glam3d.inference.sliding_window import predict_volume

pytest.importorskip("preprocessing.pipeline")


class TinyNet(torch.nn.Module):
    def __init__(self, seed, cin=1, k=4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Conv3d(cin, 6, 3, padding=1)
        self.b = torch.nn.Conv3d(6, k, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("overlap,mirror", [(0.5, False), (0.25, True), (0.0, False)])
def test_ensemble_equals_the_average_of_separate_runs(tmp_path, overlap, mirror):
    torch.manual_seed(0)
    image = torch.randn(1, 37, 20, 18)
    nets = [TinyNet(1).eval(), TinyNet(2).eval(), TinyNet(3).eval()]
    roi = (8, 12, 10)
    kw = dict(overlap=overlap, sw_batch_size=2, mirror=mirror, return_probs=True)
    single = [predict_volume(n, image, roi, **kw)[1] for n in nets]
    stats_one, stats_all = {}, {}
    predict_volume(nets[0], image, roi, stats=stats_one, **kw)
    labels, probs = predict_volume(nets, image, roi, stats=stats_all, **kw)
    ref = sum(single) / len(single)
    torch.testing.assert_close(probs, ref, rtol=0, atol=2e-6)
    assert not torch.allclose(single[0], single[1], atol=1e-2)   # the networks do disagree
    top2 = torch.topk(ref, 2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-4                             # argmax defined beyond rounding
    assert clear.float().mean() > 0.95
    assert torch.equal(labels[clear], ref.argmax(0).to(torch.uint8)[clear])
    # the blending holds what it holds for one network: the ensemble averages per window
    assert stats_all["peak_accumulator_bytes"] == stats_one["peak_accumulator_bytes"]
    assert stats_all["windows"] == stats_one["windows"]
    # with the cells parked on disk between window rows: the same labels, the same parking
    spill_one, spill_all = {}, {}
    predict_volume(nets[0], image, roi, spill=tmp_path, stats=spill_one, **kw)
    spilled = predict_volume(nets, image, roi, spill=tmp_path, stats=spill_all, **kw)
    assert torch.equal(spilled[0], labels) and torch.equal(spilled[1], probs)
    assert spill_all["peak_accumulator_bytes"] == spill_one["peak_accumulator_bytes"]
    assert spill_all.get("spilled_cells") == spill_one.get("spilled_cells")


def test_one_network_in_a_list_is_the_network():
    torch.manual_seed(0)
    image = torch.randn(1, 20, 16, 16)
    net = TinyNet(5).eval()
    a = predict_volume(net, image, (8, 8, 8), return_probs=True)
    b = predict_volume([net], image, (8, 8, 8), return_probs=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="disagree"):
        predict_volume([net, TinyNet(6, k=3).eval()], image, (8, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        predict_volume([], image, (8, 8, 8))


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """Three tiny nnFormer checkpoints of one plan (seeds 0, 1, 2), two scans, and each checkpoint's own
    ``glam3d predict --probabilities`` output."""
    tmp = tmp_path_factory.mktemp("folds")
    cks = [H.predict_checkpoint(tmp / f"fold{k}.pt", seed=k) for k in range(3)]
    scans = tmp / "scans"
    H.write_scans(scans, 2, shape=(30, 26, 14))
    for k, ck in enumerate(cks):
        assert main(["predict", "--checkpoint", str(ck), "--input", str(scans), "--output", str(tmp / f"single{k}"),
                     "--device", "cpu", "--quiet", "--probabilities"]) == 0
    return tmp, cks, scans


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_cli_ensemble_averages_the_checkpoints(folds, capsys):
    """``--checkpoint A B C``: the probabilities written equal the average of the three runs' probability files
    (up to float32 rounding), the labels are their argmax in label values, and every case's entry names all three
    checkpoints (path and sha256)."""
    from glam3d.inference.manifest import sha256_file
    from preprocessing.datasets import synapse_labels

    tmp, cks, scans = folds
    out = tmp / "ensemble"
    assert main(["predict", "--checkpoint", *map(str, cks), "--input", str(scans), "--output", str(out),
                 "--device", "cpu", "--quiet", "--probabilities"]) == 0
    values = np.array([0] + [v for _, v in sorted(synapse_labels(False)[1].items())])
    for case in ("s0", "s1"):
        singles = [_data(tmp / f"single{k}" / f"{case}_probabilities.nii.gz") for k in range(3)]
        ref = sum(s.astype(np.float64) for s in singles) / 3
        got = _data(out / f"{case}_probabilities.nii.gz")
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
        top2 = np.sort(ref, axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 1e-4
        labels = _data(out / f"{case}.nii.gz")
        assert clear.mean() > 0.95
        assert np.array_equal(labels[clear], values[ref.argmax(-1)][clear])
        assert not np.array_equal(_data(tmp / "single0" / f"{case}.nii.gz"), _data(tmp / "single1" / f"{case}.nii.gz"))
    man = json.loads((out / "predictions.json").read_text())
    want = [{"path": str(c.resolve()), "sha256": sha256_file(c)} for c in cks]
    assert man["cases"]["s0"]["checkpoints"] == want and man["checkpoints"][1]["sha256"] == want[1]["sha256"]
    assert man["inference"]["ensemble"] == 3
    # the same ensemble in another order is the same ensemble: skipped
    assert main(["predict", "--checkpoint", *map(str, cks[::-1]), "--input", str(scans), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out


def test_predictor_from_checkpoints_equals_the_command(folds):
    from glam3d import Predictor

    tmp, cks, scans = folds
    out = tmp / "ensemble_api"
    assert main(["predict", "--checkpoint", str(cks[0]), str(cks[2]), "--input", str(scans / "s1.nii.gz"),
                 "--output", str(out), "--device", "cpu", "--quiet"]) == 0
    for make in (lambda: Predictor.from_checkpoints([cks[0], cks[2]], device="cpu"),
                 lambda: Predictor.from_checkpoint([cks[0], cks[2]], device="cpu")):
        predictor = make()
        assert len(predictor.models) == 2 and predictor.checkpoints == [cks[0], cks[2]]
        seg = predictor.predict(scans / "s1.nii.gz")
        assert np.array_equal(np.asanyarray(seg.dataobj), _data(out / "s1.nii.gz"))


def _variant(tmp, name, edit):
    from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(H.predict_checkpoint(tmp / f"{name}_base.pt", seed=7))
    edit(state)
    save_checkpoint(tmp / f"{name}.pt", state)
    return tmp / f"{name}.pt"


@pytest.mark.parametrize("edit,words", [
    (lambda s: s["plan"].update(target_spacing=[3.0, 1.5, 1.5]), r"preprocessing plan differs from .*fold0\.pt's "
                                                                  r"\(target_spacing: \[3\.0, 2\.0, 2\.0\] vs"),
    (lambda s: s["labels"].update({"1": "vessel"}), r"its labels differ from .*fold0\.pt's \(1: \"aorta\" vs "
                                                    r"\"vessel\"\)"),
])
def test_ensemble_of_different_plans_or_labels_is_refused(folds, tmp_path, capsys, edit, words):
    import re

    _, cks, scans = folds
    other = _variant(tmp_path, "other", edit)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(cks[0]), str(other), "--input", str(scans), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {other}:"), err
    assert re.search(words, err), err
    assert not out.exists()


def test_ensemble_member_with_non_finite_weights_is_refused(folds, tmp_path, capsys):
    """A checkpoint saved with NaN weights (around save_checkpoint, which refuses them) in an ensemble: one line
    naming that checkpoint, nothing written (not even the output folder)."""
    from glam3d.engine.checkpoint import load_checkpoint

    _, cks, scans = folds
    state = load_checkpoint(cks[1])
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 4)
    state["model"][name][0] = float("nan")
    bad = tmp_path / "diverged.pt"
    torch.save(state, bad)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(cks[0]), str(bad), "--input", str(scans), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:") and "NaN/inf" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_ensemble_settings_are_the_first_checkpoints(folds, tmp_path, capsys):
    """Members validated with other window settings: the ensemble runs with the first checkpoint's (or the options
    given), and says so in a note."""
    from glam3d import Predictor

    _, cks, _ = folds
    other = _variant(tmp_path, "wide", lambda s: s["config"]["val"].update(roi_size=[32, 32, 32], overlap=0.5))
    p = Predictor.from_checkpoints([cks[0], other], device="cpu")
    assert p.settings["roi_size"] == [16, 32, 32] and p.settings["overlap"] == 0.25
    err = capsys.readouterr().err
    assert f"note: {other}: validated with roi_size [32, 32, 32], overlap 0.5" in err
    p = Predictor.from_checkpoints([cks[0], other], device="cpu", roi_size=[32, 32, 32])
    assert p.settings["roi_size"] == [32, 32, 32]
    assert "roi_size" not in capsys.readouterr().err.split("validated with")[-1].split(";")[0]

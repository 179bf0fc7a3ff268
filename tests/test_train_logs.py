"""What a run writes while it trains: TensorBoard scalars by default (one warning line, saying how to install it,
when tensorboard is missing), progress bars only on a terminal (a piped log gets one plain line per epoch); and
what it says about cases smaller than the training window. Also: ``package.module:factory`` networks checked on
the meta device before the run folder is touched."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glam3d.config import config_from_dict
from glam3d.errors import UserError
import tiny_training as H


def _train(cfg, **kw):
    from glam3d.engine.train import train

    return train(config_from_dict(cfg), **kw)


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_scalars_by_default(tiny):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from glam3d.engine.logging import read_log_csv

    data, tmp = tiny
    _train(H.tiny_config(data, tmp / "run", train={"epochs": 2, "iters_per_epoch": 2}), console=False)
    events = list((tmp / "run" / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "lr", "val_mean_dice", "nonfinite_steps", "val_dice_cube"} <= tags
    rows = read_log_csv(tmp / "run" / "log.csv")
    got = [(e.step, e.value) for e in acc.Scalars("train_loss")]
    assert [s for s, _ in got] == [1, 2]
    assert [v for _, v in got] == pytest.approx([r["train_loss"] for r in rows], rel=1e-5)


def test_missing_tensorboard_is_one_warning_line(tiny, capsys, monkeypatch):
    """Without the tensorboard package: one warning line saying how to install it (not silence), the run goes on
    with log.csv and curves.png; train.tensorboard=false asks for none and gets no warning."""
    data, tmp = tiny
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    _train(H.tiny_config(data, tmp / "run", train={"epochs": 1, "iters_per_epoch": 2}))
    warn = [ln for ln in capsys.readouterr().err.replace(str(tmp), "TMP").splitlines() if "tensorboard" in ln.lower()]
    assert len(warn) == 1, warn
    assert warn[0].startswith("warning: TensorBoard logging is off") and "pip install tensorboard" in warn[0]
    assert not (tmp / "run" / "tb").exists() and (tmp / "run" / "log.csv").is_file()
    assert "pip install tensorboard" in (tmp / "run" / "train.log").read_text()
    _train(H.tiny_config(data, tmp / "run2", train={"epochs": 1, "iters_per_epoch": 2, "tensorboard": False}))
    assert "tensorboard" not in capsys.readouterr().err.replace(str(tmp), "TMP").lower()


# ------------------------------------------------------------------------------------------------ progress
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(tiny, monkeypatch):
    data, tmp = tiny
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _train(H.tiny_config(data, tmp / "run", train={"epochs": 2, "iters_per_epoch": 3, "progress": True}),
           console=False)
    text = term.getvalue()
    assert "\r" in text and "epoch 1/2" in text and "epoch 2/2" in text  # tqdm's frames


def test_no_progress_frames_in_a_piped_log(tiny):
    """A run whose stderr is a pipe (a cluster job's log file): no carriage-return frames, one plain line per
    epoch, the bar on by default."""
    data, tmp = tiny
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(H.tiny_config(data, tmp / "unused", train={"epochs": 3, "iters_per_epoch": 3,
                                                                             "progress": True})))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp / "mods"), str(Path(__file__).resolve().parents[1])]))
    p = subprocess.run([sys.executable, "-m", "glam3d.commands.train", str(cfg), "--out", str(tmp / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "\r" not in p.stderr and "it/s" not in p.stderr
    epochs = [ln for ln in p.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in epochs] == ["1/3", "2/3", "3/3"]


# ------------------------------------------------------------------------------------------------ small cases
def test_cases_smaller_than_the_window_are_padded_with_a_note(tmp_path, monkeypatch):
    H.write_tinynet(tmp_path / "mods")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    sys.modules.pop("glam3d_tinynet", None)
    data = H.make_dataset(tmp_path / "data", shape=(12, 24, 24))  # 12 slices < the window's 16
    summary = _train(H.tiny_config(data, tmp_path / "run",
                                   train={"epochs": 1, "iters_per_epoch": 2}), console=False)
    log = (tmp_path / "run" / "train.log").read_text()
    notes = [ln for ln in log.splitlines() if "smaller than data.roi_size" in ln]
    assert len(notes) == 1
    assert "5 case(s) smaller than data.roi_size 16x16x16" in notes[0] and "case00 12x24x24" in notes[0]
    assert "zero-padded" in notes[0]
    assert summary["iterations"] == 2 and summary["best_mean_dice"] is not None  # trained and validated


# ------------------------------------------------------------------------------------------------ preflight
FACTORY_SRC = '''
import torch.nn as nn

BUILT = []


class Strided(nn.Module):
    """A network whose input sizes must be multiples of 8 (it says so, as glam3d's networks do)."""
    divisor = (8, 8, 8)

    def __init__(self, num_classes=3, in_channels=1, width=8):
        super().__init__()
        self.spatial_dims, self.num_classes = 3, num_classes
        self.conv = nn.Conv3d(in_channels, width, 3, padding=1)
        self.mid = nn.Conv3d(width, width, 3, padding=1)
        self.head = nn.Conv3d(width, num_classes, 1)
        BUILT.append(self.conv.weight.device.type)

    def forward(self, x):
        return self.head(self.mid(self.conv(x)))
'''


def test_factory_network_checked_on_meta_before_the_run_folder(tiny):
    data, tmp = tiny
    (tmp / "mods" / "glam3d_strided.py").write_text(FACTORY_SRC)
    sys.modules.pop("glam3d_strided", None)
    import glam3d_strided

    out = tmp / "run"
    cfg = H.tiny_config(data, out, model={"name": "glam3d_strided:Strided"}, data={"roi_size": [12, 16, 16]})
    with pytest.raises(UserError, match=r"'data.roi_size' \[12, 16, 16\] must be divisible by the network's "
                                        r"\(8, 8, 8\)"):
        _train(cfg, console=False)
    assert not out.exists() and glam3d_strided.BUILT == ["meta"]  # checked on the meta device, nothing written
    # 27 x 2^34 weights in the middle layer: terabytes, refused from the meta copy
    cfg = H.tiny_config(data, out, model={"name": "glam3d_strided:Strided", "overrides": {"width": 1 << 17}},
                        data={"roi_size": [16, 16, 16]})
    with pytest.raises(UserError, match=r"needs [\d.]+ TiB for its weights, gradients and adamw state alone"):
        _train(cfg, console=False)
    assert not out.exists() and glam3d_strided.BUILT == ["meta", "meta"]
    cfg = H.tiny_config(data, out, model={"name": "glam3d_strided:Strided", "overrides": {"depth": 3}})
    with pytest.raises(UserError, match=r"config key 'model': cannot build 'glam3d_strided:Strided' .*depth"):
        _train(cfg, console=False)
    assert not out.exists()
    cfg = H.tiny_config(data, out, model={"name": "glam3d_strided:Strided"}, train={"epochs": 1, "iters_per_epoch": 1})
    assert _train(cfg, console=False)["iterations"] == 1
    assert glam3d_strided.BUILT == ["meta", "meta", "meta", "cpu"]  # checked, then built for real once

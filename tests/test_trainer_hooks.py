"""The trainer's extension points: :class:`glam3d.engine.callbacks.Callback` hooks (order, numbering, on a resumed
run), plain-function callbacks (rank 0, the epoch's row), a :class:`~glam3d.engine.train.Trainer` subclass
overriding one hook, and the task objects chosen per config."""
from __future__ import annotations

import sys

import pytest

from glam3d.config import config_from_dict
import tiny_training as H


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    H.write_tinynet(tmp_path / "mods")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    sys.modules.pop("glam3d_tinynet", None)
    return H.make_dataset(tmp_path / "data"), tmp_path


def test_callback_hooks_in_order_and_resume(tiny):
    """Every hook fires in the documented order with 0-based epochs and steps; the state a hook sees is the run's
    (iterations counted, epochs finished at on_epoch_end); a resumed run starts its hooks where it resumes; a plain
    function gets each epoch's row."""
    from glam3d.engine.callbacks import Callback
    from glam3d.engine.train import train

    data, tmp = tiny

    class Record(Callback):
        def __init__(self):
            self.events = []

        def on_train_start(self, trainer):
            self.events.append(("start", trainer.state.epoch, trainer.state.iteration))

        def on_epoch_start(self, trainer, epoch):
            self.events.append(("epoch", epoch))

        def on_step_start(self, trainer, epoch, step):
            self.events.append(("step", epoch, step, trainer.state.iteration))

        def on_epoch_end(self, trainer, row):
            self.events.append(("end", row["epoch"], row["iteration"], trainer.state.epoch))

        def on_train_end(self, trainer, summary):
            self.events.append(("done", summary["iterations"]))

    cfg = H.tiny_config(data, tmp / "run", train={"epochs": 2, "iters_per_epoch": 2, "val_every": 0})
    rec, rows = Record(), []
    summary = train(config_from_dict(cfg), console=False, callback=[rec, rows.append])
    assert rec.events == [("start", 0, 0), ("epoch", 0), ("step", 0, 0, 0), ("step", 0, 1, 1), ("end", 1, 2, 1),
                          ("epoch", 1), ("step", 1, 0, 2), ("step", 1, 1, 3), ("end", 2, 4, 2), ("done", 4)]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["iteration"] == summary["iterations"] == 4
    assert "train_loss" in rows[0] and "val_mean_dice" not in rows[0]  # no validation asked for

    cfg["train"]["epochs"] = 3
    rec = Record()
    train(config_from_dict(cfg), console=False, resume=True, callback=rec)
    assert rec.events == [("start", 2, 4), ("epoch", 2), ("step", 2, 0, 4), ("step", 2, 1, 5), ("end", 3, 6, 3),
                          ("done", 6)]


def test_bad_callback_is_refused_before_anything_starts(tiny):
    from glam3d.engine.train import train

    data, tmp = tiny
    with pytest.raises(TypeError, match="callback must be"):
        train(config_from_dict(H.tiny_config(data, tmp / "run")), console=False, callback=42)
    with pytest.raises(TypeError, match="callback must be"):
        train(config_from_dict(H.tiny_config(data, tmp / "run")), console=False, callback=[print, "x"])
    assert not (tmp / "run").exists()


def test_trainer_subclass_overrides_one_hook(tiny):
    """A subclass of Trainer changes one step of the loop (here: counts the steps and their batches) and the rest
    of the run (validation, checkpoints, summary) is unchanged."""
    from glam3d.engine import distributed as dist
    from glam3d.engine.train import Trainer, numerics

    data, tmp = tiny

    class Counting(Trainer):
        seen = []

        def train_step(self, batch):
            Counting.seen.append(tuple(batch["image"].shape))
            return super().train_step(batch)

    cfg = config_from_dict(H.tiny_config(data, tmp / "run", train={"epochs": 1, "iters_per_epoch": 3}))
    env = dist.setup("cpu")
    try:
        with numerics(True):
            summary = Counting(cfg, env, console=False).run()
    finally:
        dist.cleanup(env)
    assert Counting.seen == [(2, 1, 16, 16, 16)] * 3  # batch 2 x num_samples 1 patches of the roi
    assert summary["iterations"] == 3 and (tmp / "run" / "checkpoints" / "best.pt").is_file()


def test_task_objects():
    """2D configs get the image task, the rest the volume task; their names and best-score keys."""
    from glam3d.engine import distributed as dist
    from glam3d.engine.tasks import ImageTask, VolumeTask, task_for

    env = dist.DistEnv()
    vol = config_from_dict({"data": {"root": "x"}})
    img = config_from_dict({"data": {"dataset": "synthetic", "root": "x"}})
    assert isinstance(task_for(vol, env), VolumeTask) and isinstance(task_for(img, env), ImageTask)
    assert (VolumeTask.best_key, ImageTask.best_key) == ("best_mean_dice", "best_miou")
    assert task_for(img, env).log_columns(["a", "b"])[-3:] == ["val_iou_a", "val_iou_b", "best_mIoU"]

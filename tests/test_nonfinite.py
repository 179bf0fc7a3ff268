"""Non-finite training steps: a NaN/inf loss or gradient skips the optimiser step (weights and optimiser state
untouched, schedule advanced), is counted (log line, ``log.csv``, TensorBoard, checkpoints), and too many stop the
run with one line (exit 2) naming the run folder; NaN weights are never saved; a NaN ``last.pt`` is never resumed
from; under DDP every rank skips the same steps.

The NaN is made by test-only callbacks that wrap the trainer's loss (or optimiser) on chosen iterations."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from glam3d.config import config_from_dict
from glam3d.engine.callbacks import Callback
from glam3d.errors import UserError
import tiny_training as H


NAN_CALLBACK = '''
import torch
from glam3d.engine.callbacks import Callback


class NaNLossAt(Callback):
    """The loss becomes NaN (``value``) at the given global iterations (0-based), on the given ranks (None: all):
    multiplied (its gradients non-finite too) or, ``add``, added as a constant (the gradients stay finite)."""

    def __init__(self, iterations, ranks=None, value=float("nan"), add=False):
        self.iterations, self.ranks, self.value, self.add = set(iterations), ranks, value, add

    def on_train_start(self, trainer):
        real = trainer.loss_fn

        def loss(out, label):
            value = real(out, label)
            if trainer.state.iteration in self.iterations and (self.ranks is None or trainer.env.rank in self.ranks):
                value = value + self.value if self.add else value * self.value
            return value

        trainer.loss_fn = loss
'''


def _nan_module(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "glam3d_nan_callback.py").write_text(NAN_CALLBACK)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    H.write_tinynet(tmp_path / "mods")
    _nan_module(tmp_path / "mods")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    for m in ("glam3d_tinynet", "glam3d_nan_callback"):
        sys.modules.pop(m, None)
    return H.make_dataset(tmp_path / "data"), tmp_path


def _nan_at(*iterations, **kw):
    from glam3d_nan_callback import NaNLossAt

    return NaNLossAt(iterations, **kw)


def _train(cfg, **kw):
    from glam3d.engine.train import train

    return train(config_from_dict(cfg), console=False, **kw)


class Snapshots(Callback):
    """Weights, optimiser state and learning rate at the start of every step."""

    def __init__(self):
        self.at = {}

    def on_step_start(self, trainer, epoch, step):
        opt = trainer.optimizer.state_dict()["state"]
        self.at[trainer.state.iteration] = (
            {k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in opt.items()},
            trainer.scheduler.last_epoch)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value,add", [(float("nan"), False), (float("inf"), False), (float("nan"), True)])
def test_nonfinite_step_is_skipped_and_counted(tiny, value, add):
    from glam3d.engine.logging import read_log_csv

    data, tmp = tiny
    cfg = H.tiny_config(data, tmp / "run", optim={"schedule": "poly", "step_per": "iter"},
                        train={"epochs": 2, "iters_per_epoch": 4, "val_every": 2})
    snaps = Snapshots()
    summary = _train(cfg, callback=[_nan_at(2, 3, 5, value=value, add=add), snaps])
    for it in (2, 3, 5):  # a skipped step changes no weight and no optimiser state; the schedule advances
        w0, o0, s0 = snaps.at[it]
        w1, o1, s1 = snaps.at[it + 1]
        assert _same(w0, w1) and all(_same(o0[k], o1[k]) for k in o0) and s1 == s0 + 1
    w0, _, _ = snaps.at[1]
    assert not _same(w0, snaps.at[2][0])  # a good step does change them
    assert all(torch.isfinite(v).all() for v in snaps.at[7][0].values())
    rows = read_log_csv(tmp / "run" / "log.csv")
    assert [r["nonfinite_steps"] for r in rows] == [2, 1]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)  # the mean of the finite steps
    log = (tmp / "run" / "train.log").read_text()
    assert "non-finite loss or gradient at epoch 1 iteration 2: step skipped" in log
    assert "2 step(s) skipped: non-finite loss or gradient (2 in all)" in log
    assert "1 step(s) skipped: non-finite loss or gradient (3 in all)" in log
    assert summary["nonfinite_steps"] == 3 and summary["iterations"] == 8
    from glam3d.engine.checkpoint import load_checkpoint

    assert load_checkpoint(tmp / "run" / "checkpoints" / "last.pt")["nonfinite"] == {"in_a_row": 0, "total": 3}


def test_too_many_in_a_row_stop_the_run_with_one_line(tiny, capsys, monkeypatch):
    from glam3d.commands import train as cmd
    from glam3d.engine import train as engine

    data, tmp = tiny
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(H.tiny_config(data, tmp / "unused", train={
        "epochs": 3, "iters_per_epoch": 4, "val_every": 0, "max_nonfinite_in_a_row": 2})))
    real = engine.train
    monkeypatch.setattr(engine, "train", lambda c, callback=None, **kw: real(c, callback=_nan_at(*range(5, 99)), **kw))
    out = tmp / "run"
    assert cmd.main([str(cfg), "--out", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the run's log lines, then the error
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1 and lines[-1] == err[0], lines
    assert err[0].startswith(f"error: {out}: training stopped at epoch 2, iteration 3")
    assert "NaN/inf in 3 steps in a row (train.max_nonfinite_in_a_row = 2)" in err[0]
    assert "3 non-finite steps in all; every skipped step left the weights unchanged" in err[0]
    from glam3d.engine.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 1  # the last epoch end; nothing diverged was saved
    assert "training stopped at epoch 2" in (out / "train.log").read_text()  # the log keeps the error too


def test_too_many_in_all_stop_the_run(tiny):
    data, tmp = tiny
    cfg = H.tiny_config(data, tmp / "run", train={"epochs": 4, "iters_per_epoch": 4, "val_every": 0,
                                                  "max_nonfinite_steps": 3, "max_nonfinite_in_a_row": 10})
    with pytest.raises(UserError, match=r"NaN/inf in 4 steps in all \(train.max_nonfinite_steps = 3\)") as err:
        _train(cfg, callback=_nan_at(1, 5, 9, 13))
    assert str(tmp / "run") in str(err.value) and "epoch 4, iteration 1" in str(err.value)


def test_zero_limit_stops_at_the_first(tiny):
    data, tmp = tiny
    cfg = H.tiny_config(data, tmp / "run", train={"epochs": 1, "iters_per_epoch": 4, "max_nonfinite_in_a_row": 0})
    with pytest.raises(UserError, match=r"1 steps in a row \(train.max_nonfinite_in_a_row = 0\)"):
        _train(cfg, callback=_nan_at(1))


class NaNWeightsAt(Callback):
    """After the optimiser step of the given iteration, one weight becomes NaN (its gradients were finite)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def on_step_start(self, trainer, epoch, step):
        if trainer.state.iteration != self.iteration:
            return
        opt, real = trainer.optimizer, trainer.optimizer.step

        def step_then_nan(*a, **k):
            out = real(*a, **k)
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
            opt.step = real
            return out

        opt.step = step_then_nan


def test_nan_weights_are_never_saved(tiny):
    """Weights that became NaN through a finite-gradient step: the epoch end refuses to save them (one line naming
    the run folder), last.pt stays the previous epoch's, finite."""
    from glam3d.engine.checkpoint import find_non_finite, load_checkpoint

    data, tmp = tiny
    cfg = H.tiny_config(data, tmp / "run", train={"epochs": 3, "iters_per_epoch": 4, "val_every": 0,
                                                  "max_nonfinite_in_a_row": 100, "max_nonfinite_steps": 100})
    with pytest.raises(UserError, match=r"training stopped at epoch 2: the network's weights or optimiser state "
                                        r"became NaN/inf .* no checkpoint was written") as err:
        _train(cfg, callback=NaNWeightsAt(6))
    assert str(tmp / "run") in str(err.value)
    state = load_checkpoint(tmp / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and not find_non_finite(state["model"])
    # with the usual limits the steps after it (NaN loss) stop the run first, saying the weights are NaN
    cfg["train"].update({"max_nonfinite_in_a_row": 0})
    with pytest.raises(UserError, match=r"training stopped at epoch 2, iteration 3: .* the network's weights are "
                                        r"NaN/inf"):
        _train(cfg, callback=NaNWeightsAt(6), overwrite=True)


def test_resume_falls_back_when_last_pt_holds_nan(tiny, capsys):
    """A last.pt with NaN weights (written around save_checkpoint) is never resumed from: last.pt.prev instead,
    with the warning, and the run still ends with the weights of an uninterrupted one."""
    from glam3d.engine.checkpoint import load_checkpoint

    data, tmp = tiny
    ref, out = tmp / "ref", tmp / "run"
    _train(H.tiny_config(data, ref, train={"epochs": 3, "val_every": 0}))
    _train(H.tiny_config(data, out, train={"epochs": 2, "val_every": 0}))
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, last)
    from glam3d.engine.train import train

    summary = train(config_from_dict(H.tiny_config(data, out, train={"epochs": 3, "val_every": 0})), resume=True)
    warn = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "weights hold NaN/inf" in warn[0] and "last.pt.prev instead" in warn[0]
    assert summary["iterations"] == 12
    a, b = (load_checkpoint(p / "checkpoints" / "last.pt")["model"] for p in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_scaler_path_skips_and_stays_consistent(tiny):
    """The fp16 path (a grad scaler; on CUDA in real runs, its CPU twin here): a NaN loss skips the optimiser step,
    the scaler records the overflow (its scale halves) and goes on; weights and optimiser state untouched."""
    from glam3d.engine import distributed as dist
    from glam3d.engine.train import Trainer, numerics

    data, tmp = tiny
    scales = []

    class WithScaler(Trainer):
        def build(self):
            super().build()
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    class Scale(Callback):
        def on_step_start(self, trainer, epoch, step):
            scales.append(trainer.scaler.get_scale())

    cfg = config_from_dict(H.tiny_config(data, tmp / "run", train={"epochs": 1, "iters_per_epoch": 4,
                                                                   "val_every": 0}))
    snaps = Snapshots()
    env = dist.setup("cpu")
    try:
        with numerics(True):
            summary = WithScaler(cfg, env, console=False, callback=[_nan_at(1), snaps, Scale()]).run()
    finally:
        dist.cleanup(env)
    assert summary["nonfinite_steps"] == 1
    w1, o1, _ = snaps.at[1]
    w2, o2, _ = snaps.at[2]
    assert _same(w1, w2) and all(_same(o1[k], o2[k]) for k in o1)
    assert not _same(snaps.at[2][0], snaps.at[3][0])  # the next step trains again
    assert scales == [1024.0, 1024.0, 512.0, 512.0]


def test_guard_agrees_over_ranks_without_a_group():
    """The guard's own arithmetic: finite loss + NaN gradient norm skips; counts reset in a row, not in total."""
    from glam3d.engine.nonfinite import NonFiniteGuard, grad_norm

    g = NonFiniteGuard(max_in_a_row=1, max_total=2)
    one = torch.tensor(1.0)
    assert not g.check(one, torch.tensor(3.0))
    assert g.check(one, torch.tensor(float("nan"))) and g.check(torch.tensor(float("inf")), None)
    assert (g.in_a_row, g.total) == (2, 2) and g.too_many()
    assert not g.check(one, one) and (g.in_a_row, g.total) == (0, 2) and not g.too_many()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(grad_norm([p])) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        NonFiniteGuard(-1, 0)


# ------------------------------------------------------------------------------------------------ DDP
LAUNCHER = """
import runpy, sys
from glam3d.engine import train as engine
from glam3d_nan_callback import NaNLossAt

its, ranks = sys.argv.pop(1), sys.argv.pop(1)
cb = NaNLossAt([int(i) for i in its.split(",")], None if ranks == "all" else [int(r) for r in ranks.split(",")],
               add=True)
real = engine.train
engine.train = lambda cfg, callback=None, **kw: real(cfg, callback=cb, **kw)
sys.argv[0] = "glam3d.commands.train"
runpy.run_module("glam3d.commands.train", run_name="__main__", alter_sys=True)
"""


_ddp_spec = importlib.util.spec_from_file_location("_glam3d_test_nonfinite_ddp",
                                                   Path(__file__).with_name("test_ddp.py"))
DDP = importlib.util.module_from_spec(_ddp_spec)
_ddp_spec.loader.exec_module(DDP)  # its torchrun environment and free port


@pytest.mark.slow
def test_ddp_ranks_agree_on_skipping(tmp_path):
    """2 gloo ranks, the loss NaN on rank 1 only at iteration 2 (its gradients finite: only the loss tells): both
    ranks skip that step (one all-reduced flag), so the run ends with the weights of one process (double batch)
    that skipped the same step; a rank stepping alone would end elsewhere."""
    mods = H.write_tinynet(tmp_path / "mods")
    _nan_module(mods)
    (mods / "nan_launcher.py").write_text(LAUNCHER)
    data = H.make_dataset(tmp_path / "data", n=6)
    cfg = H.tiny_config(data, tmp_path / "unused", train={"epochs": 2, "iters_per_epoch": 3, "val_every": 0})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    w2, w1 = tmp_path / "world2", tmp_path / "world1"
    common = [str(cfg_path), "--no-progress", "--device", "cpu"]
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={DDP._free_port()}",
                           str(mods / "nan_launcher.py"),
                           "2", "1", *common, "--out", str(w2), "--override", "data.batch_size=1"],
                          env=DDP._env(mods), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p1 = subprocess.Popen([sys.executable, str(mods / "nan_launcher.py"), "2", "all", *common, "--out", str(w1),
                           "--override", "data.batch_size=2"],
                          env=DDP._env(mods), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out2, _ = p2.communicate(timeout=300)
    out1, _ = p1.communicate(timeout=300)
    assert p2.returncode == 0, out2[-4000:]
    assert p1.returncode == 0, out1[-4000:]
    s2 = torch.load(w2 / "checkpoints" / "last.pt", weights_only=True)
    s1 = torch.load(w1 / "checkpoints" / "last.pt", weights_only=True)
    assert s2["nonfinite"]["total"] == s1["nonfinite"]["total"] == 1
    for k in s1["model"]:
        torch.testing.assert_close(s2["model"][k], s1["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert "1 step(s) skipped" in (w2 / "train.log").read_text()

"""Resume after SIGKILL: a run killed mid-epoch and resumed ends with bit-identical weights to an uninterrupted
run (deterministic CPU mode). Training runs in subprocesses (``python -m glam3d.commands.train``); a training
callback (:class:`glam3d.engine.callbacks.Callback`, installed by a small launcher) parks the process at a known
iteration, then the test kills it with SIGKILL from outside."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
import tiny_training as H


def _env(mods: Path, **extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(mods), str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


# ``python HALT_LAUNCHER EPOCH:ITER ARGS``: ``python -m glam3d.commands.train ARGS`` whose training gets a callback
# that writes RUN/.halted at EPOCH (1-based), iteration ITER (0-based), and waits there for the SIGKILL
HALT_LAUNCHER = """
import runpy, sys, time
from glam3d.engine import train as engine
from glam3d.engine.callbacks import Callback
from glam3d.utils.io import atomic_write_text

class HaltAt(Callback):
    def __init__(self, epoch, step):
        self.epoch, self.step = epoch, step

    def on_step_start(self, trainer, epoch, step):
        if epoch + 1 == self.epoch and step == self.step:
            atomic_write_text(trainer.run_dir / ".halted", f"{self.epoch}:{self.step}\\n")
            while True:
                time.sleep(0.5)

e, i = (int(v) for v in sys.argv.pop(1).split(":"))
real = engine.train
engine.train = lambda cfg, callback=None, **kw: real(cfg, callback=HaltAt(e, i), **kw)
sys.argv[0] = "glam3d.commands.train"
runpy.run_module("glam3d.commands.train", run_name="__main__", alter_sys=True)
"""


def _start(cfg_path, out, mods, *args, halt_at=None, **env):
    """``python -m glam3d.commands.train`` on ``cfg_path``; ``halt_at="E:I"``: parked at epoch E, iteration I."""
    if halt_at is None:
        launch = ["-m", "glam3d.commands.train"]
    else:
        launcher = Path(mods) / "halt_launcher.py"
        launcher.write_text(HALT_LAUNCHER)
        launch = [str(launcher), halt_at]
    cmd = [sys.executable, *launch, str(cfg_path), "--out", str(out), "--no-progress", *args]
    return subprocess.Popen(cmd, env=_env(mods, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_when_halted(proc, out: Path, timeout=240):
    marker = out / ".halted"
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, f"training exited before the halt point: {proc.communicate()[0][-3000:]}"
        assert time.time() - t0 < timeout, "training never reached the halt point"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path):
    mods = H.write_tinynet(tmp_path / "mods")
    data = H.make_dataset(tmp_path / "data")
    cfg = H.tiny_config(data, tmp_path / "unused", train={"epochs": 3, "iters_per_epoch": 4, "val_every": 1})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    a, b, c = tmp_path / "uninterrupted", tmp_path / "killed", tmp_path / "killed_midsave"

    pa = _start(cfg_path, a, mods)
    # b: killed at epoch 2, iteration 1; last.pt is the end of epoch 1 -> epoch 2 replays from its start
    pb = _start(cfg_path, b, mods, halt_at="2:1")
    # c: checkpoints every 2 iterations, killed at epoch 2, iteration 3 -> resumes inside epoch 2 (iteration 2)
    pc = _start(cfg_path, c, mods, "--override", "train.save_every_iters=2", halt_at="2:3")
    _kill_when_halted(pb, b)
    _kill_when_halted(pc, c)
    sb, sc = _weights(b), _weights(c)
    assert (sb["epoch"], sb["epoch_iteration"], sb["iteration"]) == (1, 0, 4)
    assert (sc["epoch"], sc["epoch_iteration"], sc["iteration"]) == (1, 2, 6)

    rb = _start(cfg_path, b, mods, "--resume")
    rc = _start(cfg_path, c, mods, "--resume", "--override", "train.save_every_iters=2")
    _wait(pa)
    assert "resuming from epoch 2, iteration 0" in _wait(rb)
    assert "resuming from epoch 2, iteration 2" in _wait(rc)

    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa["iteration"] == wb["iteration"] == wc["iteration"] == 12
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
        assert torch.equal(wa["model"][k], wc["model"][k]), k
    for state in (wb, wc):  # optimiser state too
        for pid, st in wa["optimizer"]["state"].items():
            assert torch.equal(st["exp_avg"], state["optimizer"]["state"][pid]["exp_avg"])
    # the log describes the same run: 3 epochs, same losses
    la, lb, lc = ((p / "log.csv").read_text().splitlines() for p in (a, b, c))
    col = la[0].split(",").index("train_loss")
    assert len(la) == len(lb) == len(lc) == 4
    assert [r.split(",")[col] for r in la] == [r.split(",")[col] for r in lb] == [r.split(",")[col] for r in lc]

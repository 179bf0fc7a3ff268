"""DistributedDataParallel on CPU: 2 gloo processes under torchrun (``python -m torch.distributed.run``).

World size 2 with per-rank batch b must end with the same weights as world size 1 with batch 2b (the tiny net has
no batch-norm; per-sample Dice + voxel-mean CE make the loss of a 2b batch the mean of the two b halves; DDP
averages the gradients), to float tolerance; validation cases are sharded and Dice sums all-reduced."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
import tiny_training as H


def _env(mods: Path) -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(mods), str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process_with_double_batch(tmp_path):
    mods = H.write_tinynet(tmp_path / "mods")
    data = H.make_dataset(tmp_path / "data", n=6)
    cfg = H.tiny_config(data, tmp_path / "unused", train={"epochs": 2, "iters_per_epoch": 3, "val_every": 1},
                        data={"val_fraction": 0.34})  # 2 validation cases: one per rank
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    w2, w1 = tmp_path / "world2", tmp_path / "world1"
    common = ["-m", "glam3d.commands.train", str(cfg_path), "--no-progress", "--device", "cpu"]
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *common, "--out", str(w2),
                           "--override", "data.batch_size=1"],
                          env=_env(mods), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p1 = subprocess.Popen([sys.executable, *common, "--out", str(w1), "--override", "data.batch_size=2"],
                          env=_env(mods), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out2, _ = p2.communicate(timeout=300)
    out1, _ = p1.communicate(timeout=300)
    assert p2.returncode == 0, out2[-4000:]
    assert p1.returncode == 0, out1[-4000:]
    assert "x 2 ranks (gloo)" in out2
    assert out2.count("run folder:") == 1  # rank 0 reports, rank 1 stays quiet

    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "log.csv", "curves.png", "split.json"):
        assert (w2 / name).is_file(), name
    s2 = torch.load(w2 / "checkpoints" / "last.pt", weights_only=True)
    s1 = torch.load(w1 / "checkpoints" / "last.pt", weights_only=True)
    assert s2["world_size"] == 2 and len(s2["rng_ranks"]) == 2 and s2["iteration"] == s1["iteration"] == 6
    for k in s1["model"]:
        torch.testing.assert_close(s2["model"][k], s1["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    # validation sharded over the ranks gives the same Dice as one process
    d1, d2 = s1["metrics"]["last_val"], s2["metrics"]["last_val"]
    assert abs(d1["mean_dice"] - d2["mean_dice"]) < 1e-3


def _processes_with(marker: str) -> list:
    """PIDs of this user's processes whose environment holds ``marker`` (Linux /proc)."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_distributed_run_ends_flushed_and_leaves_no_workers(tmp_path):
    """A torchrun job ends through ``end_process`` (``os._exit`` past PyTorch's teardown of the process group DDP
    keeps alive): everything it printed and logged is out, and its DataLoader worker processes are gone with it."""
    import time
    import uuid

    if not Path("/proc/self/environ").exists():
        import pytest
        pytest.skip("needs Linux /proc")
    mods = H.write_tinynet(tmp_path / "mods")
    data = H.make_dataset(tmp_path / "data", n=4)
    cfg = H.tiny_config(data, tmp_path / "unused", train={"epochs": 1, "iters_per_epoch": 2, "val_every": 1},
                        data={"val_fraction": 0.5, "workers": 1})
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    marker = f"GLAM3D_TEST_RUN={uuid.uuid4().hex}"
    env = _env(mods)
    env[marker.split("=")[0]] = marker.split("=")[1]
    out = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "glam3d.commands.train",
                          str(cfg_path), "--no-progress", "--device", "cpu", "--out", str(out)],
                         env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    most, deadline = 0, time.time() + 300
    while p.poll() is None and time.time() < deadline:  # the marker finds the launcher, ranks and workers
        most = max(most, len(_processes_with(marker)))
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    p.wait()
    log.close()
    stdout = (tmp_path / "torchrun.log").read_text()
    assert p.returncode == 0, stdout[-4000:]
    assert most >= 5, most  # torchrun + 2 ranks + a DataLoader worker each
    assert "run folder:" in stdout  # printed just before the process ended: flushed
    assert "done: 2 iterations" in (out / "train.log").read_text()  # the log file handler was flushed too
    time.sleep(0.5)
    assert _processes_with(marker) == []  # no DataLoader worker outlived its rank


def test_end_process_returns_without_a_group_and_exits_flushed_after_one(tmp_path):
    from glam3d.engine import distributed

    assert distributed.end_process(3) == 3  # in-process (tests, single runs): nothing ends
    script = ("import sys, logging\n"
              "from glam3d.engine import distributed as d\n"
              "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
              "sys.stdout.write('buffered, no newline')\n"
              "logging.info('logged last')\n"
              "d._ENDED_GROUP = True  # as cleanup() leaves it after destroying a group it made\n"
              "d.end_process(7)\n"
              "print('not reached')\n")
    log = tmp_path / "x.log"
    p = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=120,
                       env=_env(tmp_path))
    assert p.returncode == 7, p.stderr
    assert p.stdout == "buffered, no newline"
    assert "logged last" in log.read_text()


def test_run_and_end_after_an_uncaught_exception_exits_1_with_its_traceback(tmp_path):
    script = ("import argparse, sys\n"
              "from glam3d.engine import distributed as d\n"
              "from glam3d.cli import run_and_end\n"
              "def boom(args):\n"
              "    d._ENDED_GROUP = True  # a failed distributed run: train() destroyed its group on the way out\n"
              "    raise RuntimeError('rank failed')\n"
              "run_and_end(boom, argparse.Namespace())\n"
              "print('not reached')\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=_env(tmp_path))
    assert p.returncode == 1, p.stderr
    assert "RuntimeError: rank failed" in p.stderr and "Traceback" in p.stderr
    assert "not reached" not in p.stdout
    # without a distributed job the exception propagates as usual (and Python exits 1 on its own)
    q = subprocess.run([sys.executable, "-c", script.replace("    d._ENDED_GROUP = True", "    pass")],
                       capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert q.returncode == 1 and "RuntimeError: rank failed" in q.stderr

"""Checkpoints at inference: mapped rather than read (``load_checkpoint(mmap=True)``), and ``glam3d predict``
holds neither the loaded weights nor the optimiser state while it infers (a Synapse-size checkpoint carries
0.6 GB of each). Checkpoints are never written or loaded with NaN/inf weights, a network too large for the
machine is refused before it is built, and a full disk during ``torch.save`` is one line naming the file."""
import errno
import gc
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers as H

from glam3d.cli import main
from glam3d.inference import sliding_window as inference
from glam3d.engine.checkpoint import (TRAINING_STATE, NonFiniteCheckpoint, checkpoint_metadata, find_non_finite,
                                      load_checkpoint, load_model_weights, model_from_checkpoint, save_checkpoint)
from glam3d.errors import DiskFull, UserError

def _with_optimizer_state(path, numel=1000):
    state = load_checkpoint(path)
    state["optimizer"] = {"state": {0: {"momentum_buffer": torch.ones(numel)}}, "param_groups": []}
    save_checkpoint(path, state)
    return path


def test_checkpoint_metadata_drops_only_the_training_state(tmp_path):
    state = load_checkpoint(_with_optimizer_state(H.predict_checkpoint(tmp_path / "ck.pt")))
    meta = checkpoint_metadata(state)
    assert "model" in state and "optimizer" in state
    assert not set(TRAINING_STATE) & set(meta)
    assert {k: v for k, v in state.items() if k not in TRAINING_STATE} == meta
    assert meta["plan"] and meta["model_spec"] and meta["labels"]


def test_predict_holds_the_weights_once_and_no_optimiser_state(tmp_path, monkeypatch):
    """While the sliding window runs, the network's parameters *are* the mapped checkpoint's weights (one copy,
    pages of the file: ``assign``), and every other tensor the load produced (the optimiser state) is gone."""
    import glam3d.engine.checkpoint as ck_mod

    H.tiny_case(tmp_path / "raw", "0001")
    ck = _with_optimizer_state(H.predict_checkpoint(tmp_path / "ck.pt"))
    loaded, weight_ptrs = [], set()
    real_load = ck_mod.load_checkpoint

    def load_spy(*args, **kwargs):
        state = real_load(*args, **kwargs)
        loaded.append(weakref.ref(state["optimizer"]["state"][0]["momentum_buffer"]))
        weight_ptrs.update(t.data_ptr() for t in state["model"].values() if t.is_floating_point())
        return state

    seen = []
    real_predict = inference.predict_volume

    def predict_spy(model, *args, **kwargs):
        gc.collect()
        seen.append((sum(r() is not None for r in loaded),
                     {p.data_ptr() for p in model.parameters()} <= weight_ptrs))
        return real_predict(model, *args, **kwargs)

    monkeypatch.setattr(ck_mod, "load_checkpoint", load_spy)
    monkeypatch.setattr(inference, "predict_volume", predict_spy)
    rc = main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "raw" / "img"),
               "--output", str(tmp_path / "out"), "--quiet"])
    assert rc == 0 and (tmp_path / "out" / "img0001.nii.gz").is_file()
    assert len(weight_ptrs) > 10 and seen == [(0, True)]


def test_assigned_weights_compute_what_copied_weights_do(tmp_path):
    """``model_from_checkpoint(assign=True)`` on a mapped checkpoint: parameters share the mapped tensors'
    memory, the network's dtypes are kept (a float64 tensor in the checkpoint is converted, as a copy load
    would), and the outputs equal a plainly loaded network's."""
    from glam3d.engine.checkpoint import model_from_checkpoint
    ck = H.predict_checkpoint(tmp_path / "ck.pt")
    state = load_checkpoint(ck)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = state["model"][name].double()
    save_checkpoint(tmp_path / "ck64.pt", state)
    copied = model_from_checkpoint(load_checkpoint(tmp_path / "ck64.pt")).eval()
    mapped = load_checkpoint(tmp_path / "ck64.pt", mmap=True)
    ptrs = {k: v.data_ptr() for k, v in mapped["model"].items()}
    assigned = model_from_checkpoint(mapped, assign=True).eval()
    own = assigned.state_dict()
    assert own[name].dtype == torch.float32 and own[name].data_ptr() != ptrs[name]
    shared = [k for k, v in own.items() if k != name and v.data_ptr() == ptrs.get(k)]
    assert len(shared) == len([k for k in own if k != name]) > 10
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        a, b = copied(x), assigned(x)
    a, b = (a[0], b[0]) if isinstance(a, (list, tuple)) else (a, b)
    assert torch.equal(a, b)


def test_mmap_load_reads_only_what_is_touched(tmp_path):
    """The optimiser buffer (128 MB) is never read into memory with ``mmap=True``; a plain load reads it."""
    ck = _with_optimizer_state(H.predict_checkpoint(tmp_path / "ck.pt"), numel=32 * 2 ** 20)
    code = textwrap.dedent(f"""
        import json, torch
        from glam3d.engine.checkpoint import checkpoint_metadata, load_checkpoint
        def hwm():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
        out = {{}}
        h0 = hwm()
        s = load_checkpoint({str(ck)!r}, mmap=True)
        w = sum(float(v.double().sum()) for v in s["model"].values())  # the weights are read
        meta = checkpoint_metadata(s)
        del s
        out["mmap"] = hwm() - h0
        h1 = hwm()
        s = load_checkpoint({str(ck)!r})
        out["plain"] = hwm() - h1
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=H.env(None))
    assert res.returncode == 0, res.stderr[-2000:]
    grew = json.loads(res.stdout.strip().splitlines()[-1])
    assert grew["plain"] > 120e6, grew  # the control: a plain load does read the 128 MB buffer
    assert grew["mmap"] < 40e6, grew


def test_mmap_falls_back_for_legacy_files(tmp_path):
    state = load_checkpoint(H.predict_checkpoint(tmp_path / "ck.pt"))
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    again = load_checkpoint(legacy, mmap=True)
    assert again.keys() == state.keys()
    for k, v in state["model"].items():
        assert np.array_equal(again["model"][k].numpy(), v.numpy()), k


# ------------------------------------------------------------------------------------------------ non-finite weights
def _digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _litter(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


def test_find_non_finite_names_the_tensors():
    tree = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([7], dtype=torch.int64),
            "d": {"state": {0: {"exp_avg": torch.tensor([float("-inf")], dtype=torch.bfloat16)}}},
            "e": [torch.zeros(2, dtype=torch.float16), torch.tensor([complex(1, float("inf"))])],
            "f": torch.empty(0), "g": torch.empty(3, device="meta")}
    assert find_non_finite(tree) == ["b", "d.state.0.exp_avg", "e.1"]
    assert find_non_finite({"w": torch.randn(4, 4)}) == [] and find_non_finite(None) == []
    shared = torch.tensor([float("inf")])
    assert find_non_finite({"x": [shared, shared]}) == ["x.0", "x.1"]
    # finite values whose sum overflows (float32 near 3.4e38, float16 near 65504) are finite
    huge = {"f32": torch.full((10,), 3e38), "f16": torch.full((10,), 6e4, dtype=torch.float16),
            "mix": torch.tensor([3e38, 3e38, float("nan")])}
    assert find_non_finite(huge) == ["mix"]


@pytest.mark.parametrize("entry", ["model", "optimizer"])
@pytest.mark.parametrize("keep_previous", [False, True])
def test_save_refuses_non_finite_state_and_keeps_the_previous_file(tmp_path, entry, keep_previous):
    ck = H.predict_checkpoint(tmp_path / "last.pt")
    before = _digest(ck)
    state = load_checkpoint(ck)
    state["optimizer"] = {"state": {0: {"momentum_buffer": torch.ones(5)}}, "param_groups": []}
    if entry == "model":
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name] = state["model"][name].clone()
        state["model"][name].view(-1)[0] = float("nan")
        expected = f"model.{name}"
    else:
        state["optimizer"]["state"][0]["momentum_buffer"][2] = float("inf")
        expected = "optimizer.state.0.momentum_buffer"
    with pytest.raises(NonFiniteCheckpoint) as e:
        save_checkpoint(ck, state, keep_previous=keep_previous)
    msg = str(e.value)
    assert msg.startswith(f"{ck}: refused to write a checkpoint with NaN/inf values (1 tensor, e.g. {expected})")
    assert "\n" not in msg and isinstance(e.value, UserError)
    assert _digest(ck) == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _nan_checkpoint(tmp_path) -> Path:
    """A checkpoint with NaN weights written around save_checkpoint (as another tool, or an older glam3d, would)."""
    ck = H.predict_checkpoint(tmp_path / "ck.pt")
    state = load_checkpoint(ck)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 4)
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    return bad


@pytest.mark.parametrize("mmap", [False, True])
def test_model_from_checkpoint_refuses_non_finite_weights(tmp_path, mmap):
    bad = _nan_checkpoint(tmp_path)
    state = load_checkpoint(bad, mmap=mmap)  # loading the file itself is fine (resume may fall back from it)
    with pytest.raises(NonFiniteCheckpoint, match=rf"^{bad}: the checkpoint's weights hold NaN/inf \(1 tensor, "
                                                  r"e\.g\. .*\): it comes from a diverged training run; refused$"):
        model_from_checkpoint(state, bad, assign=mmap)
    from glam3d.models import build_model
    with pytest.raises(NonFiniteCheckpoint, match=str(bad)):  # the trainer's resume / init_checkpoint path
        load_model_weights(build_model(H.TINY_NET["name"], **H.TINY_NET["kwargs"]), state["model"], path=bad)


def test_model_from_checkpoint_sizes_the_network_before_building(tmp_path, monkeypatch):
    from glam3d.models import registry

    state = load_checkpoint(H.predict_checkpoint(tmp_path / "ck.pt"))
    state["model_spec"] = {"name": "nnformer_tiny", "kwargs": {"embed_dim": 65536}}
    built = []
    real = registry.build_model
    monkeypatch.setattr(registry, "build_model",
                        lambda *a, **k: (built.append(torch.get_default_device().type), real(*a, **k))[1])
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"^big\.pt: the network recorded in the checkpoint \(nnformer_tiny, "
                                        r"17\.4 T parameters\) needs [\d.]+ TiB for its weights alone, but this "
                                        r"machine has [\d.]+ \w+ of memory$"):
        model_from_checkpoint(state, "big.pt")
    assert time.perf_counter() - t0 < 5 and built == ["meta"]


def test_pickle_memo_bomb_refused(tmp_path):
    state = load_checkpoint(H.predict_checkpoint(tmp_path / "ck.pt"))
    bomb = ["lol"] * 10
    for _ in range(8):
        bomb = [bomb] * 10  # 10^9 strings through shared references: a few KB in the pickle
    state["labels"] = bomb
    path = tmp_path / "bomb.pt"
    torch.save(state, path)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"expands to more than 1,000,000 values through shared references"):
        load_checkpoint(path)
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------------------------------ full disk
def _tmpfs(path: Path, size: str):
    """Mount a tmpfs of ``size`` at ``path`` (root only); ``None`` where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0:
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return path if r.returncode == 0 else None


def _check_disk_full(err: DiskFull, ck: Path, before: str):
    msg = str(err)
    assert msg.startswith(f"{ck}: cannot write the file: the disk is full (") and "\n" not in msg
    assert "the previous file is untouched" in msg
    assert _digest(ck) == before and not _litter(ck.parent)
    assert load_checkpoint(ck)["model"]


@pytest.mark.parametrize("keep_previous", [False, True])
def test_disk_full_for_real(tmp_path, keep_previous):
    """A 256 KiB tmpfs: the small checkpoint fits, the next (400 KB of weights) does not. PyTorch's zip writer
    raises its RuntimeError ("unexpected pos ..."); the user sees one line naming the file."""
    folder = _tmpfs(tmp_path / "small", "256k")
    if folder is None:
        pytest.skip("mounting a tmpfs needs root")
    try:
        ck = folder / "last.pt"
        save_checkpoint(ck, {"model": {"w": torch.ones(1000)}})
        before = _digest(ck)
        with pytest.raises(DiskFull) as e:
            save_checkpoint(ck, {"model": {"w": torch.ones(100_000)}}, keep_previous=keep_previous)
        _check_disk_full(e.value, ck, before)
        assert re.search(r"\(\d[\d.]* KiB free there, about 390\.6 KiB needed\)", str(e.value)), str(e.value)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# the message PyTorch's zip writer gives for a short write (torch 2.x, inline_container.cc)
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def test_disk_full_simulated(tmp_path, monkeypatch):
    """The same contract where no tmpfs can be mounted: torch.save writes part of the file, then raises the
    writer's RuntimeError, and the filesystem reports less free space than the checkpoint needs."""
    import shutil
    from collections import namedtuple

    ck = H.predict_checkpoint(tmp_path / "last.pt")
    before = _digest(ck)
    state = load_checkpoint(ck)

    def short_write(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError(TORCH_SHORT_WRITE)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 4096, 4096))
    with pytest.raises(DiskFull) as e:
        save_checkpoint(ck, state, keep_previous=True)
    _check_disk_full(e.value, ck, before)
    assert "(4.0 KiB free there, about" in str(e.value)


def test_other_write_failures_stay_distinct(tmp_path, monkeypatch):
    """A writer failure with room to spare is not called a full disk; an unrelated RuntimeError passes through."""
    ck = H.predict_checkpoint(tmp_path / "last.pt")
    before = _digest(ck)
    state = load_checkpoint(ck)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(TORCH_SHORT_WRITE)))
    with pytest.raises(OSError, match=r"PyTorch could not write the file \(\[enforce fail") as e:
        save_checkpoint(ck, state)
    assert not isinstance(e.value, DiskFull) and e.value.filename == str(ck)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        save_checkpoint(ck, state)
    assert _digest(ck) == before and not _litter(tmp_path)


def test_enospc_from_any_atomic_write(tmp_path, monkeypatch):
    """ENOSPC / EDQUOT raised as OSError (fsync of the temporary file here) name the target, not the temporary."""
    from glam3d.utils import io

    target = tmp_path / "split.json"
    target.write_text('{"old": 1}\n')

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", fsync)
    with pytest.raises(DiskFull, match=rf"^{target}: cannot write the file: the disk is full"):
        io.atomic_write_json(target, {"new": 2})
    assert target.read_text() == '{"old": 1}\n' and not _litter(tmp_path)

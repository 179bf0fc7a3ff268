"""Checkpoints at inference: mapped rather than read (``load_checkpoint(mmap=True)``), and ``glam3d predict``
holds neither the loaded weights nor the optimiser state while it infers (a Synapse-size checkpoint carries
0.6 GB of each)."""
import gc
import json
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import torch

import helpers as H

from glam3d.cli import main
from glam3d.inference import sliding_window as inference
from glam3d.engine.checkpoint import TRAINING_STATE, checkpoint_metadata, load_checkpoint, save_checkpoint

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

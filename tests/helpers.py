"""Shared helpers for the reliability tests (test_bad_inputs.py, test_interrupt.py, test_hostile.py).

Tiny inputs only: BTCV-layout cases of 12 x 10 x 6 voxels, a 400 k-parameter nnFormer for predict, the
BN-free ``TinyNet`` of ``test_train.py`` for training.
"""
from __future__ import annotations

import contextlib
import json
import locale
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import tiny_training as T

ROOT = Path(__file__).resolve().parents[1]

# test_train.py's helpers (tiny net, synthetic preprocessed dataset, tiny config), loaded under a private name

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (12, 10, 6)
# a network small enough to run a whole scan in well under a second on one CPU thread
TINY_NET = {"name": "nnformer_tiny",
            "kwargs": {"num_classes": 9, "crop_size": (16, 32, 32), "embed_dim": 12, "depths": (1, 1, 1, 1),
                       "num_heads": (1, 1, 2, 2), "window_size": (2, 2, 2, 1), "deep_supervision": False,
                       "drop_path_rate": 0.0}}


@contextlib.contextmanager
def keep_locale():
    """Restore the process locale afterwards: SimpleITK's DICOM writer (GDCM) leaves the C locale behind, and
    every later text file the test process opens without an encoding would then be read as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(folder, vol, uid: str = "1.2.826.0.1.3680043.2.1125.1.1") -> Path:
    """Write the SimpleITK volume ``vol`` (its spacing, origin, identity direction) as a CT DICOM series, one file a
    slice, into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import SimpleITK as sitk

    sx, sy, sz = vol.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        for tag, val in (("0010|0010", "Phantom"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                         ("0008|0060", "CT"), ("0020|0013", str(k + 1)),
                         ("0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, k))))),
                         ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", f"{sy:g}\\{sx:g}"),
                         ("0018|0050", f"{sz:g}")):
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        with keep_locale():
            writer.Execute(sl)
    return folder


def save_nii(arr, path, affine=AFFINE):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(arr, affine).to_filename(str(path))
    return path


def tiny_case(root, cid: str, shape=SHAPE, affine=AFFINE, labels=(1, 2, 6, 8)):
    """A tiny valid BTCV case (``img/img<cid>.nii.gz`` + ``label/label<cid>.nii.gz``): a soft-tissue body in air
    with a few labelled blocks. Returns ``(image path, label path)``."""
    root = Path(root)
    img = np.full(shape, -1000, np.int16)
    img[2:-2, 2:-2, :] = 40
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(labels):
        lab[3 + i % 3: 5 + i % 3, 3 + i // 3: 5 + i // 3, 1:-1] = v
    return (save_nii(img, root / "img" / f"img{cid}.nii.gz", affine),
            save_nii(lab, root / "label" / f"label{cid}.nii.gz", affine))


def scan(shape=(24, 20, 12), seed=0, affine=AFFINE):
    """A small CT-like scan (body, organs of different HU) as a float32 array."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000.0, np.float32)
    img[2:-2, 2:-2, :] = 40.0
    img[5:10, 5:9, 2:8] = 150.0
    img[13:19, 10:15, 3:9] = 220.0
    img += rng.normal(0, 5, shape).astype(np.float32)
    return img


def write_scans(folder, n=3, shape=(24, 20, 12)):
    folder = Path(folder)
    return [save_nii(scan(shape, seed=i), folder / f"s{i}.nii.gz") for i in range(n)]


def predict_checkpoint(path, spacing=(3.0, 2.0, 2.0), seed=0):
    """A glam3d checkpoint of a freshly built tiny nnFormer (seeded weights) with a Synapse-style plan, as
    ``glam3d train`` would write it (model_spec, weights, plan, labels, config)."""
    import torch

    from glam3d.engine.checkpoint import save_checkpoint
    from glam3d.models import build_model
    from preprocessing.datasets import synapse_labels
    from preprocessing.pipeline import make_plan

    torch.manual_seed(seed)
    model = build_model(TINY_NET["name"], **TINY_NET["kwargs"])
    labels, values = synapse_labels(False)
    plan = make_plan(list(spacing), {"scheme": "transunet", "window": [-125.0, 275.0]}, values)
    state = {"model_spec": dict(model.glam3d_spec), "model": model.state_dict(), "plan": plan, "labels": labels,
             "config": {"val": {"roi_size": [16, 32, 32], "overlap": 0.25, "sw_batch_size": 2}}, "epoch": 1,
             "iteration": 1}
    save_checkpoint(path, state)
    return Path(path)


def train_setup(tmp, **train):
    """(config path, data root, mods folder) for a TinyNet run on the synthetic dataset of test_train.py."""
    import yaml

    tmp = Path(tmp)
    mods = T.write_tinynet(tmp / "mods")
    data = T.make_dataset(tmp / "data", n=4, n_test=0, shape=(16, 20, 20))
    cfg = T.tiny_config(data, tmp / "unused", train={"epochs": 2, "iters_per_epoch": 2, "val_every": 0, **train})
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path, data, mods


def env(mods=None, **extra) -> dict:
    e = dict(os.environ)
    paths = ([str(mods)] if mods else []) + [str(ROOT), e.get("PYTHONPATH", "")]
    e["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    e["OMP_NUM_THREADS"] = "1"
    e["MKL_NUM_THREADS"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


#: environment variables that choose or tune the CPU allocator (glam3d.alloc, glibc, PyTorch, a preloaded library)
ALLOCATOR_ENV = ("GLAM3D_ALLOC", "MALLOC_", "THP_MEM", "LD_PRELOAD")


def allocator_child(code: str, **env) -> dict:
    """Run ``code`` (dedented) in a fresh interpreter whose allocator settings are only ``env`` (none of this
    process's); returns the JSON its last stdout line prints, plus ``"stderr"``. The CPU allocator is
    process-wide, so its tests run in children."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(ALLOCATOR_ENV)}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return {"stderr": out.stderr, **json.loads(out.stdout.strip().splitlines()[-1])}


def python(*args, mods=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], env=env(mods), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(*args, mods=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], env=env(mods), cwd=str(ROOT), capture_output=True,
                          text=True, timeout=timeout)


def wait_for(pred, proc, timeout=120, what="condition"):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {err[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def temp_litter(folder) -> list:
    """Temporary files (``*.tmp*``) anywhere under ``folder``."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name) if folder.exists() else []


def load_json(path):
    return json.loads(Path(path).read_text())


# a launcher that runs ``python -m MODULE ARGS`` but parks the process at a known point, so a test can SIGKILL it
# there: on the RELY_HANG_AT-th call of RELY_HANG_TARGET ("module:function") it writes a few bytes to the
# temporary file being written (as a real kill mid-write would leave), creates RELY_MARKER and sleeps
HANG_SHIM = r'''
import importlib, os, runpy, sys, time

mod_name, attr = os.environ["RELY_HANG_TARGET"].split(":")
mod = importlib.import_module(mod_name)
orig = getattr(mod, attr)
at = int(os.environ["RELY_HANG_AT"])
calls = [0]

def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, (str, os.PathLike)) and ".tmp" in os.fspath(a):
                with open(a, "wb") as fh:
                    fh.write(b"half a file")
        open(os.environ["RELY_MARKER"], "w").close()
        while True:
            time.sleep(1)
    return orig(*args, **kwargs)

setattr(mod, attr, wrapper)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def start_hanging(tmp, module: str, argv, target: str, at: int, mods=None):
    """Start ``python -m module argv`` that parks at the ``at``-th call of ``target``; returns (proc, marker)."""
    tmp = Path(tmp)
    shim = tmp / "hang_shim.py"
    shim.write_text(HANG_SHIM)
    marker = tmp / "parked"
    e = env(mods, RELY_HANG_TARGET=target, RELY_HANG_AT=at, RELY_MARKER=marker)
    proc = subprocess.Popen([sys.executable, str(shim), module, *map(str, argv)], env=e, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def kill_when_parked(proc, marker, timeout=180):
    import signal

    wait_for(marker.exists, proc, timeout, what=f"the parking point ({marker})")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

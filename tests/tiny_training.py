"""A tiny training set-up shared by the training tests: a BN-free conv net written to a temporary module
(``"glam3d_tinynet:TinyNet"``), a synthetic preprocessed dataset (``dataset.json`` + ``cases/<id>.npz``), a tiny
config and the ``tiny`` fixture."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

TINYNET_SRC = '''
import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """Two 3x3x3 convs + 1x1x1 head (no batch-norm, no dropout); deep supervision adds a half-resolution head."""

    def __init__(self, num_classes=3, in_channels=1, width=8, deep_supervision=False):
        super().__init__()
        self.spatial_dims, self.in_channels, self.num_classes = 3, in_channels, num_classes
        self.default_crop = (16, 16, 16)
        self.deep_supervision = deep_supervision
        self.c1 = nn.Conv3d(in_channels, width, 3, padding=1)
        self.c2 = nn.Conv3d(width, width, 3, padding=1)
        self.head = nn.Conv3d(width, num_classes, 1)
        if deep_supervision:
            self.head2 = nn.Conv3d(width, num_classes, 1)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        out = self.head(h)
        if self.training and self.deep_supervision:
            return [out, self.head2(nn.functional.avg_pool3d(h, 2))]
        return out
'''


def write_tinynet(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "glam3d_tinynet.py").write_text(TINYNET_SRC)
    return folder


def make_dataset(root, n: int = 5, n_test: int = 2, shape=(20, 24, 24), seed: int = 0) -> Path:
    """Cubes (label 1) and boxes (label 2) in noise; ``n`` training + ``n_test`` test cases."""
    root = Path(root)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n + n_test):
        lab = np.zeros(shape, np.uint8)
        c = rng.integers(6, 12, 3)
        lab[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = 1
        c = rng.integers(8, 14, 3)
        lab[c[0] - 2:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 2
        img = (lab.astype(np.float32) + rng.normal(0, 0.3, shape)).astype(np.float32)[None]
        cid = f"case{i:02d}"
        np.savez_compressed(root / "cases" / f"{cid}.npz", image=img, label=lab)
        entries.append({"id": cid, "image": f"cases/{cid}.npz", "label": f"cases/{cid}.npz"})
    manifest = {"name": "toy", "description": "test", "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "cube", "2": "box"}, "numTraining": n, "numTest": n_test,
                "training": entries[:n], "test": entries[n:],
                "plan": {"orientation": "RAS", "target_spacing": [1.0, 1.0, 1.0], "intensity": {"scheme": "none"},
                         "label_values": {"1": 1, "2": 2}, "crop_to_body": False}}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def tiny_config(data_root, out, **sections) -> dict:
    cfg = {
        "name": "tiny",
        "output": str(out),
        "model": {"name": "glam3d_tinynet:TinyNet", "overrides": {}},
        "data": {"root": str(data_root), "roi_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.25,
                 "pos": 1.0, "neg": 1.0},
        "optim": {"name": "adamw", "lr": 1e-2, "schedule": "constant", "weight_decay": 0.0, "grad_clip": 12.0},
        "train": {"epochs": 3, "iters_per_epoch": 4, "val_every": 1, "amp": "none", "seed": 0,
                  "deterministic": True, "progress": False},
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict):
            cfg.setdefault(sec, {}).update(vals)
        else:
            cfg[sec] = vals
    return cfg


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """(data_root, tmp_path) with the tiny net importable."""
    write_tinynet(tmp_path / "mods")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    sys.modules.pop("glam3d_tinynet", None)
    return make_dataset(tmp_path / "data"), tmp_path

"""Training engine: optimisation, run folder, data pipeline determinism, losses/schedules, bad inputs.

Everything runs in-process on a tiny BN-free conv net (written to a temp module, referenced as
``"glam3d_tinynet:TinyNet"``) and a synthetic dataset folder in the ``dataset.json`` + ``cases/<id>.npz`` layout.
The shared set-up is ``tiny_training.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from glam3d.config import config_from_dict
from glam3d.errors import UserError

from tiny_training import TINYNET_SRC, make_dataset, tiny_config, write_tinynet  # noqa: F401


def _train(cfg, **kw):
    from glam3d.engine.train import train

    return train(config_from_dict(cfg), console=False, **kw)


# ----------------------------------------------------------------------------------------------------------------
def test_few_steps_reduce_loss_and_write_run_folder(tiny):
    from glam3d.engine.checkpoint import load_checkpoint
    from glam3d.engine.logging import read_log_csv

    data, tmp = tiny
    out = tmp / "run"
    summary = _train(tiny_config(data, out, train={"epochs": 4}))
    rows = read_log_csv(out / "log.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] * 0.9
    for name in ("config.yaml", "log.csv", "train.log", "curves.png", "split.json", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    assert summary["iterations"] == 16 and summary["best_epoch"] in (1, 2, 3, 4)
    assert 0.0 <= summary["best_mean_dice"] <= 1.0
    assert set(summary["last_val"]["dice"]) == {"cube", "box"}
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 4 and state["iteration"] == 16
    assert state["labels"]["1"] == "cube" and state["plan"]["target_spacing"] == [1.0, 1.0, 1.0]
    assert state["model_spec"]["name"] == "glam3d_tinynet:TinyNet"
    assert state["model_spec"]["kwargs"]["num_classes"] == 3
    assert state["config"]["optim"]["lr"] == 1e-2
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 4
    assert not set(split["train"] + split["val"]) & set(split["test_not_used"])  # test cases never used
    assert "val_dice_cube" in (out / "log.csv").read_text().splitlines()[0]


def test_deep_supervision_and_sgd_poly(tiny):
    data, tmp = tiny
    cfg = tiny_config(data, tmp / "ds", model={"name": "glam3d_tinynet:TinyNet",
                                                "overrides": {"deep_supervision": True}},
                      optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "poly", "step_per": "epoch"},
                      train={"epochs": 2, "val_every": 2, "deep_supervision": [0.6, 0.4]})
    summary = _train(cfg)
    assert summary["iterations"] == 8 and math.isfinite(summary["final_train_loss"])


def test_deep_supervision_loss_weights():
    from glam3d.engine.losses import DeepSupervisionLoss

    calls = []

    def base(out, target):
        calls.append((tuple(out.shape), tuple(target.shape), int(target.max())))
        return out.mean() * 0 + len(calls)

    loss = DeepSupervisionLoss(base, [0.5, 0.25])
    target = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    target[:, :, 2:6, 2:6, 2:6] = 2
    outs = [torch.zeros(2, 3, 8, 8, 8), torch.zeros(2, 3, 4, 4, 4), torch.zeros(2, 3, 2, 2, 2)]
    value = loss(outs, target)
    assert value.item() == pytest.approx(0.5 * 1 + 0.25 * 2)  # third output has no weight: ignored
    assert calls[1][1] == (2, 1, 4, 4, 4) and calls[1][2] == 2  # nearest-downsampled target keeps label values


def test_lr_schedules():
    from glam3d.config import OptimConfig
    from glam3d.engine.optim import lr_factor

    poly = OptimConfig(schedule="poly", poly_power=0.9, step_per="epoch")
    assert lr_factor(poly, 0, 10, 5) == 1.0
    assert lr_factor(poly, 9, 10, 5) == 1.0  # constant within epoch 0 (nnFormer)
    assert lr_factor(poly, 10, 10, 5) == pytest.approx((1 - 1 / 5) ** 0.9)
    cos = OptimConfig(name="adamw", lr=1e-3, schedule="warmup_cosine", warmup_epochs=1, warmup_start=0.1,
                      min_lr=1e-5, step_per="iter")
    assert lr_factor(cos, 0, 10, 5) == pytest.approx(0.1)
    assert lr_factor(cos, 5, 10, 5) == pytest.approx(0.55)
    assert lr_factor(cos, 10, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cos, 50, 10, 5) == pytest.approx(0.01)  # min_lr / lr


def test_patch_draws_are_seeded_and_split_over_ranks(tiny):
    from glam3d.config import DataConfig
    from glam3d.data import datasets as D
    from glam3d.data.transforms import train_transforms

    data, _ = tiny
    manifest = D.read_manifest(data)
    cases = D.CaseCache(D.case_entries(data, manifest, D.case_ids(manifest)))
    dcfg = DataConfig(root=str(data), roi_size=[8, 12, 12], num_samples=2)
    dcfg.augment.flip_prob = 0.5
    dcfg.augment.noise_prob = 0.5

    def ds(rank, world, batch):
        return D.PatchDataset(cases, train_transforms(dcfg), seed=3, batch_size=batch, iters_per_epoch=2,
                              num_samples=2, rank=rank, world_size=world)

    one = ds(0, 1, 4)
    a, b = one[5], ds(0, 1, 4)[5]
    assert a["image"].shape == (2, 1, 8, 12, 12) and a["label"].dtype == torch.uint8
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(one[5]["image"], one[5 + len(one)]["image"])  # next epoch differs
    # world 2 x batch 2: rank r's k-th item of step t is global draw t*4 + r*2 + j
    r0, r1 = ds(0, 2, 2), ds(1, 2, 2)
    for step in range(2):
        glob = [one[step * 4 + j]["image"] for j in range(4)]
        mine = [r0[step * 2 + j]["image"] for j in range(2)] + [r1[step * 2 + j]["image"] for j in range(2)]
        assert all(torch.equal(g, m) for g, m in zip(glob, mine))


def test_split_is_seeded_and_respects_val_cases():
    from glam3d.data.datasets import make_split

    ids = [f"{i:04d}" for i in range(18)]
    s1, s2 = make_split(ids, 0.2, None, seed=1), make_split(ids, 0.2, None, seed=1)
    assert s1 == s2 and len(s1["val"]) == 4 and not set(s1["val"]) & set(s1["train"])
    assert make_split(ids, 0.2, None, seed=2)["val"] != s1["val"]
    assert make_split(ids, 0.2, ["0003"], seed=1)["val"] == ["0003"]
    with pytest.raises(UserError, match="data.val_cases"):
        make_split(ids, 0.2, ["9999"], seed=1)


# ---- bad inputs -----------------------------------------------------------------------------------------------
def test_dataset_without_manifest(tiny):
    data, tmp = tiny
    empty = tmp / "empty"
    empty.mkdir()
    out = tmp / "run_nomanifest"
    with pytest.raises(UserError, match="no dataset.json"):
        _train(tiny_config(empty, out))
    assert not out.exists()  # nothing created


def test_refuses_existing_run_and_empty_resume(tiny):
    data, tmp = tiny
    out = tmp / "run"
    with pytest.raises(UserError, match="nothing to resume"):
        _train(tiny_config(data, out), resume=True)
    assert not out.exists()
    _train(tiny_config(data, out, train={"epochs": 1}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a training run.*--resume.*--overwrite"):
        _train(tiny_config(data, out, train={"epochs": 1}))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after  # nothing overwritten
    summary = _train(tiny_config(data, out, train={"epochs": 1, "seed": 5}), overwrite=True)
    assert summary["iterations"] == 4


def test_resume_with_another_architecture(tiny):
    data, tmp = tiny
    out = tmp / "run"
    _train(tiny_config(data, out, train={"epochs": 1}))
    wider = tiny_config(data, out, model={"name": "glam3d_tinynet:TinyNet", "overrides": {"width": 4}},
                        train={"epochs": 2})
    with pytest.raises(UserError, match="do not fit the network"):
        _train(wider, resume=True)
    init = tiny_config(data, tmp / "run2", model={"name": "glam3d_tinynet:TinyNet", "overrides": {"width": 4},
                                                  "init_checkpoint": str(out / "checkpoints" / "last.pt")})
    with pytest.raises(UserError, match="shape mismatch"):
        _train(init)


def test_init_checkpoint_starts_from_its_weights(tiny, monkeypatch):
    """``model.init_checkpoint``: the new run's network starts from the checkpoint's weights (read from the
    file mapped, its optimiser state untouched) and trains from there in a fresh run folder."""
    import glam3d.engine.train as engine
    from glam3d.engine.checkpoint import load_checkpoint

    data, tmp = tiny
    _train(tiny_config(data, tmp / "run", train={"epochs": 1}))
    ck = tmp / "run" / "checkpoints" / "last.pt"
    start = {}
    real = engine.build_optimizer

    def spy(model, cfg):
        start.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, cfg)

    monkeypatch.setattr(engine, "build_optimizer", spy)
    _train(tiny_config(data, tmp / "run2", model={"init_checkpoint": str(ck)}, train={"epochs": 1}))
    saved = load_checkpoint(ck)["model"]
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    assert load_checkpoint(tmp / "run2" / "checkpoints" / "last.pt")["epoch"] == 1


def test_cli_bad_inputs_one_line(tiny, capsys):
    from glam3d.commands.train import main

    data, tmp = tiny
    cfg = tmp / "c.yaml"
    cfg.write_text(f"data:\n  root: {data}\n  batch_sise: 2\n")
    assert main([str(cfg), "--out", str(tmp / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.batch_sise" in err and "data.batch_size" in err and str(cfg) in err
    cfg.write_text(f"data:\n  root: {tmp / 'nowhere'}\n")
    assert main([str(cfg), "--out", str(tmp / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "dataset folder not found" in err and err.count("\n") == 0
    assert not (tmp / "x").exists()
    if not torch.cuda.is_available():
        cfg.write_text(f"data:\n  root: {data}\n")
        assert main([str(cfg), "--out", str(tmp / "x"), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert main([str(cfg), "--out", str(tmp / "x"), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_registered_glam_nnformer_tiny_one_step(tiny):
    """The real network through the engine (one step + validation), if the registry can build it."""
    from glam3d.models.registry import build_model

    try:
        build_model("glam_nnformer_tiny", num_classes=3)
    except Exception as err:  # networks not available in this checkout
        pytest.skip(f"glam_nnformer_tiny unavailable: {err}")
    data, tmp = tiny
    cfg = tiny_config(data, tmp / "glam", model={"name": "glam_nnformer_tiny", "overrides": {}},
                      data={"roi_size": [16, 32, 32], "batch_size": 1},
                      train={"epochs": 1, "iters_per_epoch": 1, "deep_supervision": [0.57, 0.29, 0.14]},
                      val={"max_cases": 1, "roi_size": [16, 32, 32]})
    summary = _train(cfg)
    assert summary["iterations"] == 1 and math.isfinite(summary["final_train_loss"])
    from glam3d.engine.checkpoint import load_checkpoint, model_from_checkpoint

    state = load_checkpoint(tmp / "glam" / "checkpoints" / "last.pt")
    model = model_from_checkpoint(state)  # predict can rebuild the network from the checkpoint alone
    assert model.num_classes == 3


def test_dataloader_workers_do_not_change_the_weights(tiny):
    data, tmp = tiny
    states = []
    for workers in (0, 2):
        out = tmp / f"w{workers}"
        _train(tiny_config(data, out, data={"workers": workers, "num_samples": 2},
                           train={"epochs": 2, "iters_per_epoch": 2, "val_every": 0}))
        states.append(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_network_and_stale_folder(tiny):
    data, tmp = tiny
    with pytest.raises(UserError, match="model"):
        _train(tiny_config(data, tmp / "r", model={"name": "glam3d_tinynet:NoSuchNet"}))
    # the failed start left config.yaml/split.json but no checkpoint: a new run may reuse the folder
    assert not (tmp / "r" / "checkpoints" / "last.pt").exists()
    assert _train(tiny_config(data, tmp / "r", train={"epochs": 1}))["iterations"] == 4


def test_all_augmentations_keep_shapes_and_labels(tiny):
    from glam3d.config import load_config
    from glam3d.data import datasets as D
    from glam3d.data.transforms import train_transforms

    data, _ = tiny
    dcfg = load_config(Path(__file__).resolve().parents[1] / "glam3d/configs/synapse_glam_nnformer.yaml").data
    dcfg.roi_size = [16, 20, 20]
    for name in ("flip_prob", "affine_prob", "rotate90_prob", "intensity_scale_prob", "intensity_shift_prob",
                 "noise_prob", "gamma_prob"):
        setattr(dcfg.augment, name, 1.0)
    manifest = D.read_manifest(data)
    cases = D.CaseCache(D.case_entries(data, manifest, D.case_ids(manifest)[:1]))
    t = train_transforms(dcfg)
    for seed in range(3):
        t.set_random_state(seed=seed)
        out = t(cases[0])
        assert out["image"].shape == (1, 16, 20, 20) and out["image"].dtype == torch.float32
        assert out["label"].shape == (1, 16, 20, 20) and out["label"].dtype == torch.uint8
        assert set(out["label"].unique().tolist()) <= {0, 1, 2}
        assert type(out["image"]) is torch.Tensor  # no MONAI metadata in batches
    # the cached volume is never modified by the per-draw chain
    assert cases[0]["image"].shape == (1, 20, 24, 24)


def test_bf16_autocast_on_cpu_trains(tiny):
    """The mixed-precision path (bf16 autocast) runs on CPU: finite, decreasing loss, differs from fp32."""
    from glam3d.engine.checkpoint import load_checkpoint
    from glam3d.engine.logging import read_log_csv

    data, tmp = tiny
    _train(tiny_config(data, tmp / "fp32", train={"epochs": 3, "val_every": 3}))
    _train(tiny_config(data, tmp / "bf16", train={"epochs": 3, "val_every": 3, "amp": "bf16"}))
    rows = read_log_csv(tmp / "bf16" / "log.csv")
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "amp bf16" in (tmp / "bf16" / "train.log").read_text(encoding="utf-8")
    w32 = load_checkpoint(tmp / "fp32" / "checkpoints" / "last.pt")["model"]
    w16 = load_checkpoint(tmp / "bf16" / "checkpoints" / "last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in w16.values() if v.is_floating_point())  # master weights fp32
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # autocast really changed the numerics

"""2D GLAM-Swin training through the shared engine: the 2D config schema (``data.dataset`` ade20k | cityscapes |
synthetic), a tiny UperNet run on the synthetic ADE20K set (loss goes down, checkpoints, mIoU validation, exact
resume, ImageNet-checkpoint loading), seeded / sharded 2D draws, and ``glam3d evaluate --task 2d``.

Everything is CPU-sized: a 1.5 M-parameter GLAM-Swin-UperNet (embed 24, depths [1,1,1,1]) on 64x64 crops.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glam3d.config import Data2DConfig, DataConfig, load_config, validate_config
from glam3d.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "glam3d" / "configs"
TWO_D = sorted(list(CONFIGS.glob("ade20k_*.yaml")) + list(CONFIGS.glob("cityscapes_*.yaml")))

TINY_UPERNET = ("model.overrides={num_classes: 4, default_crop: [64, 64], embed_dim: 24, depths: [1, 1, 1, 1], "
                "num_heads: [1, 2, 4, 8], window_size: 4, num_global_tokens: 2, channels: 32, aux_channels: 16, "
                "drop_path_rate: 0.1}")


def tiny_overrides(synth_root, out, **extra):
    over = {
        "model.name": "glam_swin_upernet_tiny", "data.root": str(synth_root), "output": str(out),
        "data.synthetic": "{num_train: 16, num_val: 4, size: [64, 80], num_classes: 4, seed: 0}",
        "data.img_scale": "[80, 64]", "data.batch_size": 2, "train.epochs": 2, "train.iters_per_epoch": 10,
        "train.val_every": 1, "train.deep_supervision": "[1.0, 0.4]", "train.progress": "false",
        "train.device": "cpu", "train.deterministic": "true", "optim.lr": "2e-3", "optim.warmup_epochs": 0.2,
    }
    over.update(extra)
    return [TINY_UPERNET] + [f"{k}={v}" for k, v in over.items()]


def tiny_config(synth_root, out, **extra):
    return load_config(CONFIGS / "ade20k_synthetic_glam_swin_unet_demo.yaml", tiny_overrides(synth_root, out, **extra))


# ------------------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize("path", TWO_D, ids=lambda p: p.name)
def test_every_2d_config_loads_and_builds(path):
    from glam3d.models import build_model

    cfg = load_config(path)
    validate_config(cfg, str(path))
    assert cfg.task == "2d" and isinstance(cfg.data, Data2DConfig) and cfg.loss.name == "ce"
    assert cfg.data.dataset in ("ade20k", "cityscapes", "synthetic")
    city = cfg.data.dataset == "cityscapes"
    if "demo" not in path.name:
        assert cfg.data.crop_size == ([769, 769] if city else [512, 512])
        assert cfg.val.inference == ("slide" if city else "whole")
        assert {"global_tokens", "relative_position_bias_table"} <= set(cfg.optim.no_weight_decay)
        if path.stem not in ("ade20k_recipe", "cityscapes_recipe"):
            assert cfg.model.pretrained and cfg.model.pretrained.endswith(".pth")
    if path.stem.endswith("_recipe"):  # shared bases, no network of their own
        return
    assert (cfg.train.deep_supervision == [1.0, 0.4]) == ("upernet" in cfg.model.name)
    with torch.device("meta"):
        m = build_model(cfg.model.name, **cfg.model.overrides)
    assert m.spatial_dims == 2 and m.num_classes == cfg.model.overrides["num_classes"]


def test_2d_schema_is_strict_and_fills_dataset_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  dataset: cityscapes\n  root: x\n")
    cfg = load_config(p)
    assert cfg.task == "2d" and cfg.data.crop_size == [769, 769] and cfg.data.test_scale is None
    assert cfg.data.img_scale == [2048, 1024] and cfg.loss.name == "ce"
    for text, problem in [
        ("data:\n  dataset: ade20k\n  root: x\n  crop_sise: [64, 64]\n",
         r"unknown config key 'data.crop_sise' \(did you mean data.crop_size"),
        ("data:\n  dataset: ade20k\n  root: x\n  roi_size: [8, 8, 8]\n",  # a 3D key in a 2D section
         r"unknown config key 'data.roi_size'"),
        ("data:\n  dataset: ade2k\n", r"'data.dataset' must be one of .*did you mean ade20k"),
        ("data:\n  root: x\n  crop_size: [8, 8]\n",  # a 2D key in a 3D section
         r"unknown config key 'data.crop_size' \(did you mean data.roi_size"),
    ]:
        p.write_text(text)
        with pytest.raises(UserError, match=problem):
            load_config(p)
    p.write_text("data:\n  dataset: preprocessed\n  root: x\n")
    assert isinstance(load_config(p).data, DataConfig) and load_config(p).task == "3d"
    # overrides are checked against the section the config selects
    p.write_text("data:\n  dataset: synthetic\n  root: x\n")
    cfg = load_config(p, ["data.crop_size=[32,48]", "data.synthetic.num_val=2", "val.inference=slide"])
    assert cfg.data.crop_size == [32, 48] and cfg.data.synthetic.num_val == 2 and cfg.val.inference == "slide"
    with pytest.raises(UserError, match=r"--override 'data.crop_sise=1'.*did you mean data.crop_size"):
        load_config(p, ["data.crop_sise=1"])
    with pytest.raises(UserError, match="'val.inference'"):
        load_config(p, ["val.inference=tiles"])
    for bad, key in (("loss.name=dice_ce", "loss.name"), ("val.roi_size=[8,8,8]", "val.roi_size"),
                     ("data.crop_size=[0,8]", "data.crop_size"), ("data.cat_max_ratio=0", "data.cat_max_ratio")):
        with pytest.raises(UserError, match=f"'{key}'"):
            validate_config(load_config(p, [bad]))


def test_no_weight_decay_keys():
    from glam3d.config import OptimConfig
    from glam3d.engine.optim import build_optimizer
    from glam3d.models import build_model

    m = build_model("glam_swin_upernet_tiny", num_classes=3, embed_dim=24, depths=[1, 1, 1, 1],
                    num_heads=[1, 2, 4, 8], window_size=4, num_global_tokens=2, channels=16, aux_channels=8,
                    default_crop=[32, 32])
    names = {id(p): n for n, p in m.named_parameters()}
    keys = ["norm", "relative_position_bias_table", "global_tokens", "global_pos_embed"]
    for name in ("adamw", "sgd"):
        opt = build_optimizer(m, OptimConfig(name=name, weight_decay=0.01, no_weight_decay=keys))
        free = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert "backbone.stages.0.global_tokens" in free
        assert "backbone.stages.0.blocks.0.attn.relative_position_bias_table" in free
        assert "backbone.stages.0.blocks.0.norm1.weight" in free
        assert "backbone.stages.0.blocks.0.attn.qkv.weight" in decayed
        assert ("backbone.stages.0.blocks.0.attn.qkv.bias" in free) == (name == "adamw")  # adamw: every 1-D
    sgd = build_optimizer(m, OptimConfig(name="sgd", weight_decay=0.01))  # no keys: one group, as before
    assert len(sgd.param_groups) == 1


def test_image_draws_are_seeded_and_sharded():
    from glam3d.engine.tasks import ImageDraws

    class Items(torch.utils.data.Dataset):  # item = its index plus one random draw (the "augmentation")
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"image": torch.tensor([float(i), float(torch.rand(()))]), "label": torch.tensor(i)}

    one = ImageDraws(Items(), seed=3, batch_size=4, iters_per_epoch=3)
    two = [ImageDraws(Items(), seed=3, batch_size=2, iters_per_epoch=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        base = epoch * len(one)
        whole = [one[base + k]["image"] for k in range(len(one))]
        state = torch.get_rng_state()
        split = []
        for step in range(3):
            for r in (0, 1):
                split += [two[r][epoch * len(two[r]) + step * 2 + j]["image"] for j in range(2)]
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
        assert all(torch.equal(a, b) for a, b in zip(whole, split))
        first = [int(x[0]) for x in whole[:7]]
        assert sorted(first) == list(range(7))  # a permutation per epoch
    assert [int(one[k]["image"][0]) for k in range(7)] != [int(one[len(one) + k]["image"][0]) for k in range(7)]


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from glam3d.engine.train import train

    tmp = tmp_path_factory.mktemp("train2d")
    rows = []
    summary = train(tiny_config(tmp / "synth", tmp / "run"), callback=rows.append, console=False)
    return tmp, summary, rows


def test_tiny_synthetic_run_trains_validates_and_checkpoints(tiny_run):
    from glam3d.engine.checkpoint import load_checkpoint

    tmp, summary, rows = tiny_run
    run = Path(summary["run_dir"])
    assert summary["iterations"] == 20 and summary["task"] == "2d"
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # the loss goes down
    assert summary["best_miou"] is not None and 0 < summary["best_miou"] <= 1
    for name in ("last.pt", "best.pt"):
        assert (run / "checkpoints" / name).is_file()
    ck = load_checkpoint(run / "checkpoints" / "best.pt")
    assert ck["metrics"]["best_miou"] == pytest.approx(summary["best_miou"])
    assert ck["labels"] == {"0": "background", "1": "shape1", "2": "shape2", "3": "shape3"}
    assert ck["config"]["data"]["dataset"] == "synthetic" and ck["model_spec"]["name"] == "glam_swin_upernet_tiny"
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert {"val_mIoU", "val_iou_background", "val_iou_shape3", "best_mIoU", "images_per_s"} <= set(header)
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "val mIoU" in log and "IoU: background" in log and "loss ce [1.0, 0.4]" in log
    rep = json.loads((run / "val" / "miou_epoch0002.json").read_text())
    assert rep["mIoU"] == pytest.approx(rows[-1]["val_mIoU"]) and len(rep["per_class"]) == 4


def test_resume_matches_an_uninterrupted_run(tiny_run):
    from glam3d.engine.checkpoint import load_checkpoint
    from glam3d.engine.train import train

    class Stop(Exception):
        pass

    def stop_after_first_epoch(row):
        if row["epoch"] == 1:
            raise Stop

    tmp, summary, _ = tiny_run
    out = tmp / "resumed"
    with pytest.raises(Stop):  # interrupted after epoch 1 (checkpoints/last.pt written)
        train(tiny_config(tmp / "synth", out), callback=stop_after_first_epoch, console=False)
    with pytest.raises(UserError, match="already holds a training run"):
        train(tiny_config(tmp / "synth", out), console=False)
    resumed = train(tiny_config(tmp / "synth", out), resume=True, console=False)
    assert resumed["iterations"] == 20
    a = load_checkpoint(Path(summary["run_dir"]) / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best_miou"] == pytest.approx(summary["best_miou"])


def _fake_official_swin(model) -> dict:
    """An official-layout Swin state dict holding this model's backbone weights + 1 (and a classifier head)."""
    sd = {}
    for k, v in model.backbone.state_dict().items():
        if "global_" in k or ".gmsa." in k or k.endswith(("relative_position_index", "attn_mask")):
            continue
        if k.startswith("stages."):
            sd["layers." + k[len("stages."):]] = v + 1
        elif k.startswith("merges."):
            i, rest = k[len("merges."):].split(".", 1)
            sd[f"layers.{i}.downsample.{rest}"] = v + 1
        elif k.startswith("out_norms.3."):
            sd["norm." + k[len("out_norms.3."):]] = v + 1
        elif k.startswith("patch_embed."):
            sd[k] = v + 1
    sd["head.weight"], sd["head.bias"] = torch.zeros(10, 192), torch.zeros(10)
    return {"model": sd}


def test_pretrained_backbone_is_loaded_and_logged(tiny_run):
    from glam3d.engine.checkpoint import load_checkpoint
    from glam3d.engine.train import train
    from glam3d.models import build_model

    tmp, _, _ = tiny_run
    kw = dict(num_classes=4, default_crop=[64, 64], embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
              window_size=4, num_global_tokens=2, channels=32, aux_channels=16)
    ref = build_model("glam_swin_upernet_tiny", **kw)
    torch.save(_fake_official_swin(ref), tmp / "swin.pth")
    out = tmp / "pre"
    train(tiny_config(tmp / "synth", out, **{"model.pretrained": str(tmp / "swin.pth"), "train.epochs": 1,
                                             "train.iters_per_epoch": 1, "train.val_every": 0,
                                             "optim.lr": "1e-12", "optim.grad_clip": "null"}), console=False)
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "pretrained weights from" in log and "unused checkpoint keys: 2" in log and "global_tokens" in log
    w = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    key = "backbone.stages.0.blocks.0.attn.qkv.weight"
    assert torch.allclose(w[key], ref.state_dict()[key] + 1, atol=1e-6)


# ------------------------------------------------------------------------------------------------ evaluate
def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


def test_evaluate_2d_png_folders(tmp_path, capsys):
    from glam3d.cli import main

    # image a: gt [0 0 1 1 | 2 2 255 255], pred [0 1 1 1 | 2 0 2 2]; image b: gt [2 2 2 2], pred [2 2 2 1]
    _png(tmp_path / "gt" / "a.png", [[0, 0, 1, 1], [2, 2, 255, 255]])
    _png(tmp_path / "pred" / "a.png", [[0, 1, 1, 1], [2, 0, 2, 2]])
    _png(tmp_path / "gt" / "b.png", [[2, 2, 2, 2]])
    _png(tmp_path / "pred" / "b.png", [[2, 2, 2, 1]])
    out = tmp_path / "rep"
    assert main(["evaluate", "--task", "2d", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--num-classes", "3", "--out", str(out)]) == 0
    # confusion (rows gt): c0 [1 1 0], c1 [0 2 0], c2 [1 1 4] -> IoU 1/3, 2/4, 4/6
    rep = json.loads((out / "miou.json").read_text())
    assert [c["IoU"] for c in rep["per_class"]] == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    assert rep["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 2 / 3) / 3) and rep["aAcc"] == pytest.approx(7 / 10)
    assert rep["num_pixels"] == 10 and (out / "miou.md").is_file() and (out / "miou.csv").is_file()
    assert "mIoU 50.00" in capsys.readouterr().out
    # raw ADE20K-style annotations: 0 ignored, v -> v - 1
    _png(tmp_path / "gt_raw" / "a.png", [[1, 1, 2, 2], [3, 3, 0, 0]])
    _png(tmp_path / "gt_raw" / "b.png", [[3, 3, 3, 3]])
    out2 = tmp_path / "rep2"
    assert main(["evaluate", "--task", "2d", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt_raw"),
                 "--num-classes", "3", "--reduce-zero-label", "--out", str(out2)]) == 0
    assert json.loads((out2 / "miou.json").read_text())["mIoU"] == pytest.approx(rep["mIoU"])
    # one-line errors
    assert main(["evaluate", "--task", "2d", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt_raw"),
                 "--num-classes", "3", "--out", str(out2)]) == 2
    assert "add --reduce-zero-label" in capsys.readouterr().err
    (tmp_path / "pred" / "b.png").unlink()
    assert main(["evaluate", "--task", "2d", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--num-classes", "3", "--out", str(out2)]) == 2
    assert "no prediction of the same name" in capsys.readouterr().err


def test_evaluate_2d_checkpoint_reproduces_the_validation_miou(tiny_run, capsys):
    from glam3d.cli import main

    tmp, summary, rows = tiny_run
    out = tmp / "eval"
    assert main(["evaluate", "--checkpoint", summary["checkpoint_last"], "--dataset-root", str(tmp / "synth"),
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    rep = json.loads((out / "miou.json").read_text())
    assert rep["mIoU"] == pytest.approx(rows[-1]["val_mIoU"], abs=1e-9)
    assert rep["meta"]["inference"] == "whole" and rep["meta"]["images"] == 4
    assert "4 images: mIoU" in capsys.readouterr().out

"""mIoU metrics on known confusion matrices, inference modes, the report files."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from glam3d.metrics.miou import (ConfusionMatrix, evaluate_segmentation, metrics_from_confusion, predict_logits,
                                 write_miou_report)


def test_confusion_accumulation_with_ignore():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [1, 255]]))
    cm.update(np.array([0, 0]), np.array([0, 2]))
    assert cm.matrix.tolist() == [[2, 0, 0], [0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="ground-truth label 3"):
        cm.update(np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="pixels"):
        cm.update(np.array([0, 1]), np.array([0]))


def test_metrics_on_known_matrix():
    # rows = ground truth, cols = prediction
    m = np.array([[50, 10, 0, 0],
                  [5, 30, 5, 0],
                  [0, 0, 0, 0],     # class 2 never in the ground truth, predicted 5 times
                  [0, 0, 0, 0]])    # class 3 absent everywhere -> nan, left out of the means
    r = metrics_from_confusion(m, ["a", "b", "c", "d"])
    iou = [c["IoU"] for c in r["per_class"]]
    assert iou[0] == pytest.approx(50 / (60 + 55 - 50))
    assert iou[1] == pytest.approx(30 / (40 + 40 - 30))
    assert iou[2] == 0.0 and math.isnan(iou[3])
    assert r["mIoU"] == pytest.approx((50 / 65 + 30 / 50 + 0.0) / 3)
    acc = [c["Acc"] for c in r["per_class"]]
    assert acc[0] == pytest.approx(50 / 60) and acc[1] == pytest.approx(30 / 40) and math.isnan(acc[2])
    assert r["mAcc"] == pytest.approx((50 / 60 + 30 / 40) / 2)
    assert r["aAcc"] == pytest.approx(80 / 100) and r["num_pixels"] == 100
    perfect = metrics_from_confusion(np.diag([3, 4, 5]))
    assert perfect["mIoU"] == 1.0 and perfect["aAcc"] == 1.0
    with pytest.raises(ValueError, match="class names"):
        metrics_from_confusion(m, ["a"])


def test_write_miou_report(tmp_path, capsys):
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    paths = write_miou_report(tmp_path / "eval", cm, ["road", "car", "sky"], title="val", extra={"model": "x"})
    doc = json.loads(open(paths["json"]).read())
    assert doc["mIoU"] == pytest.approx((1 + 0.5 + 0.5) / 3) and doc["meta"] == {"model": "x"}
    assert doc["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    rows = list(csv.reader(open(paths["csv"])))
    assert rows[0][:4] == ["class", "name", "IoU", "Acc"] and rows[2][:3] == ["1", "car", "50.00"]
    assert rows[-1][0] == "mean" and rows[-1][2] == "66.67"
    md = open(paths["md"]).read()
    assert "| 2 | sky | 50.00 | 50.00 |" in md and "**mIoU 66.67**" in md
    assert "**mIoU 66.67**" in capsys.readouterr().out
    # nan -> null in JSON
    write_miou_report(tmp_path / "e2", np.array([[1, 0], [0, 0]]), print_table=False)
    assert json.loads((tmp_path / "e2/miou.json").read_text())["per_class"][1]["IoU"] is None


class PixelNet(nn.Module):
    """Translation-equivariant (1×1 conv): whole-image and sliding-window logits must agree."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        out = self.conv(x)
        return (out, out * 0) if self.training else out


def test_predict_whole_vs_slide_and_resize():
    torch.manual_seed(0)
    net = PixelNet().eval()
    img = torch.randn(3, 37, 53)
    whole = predict_logits(net, img, mode="whole")
    slide = predict_logits(net, img, mode="slide", crop_size=16, stride=10)
    torch.testing.assert_close(whole, slide, rtol=1e-5, atol=1e-5)
    big = predict_logits(net, img, mode="slide", crop_size=64)  # image smaller than the crop: padded
    torch.testing.assert_close(whole, big, rtol=1e-5, atol=1e-5)
    flip = predict_logits(net, img, flip=True)
    torch.testing.assert_close(whole, flip, rtol=1e-5, atol=1e-5)
    assert predict_logits(net, img, out_size=(74, 106)).shape == (4, 74, 106)


def test_evaluate_segmentation_oracle():
    class Oracle(nn.Module):
        def forward(self, x):  # the label is encoded in channel 0
            lab = x[:, 0].round().long().clamp(0, 2)
            return nn.functional.one_hot(lab, 3).permute(0, 3, 1, 2).float()

    data = []
    for _i in range(3):
        lab = torch.randint(0, 3, (8, 9))
        img = torch.stack([lab.float(), torch.zeros(8, 9), torch.zeros(8, 9)])
        lab[0, 0] = 255
        data.append({"image": img, "label": lab})
    net = Oracle().train()
    cm = evaluate_segmentation(net, data, 3, mode="slide", crop_size=4, stride=4)
    assert net.training  # mode restored
    r = cm.metrics()
    assert r["mIoU"] == 1.0 and r["num_pixels"] == 3 * (72 - 1)

"""Training losses: Dice + cross-entropy over deep-supervision outputs (3D), cross-entropy over weighted heads (2D).

* :func:`dice_ce_loss`: MONAI's ``DiceCELoss`` configured by ``loss.*`` (softmax, one-hot targets);
* :class:`CrossEntropy`: cross-entropy over the non-ignored pixels/voxels;
* :class:`DeepSupervisionLoss`: ``sum_i w_i * loss(output_i, target resized to output_i)`` (nnFormer's 4/7, 2/7,
  1/7 over its three decoder outputs);
* :class:`WeightedOutputsLoss`: ``sum_i w_i * loss(output_i, label)`` over full-size heads (UperNet's main and
  auxiliary outputs).

Which one a run uses is its task's choice (:meth:`glam3d.engine.tasks.Task.build_loss`).

Example::

    loss = DeepSupervisionLoss(dice_ce_loss(cfg.loss), [4 / 7, 2 / 7, 1 / 7])
    value = loss(model(x), y)          # outputs: a list, full resolution first; y: (B, 1, D, H, W) labels
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_ce_loss", "CrossEntropy", "DeepSupervisionLoss", "WeightedOutputsLoss"]


def dice_ce_loss(lcfg):
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=lcfg.include_background,
                      batch=lcfg.batch_dice, lambda_dice=lcfg.dice_weight, lambda_ce=lcfg.ce_weight)


class DeepSupervisionLoss(torch.nn.Module):
    """``sum_i w_i * loss(output_i, target resized (nearest) to output_i)``; a single tensor output uses ``loss``
    alone. ``weights`` (full resolution first) may be shorter than the outputs: extra outputs are ignored."""

    def __init__(self, base, weights):
        super().__init__()
        self.base, self.weights = base, [float(w) for w in weights]

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs.float(), target)
        outputs = list(outputs)
        if not self.weights:
            return self.base(outputs[0].float(), target)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs):
            if w == 0:
                continue
            t = target
            if tuple(out.shape[2:]) != tuple(target.shape[2:]):
                t = F.interpolate(target.float(), size=out.shape[2:], mode="nearest").to(target.dtype)
            total = total + w * self.base(out.float(), t)
        return total


class CrossEntropy(torch.nn.Module):
    """Cross-entropy averaged over the pixels/voxels whose label is not ``ignore_index`` (0 when there are none);
    a label with a channel axis (3D ``(B, 1, *S)``) is squeezed."""

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long()
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp_min(1)


class WeightedOutputsLoss(torch.nn.Module):
    """2D: ``sum_i w_i * loss(output_i, label)`` over a network's outputs (UperNet's ``(main, aux)``, both full
    size; an output of another size is resized bilinearly to the label's). ``weights`` ``[]``: the first output
    only; extra outputs beyond the weights are ignored."""

    def __init__(self, base, weights):
        super().__init__()
        self.base, self.weights = base, [float(w) for w in weights] or [1.0]

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(self.weights, outputs):
            if w == 0:
                continue
            if tuple(out.shape[-2:]) != tuple(target.shape[-2:]):
                out = F.interpolate(out.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            total = total + w * self.base(out, target)
        return total

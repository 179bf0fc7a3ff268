"""Optimiser and learning-rate schedule from ``cfg.optim``.

- ``sgd``: nnFormer / nnU-Net (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5 on every parameter).
- ``adamw``: betas from the config; no weight decay on biases, norms and other 1-D parameters.
- ``optim.no_weight_decay`` (either optimiser): parameter-name substrings also kept out of weight decay, as
  mmseg's Swin recipe does (``norm``, ``relative_position_bias_table``, ``absolute_pos_embed``); the 2D recipes
  add GLAM's ``global_tokens`` / ``global_pos_embed``.

Schedules (a factor on ``optim.lr`` as a function of the optimiser step ``t`` out of ``T = epochs × iters``)::

    warm-up (if warmup_epochs > 0)  warmup_start + (1 - warmup_start) · t / W      for t < W
    poly / warmup_poly              (1 - p) ** poly_power,  p = (t - W) / (T - W)
    warmup_cosine                   cosine from 1 down to min_lr / lr
    constant                        1

``step_per: epoch`` quantises ``t`` to the start of its epoch (nnFormer sets its poly lr once per epoch).
The scheduler is a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimiser step.
"""
from __future__ import annotations

import math

import torch


def no_weight_decay(name: str, param: torch.Tensor, keys, one_d: bool) -> bool:
    """Whether a parameter is kept out of weight decay: its name contains one of ``keys`` (``optim.no_weight_decay``,
    e.g. ``norm``, ``relative_position_bias_table``, ``global_tokens``, ``global_pos_embed``) or, with ``one_d``,
    it is a 1-D tensor (biases, norm scales)."""
    return (one_d and param.ndim < 2) or any(k in name for k in keys)


def build_optimizer(model: torch.nn.Module, ocfg) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keys = list(getattr(ocfg, "no_weight_decay", None) or [])
    if ocfg.name == "sgd":
        sgd = dict(lr=ocfg.lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov and ocfg.momentum > 0)
        if not keys:
            return torch.optim.SGD([p for _, p in params], weight_decay=ocfg.weight_decay, **sgd)
        groups = [{"params": [p for n, p in params if not no_weight_decay(n, p, keys, False)],
                   "weight_decay": ocfg.weight_decay},
                  {"params": [p for n, p in params if no_weight_decay(n, p, keys, False)], "weight_decay": 0.0}]
        return torch.optim.SGD([g for g in groups if g["params"]], **sgd)
    if ocfg.name == "adamw":
        decay = [p for n, p in params if not no_weight_decay(n, p, keys, True)]
        no_decay = [p for n, p in params if no_weight_decay(n, p, keys, True)]
        groups = [{"params": decay, "weight_decay": ocfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=ocfg.lr, betas=tuple(ocfg.betas))
    raise ValueError(f"unknown optimiser {ocfg.name!r}")


def lr_factor(ocfg, step: int, iters_per_epoch: int, epochs: int) -> float:
    """Multiplier of ``ocfg.lr`` at optimiser step ``step`` (0-based)."""
    total = max(1, epochs * iters_per_epoch)
    t = step
    if ocfg.step_per == "epoch":
        t = (step // iters_per_epoch) * iters_per_epoch
    t = min(t, total)
    warm = int(round(ocfg.warmup_epochs * iters_per_epoch))
    if warm > 0 and t < warm:
        return ocfg.warmup_start + (1.0 - ocfg.warmup_start) * t / warm
    p = (t - warm) / max(1, total - warm)
    floor = ocfg.min_lr / ocfg.lr
    if ocfg.schedule in ("poly", "warmup_poly"):
        f = (1.0 - p) ** ocfg.poly_power
    elif ocfg.schedule == "warmup_cosine":
        f = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        f = 1.0
    return max(f, floor)


def build_scheduler(optimizer, ocfg, iters_per_epoch: int, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(ocfg, step, iters_per_epoch, epochs))


def clip_gradients(parameters, max_norm) -> float | None:
    """Clip the global gradient norm to ``max_norm`` (``None``: no clipping); returns the norm before clipping."""
    if max_norm is None:
        return None
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

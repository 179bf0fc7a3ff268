"""Training steps with a NaN/inf loss or gradient: skipped, counted, and stopped when there are too many.

One bad batch (a corrupt case, an fp16 overflow) must not poison the weights, and a diverged run must not go on
writing useless checkpoints for days. :class:`NonFiniteGuard` decides, after each backward pass, whether the step
is taken: the loss and the global gradient norm must be finite on *every* rank (one all-reduced flag, so DDP
ranks always agree and never diverge). A skipped step changes no weight and no optimiser state; the iteration
counter and the learning-rate schedule still advance (the schedule stays a function of the iteration, as on
resume); a grad scaler (fp16) records the step's overflow as usual. The counts (this epoch, in a row, in all) go
to the log, ``log.csv`` (``nonfinite_steps``) and TensorBoard, and into checkpoints, so a resumed run keeps its
total. More than ``train.max_nonfinite_in_a_row`` in a row, or ``train.max_nonfinite_steps`` in all, stop the
run with one line (:class:`TooManyNonFinite`, exit 2) naming the run folder and the counts.

Usage (what :meth:`glam3d.engine.train.Trainer.train_step` does)::

    guard = NonFiniteGuard(max_in_a_row=10, max_total=100, env=env)
    skip = guard.check(loss, grad_norm)       # True: do not step the optimiser
    guard.stop_if_too_many(run_dir, epoch, step)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UserError
from . import distributed as dist

__all__ = ["NonFiniteGuard", "TooManyNonFinite", "grad_norm"]


class TooManyNonFinite(UserError):
    """The run had more non-finite steps than the config allows."""


def grad_norm(parameters) -> torch.Tensor:
    """The global L2 norm of the gradients (a 0-d float tensor on their device; 0 without gradients): NaN/inf
    when any gradient element is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradient (see the module doc).

    Attributes: ``epoch_count`` (skipped steps of the current epoch), ``in_a_row``, ``total``; ``max_in_a_row``,
    ``max_total`` (the limits)."""

    def __init__(self, max_in_a_row: int, max_total: int, env: Optional[dist.DistEnv] = None):
        if max_in_a_row < 0 or max_total < 0:
            raise ValueError("the non-finite step limits must be >= 0")
        self.max_in_a_row, self.max_total = int(max_in_a_row), int(max_total)
        self.env = env or dist.DistEnv()
        self.epoch_count = self.in_a_row = self.total = 0

    def check(self, loss: torch.Tensor, norm: Optional[torch.Tensor]) -> bool:
        """Whether this step is skipped: its loss (and ``norm``, the gradient norm, when given) is not finite on
        some rank. Every rank gets the same answer. Counts it."""
        bad = ~torch.isfinite(loss.detach().float())
        if norm is not None:
            bad = bad | ~torch.isfinite(norm.detach().float().to(bad.device))
        flag = bad.to(torch.float32).reshape(1)
        if self.env.distributed:
            flag = dist.all_reduce_sum(flag, self.env)  # any rank non-finite -> every rank skips
        skip = bool(flag.item() > 0)
        if skip:
            self.epoch_count += 1
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0
        return skip

    def start_epoch(self) -> None:
        self.epoch_count = 0

    def too_many(self) -> bool:
        return self.in_a_row > self.max_in_a_row or self.total > self.max_total

    def stop_if_too_many(self, run_dir, epoch: int, step: int, weights_finite: bool = True) -> None:
        """Raise :class:`TooManyNonFinite` (one line naming ``run_dir`` and the counts) past a limit. ``epoch`` is
        1-based, ``step`` the 0-based iteration of that epoch."""
        if not self.too_many():
            return
        which = (f"{self.in_a_row} steps in a row (train.max_nonfinite_in_a_row = {self.max_in_a_row})"
                 if self.in_a_row > self.max_in_a_row else
                 f"{self.total} steps in all (train.max_nonfinite_steps = {self.max_total})")
        state = ("the network's weights are NaN/inf" if not weights_finite else
                 "every skipped step left the weights unchanged")
        raise TooManyNonFinite(f"training stopped at epoch {epoch}, iteration {step}: the loss or gradient was "
                               f"NaN/inf in {which}; {self.total} non-finite steps in all; {state}; "
                               f"checkpoints/last.pt holds the last epoch end (lower optim.lr, check the data, "
                               f"or train.amp)", run_dir)

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: Optional[dict]) -> None:
        state = state or {}
        self.in_a_row, self.total = int(state.get("in_a_row", 0)), int(state.get("total", 0))

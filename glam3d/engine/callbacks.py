"""Training callbacks: code that watches (or steers) a run from outside the training loop.

:func:`glam3d.engine.train.train` takes ``callback=``: a plain function, called on rank 0 after every epoch with
that epoch's log row (a dict), or :class:`Callback` objects, whose hooks the
:class:`~glam3d.engine.train.Trainer` calls on every rank (``trainer.env.is_main`` tells rank 0) — or a list of
either. A hook gets the trainer itself: its ``cfg``, ``env``, ``run_dir``, ``state`` (epoch, iteration, best
score), ``model``, ``optimizer``, ``log``.

Example::

    class StopWhenGood(Callback):
        def on_epoch_end(self, trainer, row):
            if row.get("val_mean_dice", 0) > 0.9:
                trainer.log.info("good enough")

    train(cfg, callback=[StopWhenGood(), lambda row: print(row["train_loss"])])
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

__all__ = ["Callback", "EpochRowFunction", "CallbackList", "as_callbacks"]


class Callback:
    """Hooks of a training run; override the ones you need (each does nothing here).

    Order: :meth:`on_train_start` once the network, optimiser and data are built (and restored on resume);
    per epoch :meth:`on_epoch_start`, :meth:`on_step_start` before each iteration (the batch is loaded, nothing of
    the step has run), :meth:`on_epoch_end` after the epoch's validation, checkpoint and log row; then
    :meth:`on_train_end` with the run's summary.
    """

    def on_train_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer, epoch: int) -> None:
        """``epoch``: 0-based."""

    def on_step_start(self, trainer, epoch: int, step: int) -> None:
        """``epoch``: 0-based; ``step``: the iteration within the epoch, 0-based (a resumed epoch starts at the
        saved iteration)."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        """``row``: the epoch's log row (a copy), as written to ``log.csv`` (``epoch`` 1-based)."""

    def on_train_end(self, trainer, summary: dict) -> None:
        pass


class EpochRowFunction(Callback):
    """A plain function ``fn(row)`` called on rank 0 after every epoch with that epoch's log row."""

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def on_epoch_end(self, trainer, row: dict) -> None:
        if trainer.env.is_main:
            self.fn(row)


class CallbackList(Callback):
    """Several callbacks, called in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_train_start(self, trainer) -> None:
        for c in self.callbacks:
            c.on_train_start(trainer)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        for c in self.callbacks:
            c.on_epoch_start(trainer, epoch)

    def on_step_start(self, trainer, epoch: int, step: int) -> None:
        for c in self.callbacks:
            c.on_step_start(trainer, epoch, step)

    def on_epoch_end(self, trainer, row: dict) -> None:
        for c in self.callbacks:
            c.on_epoch_end(trainer, dict(row))

    def on_train_end(self, trainer, summary: dict) -> None:
        for c in self.callbacks:
            c.on_train_end(trainer, summary)


CallbackLike = Union[Callback, Callable[[dict], None]]


def as_callbacks(callback: Optional[Union[CallbackLike, Iterable[CallbackLike]]]) -> CallbackList:
    """``train(callback=...)`` as a :class:`CallbackList`: None, a :class:`Callback`, a function ``fn(row)``
    (:class:`EpochRowFunction`), or a list of these. A TypeError names anything else."""
    if callback is None:
        items = []
    elif isinstance(callback, Callback) or callable(callback):
        items = [callback]
    else:
        try:
            items = list(callback)
        except TypeError:
            raise TypeError(f"callback must be a Callback, a function of the epoch row, or a list of them; got "
                            f"{type(callback).__name__}") from None
    out = []
    for c in items:
        if isinstance(c, Callback):
            out.append(c)
        elif callable(c):
            out.append(EpochRowFunction(c))
        else:
            raise TypeError(f"callback must be a Callback or a function of the epoch row, got {type(c).__name__}")
    return CallbackList(out)

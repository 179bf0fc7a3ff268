"""The training engine: one loop from a laptop CPU to many GPUs on many nodes.

``train(cfg)`` trains any registered 3D segmentation network (or ``"package.module:factory"``) on a preprocessed
dataset and returns a summary dict. The run folder (``cfg.output``; ``OUTPUT/fold_<K>`` for a cross-validation
fold, ``data.fold``) is self-describing::

    RUN/.glam3d-folder.json  ownership marker, written first (glam3d.engine.run_folder)
    RUN/config.yaml          the resolved config
    RUN/split.json           training / validation case ids (carved from the training cases, seeded; or the fold)
    RUN/train.log            text log;  RUN/log.csv: one row per epoch;  RUN/curves.png: learning curves
    RUN/tb/                  TensorBoard scalars
    RUN/checkpoints/last.pt  end of the latest epoch (or every train.save_every_iters iterations)
    RUN/checkpoints/best.pt  best mean validation Dice
    RUN/validation/          a fold's validation cases predicted and scored (glam3d.engine.crossval)

A step with a NaN/inf loss or gradient is skipped and counted, too many stop the run
(:mod:`glam3d.engine.nonfinite`); a checkpoint never holds NaN/inf weights.

Usage::

    from glam3d.config import load_config
    from glam3d.engine.train import train
    summary = train(load_config("phantom_glam_nnformer_tiny"))
    summary["best_mean_dice"], summary["checkpoint_best"]

Under ``torchrun`` (``WORLD_SIZE > 1``) the same call runs DistributedDataParallel: every rank draws its own
share of each step's patches (see :mod:`glam3d.data.datasets`), gradients are averaged, validation cases are
sharded and the Dice sums all-reduced, rank 0 writes the files.

Resume (``resume=True``) reloads ``checkpoints/last.pt`` (model, optimiser, scheduler, scaler, RNG states,
epoch/iteration) and replays the interrupted epoch from its start (or from the saved iteration); patches are a
pure function of ``(seed, epoch, draw)``, so in deterministic CPU mode a resumed run ends with exactly the weights
of an uninterrupted one.

The loop is :class:`Trainer`, a sequence of hook methods (:meth:`~Trainer.setup`, :meth:`~Trainer.build`,
:meth:`~Trainer.restore`, :meth:`~Trainer.parallelize`, :meth:`~Trainer.build_data`, :meth:`~Trainer.train_epoch`
/ :meth:`~Trainer.train_step`, :meth:`~Trainer.validate`, :meth:`~Trainer.save`, :meth:`~Trainer.finish`); what
depends on the kind of data is its task (:mod:`glam3d.engine.tasks`: :class:`~glam3d.engine.tasks.VolumeTask`,
:class:`~glam3d.engine.tasks.ImageTask`); code that watches a run from outside is a callback
(:mod:`glam3d.engine.callbacks`, ``train(callback=...)``).

2D natural-image configs (``data.dataset: ade20k | cityscapes | synthetic``, ``cfg.task == "2d"``) go through the
same loop, optimiser, schedule, checkpoints, resume and DDP: images come from
:func:`glam3d.data.natural.build_2d_datasets`, each step's images are a seeded per-epoch permutation sharded over
the ranks with augmentations seeded by ``(seed, epoch, draw)`` (:class:`~glam3d.engine.tasks.ImageDraws`); the
loss is cross-entropy (``loss.ignore_index``, 255) over the network's outputs weighted by
``train.deep_supervision`` (UperNet's ``(main, aux)``: ``[1.0, 0.4]``); ``model.pretrained`` loads an ImageNet
Swin checkpoint into the backbone (new / unused keys logged); BatchNorm becomes SyncBatchNorm under DDP on CUDA
(``train.sync_bn``); validation is :func:`glam3d.metrics.miou.evaluate_segmentation` (``val.inference`` whole |
slide) with the confusion matrix summed over ranks, logged as mIoU and per-class IoU (``log.csv`` columns
``val_mIoU``, ``val_iou_<class>``; full tables in ``RUN/val/miou_epochNNNN.{md,csv,json}``), and
``checkpoints/best.pt`` is the best mIoU.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config, config_from_dict, config_to_dict, dump_config, load_config, validate_config
from ..data import datasets as D
from ..errors import UserError
from ..inference.precision import cpu_bf16_native
from ..utils.io import atomic_write_json, atomic_write_text, sweep_stale_temps
from . import distributed as dist
from .callbacks import CallbackList, as_callbacks
from .checkpoint import (NonFiniteCheckpoint, UnsafeCheckpoint, check_finite_weights, find_non_finite,
                         load_checkpoint, load_model_weights, rng_state, save_checkpoint, set_rng_state)
from .logging import RunLogger
from .nonfinite import NonFiniteGuard, grad_norm
from .optim import build_optimizer, build_scheduler
from .run_folder import claim_run, has_run
from .tasks import AMP_DTYPES, Task, task_for

__all__ = ["train", "Trainer", "TrainState", "build_network", "has_run", "numerics", "seed_everything",
           "run_folder_path"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _set_deterministic_algorithms(mode: bool, warn_only: bool, compile: bool) -> None:
    # torch.use_deterministic_algorithms imports torch._inductor (seconds); only needed when compiling
    if compile or "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


@contextlib.contextmanager
def numerics(deterministic: bool, compile: bool = False):
    """Deterministic algorithms (ops without one warn) and cuDNN settings for the run; restored afterwards, so
    calling :func:`train` leaves the process as it found it."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        _set_deterministic_algorithms(True, True, compile)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        if torch.are_deterministic_algorithms_enabled() != saved[0] or saved[0]:
            _set_deterministic_algorithms(saved[0], saved[1], compile)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def network_factory(name: str):
    """The callable a ``"package.module:factory"`` network name points at (UserError when it cannot be imported)."""
    mod_name, attr = name.split(":", 1)
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"config key 'model.name': cannot import {name!r} ({err})") from None


def factory_overrides(mcfg, num_classes: int, in_channels: int) -> dict:
    """The keyword arguments a network is built with: ``model.overrides`` plus the dataset's ``num_classes`` (and,
    for a factory, ``in_channels``); UserError when the config's ``num_classes`` contradicts the dataset."""
    overrides = dict(mcfg.overrides)
    overrides.setdefault("num_classes", num_classes)
    if overrides["num_classes"] != num_classes:
        raise UserError(f"config key 'model.overrides.num_classes' is {overrides['num_classes']} but the dataset "
                        f"has {num_classes} labels")
    if ":" in mcfg.name:
        overrides.setdefault("in_channels", in_channels)
    return overrides


def build_network(mcfg, num_classes: int, in_channels: int) -> torch.nn.Module:
    """A registered variant via ``build_model(name, num_classes=K, **overrides)`` (``in_channels`` added when the
    dataset has a different channel count), or ``"package.module:factory"`` called with
    ``num_classes, in_channels, **overrides``. Sets ``model.glam3d_spec`` so checkpoints can rebuild it."""
    overrides = factory_overrides(mcfg, num_classes, in_channels)
    name = mcfg.name
    try:
        if ":" in name:
            model = network_factory(name)(**overrides)
        else:
            from ..models.registry import build_model

            model = build_model(name, **overrides)
            if getattr(model, "in_channels", in_channels) != in_channels and "in_channels" not in overrides:
                overrides["in_channels"] = in_channels
                model = build_model(name, **overrides)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, ImportError) as err:  # ImportError: an optional dependency missing
        raise UserError(f"config key 'model': cannot build {name!r} ({' '.join(str(err).split())})") from None
    if not hasattr(model, "glam3d_spec") or ":" in name:
        model.glam3d_spec = {"name": name, "kwargs": dict(overrides)}
    return model


def _load_cfg(cfg) -> Config:
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, Path)):
        return load_config(cfg)
    if isinstance(cfg, dict):
        return config_from_dict(cfg)
    raise TypeError(f"train() needs a Config, a dict or a YAML path, got {type(cfg).__name__}")


def run_folder_path(cfg: Config) -> Path:
    """The run folder: ``cfg.output`` (``{name}`` replaced), or ``OUTPUT/fold_<K>`` for a cross-validation fold
    (``data.fold``)."""
    fold = getattr(cfg.data, "fold", None)
    if fold is None:
        return cfg.run_dir
    return cfg.run_dir / f"fold_{D.parse_fold(fold)}"


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
def train(cfg, *, resume: bool = False, overwrite: bool = False, callback=None, console: bool = True) -> dict:
    """Train per ``cfg`` (a :class:`~glam3d.config.Config`, a plain dict, or a YAML path).

    Args:
        resume: continue the run in ``cfg.output`` from ``checkpoints/last.pt`` (UserError if there is none).
        overwrite: replace a previous run in ``cfg.output`` (otherwise refused with a UserError).
        callback: a function called on rank 0 after every epoch with that epoch's log row (a dict), a
            :class:`~glam3d.engine.callbacks.Callback` (hooks at the start, every epoch and step, and the end, on
            every rank), or a list of these.
        console: also print log lines to stderr.

    Returns:
        ``{"run_dir", "epochs", "iterations", "best_mean_dice", "best_epoch", "last_val", "final_train_loss",
        "checkpoint_last", "checkpoint_best", "time_s", "world_size", "device", "num_parameters"}``.
    """
    cfg = _load_cfg(cfg)
    validate_config(cfg)
    callbacks = as_callbacks(callback)  # a bad callback fails before anything starts
    env = dist.setup(cfg.train.device)
    try:
        with numerics(cfg.train.deterministic, cfg.train.compile), torch.random.fork_rng(
                devices=[env.device] if env.device.type == "cuda" else []):
            return Trainer(cfg, env, resume=resume, overwrite=overwrite, callback=callbacks,
                           console=console).run()
    finally:
        dist.cleanup(env)


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves besides the weights and optimiser, and what resume restores.

    ``epoch``: epochs finished (the next epoch to run, 0-based); ``step``: iterations of that epoch already done
    (a resume inside an epoch; 0 otherwise); ``iteration``: optimiser steps so far; ``best`` / ``best_epoch``: the
    best validation score and its epoch (1-based; 0: none yet); ``last_val``: the latest validation metrics;
    ``partial``: the loss sum, sample count and time of the iterations of an unfinished epoch;
    ``final_loss``: the last epoch's mean training loss."""
    epoch: int = 0
    step: int = 0
    iteration: int = 0
    best: float = float("-inf")
    best_epoch: int = 0
    last_val: dict = field(default_factory=dict)
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "n": 0, "time": 0.0})
    final_loss: float = float("nan")


class Trainer:
    """One training run (:func:`train` makes it and calls :meth:`run`).

    :meth:`run` calls the hooks in order: :meth:`setup` (the task's data, the run folder, the resume state, the
    logger), :meth:`build` (split, network, optimiser, scheduler, grad scaler), :meth:`restore` (from the resume
    state, or fresh per-rank random streams), :meth:`parallelize` (DDP, ``torch.compile``), :meth:`build_data`
    (training set, loader, validation set, loss), :meth:`log_start`; then per epoch :meth:`train_epoch` (its
    iterations: :meth:`train_step`) and :meth:`end_epoch` (:meth:`validate`, :meth:`save`, the log row); and
    :meth:`finish` (the summary) and :meth:`export` (a cross-validation fold's validation cases predicted and
    scored). A subclass overrides a hook; a :class:`~glam3d.engine.callbacks.Callback` watches them from outside.

    Attributes after :meth:`build_data`: ``cfg``, ``env``, ``task``, ``run_dir``, ``log``, ``state``
    (:class:`TrainState`), ``model`` (the bare network), ``net`` (what the loop calls: DDP / compiled),
    ``optimizer``, ``scheduler``, ``scaler``, ``amp`` (``none`` | ``bf16`` | ``fp16``), ``loader``, ``sampler``,
    ``loss_fn``, ``val_set``, ``split``, ``manifest``, ``class_names``, ``K``, ``in_channels``, ``guard`` (the
    :class:`~glam3d.engine.nonfinite.NonFiniteGuard`), ``step_skipped`` (whether the last step was skipped).
    """

    def __init__(self, cfg: Config, env: dist.DistEnv, *, resume: bool = False, overwrite: bool = False,
                 callback=None, console: bool = True, task: Optional[Task] = None):
        self.cfg, self.env, self.resume, self.overwrite = cfg, env, resume, overwrite
        self.callbacks: CallbackList = as_callbacks(callback)
        self.console = console
        self.task = task if task is not None else task_for(cfg, env)
        self.run_dir = run_folder_path(cfg)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.step_skipped = False

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.t_start = time.time()
        resume_state = self.setup()
        try:
            self.build()
            self.restore(resume_state)
            del resume_state
            self.parallelize()
            self.build_data()
            self.log_start()
            self.callbacks.on_train_start(self)
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                self.callbacks.on_epoch_start(self, epoch)
                row = self.train_epoch(epoch)
                self.end_epoch(epoch, row)
            summary = self.finish()
            self.export(summary)
            self.callbacks.on_train_end(self, summary)
            return summary
        except BaseException as err:
            if isinstance(err, UserError):  # the CLI prints its one line; the run's log keeps it too
                self.log.to_file(f"error: {err}")
            elif not isinstance(err, KeyboardInterrupt):
                self.log.info(f"training failed: {type(err).__name__}: {err}")
            raise
        finally:
            self.log.close()

    # -- set-up ---------------------------------------------------------------------------------------------------
    def setup(self) -> Optional[dict]:
        """The task's data (read before any file is created), the run folder, the resume state (returned; None
        without resume) and the logger (``self.log``)."""
        self.manifest = self.task.read_data()  # before creating any file
        self.class_names = D.label_names(self.manifest)
        self.K, self.in_channels = len(self.class_names), D.in_channels(self.manifest)
        self.check_network()  # before creating any file
        self.log = pending = PendingLog()  # what is said before the run folder is taken goes to its log later
        if not self.resume:  # a fresh start's split (e.g. a fold of splits_final.json), refused before any file
            self.split = self.task.make_split(self, self.manifest)
        notes = self._prepare_run_dir()
        resume_state, resume_note = self._load_resume_state() if self.resume else (None, None)
        self.log = RunLogger(self.run_dir, self.task.log_class_names(self.class_names), enabled=self.env.is_main,
                             resume_epoch=int(resume_state["epoch"]) if resume_state else None,
                             console=self.console, tensorboard=self.cfg.train.tensorboard)
        columns = self.task.log_columns(self.class_names)
        if columns is not None:
            self.log.columns = columns
        for note in notes:
            self.log.info(f"note: {note}")
        pending.replay(self.log)
        if resume_note:
            self.log.warning(resume_note)
        if resume_state is not None:
            self._keep_legacy_architecture(resume_state)
        return resume_state

    def _keep_legacy_architecture(self, resume_state: dict) -> None:
        """A run resumed from a checkpoint whose model spec has no version (written before checkpoints recorded
        every network argument) is rebuilt with the defaults it was trained with: the options
        :func:`~glam3d.models.registry.legacy_options` names go into ``model.overrides`` (the config's own win),
        with one note, and the run's ``config.yaml`` records them from then on."""
        if ":" in self.cfg.model.name:
            return
        from ..models.registry import legacy_options

        try:
            legacy = legacy_options(resume_state.get("model_spec") or {})
        except (TypeError, ValueError):
            return
        legacy = {k: v for k, v in legacy.items() if k not in self.cfg.model.overrides}
        if legacy:
            self.cfg.model.overrides = {**legacy, **self.cfg.model.overrides}
            shown = ", ".join(f"{k}={v!r}" for k, v in legacy.items())
            self.log.info(f"note: {self.resume_path}: the checkpoint predates model spec version 2; the network is "
                          f"rebuilt with the defaults it was trained with ({shown}), now recorded in config.yaml")

    def check_network(self) -> None:
        """A ``package.module:factory`` network built on the meta device and checked as a registered one is by
        :func:`~glam3d.config.validate_config`: windows it accepts, weights that fit the machine (nothing is
        allocated, no file written)."""
        cfg = self.cfg
        if ":" not in cfg.model.name:
            return
        from ..config import config_source
        from .preflight import check_factory_network

        check_factory_network(cfg, network_factory(cfg.model.name),
                              factory_overrides(cfg.model, self.K, self.in_channels), config_source(cfg))

    def _prepare_run_dir(self) -> list:
        """Claim the run folder (:func:`glam3d.engine.run_folder.claim_run`: refusals, the ownership marker, the
        entries of a replaced run deleted) on rank 0, a refusal stopping every rank; returns notes for the log."""
        notes: list = []

        def prepare():
            claim_run(self.run_dir, resume=self.resume, overwrite=self.overwrite, log=notes.append)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.ckpt_dir):  # leftovers of a killed writer
                sweep_stale_temps(folder)
            return notes

        return dist.on_main(prepare, self.env)

    def _load_resume_state(self):
        """``(state, warning or None)`` from ``checkpoints/last.pt``; when that file is missing, truncated, corrupt
        (e.g. the disk filled up) or holds NaN/inf weights, fall back to ``last.pt.prev`` (the checkpoint before
        it) with a one-line warning. Both bad: the UserError about ``last.pt``."""
        self.resume_path = last = self.ckpt_dir / "last.pt"
        prev = last.with_name("last.pt.prev")
        try:
            return _finite_checkpoint(last), None
        except UnsafeCheckpoint:
            raise  # code planted in the run folder: stop, do not quietly carry on from another file
        except UserError as err:
            if not prev.is_file():
                raise
            first = err
        try:
            state = _finite_checkpoint(prev)
        except UserError:
            raise first from None
        self.resume_path = prev
        return state, f"{first}; resuming from the previous checkpoint {prev} instead"

    def build(self) -> None:
        """The split (``split.json``, kept from the run folder on resume) and ``config.yaml``; the network (with
        its pretrained backbone or ``model.init_checkpoint`` on a fresh start) on the device, the optimiser,
        the scheduler and the grad scaler."""
        cfg, env, tc = self.cfg, self.env, self.cfg.train
        if self.resume:  # the run's own split.json (read once the folder is known to be the run's)
            self.split = self.task.make_split(self, self.manifest)
        if env.is_main:
            atomic_write_json(self.run_dir / "split.json", self.split)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))

        seed_everything(tc.seed)  # identical initial weights on every rank
        model = build_network(cfg.model, self.K, self.in_channels)
        if cfg.model.pretrained and not self.resume:  # ImageNet backbone (then init_checkpoint, if any)
            from ..models.pretrained import load_pretrained

            report = load_pretrained(model, cfg.model.pretrained, verbose=False)
            for line in report.summary().splitlines():
                self.log.info(line)
        if cfg.model.init_checkpoint and not self.resume:
            init = load_checkpoint(cfg.model.init_checkpoint, mmap=True)  # its optimiser state is never read
            load_model_weights(model, init["model"], path=cfg.model.init_checkpoint)
            del init
        model = self.task.adapt_model(model, self.log)
        model.to(env.device)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.iters_per_epoch, tc.epochs)
        # bf16 autocast runs on CPU and GPU; fp16 (with a grad scaler) is a CUDA-only path
        self.amp = tc.amp if env.device.type == "cuda" or tc.amp == "bf16" else "none"
        self.amp_dtype = AMP_DTYPES[self.amp]
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.guard = NonFiniteGuard(tc.max_nonfinite_in_a_row, tc.max_nonfinite_steps, env)

    def restore(self, resume_state: Optional[dict]) -> None:
        """Network, optimiser, scheduler, scaler, RNG streams and :attr:`state` from the resume checkpoint; on a
        fresh start, per-rank random streams (dropout, drop-path)."""
        env, tc, st = self.env, self.cfg.train, self.state
        if resume_state is None:
            seed_everything(tc.seed + 1000 * env.rank)  # per-rank streams (dropout, drop-path)
            return
        saved, ckpt, model = resume_state, self.resume_path, self.model
        if saved.get("model_spec", {}).get("name") != model.glam3d_spec["name"]:
            raise UserError(f"checkpoint was trained with network {saved.get('model_spec', {}).get('name')!r}, "
                            f"the config asks for {model.glam3d_spec['name']!r}", ckpt)
        load_model_weights(model, saved["model"], path=ckpt)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"cannot restore the optimiser state ({err}); was optim changed?", ckpt) from None
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        st.epoch, st.step = int(saved["epoch"]), int(saved.get("epoch_iteration", 0))
        st.iteration = int(saved["iteration"])
        m = saved.get("metrics", {})
        st.best, st.best_epoch = float(m.get(self.task.best_key, float("-inf"))), int(m.get("best_epoch", 0))
        st.last_val = dict(m.get("last_val", {}))
        self.guard.load_state_dict(saved.get("nonfinite"))
        if st.step:
            st.partial = dict(saved.get("partial_epoch", st.partial))
        ranks = saved.get("rng_ranks")
        if ranks is not None and len(ranks) == env.world_size:
            set_rng_state(ranks[env.rank])
        elif env.world_size == 1:
            set_rng_state(saved["rng"])
        else:
            self.log.warning("world size changed since the checkpoint: RNG streams reseeded")
            seed_everything(tc.seed + 1000 * env.rank + st.epoch)
        if st.epoch >= tc.epochs:
            self.log.info(f"run already finished ({st.epoch} epochs); raise train.epochs to continue")

    def parallelize(self) -> None:
        """``self.net``: the network the loop calls — wrapped in DistributedDataParallel under torchrun (with
        ``find_unused_parameters`` where some parameters get no gradient), compiled with ``train.compile``."""
        tc, env, model = self.cfg.train, self.env, self.model
        net = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            find_unused = tc.find_unused_parameters
            if not find_unused:
                size, batch = self.task.probe_input()
                unused = _unused_parameters(model, self.in_channels, size, env.device, tc.deep_supervision,
                                            batch=batch)
                if unused:
                    self.log.info(f"{len(unused)} parameter tensors (e.g. {unused[0]}) get no gradient from the "
                                  f"loss: DDP runs with find_unused_parameters=True")
                    find_unused = True
            net = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      find_unused_parameters=find_unused)
        if tc.compile:
            from .compile import compile_network

            net = compile_network(net, inference=False, device=env.device)
        self.net = net

    def build_data(self) -> None:
        """The training set (the task's seeded draws), its sampler and loader, the validation set, the loss."""
        cfg, tc = self.cfg, self.cfg.train
        ds, collate, self.val_set = self.task.build_data(self.manifest, self.split, self.K)
        self.sampler = D.EpochSampler(ds)
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.data.batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0,
            pin_memory=self.env.device.type == "cuda", generator=torch.Generator().manual_seed(tc.seed))
        self.loss_fn = self.task.build_loss()
        self._checked_output = False

    def log_start(self) -> None:
        env, tc, st = self.env, self.cfg.train, self.state
        device = env.device
        self.log.info(f"glam3d train: {self.model.glam3d_spec['name']} ({self.num_parameters / 1e6:.2f} M "
                      f"parameters) on {device}"
                      f"{f' x {env.world_size} ranks ({env.backend})' if env.distributed else ''}; "
                      f"{self.task.describe_data(self.split, self.K)}; amp {self.amp}; output {self.run_dir}")
        if self.resume:
            self.log.info(f"resuming from epoch {st.epoch + 1}, iteration {st.step} (step {st.iteration})")
        if tc.amp != self.amp:
            self.log.info(f"train.amp={tc.amp} applies on CUDA only: training in float32 on {device}")
        elif self.amp == "bf16" and device.type == "cpu" and not cpu_bf16_native():
            self.log.info("train.amp=bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): emulated, slower than "
                          "float32 here (train.amp=none)")
        self.task.note_small_cases(self)

    # -- an epoch -------------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """The iterations of ``epoch`` (0-based; a resumed epoch starts at ``state.step``), a mid-epoch
        ``last.pt`` every ``train.save_every_iters`` iterations; returns the epoch's training row."""
        cfg, env, tc, st = self.cfg, self.env, self.cfg.train, self.state
        start_step = st.step
        self.sampler.set_epoch(epoch, start_step * cfg.data.batch_size)
        self.net.train()
        loss_sum, n_seen, t_prev = float(st.partial["loss_sum"]), int(st.partial["n"]), float(st.partial["time"])
        self.guard.epoch_count = int(st.partial.get("nonfinite", 0))
        t0 = time.time()
        per_step = self.task.samples_per_step()
        bar = _progress(tc.iters_per_epoch, start_step, f"epoch {epoch + 1}/{tc.epochs}",
                        enabled=env.is_main and tc.progress)
        for step, batch in enumerate(self.loader, start=start_step):
            self.callbacks.on_step_start(self, epoch, step)
            lv = self.train_step(batch)
            st.iteration += 1
            if self.step_skipped:
                if self.guard.epoch_count == 1:
                    self.log.warning(f"non-finite loss or gradient at epoch {epoch + 1} iteration {step}: step "
                                     f"skipped (the epoch's line counts them)")
                self.guard.stop_if_too_many(self.run_dir, epoch + 1, step, weights_finite=self._weights_finite())
            else:
                loss_sum += lv
                n_seen += 1
            if bar is not None:
                el = time.time() - t0
                bar.set_postfix(loss=f"{loss_sum / max(n_seen, 1):.4f}",
                                patch_s=f"{(step + 1 - start_step) * per_step * env.world_size / max(el, 1e-9):.1f}",
                                refresh=False)
                bar.update(1)
            if tc.save_every_iters and st.iteration % tc.save_every_iters == 0 and step + 1 < tc.iters_per_epoch:
                self.save("last.pt", epoch, step + 1,
                          partial={"loss_sum": loss_sum, "n": n_seen, "time": t_prev + time.time() - t0,
                                   "nonfinite": self.guard.epoch_count})
        if bar is not None:
            bar.close()
        epoch_time = t_prev + time.time() - t0
        stats = dist.all_reduce_sum(torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64), env)
        train_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        st.final_loss = train_loss
        row = {"epoch": epoch + 1, "iteration": st.iteration, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": train_loss, "epoch_time_s": epoch_time,
               "patches_per_s": (tc.iters_per_epoch - start_step) * per_step * env.world_size
               / max(time.time() - t0, 1e-9), "nonfinite_steps": self.guard.epoch_count}
        self.task.train_row(row)
        return row

    def train_step(self, batch: dict) -> float:
        """One optimiser step on ``batch`` (``{"image", "label"}``); returns the loss. A step whose loss or
        gradient is NaN/inf on any rank is skipped (:class:`~glam3d.engine.nonfinite.NonFiniteGuard`):
        ``self.step_skipped`` says so, the weights and optimiser state are left as they were; the schedule
        advances as for any iteration."""
        device, tc, clip = self.env.device, self.cfg.train, self.cfg.optim.grad_clip
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True).long()
        self.optimizer.zero_grad(set_to_none=True)
        with (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()):
            out = self.net(image)
        if not self._checked_output:
            self._checked_output = True
            self._check_output(out, self.K, tc.deep_supervision)
        loss = self.loss_fn(out, label)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            # gradient overflow is the scaler's to handle (it skips the step and lowers its scale): only the loss
            # is checked here; update() still runs, so the scaler's state stays consistent
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            skip = self.guard.check(loss, None)
            if not skip:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()  # every rank runs it (DDP all-reduces the gradients in it), whatever its loss
            norm = grad_norm(params)
            skip = self.guard.check(loss, norm)
            if not skip:
                if clip is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
                self.optimizer.step()
        self.step_skipped = skip
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        return float(loss.detach())

    def _weights_finite(self) -> bool:
        return not find_non_finite(self.model.state_dict())

    def _check_output(self, out, K: int, ds_weights) -> None:
        first = out if isinstance(out, torch.Tensor) else out[0]
        if first.shape[1] != K:
            raise UserError(f"network {self.cfg.model.name!r} outputs {first.shape[1]} channels but the dataset has "
                            f"{K} labels (model.overrides.num_classes?)")
        n = 1 if isinstance(out, torch.Tensor) else len(out)
        if ds_weights and n != len(ds_weights):
            self.log.warning(f"train.deep_supervision has {len(ds_weights)} weights but the network returns {n} "
                             f"output(s): using the first {min(n, len(ds_weights))}")

    def end_epoch(self, epoch: int, row: dict) -> None:
        """Validation when due, ``last.pt`` (and ``best.pt`` when the score improved), the epoch's log line and
        row, the callbacks' :meth:`~glam3d.engine.callbacks.Callback.on_epoch_end`."""
        env, tc, st, task = self.env, self.cfg.train, self.state, self.task
        st.epoch, st.step = epoch + 1, 0  # the epoch's iterations are done
        st.partial = {"loss_sum": 0.0, "n": 0, "time": 0.0}
        val_due = self.val_set is not None and tc.val_every > 0 and (
            (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs)
        improved = False
        if val_due:
            tv = time.time()
            improved = self.validate(epoch, row)
            row["val_time_s"] = time.time() - tv
        row[task.best_column] = st.best if st.best_epoch else float("nan")
        self.save("last.pt", epoch + 1, 0)
        if improved and env.is_main:
            shutil.copyfile(self.ckpt_dir / "last.pt", self.ckpt_dir / ".best.pt.tmp")
            os.replace(self.ckpt_dir / ".best.pt.tmp", self.ckpt_dir / "best.pt")
        msg = (f"epoch {epoch + 1}/{tc.epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
               f"{row['epoch_time_s']:.1f} s ({row['patches_per_s']:.1f} {task.unit}/s)")
        if row.get("nonfinite_steps"):
            msg += (f"  {row['nonfinite_steps']} step(s) skipped: non-finite loss or gradient "
                    f"({self.guard.total} in all)")
        if val_due:
            msg += task.val_message(st.last_val, st.best, st.best_epoch)
        self.log.info(msg)
        if env.is_main:
            self.log.log_epoch(row)
            if (val_due or epoch + 1 == tc.epochs) and task.plots_curves:
                self.log.plot()
        self.callbacks.on_epoch_end(self, dict(row))

    def validate(self, epoch: int, row: dict) -> bool:
        """Validate after ``epoch`` (0-based): ``state.last_val``, the row's validation columns, the best score;
        returns whether it improved."""
        st = self.state
        st.last_val = self.task.validate(self, self.model, self.val_set, self.class_names, self.amp, epoch + 1)
        row.update(self.task.val_row(st.last_val, self.class_names))
        score = self.task.score(st.last_val)
        if math.isfinite(score) and score > st.best:
            st.best, st.best_epoch = score, epoch + 1
            return True
        return False

    def save(self, name: str, epoch: int, epoch_iteration: int, partial: Optional[dict] = None) -> None:
        """``checkpoints/<name>`` (atomically; ``last.pt`` keeps its predecessor as ``last.pt.prev``): weights,
        optimiser, scheduler, scaler, every rank's RNG state, ``epoch`` / ``epoch_iteration`` (where to go on),
        the config, plan and labels, the best score. Every rank takes part (RNG states are gathered); rank 0
        writes."""
        env, st = self.env, self.state
        # every rank holds the same weights: each refuses NaN/inf alike, before any collective
        bad = find_non_finite(self.model.state_dict()) + [f"optimizer.{n}" for n in
                                                           find_non_finite(self.optimizer.state_dict())]
        if bad:
            raise NonFiniteCheckpoint(f"training stopped at epoch {epoch + (epoch_iteration > 0)}: the network's "
                                      f"weights or optimiser state became NaN/inf ({len(bad)} tensors, e.g. {bad[0]}); "
                                      f"no checkpoint was written, checkpoints/{name} holds the last finite ones "
                                      f"(lower optim.lr, set optim.grad_clip, or check the data)", self.run_dir)
        rng = rng_state()
        ranks = dist.all_gather_object(rng, env) if env.distributed else None
        if not env.is_main:
            return
        state = {
            "model_spec": dict(self.model.glam3d_spec),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": int(epoch), "epoch_iteration": int(epoch_iteration), "iteration": int(st.iteration),
            "rng": rng,
            "config": config_to_dict(self.cfg),
            "plan": self.manifest.get("plan", {}),
            "labels": self.manifest["labels"],
            "metrics": {self.task.best_key: st.best if st.best_epoch else float("-inf"), "best_epoch": st.best_epoch,
                        "last_val": st.last_val},
            "world_size": env.world_size,
            "nonfinite": self.guard.state_dict(),
        }
        if ranks is not None:
            state["rng_ranks"] = ranks
        if partial is not None:
            state["partial_epoch"] = partial
        try:
            save_checkpoint(self.ckpt_dir / name, state, keep_previous=(name == "last.pt"))
        except NonFiniteCheckpoint as err:  # (checked above on every rank; kept as the file's own guarantee)
            raise NonFiniteCheckpoint(f"training stopped: {err}", self.run_dir) from None

    def finish(self) -> dict:
        """The run's summary (every rank waits for the others first)."""
        env, tc, st = self.env, self.cfg.train, self.state
        dist.barrier(env)
        summary = {
            "run_dir": str(self.run_dir), "epochs": tc.epochs, "iterations": st.iteration,
            "best_mean_dice": st.best if st.best_epoch else None, "best_epoch": st.best_epoch or None,
            "last_val": st.last_val, "final_train_loss": st.final_loss,
            "checkpoint_last": str(self.ckpt_dir / "last.pt"),
            "checkpoint_best": str(self.ckpt_dir / "best.pt") if (self.ckpt_dir / "best.pt").exists() else None,
            "time_s": time.time() - self.t_start, "world_size": env.world_size, "device": str(env.device),
            "num_parameters": self.num_parameters, "rank": env.rank,
            "split": {"train": self.split["train"], "val": self.split["val"]},
            "nonfinite_steps": self.guard.total,
        }
        self.task.finish_summary(summary, st.best, st.best_epoch)
        self.log.info(f"done: {st.iteration} iterations in {summary['time_s']:.1f} s; "
                      f"{self.task.best_text(summary, st.best, st.best_epoch)}; checkpoints in {self.ckpt_dir}")
        return summary

    def export(self, summary: dict) -> None:
        """A cross-validation fold (``data.fold`` 0..N-1, ``val.export_folds``): its validation cases predicted
        from their source scans with the best checkpoint into ``RUN/validation`` and scored there
        (:func:`glam3d.engine.crossval.export_validation`); ``summary["validation"]`` says what was done."""
        cfg = self.cfg
        if self.task.name != "3d" or cfg.data.fold is None or not cfg.val.export_folds or not self.split.get("val"):
            return
        from .crossval import export_validation

        ckpt = Path(summary["checkpoint_best"] or summary["checkpoint_last"])
        summary["validation"] = export_validation(self.run_dir, ckpt, self.manifest, Path(cfg.data.root),
                                                  self.split["val"], self.env, self.log)


class PendingLog:
    """Stands in for the run's :class:`~glam3d.engine.logging.RunLogger` until the run folder is taken: keeps the
    lines, :meth:`replay` writes them to the real log."""

    def __init__(self):
        self.lines: list = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.lines.append(("warning", msg))

    def to_file(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass

    def replay(self, log) -> None:
        for level, msg in self.lines:
            getattr(log, level)(msg)


def _finite_checkpoint(path: Path) -> dict:
    """:func:`~glam3d.engine.checkpoint.load_checkpoint`, refusing (:class:`NonFiniteCheckpoint`) weights or
    optimiser state that hold NaN/inf: a resume must not carry on from a diverged state."""
    state = load_checkpoint(path)
    check_finite_weights(state["model"], path)
    bad = find_non_finite(state.get("optimizer"))
    if bad:
        raise NonFiniteCheckpoint(f"the checkpoint's optimiser state holds NaN/inf (e.g. {bad[0]}); refused", path)
    return state


def _unused_parameters(model, in_channels, roi, device, ds_weights, batch: int = 1) -> list:
    """Names of trainable parameters that receive no gradient from a training forward/backward on a zero patch
    (RNG states untouched, gradients cleared); DDP must know about them up front. ``batch`` 2 for networks with
    BatchNorm after global pooling (UperNet)."""
    devices = [device] if device.type == "cuda" else []
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # e.g. batch-norm running stats
    with torch.random.fork_rng(devices=devices):
        x = torch.zeros((batch, in_channels, *roi), device=device)
        model.train()
        out = model(x)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        if ds_weights:
            outs = [o for o, w in zip(outs, ds_weights) if w != 0]
        else:
            outs = outs[:1]
        sum(o.float().sum() for o in outs).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return names


def _progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal only: in a piped or redirected log (a cluster job's file) carriage-return frames
    would pile up, so there the epoch's own log line is all that is written."""
    if not enabled or not _is_terminal(sys.stderr):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                file=sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

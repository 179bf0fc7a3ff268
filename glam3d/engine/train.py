"""The training engine: one loop from a laptop CPU to many GPUs on many nodes.

``train(cfg)`` trains any registered 3D segmentation network (or ``"package.module:factory"``) on a preprocessed
dataset and returns a summary dict. The run folder (``cfg.output``) is self-describing::

    RUN/config.yaml          the resolved config
    RUN/split.json           training / validation case ids (carved from the training cases, seeded)
    RUN/train.log            text log;  RUN/log.csv: one row per epoch;  RUN/curves.png: learning curves
    RUN/checkpoints/last.pt  end of the latest epoch (or every train.save_every_iters iterations)
    RUN/checkpoints/best.pt  best mean validation Dice

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

2D natural-image configs (``data.dataset: ade20k | cityscapes | synthetic``, ``cfg.task == "2d"``) go through the
same loop, optimiser, schedule, checkpoints, resume and DDP: images come from
:func:`glam3d.data.natural.build_2d_datasets`, each step's images are a seeded per-epoch permutation sharded over
the ranks with augmentations seeded by ``(seed, epoch, draw)`` (:class:`ImageDraws`); the loss is cross-entropy
(``loss.ignore_index``, 255) over the network's outputs weighted by ``train.deep_supervision`` (UperNet's
``(main, aux)``: ``[1.0, 0.4]``); ``model.pretrained`` loads an ImageNet Swin checkpoint into the backbone
(new / unused keys logged); BatchNorm becomes SyncBatchNorm under DDP on CUDA (``train.sync_bn``); validation is
:func:`glam3d.metrics.miou.evaluate_segmentation` (``val.inference`` whole | slide) with the confusion matrix summed
over ranks, logged as mIoU and per-class IoU (``log.csv`` columns ``val_mIoU``, ``val_iou_<class>``; full tables
in ``RUN/val/miou_epochNNNN.{md,csv,json}``), and ``checkpoints/best.pt`` is the best mIoU.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, config_from_dict, config_to_dict, dump_config, load_config, validate_config
from ..data import datasets as D
from ..data.transforms import train_transforms
from ..errors import UserError
from ..utils.io import atomic_write_json, atomic_write_text, sweep_stale_temps
from . import distributed as dist
from .checkpoint import (UnsafeCheckpoint, load_checkpoint, load_model_weights, rng_state, save_checkpoint,
                         set_rng_state)
from ..inference.precision import cpu_bf16_native
from ..inference.sliding_window import predict_volume
from .logging import RunLogger
from .optim import build_optimizer, build_scheduler, clip_gradients

RUN_FILES = ["config.yaml", "split.json", "train.log", "log.csv", "curves.png", "checkpoints", "tb", "val"]
LOG_COLUMNS_2D = ["epoch", "iteration", "lr", "train_loss", "epoch_time_s", "images_per_s", "val_mIoU", "val_mAcc",
                  "val_aAcc", "best_mIoU"]  # per-class val_iou_<name> columns go before best_mIoU
HALT_ENV = "GLAM3D_TEST_HALT_AT"  # test hook "EPOCH:ITER" (1-based epoch, 0-based iteration): pause there


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


def build_network(mcfg, num_classes: int, in_channels: int) -> torch.nn.Module:
    """A registered variant via ``build_model(name, num_classes=K, **overrides)`` (``in_channels`` added when the
    dataset has a different channel count), or ``"package.module:factory"`` called with
    ``num_classes, in_channels, **overrides``. Sets ``model.glam3d_spec`` so checkpoints can rebuild it."""
    overrides = dict(mcfg.overrides)
    overrides.setdefault("num_classes", num_classes)
    if overrides["num_classes"] != num_classes:
        raise UserError(f"config key 'model.overrides.num_classes' is {overrides['num_classes']} but the dataset "
                        f"has {num_classes} labels")
    name = mcfg.name
    try:
        if ":" in name:
            mod_name, attr = name.split(":", 1)
            try:
                factory = getattr(importlib.import_module(mod_name), attr)
            except (ImportError, AttributeError) as err:
                raise UserError(f"config key 'model.name': cannot import {name!r} ({err})") from None
            overrides.setdefault("in_channels", in_channels)
            model = factory(**overrides)
        else:
            from ..models.registry import build_model

            model = build_model(name, **overrides)
            if getattr(model, "in_channels", in_channels) != in_channels and "in_channels" not in overrides:
                overrides["in_channels"] = in_channels
                model = build_model(name, **overrides)
    except UserError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"config key 'model': cannot build {name!r} ({' '.join(str(err).split())})") from None
    if not hasattr(model, "glam3d_spec") or ":" in name:
        model.glam3d_spec = {"name": name, "kwargs": dict(overrides)}
    return model


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


def build_loss(cfg: Config) -> torch.nn.Module:
    """The training loss of ``cfg``: ``loss.name`` (dice_ce | ce) wrapped for deep supervision (3D) or weighted
    multi-output heads (2D)."""
    base = CrossEntropy(cfg.loss.ignore_index) if cfg.loss.name == "ce" else dice_ce_loss(cfg.loss)
    if cfg.task == "2d":
        return WeightedOutputsLoss(base, cfg.train.deep_supervision)
    return DeepSupervisionLoss(base, cfg.train.deep_supervision)


class ImageDraws(D.SeededDraws):
    """Seeded 2D training draws (the counterpart of :class:`glam3d.data.datasets.PatchDataset`).

    Index ``epoch * len + k`` (see :class:`~glam3d.data.datasets.EpochSampler`) is this rank's ``k``-th draw of
    the epoch. Every epoch walks a permutation of the images seeded by ``(seed, epoch)``, shared by all ranks;
    step ``s`` takes draws ``s*B*W .. (s+1)*B*W - 1`` and rank ``r`` the ``B`` of them from ``(s*W + r)*B``
    (``B`` = batch size per rank, ``W`` = world size), so W ranks see what one process with ``B*W`` images per
    step sees. The augmentation of a draw runs under ``torch.manual_seed(f(seed, epoch, draw))`` inside a forked
    RNG: it does not depend on the worker count, and the global RNG (dropout, drop-path) is left alone.
    """

    def __init__(self, dataset, *, seed: int, batch_size: int, iters_per_epoch: int, rank: int = 0,
                 world_size: int = 1):
        if len(dataset) == 0:
            raise UserError("the 2D training set has no images")
        super().__init__(seed=seed, batch_size=batch_size, iters_per_epoch=iters_per_epoch, rank=rank,
                         world_size=world_size)
        self.dataset = dataset

    def image_index(self, epoch: int, k: int) -> int:
        order = D._epoch_order(self.seed, epoch, len(self.dataset), self.len_per_epoch * self.world_size)
        return int(order[self.draw_index(k)])

    def __getitem__(self, index: int) -> dict:
        epoch, k = divmod(int(index), self.len_per_epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(D._seed(self.seed, epoch, self.draw_index(k), 0x2D))
            item = self.dataset[self.image_index(epoch, k)]
        return {"image": item["image"], "label": item["label"]}


def collate_images(items) -> dict:
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}


def per_class_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of classes ``1..K-1`` for one case (float64, NaN where the class is absent from both)."""
    out = torch.full((num_classes - 1,), float("nan"), dtype=torch.float64)
    pred, truth = pred.reshape(-1).long(), truth.reshape(-1).long()
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        ps, ts = int(p.sum()), int(t.sum())
        if ps + ts:
            out[c - 1] = 2.0 * int((p & t).sum()) / (ps + ts)
    return out


def _predict(model, image, vcfg, roi, device, amp):
    """Validation labels ``(D, H, W)`` uint8 by the same slab-streamed sliding window as ``glam3d predict``."""
    return predict_volume(model, image, roi_size=roi, overlap=vcfg.overlap, sw_batch_size=vcfg.sw_batch_size,
                          mode=vcfg.mode, mirror=vcfg.mirror, device=device, amp=amp)


def _halt_hook(epoch: int, step: int, run_dir: Path) -> None:
    """Test hook: with ``GLAM3D_TEST_HALT_AT=E:I`` write ``RUN/.halted`` at epoch E (1-based), iteration I, and
    wait there (for the test to SIGKILL the process)."""
    spec = os.environ.get(HALT_ENV)
    if not spec:
        return
    e, i = (int(v) for v in spec.split(":"))
    if epoch + 1 == e and step == i:
        atomic_write_text(run_dir / ".halted", f"{e}:{i}\n")
        while True:
            time.sleep(0.5)


def _load_cfg(cfg) -> Config:
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, Path)):
        return load_config(cfg)
    if isinstance(cfg, dict):
        return config_from_dict(cfg)
    raise TypeError(f"train() needs a Config, a dict or a YAML path, got {type(cfg).__name__}")


def has_run(run_dir: Path) -> bool:
    """A folder holds a run once it has a checkpoint (a start that died before its first epoch end does not
    count: there is nothing to keep or resume)."""
    return any((run_dir / "checkpoints" / n).is_file() for n in ("last.pt", "best.pt"))


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------
def train(cfg, *, resume: bool = False, overwrite: bool = False,
          callback: Optional[Callable[[dict], None]] = None, console: bool = True) -> dict:
    """Train per ``cfg`` (a :class:`~glam3d.config.Config`, a plain dict, or a YAML path).

    Args:
        resume: continue the run in ``cfg.output`` from ``checkpoints/last.pt`` (UserError if there is none).
        overwrite: replace a previous run in ``cfg.output`` (otherwise refused with a UserError).
        callback: called on rank 0 after every epoch with that epoch's log row (a dict).
        console: also print log lines to stderr.

    Returns:
        ``{"run_dir", "epochs", "iterations", "best_mean_dice", "best_epoch", "last_val", "final_train_loss",
        "checkpoint_last", "checkpoint_best", "time_s", "world_size", "device", "num_parameters"}``.
    """
    cfg = _load_cfg(cfg)
    validate_config(cfg)
    env = dist.setup(cfg.train.device)
    try:
        with numerics(cfg.train.deterministic, cfg.train.compile), torch.random.fork_rng(
                devices=[env.device] if env.device.type == "cuda" else []):
            return _Trainer(cfg, env, resume=resume, overwrite=overwrite, callback=callback,
                            console=console).run()
    finally:
        dist.cleanup(env)


class _Trainer:
    def __init__(self, cfg: Config, env: dist.DistEnv, *, resume: bool, overwrite: bool, callback, console):
        self.cfg, self.env, self.resume, self.overwrite = cfg, env, resume, overwrite
        self.callback, self.console = callback, console
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        run_dir, last = self.run_dir, self.ckpt_dir / "last.pt"
        if self.resume:
            if not last.is_file() and not last.with_name("last.pt.prev").is_file():
                raise UserError(f"--resume: nothing to resume in {run_dir} (no checkpoints/last.pt)")
        elif has_run(run_dir):
            if not self.overwrite:
                raise UserError(f"{run_dir} already holds a training run; use --resume to continue it, "
                                f"--overwrite to replace it, or --out for another folder")
        dist.barrier(self.env)  # every rank has checked before rank 0 touches anything
        if self.env.is_main:
            ours = (run_dir / "config.yaml").is_file() and (run_dir / "split.json").is_file()
            if not self.resume and (self.overwrite or ours):  # replace a previous run (or one that never saved)
                for name in RUN_FILES:
                    p = run_dir / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for folder in (run_dir, self.ckpt_dir):  # leftovers of a killed writer
                sweep_stale_temps(folder)
        dist.barrier(self.env)

    def _load_resume_state(self):
        """``(state, warning or None)`` from ``checkpoints/last.pt``; when that file is missing, truncated or corrupt
        (e.g. the disk filled up), fall back to ``last.pt.prev`` (the checkpoint before it) with a one-line
        warning. Both bad: the UserError about ``last.pt``."""
        self.resume_path = last = self.ckpt_dir / "last.pt"
        prev = last.with_name("last.pt.prev")
        try:
            return load_checkpoint(last), None
        except UnsafeCheckpoint:
            raise  # code planted in the run folder: stop, do not quietly carry on from another file
        except UserError as err:
            if not prev.is_file():
                raise
            first = err
        try:
            state = load_checkpoint(prev)
        except UserError:
            raise first from None
        self.resume_path = prev
        return state, f"{first}; resuming from the previous checkpoint {prev} instead"

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        t_start = time.time()
        self.is2d = cfg.task == "2d"
        if self.is2d:
            manifest = self._build_2d_data()  # before creating any file
        else:
            manifest = D.read_manifest(cfg.data.root)  # before creating any file
        self._prepare_run_dir()
        resume_state, resume_note = self._load_resume_state() if self.resume else (None, None)
        class_names = D.label_names(manifest)
        K, C = len(class_names), D.in_channels(manifest)
        self.K = K
        log = RunLogger(self.run_dir, [] if self.is2d else class_names[1:], enabled=env.is_main,
                        resume_epoch=int(resume_state["epoch"]) if resume_state else None, console=self.console)
        if self.is2d:  # mIoU and per-class IoU columns instead of Dice
            log.columns = LOG_COLUMNS_2D[:-1] + [f"val_iou_{n}" for n in class_names] + LOG_COLUMNS_2D[-1:]
        self.best_key = "best_miou" if self.is2d else "best_mean_dice"
        self.log = log
        if resume_note:
            log.warning(resume_note)
        try:
            return self._run(manifest, class_names, K, C, resume_state, t_start)
        except BaseException as err:
            if not isinstance(err, (UserError, KeyboardInterrupt)):
                log.info(f"training failed: {type(err).__name__}: {err}")
            raise
        finally:
            log.close()

    def _run(self, manifest, class_names, K, C, resume_state, t_start) -> dict:
        cfg, env, log = self.cfg, self.env, self.log
        tc = cfg.train

        # ---- split (kept from the run folder on resume) ------------------------------------------------------
        split_path = self.run_dir / "split.json"
        if self.is2d:  # the dataset's own training / validation splits
            split = {"task": "2d", "dataset": cfg.data.dataset, "train": [], "val": [],
                     "num_train": len(self.train_ds), "num_val": len(self.val_ds),
                     "data_root": str(Path(cfg.data.root).resolve())}
            if env.is_main:
                atomic_write_json(split_path, split)
                atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        elif self.resume and split_path.is_file():
            import json

            split = json.loads(split_path.read_text())
        else:
            split = D.make_split(D.case_ids(manifest), cfg.data.val_fraction, cfg.data.val_cases, tc.seed)
        if not self.is2d:
            split["data_root"] = str(Path(cfg.data.root).resolve())
            split["test_not_used"] = [D.case_id(e) for e in manifest.get("test", []) if isinstance(e, dict)]
            if env.is_main:
                atomic_write_json(split_path, split)
                atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))

        # ---- numerics, model, optimiser -------------------------------------------------------------------------
        seed_everything(tc.seed)  # identical initial weights on every rank
        model = build_network(cfg.model, K, C)
        if cfg.model.pretrained and resume_state is None:  # ImageNet backbone (then init_checkpoint, if any)
            from ..models.pretrained import load_pretrained

            report = load_pretrained(model, cfg.model.pretrained, verbose=False)
            for line in report.summary().splitlines():
                log.info(line)
        if cfg.model.init_checkpoint and resume_state is None:
            init = load_checkpoint(cfg.model.init_checkpoint, mmap=True)  # its optimiser state is never read
            load_model_weights(model, init["model"], path=cfg.model.init_checkpoint)
            del init
        device = env.device
        if self.is2d and env.distributed and tc.sync_bn and device.type == "cuda":
            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, same keys
                log.info("BatchNorm layers converted to SyncBatchNorm")
        model.to(device)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, tc.iters_per_epoch, tc.epochs)
        # bf16 autocast runs on CPU and GPU; fp16 (with a grad scaler) is a CUDA-only path
        amp = tc.amp if device.type == "cuda" or tc.amp == "bf16" else "none"
        amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        n_params = sum(p.numel() for p in model.parameters())

        start_epoch, start_step, global_it = 0, 0, 0
        best, best_epoch, last_val = float("-inf"), 0, {}
        partial = {"loss_sum": 0.0, "n": 0, "time": 0.0}
        if resume_state is not None:
            st = resume_state
            ckpt = self.resume_path
            if st.get("model_spec", {}).get("name") != model.glam3d_spec["name"]:
                raise UserError(f"checkpoint was trained with network {st.get('model_spec', {}).get('name')!r}, "
                                f"the config asks for {model.glam3d_spec['name']!r}", ckpt)
            load_model_weights(model, st["model"], path=ckpt)
            try:
                optimizer.load_state_dict(st["optimizer"])
                scheduler.load_state_dict(st["scheduler"])
            except (ValueError, KeyError, RuntimeError) as err:
                raise UserError(f"cannot restore the optimiser state ({err}); was optim changed?", ckpt) from None
            if scaler is not None and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            start_epoch, start_step = int(st["epoch"]), int(st.get("epoch_iteration", 0))
            global_it = int(st["iteration"])
            m = st.get("metrics", {})
            best, best_epoch = float(m.get(self.best_key, float("-inf"))), int(m.get("best_epoch", 0))
            last_val = dict(m.get("last_val", {}))
            partial = dict(st.get("partial_epoch", partial)) if start_step else partial
            ranks = st.get("rng_ranks")
            if ranks is not None and len(ranks) == env.world_size:
                set_rng_state(ranks[env.rank])
            elif env.world_size == 1:
                set_rng_state(st["rng"])
            else:
                log.warning("world size changed since the checkpoint: RNG streams reseeded")
                seed_everything(tc.seed + 1000 * env.rank + start_epoch)
            if start_epoch >= tc.epochs:
                log.info(f"run already finished ({start_epoch} epochs); raise train.epochs to continue")
        else:
            seed_everything(tc.seed + 1000 * env.rank)  # per-rank streams (dropout, drop-path)

        net = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            find_unused = tc.find_unused_parameters
            if not find_unused:
                unused = _unused_parameters(model, C, cfg.data.crop_size if self.is2d else cfg.data.roi_size, device,
                                            tc.deep_supervision, batch=2 if self.is2d else 1)
                if unused:
                    log.info(f"{len(unused)} parameter tensors (e.g. {unused[0]}) get no gradient from the loss: "
                             f"DDP runs with find_unused_parameters=True")
                    find_unused = True
            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=find_unused)
        if tc.compile:
            from .compile import compile_network

            net = compile_network(net, inference=False, device=device)

        # ---- data -----------------------------------------------------------------------------------------------
        if self.is2d:
            ds = ImageDraws(self.train_ds, seed=tc.seed, batch_size=cfg.data.batch_size,
                            iters_per_epoch=tc.iters_per_epoch, rank=env.rank, world_size=env.world_size)
            collate = collate_images
            val_cases = self.val_ds if len(self.val_ds) else None
        else:
            train_entries = D.case_entries(cfg.data.root, manifest, split["train"])
            val_ids = split["val"][: cfg.val.max_cases] if cfg.val.max_cases else split["val"]
            val_entries = D.case_entries(cfg.data.root, manifest, val_ids)[env.rank::env.world_size]
            cases = D.CaseCache(train_entries, cache=cfg.data.cache, workers=cfg.data.workers)
            if cfg.data.cache == "memory":
                D.check_label_range(cases, K, Path(cfg.data.root) / "dataset.json")
            ds = D.PatchDataset(cases, train_transforms(cfg.data), seed=tc.seed, batch_size=cfg.data.batch_size,
                                iters_per_epoch=tc.iters_per_epoch, num_samples=cfg.data.num_samples,
                                rank=env.rank, world_size=env.world_size)
            collate = D.collate_patches
            val_cases = D.validation_volumes(val_entries, cache=cfg.data.cache) if val_entries or split["val"] else None
        sampler = D.EpochSampler(ds)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(tc.seed))
        loss_fn = build_loss(cfg)

        if self.is2d:
            log.info(f"glam3d train: {model.glam3d_spec['name']} ({n_params / 1e6:.2f} M parameters) on {device}"
                     f"{f' x {env.world_size} ranks ({env.backend})' if env.distributed else ''}; "
                     f"{cfg.data.dataset} at {cfg.data.root}: {len(self.train_ds)} training / {len(self.val_ds)} "
                     f"validation images, {K} classes; {tc.epochs} epochs x {tc.iters_per_epoch} iterations x "
                     f"{cfg.data.batch_size * env.world_size} crops {list(cfg.data.crop_size)}; loss ce "
                     f"{list(tc.deep_supervision) or [1.0]}; val {cfg.val.inference}; amp {amp}; "
                     f"output {self.run_dir}")
        else:
            log.info(f"glam3d train: {model.glam3d_spec['name']} ({n_params / 1e6:.2f} M parameters) on {device}"
                     f"{f' x {env.world_size} ranks ({env.backend})' if env.distributed else ''}; "
                     f"{len(split['train'])} training / {len(split['val'])} validation cases of {cfg.data.root}; "
                     f"{tc.epochs} epochs x {tc.iters_per_epoch} iterations x "
                     f"{cfg.data.batch_size * cfg.data.num_samples * env.world_size} patches "
                     f"{list(cfg.data.roi_size)}; amp {amp}; output {self.run_dir}")
        if self.resume:
            log.info(f"resuming from epoch {start_epoch + 1}, iteration {start_step} (step {global_it})")
        if tc.amp != amp:
            log.info(f"train.amp={tc.amp} applies on CUDA only: training in float32 on {device}")
        elif amp == "bf16" and device.type == "cpu" and not cpu_bf16_native():
            log.info("train.amp=bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): emulated, slower than "
                     "float32 here (train.amp=none)")

        # ---- loop -----------------------------------------------------------------------------------------------
        patches_per_step = cfg.data.batch_size * (1 if self.is2d else cfg.data.num_samples)
        warned_ds = False
        final_loss = float("nan")
        for epoch in range(start_epoch, tc.epochs):
            sampler.set_epoch(epoch, start_step * cfg.data.batch_size)
            net.train()
            loss_sum, n_seen, t_prev = float(partial["loss_sum"]), int(partial["n"]), float(partial["time"])
            t0 = time.time()
            bar = _progress(tc.iters_per_epoch, start_step, f"epoch {epoch + 1}/{tc.epochs}",
                            enabled=env.is_main and tc.progress)
            step = start_step
            for step, batch in enumerate(loader, start=start_step):
                _halt_hook(epoch, step, self.run_dir)
                image = batch["image"].to(device, non_blocking=True)
                label = batch["label"].to(device, non_blocking=True).long()
                optimizer.zero_grad(set_to_none=True)
                with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
                    out = net(image)
                if not warned_ds:
                    warned_ds = True
                    self._check_output(out, K, tc.deep_supervision)
                loss = loss_fn(out, label)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    clip_gradients(model.parameters(), cfg.optim.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    clip_gradients(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                scheduler.step()
                global_it += 1
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    log.warning(f"non-finite loss at epoch {epoch + 1} iteration {step}")
                loss_sum += lv
                n_seen += 1
                if bar is not None:
                    el = time.time() - t0
                    bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}",
                                    patch_s=f"{(step + 1 - start_step) * patches_per_step * env.world_size / max(el, 1e-9):.1f}",
                                    refresh=False)
                    bar.update(1)
                if tc.save_every_iters and global_it % tc.save_every_iters == 0 and step + 1 < tc.iters_per_epoch:
                    self._save("last.pt", model, optimizer, scheduler, scaler, epoch, step + 1, global_it,
                               best, best_epoch, last_val, manifest,
                               partial={"loss_sum": loss_sum, "n": n_seen, "time": t_prev + time.time() - t0})
            if bar is not None:
                bar.close()
            epoch_time = t_prev + time.time() - t0
            stats = dist.all_reduce_sum(torch.tensor([loss_sum, float(n_seen)], dtype=torch.float64), env)
            train_loss = float(stats[0] / max(stats[1], 1))
            final_loss = train_loss
            n_steps = tc.iters_per_epoch
            row = {"epoch": epoch + 1, "iteration": global_it, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": train_loss, "epoch_time_s": epoch_time,
                   "patches_per_s": (n_steps - start_step) * patches_per_step * env.world_size
                   / max(time.time() - t0, 1e-9)}
            if self.is2d:
                row["images_per_s"] = row["patches_per_s"]
            val_due = val_cases is not None and tc.val_every > 0 and (
                (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs)
            improved = False
            if val_due and self.is2d:
                tv = time.time()
                last_val = self._validate_2d(model, val_cases, class_names, amp, epoch + 1)
                row.update({"val_mIoU": last_val["mIoU"], "val_mAcc": last_val["mAcc"], "val_aAcc": last_val["aAcc"]})
                row.update({f"val_iou_{n}": v for n, v in last_val["iou"].items()})
                if math.isfinite(last_val["mIoU"]) and last_val["mIoU"] > best:
                    best, best_epoch, improved = last_val["mIoU"], epoch + 1, True
                row["val_time_s"] = time.time() - tv
            elif val_due:
                tv = time.time()
                last_val = self._validate(model, val_cases, class_names, amp)
                last_val["epoch"] = epoch + 1
                row["val_mean_dice"] = last_val["mean_dice"]
                for name in class_names[1:]:
                    row[f"val_dice_{name}"] = last_val["dice"].get(name, float("nan"))
                if math.isfinite(last_val["mean_dice"]) and last_val["mean_dice"] > best:
                    best, best_epoch, improved = last_val["mean_dice"], epoch + 1, True
                row["val_time_s"] = time.time() - tv
            row["best_mIoU" if self.is2d else "best_mean_dice"] = best if best_epoch else float("nan")
            self._save("last.pt", model, optimizer, scheduler, scaler, epoch + 1, 0, global_it, best, best_epoch,
                       last_val, manifest)
            if improved and env.is_main:
                shutil.copyfile(self.ckpt_dir / "last.pt", self.ckpt_dir / ".best.pt.tmp")
                os.replace(self.ckpt_dir / ".best.pt.tmp", self.ckpt_dir / "best.pt")
            msg = (f"epoch {epoch + 1}/{tc.epochs}  loss {train_loss:.4f}  lr {row['lr']:.2e}  "
                   f"{epoch_time:.1f} s ({row['patches_per_s']:.1f} "
                   f"{'images' if self.is2d else 'patches'}/s)")
            if val_due and self.is2d:
                msg += (f"  | val mIoU {100 * last_val['mIoU']:.2f} mAcc {100 * last_val['mAcc']:.2f} aAcc "
                        f"{100 * last_val['aAcc']:.2f} (best mIoU {100 * best:.2f} @ epoch {best_epoch})  IoU: "
                        + " ".join(f"{k} {100 * v:.1f}" for k, v in last_val["iou"].items()))
            elif val_due:
                msg += (f"  | val mean Dice {last_val['mean_dice']:.4f} (best {best:.4f} @ epoch {best_epoch})  "
                        + " ".join(f"{k} {v:.3f}" for k, v in last_val["dice"].items()))
            log.info(msg)
            if env.is_main:
                log.log_epoch(row)
                if (val_due or epoch + 1 == tc.epochs) and not self.is2d:  # curves.png plots Dice (3D)
                    log.plot()
                if self.callback is not None:
                    self.callback(dict(row))
            start_step, partial = 0, {"loss_sum": 0.0, "n": 0, "time": 0.0}

        dist.barrier(env)
        summary = {
            "run_dir": str(self.run_dir), "epochs": tc.epochs, "iterations": global_it,
            "best_mean_dice": best if best_epoch else None, "best_epoch": best_epoch or None,
            "last_val": last_val, "final_train_loss": final_loss,
            "checkpoint_last": str(self.ckpt_dir / "last.pt"),
            "checkpoint_best": str(self.ckpt_dir / "best.pt") if (self.ckpt_dir / "best.pt").exists() else None,
            "time_s": time.time() - t_start, "world_size": env.world_size, "device": str(device),
            "num_parameters": n_params, "rank": env.rank, "split": {"train": split["train"], "val": split["val"]},
        }
        if self.is2d:
            summary.update({"task": "2d", "best_mean_dice": None, "best_miou": best if best_epoch else None,
                            "split": {"num_train": len(self.train_ds), "num_val": len(self.val_ds)}})
            log.info(f"done: {global_it} iterations in {summary['time_s']:.1f} s; best val mIoU "
                     f"{f'{100 * best:.2f} (epoch {best_epoch})' if best_epoch else 'n/a'}; "
                     f"checkpoints in {self.ckpt_dir}")
            return summary
        log.info(f"done: {global_it} iterations in {summary['time_s']:.1f} s; best mean val Dice "
                 f"{summary['best_mean_dice'] if summary['best_mean_dice'] is not None else 'n/a'}; "
                 f"checkpoints in {self.ckpt_dir}")
        return summary

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _build_2d_data(self) -> dict:
        """Build ``self.train_ds`` / ``self.val_ds`` (:func:`glam3d.data.natural.build_2d_datasets`; rank 0 first,
        so only it writes a synthetic set) and return a dataset.json-like manifest for the checkpoints."""
        import dataclasses

        from ..data.natural import build_2d_datasets

        cfg, env = self.cfg, self.env
        data = dataclasses.asdict(cfg.data)
        num_classes = cfg.model.overrides.get("num_classes")
        if env.is_main:
            self.train_ds, self.val_ds, names = build_2d_datasets(data)
        dist.barrier(env)
        if not env.is_main:
            self.train_ds, self.val_ds, names = build_2d_datasets(data)
        if num_classes is not None and int(num_classes) != len(names):
            raise UserError(f"config key 'model.overrides.num_classes' is {num_classes} but the {cfg.data.dataset} "
                            f"data at {cfg.data.root} has {len(names)} classes")
        return {"labels": {str(i): n for i, n in enumerate(names)}, "modality": {"0": "R", "1": "G", "2": "B"},
                "plan": {"task": "2d", "dataset": cfg.data.dataset, "mean": list(cfg.data.mean),
                         "std": list(cfg.data.std), "test_scale": cfg.data.test_scale,
                         "ignore_index": cfg.loss.ignore_index,
                         "reduce_zero_label": cfg.data.reduce_zero_label}}

    @torch.no_grad()
    def _validate_2d(self, model, val_ds, class_names, amp, epoch: int) -> dict:
        """mIoU over the validation images (sharded over ranks, confusion matrices summed); rank 0 writes the
        per-class table to ``RUN/val/miou_epochNNNN.{md,csv,json}``."""
        from ..metrics.miou import evaluate_segmentation, metrics_from_confusion, write_miou_report

        cfg, env, K = self.cfg, self.env, self.K
        n = min(len(val_ds), cfg.val.max_cases) if cfg.val.max_cases else len(val_ds)
        shard = torch.utils.data.Subset(val_ds, range(env.rank, n, env.world_size))
        items = shard
        if cfg.data.workers > 0 and len(shard):
            items = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=cfg.data.workers)
        crop = list(cfg.val.roi_size or cfg.data.crop_size)
        stride = [max(1, int(round(c * (1.0 - cfg.val.overlap)))) for c in crop]
        amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        with (torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
            cm = evaluate_segmentation(model, items, K, ignore_index=cfg.loss.ignore_index, mode=cfg.val.inference,
                                       crop_size=crop, stride=stride, flip=cfg.val.mirror, device=env.device)
        matrix = dist.all_reduce_sum(torch.from_numpy(cm.matrix), env).numpy()
        metrics = metrics_from_confusion(matrix, class_names)
        if env.is_main:
            write_miou_report(self.run_dir / "val", metrics, name=f"miou_epoch{epoch:04d}",
                              title=f"{cfg.name or 'run'}: validation after epoch {epoch}",
                              extra={"epoch": epoch, "inference": cfg.val.inference, "images": n},
                              print_table=False)
        return {"epoch": epoch, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"],
                "iou": {c["name"]: c["IoU"] for c in metrics["per_class"]}}

    def _check_output(self, out, K: int, ds_weights) -> None:
        first = out if isinstance(out, torch.Tensor) else out[0]
        if first.shape[1] != K:
            raise UserError(f"network {self.cfg.model.name!r} outputs {first.shape[1]} channels but the dataset has "
                            f"{K} labels (model.overrides.num_classes?)")
        n = 1 if isinstance(out, torch.Tensor) else len(out)
        if ds_weights and n != len(ds_weights):
            self.log.warning(f"train.deep_supervision has {len(ds_weights)} weights but the network returns {n} "
                             f"output(s): using the first {min(n, len(ds_weights))}")

    @torch.no_grad()
    def _validate(self, model, val_cases, class_names, amp) -> dict:
        cfg, env, K = self.cfg, self.env, self.K
        was_training = model.training
        model.eval()
        sums = torch.zeros(K - 1, dtype=torch.float64)
        counts = torch.zeros(K - 1, dtype=torch.float64)
        roi = list(cfg.val.roi_size or cfg.data.roi_size)
        per_case = {}
        for i in range(len(val_cases)):
            item = val_cases[i]
            pred = _predict(model, item["image"].float(), cfg.val, roi, env.device, amp)
            d = per_class_dice(pred.cpu(), item["label"][0], K)
            per_case[item["id"]] = [None if math.isnan(v) else round(float(v), 6) for v in d]
            ok = ~torch.isnan(d)
            sums[ok] += d[ok]
            counts[ok] += 1
        both = dist.all_reduce_sum(torch.cat([sums, counts]), env)
        sums, counts = both[: K - 1], both[K - 1:]
        dice = {name: (float(sums[c] / counts[c]) if counts[c] > 0 else float("nan"))
                for c, name in enumerate(class_names[1:])}
        vals = [v for v in dice.values() if not math.isnan(v)]
        model.train(was_training)
        return {"mean_dice": float(np.mean(vals)) if vals else float("nan"), "dice": dice}

    def _save(self, name, model, optimizer, scheduler, scaler, epoch, epoch_iteration, global_it, best, best_epoch,
              last_val, manifest, partial=None) -> None:
        env = self.env
        rng = rng_state()
        ranks = dist.all_gather_object(rng, env) if env.distributed else None
        if not env.is_main:
            return
        state = {
            "model_spec": dict(model.glam3d_spec),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": int(epoch), "epoch_iteration": int(epoch_iteration), "iteration": int(global_it),
            "rng": rng,
            "config": config_to_dict(self.cfg),
            "plan": manifest.get("plan", {}),
            "labels": manifest["labels"],
            "metrics": {self.best_key: best if best_epoch else float("-inf"), "best_epoch": best_epoch,
                        "last_val": last_val},
            "world_size": env.world_size,
        }
        if ranks is not None:
            state["rng_ranks"] = ranks
        if partial is not None:
            state["partial_epoch"] = partial
        save_checkpoint(self.ckpt_dir / name, state, keep_previous=(name == "last.pt"))


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
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)

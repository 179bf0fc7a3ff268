"""Training tasks: what differs between 3D volume segmentation and 2D natural-image segmentation.

The :class:`~glam3d.engine.train.Trainer` runs one loop (optimiser, schedule, AMP, checkpoints, resume, DDP) and
asks its :class:`Task` everything that depends on the kind of data: how to read the dataset and split it, what a
training batch holds and how it is drawn, the loss, how to validate and which score picks ``best.pt``, and the
words of the log.

* :class:`VolumeTask` (``cfg.task == "3d"``): preprocessed NIfTI cases (``dataset.json``); a validation split
  carved from the training cases; patches drawn per ``(seed, epoch, draw)`` (:class:`~glam3d.data.datasets.
  PatchDataset`); Dice + CE over the deep-supervision outputs; validation by the same slab-streamed sliding
  window as ``glam3d predict``, scored by the mean Dice over the foreground classes.
* :class:`ImageTask` (``cfg.task == "2d"``): ADE20K / Cityscapes / synthetic images
  (:func:`glam3d.data.natural.build_2d_datasets`) and their own splits; seeded per-epoch permutations of the
  images (:class:`ImageDraws`); cross-entropy over weighted heads; mIoU from a confusion matrix summed over ranks.

A new kind of task subclasses :class:`Task` and is chosen in :func:`task_for`.

Example::

    task = task_for(cfg, env)
    manifest = task.read_data()                  # before any file of the run is written
    loss_fn = task.build_loss()
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config
from ..data import datasets as D
from ..data.transforms import train_transforms
from ..errors import UserError
from ..inference.sliding_window import predict_volume
from . import distributed as dist
from .losses import CrossEntropy, DeepSupervisionLoss, WeightedOutputsLoss, dice_ce_loss

__all__ = ["Task", "VolumeTask", "ImageTask", "task_for", "ImageDraws", "collate_images", "per_class_dice",
           "LOG_COLUMNS_2D"]

LOG_COLUMNS_2D = ["epoch", "iteration", "lr", "train_loss", "epoch_time_s", "images_per_s", "nonfinite_steps",
                  "val_mIoU", "val_mAcc", "val_aAcc", "best_mIoU"]  # per-class val_iou_<name> before best_mIoU
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def task_for(cfg: Config, env: dist.DistEnv) -> "Task":
    """The task of ``cfg``: :class:`ImageTask` for a 2D natural-image dataset, else :class:`VolumeTask`."""
    return ImageTask(cfg, env) if cfg.task == "2d" else VolumeTask(cfg, env)


class Task:
    """The data-dependent half of a training run (see the module docstring). Subclasses set the class attributes
    and implement the methods that raise ``NotImplementedError`` here."""

    name = ""
    #: the checkpoint's ``metrics`` key of the best validation score, and its ``log.csv`` column
    best_key = ""
    best_column = ""
    #: what one training sample is called in the log ("patches", "images")
    unit = ""
    #: whether ``curves.png`` is drawn (it plots Dice)
    plots_curves = False

    def __init__(self, cfg: Config, env: dist.DistEnv):
        self.cfg, self.env = cfg, env

    # -- data -------------------------------------------------------------------------------------------------------
    def read_data(self) -> dict:
        """Read (or build) the dataset and return its ``dataset.json``-like manifest (``labels``, ``modality``,
        ``plan``); called before any file of the run is written, so bad data fails early."""
        raise NotImplementedError

    def log_class_names(self, class_names: list) -> list:
        """The classes :class:`~glam3d.engine.logging.RunLogger` makes ``val_dice_<name>`` columns for."""
        return []

    def log_columns(self, class_names: list) -> Optional[list]:
        """The ``log.csv`` columns, or None for the logger's own (Dice)."""
        return None

    def make_split(self, trainer, manifest: dict) -> dict:
        """The ``split.json`` of the run: ``train`` and ``val`` (case ids, or empty lists) and what else
        describes where the data came from."""
        raise NotImplementedError

    def note_small_cases(self, trainer) -> None:
        """Say (one log line) which cases are smaller than the training window, and what is done with them."""

    def adapt_model(self, model: torch.nn.Module, log) -> torch.nn.Module:
        """The network as trained (e.g. SyncBatchNorm under DDP); the same parameters and keys."""
        return model

    def probe_input(self) -> tuple:
        """``(spatial size, batch)`` of the zero batch that finds parameters outside the loss graph (DDP)."""
        raise NotImplementedError

    def build_data(self, manifest: dict, split: dict, num_classes: int) -> tuple:
        """``(training dataset, collate function, validation set or None)``. The training dataset follows
        :class:`~glam3d.data.datasets.SeededDraws` (an :class:`~glam3d.data.datasets.EpochSampler` walks it);
        a batch is a dict ``{"image": (B, C, *S) float, "label": (B, [1,] *S) integer}``."""
        raise NotImplementedError

    def samples_per_step(self) -> int:
        """Training samples (patches, images) one rank sees per step."""
        raise NotImplementedError

    # -- loss and validation --------------------------------------------------------------------------------------
    def base_loss(self) -> torch.nn.Module:
        lcfg = self.cfg.loss
        return CrossEntropy(lcfg.ignore_index) if lcfg.name == "ce" else dice_ce_loss(lcfg)

    def build_loss(self) -> torch.nn.Module:
        """The training loss over the network's outputs and a batch's ``label``."""
        raise NotImplementedError

    def validate(self, trainer, model: torch.nn.Module, val_set, class_names: list, amp: str, epoch: int) -> dict:
        """Validation metrics after ``epoch`` (1-based), the same on every rank (sums reduced over ranks)."""
        raise NotImplementedError

    def score(self, metrics: dict) -> float:
        """The validation score that picks ``best.pt`` (higher is better)."""
        raise NotImplementedError

    def val_row(self, metrics: dict, class_names: list) -> dict:
        """The ``log.csv`` columns of the validation metrics."""
        raise NotImplementedError

    def val_message(self, metrics: dict, best: float, best_epoch: int) -> str:
        """What the epoch's log line adds about validation."""
        raise NotImplementedError

    # -- words ----------------------------------------------------------------------------------------------------
    def describe_data(self, split: dict, num_classes: int) -> str:
        """The data part of the run's first log line."""
        raise NotImplementedError

    def train_row(self, row: dict) -> None:
        """Add task-specific training columns to an epoch's row (in place)."""

    def finish_summary(self, summary: dict, best: float, best_epoch: int) -> None:
        """Adjust the summary :func:`~glam3d.engine.train.train` returns (in place)."""

    def best_text(self, summary: dict, best: float, best_epoch: int) -> str:
        """The best score, as the run's last log line says it."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# 3D volumes
# ----------------------------------------------------------------------------------------------------------------
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


class VolumeTask(Task):
    """3D segmentation of preprocessed volumes (see the module docstring)."""

    name = "3d"
    best_key = "best_mean_dice"
    best_column = "best_mean_dice"
    unit = "patches"
    plots_curves = True

    def read_data(self) -> dict:
        return D.read_manifest(self.cfg.data.root)

    def log_class_names(self, class_names: list) -> list:
        return class_names[1:]

    def make_split(self, trainer, manifest: dict) -> dict:
        """``split.json``: kept from the run folder on resume; a cross-validation fold's
        (:func:`glam3d.engine.crossval.fold_split`, ``data.fold``); else carved from the training cases
        (``data.val_fraction`` / ``data.val_cases``, seeded)."""
        cfg = self.cfg
        split_path = trainer.run_dir / "split.json"
        if trainer.resume and split_path.is_file():  # kept from the run folder on resume
            split = json.loads(split_path.read_text())
        elif cfg.data.fold is not None:
            from .crossval import fold_split

            split = fold_split(cfg, manifest, trainer.log, self.env)
        else:
            split = D.make_split(D.case_ids(manifest), cfg.data.val_fraction, cfg.data.val_cases, cfg.train.seed)
        split["data_root"] = str(Path(cfg.data.root).resolve())
        split["test_not_used"] = [D.case_id(e) for e in manifest.get("test", []) if isinstance(e, dict)]
        return split

    def probe_input(self) -> tuple:
        return self.cfg.data.roi_size, 1

    def build_data(self, manifest: dict, split: dict, num_classes: int) -> tuple:
        cfg, env, tc = self.cfg, self.env, self.cfg.train
        train_entries = D.case_entries(cfg.data.root, manifest, split["train"])
        val_ids = split["val"][: cfg.val.max_cases] if cfg.val.max_cases else split["val"]
        val_entries = D.case_entries(cfg.data.root, manifest, val_ids)[env.rank::env.world_size]
        cases = D.CaseCache(train_entries, cache=cfg.data.cache, workers=cfg.data.workers)
        if cfg.data.cache == "memory":
            D.check_label_range(cases, num_classes, Path(cfg.data.root) / "dataset.json")
        ds = D.PatchDataset(cases, train_transforms(cfg.data), seed=tc.seed, batch_size=cfg.data.batch_size,
                            iters_per_epoch=tc.iters_per_epoch, num_samples=cfg.data.num_samples,
                            rank=env.rank, world_size=env.world_size)
        val = D.validation_volumes(val_entries, cache=cfg.data.cache) if val_entries or split["val"] else None
        return ds, D.collate_patches, val

    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.num_samples

    def note_small_cases(self, trainer) -> None:
        """Cases smaller than ``data.roi_size`` on some axis (read from their archives' headers) are trained on
        zero-padded patches (the padding labelled background) and validated by windows zero-padded the same way,
        as ``glam3d predict`` pads a scan smaller than its window: one note names them."""
        if not self.env.is_main:
            return
        roi = list(self.cfg.data.roi_size)
        ids = list(trainer.split["train"]) + list(trainer.split["val"])
        small = []
        for e in D.case_entries(self.cfg.data.root, trainer.manifest, ids):
            shape = D.case_shape(e["image"])
            if shape is not None and any(s < r for s, r in zip(shape[-3:], roi)):
                small.append(f"{e['id']} {'x'.join(str(v) for v in shape[-3:])}")
        if small:
            more = f" and {len(small) - 3} more" if len(small) > 3 else ""
            trainer.log.info(f"note: {len(small)} case(s) smaller than data.roi_size {'x'.join(map(str, roi))} on "
                             f"some axis ({', '.join(small[:3])}{more}): their patches are zero-padded (labelled "
                             f"background), as predict pads a scan smaller than its window")

    def build_loss(self) -> torch.nn.Module:
        return DeepSupervisionLoss(self.base_loss(), self.cfg.train.deep_supervision)

    @torch.no_grad()
    def validate(self, trainer, model, val_set, class_names, amp, epoch) -> dict:
        """Mean Dice over the validation cases (sharded over ranks, sums all-reduced), each segmented whole by
        the sliding window."""
        cfg, env, K = self.cfg, self.env, trainer.K
        was_training = model.training
        model.eval()
        sums = torch.zeros(K - 1, dtype=torch.float64)
        counts = torch.zeros(K - 1, dtype=torch.float64)
        roi = list(cfg.val.roi_size or cfg.data.roi_size)
        per_case = {}
        for i in range(len(val_set)):
            item = val_set[i]
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
        return {"mean_dice": float(np.mean(vals)) if vals else float("nan"), "dice": dice, "epoch": epoch}

    def score(self, metrics: dict) -> float:
        return metrics["mean_dice"]

    def val_row(self, metrics: dict, class_names: list) -> dict:
        row = {"val_mean_dice": metrics["mean_dice"]}
        for name in class_names[1:]:
            row[f"val_dice_{name}"] = metrics["dice"].get(name, float("nan"))
        return row

    def val_message(self, metrics: dict, best: float, best_epoch: int) -> str:
        return (f"  | val mean Dice {metrics['mean_dice']:.4f} (best {best:.4f} @ epoch {best_epoch})  "
                + " ".join(f"{k} {v:.3f}" for k, v in metrics["dice"].items()))

    def describe_data(self, split: dict, num_classes: int) -> str:
        cfg, tc = self.cfg, self.cfg.train
        return (f"{len(split['train'])} training / {len(split['val'])} validation cases of {cfg.data.root}; "
                f"{tc.epochs} epochs x {tc.iters_per_epoch} iterations x "
                f"{cfg.data.batch_size * cfg.data.num_samples * self.env.world_size} patches "
                f"{list(cfg.data.roi_size)}")

    def best_text(self, summary: dict, best: float, best_epoch: int) -> str:
        return (f"best mean val Dice "
                f"{summary['best_mean_dice'] if summary['best_mean_dice'] is not None else 'n/a'}")


# ----------------------------------------------------------------------------------------------------------------
# 2D images
# ----------------------------------------------------------------------------------------------------------------
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


class ImageTask(Task):
    """2D segmentation of natural images (see the module docstring)."""

    name = "2d"
    best_key = "best_miou"
    best_column = "best_mIoU"
    unit = "images"
    plots_curves = False

    def read_data(self) -> dict:
        """Build ``self.train_ds`` / ``self.val_ds`` (:func:`glam3d.data.natural.build_2d_datasets`; rank 0
        first, so only it writes a synthetic set) and return a dataset.json-like manifest for the checkpoints."""
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

    def log_columns(self, class_names: list) -> list:
        """mIoU and per-class IoU columns instead of Dice."""
        return LOG_COLUMNS_2D[:-1] + [f"val_iou_{n}" for n in class_names] + LOG_COLUMNS_2D[-1:]

    def make_split(self, trainer, manifest: dict) -> dict:
        """The dataset's own training / validation splits."""
        cfg = self.cfg
        return {"task": "2d", "dataset": cfg.data.dataset, "train": [], "val": [],
                "num_train": len(self.train_ds), "num_val": len(self.val_ds),
                "data_root": str(Path(cfg.data.root).resolve())}

    def adapt_model(self, model, log):
        """BatchNorm -> SyncBatchNorm under DDP on CUDA (``train.sync_bn``), as mmseg trains UperNet."""
        if self.env.distributed and self.cfg.train.sync_bn and self.env.device.type == "cuda":
            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, same keys
                log.info("BatchNorm layers converted to SyncBatchNorm")
        return model

    def probe_input(self) -> tuple:
        return self.cfg.data.crop_size, 2  # BatchNorm after global pooling (UperNet) needs two samples

    def build_data(self, manifest: dict, split: dict, num_classes: int) -> tuple:
        cfg, env, tc = self.cfg, self.env, self.cfg.train
        ds = ImageDraws(self.train_ds, seed=tc.seed, batch_size=cfg.data.batch_size,
                        iters_per_epoch=tc.iters_per_epoch, rank=env.rank, world_size=env.world_size)
        return ds, collate_images, (self.val_ds if len(self.val_ds) else None)

    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size

    def build_loss(self) -> torch.nn.Module:
        return WeightedOutputsLoss(self.base_loss(), self.cfg.train.deep_supervision)

    @torch.no_grad()
    def validate(self, trainer, model, val_set, class_names, amp, epoch) -> dict:
        """mIoU over the validation images (sharded over ranks, confusion matrices summed); rank 0 writes the
        per-class table to ``RUN/val/miou_epochNNNN.{md,csv,json}``."""
        from ..metrics.miou import evaluate_segmentation, metrics_from_confusion, write_miou_report

        cfg, env, K = self.cfg, self.env, trainer.K
        n = min(len(val_set), cfg.val.max_cases) if cfg.val.max_cases else len(val_set)
        shard = torch.utils.data.Subset(val_set, range(env.rank, n, env.world_size))
        items = shard
        if cfg.data.workers > 0 and len(shard):
            items = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=cfg.data.workers)
        crop = list(cfg.val.roi_size or cfg.data.crop_size)
        stride = [max(1, int(round(c * (1.0 - cfg.val.overlap)))) for c in crop]
        amp_dtype = AMP_DTYPES[amp]
        with (torch.autocast(env.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
            cm = evaluate_segmentation(model, items, K, ignore_index=cfg.loss.ignore_index, mode=cfg.val.inference,
                                       crop_size=crop, stride=stride, flip=cfg.val.mirror, device=env.device)
        matrix = dist.all_reduce_sum(torch.from_numpy(cm.matrix), env).numpy()
        metrics = metrics_from_confusion(matrix, class_names)
        if env.is_main:
            write_miou_report(trainer.run_dir / "val", metrics, name=f"miou_epoch{epoch:04d}",
                              title=f"{cfg.name or 'run'}: validation after epoch {epoch}",
                              extra={"epoch": epoch, "inference": cfg.val.inference, "images": n},
                              print_table=False)
        return {"epoch": epoch, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"],
                "iou": {c["name"]: c["IoU"] for c in metrics["per_class"]}}

    def score(self, metrics: dict) -> float:
        return metrics["mIoU"]

    def val_row(self, metrics: dict, class_names: list) -> dict:
        row = {"val_mIoU": metrics["mIoU"], "val_mAcc": metrics["mAcc"], "val_aAcc": metrics["aAcc"]}
        row.update({f"val_iou_{n}": v for n, v in metrics["iou"].items()})
        return row

    def val_message(self, metrics: dict, best: float, best_epoch: int) -> str:
        return (f"  | val mIoU {100 * metrics['mIoU']:.2f} mAcc {100 * metrics['mAcc']:.2f} aAcc "
                f"{100 * metrics['aAcc']:.2f} (best mIoU {100 * best:.2f} @ epoch {best_epoch})  IoU: "
                + " ".join(f"{k} {100 * v:.1f}" for k, v in metrics["iou"].items()))

    def describe_data(self, split: dict, num_classes: int) -> str:
        cfg, tc = self.cfg, self.cfg.train
        return (f"{cfg.data.dataset} at {cfg.data.root}: {len(self.train_ds)} training / {len(self.val_ds)} "
                f"validation images, {num_classes} classes; {tc.epochs} epochs x {tc.iters_per_epoch} iterations x "
                f"{cfg.data.batch_size * self.env.world_size} crops {list(cfg.data.crop_size)}; loss ce "
                f"{list(tc.deep_supervision) or [1.0]}; val {cfg.val.inference}")

    def train_row(self, row: dict) -> None:
        row["images_per_s"] = row["patches_per_s"]

    def finish_summary(self, summary: dict, best: float, best_epoch: int) -> None:
        summary.update({"task": "2d", "best_mean_dice": None, "best_miou": best if best_epoch else None,
                        "split": {"num_train": len(self.train_ds), "num_val": len(self.val_ds)}})

    def best_text(self, summary: dict, best: float, best_epoch: int) -> str:
        return f"best val mIoU {f'{100 * best:.2f} (epoch {best_epoch})' if best_epoch else 'n/a'}"

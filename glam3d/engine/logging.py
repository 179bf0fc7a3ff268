"""Run-folder logging: ``train.log`` (text), ``log.csv`` (one row per epoch), ``curves.png`` (learning curves),
TensorBoard scalars under ``tb/`` (every numeric column of the epoch's row, by epoch; on by default,
``train.tensorboard``; without the ``tensorboard`` package one warning line says how to install it). Only rank 0
writes (``enabled=False`` elsewhere).

``log.csv`` and ``curves.png`` are rewritten atomically after every epoch; on resume, rows of epochs that are
about to be re-run are dropped, so the file always describes the weights in ``checkpoints/last.pt``.
"""
from __future__ import annotations

import csv
import io
import logging as _logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ..utils.io import atomic_path, atomic_write_text

BASE_COLUMNS = ["epoch", "iteration", "lr", "train_loss", "epoch_time_s", "patches_per_s", "nonfinite_steps",
                "val_mean_dice", "best_mean_dice"]
TENSORBOARD_HINT = "pip install tensorboard (or pip install 'glam3d[tensorboard]')"


class RunLogger:
    def __init__(self, run_dir, class_names: List[str], enabled: bool = True, resume_epoch: Optional[int] = None,
                 tensorboard: bool = True, console: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.class_names = list(class_names)
        self.columns = BASE_COLUMNS[:-1] + [f"val_dice_{n}" for n in self.class_names] + BASE_COLUMNS[-1:]
        self.rows: List[Dict] = []
        self.tb = None
        self.file_handler = None
        self.logger = _logging.getLogger(f"glam3d.train.{id(self)}")
        self.logger.setLevel(_logging.INFO)
        self.logger.propagate = False
        if not enabled:
            self.logger.addHandler(_logging.NullHandler())
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = _logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
        fh.setFormatter(_logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.logger.addHandler(fh)
        self.file_handler = fh
        if console:
            ch = _logging.StreamHandler(sys.stderr)
            ch.setFormatter(_logging.Formatter("%(message)s"))
            self.logger.addHandler(ch)
        if resume_epoch is not None:
            self.rows = [r for r in read_log_csv(self.run_dir / "log.csv") if int(r["epoch"]) <= resume_epoch]
        if tensorboard:
            self.tb = _summary_writer(self.run_dir / "tb", self.warning)

    # ------------------------------------------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        self.logger.info(msg)

    def warning(self, msg: str) -> None:
        self.logger.warning(f"warning: {msg}")

    def to_file(self, msg: str) -> None:
        """A line in ``train.log`` only (e.g. the error the command line prints itself)."""
        if self.file_handler is not None:
            self.file_handler.handle(self.logger.makeRecord(self.logger.name, _logging.INFO, __file__, 0, msg, None,
                                                            None))

    def log_epoch(self, row: Dict) -> None:
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if int(r["epoch"]) != int(row["epoch"])] + [row]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(r.get(k)) for k in self.columns})
        atomic_write_text(self.run_dir / "log.csv", buf.getvalue())
        if self.tb is not None:
            step = int(row["epoch"])
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def plot(self) -> None:
        if self.enabled and self.rows:
            plot_curves(self.rows, self.class_names, self.run_dir / "curves.png")

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)
        if self.tb is not None:
            self.tb.close()


def _summary_writer(folder: Path, warn):
    """A TensorBoard ``SummaryWriter`` on ``folder``; None (after one warning line saying how to install it) when
    the ``tensorboard`` package is missing or broken."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
    except ImportError:
        warn(f"TensorBoard logging is off: the tensorboard package is not installed; {TENSORBOARD_HINT}, or set "
             f"train.tensorboard=false")
        return None
    try:
        return SummaryWriter(log_dir=str(folder))
    except Exception as err:  # noqa: BLE001 - a broken installation: CSV + PNG only, said once
        warn(f"TensorBoard logging is off: {type(err).__name__}: {err}")
        return None


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def read_log_csv(path) -> List[Dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        conv = {}
        for k, v in r.items():
            if v in ("", None):
                conv[k] = float("nan") if k != "epoch" else v
                continue
            try:
                conv[k] = int(v) if k in ("epoch", "iteration") else float(v)
            except ValueError:
                conv[k] = v
        out.append(conv)
    return out


def plot_curves(rows: List[Dict], class_names: List[str], path) -> None:
    """Training loss and validation Dice (mean and per class) against epochs, as a PNG (matplotlib, Agg canvas;
    the global backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [int(r["epoch"]) for r in rows]
    ax1.plot(ep, [_num(r.get("train_loss")) for r in rows], "-o", ms=2, label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss (Dice + CE)")
    ax1.grid(alpha=0.3)
    ax1b = ax1.twinx()
    ax1b.plot(ep, [_num(r.get("lr")) for r in rows], color="tab:gray", lw=1, label="lr")
    ax1b.set_ylabel("learning rate", color="tab:gray")
    ax1.set_title("training")
    val = [(int(r["epoch"]), r) for r in rows if not math.isnan(_num(r.get("val_mean_dice")))]
    if val:
        vx = [e for e, _ in val]
        for name in class_names:
            ys = [_num(r.get(f"val_dice_{name}")) for _, r in val]
            ax2.plot(vx, ys, lw=1, alpha=0.7, label=name)
        ax2.plot(vx, [_num(r["val_mean_dice"]) for _, r in val], "k-o", lw=2, ms=3, label="mean")
        ax2.legend(fontsize=7, ncol=2, loc="lower right")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("Dice")
    ax2.set_title("validation Dice")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")

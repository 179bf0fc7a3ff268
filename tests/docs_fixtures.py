"""What ``tests/test_docs.py`` runs the documentation's snippets against: the small inputs at the paths the docs
use, the wrappers that shrink training, and the Markdown code-block reader.

The inputs (:func:`build_inputs`), built once per pytest run, stand in for the real datasets under the same
names:

- ``data/BTCV/``: raw BTCV layout (``img/img0001.nii.gz``, ``label/label0001.nii.gz``): :data:`CASES` phantom CTs
  from ``glam3d-preprocess phantom`` at a :data:`MATRIX`-voxel in-plane matrix (the first BTCV ids, so the
  Synapse split gives :data:`CASES` / 2 training and :data:`CASES` / 2 test cases);
- ``nnUNet_raw/Dataset017_BTCV/``: the same cases in nnU-Net v2's raw layout (``imagesTr/BTCV_0005_0000.nii.gz``,
  ``labelsTr``, ``imagesTs``, ``labelsTs``, ``dataset.json`` with the 13 BTCV organs): the Synapse training
  cases in ``imagesTr``, its test cases in ``imagesTs``; ``nnUNet_preprocessed/Dataset017_BTCV/splits_final.json``
  holds the folds nnU-Net makes for them. The docs read them through ``$nnUNet_raw`` and ``$nnUNet_preprocessed``;
- ``data/Task09_Spleen/``: the same cases in the Medical Segmentation Decathlon's layout, the spleen as label 1;
- ``scans/``: two of the test scans (``img0001.nii.gz``, ``img0002.nii.gz``) as new scans to segment;
- ``pretrained/swin_tiny_patch4_window7_224.pth``: an ImageNet Swin-T checkpoint in the official key layout and
  shapes (weights made up), for ``glam3d.models.load_pretrained``;
- ``data/ade20k/ADEChallengeData2016/``: a synthetic set in the ADE20K layout
  (:func:`glam3d.data.natural.make_synthetic_ade20k`), and ``mmseg_preds/`` the label maps another tool wrote for
  its validation images (PNG, training ids);
- ``data/cityscapes/``: ``leftImg8bit/`` + ``gtFine/`` (``*_labelIds.png``), two images per split;
- ``experiments/results/``: the benchmark results of the clone.

:func:`shrunk_argv` is what the ``glam3d`` wrapper (:func:`write_wrappers`) runs instead of the user's arguments.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

CASES = 12  # BTCV ids 0001-0010, 0021, 0022: 6 Synapse training and 6 test cases
MATRIX = 64  # in-plane voxels (~5.6 mm); ~75 slices of ~3 mm
SCANS = ("0001", "0002")
DATASET = "Dataset017_BTCV"
BTCV_ORGANS = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "right_adrenal_gland",
               "left_adrenal_gland"]

# every training run: one epoch of two steps, validated once on one case, no worker processes
TRAIN_SHRINK = ["train.epochs=1", "train.iters_per_epoch=2", "train.val_every=1", "val.max_cases=1",
                "data.workers=0"]
# a 3D nnFormer-family config: a small network of the same family (the tiny size, two blocks per stage so that a
# GLAM layer has a G-MSA between blocks for `glam3d show attention`, embedding 12) on a 16x32x32 crop
NNFORMER_SHRINK = {"embed_dim": 12, "depths": [2, 2, 2, 2], "num_heads": [1, 1, 2, 2], "window_size": [2, 2, 2, 1]}
CROP3D_SHRINK = ["data.roi_size=[16,32,32]"]
# a 2D config: a 1.5 M-parameter network of the same family on 64x64 crops of small images
SWIN_SHRINK = {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4,
               "default_crop": [64, 64]}
UPERNET_SHRINK = {"channels": 32, "aux_channels": 16}
GLAM_SHRINK = {"num_global_tokens": 2}
DATA2D_SHRINK = ["data.crop_size=[64,64]", "data.img_scale=[128,64]", "data.test_scale=[128,64]",
                 "data.batch_size=2", "val.roi_size=[64,64]"]
DEMO_SHRINK = ["--cases", "12", "--matrix", "64", "--workers", "1"]
SHRUNK_SWIN = "pretrained_shrunk/swin.pth"  # model.pretrained for the shrunk 2D networks (inside the sandbox)


# ------------------------------------------------------------------------------------------------ shrinking
def _load_test_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_glam3d_docs_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _swin_overrides(model_name: str) -> dict:
    over = dict(SWIN_SHRINK)
    if "upernet" in model_name:
        over.update(UPERNET_SHRINK)
    if model_name.startswith("glam_"):
        over.update(GLAM_SHRINK)
    return over


def shrink_overrides(cfg) -> List[str]:
    """The ``--override`` items that shrink a run of the config ``cfg`` (a :class:`glam3d.config.Config`)."""
    from glam3d.config import Data2DConfig

    over = list(TRAIN_SHRINK)
    name = cfg.model.name
    if isinstance(cfg.data, Data2DConfig):
        over += [f"model.overrides.{k}={json.dumps(v)}" for k, v in _swin_overrides(name).items()]
        over += DATA2D_SHRINK
        if cfg.model.pretrained:
            over.append(f"model.pretrained={SHRUNK_SWIN}")
    elif "nnformer" in name:
        if name.endswith("_synapse"):
            over.append(f"model.name={name[:-len('_synapse')]}_tiny")
        over += [f"model.overrides.{k}={json.dumps(v)}" for k, v in NNFORMER_SHRINK.items()] + CROP3D_SHRINK
    return over


def _parsed(module, argv: List[str]):
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    sub = p.add_subparsers(dest="command")
    module.add_parser(sub)
    return sub.choices[argv[0]].parse_known_args(argv[1:])[0]


def shrunk_argv(argv: List[str]) -> List[str]:
    """``glam3d ARGV`` as the docs test runs it: ``train`` and ``demo`` with :func:`shrink_overrides` of their config
    appended (the demo also with :data:`DEMO_SHRINK`), every other command as given."""
    from glam3d.commands import demo, train
    from glam3d.config import load_config

    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in ("train", "demo"):
        return list(argv)
    rest = argv[argv.index(command):]
    if command == "train":
        args = _parsed(train, rest)
        args.out = None
        cfg = train.build_config(args)
        extra = []
    else:
        args = _parsed(demo, rest)
        cfg = load_config(args.config, list(args.override))
        extra = list(DEMO_SHRINK)
    return argv + extra + [x for o in shrink_overrides(cfg) for x in ("--override", o)]


GLAM3D_WRAPPER = """#!{python}
# glam3d for the docs test: train and demo shrunk (tests/docs_fixtures.py: shrunk_argv)
import sys
sys.path.insert(0, {tests!r})
from docs_fixtures import shrunk_argv
from glam3d.cli import main
sys.exit(main(shrunk_argv(sys.argv[1:])))
"""

PREPROCESS_WRAPPER = """#!{python}
import sys
from preprocessing.cli import main
sys.exit(main())
"""

TORCHRUN_WRAPPER = """#!{python}
# torchrun for the docs test: at most 2 processes on the CPU, `-m glam3d` through the glam3d wrapper, a free
# rendezvous port (--standalone) unless one is given
import os
import sys

args, out, i = sys.argv[1:], [], 0
while i < len(args):
    a = args[i]
    if a.split("=")[0] in ("--nproc_per_node", "--nproc-per-node"):
        value = a.split("=", 1)[1] if "=" in a else args[i + 1]
        i += 1 if "=" in a else 2
        out.append("--nproc_per_node=" + str(min(int(value), 2)))
        continue
    if a == "-m" and args[i + 1] == "glam3d":
        out += [{glam3d!r}] + args[i + 2:]
        break
    out.append(a)
    i += 1
if not any(a.startswith(("--standalone", "--rdzv", "--master")) for a in out):
    out.insert(0, "--standalone")
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run"] + out)
"""


def write_wrappers(bin_dir: Path) -> Path:
    """``glam3d``, ``glam3d-preprocess`` and ``torchrun`` executables in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    glam3d = bin_dir / "glam3d"
    texts = {"glam3d": GLAM3D_WRAPPER.format(python=sys.executable, tests=str(HERE)),
             "glam3d-preprocess": PREPROCESS_WRAPPER.format(python=sys.executable),
             "torchrun": TORCHRUN_WRAPPER.format(python=sys.executable, glam3d=str(glam3d))}
    for name, text in texts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


# ------------------------------------------------------------------------------------------------ inputs
def _btcv(root: Path) -> Path:
    from preprocessing.cli import main as preprocess

    raw = root / "data" / "BTCV"
    assert preprocess(["phantom", "--out", str(raw), "--cases", str(CASES), "--matrix", str(MATRIX),
                       "--quiet"]) == 0
    return raw


def _nnunet_raw(root: Path, raw: Path) -> Path:
    from preprocessing.datasets import SYNAPSE_TEST, SYNAPSE_TRAIN

    ds = root / "nnUNet_raw" / DATASET
    ids = sorted(p.name[len("img"):-len(".nii.gz")] for p in (raw / "img").glob("img*.nii.gz"))
    train = [i for i in ids if i in SYNAPSE_TRAIN]
    test = [i for i in ids if i in SYNAPSE_TEST]
    for split, group in (("Tr", train), ("Ts", test)):
        (ds / f"images{split}").mkdir(parents=True)
        (ds / f"labels{split}").mkdir(parents=True)
        for i in group:
            shutil.copyfile(raw / "img" / f"img{i}.nii.gz", ds / f"images{split}" / f"BTCV_{i}_0000.nii.gz")
            shutil.copyfile(raw / "label" / f"label{i}.nii.gz", ds / f"labels{split}" / f"BTCV_{i}.nii.gz")
    labels = {"background": 0, **{name: v for v, name in enumerate(BTCV_ORGANS, 1)}}
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                 "numTraining": len(train), "file_ending": ".nii.gz"}, indent=2))
    return ds


def _msd_spleen(root: Path, raw: Path) -> Path:
    """``data/Task09_Spleen`` in the Medical Segmentation Decathlon's layout: one file per case named by its id,
    the spleen (BTCV value 1) as label 1, the cases listed in ``dataset.json``."""
    import nibabel as nib
    import numpy as np

    from preprocessing.datasets import SYNAPSE_TEST, SYNAPSE_TRAIN

    task = root / "data" / "Task09_Spleen"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    ids = sorted(p.name[len("img"):-len(".nii.gz")] for p in (raw / "img").glob("img*.nii.gz"))
    training, test = [], []
    for i in ids:
        name = f"spleen_{int(i)}.nii.gz"
        if i in SYNAPSE_TRAIN:
            shutil.copyfile(raw / "img" / f"img{i}.nii.gz", task / "imagesTr" / name)
            lab = nib.load(str(raw / "label" / f"label{i}.nii.gz"))
            spleen = (np.asarray(lab.dataobj) == 1).astype(np.uint8)
            nib.Nifti1Image(spleen, lab.affine, lab.header).to_filename(str(task / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        elif i in SYNAPSE_TEST:
            shutil.copyfile(raw / "img" / f"img{i}.nii.gz", task / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(training), "numTest": len(test), "training": training, "test": test}, indent=2))
    return task


def _nnunet_splits(root: Path, ds: Path) -> None:
    """nnU-Net v2's own folds of the training cases (``KFold(5, shuffle=True, random_state=12345)`` over the sorted
    ids), as ``nnUNet_preprocessed/DatasetXXX/splits_final.json`` holds them."""
    from sklearn.model_selection import KFold

    ids = sorted(p.name[:-len(".nii.gz")] for p in (ds / "labelsTr").glob("*.nii.gz"))
    folds = [{"train": [ids[i] for i in tr], "val": [ids[i] for i in va]}
             for tr, va in KFold(5, shuffle=True, random_state=12345).split(ids)]
    out = root / "nnUNet_preprocessed" / DATASET
    out.mkdir(parents=True)
    (out / "splits_final.json").write_text(json.dumps(folds, indent=2))


def _pretrained(root: Path) -> None:
    """An official-layout ImageNet Swin-T checkpoint (the real file's keys and shapes), and the same for the
    shrunk 2D networks the wrapper trains (``pretrained_shrunk/swin.pth``)."""
    import torch

    from glam3d.models import build_model

    fake = _load_test_module("test_train2d")._fake_official_swin
    (root / "pretrained").mkdir()
    torch.save(fake(build_model("swin_upernet_tiny", num_classes=150)),
               root / "pretrained" / "swin_tiny_patch4_window7_224.pth")
    (root / Path(SHRUNK_SWIN).parent).mkdir()
    shrunk = build_model("glam_swin_upernet_tiny", num_classes=19, **_swin_overrides("glam_swin_upernet_tiny"))
    torch.save(fake(shrunk), root / SHRUNK_SWIN)


def _natural(root: Path) -> None:
    import numpy as np
    from PIL import Image

    from glam3d.data.natural import make_synthetic_ade20k

    base = make_synthetic_ade20k(root / "data" / "ade20k", num_train=8, num_val=2, size=(64, 96), num_classes=150)
    preds = root / "mmseg_preds"
    preds.mkdir()
    for png in sorted((base / "annotations" / "validation").glob("*.png")):
        ann = np.asarray(Image.open(png)).astype(np.int16)
        Image.fromarray(np.clip(ann - 1, 0, None).astype(np.uint8), mode="L").save(preds / png.name)
    fake_cityscapes = _load_test_module("test_natural_data").fake_cityscapes
    for split in ("train", "val"):
        fake_cityscapes(root / "data" / "cityscapes", split, h=64, w=128)


def build_inputs(root: Path) -> Path:
    """Write every input the docs read into ``root`` (see the module doc); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    raw = _btcv(root)
    _nnunet_splits(root, _nnunet_raw(root, raw))
    _msd_spleen(root, raw)
    (root / "scans").mkdir()
    for i in SCANS:
        shutil.copyfile(raw / "img" / f"img{i}.nii.gz", root / "scans" / f"img{i}.nii.gz")
    _pretrained(root)
    _natural(root)
    shutil.copytree(ROOT / "experiments" / "results", root / "experiments" / "results")
    return root


def sandbox_copy(inputs: Path, dest: Path) -> Path:
    """A copy of the inputs for one doc file (files over 4 MB hard-linked: glam3d never writes into its inputs)."""
    def copy(src, dst):
        if os.path.getsize(src) > 4 << 20:
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass
        return shutil.copy2(src, dst)

    shutil.copytree(inputs, dest, copy_function=copy)
    return dest


# ------------------------------------------------------------------------------------------------ Markdown
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip:\s*(?P<reason>.+?)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)\s*$")


@dataclass
class Block:
    """A fenced code block of a Markdown file: its language, text, first line (1-based, the fence's) and the
    reason of a ``<!-- docs-test: skip: REASON -->`` comment right above it."""
    path: Path
    lang: str
    code: str
    line: int
    skip: Optional[str] = None

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    """Every fenced block of ``path`` in order (fences at the start of a line)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{start + 1}: code block never closed")
        above = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.match(above)
        blocks.append(Block(path, m["lang"], "\n".join(lines[start + 1:j]) + "\n", start + 1,
                            skip["reason"] if skip else None))
        i = j + 1
    return blocks


def skip_comments(path: Path) -> List[int]:
    """Line numbers (1-based) of every ``docs-test: skip`` comment in ``path``."""
    return [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if "docs-test:" in line]

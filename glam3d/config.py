"""Training configs: YAML files -> nested dataclasses with strict keys and types.

A config file is a YAML mapping whose sections mirror :class:`Config`::

    base: synapse_glam_nnformer.yaml      # optional: inherit another file (path relative to this one)
    model: {name: glam_nnformer_tiny, overrides: {num_global_tokens: 5}}
    data: {root: data/phantom_pre, roi_size: [32, 64, 64], batch_size: 2}
    optim: {name: adamw, lr: 1.0e-3, schedule: warmup_cosine, warmup_epochs: 1}
    train: {epochs: 20, iters_per_epoch: 50, val_every: 5, amp: none}

2D natural-image configs (ADE20K, Cityscapes, the synthetic set) select their ``data:`` section with
``data.dataset: ade20k | cityscapes | synthetic`` (:class:`Data2DConfig`; absent or ``preprocessed``: the 3D
:class:`DataConfig`); ``cfg.task`` is then ``"2d"`` and ``loss.name`` defaults to ``ce``::

    base: ade20k_recipe.yaml
    model: {name: glam_swin_upernet_tiny, pretrained: pretrained/swin_tiny_patch4_window7_224.pth}
    data: {dataset: ade20k, root: data/ade20k, crop_size: [512, 512]}
    train: {deep_supervision: [1.0, 0.4]}          # UperNet (main, aux) loss weights
    val: {inference: whole}                        # or slide (val.roi_size, val.overlap)

``base`` files are merged key by key (mappings recursively, everything else replaced). Unknown keys (with close
matches suggested) and wrong types raise :class:`~glam3d.errors.UserError` with one line naming the key and the
file. ``--override a.b=value`` values are YAML scalars (``optim.lr=3e-4``, ``data.roi_size=[32,64,64]``).

Usage::

    cfg = load_config("phantom_glam_nnformer_tiny", overrides=["train.epochs=2"])  # a shipped config, or a path
    cfg.optim.lr            # 0.001
    config_to_dict(cfg)     # plain dict (saved as the run's config.yaml and in checkpoints)
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from .errors import UserError
from .utils.bounded_yaml import NodeBudget, load_bounded


# ----------------------------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The network: a registered variant (``glam3d models``) or ``"package.module:factory"`` for your own."""
    name: str = "glam_nnformer_tiny"  # a registered network (`glam3d models`) or "package.module:factory"
    overrides: Dict[str, Any] = field(default_factory=dict)  # kwargs for build_model (num_global_tokens, gmsa, ...)
    init_checkpoint: Optional[str] = None  # start from these weights (same architecture), e.g. pre-training
    pretrained: Optional[str] = None  # ImageNet Swin checkpoint for the backbone (models.pretrained)


@dataclass
class AugmentConfig:
    """Patch augmentations (applied after cropping); every probability 0 switches that one off."""
    flip_prob: float = 0.0  # per axis
    flip_axes: List[int] = field(default_factory=lambda: [0, 1, 2])  # spatial axes (D, H, W) that may flip
    rotate90_prob: float = 0.0  # quarter turns in the H-W plane
    affine_prob: float = 0.0  # random rotation (rotate_deg) and zoom (scale_range)
    rotate_deg: List[float] = field(default_factory=lambda: [15.0, 15.0, 15.0])  # +- degrees about D, H, W
    scale_range: float = 0.0  # isotropic zoom factor drawn from [1 - s, 1 + s] (with affine_prob)
    intensity_scale_prob: float = 0.0  # multiply the intensities (intensity_scale)
    intensity_scale: float = 0.1  # multiply by 1 + U(-s, s)
    intensity_shift_prob: float = 0.0  # shift the intensities (intensity_shift)
    intensity_shift: float = 0.1  # add U(-s, s)
    noise_prob: float = 0.0  # add Gaussian noise (noise_std)
    noise_std: float = 0.1  # standard deviation of the noise, in normalised intensity units
    gamma_prob: float = 0.0  # gamma-transform the intensities (gamma_range)
    gamma_range: List[float] = field(default_factory=lambda: [0.7, 1.5])  # gamma drawn from [low, high]


@dataclass
class DataConfig:
    """3D: preprocessed dataset (``dataset.json`` + ``cases/<id>.npz``) and patch sampling."""
    dataset: Literal["preprocessed"] = "preprocessed"  # a 2D dataset name selects Data2DConfig instead
    root: str = ""  # the preprocessed folder (dataset.json + cases/); `glam3d train --data` sets it
    roi_size: List[int] = field(default_factory=lambda: [64, 128, 128])  # (D, H, W) training crop
    batch_size: int = 2  # volumes drawn per step and rank; the step sees batch_size * num_samples patches
    num_samples: int = 1  # patches cropped from each drawn volume
    pos: float = 1.0  # foreground-centred : random crops = pos : neg
    neg: float = 1.0  # weight of random (possibly background) crops against pos
    class_balanced: bool = True  # foreground crops pick a present class uniformly, then a voxel of it
    cache: Literal["memory", "none"] = "memory"  # MONAI CacheDataset of the loaded cases, or load per draw
    workers: int = 0  # DataLoader worker processes
    val_fraction: float = 0.2  # share of the *training* cases held out for validation (seeded)
    val_cases: Optional[List[str]] = None  # explicit validation case ids (overrides val_fraction)
    # cross-validation (nnU-Net's): fold 0..num_folds-1 of ROOT/splits_final.json (made on first use, seeded as
    # nnU-Net does; an existing one is used as it is), or "all" (every training case, no validation); null: the
    # val_fraction / val_cases split. The run folder becomes OUTPUT/fold_<fold>.
    fold: Optional[str] = None
    num_folds: int = 5  # folds of a splits_final.json glam3d makes
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SyntheticConfig:
    """``data.dataset: synthetic``: the set :func:`glam3d.data.natural.make_synthetic_ade20k` writes under root."""
    num_train: int = 32  # training images written
    num_val: int = 8  # validation images written
    size: List[int] = field(default_factory=lambda: [96, 128])  # (H, W)
    num_classes: int = 5  # classes drawn in the images
    seed: int = 0  # the set is the same for the same seed


DATASETS_2D = ("ade20k", "cityscapes", "synthetic")
_DATA2D_PER_DATASET = ("crop_size", "img_scale", "test_scale", "cat_max_ratio")  # defaults differ per dataset


@dataclass
class Data2DConfig:
    """2D natural images (:mod:`glam3d.data.natural`), selected by ``data.dataset: ade20k | cityscapes |
    synthetic``. ``crop_size``, ``img_scale``, ``test_scale`` and ``cat_max_ratio`` left out take the dataset's
    defaults (``natural.DATA_DEFAULTS``: ADE20K 512² crops / short side 512, Cityscapes 769² / full size)."""
    dataset: Literal["ade20k", "cityscapes", "synthetic"] = "ade20k"  # which layout root holds
    root: str = ""  # ADE20K: folder holding ADEChallengeData2016/; Cityscapes: leftImg8bit/ + gtFine/
    crop_size: List[int] = field(default_factory=lambda: [512, 512])  # (H, W) training crop
    img_scale: Optional[List[int]] = field(default_factory=lambda: [2048, 512])  # (long, short) rescale base
    ratio_range: List[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale factor range
    cat_max_ratio: float = 0.75  # re-draw crops where one class covers more than this fraction
    flip_prob: float = 0.5  # horizontal flip
    photometric: bool = True  # brightness / contrast / saturation / hue distortion
    mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # 0..255 RGB
    std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])  # 0..255 RGB, divides after mean
    test_scale: Optional[List[int]] = field(default_factory=lambda: [2048, 512])  # validation resize; null: none
    num_classes: Optional[int] = None  # optional check against the dataset
    train_split: Optional[str] = None  # default training / train
    val_split: Optional[str] = None  # default validation / val
    reduce_zero_label: bool = True  # ADE20K layout: file value 0 -> ignored, v -> v - 1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    batch_size: int = 2  # images per step and rank
    workers: int = 0  # DataLoader worker processes


@dataclass
class LossConfig:
    name: Literal["dice_ce", "ce"] = "dice_ce"  # 2D configs default to ce (cross-entropy)
    ignore_index: int = 255  # ce: label value left out of the loss (2D: unlabelled pixels)
    dice_weight: float = 1.0  # weight of the soft Dice term (dice_ce)
    ce_weight: float = 1.0  # weight of the cross-entropy term (dice_ce)
    include_background: bool = False  # Dice term over foreground classes only (nnU-Net)
    batch_dice: bool = False  # False: per-sample Dice averaged (independent of how the batch is split over ranks)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # the optimiser
    lr: float = 1e-2  # peak learning rate (per step; not scaled with the number of ranks)
    momentum: float = 0.99  # SGD
    nesterov: bool = True  # SGD
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    weight_decay: float = 3e-5  # decoupled for adamw, L2 for sgd
    schedule: Literal["poly", "warmup_poly", "warmup_cosine", "constant"] = "poly"  # learning-rate schedule
    poly_power: float = 0.9  # lr * (1 - progress) ** poly_power (poly schedules)
    warmup_epochs: float = 0.0  # linear warm-up from lr * warmup_start (warmup_* schedules)
    warmup_start: float = 0.01  # the warm-up starts at lr * warmup_start
    min_lr: float = 0.0  # floor of the cosine schedule
    step_per: Literal["iter", "epoch"] = "iter"  # "epoch": lr constant within an epoch (nnFormer's poly)
    grad_clip: Optional[float] = 12.0  # max global gradient norm; null: off
    # parameter-name substrings kept out of weight decay (mmseg's decay_mult=0), e.g. [norm,
    # relative_position_bias_table, global_tokens, global_pos_embed]; adamw also exempts every 1-D parameter
    no_weight_decay: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    epochs: int = 1000  # training length in epochs (glam3d train --epochs)
    iters_per_epoch: int = 250  # optimiser steps per epoch (nnU-Net: 250)
    val_every: int = 50  # epochs between validations (and at the last epoch); 0: never
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # bf16: CPU and GPU; fp16 (GradScaler): CUDA only
    compile: bool = False  # torch.compile the network
    seed: int = 12345  # seeds the split, the patch draws, the augmentation and the initial weights
    deterministic: bool = False  # torch.use_deterministic_algorithms; bit-exact resume on CPU
    deep_supervision: List[float] = field(default_factory=list)  # loss weights, full resolution first; []: off
    save_every_iters: int = 0  # also write checkpoints/last.pt every N iterations (0: only at epoch ends)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # tqdm bar per epoch (rank 0)
    find_unused_parameters: bool = False  # DDP: networks with parameters outside the loss graph
    sync_bn: bool = True  # 2D under DDP on CUDA: BatchNorm -> SyncBatchNorm (mmseg)
    tensorboard: bool = True  # TensorBoard scalars in RUN/tb (needs the tensorboard package)
    # a step whose loss or gradient is NaN/inf is skipped (no optimiser step) and counted; the run stops with an
    # error after more than this many such steps in a row, or in all (0: at the first one)
    max_nonfinite_in_a_row: int = 10
    max_nonfinite_steps: int = 100  # the same rule: the run stops after more than this many skipped steps in all


@dataclass
class ValConfig:
    """Validation. 3D: sliding-window inference over whole validation volumes, per-class Dice. 2D: ``inference``
    whole image or sliding windows (``roi_size``, ``overlap``; constant blend), mIoU over the validation set."""
    overlap: float = 0.5  # sliding-window overlap, fraction of the window per axis
    mirror: bool = False  # 2D: horizontal flip added
    sw_batch_size: int = 2  # windows per forward
    mode: Literal["gaussian", "constant"] = "gaussian"  # 3D blend
    roi_size: Optional[List[int]] = None  # default: data.roi_size (3D) / data.crop_size (2D)
    max_cases: int = 0  # 0: all validation cases (2D: images)
    inference: Literal["whole", "slide"] = "whole"  # 2D only (3D always slides windows)
    # fold runs (data.fold 0..N-1): at the end, predict the fold's validation cases from their source scans into
    # RUN/fold_<K>/validation (best checkpoint, each scan's own geometry) and score them there (report.*)
    export_folds: bool = True


@dataclass
class Config:
    name: str = ""  # default: the config file's stem
    output: str = "runs/{name}"  # run folder; {name} is replaced
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Union[DataConfig, Data2DConfig] = field(default_factory=DataConfig)  # chosen by data.dataset
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.replace("{name}", self.name or "run"))

    @property
    def task(self) -> str:
        """``"2d"`` for a natural-image dataset (``data.dataset`` ade20k / cityscapes / synthetic), else ``"3d"``."""
        return "2d" if isinstance(self.data, Data2DConfig) else "3d"


def data_schema(raw_data) -> type:
    """The ``data:`` dataclass a raw section asks for: :class:`Data2DConfig` when ``dataset`` names a 2D set,
    :class:`DataConfig` when it is absent or ``preprocessed``."""
    if isinstance(raw_data, dict) and raw_data.get("dataset") in DATASETS_2D:
        return Data2DConfig
    return DataConfig


def _check_dataset_name(raw_data, source: str) -> None:
    if not isinstance(raw_data, dict) or "dataset" not in raw_data:
        return
    value, known = raw_data["dataset"], ("preprocessed",) + DATASETS_2D
    if value not in known:
        close = difflib.get_close_matches(str(value), known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"config key 'data.dataset' must be one of {', '.join(known)}, got {_show(value)}{hint}",
                        source)


def _with_task_defaults(raw: dict, source: str) -> dict:
    """2D configs: per-dataset data defaults and ``loss.name: ce`` unless given."""
    if not isinstance(raw, dict):
        return raw
    _check_dataset_name(raw.get("data"), source)
    if data_schema(raw.get("data")) is not Data2DConfig:
        return raw
    from .data.natural import DATA_DEFAULTS  # lazy: pulls in torch / PIL

    raw = dict(raw)
    defaults = DATA_DEFAULTS[raw["data"]["dataset"]]
    raw["data"] = {**{k: copy.deepcopy(defaults[k]) for k in _DATA2D_PER_DATASET if k in defaults}, **raw["data"]}
    loss = raw.get("loss")
    if loss is None or (isinstance(loss, dict) and "name" not in loss):
        raw["loss"] = {**(loss or {}), "name": "ce"}
    return raw


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
def shipped_configs() -> List[str]:
    """Names of the configs that ship inside the package (``glam3d/configs/NAME.yaml``), sorted."""
    return sorted(p.name[:-5] for p in resources.files("glam3d").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def config_path(name_or_path) -> Path:
    """A config given as a file path, or as the name of a shipped config (``synapse_glam_nnformer``, with or
    without ``.yaml``), found through :mod:`importlib.resources` so that an installed wheel finds its own configs.
    A path that exists wins over a shipped name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(path) in (name, name + ".yaml"):  # a bare name, not a path to a missing file
        shipped = resources.files("glam3d").joinpath("configs", name + ".yaml")
        if shipped.is_file():
            return Path(str(shipped))
        close = difflib.get_close_matches(name, shipped_configs(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else " (`glam3d configs` lists the shipped configs)"
        raise UserError(f"no such config file or shipped config{hint}", name_or_path)
    raise UserError("config file not found", path)


def load_config(path, overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML config (a path, or the name of a shipped config: :func:`config_path`), following ``base:``;
    apply ``key=value`` overrides; check keys and types. The :class:`Config` remembers the file it came from
    (:func:`config_source`), so :func:`validate_config` names it."""
    path = config_path(path)
    raw = load_yaml_with_base(path)
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


#: a config file is a few KB (the largest shipped one: 2.3 KB); one past this is not a config
MAX_CONFIG_BYTES = 1 << 20
#: files one ``base:`` tree may read (the shipped configs use at most 2)
MAX_BASE_FILES = 32


def load_yaml_with_base(path: Path, _seen: tuple = (), _budget: Optional[NodeBudget] = None) -> dict:
    """The YAML mapping in ``path`` merged over its ``base:`` files. Every file is bounded before it is built
    (:func:`~glam3d.utils.bounded_yaml.load_bounded`: size, alias expansion and depth, one budget for the whole
    ``base:`` tree); an empty file, a file that is not a mapping, a loop or an oversized file are refused with
    one line naming the file."""
    path = Path(path)
    budget = _budget if _budget is not None else NodeBudget()
    if not path.is_file():
        raise UserError("config file not found", path)
    if path.resolve() in _seen:
        raise UserError("'base' chain loops back to this file", path)
    if budget.documents >= MAX_BASE_FILES:
        raise UserError(f"the 'base' files of this config reach more than {MAX_BASE_FILES} files", path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"config file is {size / 2 ** 20:.1f} MiB; a config is a few KB (at most "
                        f"{MAX_CONFIG_BYTES // 2 ** 20} MiB)", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("config file is not UTF-8 text", path) from None
    try:
        data = load_bounded(text, path, budget)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"not valid YAML{where} ({getattr(err, 'problem', None) or err})", path) from None
    if data is None:
        raise UserError("config file is empty (no settings; a config is a YAML mapping such as "
                        "'base: synapse_glam_nnformer.yaml' plus the keys it changes)", path)
    if not isinstance(data, dict):
        raise UserError(f"a config must be a YAML mapping, got {type(data).__name__}", path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise UserError(f"'base' must be a file name (or a list of them), got {_show(b)}", path)
        merged = deep_merge(merged, load_yaml_with_base(path.parent / b, _seen + (path.resolve(),), budget))
    return deep_merge(merged, data)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` to the raw mapping; the value is parsed as YAML (``1e-3``, ``[1,2]``, ``null``)."""
    if "=" not in item:
        raise UserError(f"--override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = load_bounded(text, f"--override {key}") if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    if not all(parts):
        raise UserError(f"--override {item!r}: bad key {key!r}")
    # check the path against the schema so typos are caught here, naming the override
    cls: Any = Config
    for i, part in enumerate(parts):
        if cls is None:  # inside a free-form mapping (model.overrides)
            break
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            raise UserError(f"--override {item!r}: unknown key {key!r}{_suggest(part, fields, prefix)}")
        ftype = typing.get_type_hints(cls)[part]
        if cls is Config and part == "data":  # 3D or 2D section, per the data.dataset set so far
            ftype = data_schema(raw.get("data"))
            other = DataConfig if ftype is Data2DConfig else Data2DConfig
            if i + 1 < len(parts) and parts[i + 1] not in {f.name for f in dataclasses.fields(ftype)} and \
                    parts[i + 1] in {f.name for f in dataclasses.fields(other)}:
                ftype = other  # e.g. data.dataset=... comes later in the list; the final build checks it
        cls = ftype if dataclasses.is_dataclass(ftype) else None
        if cls is None and i < len(parts) - 1 and typing.get_origin(ftype) not in (dict, Dict):
            raise UserError(f"--override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build a :class:`Config` from a plain mapping, strictly (one-line UserError naming key and source)."""
    cfg = _build(Config, _with_task_defaults(raw, source), "", source)
    cfg._source = source  # not a field: never saved, compared or printed
    return cfg


def config_source(cfg) -> str:
    """The file (or ``"<config>"``) a :class:`Config` was read from: what its error lines name."""
    return getattr(cfg, "_source", "<config>")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------------------------
# strict conversion
# ----------------------------------------------------------------------------------------------------------------
def _suggest(key: str, options, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    full = [f"{prefix}.{c}" if prefix else c for c in close]
    if full:
        return f" (did you mean {', '.join(full)}?)"
    where = f"'{prefix}'" if prefix else "the top level"
    return f" (known keys in {where}: {', '.join(options)})"


def _build(cls, raw, prefix: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"'{prefix}' must be a mapping (section), got {_show(raw)}", source)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise UserError(f"unknown config key '{full}'{_suggest(str(key), names, prefix)}", source)
    kwargs = {}
    for name in names:
        if name in raw:
            full = f"{prefix}.{name}" if prefix else name
            tp = data_schema(raw[name]) if (cls is Config and name == "data") else hints[name]
            kwargs[name] = _convert(tp, raw[name], full, source)
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


def _convert(tp, value, key: str, source: str):
    def bad(extra: str = ""):
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {_show(value)}{extra}", source)

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _convert(a, value, key, source)
            except UserError:
                continue
        bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        if isinstance(value, bool) and "none" in choices and value is False:  # YAML `amp: no`/`off`
            return "none"
        bad()
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            bad()
        return [_convert(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            bad()
        return copy.deepcopy(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        bad(" (use true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                f = float(value)
            except ValueError:
                bad()
            if math.isfinite(f):
                return f
        bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        bad()
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # programming error


#: iterations a run may have (epochs x iters_per_epoch), and the largest val_every / save_every_iters: 400 times
#: nnFormer's 250,000-step schedule; at 10 ms a step it would run for 11 days
MAX_ITERATIONS = 10 ** 8
#: volumes (images) drawn per step, patches per volume, sliding windows per forward pass
MAX_BATCH = 4096
#: voxels of one step's input batch (batch_size x num_samples x window): 2^31 float32 voxels are 8 GiB before the
#: network multiplies them by tens of channels, far beyond any GPU
MAX_STEP_VOXELS = 2 ** 31
#: DataLoader worker processes
MAX_WORKERS = 256
#: cross-validation folds (nnU-Net: 5; leave-one-out on a large dataset is beyond any use)
MAX_FOLDS = 100


def validate_config(cfg: Config, source: Optional[str] = None, network: bool = True) -> None:
    """Value checks beyond types (ranges, lengths, bounds past which a value can only be a typo); one-line
    UserError naming the key and ``source`` (default: the file :func:`load_config` read,
    :func:`config_source`).

    ``network`` (default): also check a registered network before anything heavy happens, on a copy built on the
    meta device (:func:`glam3d.engine.preflight.check_config_network`, nothing allocated): ``data.roi_size`` /
    ``val.roi_size`` (2D: ``data.crop_size``) are multiples of its divisor, and its weights, gradients and
    optimiser state fit the training device at all."""
    source = source if source is not None else config_source(cfg)

    def need(cond, key, msg):
        if not cond:
            raise UserError(f"config key '{key}' {msg}", source)

    if cfg.task == "2d":
        _validate_data_2d(cfg, need)
    else:
        need(bool(cfg.data.root), "data.root", "is required (the folder with dataset.json)")
        need(len(cfg.data.roi_size) == 3 and all(s > 0 for s in cfg.data.roi_size), "data.roi_size",
             f"must be 3 positive sizes (D, H, W), got {cfg.data.roi_size}")
        need(cfg.data.num_samples >= 1, "data.num_samples", "must be >= 1")
        need(cfg.data.pos >= 0 and cfg.data.neg >= 0 and cfg.data.pos + cfg.data.neg > 0, "data.pos",
             "and data.neg must be >= 0 and not both 0")
        need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        need(2 <= cfg.data.num_folds <= MAX_FOLDS, "data.num_folds", f"must be in 2..{MAX_FOLDS}")
        if cfg.data.fold is not None:
            from .data.datasets import parse_fold

            try:
                parse_fold(cfg.data.fold)
            except UserError as err:
                raise UserError(str(err), source) from None
            need(cfg.data.val_cases is None, "data.val_cases", "and data.fold (--fold) exclude each other: a fold's "
                 "validation cases are those of splits_final.json")
        need(len(cfg.data.augment.gamma_range) == 2, "data.augment.gamma_range", "must be two numbers")
        need(len(cfg.data.augment.rotate_deg) == 3, "data.augment.rotate_deg", "must be 3 angles (D, H, W axes)")
        need(cfg.val.roi_size is None or (len(cfg.val.roi_size) == 3 and all(s > 0 for s in cfg.val.roi_size)),
             "val.roi_size", "must be 3 positive sizes (D, H, W)")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.data.workers >= 0, "data.workers", "must be >= 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.grad_clip is None or cfg.optim.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")
    need(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    need(cfg.train.epochs >= 1, "train.epochs", "must be >= 1")
    need(cfg.train.iters_per_epoch >= 1, "train.iters_per_epoch", "must be >= 1")
    need(cfg.train.val_every >= 0, "train.val_every", "must be >= 0")
    need(all(w >= 0 for w in cfg.train.deep_supervision), "train.deep_supervision", "weights must be >= 0")
    need(0.0 <= cfg.val.overlap < 1.0, "val.overlap", "must be in [0, 1)")
    need(cfg.train.max_nonfinite_in_a_row >= 0, "train.max_nonfinite_in_a_row", "must be >= 0")
    need(cfg.train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be >= 0")
    _validate_bounds(cfg, need)
    if network:
        from .engine.preflight import check_config_network

        check_config_network(cfg, source)


def _validate_bounds(cfg: Config, need) -> None:
    """Finite numbers everywhere; window sizes, iteration counts and batch sizes within what any run can mean."""
    from .engine.preflight import window_problem

    _need_finite(cfg, "", need)
    tc = cfg.train
    total = tc.epochs * tc.iters_per_epoch
    need(total <= MAX_ITERATIONS, "train.epochs",
         f"x train.iters_per_epoch is {total:,} iterations, beyond any schedule (at most {MAX_ITERATIONS:,}; "
         f"nnFormer trains 250,000)")
    need(tc.val_every <= MAX_ITERATIONS, "train.val_every", f"must be at most {MAX_ITERATIONS:,} epochs (0: never)")
    need(0 <= tc.save_every_iters <= MAX_ITERATIONS, "train.save_every_iters",
         f"must be in 0..{MAX_ITERATIONS:,} (0: checkpoints at epoch ends only), got {tc.save_every_iters}")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(cfg.data.batch_size <= MAX_BATCH, "data.batch_size", f"must be at most {MAX_BATCH}")
    need(cfg.data.workers <= MAX_WORKERS, "data.workers", f"must be at most {MAX_WORKERS} processes")
    need(1 <= cfg.val.sw_batch_size <= MAX_BATCH, "val.sw_batch_size", f"must be in 1..{MAX_BATCH}")
    need(cfg.val.max_cases >= 0, "val.max_cases", "must be >= 0 (0: all validation cases)")
    if cfg.task == "2d":
        windows, samples = [("data.crop_size", cfg.data.crop_size), ("val.roi_size", cfg.val.roi_size)], 1
    else:
        windows, samples = [("data.roi_size", cfg.data.roi_size), ("val.roi_size", cfg.val.roi_size)], \
            cfg.data.num_samples
        need(samples <= MAX_BATCH, "data.num_samples", f"must be at most {MAX_BATCH}")
    for key, roi in windows:
        if roi is not None:
            problem = window_problem(list(roi), (1,) * len(roi))
            need(problem is None, key, f"{list(roi)} {problem}")
    voxels = cfg.data.batch_size * samples * math.prod(windows[0][1])
    need(voxels <= MAX_STEP_VOXELS, "data.batch_size",
         f"x the {'crop' if cfg.task == '2d' else 'patches x window'} makes {voxels:,} voxels a step, far beyond "
         f"any GPU (at most 2^31)")


def _need_finite(obj, prefix: str, need) -> None:
    """Every float in the config is finite (YAML's .inf / .nan are numbers to the type check)."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _need_finite(value, key, need)
        elif isinstance(value, float):
            need(math.isfinite(value), key, f"must be a finite number, got {value}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, float):
                    need(math.isfinite(v), f"{key}[{i}]", f"must be a finite number, got {v}")


def _validate_data_2d(cfg: Config, need) -> None:
    d = cfg.data

    def size2(v, positive=True):
        return v is not None and len(v) == 2 and all((x > 0) if positive else True for x in v)

    need(bool(d.root), "data.root", "is required (the dataset folder)")
    need(size2(d.crop_size), "data.crop_size", f"must be 2 positive sizes (H, W), got {d.crop_size}")
    need(d.img_scale is None or size2(d.img_scale), "data.img_scale", "must be null or [long, short] > 0")
    need(d.test_scale is None or size2(d.test_scale), "data.test_scale", "must be null or [long, short] > 0")
    need(len(d.ratio_range) == 2 and 0 < d.ratio_range[0] <= d.ratio_range[1], "data.ratio_range",
         f"must be [low, high] with 0 < low <= high, got {d.ratio_range}")
    need(0 < d.cat_max_ratio <= 1, "data.cat_max_ratio", "must be in (0, 1]")
    need(0 <= d.flip_prob <= 1, "data.flip_prob", "must be in [0, 1]")
    need(len(d.mean) == 3 and len(d.std) == 3 and all(v > 0 for v in d.std), "data.mean",
         "and data.std must be 3 values (RGB, std > 0)")
    need(d.num_classes is None or d.num_classes >= 1, "data.num_classes", "must be >= 1 or null")
    need(size2(d.synthetic.size) and min(d.synthetic.size) >= 16, "data.synthetic.size", "must be [H, W] >= 16")
    need(2 <= d.synthetic.num_classes <= 150, "data.synthetic.num_classes", "must be in 2..150")
    need(cfg.loss.name == "ce", "loss.name", "must be ce for 2D data (cross-entropy with loss.ignore_index)")
    need(cfg.val.roi_size is None or size2(cfg.val.roi_size), "val.roi_size", "must be 2 sizes (H, W) for 2D")


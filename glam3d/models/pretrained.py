"""Load ImageNet Swin checkpoints (official or timm layout) into glam3d's (GLAM-)Swin backbones.

Accepted files (read with ``torch.load(weights_only=True)``, nothing is downloaded):

- **official** (microsoft/Swin-Transformer ``swin_*_patch4_window7_224.pth``): ``{"model": state_dict}`` with
  ``patch_embed.proj/norm``, ``layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,
  norm2,mlp.fc1,mlp.fc2}``, ``layers.{i}.downsample.{norm,reduction}`` (merging at the *end* of stage i),
  ``norm``, ``head``; buffers ``relative_position_index`` / ``attn_mask``. Older timm releases use the same keys.
- **timm** (current pytorch-image-models / Hugging Face ``timm/swin_*``): a plain state dict, same block keys,
  ``layers.{i}.downsample`` at the *start* of stage i (i ≥ 1, i.e. the official ``layers.{i-1}.downsample``),
  ``head.fc``; no buffers. Recognised by ``head.fc.*`` or by a ``downsample`` under the last stage.
- wrappers ``{"state_dict": ...}`` (mmcv) and prefixes ``module.`` / ``backbone.`` are unwrapped.

Key mapping onto :class:`glam3d.models.networks.swin.SwinBackbone` (``<prefix>`` = where the backbone sits in
the model, e.g. ``backbone.`` for UperNet, ``encoder.`` for Swin-Unet)::

    patch_embed.*                    -> <prefix>patch_embed.*
    layers.{i}.blocks.{j}.*          -> <prefix>stages.{i}.blocks.{j}.*
    layers.{i}.downsample.*          -> <prefix>merges.{i}.*          (timm: layers.{i+1}.downsample.*)
    norm.*                           -> <prefix>out_norms.3.*          (the bottleneck LayerNorm)

Relative position bias tables of another window size are resized by bicubic interpolation of the
``(2w-1) × (2w-1)`` grid per head, as the official ``load_pretrained`` does (e.g. window 7 → 12).
Swin-Unet (a model with ``decoder`` GLAM stages) also gets its decoder blocks from the mirrored encoder stage,
as Swin-Unet's ``load_from`` does (``decoder_from_encoder=True``).

:func:`load_pretrained` returns a :class:`PretrainedReport` listing exactly which model keys are **new** (not in
the checkpoint: global tokens, G-MSA, decoder, heads), which checkpoint keys were **unused** (classifier head,
…), which tables were interpolated, and which derived buffers were skipped; it prints it with ``verbose=True``.
With ``num_global_tokens=0`` the loaded backbone computes the same features as the network the checkpoint came
from (``tests/test_pretrained.py`` checks it against an independent reference Swin).

Example::

    model = build_model("glam_swin_upernet_tiny")
    report = load_pretrained(model, "swin_tiny_patch4_window7_224.pth")
    report.new        # ['backbone.stages.0.global_tokens', 'backbone.stages.0.gmsa.0.norm1.weight', ...]
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["PretrainedReport", "load_pretrained", "convert_swin_state_dict", "detect_layout",
           "resize_relative_position_bias_table"]

_DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did; every list is sorted."""

    path: str
    layout: str                                        # "official" | "timm"
    loaded: List[str] = field(default_factory=list)    # model keys filled from the checkpoint
    new: List[str] = field(default_factory=list)       # model keys left at their initialisation
    unused: List[str] = field(default_factory=list)    # checkpoint keys (learned) not used
    interpolated: List[str] = field(default_factory=list)  # model keys whose bias table was resized
    decoder_from_encoder: List[str] = field(default_factory=list)  # decoder keys copied from encoder weights
    skipped_buffers: List[str] = field(default_factory=list)       # derived checkpoint buffers (recomputed here)
    backbone_keys: frozenset = field(default_factory=frozenset, repr=False)  # the backbone's model keys

    def new_groups(self) -> Dict[str, List[str]]:
        """``new`` split into ``global_tokens`` (incl. their position embedding), ``gmsa``, ``backbone_other``
        (e.g. the stage LayerNorms 0–2 of the segmentation backbone) and ``head`` (decoder / heads)."""
        groups: Dict[str, List[str]] = {"global_tokens": [], "gmsa": [], "backbone_other": [], "head": []}
        for k in self.new:
            if ".global_tokens" in k or ".global_pos_embed" in k or k.startswith(("global_tokens", "global_pos")):
                groups["global_tokens"].append(k)
            elif ".gmsa." in k or k.startswith("gmsa."):
                groups["gmsa"].append(k)
            elif k in self.backbone_keys:
                groups["backbone_other"].append(k)
            else:
                groups["head"].append(k)
        return groups

    def summary(self) -> str:
        g = self.new_groups()
        lines = [f"pretrained weights from {self.path} ({self.layout} layout): {len(self.loaded)} tensors loaded"
                 + (f", {len(self.decoder_from_encoder)} decoder tensors from the encoder"
                    if self.decoder_from_encoder else "")]
        if self.interpolated:
            lines.append(f"  relative position bias tables resized (bicubic): {len(self.interpolated)}")
        lines.append(f"  new (not in the checkpoint): {len(self.new)} — global tokens {len(g['global_tokens'])}, "
                     f"G-MSA {len(g['gmsa'])}, other backbone {len(g['backbone_other'])}, "
                     f"decoder/heads {len(g['head'])}")
        for name, keys in g.items():
            if keys:
                lines.append(f"    {name}: {', '.join(keys)}")
        lines.append(f"  unused checkpoint keys: {len(self.unused)}" +
                     (f" — {', '.join(self.unused)}" if self.unused else ""))
        if self.skipped_buffers:
            lines.append(f"  derived buffers skipped (recomputed): {len(self.skipped_buffers)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- helpers


def _read_checkpoint(path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError("pretrained checkpoint not found", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors, or objects weights_only refuses
        from ..engine.checkpoint import describe_load_error

        raise UserError(f"cannot read the checkpoint: {describe_load_error(e)}", path) from None
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("not a state dict of tensors (expected a Swin checkpoint: {'model': state_dict} or a "
                        "plain state_dict)", path)
    sd = dict(obj)
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if not any(k.startswith("layers.") for k in sd) or "patch_embed.proj.weight" not in sd:
        raise UserError("not a Swin checkpoint (no patch_embed.proj.weight / layers.* keys)", path)
    return sd


def detect_layout(sd: Dict[str, torch.Tensor]) -> str:
    """``"timm"`` (merging at the start of stages 1..3, ``head.fc``) or ``"official"``."""
    ds = {int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.downsample\.", k)] if m}
    n = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.", k)] if m)
    if any(k.startswith("head.fc.") for k in sd) or (ds and 0 not in ds and (n - 1) in ds):
        return "timm"
    return "official"


def convert_swin_state_dict(sd: Dict[str, torch.Tensor], prefix: str = "", layout: Optional[str] = None
                            ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str], str]:
    """Rename checkpoint keys to :class:`SwinBackbone` keys under ``prefix``.

    Returns ``(mapped {model_key: tensor}, unused checkpoint keys, skipped derived buffers, layout)``.
    """
    layout = layout or detect_layout(sd)
    out: Dict[str, torch.Tensor] = {}
    unused, skipped = [], []
    for k, v in sd.items():
        if k.endswith(_DERIVED_BUFFERS):
            skipped.append(k)
            continue
        new = None
        if k.startswith("patch_embed."):
            new = k
        elif re.match(r"layers\.\d+\.blocks\.", k):
            new = "stages." + k[len("layers."):]
        else:
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
            if m:
                i = int(m.group(1)) - (1 if layout == "timm" else 0)
                new = f"merges.{i}.{m.group(2)}" if i >= 0 else None
            elif k.startswith("norm."):
                new = "out_norms.3." + k[len("norm."):]
        if new is None:
            unused.append(k)
        else:
            out[prefix + new] = v
    return out, unused, skipped, layout


def resize_relative_position_bias_table(table: torch.Tensor, window_size) -> torch.Tensor:
    """``(L1, h)`` table of a square ``(2w-1)²`` grid -> ``(prod(2 ws - 1), h)`` for ``window_size`` (bicubic,
    as microsoft/Swin-Transformer ``load_pretrained``)."""
    L1, h = table.shape
    s1 = int(round(L1 ** 0.5))
    if s1 * s1 != L1:
        raise ValueError(f"relative position bias table of {L1} rows is not a square grid")
    size = tuple(2 * int(w) - 1 for w in window_size)
    grid = table.permute(1, 0).reshape(1, h, s1, s1).float()
    out = F.interpolate(grid, size=size, mode="bicubic")
    return out.reshape(h, -1).permute(1, 0).contiguous().to(table.dtype)


def _find_backbone(model: nn.Module) -> Tuple[nn.Module, str]:
    from .networks.swin import SwinBackbone

    if isinstance(model, SwinBackbone):
        return model, ""
    for name, m in model.named_modules():
        if isinstance(m, SwinBackbone):
            return m, name + "."
    raise ValueError(f"{type(model).__name__} contains no SwinBackbone to load Swin weights into")


# --------------------------------------------------------------------------------------------- main entry


def load_pretrained(model: nn.Module, path, *, decoder_from_encoder: bool = True, verbose: bool = True,
                    layout: Optional[str] = None) -> PretrainedReport:
    """Load an ImageNet Swin checkpoint into ``model`` (a :class:`SwinBackbone` or a network containing one).

    Shape mismatches other than a bias table of another window size raise :class:`UserError` naming the key and
    both shapes (e.g. a Swin-T file for a Swin-B model). ``layout`` forces ``"official"``/``"timm"``.
    """
    backbone, prefix = _find_backbone(model)
    sd = _read_checkpoint(path)
    mapped, unused, skipped, layout = convert_swin_state_dict(sd, prefix, layout)
    own = model.state_dict()
    interpolated = []
    for k, v in list(mapped.items()):
        if k not in own:
            # e.g. a checkpoint with more stages than the model
            unused.append(_original_key(k, prefix, layout))
            del mapped[k]
            continue
        if v.shape != own[k].shape:
            if k.endswith("relative_position_bias_table") and v.shape[1] == own[k].shape[1]:
                attn = model.get_submodule(k[:-len(".relative_position_bias_table")])
                v = resize_relative_position_bias_table(v, attn.window_size)
                if v.shape != own[k].shape:
                    raise UserError(f"{k}: cannot resize the bias table to {tuple(own[k].shape)}", path)
                mapped[k] = v
                interpolated.append(k)
            else:
                raise UserError(f"checkpoint tensor {_original_key(k, prefix, layout)} has shape {tuple(v.shape)} "
                                f"but the model's {k} has {tuple(own[k].shape)} (a checkpoint of another Swin "
                                f"size?)", path)
    from_encoder: Dict[str, torch.Tensor] = {}
    decoder = getattr(model, "decoder", None)
    if decoder_from_encoder and isinstance(decoder, nn.ModuleList) and prefix:
        # Swin-Unet: decoder[l] mirrors encoder stage l (same dim, depth, heads)
        dec_prefix = next(n for n, m in model.named_modules() if m is decoder) + "."
        for k, v in mapped.items():
            m = re.match(re.escape(prefix) + r"stages\.(\d+)\.(blocks\..*)", k)
            if m:
                dk = f"{dec_prefix}{m.group(1)}.{m.group(2)}"
                if dk in own and own[dk].shape == v.shape:
                    from_encoder[dk] = v
    missing, unexpected = model.load_state_dict({**mapped, **from_encoder}, strict=False)
    assert not unexpected, unexpected  # every mapped key was checked against the model above
    loaded = set(mapped) | set(from_encoder)
    report = PretrainedReport(
        path=str(path), layout=layout, loaded=sorted(mapped), interpolated=sorted(interpolated),
        new=sorted(k for k in own if k not in loaded and not k.endswith(_DERIVED_BUFFERS)),
        unused=sorted(unused), decoder_from_encoder=sorted(from_encoder), skipped_buffers=sorted(skipped),
        backbone_keys=frozenset(prefix + k for k in backbone.state_dict()))
    if verbose:
        print(report.summary())
    return report


def _original_key(model_key: str, prefix: str, layout: str) -> str:
    """Best-effort inverse of the mapping, for messages."""
    k = model_key[len(prefix):] if model_key.startswith(prefix) else model_key
    if k.startswith("stages."):
        return "layers." + k[len("stages."):]
    m = re.match(r"merges\.(\d+)\.(.*)", k)
    if m:
        return f"layers.{int(m.group(1)) + (1 if layout == 'timm' else 0)}.downsample.{m.group(2)}"
    if k.startswith("out_norms.3."):
        return "norm." + k[len("out_norms.3."):]
    return k

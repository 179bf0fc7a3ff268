"""No dead weights: every trainable parameter of every registered network (2D and 3D, GLAM and vanilla, both GLAM
variants) gets a non-zero gradient from one training step at the network's own crop geometry.

The loss is a fixed random projection of every output (deep-supervision levels and auxiliary heads included): a
uniform loss such as ``out.sum()`` sends the same gradient to every channel, which LayerNorm cancels, so it would
both hide unused weights and report used ones as dead. Widths are shrunk (channels, heads, classes, global
tokens) to keep the step fast on a CPU; depths, windows, crops, levels and wiring are the registered ones
(Swin crops are cut to 224, where every stage's windows are still full, as they are at 512). Drop-path and
dropout are off: they zero branches at random.
"""
from __future__ import annotations

import pytest
import torch

from glam3d.models import build_model, families, list_models

torch.set_num_threads(1)

#: shrunk widths per family (everything else as registered)
SHRINK = {
    "nnformer": dict(embed_dim=4, num_heads=(1, 1, 2, 2), num_classes=3),
    "swin_unet": dict(embed_dim=8, num_heads=(1, 1, 2, 2), num_classes=3, default_crop=(224, 224)),
    "swin_upernet": dict(embed_dim=8, num_heads=(1, 1, 2, 2), num_classes=3, default_crop=(224, 224), channels=8,
                         aux_channels=8, dropout=0.0),
    "swin_unetr": dict(feature_size=12, num_heads=(1, 1, 1, 1), num_classes=3),
}
#: tables whose every row must be trained (a row never read is a dead weight a tensor-level check would miss)
ROW_TABLES = ("global_tokens", "global_pos_embed", "relative_position_bias_table")


def _cases():
    fams = families()
    out = []
    for name in list_models():
        fam = next(f for f in sorted(fams, key=len, reverse=True) if name.startswith(f + "_"))
        if fam.startswith("glam_"):
            out += [pytest.param(name, {"glam_variant": v, "num_global_tokens": 2}, id=f"{name}-{v}")
                    for v in ("authors", "paper")]
        else:
            out.append(pytest.param(name, {}, id=name))
    return out


def _shrink(name: str) -> dict:
    key = next(k for k in sorted(SHRINK, key=len, reverse=True) if name.startswith((k + "_", "glam_" + k + "_")))
    return dict(SHRINK[key])


@pytest.mark.parametrize("name,extra", _cases())
def test_every_parameter_gets_a_gradient(name, extra):
    kwargs = {**_shrink(name), **extra}
    if not name.startswith("swin_unetr"):
        kwargs["drop_path_rate"] = 0.0
    torch.manual_seed(0)
    model = build_model(name, **kwargs).train()
    assert all(p.requires_grad for p in model.parameters())
    crop = tuple(model.default_crop)
    batch = 2 if model.spatial_dims == 2 else 1  # (2D: BatchNorm in UperNet's pooling branch needs two values)
    out = model(torch.randn(batch, model.in_channels, *crop))
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if getattr(model, "deep_supervision", False):
        assert len(outs) > 1  # every deep-supervision head is in the loss
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{name}: {len(dead)} parameters get no gradient: {dead[:8]}"
    if not name.startswith("swin_unetr"):  # (MONAI's own tables: its windows are clipped on this crop)
        rows = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ROW_TABLES
                and not (p.grad.reshape(p.shape[0], -1).abs().sum(1) > 0).all()]
        assert not rows, f"{name}: tables with untrained rows: {rows[:8]}"


def test_the_check_finds_a_dead_weight():
    """The same check on a network with a G-MSA after the last block of every level (whose output nobody reads):
    those weights are reported."""
    from glam3d.models.glam import GLAMLayer

    torch.manual_seed(0)
    layer = GLAMLayer(8, 2, 2, (2, 2), num_global_tokens=2, glam_variant="paper", last_gmsa=True,
                      input_resolution=(4, 4))
    y = layer(torch.randn(1, 8, 4, 4))
    (y * torch.randn_like(y)).sum().backward()
    dead = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead and all(n.startswith("gmsa.1.") for n in dead)

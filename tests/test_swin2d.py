"""2D (GLAM-)Swin-UperNet and (GLAM-)Swin-Unet: registry, shapes, padding, parameter counts, a short fit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from glam3d.models import build_model, families
from glam3d.models.glam import GLAMLayer
from glam3d.models.networks.swin import SwinBackbone, swin_stage_resolutions
from glam3d.models.networks.swin_unet import PatchExpand2d

TINY = dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4, num_classes=5,
            default_crop=(64, 64))
HEAD = dict(channels=16, aux_channels=8)
VARIANTS = ["swin_upernet_tiny", "glam_swin_upernet_tiny", "swin_upernet_small", "glam_swin_upernet_base",
            "swin_unet_tiny", "glam_swin_unet_tiny", "swin_unet_base", "glam_swin_unet_base"]


def small(name, **kw):
    extra = dict(HEAD) if "upernet" in name else {}
    return build_model(name, **{**TINY, **extra, **kw})


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_registry_families_and_twins():
    fams = families()
    assert set(fams["swin_upernet"].sizes) == set(fams["glam_swin_upernet"].sizes) == {"tiny", "small", "base"}
    assert set(fams["swin_unet"].sizes) == set(fams["glam_swin_unet"].sizes) == {"tiny", "base"}
    assert fams["glam_swin_upernet"].twin == "swin_upernet" and fams["glam_swin_unet"].twin == "swin_unet"
    assert fams["glam_swin_unet"].sizes["tiny"]["nlu"] is True and fams["swin_unet"].sizes["tiny"]["nlu"] is False
    assert fams["swin_upernet"].sizes["base"] == {"embed_dim": 128, "depths": [2, 2, 18, 2],
                                                  "num_heads": [4, 8, 16, 32], "num_global_tokens": 0}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(64, 64), (50, 71)])
def test_shapes_all_variants(name, size):
    torch.manual_seed(0)
    m = small(name)
    assert (m.spatial_dims, m.in_channels, m.num_classes, m.default_crop) == (2, 3, 5, (64, 64))
    assert m.glam3d_spec["name"] == name
    x = torch.randn(2, 3, *size)
    m.train()
    out = m(x)
    if "upernet" in name:
        assert isinstance(out, tuple) and len(out) == 2 and m.aux_weights == (1.0, 0.4)
        assert all(o.shape == (2, 5, *size) for o in out)
    else:
        assert out.shape == (2, 5, *size)
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 5, *size) and torch.isfinite(y).all()


def test_glam_vs_vanilla_structure():
    van, glam = small("swin_upernet_tiny"), small("glam_swin_upernet_tiny")
    assert not any("global" in k or ".gmsa." in k for k in van.state_dict())
    assert all(s.num_global_tokens == 10 and s.use_gmsa for s in glam.backbone.stages)
    # GLAM with 0 global tokens is exactly the vanilla network (same keys, same shapes)
    zero = small("glam_swin_upernet_tiny", num_global_tokens=0)
    assert {k: v.shape for k, v in zero.state_dict().items()} == {k: v.shape for k, v in van.state_dict().items()}
    nogmsa = small("glam_swin_upernet_tiny", gmsa=False)
    assert not any(".gmsa." in k for k in nogmsa.state_dict())
    assert any(".global_tokens" in k for k in nogmsa.state_dict())

    un, gun = small("swin_unet_tiny"), small("glam_swin_unet_tiny")
    assert all(isinstance(u, PatchExpand2d) for u in un.up)
    assert all(type(u).__name__ == "_NLUUp" for u in gun.up)
    assert all(isinstance(d, GLAMLayer) and d.num_global_tokens == 10 for d in gun.decoder)
    assert [d.depth for d in gun.decoder] == TINY["depths"][:3]
    no_nlu = small("glam_swin_unet_tiny", nlu=False)
    assert all(isinstance(u, PatchExpand2d) for u in no_nlu.up)


def test_backbone_feature_maps_and_padding():
    bb = SwinBackbone(3, 8, [2, 2, 2, 2], [1, 2, 2, 4], window_size=4, drop_path_rate=0.0).eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 61, 90))  # not multiples of patch x window
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 23), (1, 16, 8, 12), (1, 32, 4, 6), (1, 64, 2, 3)]
    assert swin_stage_resolutions((61, 90)) == [(16, 23), (8, 12), (4, 6), (2, 3)]
    with pytest.raises(ValueError, match="num_heads"):
        SwinBackbone(3, 8, [2, 2], [3, 2])
    with pytest.raises(ValueError, match="image batch"):
        bb(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_global_pos_embed_builds_from_default_crop(variant):
    from glam3d.models.networks.swin import authors_pos_rows
    m = small("glam_swin_upernet_tiny", global_clamp=True, glam_variant=variant)
    # paper: 64x64 crop -> stage 0 map 16x16, window 4 -> 4x4 window grid; authors: their (45 N_g / 2^i)^2 rows
    want = [(10, 8 * 2 ** i, *(4 // 2 ** i,) * 2) if variant == "paper" else (authors_pos_rows(i, 10), 8 * 2 ** i)
            for i in range(3)]
    assert [tuple(s.global_pos_embed.shape) for s in m.backbone.stages[:3]] == want
    assert authors_pos_rows(0, 10) == 450 ** 2 and authors_pos_rows(2, 10) == 112 ** 2
    assert small("glam_swin_upernet_tiny", global_pos_embed=False).backbone.stages[0].global_pos_embed is None
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5, 64, 64)


@pytest.mark.parametrize("name,lo,hi", [("swin_upernet_tiny", 59.5e6, 60.5e6),    # Swin-T UperNet: 60M (mmseg)
                                        ("swin_upernet_base", 120.5e6, 122e6)])   # Swin-B UperNet: 121M
def test_published_parameter_counts(name, lo, hi):
    with torch.device("meta"):  # full-size models without allocating or initialising weights
        m = build_model(name)
        glam = build_model("glam_" + name)
    assert lo < n_params(m) < hi
    assert n_params(glam) > n_params(m)  # G-MSA layer per block + global tokens


def test_glam_swin_upernet_base_counts_the_papers_197m():
    """Paper table 6: GLAM-Swin-UperNet-B has 197 M parameters. The authors variant builds their block: Swin-
    UperNet-B (121.3 M) + bare G-MSA before each of the 24 blocks (4 C^2 + 4 C each, 28.0 M) + their position
    tables of (45 N_g / 2^i)^2 x C per level (48.5 M) + tokens; the paper variant's full G-MSA layers (12 C^2) sit
    between blocks only (20 of them) and its tables cover the crop's windows."""
    with torch.device("meta"):
        authors = build_model("glam_swin_upernet_base", num_classes=150, glam_variant="authors")
        paper = build_model("glam_swin_upernet_base", num_classes=150, glam_variant="paper")
        vanilla = build_model("swin_upernet_base", num_classes=150)
    assert abs(n_params(authors) / 197e6 - 1) < 0.015, n_params(authors)
    gmsa = sum(p.numel() for n, p in authors.named_parameters() if ".gmsa." in n)
    tables = sum(p.numel() for n, p in authors.named_parameters() if n.endswith("global_pos_embed"))
    assert sum(len(s.gmsa) for s in authors.backbone.stages) == 24
    assert abs(gmsa / 28.0e6 - 1) < 0.01 and abs(tables / 48.5e6 - 1) < 0.01
    assert sum(len(s.gmsa) for s in paper.backbone.stages) == 20
    assert n_params(vanilla) < n_params(paper) < n_params(authors)


@pytest.mark.parametrize("name", ["glam_swin_upernet_tiny", "glam_swin_unet_tiny"])
def test_few_steps_reduce_loss_on_synthetic_set(name, tmp_path):
    from glam3d.data.natural import build_2d_datasets

    torch.manual_seed(0)
    train, _, names = build_2d_datasets({"dataset": "synthetic", "root": str(tmp_path), "crop_size": [48, 48],
                                         "photometric": False, "img_scale": None,
                                         "synthetic": {"num_train": 4, "num_val": 1, "size": [48, 48],
                                                       "num_classes": 3}})
    items = [train[i] for i in range(4)]
    x = torch.stack([it["image"] for it in items])
    y = torch.stack([it["label"] for it in items])
    model = small(name, num_classes=len(names), num_global_tokens=2, default_crop=(48, 48))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ce = nn.CrossEntropyLoss(ignore_index=255)
    losses = []
    for _ in range(12):
        out = model(x)
        outs = out if isinstance(out, tuple) else (out,)
        weights = getattr(model, "aux_weights", (1.0,))
        loss = sum(w * ce(o, y) for w, o in zip(weights, outs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

"""ImageNet Swin checkpoints (official + timm layouts) load into glam3d's (GLAM-)Swin backbones.

The reference below is a deliberately plain re-implementation of the official Swin (microsoft/Swin-Transformer
key layout: ``layers.{i}.blocks.{j}.attn.qkv``, ``relative_position_bias_table``, ``relative_position_index`` and
``attn_mask`` buffers, ``layers.{i}.downsample`` at the end of stage i, ``norm``, ``head``), written with loops
and explicit softmax, sharing no code with glam3d. Tiny dims keep it fast.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from glam3d.errors import UserError
from glam3d.models import build_model
from glam3d.models.networks.swin import SwinBackbone
from glam3d.models.pretrained import detect_layout, load_pretrained

EMBED, DEPTHS, HEADS, WS, IMG = 8, (2, 2, 2, 2), (1, 2, 2, 4), 2, 64


# ------------------------------------------------------------------------------------------ reference Swin
class RefAttention(nn.Module):
    def __init__(self, dim, heads, ws):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        idx = torch.zeros(ws * ws, ws * ws, dtype=torch.long)
        for a in range(ws * ws):
            for b in range(ws * ws):
                dy = a // ws - b // ws + ws - 1
                dx = a % ws - b % ws + ws - 1
                idx[a, b] = dy * (2 * ws - 1) + dx
        self.register_buffer("relative_position_index", idx)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):  # x (nW*B, N, C), mask (nW, N, N) or None
        n, N, C = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(n, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        attn = (q * (C // h) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, h)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(n // nw, nw, h, N, N) + mask[None, :, None]).view(n, h, N, N)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def ref_partition(x, ws):  # (B, H, W, C) -> (B*nW, ws*ws, C)
    B, H, W, C = x.shape
    wins = []
    for b in range(B):
        for i in range(H // ws):
            for j in range(W // ws):
                wins.append(x[b, i * ws:(i + 1) * ws, j * ws:(j + 1) * ws].reshape(ws * ws, C))
    return torch.stack(wins)


def ref_reverse(wins, ws, B, H, W):
    C = wins.shape[-1]
    x = wins.new_zeros(B, H, W, C)
    n = 0
    for b in range(B):
        for i in range(H // ws):
            for j in range(W // ws):
                x[b, i * ws:(i + 1) * ws, j * ws:(j + 1) * ws] = wins[n].view(ws, ws, C)
                n += 1
    return x


class RefBlock(nn.Module):
    def __init__(self, dim, heads, ws, shift, res):
        super().__init__()
        if min(res) <= ws:  # official: one window covers the map, no shift
            ws, shift = min(res), 0
        self.ws, self.shift = ws, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads, ws)
        self.mlp = RefMlp(dim)
        if shift:
            H, W = res
            img = torch.zeros(1, H, W, 1)
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    img[:, hs, wsl] = cnt
                    cnt += 1
            mw = ref_partition(img, ws).squeeze(-1)
            m = mw[:, None, :] - mw[:, :, None]
            self.register_buffer("attn_mask", m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0))
        else:
            self.attn_mask = None

    def forward(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = ref_reverse(self.attn(ref_partition(y, self.ws), self.attn_mask), self.ws, B, H, W)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class RefMerge(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class RefStage(nn.Module):
    def __init__(self, dim, depth, heads, ws, res, last):
        super().__init__()
        self.blocks = nn.ModuleList([RefBlock(dim, heads, ws, 0 if j % 2 == 0 else ws // 2, res)
                                     for j in range(depth)])
        self.downsample = None if last else RefMerge(dim)


class RefPatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, dim, 4, 4), nn.LayerNorm(dim)


class RefSwin(nn.Module):
    def __init__(self, embed=EMBED, depths=DEPTHS, heads=HEADS, ws=WS, img=IMG, num_classes=7):
        super().__init__()
        self.patch_embed = RefPatchEmbed(embed)
        res = img // 4
        self.layers = nn.ModuleList()
        for i, (d, h) in enumerate(zip(depths, heads)):
            self.layers.append(RefStage(embed * 2 ** i, d, h, ws, (res, res), i == len(depths) - 1))
            res //= 2
        self.norm = nn.LayerNorm(embed * 2 ** (len(depths) - 1))
        self.head = nn.Linear(embed * 2 ** (len(depths) - 1), num_classes)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in self.named_parameters():  # random everything, LayerNorm affine included
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.3)

    def features(self, x):
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        outs = []
        for layer in self.layers:
            for blk in layer.blocks:
                x = blk(x)
            outs.append(self.norm(x) if layer.downsample is None else x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return [o.permute(0, 3, 1, 2) for o in outs]


def to_timm(sd):
    """Official -> current timm keys: no buffers, merging at the start of the next stage, head.fc."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        k = k.replace("head.", "head.fc.")
        out[k] = v
    return out


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return RefSwin().eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def our_backbone(**kw):
    return SwinBackbone(3, EMBED, DEPTHS, HEADS, window_size=kw.pop("window_size", WS), drop_path_rate=0.0,
                        **kw).eval()


def expected(ref, image):
    with torch.no_grad():
        feats = ref.features(image)
    # the segmentation backbone's stage LayerNorms 0..2 are new (weight 1, bias 0); stage 3 uses the loaded norm
    return [F.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2]).permute(0, 3, 1, 2) for f in feats[:3]] + [feats[3]]


def _buffers(sd):
    return sorted(k for k in sd if k.endswith(("relative_position_index", "attn_mask")))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layout", ["official", "timm"])
def test_loaded_backbone_matches_reference(ref, image, tmp_path, layout, capsys):
    sd = ref.state_dict()
    path = tmp_path / f"swin_{layout}.pth"
    torch.save({"model": sd} if layout == "official" else to_timm(sd), path)
    bb = our_backbone()
    rep = load_pretrained(bb, path)
    assert rep.layout == layout
    assert rep.interpolated == []
    assert rep.new == sorted(f"out_norms.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert rep.unused == (["head.bias", "head.weight"] if layout == "official" else ["head.fc.bias", "head.fc.weight"])
    assert rep.skipped_buffers == (_buffers(sd) if layout == "official" else [])
    n_learned = len([k for k in sd if not k.endswith(("relative_position_index", "attn_mask", "head.weight",
                                                                 "head.bias"))])
    assert len(rep.loaded) == n_learned
    out = capsys.readouterr().out
    assert "unused checkpoint keys: 2" in out and f"({layout} layout)" in out
    with torch.no_grad():
        ours = bb(image)
    for a, b in zip(ours, expected(ref, image)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_layout_detection_and_wrappers(ref, tmp_path, image):
    sd = ref.state_dict()
    assert detect_layout(sd) == "official" and detect_layout(to_timm(sd)) == "timm"
    # mmcv-style wrapper with a backbone. prefix
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in sd.items()}}, path)
    bb = our_backbone()
    rep = load_pretrained(bb, path, verbose=False)
    assert rep.unused == ["head.bias", "head.weight"]
    with torch.no_grad():
        torch.testing.assert_close(bb(image)[3], expected(ref, image)[3], rtol=1e-4, atol=1e-4)


def test_glam_backbone_new_keys_exact(ref, tmp_path, image):
    path = tmp_path / "swin.pth"
    torch.save({"model": ref.state_dict()}, path)
    bb = our_backbone(num_global_tokens=3)
    rep = load_pretrained(bb, path, verbose=False)
    own = bb.state_dict()
    glam_keys = sorted(k for k in own if ".global_tokens" in k or ".global_pos_embed" in k or ".gmsa." in k)
    assert glam_keys and all(f"stages.{i}.global_tokens" in glam_keys for i in range(4))
    assert rep.new == sorted(glam_keys + [f"out_norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")])
    groups = rep.new_groups()
    assert groups["global_tokens"] == sorted(f"stages.{i}.{n}" for i in range(4)
                                             for n in ("global_tokens", "global_pos_embed"))
    assert groups["gmsa"] == sorted(k for k in glam_keys if ".gmsa." in k)
    assert len(groups["backbone_other"]) == 6 and groups["head"] == []
    # the window-attention weights are the reference's
    torch.testing.assert_close(own["stages.2.blocks.1.attn.qkv.weight"], ref.layers[2].blocks[1].attn.qkv.weight)
    torch.testing.assert_close(own["merges.1.reduction.weight"], ref.layers[1].downsample.reduction.weight)
    with torch.no_grad():
        out = bb(image)
    assert [tuple(o.shape) for o in out] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]


def test_window_interpolation_bicubic(ref, tmp_path):
    path = tmp_path / "swin.pth"
    torch.save({"model": ref.state_dict()}, path)
    bb = our_backbone(window_size=3)
    rep = load_pretrained(bb, path, verbose=False)
    tables = sorted(k for k in bb.state_dict() if k.endswith("relative_position_bias_table"))
    assert rep.interpolated == tables and len(tables) == sum(DEPTHS)
    src = ref.layers[1].blocks[0].attn.relative_position_bias_table.detach()  # (9, h)
    h = src.shape[1]
    want = F.interpolate(src.t().reshape(1, h, 3, 3), size=(5, 5), mode="bicubic").reshape(h, 25).t()
    torch.testing.assert_close(bb.stages[1].blocks[0].attn.relative_position_bias_table.detach(), want)
    assert bb.stages[1].blocks[0].attn.relative_position_bias_table.shape == (25, h)


def test_full_models_prefixes_and_decoder_from_encoder(ref, tmp_path, image):
    path = tmp_path / "swin.pth"
    torch.save(to_timm(ref.state_dict()), path)
    common = dict(embed_dim=EMBED, depths=list(DEPTHS), num_heads=list(HEADS), window_size=WS, num_classes=4,
                  default_crop=(IMG, IMG))
    up = build_model("glam_swin_upernet_tiny", channels=16, aux_channels=8, num_global_tokens=2, **common).eval()
    rep = load_pretrained(up, path, verbose=False)
    g = rep.new_groups()
    assert all(k.startswith("backbone.") for k in rep.loaded)
    assert g["head"] and all(k.startswith(("decode_head.", "auxiliary_head.")) for k in g["head"])
    assert g["global_tokens"] == sorted(f"backbone.stages.{i}.{n}" for i in range(4)
                                        for n in ("global_tokens", "global_pos_embed"))
    assert rep.decoder_from_encoder == []

    un = build_model("swin_unet_tiny", **common).eval()
    rep = load_pretrained(un, path, verbose=False)
    assert all(k.startswith("encoder.") for k in rep.loaded)
    assert "encoder.out_norms.3.weight" in rep.loaded  # Swin-Unet's bottleneck norm = ImageNet norm
    assert rep.decoder_from_encoder and all(k.startswith("decoder.") for k in rep.decoder_from_encoder)
    for l in range(3):
        torch.testing.assert_close(un.decoder[l].blocks[0].attn.qkv.weight, ref.layers[l].blocks[0].attn.qkv.weight)
    assert not any(k.startswith("decoder.") and ".blocks." in k for k in rep.new)
    assert "head.weight" in rep.new and "final_expand.expand.weight" in rep.new
    with torch.no_grad():
        feats = un.encoder(image)
    torch.testing.assert_close(feats[3], expected(ref, image)[3], rtol=1e-4, atol=1e-4)


def test_bad_checkpoints(ref, tmp_path):
    bb = our_backbone()
    with pytest.raises(UserError, match="not found"):
        load_pretrained(bb, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pth: cannot read"):
        load_pretrained(bb, tmp_path / "junk.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a Swin checkpoint"):
        load_pretrained(bb, tmp_path / "other.pth")
    torch.save({"model": ref.state_dict()}, tmp_path / "swin.pth")
    wider = SwinBackbone(3, 16, DEPTHS, HEADS, window_size=WS)
    with pytest.raises(UserError, match=r"patch_embed\.proj\.weight has shape \(8, 3, 4, 4\)") as e:
        load_pretrained(wider, tmp_path / "swin.pth")
    assert "\n" not in str(e.value)

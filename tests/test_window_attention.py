"""N-D window helpers and WindowAttention (2D and 3D)."""
import math

import pytest
import torch

from glam3d.models.window import (MASK_VALUE, WindowAttention, effective_window, pad_to_multiple,
                                  relative_position_index, shift_window_mask, window_partition, window_reverse)

torch.set_num_threads(1)


@pytest.mark.parametrize("shape,ws", [((8, 12), (4, 4)), ((4, 8, 6), (2, 4, 3))])
def test_partition_roundtrip_and_order(shape, ws):
    x = torch.randn(2, *shape, 5)
    w = window_partition(x, ws)
    n_r = math.prod(s // k for s, k in zip(shape, ws))
    assert w.shape == (2 * n_r, math.prod(ws), 5)
    assert torch.equal(window_reverse(w, ws, shape), x)
    # window 0 of image 1 is the first corner block of image 1, raster order inside
    corner = x[(1,) + tuple(slice(0, k) for k in ws)].reshape(-1, 5)
    assert torch.equal(w[n_r], corner)


def test_pad_and_effective_window():
    x = torch.randn(1, 5, 7, 3)
    assert pad_to_multiple(x, (4, 4)).shape == (1, 8, 8, 3)
    assert effective_window((3, 16), (4, 4), (2, 2)) == ((3, 4), (0, 2))
    with pytest.raises(ValueError, match="window_size"):
        effective_window((3, 16, 16), (4, 4), (2, 2))


def _swin_mask_2d(H, W, w, s):
    """Swin's original slice-based mask (2D) for comparison."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    sl = (slice(0, -w), slice(-w, -s), slice(-s, None))
    for h in sl:
        for ww in sl:
            img[:, h, ww, :] = cnt
            cnt += 1
    mw = window_partition(img, (w, w)).squeeze(-1)
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, MASK_VALUE).masked_fill(m == 0, 0.0)


def test_shift_mask_matches_swin_and_is_cached():
    m = shift_window_mask((8, 12), (4, 4), (2, 2))
    assert torch.equal(m, _swin_mask_2d(8, 12, 4, 2))
    assert shift_window_mask((8, 12), (4, 4), (2, 2)) is m  # cached
    m3 = shift_window_mask((4, 4, 4), (2, 2, 2), (1, 1, 1))
    assert m3.shape == (8, 8, 8)
    assert (m3[0] == 0).all() and (m3[-1] != 0).any()


def test_relative_position_index_2d_matches_swin():
    w = (3, 4)
    coords = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).clone()
    rel[:, :, 0] += w[0] - 1
    rel[:, :, 1] += w[1] - 1
    rel[:, :, 0] *= 2 * w[1] - 1
    assert torch.equal(relative_position_index(w), rel.sum(-1))
    assert relative_position_index(w) is relative_position_index(w)
    # a clipped window indexes into the nominal table and stays in range
    idx = relative_position_index((2, 2, 2), (4, 4, 4))
    assert idx.max() < 7 ** 3 and idx.unique().numel() == 27


@pytest.mark.parametrize("ws", [(2, 3), (2, 2, 2)])
@pytest.mark.parametrize("prefix", [0, 2])
def test_sdpa_matches_explicit_path(ws, prefix):
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, ws)
    n_p = math.prod(ws)
    x = torch.randn(6, prefix + n_p, 8)
    mask = torch.zeros(3, n_p, n_p)
    mask[1, 0, 1:] = MASK_VALUE
    fast = attn(x, window_size=ws, mask=mask, num_prefix=prefix)
    attn.store_attn = True
    slow = attn(x, window_size=ws, mask=mask, num_prefix=prefix)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    a = attn.last_attn  # (6, h, L, L)
    if prefix:
        # global tokens are never masked: attention to them is positive everywhere
        assert (a[..., :prefix] > 0).all()
    # masked pairs of window 1 (and of window 4 = image 1, window 1) get ~0 weight
    assert a[1, :, prefix, prefix + 1:].max() < 1e-30 and a[4, :, prefix, prefix + 1:].max() < 1e-30


def test_cross_attention_uses_context_for_keys():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, (2, 2), cross=True)
    assert not hasattr(attn, "qkv") and attn.q is None
    x, c = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    y1 = attn(x, c, (2, 2))
    y2 = attn(x, c + 1.0, (2, 2))
    assert not torch.allclose(y1, y2)
    with pytest.raises(ValueError, match="context"):
        attn(x)


def test_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention(10, 3, (2, 2))


@pytest.mark.parametrize("ws,Sp,shift", [((4, 4), (8, 12), (0, 0)), ((4, 4), (8, 12), (2, 2)),
                                         ((2, 2, 2), (4, 4, 6), (0, 0, 0)), ((2, 4, 2), (4, 8, 6), (1, 2, 1)),
                                         ((2, 2, 2), (2, 4, 6), (0, 1, 1))])
def test_partition_with_prefix_equals_cat(ws, Sp, shift):
    from glam3d.models.window import partition_with_prefix, roll, window_partition
    torch.manual_seed(0)
    B, C, P = 2, 5, 3
    x = torch.randn(B, *Sp, C, requires_grad=True)
    n_r = B * math.prod(s // w for s, w in zip(Sp, ws))
    prefix = torch.randn(n_r, P, C, requires_grad=True)
    ref = torch.cat([prefix, window_partition(roll(x, shift, -1), ws)], 1)
    got = partition_with_prefix(x, ws, shift, prefix)
    assert torch.equal(got, ref)
    w = torch.randn_like(ref)
    gref = torch.autograd.grad((ref * w).sum(), (x, prefix))
    ggot = torch.autograd.grad((got * w).sum(), (x, prefix))
    assert all(torch.equal(a, b) for a, b in zip(gref, ggot))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("prefix_queries", [True, False])
def test_prefixed_attention_mask_layout(shifted, prefix_queries):
    """Bias (+ shift mask) sits on the window<->window block; prefix rows / columns are 0; batch expansion."""
    import torch.nn.functional as F
    from glam3d.models.window import WindowAttention, shift_window_mask
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, (2, 2, 2))
    mask = shift_window_mask((4, 4, 4), (2, 2, 2), (1, 1, 1)) if shifted else None
    n_r = 8
    with torch.no_grad():
        bias = attn.relative_position_bias((2, 2, 2))
        base = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
        ref = F.pad(base, (3, 0, 3 if prefix_queries else 0, 0))
        if mask is not None:
            ref = ref.repeat(2, 1, 1, 1)
        got = attn.attn_mask(2 * n_r, (2, 2, 2), mask, 3, torch.float32, prefix_queries)
    assert torch.equal(got.expand_as(ref), ref)


@pytest.mark.parametrize("Sp,ws,shift,n_classes", [((8, 12), (4, 4), (2, 2), 4), ((8, 12), (4, 4), (0, 2), 2),
                                                   ((8, 8, 12), (4, 4, 4), (2, 2, 2), 8),
                                                   ((4, 6, 6), (2, 2, 3), (1, 0, 1), 4)])
def test_window_classes_share_one_mask(Sp, ws, shift, n_classes):
    """Every window of a class has the same shift mask; interior windows (most) are unmasked; the order is a
    permutation that the class-ordered partition index follows."""
    from glam3d.models.window import shifted_window_index, window_classes
    c = window_classes(Sp, ws, shift)
    full = shift_window_mask(Sp, ws, shift)
    n_r = full.shape[0]
    assert len(c.counts) == n_classes and sum(c.counts) == n_r
    assert torch.equal(torch.sort(c.perm).values, torch.arange(n_r)) and torch.equal(c.perm[c.inv], torch.arange(n_r))
    assert torch.equal(c.full_mask(), full[c.perm])
    assert c.masked == (False,) + (True,) * (n_classes - 1)
    assert c.counts[0] == math.prod(s // w - (1 if t else 0) for s, w, t in zip(Sp, ws, shift))
    idx, _ = shifted_window_index(Sp, ws, shift)
    idx_c, inv_c = shifted_window_index(Sp, ws, shift, by_class=True)
    n_p = math.prod(ws)
    assert torch.equal(idx_c.view(n_r, n_p), idx.view(n_r, n_p)[c.perm])
    assert torch.equal(idx_c[inv_c], torch.arange(idx.numel()))


@pytest.mark.parametrize("ws,Sp,shift", [((2, 2, 2), (4, 6, 4), (1, 1, 1)), ((4, 4), (8, 12), (2, 2))])
@pytest.mark.parametrize("prefix,prefix_queries", [(0, True), (3, True), (3, False)])
def test_attention_by_class_equals_full_mask(ws, Sp, shift, prefix, prefix_queries):
    """Per-class SDPA with small masks == one call with the (B_, h, L, L) mask, values and gradients."""
    from glam3d.models.window import window_classes
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, ws)
    c = window_classes(Sp, ws, shift)
    B_ = 2 * sum(c.counts)
    x = torch.randn(B_, prefix + math.prod(ws), 8, requires_grad=True)
    outs, grads = [], []
    for kw in (dict(classes=c), dict(mask=c.full_mask())):
        y = attn(x, None, ws, num_prefix=prefix, prefix_queries=prefix_queries, **kw)
        outs.append(y)
        grads.append(torch.autograd.grad((y ** 2).sum(), (x, attn.relative_position_bias_table)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the no-autograd path caches one small mask per class
        attn(x, None, ws, num_prefix=prefix, prefix_queries=prefix_queries, classes=c)
        sizes = [v.shape for k, v in attn._mask_cache.items() if k != "stamp" and k[0] != "bias"]
    assert sizes and all(s[0] == 1 for s in sizes)


@pytest.mark.parametrize("ws,grid,shift", [((2, 3), (1, 4), (1, 1)), ((4, 4), (3, 1), (2, 0)), ((3, 2), (2, 2), (1, 1)),
                                           ((2, 2, 2), (1, 1, 1), (1, 1, 1)), ((2, 4, 2), (3, 2, 1), (1, 2, 0)),
                                           ((4, 2, 2), (2, 3, 2), (3, 1, 1))])
def test_window_classes_from_shapes_equal_classes_from_masks(ws, grid, shift):
    """Class sizes and "masked" flags come from the shapes alone (so torch.compile can trace them): they must
    equal what the masks say — every window of a class carries the class's mask, and a class is flagged masked
    exactly when that mask has a non-zero entry (single-window axes and shifts other than w/2 included)."""
    from glam3d.models.window import window_classes
    Sp = tuple(g * w for g, w in zip(grid, ws))
    c = window_classes(Sp, ws, shift)
    full = shift_window_mask(Sp, ws, shift)
    assert sum(c.counts) == full.shape[0] and all(n > 0 for n in c.counts)
    start = 0
    for k, n in enumerate(c.counts):
        members = full[c.perm[start:start + n]]
        assert torch.equal(members, c.masks[k].expand_as(members))
        assert c.masked[k] == bool(c.masks[k].any())
        start += n
    distinct = {tuple(m.flatten().tolist()) for m in full}
    assert len(distinct) == len(c.counts)  # windows with the same mask are in one class


def test_key_padding_rule():
    """Pad [global; window] to a multiple of 16 only where that adds at most an eighth."""
    from glam3d.models.window import key_padding
    assert key_padding(10, 64, 16) == 6       # GLAM-nnFormer: 74 -> 80
    assert key_padding(10, 49, 16) == 5       # GLAM-Swin, window 7: 59 -> 64
    assert key_padding(10, 512, 16) == 6      # 522 -> 528
    assert key_padding(0, 49, 16) == 0        # no prefix: never padded
    assert key_padding(6, 58, 16) == 0        # already a multiple
    assert key_padding(2, 8, 16) == 0         # 10 -> 16 would add 60 %
    assert key_padding(10, 64, 0) == 0        # switched off


@pytest.mark.parametrize("ws,Sp,shift", [((4, 4), (8, 12), (0, 0)), ((2, 4, 2), (4, 8, 6), (1, 2, 1))])
def test_partition_with_prefix_pads_zero_rows(ws, Sp, shift):
    from glam3d.models.window import partition_with_prefix
    torch.manual_seed(0)
    B, C, P, pad = 2, 5, 3, 4
    x = torch.randn(B, *Sp, C)
    prefix = torch.randn(B * math.prod(s // w for s, w in zip(Sp, ws)), P, C)
    ref = partition_with_prefix(x, ws, shift, prefix)
    got = partition_with_prefix(x, ws, shift, prefix, pad=pad)
    assert got.shape == (ref.shape[0], ref.shape[1] + pad, C)
    assert torch.equal(got[:, :ref.shape[1]], ref) and not got[:, ref.shape[1]:].any()


@pytest.mark.parametrize("ws,Sp,shift", [((2, 2, 2), (4, 6, 4), (1, 1, 1)), ((4, 4), (8, 12), (2, 2))])
@pytest.mark.parametrize("prefix_queries", [True, False])
@pytest.mark.parametrize("how", ["classes", "mask", "none", "cross"])
def test_padding_keys_change_nothing(ws, Sp, shift, prefix_queries, how):
    """Padding rows are keys masked out of every query: whatever they hold, the output equals the unpadded
    attention's (no-autograd chunked path and autograd path, per class, with one mask, cross-attention)."""
    from glam3d.models.window import window_classes
    torch.manual_seed(0)
    P, pad = 3, 5
    attn = WindowAttention(8, 2, ws, cross=how == "cross")
    c = window_classes(Sp, ws, shift)
    B_ = 2 * sum(c.counts)
    L = P + math.prod(ws)
    x, ctx = torch.randn(B_, L + pad, 8), torch.randn(B_, L + pad, 8)
    kw = {"classes": dict(classes=c), "mask": dict(mask=c.full_mask())}.get(how, {})
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ref = attn(x[:, :L], ctx[:, :L] if attn.cross else None, ws, num_prefix=P,
                       prefix_queries=prefix_queries, **kw)
            got = attn(x, ctx if attn.cross else None, ws, num_prefix=P, prefix_queries=prefix_queries,
                       num_pad=pad, **kw)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sequence length"):
        attn(x, ctx if attn.cross else None, ws, num_prefix=P, num_pad=pad - 1, **kw)


def test_padding_keys_need_a_prefix():
    attn = WindowAttention(8, 2, (2, 2))
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(4, 8, 8), None, (2, 2), num_prefix=0, num_pad=4)

"""GLAM against an independent reference (tests/glam_reference.py: eqs. 2-5 as plain loops over images, windows,
blocks and heads): the vectorised layer's token path, both variants, 2D and 3D, shifted blocks, padding, the
decoder's skip attention, the position tables; and the eq. 7 map against a brute-force sum written from the
paper's formula on the reference's attention weights."""
import math

import pytest
import torch

from glam3d.models import GLAMLayer
from glam_reference import reference_layer

torch.set_num_threads(1)

VARIANTS = ["paper", "authors"]


def _layer(ws, S, n_g, variant, depth=3, cross=False, **kw):
    """A double-precision layer with random weights large enough that a wrong mask, bias, order or norm shows."""
    torch.manual_seed(0)
    layer = GLAMLayer(8, depth, 2, ws, num_global_tokens=n_g, glam_variant=variant, input_resolution=S,
                      cross_attention=cross, **kw).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ws,S,n_g,cross,extra", [
    ((2, 2), (4, 6), 3, False, {}),
    ((3, 3), (7, 5), 2, False, {}),                               # padded map
    ((4, 4), (8, 8), 14, False, {}),                              # 30 keys: CPU inference pads them to 32
    ((2, 2, 2), (4, 4, 6), 3, False, {}),
    ((2, 2, 2), (4, 4, 4), 2, True, {}),                          # decoder level: skip attention first
    ((2, 2), (4, 6), 2, False, {"last_gmsa": True, "global_clamp": True}),
])
def test_token_path_matches_loop_reference(variant, ws, S, n_g, cross, extra):
    layer = _layer(ws, S, n_g, variant, cross=cross, **extra)
    torch.manual_seed(1)
    x = torch.randn(2, 8, *S, dtype=torch.float64)
    ctx = torch.randn(2, 8, *S, dtype=torch.float64) if cross else None
    y_ref, g_ref, _ = reference_layer(layer, x, ctx)
    y, g = layer(x, ctx, return_global=True)  # autograd path
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)
    with torch.inference_mode():  # CPU inference: windows in chunks, per-class masks, key padding
        y2, g2 = layer(x, ctx, return_global=True)
    torch.testing.assert_close(y2, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g2, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ws,S", [((2, 2), (4, 6)), ((2, 2, 2), (4, 4, 6))])
def test_authors_position_table_area_read_matches_reference(ws, S):
    """A table of another length than the sequence (the authors size theirs for far longer ones): every row is
    read (and so trained), as the reference's area resampling says."""
    n_g = 3
    n = math.prod(math.ceil(s / w) for s, w in zip(S, ws)) * n_g
    for rows in (n * 7 + 5, n - 3):
        layer = _layer(ws, S, n_g, "authors", global_pos_rows=rows)
        assert layer.global_pos_embed.shape == (rows, 8)
        x = torch.randn(2, 8, *S, dtype=torch.float64)
        y_ref, _, _ = reference_layer(layer, x)
        y = layer(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        y.square().sum().backward()
        assert (layer.global_pos_embed.grad.abs().sum(1) > 0).all()


# ------------------------------------------------------------------------------------------------------------
# eq. 7, brute force from the paper's formula
# ------------------------------------------------------------------------------------------------------------
def _brute_force_eq7(records, block, query, n_g, term, weighting):
    """The map of eq. 7 for the query, from the reference's weights (head means), by explicit sums:
    ``[G_k]_{r',i} = sum_j b_{k,r,j,r'} a_{j,r',i+N_g} + sum_j b_{k,r,j,r'} sum_{i'<=N_g} a_{j,r',i'}``, the query's
    window ``r`` and weights ``alpha_k`` taken in block ``block + 1``, whose W-MSA reads the G-MSA's output."""
    order = [(kind, i) for kind, i, _ in records]
    start, stop = order.index(("block", block)), order.index(("block", block + 1))
    gm = [rec for kind, _, rec in records[start:stop] if kind == "gmsa"]
    assert len(gm) == 1  # exactly one G-MSA between the two blocks
    b = gm[0].mean(0)
    blk0, blk1 = records[start][2], records[stop][2]
    a = [w.mean(0) for w in blk0["weights"]]
    r, t = blk1["where"][tuple(query)]
    alpha = blk1["weights"][r].mean(0)[n_g + t, :n_g] if weighting == "query" else [1.0 / n_g] * n_g
    out = {}
    for pos, (r2, i) in blk0["where"].items():
        patch = window = 0.0
        for k in range(n_g):
            for j in range(n_g):
                bk = alpha[k] * b[r * n_g + k, r2 * n_g + j]
                patch += bk * a[r2][j, n_g + i]
                window += bk * sum(a[r2][j, i2] for i2 in range(n_g))
        out[pos] = {"patch": patch, "window": window, "sum": patch + window}[term]
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ws,S,block,query", [((2, 2), (4, 6), 0, (1, 4)),   # block 1 (read) is shifted
                                              ((2, 2), (5, 5), 1, (4, 0)),   # block 1 (written) shifted, padding
                                              ((2, 2, 2), (4, 4, 6), 0, (3, 0, 2))])
def test_eq7_map_matches_brute_force(variant, ws, S, block, query):
    from glam3d.models.attention_map import global_attention_map, map_from_recorded, recording
    n_g = 2
    layer = _layer(ws, S, n_g, variant)
    torch.manual_seed(2)
    x = torch.randn(2, 8, *S, dtype=torch.float64)
    _, _, records = reference_layer(layer, x)
    for term in ("patch", "window", "sum"):
        for weighting in ("query", "uniform"):
            m = global_attention_map(layer, x, query, block=block, image=1, weighting=weighting, term=term)
            ref = _brute_force_eq7(records[1], block, query, n_g, term, weighting)
            assert m.shape == tuple(S) and (m >= 0).all()
            for pos, v in ref.items():
                torch.testing.assert_close(m[pos], torch.as_tensor(v, dtype=m.dtype), rtol=1e-9, atol=1e-12)
    assert len(ref) == math.prod(S)
    # the two terms share out, per global token j of window r', the attention it gives to its window's tokens
    # and to global tokens: without padding (which takes a share), and with the N_p copies of the window term
    # counted once, they add up to the G-MSA weights of the query's tokens, sum_k alpha_k = 1 (uniform)
    if all(s % w == 0 for s, w in zip(S, ws)):
        kw = dict(block=block, weighting="uniform")
        total = global_attention_map(layer, x, query, term="patch", **kw).sum() + \
            global_attention_map(layer, x, query, term="window", **kw).sum() / math.prod(ws)
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=total.dtype), rtol=1e-9, atol=1e-9)
    mn = global_attention_map(layer, x, query, block=block, normalize=True)
    torch.testing.assert_close(mn.sum(), torch.tensor(1.0, dtype=mn.dtype))
    # recording leaves the fast path on afterwards and reads the same as a fresh run
    assert not any(blk.attn.store_attn for blk in layer.blocks) and not any(g.attn.store_attn for g in layer.gmsa)
    with recording(layer, block):
        layer(x)
    torch.testing.assert_close(map_from_recorded(layer, query, block, image=0),
                               global_attention_map(layer, x, query, block=block))


def test_eq7_bad_arguments():
    from glam3d.models.attention_map import global_attention_map
    layer = GLAMLayer(8, 2, 2, (2, 2), num_global_tokens=0)
    with pytest.raises(ValueError, match="no G-MSA"):
        global_attention_map(layer, torch.randn(1, 8, 4, 4), (0, 0))
    with pytest.raises(ValueError, match="no G-MSA"):  # depth 1: no block reads a G-MSA output
        global_attention_map(GLAMLayer(8, 1, 2, (2, 2), num_global_tokens=2), torch.randn(1, 8, 4, 4), (0, 0))
    layer = GLAMLayer(8, 2, 2, (2, 2), num_global_tokens=2)
    with pytest.raises(ValueError, match="query"):
        global_attention_map(layer, torch.randn(1, 8, 4, 4), (0, 9))
    with pytest.raises(ValueError, match="block"):
        global_attention_map(layer, torch.randn(1, 8, 4, 4), (0, 0), block=1)
    with pytest.raises(ValueError, match="term"):
        global_attention_map(layer, torch.randn(1, 8, 4, 4), (0, 0), term="both")

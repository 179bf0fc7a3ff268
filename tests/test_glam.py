"""GLAMLayer: vanilla equivalence (N_g = 0), locality / full-range interaction, shapes, batch isolation, errors."""
import itertools
import math

import pytest
import torch

from glam3d.models import GLAMLayer

torch.set_num_threads(1)

CASES = [  # (window, map)
    ((4, 4), (8, 12)),
    ((2, 2, 2), (4, 4, 6)),
]


# ------------------------------------------------------------------------------------------------------------
# independent reference: a Swin / nnFormer window block written with loops over windows and token pairs
# ------------------------------------------------------------------------------------------------------------
def _ref_bias(table, ws):
    """(h, N_p, N_p) relative position bias from explicit coordinate pairs."""
    coords = list(itertools.product(*[range(w) for w in ws]))
    n = len(coords)
    bias = torch.empty(table.shape[1], n, n)
    for a, ca in enumerate(coords):
        for b, cb in enumerate(coords):
            idx = 0
            for i, w in enumerate(ws):
                idx = idx * (2 * w - 1) + (ca[i] - cb[i] + w - 1)
            bias[:, a, b] = table[idx]
    return bias, coords


def _ref_block(blk, x, shift):
    """x (B, *S, C) -> (B, *S, C), a plain (shifted) window block, no global tokens."""
    B, *S, C = x.shape
    d = len(S)
    ws = [min(w, s) for w, s in zip(blk.window_size, S)]
    sh = [(w // 2 if (shift and s > w) else 0) for w, s in zip(blk.window_size, S)]
    Sp = [math.ceil(s / w) * w for s, w in zip(S, ws)]
    xn = blk.norm1(x)
    xp = torch.zeros(B, *Sp, C)
    xp[(slice(None),) + tuple(slice(0, s) for s in S)] = xn
    xp = torch.roll(xp, [-t for t in sh], dims=list(range(1, d + 1)))

    def region(i, p):  # region label of padded/rolled index p along axis i
        if sh[i] == 0:
            return 0
        return 0 if p < Sp[i] - ws[i] else (1 if p < Sp[i] - sh[i] else 2)

    bias, coords = _ref_bias(blk.attn.relative_position_bias_table, ws)
    h = blk.attn.num_heads
    E = C // h
    out = torch.zeros_like(xp)
    for b in range(B):
        for origin in itertools.product(*[range(0, s, w) for s, w in zip(Sp, ws)]):
            pos = [tuple(o + c for o, c in zip(origin, cc)) for cc in coords]
            tok = torch.stack([xp[(b,) + p] for p in pos])  # (N_p, C)
            q, k, v = blk.attn.qkv(tok).split(C, dim=-1)
            res = []
            for hh in range(h):
                sl = slice(hh * E, (hh + 1) * E)
                logits = (q[:, sl] @ k[:, sl].T) * E ** -0.5 + bias[hh]
                for a, pa in enumerate(pos):
                    for c, pc in enumerate(pos):
                        if any(region(i, pa[i]) != region(i, pc[i]) for i in range(d)):
                            logits[a, c] = logits[a, c] - 100.0
                res.append(torch.softmax(logits, -1) @ v[:, sl])
            o = blk.attn.proj(torch.cat(res, -1))
            for a, p in enumerate(pos):
                out[(b,) + p] = o[a]
    out = torch.roll(out, sh, dims=list(range(1, d + 1)))[(slice(None),) + tuple(slice(0, s) for s in S)]
    x = x + out
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("ws,S", CASES + [((4, 4), (7, 9)), ((2, 4, 4), (3, 5, 6))])
def test_zero_global_tokens_is_vanilla_window_layer(ws, S):
    torch.manual_seed(0)
    layer = GLAMLayer(8, 3, 2, ws, num_global_tokens=0).eval()
    names = [n for n, _ in layer.named_parameters()]
    assert not any("global" in n or "gmsa" in n for n in names)
    x = torch.randn(2, 8, *S)
    with torch.no_grad():
        y = layer(x)
        r = x.movedim(1, -1)
        for i, blk in enumerate(layer.blocks):
            r = _ref_block(blk, r, shift=(i % 2 == 1))
    torch.testing.assert_close(y, r.movedim(-1, 1), atol=1e-5, rtol=1e-4)


def _grad_between(layer, S, out_pos, in_pos):
    x = torch.randn(1, layer.dim, *S, requires_grad=True)
    y = layer(x)
    y[(0, slice(None)) + out_pos].sum().backward()
    return x.grad[(0, slice(None)) + in_pos].abs().sum().item()


@pytest.mark.parametrize("ws,S", CASES)
@pytest.mark.parametrize("depth", [1, 3])
def test_no_gmsa_no_shift_is_local(ws, S, depth):
    torch.manual_seed(0)
    layer = GLAMLayer(8, depth, 2, ws, num_global_tokens=3, gmsa=False, shift=False)
    corner = tuple(0 for _ in S)
    far = tuple(s - 1 for s in S)
    assert _grad_between(layer, S, corner, far) == 0.0
    same = tuple(w - 1 for w in ws)  # same window as the corner
    assert _grad_between(layer, S, corner, same) > 0.0


@pytest.mark.parametrize("ws,S", CASES)
def test_gmsa_gives_full_range_interaction(ws, S):
    torch.manual_seed(0)
    layer = GLAMLayer(8, 2, 2, ws, num_global_tokens=3, gmsa=True, shift=False)
    corner = tuple(0 for _ in S)
    far = tuple(s - 1 for s in S)
    assert _grad_between(layer, S, corner, far) > 0.0


@pytest.mark.parametrize("ws,S", CASES + [((4, 4), (7, 9)), ((2, 4, 4), (3, 5, 7))])
@pytest.mark.parametrize("options", [{}, {"global_pos_embed": True, "global_clamp": True, "last_gmsa": True}])
def test_shapes_padding_and_batch_isolation(ws, S, options):
    torch.manual_seed(0)
    layer = GLAMLayer(8, 2, 2, ws, num_global_tokens=4, input_resolution=S, **options).eval()
    x = torch.randn(3, 8, *S)
    y, g = layer(x, return_global=True)
    assert y.shape == x.shape
    n_r = math.prod(math.ceil(s / min(w, s)) for s, w in zip(S, ws))
    assert g.shape == (3, n_r * 4, 8)
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])
    y2, g2 = layer(x2, return_global=True)
    assert torch.equal(y2[1:], y[1:]) or torch.allclose(y2[1:], y[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(g2[1:], g[1:], atol=1e-6, rtol=0)
    assert not torch.allclose(y2[0], y[0])
    if options.get("global_clamp"):
        assert g.abs().max() <= 1.0


def test_small_map_single_window():
    layer = GLAMLayer(8, 2, 2, (8, 8, 8), num_global_tokens=2)
    y, g = layer(torch.randn(1, 8, 4, 4, 4), return_global=True)
    assert y.shape == (1, 8, 4, 4, 4) and g.shape == (1, 2, 8)


def test_cross_attention_layer():
    torch.manual_seed(0)
    layer = GLAMLayer(8, 2, 2, (2, 2, 2), num_global_tokens=2, cross_attention=True)
    x, c = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 8, 4, 4, 4)
    y = layer(x, c)
    assert y.shape == x.shape
    assert not torch.allclose(y, layer(x, c + 1))
    with pytest.raises(ValueError, match="context"):
        layer(x)


def test_drop_path_list_and_training_mode():
    layer = GLAMLayer(8, 2, 2, (2, 2), num_global_tokens=2, drop_path=[0.0, 0.5]).train()
    y = layer(torch.randn(2, 8, 4, 4))
    y.sum().backward()
    assert layer.global_tokens.grad is not None


@pytest.mark.parametrize("kwargs,arg", [
    (dict(dim=10, depth=1, num_heads=3, window_size=(2, 2)), "num_heads"),
    (dict(dim=8, depth=1, num_heads=2, window_size=4), "spatial_dims"),
    (dict(dim=8, depth=1, num_heads=2, window_size=(2, 2, 2, 2)), "window_size"),
    (dict(dim=8, depth=1, num_heads=2, window_size=(0, 2)), "window_size"),
    (dict(dim=8, depth=1, num_heads=2, window_size=(2, 2), spatial_dims=3), "spatial_dims"),
    (dict(dim=8, depth=2, num_heads=2, window_size=(2, 2), drop_path=[0.1]), "drop_path"),
    (dict(dim=8, depth=1, num_heads=2, window_size=(2, 2), global_pos_embed=True), "input_resolution"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        GLAMLayer(**kwargs)


def test_bad_input():
    layer = GLAMLayer(8, 1, 2, (2, 2, 2))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="dim"):
        layer(torch.randn(1, 6, 4, 4, 4))


@pytest.mark.parametrize("variant,n_gmsa", [("paper", 2), ("authors", 3)])
def test_every_gmsa_is_read_no_dead_parameters(variant, n_gmsa):
    """Paper variant: a G-MSA between consecutive blocks (depth - 1); authors variant: one before every block
    (depth). Every parameter, the position table included, gets a non-zero gradient from the map output alone."""
    torch.manual_seed(0)
    layer = GLAMLayer(8, 3, 2, (2, 2), num_global_tokens=2, glam_variant=variant, input_resolution=(4, 4))
    assert len(layer.gmsa) == n_gmsa and layer.global_pos_embed is not None
    y = layer(torch.randn(2, 8, 4, 4))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    trailing = GLAMLayer(8, 3, 2, (2, 2), num_global_tokens=2, glam_variant=variant, last_gmsa=True)
    assert len(trailing.gmsa) == n_gmsa + 1  # read only by callers of return_global


@pytest.mark.parametrize("ws,S", CASES + [((4, 4), (7, 9)), ((2, 2, 2), (3, 5, 6))])
@pytest.mark.parametrize("cross,last_gmsa", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_need_global_false_skips_only_dead_work(ws, S, cross, last_gmsa, variant):
    """``need_global=False`` drops the last block's global-token outputs (nobody reads them): the map output
    is the same, in inference and in training (same gradients), and no parameter loses its gradient."""
    torch.manual_seed(0)
    C = 8
    layer = GLAMLayer(C, 2, 2, ws, num_global_tokens=3, cross_attention=cross, last_gmsa=last_gmsa,
                      glam_variant=variant)
    x = torch.randn(2, *S, C, requires_grad=True)
    ctx = torch.randn(2, *S, C) if cross else None
    y_full, g_full = layer.forward_tokens(x, ctx)
    y_fast, g_fast = layer.forward_tokens(x, ctx, need_global=False)
    assert g_full is not None
    assert (g_fast is None) != last_gmsa  # with a G-MSA after the last block the tokens are still computed
    torch.testing.assert_close(y_fast, y_full, atol=1e-6, rtol=1e-6)
    (gx_full,) = torch.autograd.grad(y_full.square().sum(), x)
    y_fast.square().sum().backward()
    torch.testing.assert_close(x.grad, gx_full, atol=1e-5, rtol=1e-5)
    if not last_gmsa:  # (a G-MSA after the last block feeds only g, never y)
        assert all(p.grad is not None for p in layer.parameters())
    with torch.inference_mode():  # the oneDNN fused path of CPU inference
        torch.testing.assert_close(layer.eval().forward_tokens(x, ctx, need_global=False)[0],
                                   layer.forward_tokens(x, ctx)[0], atol=1e-6, rtol=1e-6)


def test_need_global_false_does_less_work():
    """The skipped work is real: fewer multiply-adds for the same output (global tokens of the last block)."""
    from glam3d.models.complexity import count_macs

    class Stage(torch.nn.Module):
        def __init__(self, need):
            super().__init__()
            self.layer = GLAMLayer(32, 2, 4, (4, 4, 4), num_global_tokens=10, last_gmsa=False)
            self.need = need

        def forward(self, x):
            return self.layer.forward_tokens(x, need_global=self.need)[0]

    macs = [count_macs(Stage(need).eval(), (1, 8, 8, 8, 32)) for need in (True, False)]
    # last block: MLP (2 * 32 * 128 MACs per token) and proj (32 * 32) of 8 windows x 10 tokens are gone
    assert macs[0] - macs[1] >= 8 * 10 * (2 * 32 * 128 + 32 * 32)


@pytest.mark.parametrize("ws,S,n_g,cross,B", [((2, 2, 2), (5, 6, 8), 3, False, 2), ((4, 4), (12, 9), 4, False, 1),
                                              ((2, 2, 2), (4, 4, 4), 0, True, 2), ((3, 3), (7, 7), 2, True, 2)])
@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_class_attention_equals_full_mask_path(ws, S, n_g, cross, B, variant, monkeypatch):
    """Shifted blocks attend per window class (windows and their global tokens reordered by class): the layer's
    outputs, global tokens and gradients equal those of the one-big-mask reference path."""
    from glam3d.models.glam import WindowBlock
    torch.manual_seed(0)
    layer = GLAMLayer(8, 2, 2, ws, num_global_tokens=n_g, cross_attention=cross, glam_variant=variant,
                      input_resolution=S)
    x = torch.randn(B, 8, *S, requires_grad=True)
    ctx = torch.randn(B, 8, *S) if cross else None
    res = []
    for flag in (True, False):
        monkeypatch.setattr(WindowBlock, "class_attention", flag)
        y, g = layer(x, ctx, return_global=True)
        loss = (y ** 2).sum() + (0 if g is None else (g ** 3).sum())
        res.append((y, g, torch.autograd.grad(loss, [x] + list(layer.parameters()))))
    (y1, g1, gr1), (y2, g2, gr2) = res
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    if n_g:
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gr1, gr2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ws,S,n_g,cross,B", [((2, 2, 2), (5, 6, 8), 3, False, 2), ((4, 4), (12, 9), 4, False, 1),
                                              ((2, 2, 2), (4, 4, 4), 0, True, 2), ((3, 3), (7, 7), 2, True, 2)])
@pytest.mark.parametrize("chunk", [1, 37, 10 ** 9])
@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_chunked_inference_equals_autograd_path(ws, S, n_g, cross, B, chunk, variant, monkeypatch):
    """CPU inference runs window attention on groups of windows and the MLP on chunks of tokens (added in place,
    ``layers.CHUNK_TOKENS``): for any chunk size — one window or token at a time, sizes that cut window
    classes and images apart, one chunk — the outputs and global tokens equal the unchunked autograd path's."""
    from glam3d.models import layers
    torch.manual_seed(0)
    layer = GLAMLayer(8, 3, 2, ws, num_global_tokens=n_g, cross_attention=cross, glam_variant=variant,
                      input_resolution=S).eval()
    x = torch.randn(B, *S, 8)  # channels-last tokens, as the networks pass them (forward_tokens)
    ctx = torch.randn(B, *S, 8) if cross else None
    y_ref, g_ref = layer.forward_tokens(x, ctx)  # autograd on (parameters require grad): no chunking
    assert y_ref.requires_grad
    monkeypatch.setattr(layers, "CHUNK_TOKENS", chunk)
    calls = []
    real = layers.add_mlp_
    monkeypatch.setattr("glam3d.models.glam.add_mlp_", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        y, g = layer.forward_tokens(x, ctx)
    assert len(calls) == 3  # every block took the chunked path
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    if n_g:
        torch.testing.assert_close(g, g_ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ws,S,cross,need", [((4, 4, 4), (8, 8, 12), False, True), ((4, 4, 4), (8, 8, 8), True, False),
                                             ((7, 7), (14, 21), False, False)])
def test_key_padding_in_cpu_inference(ws, S, cross, need, monkeypatch):
    """CPU inference pads GLAM's [10 global; window] sequences (74 or 59 tokens) with masked keys to a multiple
    of 16 (SDPA's CPU kernel is faster there): outputs and global tokens equal the unpadded run's, and the
    attention really received padded sequences."""
    from glam3d.models.glam import WindowBlock
    torch.manual_seed(0)
    layer = GLAMLayer(16, 2, 2, ws, num_global_tokens=10, cross_attention=cross, last_gmsa=False).eval()
    x = torch.randn(2, *S, 16)
    ctx = torch.randn(2, *S, 16) if cross else None
    seen = []
    for blk in layer.blocks:
        blk.attn.register_forward_pre_hook(
            lambda mod, args, kw: seen.append((args[0].shape[1], kw.get("num_pad", 0))), with_kwargs=True)
    res = []
    for multiple in (16, 0):
        monkeypatch.setattr(WindowBlock, "key_multiple", multiple)
        seen.clear()
        with torch.inference_mode():
            res.append(layer.forward_tokens(x, ctx, need_global=need))
        lengths = set(seen)
        n = 10 + math.prod(ws)
        assert lengths == ({(n - n % -16, -n % 16)} if multiple else {(n, 0)})
    (y1, g1), (y2, g2) = res
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    if need:
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    else:
        assert g1 is None and g2 is None


def test_gmsa_contiguous_qkv_equals_strided(monkeypatch):
    """CPU inference copies q, k, v of long G-MSA sequences out of the fused projection: same output."""
    from glam3d.models.glam import Attention
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(2, 40, 16)
    res = []
    for start in (1, 10 ** 9):
        monkeypatch.setattr(Attention, "CONTIGUOUS_FROM", start)
        with torch.inference_mode():
            res.append(attn(x))
    torch.testing.assert_close(res[0], res[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0], attn(x).detach(), rtol=1e-5, atol=1e-6)  # the autograd path

"""NLU (non-local upsampling), 2D and 3D, both forms; the authors' block against a loop reference."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from glam3d.models.nlu import NLU

torch.set_num_threads(1)


@pytest.mark.parametrize("form", ["block", "attention"])
@pytest.mark.parametrize("ws,s", [((2, 2), (4, 6)), ((2, 2), (3, 5)), ((2, 2, 2), (2, 4, 4)), ((4, 4, 4), (2, 3, 2))])
def test_shapes(ws, s, form):
    nlu = NLU(16, 8, 2, ws, form=form)
    low = torch.randn(2, 16, *s)
    skip = torch.randn(2, 8, *[2 * v for v in s])
    y = nlu(low, skip)
    assert y.shape == skip.shape
    y.sum().backward()
    assert nlu.kv.weight.grad is not None and nlu.q.weight.grad is not None


@pytest.mark.parametrize("form", ["block", "attention"])
def test_window_locality(form):
    """An output position depends only on the low-res tokens of its window (and on its own skip token)."""
    torch.manual_seed(0)
    nlu = NLU(8, 8, 2, (2, 2), form=form)
    low = torch.randn(1, 8, 4, 4, requires_grad=True)
    skip = torch.randn(1, 8, 8, 8, requires_grad=True)
    y = nlu(low, skip)
    y[0, :, 0, 0].sum().backward()  # high-res (0,0) lies in low window (0:2, 0:2)
    g = low.grad[0].abs().sum(0)
    assert (g[:2, :2] > 0).all() and g[2:].sum() == 0 and g[:, 2:].sum() == 0
    gs = skip.grad[0].abs().sum(0)
    assert gs[0, 0] > 0 and gs.sum() == gs[0, 0]  # queries only from its own skip token


@pytest.mark.parametrize("form", ["block", "attention"])
def test_batch_isolation(form):
    nlu = NLU(8, 8, 2, (2, 2, 2), form=form).eval()
    low, skip = torch.randn(2, 8, 2, 2, 2), torch.randn(2, 8, 4, 4, 4)
    y = nlu(low, skip)
    low2 = low.clone()
    low2[0] += 1
    torch.testing.assert_close(nlu(low2, skip)[1], y[1])


@pytest.mark.parametrize("kwargs,arg", [
    (dict(in_dim=8, out_dim=10, num_heads=3, window_size=(2, 2)), "num_heads"),
    (dict(in_dim=8, out_dim=4, num_heads=8, window_size=(2, 2), form="attention"), "num_heads"),
    (dict(in_dim=8, out_dim=4, num_heads=2, window_size=(2, 2), form="conv"), "form"),
    (dict(in_dim=8, out_dim=8, num_heads=2, window_size=2), "spatial_dims"),
    (dict(in_dim=8, out_dim=8, num_heads=2, window_size=(2,)), "window_size"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        NLU(**kwargs)


def test_bad_inputs():
    nlu = NLU(8, 4, 2, (2, 2))
    with pytest.raises(ValueError, match="twice"):
        nlu(torch.randn(1, 8, 4, 4), torch.randn(1, 4, 6, 8))
    with pytest.raises(ValueError, match="in_dim"):
        nlu(torch.randn(1, 6, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="spatial axes"):
        nlu(torch.randn(1, 8, 4, 4, 4), torch.randn(1, 4, 8, 8, 8))


# ------------------------------------------------------------------------------------------------------------
# the authors' NLU block, from its definition, one low-resolution window and one query at a time
# ------------------------------------------------------------------------------------------------------------
def _ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _reference_block(nlu, low, skip):
    """``low (*s, C_in)``, ``skip (*2s, C_out)`` (one image, maps a multiple of the window) -> ``(*2s, C_out)``:
    out[p] = expand(low)[p] + attn(p), then + MLP(LN(.)); attn(p) = proj(sum over heads of softmax over the keys
    k of the window (q(skip[p]) . kv(LN(low[k])) / sqrt(E) + table[offset(p, k)]) v(LN(low[k])))."""
    s, C_out = list(low.shape[:-1]), skip.shape[-1]
    d, ws = len(s), nlu.window_size
    h, W = nlu.num_heads, nlu.width
    E = W // h
    lown = _ln(nlu.norm_low, low)
    out = torch.zeros_like(skip)
    for origin in itertools.product(*[range(0, v, w) for v, w in zip(s, ws)]):
        keys = [tuple(o + c for o, c in zip(origin, off)) for off in itertools.product(*[range(w) for w in ws])]
        kv = F.linear(torch.stack([lown[k] for k in keys]), nlu.kv.weight, nlu.kv.bias)
        for off in itertools.product(*[range(2 * w) for w in ws]):
            p = tuple(2 * o + c for o, c in zip(origin, off))
            q = F.linear(skip[p], nlu.q.weight, nlu.q.bias)
            heads = []
            for hh in range(h):
                sl = slice(hh * E, (hh + 1) * E)
                logits = []
                for kk, k in enumerate(keys):
                    row = 0
                    for i in range(d):  # offset p - 2k in high-resolution steps, per axis, 4w - 2 values
                        row = row * (4 * ws[i] - 2) + (p[i] - 2 * k[i]) + 2 * ws[i] - 2
                    logits.append(q[sl] @ kv[kk, sl] * E ** -0.5 + nlu.relative_position_bias_table[row, hh])
                a = torch.softmax(torch.stack(logits), 0)
                heads.append(a @ kv[:, W:][:, sl])
            attn = F.linear(torch.cat(heads), nlu.proj.weight, nlu.proj.bias)
            # patch expanding: the low token's 2^d C_out channels, group = the sub-position (raster order)
            sub = 0
            for c in off:
                sub = sub * 2 + c % 2
            up = F.linear(low[tuple(v // 2 for v in p)], nlu.shortcut.expand.weight)[sub * C_out:(sub + 1) * C_out]
            x = _ln(nlu.shortcut.norm, up) + attn
            out[p] = x + F.linear(F.gelu(F.linear(_ln(nlu.norm2, x), nlu.mlp.fc1.weight, nlu.mlp.fc1.bias)),
                                  nlu.mlp.fc2.weight, nlu.mlp.fc2.bias)
    return out


@pytest.mark.parametrize("ws,s", [((2, 2), (4, 2)), ((2, 1, 2), (2, 2, 4))])
def test_block_form_matches_loop_reference(ws, s):
    torch.manual_seed(0)
    nlu = NLU(8, 4, 2, ws).double().eval()
    with torch.no_grad():
        for p in nlu.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    low = torch.randn(2, 8, *s, dtype=torch.float64)
    skip = torch.randn(2, 4, *[2 * v for v in s], dtype=torch.float64)
    y = nlu(low, skip)
    for b in range(2):
        ref = _reference_block(nlu, low[b].movedim(0, -1), skip[b].movedim(0, -1)).movedim(-1, 0)
        torch.testing.assert_close(y[b], ref, rtol=1e-9, atol=1e-9)


def test_block_form_every_parameter_trained():
    """Full windows use every row of the bias table; a random projection of the output reaches every weight."""
    torch.manual_seed(0)
    nlu = NLU(8, 4, 2, (2, 2, 2))
    assert nlu.relative_position_bias_table.shape == (math.prod([4 * 2 - 2] * 3), 2)
    y = nlu(torch.randn(2, 8, 2, 4, 4), torch.randn(2, 4, 4, 8, 8))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in nlu.named_parameters():
        assert p.grad is not None and (p.grad.abs().sum(-1) > 0).all(), name

"""An independent reference of a GLAM layer's token path, written from the paper's eqs. 2-5 with plain loops.

It reads a :class:`glam3d.models.glam.GLAMLayer`'s *parameters* (weights of its LayerNorms, linear layers, bias
tables, tokens, position tables) but none of its code: windows, cyclic shifts, the shifted-window mask, relative
position indices, the order of W-MSA and G-MSA, the two variants' treatment of the global tokens and the reading
of the position tables are worked out here, one image, one window, one head at a time.

The variants, as the paper and the authors' code define them:

* ``paper``: a block is W-MSA then (except after the last block) G-MSA; W-MSA is a pre-LN transformer layer on
  ``[g; w]`` (``g`` normalised like ``w``, residual and MLP for both); G-MSA is a pre-LN transformer layer on all
  global tokens of the image whose attention input (only) gets the position ``pos``; position table
  ``(N_g, C, *grid)``: token ``j`` of the window at grid coordinates ``c`` gets ``table[j, :, *c]``;
* ``authors``: G-MSA (bare attention on ``g + pos``, its output replaces ``g``) runs before each block's W-MSA;
  W-MSA takes ``g`` without LayerNorm; ``g`` leaves W-MSA as its attention output alone in 2D (themyrl/glam),
  with the block's residual and MLP in 3D (themyrl/medseg); position table ``(rows, C)`` over the sequence
  (window-major, token-minor), read by area resampling: element ``s`` of ``n`` is the mean of rows
  ``floor(s * rows / n) .. ceil((s + 1) * rows / n) - 1``.

``reference_layer(layer, x, context)`` returns the output map, the final global tokens and a record of every
attention's softmax weights (per image, per window, per head) with the position -> (window, token) maps of each
block, for the eq. 7 test.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def _ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _lin(mod, x):
    return F.linear(x, mod.weight, mod.bias)


def _mlp(mod, x):
    return _lin(mod.fc2, F.gelu(_lin(mod.fc1, x)))


def _heads(q, k, v, num_heads, bias=None):
    """Multi-head attention of query rows ``q (Lq, C)`` on ``k, v (Lk, C)``, one head at a time, with an additive
    ``bias (h, Lq, Lk)``: ``(out (Lq, C), weights (h, Lq, Lk))``."""
    C = q.shape[-1]
    E = C // num_heads
    outs, ws = [], []
    for h in range(num_heads):
        sl = slice(h * E, (h + 1) * E)
        logits = (q[:, sl] @ k[:, sl].T) * E ** -0.5
        if bias is not None:
            logits = logits + bias[h]
        w = torch.softmax(logits, dim=-1)
        outs.append(w @ v[:, sl])
        ws.append(w)
    return torch.cat(outs, -1), torch.stack(ws)


def _window_bias(table, window, nominal, positions, regions_differ, n_g):
    """``(h, N_g + N_p, N_g + N_p)``: relative position bias (table rows by mixed radix over the nominal window)
    and -100 between tokens of different shift regions, on window<->window pairs only."""
    coords = list(itertools.product(*[range(w) for w in window]))
    n = n_g + len(coords)
    bias = torch.zeros(table.shape[1], n, n, dtype=table.dtype)
    for a, ca in enumerate(coords):
        for b, cb in enumerate(coords):
            idx = 0
            for i, tw in enumerate(nominal):
                idx = idx * (2 * tw - 1) + (ca[i] - cb[i] + tw - 1)
            bias[:, n_g + a, n_g + b] = table[idx]
            if regions_differ(positions[a], positions[b]):
                bias[:, n_g + a, n_g + b] -= 100.0
    return bias


def reference_block(blk, x, g, context, shift, variant):
    """One window block on one image: ``x (*S, C)``, ``g (N_r, N_g, C)`` or None, ``context (*S, C)`` or None.

    Returns ``(x', g', record)`` with ``record = {"weights": [per window (h, L, L)], "where": {map position:
    (window, token)}, "windows": N_r}``."""
    S = list(x.shape[:-1])
    C = x.shape[-1]
    d = len(S)
    nominal = list(blk.window_size)
    ws = [min(w, s) for w, s in zip(nominal, S)]
    sh = [(w // 2 if (shift and s > w) else 0) for w, s in zip(nominal, S)]
    Sp = [math.ceil(s / w) * w for s, w in zip(S, ws)]
    n_g = 0 if g is None else g.shape[1]
    authors = variant == "authors"
    cross = context is not None

    def padded(t):  # LayerNorm first, then zeros beyond the map
        out = torch.zeros(*Sp, C, dtype=t.dtype)
        out[tuple(slice(0, s) for s in S)] = _ln(blk.norm1, t)
        return out

    xn = padded(x)
    cn = padded(context) if cross else None
    gn = None if g is None else (g if authors else _ln(blk.norm1, g))

    def region(i, p):  # Swin's regions of a rolled axis: [0, Sp-ws), [Sp-ws, Sp-sh), [Sp-sh, Sp)
        if sh[i] == 0:
            return 0
        return 0 if p < Sp[i] - ws[i] else (1 if p < Sp[i] - sh[i] else 2)

    def differ(pa, pb):
        return any(region(i, pa[i]) != region(i, pb[i]) for i in range(d))

    attn_out = torch.zeros(*Sp, C, dtype=x.dtype)
    g_hat, weights, where = [], [], {}
    origins = list(itertools.product(*[range(0, s, w) for s, w in zip(Sp, ws)]))
    offsets = list(itertools.product(*[range(w) for w in ws]))
    for r, origin in enumerate(origins):
        rolled = [tuple(o + c for o, c in zip(origin, off)) for off in offsets]       # rolled frame
        source = [tuple((p + t) % sp for p, t, sp in zip(pos, sh, Sp)) for pos in rolled]  # map frame
        for t, src in enumerate(source):
            if all(v < s for v, s in zip(src, S)):
                where[src] = (r, t)
        w_tok = torch.stack([xn[src] for src in source])
        q_in = w_tok if gn is None else torch.cat([gn[r], w_tok])
        bias = _window_bias(blk.attn.relative_position_bias_table, ws, nominal, rolled, differ, n_g)
        if cross:
            c_tok = torch.stack([cn[src] for src in source])
            kv_in = c_tok if gn is None else torch.cat([gn[r], c_tok])
            kv = _lin(blk.attn.kv, kv_in)
            q = q_in if blk.attn.q is None else _lin(blk.attn.q, q_in)
            out, w = _heads(q, kv[:, :C], kv[:, C:], blk.attn.num_heads, bias)
        else:
            qkv = _lin(blk.attn.qkv, q_in)
            out, w = _heads(qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:], blk.attn.num_heads, bias)
        out = _lin(blk.attn.proj, out)
        weights.append(w)
        g_hat.append(out[:n_g])
        for t, src in enumerate(source):
            attn_out[src] = out[n_g + t]
    y = (x + context if cross else x) + attn_out[tuple(slice(0, s) for s in S)]
    y = y + _mlp(blk.mlp, _ln(blk.norm2, y))
    g_new = None
    if g is not None:
        g_hat = torch.stack(g_hat)
        if authors and d == 2:
            g_new = g_hat
        else:
            g_new = g + g_hat
            g_new = g_new + _mlp(blk.mlp, _ln(blk.norm2, g_new))
    return y, g_new, {"weights": weights, "where": where, "windows": len(origins)}


def reference_gmsa(mod, g, pos, variant):
    """G-MSA on one image's global tokens ``g (T, C)`` with ``pos (T, C)`` or None: ``(g', weights (h, T, T))``."""
    C = g.shape[-1]
    attn = mod.attn
    a = g if variant == "authors" else _ln(mod.norm1, g)
    if pos is not None:
        a = a + pos
    qkv = _lin(attn.qkv, a)
    out, w = _heads(qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:], attn.num_heads)
    out = _lin(attn.proj, out)
    if variant == "authors":
        return out, w
    g = g + out
    return g + _mlp(mod.mlp, _ln(mod.norm2, g)), w


def reference_position(layer, grid):
    """The position added to G-MSA's input, ``(N_r * N_g, C)``, from the layer's table (None without one)."""
    table = layer.global_pos_embed
    if table is None:
        return None
    n_g = layer.num_global_tokens
    n = math.prod(grid) * n_g
    if layer.glam_variant == "authors":
        rows = table.shape[0]
        return torch.stack([table[(s * rows) // n:-((-(s + 1) * rows) // n)].mean(0) for s in range(n)])
    if list(table.shape[2:]) != list(grid):
        raise NotImplementedError("the reference reads the paper table at its own grid only")
    out = []
    for c in itertools.product(*[range(v) for v in grid]):  # raster order of the window grid
        for j in range(n_g):
            out.append(table[(j, slice(None)) + c])
    return torch.stack(out)


def reference_layer(layer, x, context=None):
    """``x (B, C, *S)`` [, ``context``] -> ``(y (B, C, *S), g (B, N_r * N_g, C) or None, records)``; ``records[b]``
    is a list of ``("block", i, record)`` and ``("gmsa", i, weights)`` in execution order for image ``b``."""
    variant = layer.glam_variant
    depth = len(layer.blocks)
    has_gmsa = layer.gmsa is not None
    n_gmsa = len(layer.gmsa) if has_gmsa else 0
    ys, gs, records = [], [], []
    for b in range(x.shape[0]):
        t = x[b].movedim(0, -1)
        ctx = None if context is None else context[b].movedim(0, -1)
        S = list(t.shape[:-1])
        ws = [min(w, s) for w, s in zip(layer.window_size, S)]
        grid = [math.ceil(s / w) for s, w in zip(S, ws)]
        n_r, n_g = math.prod(grid), layer.num_global_tokens
        g = layer.global_tokens.unsqueeze(0).expand(n_r, -1, -1) if n_g else None
        pos = reference_position(layer, grid) if n_g else None
        rec = []
        k = 0  # next G-MSA module

        def gmsa(g):  # called within this image's iteration only (B023: its loop variables are the current ones)
            nonlocal k
            out, w = reference_gmsa(layer.gmsa[k], g.reshape(n_r * n_g, -1), pos, variant)  # noqa: B023
            rec.append(("gmsa", k, w))  # noqa: B023
            k += 1
            out = out.reshape(n_r, n_g, -1)  # noqa: B023
            return out.clamp(-1, 1) if layer.global_clamp else out

        for i, blk in enumerate(layer.blocks):
            if has_gmsa and variant == "authors" and g is not None:
                g = gmsa(g)
            t, g, r = reference_block(blk, t, g, ctx if i == 0 else None, shift=(i % 2 == 1), variant=variant)
            rec.append(("block", i, r))
            if has_gmsa and g is not None and k < n_gmsa and (variant == "paper" or i == depth - 1):
                g = gmsa(g)
        ys.append(t.movedim(-1, 0))
        gs.append(None if g is None else g.reshape(n_r * n_g, -1))
        records.append(rec)
    y = torch.stack(ys)
    g = None if gs[0] is None else torch.stack(gs)
    return y, g, records

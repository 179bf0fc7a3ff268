"""Parameter and multiply-add counts of the registered networks.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (``MACs = FLOPs / 2``), attention matmuls
included. Counting runs on the ``meta`` device (shapes only, no arithmetic, no memory): a Synapse-size network
takes about a second.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_parameters", "count_macs", "count_macs_by_name", "build_meta", "model_table", "format_table",
           "format_markdown", "markdown_table"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


def count_macs(model: nn.Module, input_shape: Sequence[int], training: bool = False) -> int:
    """Multiply-adds of one forward pass of ``model`` on an input of ``input_shape`` (e.g. ``(1, 1, 64, 128, 128)``).

    The model is run on the meta device through :func:`torch.func.functional_call` with meta copies of its
    parameters and buffers (the model itself is not modified). ``training=False`` counts the eval-mode forward
    (one output; no deep-supervision heads).
    """
    meta = {k: torch.empty_like(v, device="meta") for k, v in
            list(model.named_parameters()) + list(model.named_buffers())}
    x = torch.zeros(tuple(input_shape), device="meta")
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            torch.func.functional_call(model, meta, (x,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def build_meta(spec: str, **overrides) -> nn.Module:
    """Build a registered variant or a spec ``NAME[:key=value]...`` on the meta device (no memory, instant), for
    counting; falls back to the CPU for builders that need real data."""
    from .registry import build_model, parse_model_spec
    name, opts = parse_model_spec(spec)
    opts.update(overrides)
    try:
        with torch.device("meta"):
            return build_model(name, **opts)
    except (NotImplementedError, RuntimeError):
        return build_model(name, **opts)


def count_macs_by_name(name: str, input_shape: Sequence[int] | None = None, **overrides) -> int:
    """MACs of a registered variant (built on the meta device) at ``input_shape`` (default: its crop, batch 1)."""
    model = build_meta(name, **overrides)
    if input_shape is None:
        input_shape = (1, model.in_channels, *model.default_crop)
    return count_macs(model, input_shape)


def model_table(names: Sequence[str] | None = None) -> List[Dict]:
    """One row per registered variant (or per name in ``names``: full variant names, family names, or specs
    ``NAME:key=value...`` measured with their options): ``{"name", "family", "size", "crop", "params_M",
    "macs_G", "twin", "params_overhead_pct", "macs_overhead_pct"}``; overheads are relative to the family's
    vanilla twin at the same size (None if none). A network whose optional dependency is missing gets ``None``
    figures and ``"unavailable"``: the one-line reason (with the command that installs it).
    """
    from .registry import families, list_models, parse_model_spec
    all_names = list_models()
    if names:
        wanted = []
        for n in names:
            base = parse_model_spec(n)[0] if ":" in n else None
            if base is not None:
                if base not in all_names:
                    raise ValueError(f"names: unknown model {base!r} in {n!r}; known: {', '.join(all_names)}")
                hits = [n]
            else:
                hits = [v for v in all_names if v == n or v.startswith(n + "_")]
            if not hits:
                raise ValueError(f"names: unknown model {n!r}; known: {', '.join(all_names)}")
            wanted += [h for h in hits if h not in wanted]
    else:
        wanted = all_names
    fams = families()
    cache: Dict[str, tuple] = {}

    def measure(spec: str) -> tuple:
        if spec not in cache:
            m = build_meta(spec)
            cache[spec] = (count_parameters(m), count_macs(m, (1, m.in_channels, *m.default_crop)),
                           tuple(m.default_crop))
        return cache[spec]

    rows = []
    for spec in wanted:
        variant = parse_model_spec(spec)[0]
        fam = next(f for f in sorted(fams, key=len, reverse=True) if variant.startswith(f + "_")
                   and variant[len(f) + 1:] in fams[f].sizes)
        size = variant[len(fam) + 1:]
        try:
            params, macs, crop = measure(spec)
        except ImportError as err:  # an optional dependency of this network is missing (the message says which)
            rows.append({"name": spec, "family": fam, "size": size, "crop": None, "params_M": None,
                         "macs_G": None, "twin": None, "params_overhead_pct": None, "macs_overhead_pct": None,
                         "unavailable": str(err)})
            continue
        row = {"name": spec, "family": fam, "size": size, "crop": crop, "params_M": params / 1e6,
               "macs_G": macs / 1e9, "twin": None, "params_overhead_pct": None, "macs_overhead_pct": None}
        twin = fams[fam].twin
        if twin and size in fams[twin].sizes:
            tp, tm, _ = measure(f"{twin}_{size}")
            row.update(twin=f"{twin}_{size}", params_overhead_pct=100.0 * (params - tp) / tp,
                       macs_overhead_pct=100.0 * (macs - tm) / tm)
        rows.append(row)
    return rows


def format_table(rows: List[Dict]) -> str:
    """Plain-text table of :func:`model_table` rows."""
    width = max([26] + [len(r["name"]) for r in rows])
    head = f"{'model':<{width}} {'crop':<14} {'params (M)':>11} {'MACs (G)':>10}  {'GLAM overhead vs twin':<30}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("unavailable"):
            lines.append(f"{r['name']:<{width}} not available: {r['unavailable']}")
            continue
        crop, over = _crop_and_overhead(r, markdown=False)
        lines.append(f"{r['name']:<{width}} {crop:<14} {r['params_M']:>11.2f} {r['macs_G']:>10.2f}  {over}")
    return "\n".join(lines)


def _crop_and_overhead(r: Dict, markdown: bool) -> tuple:
    """A row's crop (``64x128x128``; Markdown ``64×128×128``) and GLAM overhead over its twin (empty without one)."""
    pct, twin = (" %", f"`{r['twin']}`") if markdown else ("%", r["twin"])
    crop = ("×" if markdown else "x").join(str(c) for c in r["crop"])
    over = "" if r["twin"] is None else (f"{r['params_overhead_pct']:+.2f}{pct} params, "
                                          f"{r['macs_overhead_pct']:+.2f}{pct} MACs ({twin})")
    return crop, over


def format_markdown(rows: List[Dict]) -> str:
    """The same rows as a Markdown table (the README's model table is this output, so the figures have one
    source): model, crop, parameters (M), MACs (G) per crop, GLAM overhead over the vanilla twin."""
    lines = ["| model | crop | params (M) | MACs (G) | GLAM overhead vs twin |", "|---|---|---:|---:|---|"]
    for r in rows:
        if r.get("unavailable"):
            lines.append(f"| `{r['name']}` | — | — | — | not available: {r['unavailable']} |")
            continue
        crop, over = _crop_and_overhead(r, markdown=True)
        lines.append(f"| `{r['name']}` | {crop} | {r['params_M']:.2f} | {r['macs_G']:.2f} | {over} |")
    return "\n".join(lines)


def markdown_table(names: Sequence[str] | None = None) -> str:
    """``format_markdown(model_table(names))``: what ``glam3d models --markdown`` prints."""
    return format_markdown(model_table(names))

#!/usr/bin/env python
"""Plot the kept benchmark results: one group per hardware setup and precision, GLAM-nnFormer beside nnFormer and
MONAI's SwinUNETR (Synapse size) — sliding-window throughput, its peak memory, and the two GLAM / nnFormer ratios
against their targets.

    python experiments/plot_results.py                       # experiments/results/*.json -> docs/performance.png
    python experiments/plot_results.py --results DIR --out plot.png

A setup contributes fp32 and, where it measured them, bf16 groups; on a GPU the groups are the networks replayed
from CUDA graphs (what ``glam3d predict`` runs there), with the GPU's peak memory; on a CPU the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = [("glam_nnformer_synapse", "GLAM-nnFormer", "#d62728"), ("nnformer_synapse", "nnFormer", "#1f77b4"),
          ("swin_unetr_synapse", "SwinUNETR", "#7f7f7f")]
#: (label, sliding-window key, peak-memory key, ratio suffix) per device and precision
MODES = {"cpu": [("fp32", "sw", "sw_peak_rss", ""), ("bf16", "sw_bf16", "sw_bf16_peak_rss", "_bf16")],
         "gpu": [("fp32, CUDA graphs", "sw_graph", "sw_graph_gpu_peak", "_graph"),
                 ("bf16, CUDA graphs", "sw_graph_bf16", "sw_graph_bf16_gpu_peak", "_graph_bf16")]}
FORWARD_TARGET, SW_TARGET = 1.2, 0.85


def groups(results_dir: Path) -> list:
    """One entry per (setup, precision) measured, setups in the order of their fp32 matmul peak: label, per-model
    throughput and peak memory, the two GLAM / nnFormer ratios."""
    out = []
    results = [json.loads(f.read_text()) for f in sorted(results_dir.glob("*.json"))
               if not f.name.startswith("allocators-")]  # experiments/allocators.py's, not glam3d bench's
    for res in sorted(results, key=lambda r: r["matmul_peak_gflops"]):  # slowest hardware first
        setup = res["setup"]
        rows = {r["model"]: r for r in res["rows"]}
        ratios = res["ratios"]["synapse"]
        hardware = setup["name"].split("-torch")[0]
        for label, sw, mem, suffix in MODES.get(setup["device"], []):
            vps = {m: rows.get(m, {}).get(f"{sw}_voxels_per_s") for m, _, _ in MODELS}
            if not any(vps.values()):
                continue
            glam_params = rows.get("glam_nnformer_synapse", {}).get("params_M")  # which GLAM-nnFormer it measured
            which = f"\nGLAM {glam_params:.0f} M" if glam_params else ""
            out.append({"label": f"{hardware}\n{label}{which}", "vps": vps,
                        "mem": {m: rows.get(m, {}).get(mem) for m, _, _ in MODELS},
                        "forward": ratios.get(f"glam_over_nnformer_forward{suffix}"),
                        "sw": ratios.get(f"glam_over_nnformer_sw{suffix}")})
    return out


def plot(gs: list, out: Path) -> None:
    fig, axes = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    x = range(len(gs))
    width = 0.26
    for k, (model, name, color) in enumerate(MODELS):
        xs = [i + (k - 1) * width for i in x]
        vps = [g["vps"][model] or 0 for g in gs]
        mem = [(g["mem"][model] or 0) / 1e9 for g in gs]
        axes[0].bar(xs, vps, width, label=name, color=color)
        axes[1].bar(xs, mem, width, label=name, color=color)
        for xi, v in zip(xs, vps):
            if v:
                axes[0].text(xi, v * 1.08, f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k", ha="center",
                             va="bottom", fontsize=7, rotation=90)
        for xi, v in zip(xs, mem):
            if v:
                axes[1].text(xi, v + 0.05, f"{v:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    axes[0].set_yscale("log")
    axes[0].set_ylim(1e4, 2e8)
    axes[0].set_ylabel("voxels / s (log)")
    axes[0].set_title("sliding window, 128x256x256 volume, overlap 0.5, 2 windows per forward (Synapse-size networks)")
    axes[0].legend(loc="upper left", ncol=3, fontsize=9)
    axes[1].set_ylabel("peak memory (GB)")
    axes[1].set_ylim(0, 6.5)
    axes[1].set_title("its peak memory: the process's peak RSS on a CPU, the GPU's peak allocation on a GPU")

    fw = [g["forward"] or 0 for g in gs]
    sw = [g["sw"] or 0 for g in gs]
    axes[2].bar([i - 0.18 for i in x], fw, 0.34, color="#9467bd", label="forward time (target <= 1.2)")
    axes[2].bar([i + 0.18 for i in x], sw, 0.34, color="#2ca02c", label="sliding-window voxels/s (target >= 0.85)")
    axes[2].axhline(FORWARD_TARGET, color="#9467bd", lw=1, ls="--")
    axes[2].axhline(SW_TARGET, color="#2ca02c", lw=1, ls="--")
    for i, (a, b) in enumerate(zip(fw, sw)):
        axes[2].text(i - 0.18, a + 0.02, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
        axes[2].text(i + 0.18, b + 0.02, f"{b:.3f}", ha="center", va="bottom", fontsize=8)
    axes[2].set_ylim(0, max([1.75] + [v * 1.25 for v in fw + sw]))
    axes[2].set_ylabel("GLAM-nnFormer / nnFormer")
    axes[2].set_title("GLAM-nnFormer / nnFormer: forward time (batch 1) and sliding-window throughput")
    axes[2].legend(loc="upper right", ncol=2, fontsize=9)
    axes[2].set_xticks(list(x))
    axes[2].set_xticklabels([g["label"] for g in gs], fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results", help="folder of results")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.png", help="PNG to write")
    args = p.parse_args(argv)
    gs = groups(args.results)
    if not gs:
        print(f"error: {args.results}: no benchmark results with Synapse-size sliding-window lines", file=sys.stderr)
        return 2
    plot(gs, args.out)
    print(f"wrote {args.out} ({len(gs)} groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``glam3d bench``: glam3d's networks beside their peers (nnFormer, MONAI SwinUNETR): parameters, MACs, forward
time, achieved GFLOP/s vs the machine's matmul peak, sliding-window throughput and peak memory, growth with the
volume, training step time; ratios and PASS/FAIL per performance target. A thin layer over :mod:`glam3d.bench`.

``--save DIR`` names the result by the hardware setup it was measured on and writes ``DIR/<setup>.json`` and
``DIR/<setup>.md``: ``cpu-<ISA class>-<threads>c-torch<X.Y>-<precisions>`` on a CPU (e.g.
``cpu-avx512-amx-2c-torch2.13-fp32-bf16``), ``gpu-<model>-torch<X.Y>-<precisions>`` on a GPU (e.g.
``gpu-h100-torch2.11-fp32-bf16``), so that one folder holds one current result per setup.
"""
from __future__ import annotations

import argparse
import json
import os

EPILOG = """\
examples:
  glam3d bench --quick                          # tiny models, small volumes (seconds; tests and CI)
  glam3d bench --markdown bench.md --json bench.json
  glam3d bench --save experiments/results       # -> experiments/results/<setup>.json + .md, named by the machine
  glam3d bench --models nnformer glam_nnformer --sections forward sw --repeats 5
  glam3d bench --models glam_nnformer_synapse nnformer_synapse --sections sw --sw-rounds 6
                                                # sliding-window ratio with its 95% interval
  glam3d bench --models glam_nnformer_synapse 'glam_nnformer_synapse:global_num_heads=[3,6,12,24]' \\
               nnformer_synapse --sections forward --repeats 15
                                                # a variant with options beside the default and its twin
  glam3d bench --device cuda --repeats 15       # + bf16 columns and the longest 512x512 scan that fits
The full CPU run takes about 45 minutes on two cores (Synapse-size networks; a third of it the long-CT lines,
--sections picks parts); every model's sliding-window run is a child process so its peak memory is its own.
--save DIR names the result by the machine: DIR/<setup>.json + .md (docs/performance.md).
"""

#: what ``glam3d bench`` can measure; "bf16" (autocast forward + sliding window, and the bf16 matmul peak) runs on
#: any device when asked for, "graph" (forward as CUDA-graph replays) and "gpu" (longest scan without running out
#: of memory) on CUDA only; "compiled" (forward through ``torch.compile``, minutes of compiling per network on a
#: CPU) anywhere; the four are in the default set on CUDA, and "bf16" also on CPUs that compute bf16 natively
#: (AVX512-BF16 / AMX).
SECTIONS = ["forward", "sw", "scaling", "long_ct", "predict_ct", "train", "bf16", "graph", "compiled", "gpu"]


def _volume(text: str):
    try:
        v = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a volume like 128x256x256") from None
    if len(v) != 3 or min(v) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a volume like 128x256x256")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark speed and memory beside nnFormer and SwinUNETR",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models only, small volumes")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="variants or families (default: glam_nnformer, nnformer, swin_unetr at synapse and tiny "
                        "sizes; tiny only with --quick); a variant with options, NAME:key=value[:key=value], is "
                        "measured beside the others and its ratios over its vanilla twin and over NAME are added")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model after a warm-up (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="measure only these parts")
    p.add_argument("--sw-volume", type=_volume, metavar="DxHxW", help="sliding-window volume (default 128x256x256)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=2, metavar="N",
                   help="windows per forward for the sliding-window and growth lines (default 2)")
    p.add_argument("--sw-rounds", type=int, default=1, metavar="N",
                   help="sliding-window runs per model, order reversed every round; the GLAM / nnFormer "
                        "throughput ratio is then the median per-round ratio, with a 95%% interval from 6 rounds "
                        "(default 1)")
    p.add_argument("--scaling-model", metavar="NAME", help="model for the volume-growth lines")
    p.add_argument("--scaling-volumes", type=_volume, nargs="+", metavar="DxHxW",
                   help="volumes of the volume-growth lines")
    p.add_argument("--long-ct-model", metavar="NAME",
                   help="model for the long-CT lines (default nnformer_synapse; nnformer_tiny with --quick)")
    p.add_argument("--long-ct-volumes", type=_volume, nargs="+", metavar="DxHxW",
                   help="default 200x512x512 1000x512x512")
    p.add_argument("--long-ct-overlap", type=float, default=0.0, help="sliding-window overlap of the long-CT lines "
                                                                       "(default 0)")
    p.add_argument("--long-ct-in-memory", action="store_true",
                   help="long CT: int16 input array and labels in memory (default: .npy on disk to .npy on disk)")
    p.add_argument("--long-ct-sw-batch-size", type=int, default=1, metavar="N",
                   help="windows per forward for the long-CT lines (default 1)")
    p.add_argument("--predict-ct-spacing", type=float, nargs="+", default=[4.0], metavar="MM",
                   help="predict_ct: target spacing (mm; one value: isotropic, three: sz sy sx) of the plan in the "
                        "checkpoint the long-CT scans go through `glam3d predict` with (default 4: the scan's "
                        "handling, not the network, dominates; `3 0.8 0.8` is a Synapse-like fine plan)")
    p.add_argument("--predict-ct-probabilities", action="store_true",
                   help="predict_ct: also write the class probabilities (glam3d predict --probabilities)")
    p.add_argument("--largest-limit", type=int, default=4096, metavar="D",
                   help="gpu section: longest D x 512 x 512 scan tried (default 4096)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--markdown", metavar="OUT", help="write the table as Markdown")
    p.add_argument("--save", metavar="DIR",
                   help="write DIR/<setup>.json and DIR/<setup>.md, named by the hardware setup (device, CPU ISA "
                        "class and threads or GPU model, torch version, precisions: e.g. "
                        "cpu-avx512-amx-2c-torch2.13-fp32-bf16); while the run goes on they are "
                        "DIR/<setup>.partial.json / .md. A result there that holds sections or models this run leaves "
                        "out is not replaced")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def _expand(names):
    """Families to their synapse and tiny variants; ``NAME:key=value`` specs checked as given."""
    from ..models import check_model_spec, list_models
    known = list_models()
    out = []
    for n in names:
        if ":" in n:
            out += [check_model_spec(n)] if n not in out else []
            continue
        hits = [n] if n in known else [v for v in known if v.startswith(n + "_") and v[len(n) + 1:] in
                                       ("synapse", "tiny") and not (n == "nnformer" and v.startswith("glam"))]
        if not hits:
            raise ValueError(f"--models: unknown model {n!r}; known: {', '.join(known)}")
        out += [h for h in hits if h not in out]
    return out


def run(args) -> int:
    from ..bench import (BenchConfig, check_replaceable, format_report, machine_setup, result_paths, run_bench,
                         save_result, to_markdown)
    from ..errors import UserError
    from ..utils.io import atomic_write_text

    if args.repeats < 1:
        raise UserError(f"--repeats={args.repeats} must be >= 1")
    if args.sw_batch_size < 1:
        raise UserError(f"--sw-batch-size={args.sw_batch_size} must be >= 1")
    if args.sw_rounds < 1:
        raise UserError(f"--sw-rounds={args.sw_rounds} must be >= 1")
    if args.long_ct_sw_batch_size < 1:
        raise UserError(f"--long-ct-sw-batch-size={args.long_ct_sw_batch_size} must be >= 1")
    if len(args.predict_ct_spacing) not in (1, 3) or not all(v > 0 for v in args.predict_ct_spacing):
        raise UserError(f"--predict-ct-spacing needs one or three values > 0 (sz sy sx), "
                        f"got {' '.join(map(str, args.predict_ct_spacing))}")
    if args.largest_limit < 1:
        raise UserError(f"--largest-limit={args.largest_limit} must be >= 1")
    if not 0 <= args.overlap < 1 or not 0 <= args.long_ct_overlap < 1:
        raise UserError("--overlap / --long-ct-overlap must be in [0, 1)")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available")

    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise UserError("--save needs a folder; this is a file", args.save)

    def write(res: dict, partial: bool = False):
        """--json / --markdown / --save, rewritten (atomically) after every section: a cut run keeps what it
        measured (--save: in the .partial files, beside a finished result it does not replace). Returns the
        --save paths (JSON, Markdown), or None."""
        if args.json:
            atomic_write_text(args.json, json.dumps(res, indent=2, default=list) + "\n")
        if args.markdown:
            atomic_write_text(args.markdown, to_markdown(res))
        if args.save:
            return save_result(res, args.save, partial=partial)
        return None

    try:
        models = _expand(args.models) if args.models else None
        if models and args.quick:
            from ..models import parse_model_spec
            models = [m for m in models if parse_model_spec(m)[0].endswith("_tiny")] or models
        cfg = BenchConfig(models=models, device=args.device, repeats=args.repeats, quick=args.quick,
                          sw_volume=args.sw_volume, overlap=args.overlap,
                          sw_batch_size=args.sw_batch_size, sw_rounds=args.sw_rounds, scaling_model=args.scaling_model,
                          scaling_volumes=args.scaling_volumes, long_ct_model=args.long_ct_model,
                          long_ct_volumes=args.long_ct_volumes, long_ct_overlap=args.long_ct_overlap,
                          long_ct_in_memory=args.long_ct_in_memory,
                          long_ct_sw_batch_size=args.long_ct_sw_batch_size,
                          predict_ct_spacing=args.predict_ct_spacing,
                          predict_ct_probabilities=args.predict_ct_probabilities,
                          threads=args.threads, sections=args.sections, largest_limit=args.largest_limit,
                          progress=not args.no_progress)
        if args.save:  # before measuring anything: the file this run would replace
            import torch
            plan = cfg.resolved()
            setup = machine_setup(plan.device, plan.threads or torch.get_num_threads(), plan.sections)
            check_replaceable(result_paths(args.save, setup["name"])[0], plan.sections, plan.models)
        res = run_bench(cfg, on_section=(lambda r: write(r, partial=True)) if args.json or args.markdown or args.save
                        else None)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(format_report(res))
    saved = write(res)
    if saved:
        print(f"saved: {saved[0]} (+ {os.path.basename(saved[1])})")
    return 0

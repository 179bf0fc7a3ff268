"""``glam3d predict``: segment new scans with trained checkpoints, writing label maps in each scan's geometry and
format.

The checkpoint carries the preprocessing plan and the label values, so a user gives only the scans: image files
(NIfTI, ``.mha``, ``.nrrd``, … anything SimpleITK reads), folders of them (nnU-Net's ``<case>_XXXX`` channel files
grouped into cases, as in ``imagesTs``), or DICOM series folders. Several checkpoints are an ensemble (their
softmax averaged per window). This module is the command line over :class:`glam3d.inference.predictor.Predictor`
(``Predictor.from_checkpoints(...).predict_files(...)``), which says what happens to each scan.
``predictions.json`` in the output folder records, per case, the checkpoints' sha256 and the options that shaped
the output (``glam3d evaluate`` reports them); the folder's ownership marker lists what glam3d wrote there.

Under ``torchrun`` (``WORLD_SIZE > 1``) rank r takes cases r, r + world, … on GPU ``LOCAL_RANK``.
"""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  glam3d predict --checkpoint runs/synapse/checkpoints/best.pt --input RawData/Testing/img --output preds/
  glam3d predict --checkpoint best.pt --input scan.nii.gz dicom_series/ --output preds/ --mirror --amp bf16
  glam3d predict --checkpoint runs/fold_{0,1,2,3,4}/checkpoints/best.pt --input nnUNet_raw/Dataset017_BTCV/imagesTs \\
      --output preds_test/ --largest-component runs/cv_report/postprocessing.json
  torchrun --nproc_per_node 4 -m glam3d predict --checkpoint best.pt --input scans/ --output preds/
Outputs are <case><ending>, the case id without channel suffix, in the input's format unless --format. A case is
skipped when predictions.json shows the same checkpoints and options made its output; otherwise (or with
--overwrite) it is predicted again. Only files glam3d wrote are ever replaced; outputs are written atomically.
Problems found up front (unreadable headers, a bad checkpoint, output inside the input, a file there glam3d did not
write) stop the run before anything is written; a scan that fails while being read or preprocessed is reported in
one line, the other scans are still written, and the exit code is 2.
"""


def add_parser(subparsers):
    from ..inference.cases import OUTPUT_FORMATS

    p = subparsers.add_parser("predict", help="segment scans (NIfTI / DICOM) with a trained checkpoint",
                              description=" ".join(__doc__.split("\n\n")[0].split()), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                   help="glam3d checkpoint (.pt); several: an ensemble (softmax averaged per window; the same "
                        "preprocessing plan and labels; window settings from the first unless given)")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="image files (NIfTI, .mha, .nrrd, ...), folders of them (nnU-Net <case>_XXXX channel files "
                        "grouped into cases), DICOM series folders")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the <case> label maps")
    p.add_argument("--format", default="input", choices=("input", *OUTPUT_FORMATS),
                   help="label-map format (default input: each scan's own; DICOM series: nii.gz)")
    p.add_argument("--largest-component", nargs="?", const="all", default=None, metavar="all|FILE.json",
                   help="keep the largest connected component before writing: of every organ ('all', the default "
                        "when given without a value), or as a postprocessing.json from 'glam3d postprocess decide' / "
                        "'glam3d evaluate --decide-postprocessing' says")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default: the checkpoint's validation setting, else 0.5)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default 2)")
    p.add_argument("--roi-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="window size (default: the checkpoint's training crop)")
    p.add_argument("--mode", choices=("gaussian", "constant"), default=None, help="window blending (gaussian)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="mirroring test-time augmentation over all axes (8 passes; default: checkpoint's setting)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--stitch-device", default=None, metavar="DEVICE",
                   help="where windows are blended (default: --device); 'cpu' for scans too large for the GPU")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision (auto: bf16 on GPUs that support it, else fp16; float32 on CPU). bf16 "
                        "on a CPU with AVX512-BF16 or AMX runs the network 1.3-1.5x faster than float32 (labels "
                        "may differ at a few boundary voxels); fp16 is GPU-only")
    p.add_argument("--scratch", default=None, metavar="DIR",
                   help="folder for the temporary files of a scan, so that none is held in memory: the CT "
                        "decoded for reading (mapped, unlinked at once), the labels as the sliding window "
                        "finishes them, with --probabilities the class maps (mapped, unlinked at once), and "
                        "at overlap > 0 the blending's class sums that wait between two rows of windows (CPU "
                        "stitching; unlinked at once) (default: the output folder); 'none': keep them in memory")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <case>_probabilities.nii.gz (softmax per class, in the input geometry; NIfTI "
                        "whatever --format, streamed plane by plane)")
    p.add_argument("--overwrite", action="store_true",
                   help="predict every case again (default: skip a case the same checkpoints and options made); "
                        "files glam3d did not write are never replaced")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the network once (static shapes, CPU: frozen weights), then segment every "
                        "scan with it; meant for GPUs (on a small CPU compiling takes minutes and the forward is no "
                        "faster); MODE: default, reduce-overhead (CUDA graphs), max-autotune, "
                        "max-autotune-no-cudagraphs")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the network's forward once as a CUDA graph and replay it for every batch of "
                        "windows (no compiling; removes the host's per-kernel dispatch, which dominates at small "
                        "window batches: GLAM-nnFormer's sliding window 4.4x faster in bf16 on an H100). Default: on "
                        "when the network runs on a GPU (and --compile is not given); --no-cuda-graphs runs it eagerly")
    return p


def run(args) -> int:
    from ..inference.cases import PredictionFiles
    from ..inference.predictor import Predictor, check_compile_options, input_spec

    check_compile_options(args.compile, args.cuda_graphs)
    # everything about the files is checked before the networks are built (the first checkpoint, mapped, says how
    # many channels a case has and how its files are named), and all of it before anything is written
    scratch = True if args.scratch is None else (False if args.scratch.lower() == "none" else args.scratch)
    files = PredictionFiles.check(args.input, args.output, scratch=scratch, spec=input_spec(args.checkpoint),
                                  format=args.format)
    predictor = Predictor.from_checkpoints(
        args.checkpoint, device=args.device, amp=args.amp, overlap=args.overlap, roi_size=args.roi_size,
        sw_batch_size=args.sw_batch_size, mode=args.mode, mirror=args.mirror, stitch_device=args.stitch_device,
        compile=args.compile, cuda_graphs=args.cuda_graphs, largest_component=args.largest_component)
    result = predictor.predict_files(files, overwrite=args.overwrite, probabilities=args.probabilities,
                                     quiet=args.quiet)
    return result.exit_code
